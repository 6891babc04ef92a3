//! Training: base models on a population, fine-tunes of a parent on one user's samples.
//!
//! # Invariants
//! - Seeded and reproducible on one machine: the validation split, the shuffles and the
//!   initialisation come from `TrainConfig::seed` (ChaCha8); nothing reads the clock.
//! - A fine-tune never changes its parent: it trains a deep copy.
//! - The budget is fixed: at most `epochs` passes (and at most `max_steps` optimiser
//!   steps when set). Early stopping: after every epoch the loss on the validation split
//!   (a seeded `val_fraction` of the training samples) is measured; the weights of the
//!   best epoch are kept, and training stops after `patience` epochs without
//!   improvement. At least one epoch is always trained, so the result is never simply
//!   the parent. With fewer than `min_val_samples` validation samples, every sample is
//!   trained on and the last epoch is kept.
//! - Fine-tuning pulls towards the parent (L2-SP, `anchor`, default 3.0): a user's
//!   corrections are all windows the parent got wrong, and without the pull the first
//!   fine-tune often "forgets" the classes the parent got right (held-out accuracy fell
//!   from 0.67 to 0.33 for one swimmer in round 1). A pull of 30 was too strong: a
//!   poisoned round then barely moved the model.
//! - Fine-tuning does not learn the class prior of the user's windows so far
//!   (`prior_adjust`, default 1.0): which styles a swimmer has uploaded says little
//!   about which they swim next. On the real swimmers' replay it raised live accuracy
//!   on all three seeds measured (bench/README.md).
//! - [`fine_tune_many`] runs the jobs one after another: each job's loss and gradients
//!   touch only its own copy of its own parent's parameters.
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::net::to_tensors;
use crate::{MicroModel, ModelError, Sample};

/// How to train. [`TrainConfig::fine_tune`] and [`TrainConfig::base`] are the defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the training split (the budget).
    pub epochs: usize,
    /// Optional cap on optimiser steps (also a budget); `None` for no cap.
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    /// Fraction of the samples held aside for early stopping.
    pub val_fraction: f64,
    /// Below this many validation samples, early stopping is off.
    pub min_val_samples: usize,
    /// Strength of an L2 pull towards the starting weights (L2-SP): the loss adds
    /// `anchor * sum((w - w_start)^2)`. Keeps a fine-tune on a few corrections (all of
    /// them windows the parent got wrong) from forgetting what the parent got right.
    #[serde(default)]
    pub anchor: f64,
    /// Logit adjustment for the class prior of the training windows (Menon et al.,
    /// "Long-tail learning via logit adjustment", 2021): the loss is the cross-entropy
    /// of `logits + prior_adjust * ln(prior)`, with `prior` the training windows' class
    /// shares (add-one smoothed), so the weights do not learn that prior and the model
    /// predicts with plain logits. A user's uploads so far are a few sessions of a few
    /// styles: without it a fine-tune learns "backstroke never happens" from a
    /// freestyle-only history and the swimmer's first backstroke session afterwards is
    /// classified worse than the base model would. 0 trains on plain logits.
    #[serde(default)]
    pub prior_adjust: f64,
}

impl TrainConfig {
    /// Defaults for fine-tuning a parent on one user's corrections (tens to hundreds).
    pub fn fine_tune() -> TrainConfig {
        TrainConfig {
            epochs: 20,
            max_steps: None,
            batch_size: 32,
            learning_rate: 2e-3,
            weight_decay: 1e-4,
            seed: 0,
            patience: 4,
            val_fraction: 0.15,
            min_val_samples: 8,
            anchor: 3.0,
            prior_adjust: 1.0,
        }
    }

    /// Defaults for training a base model on a population (tens of thousands).
    pub fn base() -> TrainConfig {
        TrainConfig {
            epochs: 15,
            max_steps: None,
            batch_size: 128,
            learning_rate: 3e-3,
            weight_decay: 1e-4,
            seed: 0,
            patience: 4,
            val_fraction: 0.1,
            min_val_samples: 8,
            anchor: 0.0,
            prior_adjust: 0.0,
        }
    }

