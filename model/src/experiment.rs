//! The personalisation protocol: what `swimlane model evaluate` reports and what the
//! acceptance tests check.
//!
//! For each of `n` unseen swimmers (seeded from `seed`, never in the base model's
//! population):
//! 1. draw `held_out` windows (never trained on) and score the base model on them;
//! 2. up to `rounds` rounds: the app observes `observed_per_round` fresh windows with the
//!    user's current model; the user corrects the wrong ones (at most
//!    `max_corrections_per_round`); the corrections accumulate, and the current model is
//!    fine-tuned (parent = the current model) on all of the user's corrections so far.
//!    A round with no corrections ends the loop;
//! 3. a poisoned round: `poison_windows` fresh windows with their labels shuffled are
//!    added to the user's corrections and the personalised model is fine-tuned on them;
//!    the candidate must score lower on the held-out windows than its parent.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::synth::{corrections, derive_seed, poison, Population, Swimmer};
use crate::{
    evaluate, fine_tune, train_base, MicroModel, ModelError, Sample, TrainConfig, TrainReport,
};

/// Swimmers in the default base population, and windows drawn from each.
pub const BASE_SWIMMERS: usize = 160;
pub const BASE_WINDOWS_PER_SWIMMER: usize = 48;

/// The base model for `seed`: trained on [`BASE_SWIMMERS`] swimmers of the training
/// population, [`BASE_WINDOWS_PER_SWIMMER`] windows each, with [`TrainConfig::base`].
pub fn train_default_base(seed: u64) -> Result<(MicroModel, TrainReport), ModelError> {
    let samples = Population::training(seed, BASE_SWIMMERS).samples(BASE_WINDOWS_PER_SWIMMER, seed);
    train_base(
        &swimlane_core::ModelSpec::synthetic_pose(),
        &samples,
        &TrainConfig::base().with_seed(seed),
    )
}

/// Knobs of the protocol; `Default` is what the acceptance criteria use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Protocol {
    pub held_out: usize,
    pub rounds: usize,
    pub observed_per_round: usize,
    pub max_corrections_per_round: usize,
    pub poison_windows: usize,
    pub fine_tune: TrainConfig,
}

impl Default for Protocol {
    fn default() -> Self {
        Protocol {
            held_out: 240,
            rounds: 5,
            observed_per_round: 300,
            max_corrections_per_round: 200,
            poison_windows: 200,
            fine_tune: TrainConfig::fine_tune(),
        }
    }
}

/// One swimmer's run through the protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwimmerResult {
    pub index: usize,
    pub seed: u64,
    pub base_accuracy: f64,
    /// Corrections the user made in each round.
    pub corrections: Vec<usize>,
    /// Held-out accuracy after each round's fine-tune.
    pub round_accuracy: Vec<f64>,
    pub personalized_accuracy: f64,
    /// Held-out accuracy of the model fine-tuned on the poisoned round.
    pub poisoned_accuracy: f64,
    /// `poisoned_accuracy < personalized_accuracy` (the poisoned candidate's parent).
    pub poisoned_drop: bool,
}

/// The protocol over several swimmers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub swimmers: Vec<SwimmerResult>,
    pub base_median_accuracy: f64,
    pub personalized_median_accuracy: f64,
    pub poisoned_drop_all: bool,
    pub model_bytes: usize,
}

/// Swimmer `index` of the unseen evaluation swimmers for `seed`.
pub fn unseen_swimmer(seed: u64, index: usize) -> Swimmer {
    Population::unseen(seed, index + 1)
        .swimmers
        .pop()
        .expect("index + 1 swimmers")
}

/// Run the protocol for one swimmer.
pub fn run_swimmer(
    base: &MicroModel,
    swimmer: &Swimmer,
    index: usize,
    seed: u64,
    p: &Protocol,
) -> Result<SwimmerResult, ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 20, index as u64));
    let held_out = swimmer.windows(p.held_out, &mut rng);
    let base_accuracy = evaluate(base, &held_out)?.accuracy;
    let mut current = base.clone();
    let mut accumulated: Vec<Sample> = Vec::new();
    let mut counts = Vec::new();
    let mut round_accuracy = Vec::new();
    for round in 0..p.rounds {
        let corr = corrections(
            &current,
            swimmer,
            p.observed_per_round,
            p.max_corrections_per_round,
            &mut rng,
        )?;
        counts.push(corr.len());
        if corr.is_empty() {
            break;
        }
        accumulated.extend(corr);
        let cfg = p
            .fine_tune
            .clone()
            .with_seed(derive_seed(seed, 30 + round as u64, index as u64));
        current = fine_tune(&current, &accumulated, &cfg)?.0;
        round_accuracy.push(evaluate(&current, &held_out)?.accuracy);
    }
    let personalized_accuracy = evaluate(&current, &held_out)?.accuracy;
    let fresh = swimmer.windows(p.poison_windows, &mut rng);
    let mut poisoned_set = accumulated.clone();
    poisoned_set.extend(poison(&fresh, &mut rng));
    let cfg = p
        .fine_tune
        .clone()
        .with_seed(derive_seed(seed, 40, index as u64));
    let poisoned = fine_tune(&current, &poisoned_set, &cfg)?.0;
    let poisoned_accuracy = evaluate(&poisoned, &held_out)?.accuracy;
    Ok(SwimmerResult {
        index,
        seed: swimmer.seed,
        base_accuracy,
        corrections: counts,
        round_accuracy,
        personalized_accuracy,
        poisoned_accuracy,
        poisoned_drop: poisoned_accuracy < personalized_accuracy,
    })
}

/// Run the protocol for `n` unseen swimmers of `seed`.
pub fn run(base: &MicroModel, n: usize, seed: u64, p: &Protocol) -> Result<Report, ModelError> {
    let pop = Population::unseen(seed, n);
    let swimmers = pop
        .swimmers
        .iter()
        .enumerate()
        .map(|(i, s)| run_swimmer(base, s, i, seed, p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(summarise(swimmers, base.to_bytes().len()))
}

/// Medians and the poisoning verdict over per-swimmer results.
pub fn summarise(swimmers: Vec<SwimmerResult>, model_bytes: usize) -> Report {
    let med =
        |f: &dyn Fn(&SwimmerResult) -> f64| median(&swimmers.iter().map(f).collect::<Vec<_>>());
    Report {
        base_median_accuracy: med(&|s| s.base_accuracy),
        personalized_median_accuracy: med(&|s| s.personalized_accuracy),
        poisoned_drop_all: !swimmers.is_empty() && swimmers.iter().all(|s| s.poisoned_drop),
        model_bytes,
        swimmers,
    }
}

/// The median (mean of the middle two for an even count; 0 for none).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
