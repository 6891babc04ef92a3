//! The model spec of a deployment: what one input window is (frames, channels and their
//! units, frame rate) and which classes the model tells apart, in output order.
//!
//! # Guarantees
//! - One spec per deployment, chosen in the config (`spec`: a built-in name or a JSON
//!   file, runtime/src/config.rs). Ingest validates every upload against it; every
//!   stored model (safetensors and ONNX) records the spec it was trained for, and a
//!   model whose spec differs from the deployment's is never loaded as a parent,
//!   scored or served for it ([`ModelSpec::ensure_same`]).
//! - A class is a typed index into [`ModelSpec::classes`] ([`ClassId`]): labels travel
//!   and are stored as indexes, shown and uploaded by name.
//! - [`ModelSpec::validate`] bounds every dimension, so that no spec can make a stored
//!   sample chunk or a model exceed the store's value limit or the phone budget by
//!   itself (the model crate checks its own size).
//!
//! Built-ins:
//! - [`SYNTHETIC_POSE`] (the default): 32 frames × 16 pose-keypoint coordinates, the six
//!   classes of the synthetic swimmers (`freestyle, backstroke, breaststroke,
//!   butterfly, turn, glide`).
//! - [`SMARTWATCH`]: 64 frames at 30 Hz (about 2.1 s, one to two stroke cycles) × 6
//!   wrist IMU channels (accelerometer, gyroscope), the classes of the swim-imu
//!   recordings in their label order (`null, freestyle, breaststroke, backstroke,
//!   butterfly, turn`). Measured on those recordings (`swimlane replay`, README): 64
//!   frames against 32 raised the base models' median accuracy on unseen swimmers from
//!   0.845 to 0.925, and leaving out the magnetometer (whose readings depend on the
//!   pool's orientation, not on the stroke) from 0.885 to 0.925.
use serde::{Deserialize, Serialize};

use crate::stroke::{StrokeClass, WINDOW_FEATURES, WINDOW_FRAMES};

/// Name of the default built-in spec.
pub const SYNTHETIC_POSE: &str = "synthetic-pose";
/// Name of the smartwatch built-in spec.
pub const SMARTWATCH: &str = "smartwatch";
/// Bounds [`ModelSpec::validate`] enforces.
pub const MAX_FRAMES: usize = 256;
pub const MAX_CHANNELS: usize = 64;
pub const MAX_WINDOW_VALUES: usize = 4096;
pub const MAX_CLASSES: usize = 32;

/// A class: an index into the spec's class list (the model's output index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClassId(pub u8);

impl ClassId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl From<StrokeClass> for ClassId {
    fn from(c: StrokeClass) -> ClassId {
        ClassId(c.index() as u8)
    }
}

/// One input channel (a feature of every frame).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub name: String,
    /// Unit, for people and importers (`m/s^2`, `rad/s`, `normalised image units`).
    pub unit: String,
}

/// What a window is and which classes the model predicts (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A short name (`synthetic-pose`, `smartwatch`, or a file's own).
    pub name: String,
    /// Frames per window.
    pub frames: usize,
    /// Frames per second of the recordings the windows are cut from.
    pub frame_rate_hz: f32,
    /// The features of one frame, in order.
    pub channels: Vec<Channel>,
    /// Class names in model-output order.
    pub classes: Vec<String>,
}

/// Why a spec is unusable, or two specs differ.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown built-in spec {0:?} (built-ins: synthetic-pose, smartwatch)")]
    UnknownBuiltin(String),
    #[error("spec is not valid JSON: {0}")]
    Malformed(String),
    #[error("spec {name:?}: {why}")]
    Invalid { name: String, why: String },
    #[error("model was made for spec {found:?}, this deployment's spec is {expected:?}{detail}")]
    Mismatch {
        expected: String,
        found: String,
        detail: String,
    },
}

