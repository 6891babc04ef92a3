//! Evaluation of a model on labelled samples.
use serde::{Deserialize, Serialize};
use swimlane_core::NUM_CLASSES;

use crate::{MicroModel, ModelError, Sample};

/// Accuracy, per-class recall and the confusion matrix of a model on a sample set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub samples: usize,
    /// Fraction of samples predicted correctly (0 for an empty set).
    pub accuracy: f64,
    /// Recall per class in class-index order; `None` for a class with no samples.
    pub per_class_recall: [Option<f64>; NUM_CLASSES],
    /// `confusion[truth][predicted]` counts.
    pub confusion: [[u32; NUM_CLASSES]; NUM_CLASSES],
}

/// Score `model` on `samples`.
pub fn evaluate(model: &MicroModel, samples: &[Sample]) -> Result<Evaluation, ModelError> {
    let predicted = model.predict(samples)?;
    let mut confusion = [[0u32; NUM_CLASSES]; NUM_CLASSES];
    for (s, p) in samples.iter().zip(&predicted) {
        confusion[s.label.index()][p.index()] += 1;
    }
    Ok(from_confusion(confusion))
}

/// The evaluation that a confusion matrix implies.
pub fn from_confusion(confusion: [[u32; NUM_CLASSES]; NUM_CLASSES]) -> Evaluation {
    let total: u32 = confusion.iter().flatten().sum();
    let correct: u32 = (0..NUM_CLASSES).map(|i| confusion[i][i]).sum();
    let mut per_class_recall = [None; NUM_CLASSES];
    for (i, row) in confusion.iter().enumerate() {
        let n: u32 = row.iter().sum();
        if n > 0 {
            per_class_recall[i] = Some(row[i] as f64 / n as f64);
        }
    }
    Evaluation {
        samples: total as usize,
        accuracy: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        per_class_recall,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_arithmetic() {
        let mut c = [[0u32; NUM_CLASSES]; NUM_CLASSES];
        c[0][0] = 3;
        c[0][1] = 1;
        c[2][2] = 4;
        let e = from_confusion(c);
        assert_eq!(e.samples, 8);
        assert!((e.accuracy - 7.0 / 8.0).abs() < 1e-12);
        assert_eq!(e.per_class_recall[0], Some(0.75));
        assert_eq!(e.per_class_recall[1], None);
        assert_eq!(e.per_class_recall[2], Some(1.0));
        assert_eq!(
            from_confusion([[0; NUM_CLASSES]; NUM_CLASSES]).accuracy,
            0.0
        );
    }
}