    /// The same configuration with another seed.
    pub fn with_seed(mut self, seed: u64) -> TrainConfig {
        self.seed = seed;
        self
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &str, why: &str| Err(ModelError::Config(format!("{key}: {why}")));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("learning_rate", "must be positive");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be non-negative");
        }
        if !(0.0..0.9).contains(&self.val_fraction) {
            return bad("val_fraction", "must be in [0, 0.9)");
        }
        if !(self.anchor >= 0.0 && self.anchor.is_finite()) {
            return bad("anchor", "must be non-negative");
        }
        if !(0.0..=10.0).contains(&self.prior_adjust) {
            return bad("prior_adjust", "must be between 0 and 10");
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1 when set");
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self::fine_tune()
    }
}

/// What a training run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub epochs_run: usize,
    /// The epoch (1-based) whose weights were kept.
    pub best_epoch: usize,
    pub steps: usize,
    pub train_samples: usize,
    pub val_samples: usize,
    /// Mean training loss of each epoch.
    pub train_loss: Vec<f32>,
    /// Validation loss after each epoch (empty without early stopping).
    pub val_loss: Vec<f32>,
    pub stopped_early: bool,
    /// Samples processed by forward + backward passes (for throughput).
    pub samples_processed: usize,
}

/// One user's fine-tuning job for [`fine_tune_many`].
#[derive(Clone, Debug)]
pub struct FineTuneJob<'a> {
    pub parent: &'a MicroModel,
    pub samples: &'a [Sample],
    pub config: TrainConfig,
}

/// Whether training on `samples` with `cfg` can start.
fn ready(samples: &[Sample], cfg: &TrainConfig) -> Result<(), ModelError> {
    cfg.validate()?;
    if samples.is_empty() {
        return Err(ModelError::NoSamples);
    }
    Ok(())
}

/// Train a base model for `spec` from scratch on a population's samples (normalisation
/// computed from them, initialisation from `cfg.seed`).
pub fn train_base(
    spec: &swimlane_core::ModelSpec,
    samples: &[Sample],
    cfg: &TrainConfig,
) -> Result<(MicroModel, TrainReport), ModelError> {
    ready(samples, cfg)?;
    let model = MicroModel::init(spec, samples, cfg.seed ^ 0x5eed_0f_ba5e)?;
    let report = train_in_place(&model, samples, cfg)?;
    Ok((model, report))
}

/// Fine-tune a copy of `parent` on `samples` (one user's own samples only).
pub fn fine_tune(
    parent: &MicroModel,
    samples: &[Sample],
    cfg: &TrainConfig,
) -> Result<(MicroModel, TrainReport), ModelError> {
    ready(samples, cfg)?;
    let model = parent.clone();
    let report = train_in_place(&model, samples, cfg)?;
    Ok((model, report))
}

