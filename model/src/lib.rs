//! swimlane-model: the micro model that classifies a window of pose keypoints into a
//! stroke class, its training (base and per-user fine-tuning, candle on the CPU), its
//! evaluation, its weights (safetensors with a version header) and the synthetic
//! swimmers the rest of the project tests against.
//!
//! Pure: bytes and tensors in, bytes and tensors out. No files, no network, no clock;
//! every result is a function of the inputs and the seeds.
//!
//! - [`synth`]: seeded swimmers with personal styles, corrections, poisoning.
//! - [`net`]: [`MicroModel`] (normalisation + MLP), `to_bytes` / `from_bytes`.
//! - [`train`]: [`TrainConfig`], [`train_base`], [`fine_tune`], [`fine_tune_many`].
//! - [`onnx`]: the model as ONNX (export with its own ONNX types, no protoc; its own
//!   evaluator of the exported graph; parity with candle).
//! - [`eval`]: [`evaluate`] → accuracy, per-class recall, confusion matrix.
//! - [`experiment`]: the personalisation protocol behind `swimlane model evaluate` and
//!   the acceptance tests.
use serde::{Deserialize, Serialize};
use swimlane_core::ClassId;

mod backprop;
pub mod dataset;
pub mod eval;
pub mod experiment;
pub mod net;
pub mod onnx;
mod optim;
mod st;
pub mod synth;
pub mod train;

pub use eval::{evaluate, Evaluation};
pub use net::{MicroModel, FORMAT_VERSION, MAX_MODEL_BYTES};
pub use train::{fine_tune, fine_tune_many, train_base, FineTuneJob, TrainConfig, TrainReport};

/// One labelled window: `frames` holds the spec's frames × channels values, frame by
/// frame (row-major: frame 0's channels, then frame 1's, ...), channels in the spec's
/// order (see `docs/batch-format.md`); `label` indexes the spec's classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub frames: Vec<f32>,
    pub label: ClassId,
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model bytes are not a swimlane micro model: {0}")]
    Format(String),
    #[error(
        "model format version {0:?} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(String),
    #[error("window {index} has {len} values, expected {expected}")]
    BadWindow {
        index: usize,
        len: usize,
        expected: usize,
    },
    #[error("sample {index} has class {label}, the spec has {classes} classes")]
    BadLabel {
        index: usize,
        label: usize,
        classes: usize,
    },
    #[error(transparent)]
    Spec(#[from] swimlane_core::SpecError),
    #[error("no samples to train on")]
    NoSamples,
    #[error("bad training configuration: {0}")]
    Config(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}
