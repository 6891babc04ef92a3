//! The stroke classes the micro model predicts and the shape of one input window.
use serde::{Deserialize, Serialize};

/// Frames in one window of pose keypoints.
pub const WINDOW_FRAMES: usize = 32;
/// Features per frame: 8 keypoints (wrists, elbows, shoulders, hips; left and right)
/// in 2-D image coordinates, in the order documented in `docs/batch-format.md`.
pub const WINDOW_FEATURES: usize = 16;
/// Number of stroke classes.
pub const NUM_CLASSES: usize = 6;

/// A stroke class. The discriminant is the model's class index; the order is part of
/// the model format and never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrokeClass {
    Freestyle = 0,
    Backstroke = 1,
    Breaststroke = 2,
    Butterfly = 3,
    Turn = 4,
    Glide = 5,
}

impl StrokeClass {
    /// All classes in class-index order.
    pub const ALL: [StrokeClass; NUM_CLASSES] = [
        StrokeClass::Freestyle,
        StrokeClass::Backstroke,
        StrokeClass::Breaststroke,
        StrokeClass::Butterfly,
        StrokeClass::Turn,
        StrokeClass::Glide,
    ];

    /// The class's index in the model's output.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The class at `i`, or `None` if `i >= NUM_CLASSES`.
    pub fn from_index(i: usize) -> Option<StrokeClass> {
        Self::ALL.get(i).copied()
    }

    /// The wire name ("freestyle", ...).
    pub fn name(self) -> &'static str {
        match self {
            StrokeClass::Freestyle => "freestyle",
            StrokeClass::Backstroke => "backstroke",
            StrokeClass::Breaststroke => "breaststroke",
            StrokeClass::Butterfly => "butterfly",
            StrokeClass::Turn => "turn",
            StrokeClass::Glide => "glide",
        }
    }

    /// Parse a wire name; `None` for anything else (case-sensitive).
    pub fn from_name(s: &str) -> Option<StrokeClass> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl std::fmt::Display for StrokeClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names_round_trip_in_index_order() {
        for (i, c) in StrokeClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
            assert_eq!(StrokeClass::from_name(c.name()), Some(*c));
            assert_eq!(StrokeClass::from_index(i), Some(*c));
        }
        assert_eq!(StrokeClass::from_name("Freestyle"), None);
        assert_eq!(StrokeClass::from_index(NUM_CLASSES), None);
    }
}
