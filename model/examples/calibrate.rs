//! Timing and calibration of the personalisation protocol:
//! `cargo run --release -p swimlane-model --example calibrate [swimmers] [seed]`.
use std::time::Instant;

use swimlane_model::experiment::{self, Protocol};
use swimlane_model::synth::Population;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    let t = Instant::now();
    let samples = Population::training(0, experiment::BASE_SWIMMERS)
        .samples(experiment::BASE_WINDOWS_PER_SWIMMER, 0);
    let gen = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (base, rep) = swimlane_model::train_base(
        &swimlane_core::ModelSpec::synthetic_pose(),
        &samples,
        &swimlane_model::TrainConfig::base(),
    )
    .unwrap();
    println!(
        "population {} windows in {gen:.2}s; base training {:.2}s, {} epochs (best {}), val loss {:?}",
        samples.len(),
        t.elapsed().as_secs_f64(),
        rep.epochs_run,
        rep.best_epoch,
        rep.val_loss
    );
    let t = Instant::now();
    let mut p = Protocol::default();
    if let Some(a) = std::env::var("ANCHOR").ok().and_then(|s| s.parse().ok()) {
        p.fine_tune.anchor = a;
    }
    if let Some(a) = std::env::var("LR").ok().and_then(|s| s.parse().ok()) {
        p.fine_tune.learning_rate = a;
    }
    let r = experiment::run(&base, n, seed, &p).unwrap();
    for s in &r.swimmers {
        println!(
            "{:>2} base {:.3} corr {:?} rounds {:?} personal {:.3} poisoned {:.3}",
            s.index,
            s.base_accuracy,
            s.corrections,
            s.round_accuracy,
            s.personalized_accuracy,
            s.poisoned_accuracy
        );
    }
    println!(
        "protocol {:.2}s: base median {:.3} personal median {:.3} drop all {}",
        t.elapsed().as_secs_f64(),
        r.base_median_accuracy,
        r.personalized_median_accuracy,
        r.poisoned_drop_all
    );
}
