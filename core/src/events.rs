//! Events carried on the bus between stages, and their wire encoding.
//!
//! Every event is JSON with a schema version `v`; decoding an unknown version or a
//! malformed payload is an error (the consumer dead-letters it), never a panic.
//! Events are keyed by user id, so one user's events keep their order.
use serde::{Deserialize, Serialize};

use crate::ids::{BatchId, UserId};

/// The wire schema version this code writes and the only one it reads.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// Topic names. One stage consumes each.
pub mod topics {
    /// `BatchStaged`, consumed by trainers.
    pub const BATCHES: &str = "swimlane.batches";
    /// `CandidateTrained`, consumed by validators.
    pub const CANDIDATES: &str = "swimlane.candidates";
    /// `CandidateAccepted` / `CandidateRejected`, consumed by publishers.
    pub const VERDICTS: &str = "swimlane.verdicts";
    /// `ModelPublished`, for devices' notification services and audit.
    pub const PUBLISHED: &str = "swimlane.published";
    /// Events no stage could process, with the reason.
    pub const DEAD_LETTER: &str = "swimlane.dead-letter";
    /// Every topic, in pipeline order.
    pub const ALL: [&str; 5] = [BATCHES, CANDIDATES, VERDICTS, PUBLISHED, DEAD_LETTER];
}

/// The consumer groups: every worker of one kind joins its kind's group.
pub mod groups {
    /// Trainers, on [`super::topics::BATCHES`].
    pub const TRAINERS: &str = "trainers";
    /// Validators, on [`super::topics::CANDIDATES`].
    pub const VALIDATORS: &str = "validators";
    /// Publishers, on [`super::topics::VERDICTS`].
    pub const PUBLISHERS: &str = "publishers";
}

/// A pipeline event. The user id is also the bus key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A batch passed validation and its samples are durably staged.
    BatchStaged {
        user: UserId,
        batch_id: BatchId,
        samples: u32,
    },
    /// A training run produced a candidate model from these batches.
    CandidateTrained {
        user: UserId,
        run_id: String,
        batches: Vec<BatchId>,
    },
    /// The validator accepted the run's candidate.
    CandidateAccepted { user: UserId, run_id: String },
    /// The validator rejected the run's candidate, for `reason`.
    CandidateRejected {
        user: UserId,
        run_id: String,
        reason: String,
    },
    /// A run's candidate is now the user's model `version`.
    ModelPublished {
        user: UserId,
        run_id: String,
        version: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct Wire<T> {
    v: u32,
    #[serde(flatten)]
    event: T,
}

/// Why bytes did not decode into an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("event is not valid JSON of a known shape: {0}")]
    Malformed(String),
    #[error("event schema version {0} is not supported (this build reads {EVENT_SCHEMA_VERSION})")]
    UnsupportedVersion(u32),
}

impl Event {
    /// The user the event belongs to (also its bus key).
    pub fn user(&self) -> &UserId {
        match self {
            Event::BatchStaged { user, .. }
            | Event::CandidateTrained { user, .. }
            | Event::CandidateAccepted { user, .. }
            | Event::CandidateRejected { user, .. }
            | Event::ModelPublished { user, .. } => user,
        }
    }

    /// The topic this event is published on.
    pub fn topic(&self) -> &'static str {
        match self {
            Event::BatchStaged { .. } => topics::BATCHES,
            Event::CandidateTrained { .. } => topics::CANDIDATES,
            Event::CandidateAccepted { .. } | Event::CandidateRejected { .. } => topics::VERDICTS,
            Event::ModelPublished { .. } => topics::PUBLISHED,
        }
    }

    /// Encode with the current schema version.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&Wire {
            v: EVENT_SCHEMA_VERSION,
            event: self,
        })
        .expect("events always serialize")
    }

    /// Decode; never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Event, EventDecodeError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let v: Version = serde_json::from_slice(bytes)
            .map_err(|e| EventDecodeError::Malformed(e.to_string()))?;
        if v.v != EVENT_SCHEMA_VERSION {
            return Err(EventDecodeError::UnsupportedVersion(v.v));
        }
        let w: Wire<Event> = serde_json::from_slice(bytes)
            .map_err(|e| EventDecodeError::Malformed(e.to_string()))?;
        Ok(w.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_bad_bytes_are_errors() {
        let e = Event::CandidateRejected {
            user: UserId::new("u1").unwrap(),
            run_id: "r1".into(),
            reason: "no gain".into(),
        };
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        assert!(matches!(
            Event::decode(b"\xff\x00"),
            Err(EventDecodeError::Malformed(_))
        ));
        assert!(matches!(
            Event::decode(br#"{"v":2,"type":"batch_staged"}"#),
            Err(EventDecodeError::UnsupportedVersion(2))
        ));
        assert!(Event::decode(
            br#"{"v":1,"type":"batch_staged","user":"../x","batch_id":"b","samples":1}"#
        )
        .is_err());
    }
}
