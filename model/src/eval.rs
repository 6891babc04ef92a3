//! Evaluation of a model on labelled samples.
use serde::{Deserialize, Serialize};

use crate::{MicroModel, ModelError, Sample};
use swimlane_core::ClassId;

/// Accuracy, per-class recall and the confusion matrix of a model on a sample set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub samples: usize,
    /// Fraction of samples predicted correctly (0 for an empty set).
    pub accuracy: f64,
    /// Recall per class in class-index order; `None` for a class with no samples.
    pub per_class_recall: Vec<Option<f64>>,
    /// `confusion[truth][predicted]` counts (one row and column per spec class).
    pub confusion: Vec<Vec<u32>>,
}

impl Evaluation {
    /// Macro-averaged F1 over the classes that occur (in truth or prediction); 0 for an
    /// empty set.
    pub fn macro_f1(&self) -> f64 {
        let k = self.confusion.len();
        let mut sum = 0.0;
        let mut n = 0;
        for c in 0..k {
            let tp = self.confusion[c][c] as f64;
            let truth: u32 = self.confusion[c].iter().sum();
            let predicted: u32 = self.confusion.iter().map(|r| r[c]).sum();
            if truth == 0 && predicted == 0 {
                continue;
            }
            n += 1;
            let denom = truth as f64 + predicted as f64;
            sum += if denom == 0.0 { 0.0 } else { 2.0 * tp / denom };
        }
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }
}

/// Score `model` on `samples`.
pub fn evaluate(model: &MicroModel, samples: &[Sample]) -> Result<Evaluation, ModelError> {
    let predicted = model.predict(samples)?;
    Ok(evaluate_predictions(
        model.spec().num_classes(),
        samples,
        &predicted,
    ))
}

/// Score predictions of `k` classes, one per sample, against the samples' labels.
pub fn evaluate_predictions(k: usize, samples: &[Sample], predicted: &[ClassId]) -> Evaluation {
    let mut confusion = vec![vec![0u32; k]; k];
    for (s, p) in samples.iter().zip(predicted) {
        confusion[s.label.index()][p.index()] += 1;
    }
    from_confusion(confusion)
}

/// The evaluation that a confusion matrix implies.
pub fn from_confusion(confusion: Vec<Vec<u32>>) -> Evaluation {
    let total: u32 = confusion.iter().flatten().sum();
    let correct: u32 = (0..confusion.len()).map(|i| confusion[i][i]).sum();
    let mut per_class_recall = vec![None; confusion.len()];
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
        let mut c = vec![vec![0u32; 6]; 6];
        c[0][0] = 3;
        c[0][1] = 1;
        c[2][2] = 4;
        let e = from_confusion(c);
        // F1: class 0 = 2*3/(4+3), class 1 = 0 (predicted once, never true), class 2 = 1.
        let f1 = (6.0 / 7.0 + 0.0 + 1.0) / 3.0;
        assert!((e.macro_f1() - f1).abs() < 1e-12, "{}", e.macro_f1());
        assert_eq!(e.samples, 8);
        assert!((e.accuracy - 7.0 / 8.0).abs() < 1e-12);
        assert_eq!(e.per_class_recall[0], Some(0.75));
        assert_eq!(e.per_class_recall[1], None);
        assert_eq!(e.per_class_recall[2], Some(1.0));
        assert_eq!(from_confusion(vec![vec![0; 6]; 6]).accuracy, 0.0);
    }
}
