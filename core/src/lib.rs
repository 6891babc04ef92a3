//! swimlane-core: the pure domain. Knows nothing of Kafka, FoundationDB, HTTP or
//! tokio; every function here is deterministic given its arguments.

pub mod batch;
pub mod clock;
pub mod events;
pub mod familiar;
pub mod ids;
pub mod keys;
pub mod policy;
pub mod records;
pub mod spec;
pub mod stats;
pub mod stroke;

pub use events::{groups, topics, Event, EventDecodeError};
pub use ids::{BatchId, IdError, UserId};
pub use spec::{ClassId, ModelSpec, SpecError};
pub use stroke::{StrokeClass, NUM_CLASSES, WINDOW_FEATURES, WINDOW_FRAMES};
