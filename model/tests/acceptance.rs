//! The three "Done when" properties of the micro model (issue 3), on 20 unseen swimmers
//! with seed 7: the same protocol and numbers as `swimlane model evaluate --swimmers 20
//! --seed 7`. The base model (seed 0) and the protocol run once per test binary.
use std::sync::OnceLock;

use swimlane_model::experiment::{self, Protocol, Report};
use swimlane_model::MAX_MODEL_BYTES;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn report() -> &'static Report {
    static R: OnceLock<Report> = OnceLock::new();
    R.get_or_init(|| {
        let (base, _) = experiment::train_default_base(0).expect("base model");
        let r = experiment::run(&base, 20, 7, &Protocol::default()).expect("protocol");
        for s in &r.swimmers {
            eprintln!(
                "swimmer {:>2}: base {:.3} corrections {:?} rounds {:?} personal {:.3} poisoned {:.3}",
                s.index, s.base_accuracy, s.corrections, s.round_accuracy, s.personalized_accuracy, s.poisoned_accuracy
            );
        }
        eprintln!(
            "base median {:.3} personalised median {:.3} poisoned drop all {} bytes {}",
            r.base_median_accuracy, r.personalized_median_accuracy, r.poisoned_drop_all, r.model_bytes
        );
        r
    })
}

#[test]
fn base_model_starts_near_eighty_percent_on_unseen_swimmers() {
    let r = report();
    assert_eq!(r.swimmers.len(), 20);
    assert!(
        (0.70..=0.88).contains(&r.base_median_accuracy),
        "base median accuracy {:.3} is outside [0.70, 0.88]",
        r.base_median_accuracy
    );
    assert!(r.model_bytes <= MAX_MODEL_BYTES, "{} bytes", r.model_bytes);
}

#[test]
fn five_rounds_of_corrections_personalise_to_95_percent() {
    let r = report();
    for s in &r.swimmers {
        assert!(
            s.corrections.len() <= 5 && s.corrections.iter().all(|&c| c <= 200),
            "{:?}",
            s.corrections
        );
    }
    assert!(
        r.personalized_median_accuracy >= 0.95,
        "personalised median accuracy {:.3} < 0.95",
        r.personalized_median_accuracy
    );
}

#[test]
fn a_poisoned_round_lowers_held_out_accuracy_for_every_swimmer() {
    let r = report();
    let failed: Vec<_> = r
        .swimmers
        .iter()
        .filter(|s| !s.poisoned_drop)
        .map(|s| (s.index, s.personalized_accuracy, s.poisoned_accuracy))
        .collect();
    assert!(
        r.poisoned_drop_all && failed.is_empty(),
        "no drop for (swimmer, parent, poisoned): {failed:?}"
    );
}