fn channels(list: &[(&str, &str)]) -> Vec<Channel> {
    list.iter()
        .map(|(n, u)| Channel {
            name: n.to_string(),
            unit: u.to_string(),
        })
        .collect()
}

impl ModelSpec {
    /// The synthetic pose spec (the default): the shape the synthetic swimmers make.
    pub fn synthetic_pose() -> ModelSpec {
        let names = [
            "left_wrist",
            "right_wrist",
            "left_elbow",
            "right_elbow",
            "left_shoulder",
            "right_shoulder",
            "left_hip",
            "right_hip",
        ];
        let mut ch = Vec::with_capacity(WINDOW_FEATURES);
        for n in names {
            for axis in ["x", "y"] {
                ch.push(Channel {
                    name: format!("{n}_{axis}"),
                    unit: "normalised image units".into(),
                });
            }
        }
        ModelSpec {
            name: SYNTHETIC_POSE.into(),
            frames: WINDOW_FRAMES,
            // About 15 pose frames a second (docs/batch-format.md).
            frame_rate_hz: 15.0,
            channels: ch,
            classes: StrokeClass::ALL.iter().map(|c| c.name().into()).collect(),
        }
    }

    /// The smartwatch spec: wrist IMU at 30 Hz, the swim-imu classes.
    pub fn smartwatch() -> ModelSpec {
        ModelSpec {
            name: SMARTWATCH.into(),
            frames: 64,
            frame_rate_hz: 30.0,
            channels: channels(&[
                ("acc_x", "m/s^2"),
                ("acc_y", "m/s^2"),
                ("acc_z", "m/s^2"),
                ("gyro_x", "rad/s"),
                ("gyro_y", "rad/s"),
                ("gyro_z", "rad/s"),
            ]),
            classes: [
                "null",
                "freestyle",
                "breaststroke",
                "backstroke",
                "butterfly",
                "turn",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// A built-in spec by name.
    pub fn builtin(name: &str) -> Result<ModelSpec, SpecError> {
        match name {
            SYNTHETIC_POSE => Ok(Self::synthetic_pose()),
            SMARTWATCH => Ok(Self::smartwatch()),
            other => Err(SpecError::UnknownBuiltin(other.to_string())),
        }
    }

    /// Parse a spec from JSON (a spec file) and validate it.
    pub fn from_json(bytes: &[u8]) -> Result<ModelSpec, SpecError> {
        let s: ModelSpec =
            serde_json::from_slice(bytes).map_err(|e| SpecError::Malformed(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// The spec as canonical JSON (what models record).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("specs serialize")
    }

    /// Check every bound (module doc).
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |why: String| {
            Err(SpecError::Invalid {
                name: self.name.clone(),
                why,
            })
        };
        if self.name.is_empty() || self.name.len() > 64 {
            return bad("name must be 1 to 64 bytes".into());
        }
        if self.frames == 0 || self.frames > MAX_FRAMES {
            return bad(format!("frames must be 1 to {MAX_FRAMES}"));
        }
        if self.channels.is_empty() || self.channels.len() > MAX_CHANNELS {
            return bad(format!("channels must number 1 to {MAX_CHANNELS}"));
        }
        if self.window_values() > MAX_WINDOW_VALUES {
            return bad(format!(
                "frames × channels is {}, at most {MAX_WINDOW_VALUES}",
                self.window_values()
            ));
        }
        if !(self.frame_rate_hz > 0.0 && self.frame_rate_hz.is_finite()) {
            return bad("frame_rate_hz must be positive".into());
        }
        if self.classes.len() < 2 || self.classes.len() > MAX_CLASSES {
            return bad(format!("classes must number 2 to {MAX_CLASSES}"));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if c.is_empty() || c.contains(',') || c.len() > 64 {
                return bad(format!(
                    "class {i} {c:?}: names are 1 to 64 bytes without commas"
                ));
            }
            if self.classes[..i].contains(c) {
                return bad(format!("class {c:?} is listed twice"));
            }
        }
        for (i, c) in self.channels.iter().enumerate() {
            if c.name.is_empty() || c.name.contains(',') {
                return bad(format!("channel {i}: names are non-empty without commas"));
            }
            if self.channels[..i].iter().any(|o| o.name == c.name) {
                return bad(format!("channel {:?} is listed twice", c.name));
            }
        }
        Ok(())
    }

    /// Values in one window (frames × channels).
    pub fn window_values(&self) -> usize {
        self.frames * self.channels.len()
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The class with this name (case-sensitive).
    pub fn class_id(&self, name: &str) -> Option<ClassId> {
        self.classes
            .iter()
            .position(|c| c == name)
            .map(|i| ClassId(i as u8))
    }

    /// The class at this index, if the spec has it.
    pub fn class(&self, index: usize) -> Option<ClassId> {
        (index < self.classes.len()).then_some(ClassId(index as u8))
    }

    /// The name of a class (`"?"` for an index this spec does not have).
    pub fn class_name(&self, c: ClassId) -> &str {
        self.classes
            .get(c.index())
            .map(String::as_str)
            .unwrap_or("?")
    }

    /// The channel names, comma-separated.
    pub fn channel_list(&self) -> String {
        self.channels
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `Ok` when `other` (a model's spec) is this spec; otherwise the difference.
    pub fn ensure_same(&self, other: &ModelSpec) -> Result<(), SpecError> {
        if self == other {
            return Ok(());
        }
        let detail = if self.frames != other.frames || self.channels.len() != other.channels.len() {
            format!(
                " (window {}x{} against {}x{})",
                other.frames,
                other.channels.len(),
                self.frames,
                self.channels.len()
            )
        } else if self.classes != other.classes {
            format!(
                " (classes {} against {})",
                other.classes.join(","),
                self.classes.join(",")
            )
        } else {
            " (channels, units or frame rate differ)".into()
        };
        Err(SpecError::Mismatch {
            expected: self.name.clone(),
            found: other.name.clone(),
            detail,
        })
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self::synthetic_pose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_and_distinct() {
        for name in [SYNTHETIC_POSE, SMARTWATCH] {
            let s = ModelSpec::builtin(name).unwrap();
            s.validate().unwrap();
            assert_eq!(s.name, name);
            assert_eq!(ModelSpec::from_json(s.to_json().as_bytes()).unwrap(), s);
        }
        let pose = ModelSpec::synthetic_pose();
        assert_eq!(pose.window_values(), WINDOW_FRAMES * WINDOW_FEATURES);
        assert_eq!(pose.class_id("glide"), Some(ClassId(5)));
        assert_eq!(ClassId::from(StrokeClass::Turn), ClassId(4));
        let watch = ModelSpec::smartwatch();
        assert_eq!(watch.window_values(), 384);
        assert_eq!(watch.class_id("null"), Some(ClassId(0)));
        assert_eq!(watch.class_name(ClassId(3)), "backstroke");
        let e = pose.ensure_same(&watch).unwrap_err();
        assert!(e.to_string().contains("window 64x6 against 32x16"), "{e}");
        assert!(matches!(
            ModelSpec::builtin("nope"),
            Err(SpecError::UnknownBuiltin(_))
        ));
    }

    #[test]
    fn invalid_specs_are_refused_with_the_reason() {
        let mut s = ModelSpec::smartwatch();
        s.classes.push("turn".into());
        assert!(s.validate().unwrap_err().to_string().contains("twice"));
        let mut s = ModelSpec::smartwatch();
        s.frames = 10_000;
        assert!(s.validate().is_err());
        let mut s = ModelSpec::smartwatch();
        s.classes.truncate(1);
        assert!(s.validate().is_err());
        assert!(ModelSpec::from_json(b"{\"name\": \"x\"}").is_err());
        let mut v: serde_json::Value =
            serde_json::from_str(&ModelSpec::smartwatch().to_json()).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(ModelSpec::from_json(v.to_string().as_bytes()).is_err());
    }
}