/// Several users' fine-tunes in one call, one result per job in order. Sequential:
/// fusing jobs into batched matmuls was slower in candle 0.11 (shared/facts.md); a
/// trainer spreads calls over cores instead.
pub fn fine_tune_many(
    jobs: &[FineTuneJob<'_>],
) -> Vec<Result<(MicroModel, TrainReport), ModelError>> {
    jobs.iter()
        .map(|j| fine_tune(j.parent, j.samples, &j.config))
        .collect()
}

fn train_in_place(
    model: &MicroModel,
    samples: &[Sample],
    cfg: &TrainConfig,
) -> Result<TrainReport, ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.shuffle(&mut rng);
    let n_val = (samples.len() as f64 * cfg.val_fraction).round() as usize;
    let early = n_val >= cfg.min_val_samples && n_val < samples.len();
    let (val_idx, train_idx) = if early {
        order.split_at(n_val)
    } else {
        (&order[..0], &order[..])
    };
    // Each split's windows are normalised once, and its labels kept as a vector
    // (`backprop` takes them so).
    let split = |idx: &[usize]| -> Result<(Tensor, Vec<u32>), ModelError> {
        let picked: Vec<Sample> = idx.iter().map(|&i| samples[i].clone()).collect();
        let (x, y) = to_tensors(model.spec(), &picked)?;
        Ok((model.normalise(&x)?, y.to_vec1()?))
    };
    let (xt, yt) = split(train_idx)?;
    let val = if early { Some(split(val_idx)?) } else { None };
    let n = train_idx.len();
    // The training windows' class prior in the loss's logits (`prior_adjust`).
    let classes = model.spec().num_classes();
    let adjust: Option<Vec<f32>> = (cfg.prior_adjust > 0.0).then(|| {
        let mut counts = vec![0f64; classes];
        for s in samples {
            counts[s.label.index().min(classes - 1)] += 1.0;
        }
        let total = (samples.len() + classes) as f64;
        counts
            .iter()
            .map(|c| (cfg.prior_adjust * ((c + 1.0) / total).ln()) as f32)
            .collect()
    });
    // The parameters' current values, read (not tracked) by the hand-derived step; the
    // optimiser updates the same storage in place.
    let params = model.detached_params();

    // AdamW with the pull towards the starting weights (`anchor`) in its gradient.
    let mut opt = crate::optim::AdamW::new(
        model.params(),
        crate::optim::Params::new(cfg.learning_rate, cfg.weight_decay, cfg.anchor),
    )?;
    let mut report = TrainReport {
        epochs_run: 0,
        best_epoch: 0,
        steps: 0,
        train_samples: n,
        val_samples: val_idx.len(),
        train_loss: Vec::new(),
        val_loss: Vec::new(),
        stopped_early: false,
        samples_processed: 0,
    };
    let mut best: Option<(f32, Vec<Tensor>)> = None;
    let mut since_best = 0;
    let mut perm: Vec<u32> = (0..n as u32).collect();
    'epochs: for epoch in 1..=cfg.epochs {
        perm.shuffle(&mut rng);
        let mut loss_sum = 0f32;
        let mut batches = 0;
        for chunk in perm.chunks(cfg.batch_size) {
            if cfg.max_steps.is_some_and(|m| report.steps >= m) {
                break;
            }
            let idx = Tensor::from_slice(chunk, chunk.len(), xt.device())?;
            let xb = xt.index_select(&idx, 0)?;
            let yb: Vec<u32> = chunk.iter().map(|&i| yt[i as usize]).collect();
            let (loss, grads) =
                crate::backprop::loss_and_grads(&params, &xb, &yb, adjust.as_deref())?;
            opt.step(&grads)?;
            loss_sum += loss;
            batches += 1;
            report.steps += 1;
            report.samples_processed += chunk.len();
        }
        if batches == 0 {
            break;
        }
        report.epochs_run = epoch;
        report.train_loss.push(loss_sum / batches as f32);
        match &val {
            Some((xv, yv)) => {
                let vl = crate::backprop::loss(&params, xv, yv, adjust.as_deref())?;
                report.val_loss.push(vl);
                if best.as_ref().is_none_or(|(b, _)| vl < *b) {
                    best = Some((vl, model.snapshot()?));
                    report.best_epoch = epoch;
                    since_best = 0;
                } else {
                    since_best += 1;
                    if since_best >= cfg.patience {
                        report.stopped_early = epoch < cfg.epochs;
                        break 'epochs;
                    }
                }
            }
            None => report.best_epoch = epoch,
        }
        if cfg.max_steps.is_some_and(|m| report.steps >= m) {
            break;
        }
    }
    if let Some((_, snap)) = best {
        model.restore(&snap)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate;
    use crate::synth::Population;

    #[test]
    fn training_is_reproducible_and_learns() {
        let pop = Population::training(1, 12);
        let s = pop.samples(60, 1);
        let cfg = TrainConfig {
            epochs: 4,
            ..TrainConfig::base()
        };
        let (a, ra) = train_base(&swimlane_core::ModelSpec::synthetic_pose(), &s, &cfg).unwrap();
        let (b, rb) = train_base(&swimlane_core::ModelSpec::synthetic_pose(), &s, &cfg).unwrap();
        assert!(a.to_bytes() == b.to_bytes());
        assert_eq!(ra, rb);
        assert!(ra.train_loss.last().unwrap() < &ra.train_loss[0]);
        assert!(evaluate(&a, &s).unwrap().accuracy > 0.4);
    }

    #[test]
    fn a_fine_tune_on_some_classes_keeps_the_others_with_the_prior_adjustment() {
        // A base on every class; a user's windows of two classes only (a swimmer who
        // has uploaded freestyle and rest so far).
        let pop = Population::training(3, 12);
        let (parent, _) = train_base(
            &swimlane_core::ModelSpec::synthetic_pose(),
            &pop.samples(60, 3),
            &TrainConfig {
                epochs: 6,
                ..TrainConfig::base()
            },
        )
        .unwrap();
        let user: Vec<Sample> = Population::unseen(4, 1)
            .samples(400, 4)
            .into_iter()
            .filter(|s| s.label.index() < 2)
            .collect();
        let others: Vec<Sample> = Population::unseen(4, 1)
            .samples(400, 5)
            .into_iter()
            .filter(|s| s.label.index() >= 2)
            .collect();
        assert!(user.len() > 50 && others.len() > 50);
        let on_others = |prior_adjust: f64| {
            // The pull a run of mostly confirmed windows keeps (the trainer scales
            // `anchor` by the share of corrected windows).
            let cfg = TrainConfig {
                prior_adjust,
                anchor: 0.3,
                ..TrainConfig::fine_tune().with_seed(9)
            };
            let (child, _) = fine_tune(&parent, &user, &cfg).unwrap();
            evaluate(&child, &others).unwrap().accuracy
        };
        let (plain, adjusted) = (on_others(0.0), on_others(1.0));
        let before = evaluate(&parent, &others).unwrap().accuracy;
        assert!(
            adjusted >= before - 0.02 && adjusted > plain + 0.03,
            "the classes not in the user's windows: parent {before:.3}, plain fine-tune {plain:.3}, adjusted {adjusted:.3}"
        );
    }

    #[test]
    fn fine_tune_leaves_the_parent_alone_and_respects_the_budget() {
        let s = Population::training(2, 4).samples(30, 2);
        let (parent, _) = train_base(
            &swimlane_core::ModelSpec::synthetic_pose(),
            &s,
            &TrainConfig {
                epochs: 1,
                ..TrainConfig::base()
            },
        )
        .unwrap();
        let before = parent.to_bytes();
        let cfg = TrainConfig {
            epochs: 50,
            max_steps: Some(3),
            batch_size: 8,
            ..TrainConfig::fine_tune()
        };
        let (child, r) = fine_tune(&parent, &s[..40], &cfg).unwrap();
        assert!(parent.to_bytes() == before);
        assert!(child.to_bytes() != before);
        assert_eq!(r.steps, 3);
        let jobs = [
            FineTuneJob {
                parent: &parent,
                samples: &s[..40],
                config: cfg.clone(),
            },
            FineTuneJob {
                parent: &parent,
                samples: &[],
                config: cfg.clone(),
            },
        ];
        let out = fine_tune_many(&jobs);
        assert!(out[0].as_ref().unwrap().0.to_bytes() == child.to_bytes());
        assert!(matches!(out[1], Err(ModelError::NoSamples)));
        assert!(fine_tune(
            &parent,
            &s,
            &TrainConfig {
                batch_size: 0,
                ..cfg
            }
        )
        .is_err());
    }
}
