//! A user's history: every published version with its parent, batches, verdict,
//! held-out and live accuracy, standing (probation, promoted, rolled back and by whom)
//! and the periods it was live; every training run and how it ended; the head now.
//! One home for what `GET /v1/users/{user}/history`, `swimlane admin history` and the
//! history page show.
//!
//! When a version was live is derived from the records, not logged separately: the
//! head moves only when a version is published (to it, at `published_at_ms`) or rolled
//! back (to the standing's `to`, at its `at_ms`), and both are in the version records.
use serde::Serialize;
use swimlane_core::records::{LiveCount, PairedEvidence, RunRecord, Standing};
use swimlane_store::Transaction;

use crate::{Repo, Res};

/// Runs shown, the newest first (a user's run records are not retired).
pub const MAX_RUNS_SHOWN: usize = 200;

/// Live figures of one model (windows the device classified with it in uploads, and
/// those the user confirmed).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Live {
    pub windows: u64,
    pub right: u64,
    pub accuracy: Option<f64>,
}

impl From<LiveCount> for Live {
    fn from(c: LiveCount) -> Live {
        Live {
            windows: c.windows,
            right: c.right,
            accuracy: c.accuracy(),
        }
    }
}

/// A span of time during which a model was the user's head (`until_ms` `None`: still).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Period {
    pub from_ms: u64,
    pub until_ms: Option<u64>,
}

/// One published version.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VersionHistory {
    pub version: u64,
    pub parent_version: Option<u64>,
    pub run_id: String,
    pub batches: Vec<String>,
    pub published_at_ms: u64,
    /// Why the gate accepted it (its run's verdict).
    pub verdict_reason: Option<String>,
    pub heldout_accuracy: f32,
    pub parent_heldout_accuracy: f32,
    pub guard_accuracy: f32,
    pub live: Live,
    pub standing: Standing,
    pub probation: PairedEvidence,
    pub live_periods: Vec<Period>,
    /// Whether its ONNX file (what the phone runs) holds the base model: it answers
    /// windows unlike every style it trained on with the base model and the others with
    /// a weighted average of both (`swimlane_core::familiar`).
    pub base_fallback: bool,
}

/// One training run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunHistory {
    pub run_id: String,
    pub parent_version: Option<u64>,
    pub batches: Vec<String>,
    pub train_samples: u32,
    pub created_at_ms: u64,
    /// `published`, `accepted` (being published), `not_accepted` (rejected or
    /// deferred: `reason` says which), `in_flight` (no verdict yet) or `abandoned`
    /// (ended without a verdict, e.g. its head was rolled back).
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub published_version: Option<u64>,
}

/// A head moved back from `version` to `to` (`None`: the base model).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rollback {
    pub version: u64,
    pub to: Option<u64>,
    pub at_ms: u64,
    /// `validator` (probation) or `operator`.
    pub by: String,
    pub reason: String,
}

/// Everything [`user_history`] returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct History {
    pub user: String,
    pub head: Option<u64>,
    /// The base model's live figures and the periods it was the head.
    pub base_live: Live,
    pub base_live_periods: Vec<Period>,
    pub versions: Vec<VersionHistory>,
    pub rollbacks: Vec<Rollback>,
    /// The newest [`MAX_RUNS_SHOWN`] runs, newest first; `runs_total` counts all.
    pub runs: Vec<RunHistory>,
    pub runs_total: usize,
}

/// `user`'s history, read in the caller's transaction.
pub fn user_history(repo: &Repo, tx: &mut Transaction<'_>, user: &str) -> Res<History> {
    let state = repo.user_state(tx, user)?;
    let records = repo.model_versions(tx, user)?;
    let live = repo.live(tx, user)?;
    let mut runs = repo.runs(tx, user)?;
    let inflight = state.inflight_run.clone();
    let verdict_of = |runs: &[RunRecord], id: &str| {
        runs.iter()
            .find(|r| r.run_id == id)
            .and_then(|r| r.verdict.as_ref())
            .map(|v| v.reason.clone())
    };

    // The head's moves, in time order: (at, to).
    let mut moves: Vec<(u64, Option<u64>)> = Vec::new();
    let mut rollbacks = Vec::new();
    for r in &records {
        moves.push((r.published_at_ms, Some(r.version)));
        if let Standing::RolledBack {
            reason,
            at_ms,
            by,
            to,
        } = &r.standing
        {
            moves.push((*at_ms, *to));
            rollbacks.push(Rollback {
                version: r.version,
                to: *to,
                at_ms: *at_ms,
                by: by.clone(),
                reason: reason.clone(),
            });
        }
    }
    moves.sort_by_key(|&(at, to)| (at, to.unwrap_or(0)));
    rollbacks.sort_by_key(|r| r.at_ms);
    let periods = |of: Option<u64>| -> Vec<Period> {
        let mut out: Vec<Period> = Vec::new();
        // The base model is the head from the start until the first move.
        let mut current: Option<(u64, Option<u64>)> = Some((0, None));
        for &(at, to) in &moves {
            if let Some((from, model)) = current {
                if model == of && model != to {
                    out.push(Period {
                        from_ms: from,
                        until_ms: Some(at),
                    });
                }
                if model == to {
                    continue;
                }
            }
            current = Some((at, to));
        }
        if let Some((from, model)) = current {
            if model == of {
                out.push(Period {
                    from_ms: from,
                    until_ms: None,
                });
            }
        }
        out
    };

    let versions = records
        .iter()
        .map(|r| VersionHistory {
            version: r.version,
            parent_version: r.parent_version,
            run_id: r.run_id.clone(),
            batches: r.batches.clone(),
            published_at_ms: r.published_at_ms,
            verdict_reason: verdict_of(&runs, &r.run_id),
            base_fallback: runs
                .iter()
                .find(|run| run.run_id == r.run_id)
                .and_then(|run| run.familiarity.as_ref())
                .is_some_and(|f| f.falls_back()),
            heldout_accuracy: r.heldout_accuracy,
            parent_heldout_accuracy: r.parent_heldout_accuracy,
            guard_accuracy: r.guard_accuracy,
            live: live.get(&r.version).copied().unwrap_or_default().into(),
            standing: r.standing.clone(),
            probation: r.probation.clone(),
            live_periods: periods(Some(r.version)),
        })
        .collect();

    let runs_total = runs.len();
    runs.sort_by(|a, b| (b.created_at_ms, &b.run_id).cmp(&(a.created_at_ms, &a.run_id)));
    runs.truncate(MAX_RUNS_SHOWN);
    let runs = runs
        .into_iter()
        .map(|r| {
            let live_run = inflight.as_deref() == Some(r.run_id.as_str());
            let outcome = match (&r.verdict, r.published_version) {
                (_, Some(_)) => "published",
                (Some(v), None) if !v.accepted => "not_accepted",
                (Some(_), None) if live_run => "accepted",
                (None, None) if live_run => "in_flight",
                _ => "abandoned",
            };
            RunHistory {
                outcome,
                reason: r.verdict.as_ref().map(|v| v.reason.clone()),
                run_id: r.run_id,
                parent_version: r.parent_version,
                batches: r.batches,
                train_samples: r.train_samples,
                created_at_ms: r.created_at_ms,
                published_version: r.published_version,
            }
        })
        .collect();

    Ok(History {
        user: user.to_string(),
        head: state.head,
        base_live: live.get(&0).copied().unwrap_or_default().into(),
        base_live_periods: periods(None),
        versions,
        rollbacks,
        runs,
        runs_total,
    })
}
