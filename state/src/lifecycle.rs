//! The batch and run lifecycle: the one module that moves a batch between statuses,
//! starts and ends a user's run, and keeps the indexes that follow them (the pending
//! index, the user state). Every operation runs inside the caller's transaction, so a
//! stage commits it together with its queue position, and refuses a move the table
//! below does not allow (`KvError::Corrupt`, naming the batch and both statuses):
//! workers call these operations and write no status themselves.
//!
//! | operation | who | batch from | batch to | the user's run |
//! |---|---|---|---|---|
//! | [`stage_batch`] | ingest | (none) | `staged` (enters the pending index) | — |
//! | [`stage_batch`], a converged user's upload with no correction | ingest | (none) | `deferred` | — |
//! | [`begin_run`] | trainer | `staged`, `deferred` | `validating{run}` | in flight: `run`; runs started + 1 |
//! | [`fail_training`] | trainer | `staged`, `deferred` | `rejected{no run}` | — |
//! | [`record_verdict`] accept | validator | `validating{run}` | (unchanged) | in flight until published |
//! | [`record_verdict`] defer | validator | `validating{run}` | `deferred` | ended |
//! | [`record_verdict`] reject | validator | `validating{run}` | `rejected{run}` | ended |
//! | [`record_verdict`] reject, a run-mate failed alone | validator | `validating{run}` | `staged` | ended |
//! | [`publish`] | publisher | `validating{run}` | `published{run, version}` | ended; head = version |
//! | [`abandon_run`] | validator or publisher, giving up on the run's record | `validating{run}` | `staged` | ended, unpublished |
//! | [`roll_back`] | validator (probation) or publisher (operator) | `published{run, head}` | `deferred` (trained again only with new evidence) | head = the version gone back to |
//! | [`probation`] rolls back | validator | the judged run's: `validating{run}` | `staged` | a non-accepting verdict (its head is gone); ended |
//! | [`apply_retention`] | ingest, staging a batch | `staged`, `deferred`, `published`, `rejected` | `retired` (samples erased); a retired record beyond the records kept is deleted | — |
//!
//! A batch leaves the pending index when it leaves the pipeline's hands (published,
//! rejected, deferred or retired; `Repo::put_batch`). Ending a run re-triggers training when
//! batches were staged meanwhile (a `BatchStaged` event for the newest).
use swimlane_bus::Emitter;
use swimlane_core::policy::{
    BatchSummary, Decision, Fate, ProbationCall, ProbationPolicy, RetentionPolicy,
};
use swimlane_core::records::{
    BatchRecord, BatchStatus, ModelVersionRecord, PairedEvidence, RunRecord, Standing, UserState,
    Verdict,
};
use swimlane_core::{BatchId, Event, UserId};
use swimlane_store::{KvError, Transaction};

use crate::{Repo, Res};

/// Whether a batch may move from `from` (`None`: not staged yet) to `to`: the table in
/// the module doc.
pub fn allowed(from: Option<&BatchStatus>, to: &BatchStatus) -> bool {
    use BatchStatus::*;
    match (from, to) {
        (None, Staged | Deferred { .. }) => true,
        (Some(Staged | Deferred { .. }), Validating { .. }) => true,
        (Some(Staged | Deferred { .. }), Rejected { run_id: None, .. }) => true,
        (Some(Validating { .. }), Deferred { .. } | Staged) => true,
        (
            Some(Validating { run_id }),
            Rejected {
                run_id: Some(r), ..
            },
        ) => run_id == r,
        (Some(Validating { run_id }), Published { run_id: r, .. }) => run_id == r,
        // The version it went into was rolled back ([`roll_back`]).
        (Some(Published { .. }), Deferred { .. }) => true,
        (Some(Staged | Deferred { .. } | Published { .. } | Rejected { .. }), Retired { .. }) => {
            true
        }
        _ => false,
    }
}

/// Move `batch` of `user` (its record `r`) to `to`, or refuse a move the table does not
/// allow.
fn move_batch(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    batch: &str,
    mut r: BatchRecord,
    to: BatchStatus,
) -> Res<BatchRecord> {
    if !allowed(Some(&r.status), &to) {
        return Err(KvError::Corrupt {
            what: format!("batch {user}/{batch}"),
            reason: format!("{:?} -> {:?} is not a lifecycle transition", r.status, to),
        });
    }
    r.status = to;
    repo.put_batch(tx, user, batch, &r)?;
    Ok(r)
}

/// The record of `batch`, which must exist.
fn existing(repo: &Repo, tx: &mut Transaction<'_>, user: &str, batch: &str) -> Res<BatchRecord> {
    repo.batch(tx, user, batch)?
        .ok_or_else(|| KvError::Corrupt {
            what: format!("batch {user}/{batch}"),
            reason: "a run names it but it has no record".into(),
        })
}

/// Ingest: a new batch, `staged` (its sample chunks are the caller's), in the pending
/// index from `record.staged_at_ms`.
pub fn stage_batch(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    batch: &str,
    record: &BatchRecord,
) -> Res<()> {
    if !allowed(None, &record.status) {
        return Err(KvError::InvalidArgument(format!(
            "a new batch is staged, not {:?}",
            record.status
        )));
    }
    if record.status == BatchStatus::Staged {
        tx.set(
            &repo.keys.pending_batch(record.staged_at_ms, user, batch),
            b"",
        )?;
    }
    repo.put_batch(tx, user, batch, record)
}

/// Trainer: `run` (its candidate's weights already stored) starts for `user`, whose
/// state is `state`: the run record, its batches `validating`, the user's in-flight
/// run, and the `CandidateTrained` event. The caller has checked that the run is not
/// stale (no run in flight, the batches still pending, the same parent).
pub fn begin_run(
    repo: &Repo,
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    user: &UserId,
    run: &RunRecord,
    mut state: UserState,
) -> Res<()> {
    let u = user.as_str();
    for b in &run.batches {
        let r = existing(repo, tx, u, b)?;
        move_batch(
            repo,
            tx,
            u,
            b,
            r,
            BatchStatus::Validating {
                run_id: run.run_id.clone(),
            },
        )?;
    }
    repo.put_run(tx, u, run)?;
    state.inflight_run = Some(run.run_id.clone());
    state.runs_started += 1;
    repo.put_user_state(tx, u, &state)?;
    emitter.emit(
        tx,
        &Event::CandidateTrained {
            user: user.clone(),
            run_id: run.run_id.clone(),
            batches: run
                .batches
                .iter()
                .map(|b| BatchId::new(b.clone()).expect("stored ids are valid"))
                .collect(),
        },
    )
}

/// Trainer: `batches` of `user` can never be trained (`reason`): those still pending
/// are rejected, with no run.
pub fn fail_training(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    batches: &[String],
    reason: &str,
) -> Res<()> {
    for b in batches {
        if let Some(r) = repo.batch(tx, user, b)? {
            if r.status.is_pending() {
                let to = BatchStatus::Rejected {
                    run_id: None,
                    reason: format!("cannot be trained: {reason}"),
                };
                move_batch(repo, tx, user, b, r, to)?;
            }
        }
    }
    Ok(())
}

/// What [`apply_retention`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Batches retired (samples erased).
    pub retired: u32,
    /// Sample chunks erased with them.
    pub chunks_erased: u64,
    /// Retired batch records deleted.
    pub forgotten: u32,
}

/// Ingest, in the transaction that stages a batch: apply `policy` to `user`'s batches
/// (`RetentionPolicy::plan`): retire those beyond the user's retained windows (their
/// sample chunks cleared, status `retired` with the reason and what it was) and delete
/// the records of retired batches beyond the records kept. Reads the user's batch
/// records only (bounded by `max_batch_records` and the uploads since).
pub fn apply_retention(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    policy: &RetentionPolicy,
) -> Res<Retention> {
    let batches = repo.batches(tx, user)?;
    let summaries: Vec<BatchSummary<'_>> = batches
        .iter()
        .map(|(id, r)| BatchSummary {
            id,
            staged_at_ms: r.staged_at_ms,
            status: &r.status,
            training: r.training(),
            heldout: r.heldout,
        })
        .collect();
    let plan = policy.plan(&summaries);
    let mut done = Retention::default();
    for (i, fate) in plan {
        let (id, r) = &batches[i];
        match fate {
            Fate::Retire => {
                retire(repo, tx, user, id, r.clone(), &policy.retire_reason())?;
                done.chunks_erased += r.chunks as u64;
                done.retired += 1;
            }
            Fate::Forget => {
                tx.clear(&repo.keys.batch(user, id))?;
                done.forgotten += 1;
            }
        }
    }
    Ok(done)
}

/// The status a batch in `from` has once retired for `reason`.
fn retired(from: &BatchStatus, reason: &str) -> BatchStatus {
    let was = match from {
        BatchStatus::Published { version, .. } => format!("published as version {version}"),
        BatchStatus::Rejected { reason, .. } => format!("rejected: {reason}"),
        other => format!("{}, never trained", other.name()),
    };
    BatchStatus::Retired {
        reason: format!("{reason}; was {was}"),
    }
}

/// Retire `batch` of `user` (its record `r`): its sample chunks cleared, its status
/// `retired` with `reason` and what it was.
pub fn retire(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    batch: &str,
    r: BatchRecord,
    reason: &str,
) -> Res<()> {
    let to = retired(&r.status, reason);
    // A refused move fails the caller's transaction, erasure included.
    move_batch(repo, tx, user, batch, r, to)?;
    tx.clear_prefix(&repo.keys.samples_of_batch(user, batch))
}

/// Validator: the verdict on `run_id` of `user`. Accepted: the verdict is recorded
/// and `CandidateAccepted` emitted (the publisher ends the run). Deferred or rejected:
/// the run's batches move (a batch in `failed` was rejected alone, with its reason, and
/// its run-mates go back to `staged`), the run ends, and `CandidateRejected` is emitted.
/// `Ok(None)` when the run is gone or already has a verdict (a duplicate delivery).
pub fn record_verdict(
    repo: &Repo,
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    user: &UserId,
    run_id: &str,
    decision: Decision,
    failed: &[(String, String)],
    verdict: &Verdict,
) -> Res<Option<Decision>> {
    record_verdict_moving(
        repo, emitter, tx, user, run_id, decision, failed, verdict, false,
    )
}

/// [`record_verdict`]; `restage`: a non-accepting verdict sends every batch of the run
/// back to `staged` (the run was voided, not its batches judged).
#[allow(clippy::too_many_arguments)]
fn record_verdict_moving(
    repo: &Repo,
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    user: &UserId,
    run_id: &str,
    decision: Decision,
    failed: &[(String, String)],
    verdict: &Verdict,
    restage: bool,
) -> Res<Option<Decision>> {
    let u = user.as_str();
    let Some(mut run) = repo.run(tx, u, run_id)? else {
        return Ok(None);
    };
    if run.verdict.is_some() {
        return Ok(None);
    }
    run.verdict = Some(verdict.clone());
    repo.put_run(tx, u, &run)?;
    if decision == Decision::Accept {
        emitter.emit(
            tx,
            &Event::CandidateAccepted {
                user: user.clone(),
                run_id: run_id.to_string(),
            },
        )?;
        return Ok(Some(decision));
    }
    for b in &run.batches {
        let r = existing(repo, tx, u, b)?;
        let own = failed.iter().find(|(f, _)| f == b);
        let to = match (decision, own) {
            (Decision::Defer, _) => BatchStatus::Deferred {
                reason: verdict.reason.clone(),
            },
            // Rejected alone: its run-mates go back to staged and are retrained at once
            // without it.
            (_, Some((_, why))) => BatchStatus::Rejected {
                run_id: Some(run_id.to_string()),
                reason: why.clone(),
            },
            _ if !failed.is_empty() || restage => BatchStatus::Staged,
            _ => BatchStatus::Rejected {
                run_id: Some(run_id.to_string()),
                reason: verdict.reason.clone(),
            },
        };
        move_batch(repo, tx, u, b, r, to)?;
    }
    let mut state = repo.user_state(tx, u)?;
    end_run(repo, emitter, tx, user, run_id, &mut state)?;
    repo.put_user_state(tx, u, &state)?;
    emitter.emit(
        tx,
        &Event::CandidateRejected {
            user: user.clone(),
            run_id: run_id.to_string(),
            reason: verdict.reason.clone(),
        },
    )?;
    Ok(Some(decision))
}

/// Publisher: `run` of `user` (whose state is `state`) becomes `version` (its record,
/// built by the caller): the version record, the run's published version, its batches
/// `published`, the user's head, and `ModelPublished`; the run ends. `converged`: the
/// version reached the target accuracy. Returns the batches' `staged_at_ms`.
pub fn publish(
    repo: &Repo,
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    user: &UserId,
    mut run: RunRecord,
    version: &ModelVersionRecord,
    mut state: UserState,
    converged: bool,
) -> Res<Vec<u64>> {
    let u = user.as_str();
    repo.put_model_version(tx, u, version)?;
    if let Some(mut old) = match state.head {
        Some(h) => repo.model_version(tx, u, h)?,
        None => None,
    } {
        if old.standing == Standing::Probation {
            old.standing = Standing::Superseded {
                by_version: version.version,
                at_ms: version.published_at_ms,
            };
            repo.put_model_version(tx, u, &old)?;
        }
    }
    run.published_version = Some(version.version);
    repo.put_run(tx, u, &run)?;
    let mut staged_at = Vec::new();
    for b in &run.batches {
        let r = existing(repo, tx, u, b)?;
        staged_at.push(r.staged_at_ms);
        let to = BatchStatus::Published {
            run_id: run.run_id.clone(),
            version: version.version,
        };
        move_batch(repo, tx, u, b, r, to)?;
    }
    state.last_version = version.version;
    state.head = Some(version.version);
    state.head_heldout_accuracy = Some(version.heldout_accuracy);
    state.converged = converged;
    end_run(repo, emitter, tx, user, &run.run_id, &mut state)?;
    repo.put_user_state(tx, u, &state)?;
    repo.refresh_live_standing(tx, u, false)?;
    emitter.emit(
        tx,
        &Event::ModelPublished {
            user: user.clone(),
            run_id: run.run_id.clone(),
            version: version.version,
        },
    )?;
    Ok(staged_at)
}

/// Validator (probation) or publisher (an operator): `user`'s head goes back to `to`
/// (`None`: the base model; `Some` must be a published version): the version it
/// leaves is marked rolled back (`reason`, `by`), its batches are deferred: no run
/// takes them until new evidence arrives (a new upload's run, which they ride along
/// with, judged by the gate on the new windows too), the
/// user is no longer converged, and the devices get `to` on their next download (the
/// ETag changes with the head). Returns the version left, or `None` when the head was
/// already `to`.
pub fn roll_back(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    to: Option<u64>,
    reason: &str,
    by: &str,
    now_ms: u64,
) -> Res<Option<u64>> {
    let mut state = repo.user_state(tx, user)?;
    if state.head == to {
        return Ok(None);
    }
    let target = match to {
        Some(v) => Some(repo.model_version(tx, user, v)?.ok_or_else(|| {
            KvError::InvalidArgument(format!("version {v} of {user} was never published"))
        })?),
        None => None,
    };
    let left = state.head;
    if let Some(h) = left {
        let mut rec = repo
            .model_version(tx, user, h)?
            .ok_or_else(|| KvError::Corrupt {
                what: format!("user {user} head"),
                reason: format!("version {h} has no record"),
            })?;
        rec.standing = Standing::RolledBack {
            reason: reason.to_string(),
            at_ms: now_ms,
            by: by.to_string(),
            to,
        };
        repo.put_model_version(tx, user, &rec)?;
        for b in &rec.batches {
            // Retired meanwhile (retention): already out of every run.
            let Some(r) = repo.batch(tx, user, b)? else {
                continue;
            };
            if matches!(&r.status, BatchStatus::Published { version, .. } if *version == h) {
                let to = BatchStatus::Deferred {
                    reason: format!("version {h} was rolled back: {reason}"),
                };
                move_batch(repo, tx, user, b, r, to)?;
            }
        }
    }
    state.head = to;
    state.head_heldout_accuracy = target.as_ref().map(|t| t.heldout_accuracy);
    state.converged = false;
    repo.put_user_state(tx, user, &state)?;
    repo.refresh_live_standing(tx, user, false)?;
    Ok(left)
}

/// How a version's probation went after [`probation`].
#[derive(Clone, Debug, PartialEq)]
pub enum ProbationEnd {
    /// Rolled back to its parent; the run being judged was abandoned.
    RolledBack,
    Promoted,
}

/// Validator, in the transaction that judges `run_id` of `user`: add `fresh` (the
/// paired comparison of the head `version` with its parent on the run's windows) to
/// the version's probation and decide ([`ProbationPolicy::judge`]). Rolled back: the
/// head goes back to the parent ([`roll_back`]) and `run_id`, a candidate measured
/// against a version that is gone, gets a non-accepting verdict (`scored`, its reason
/// saying so; `CandidateRejected` is emitted) and its batches go back to `staged`, to
/// train again from the parent. Nothing happens when the head is no longer `version`
/// or its probation already ended (stale work), or when `fresh` holds batches already
/// counted.
#[allow(clippy::too_many_arguments)]
pub fn probation(
    repo: &Repo,
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    user: &UserId,
    run_id: &str,
    version: u64,
    fresh: &PairedEvidence,
    policy: &ProbationPolicy,
    scored: &Verdict,
    now_ms: u64,
) -> Res<Option<ProbationEnd>> {
    let u = user.as_str();
    if repo.user_state(tx, u)?.head != Some(version) {
        return Ok(None);
    }
    let Some(mut rec) = repo.model_version(tx, u, version)? else {
        return Ok(None);
    };
    if rec.standing != Standing::Probation
        || fresh
            .batches
            .iter()
            .any(|b| rec.probation.batches.contains(b))
    {
        return Ok(None);
    }
    rec.probation.merge(fresh);
    match policy.judge(&rec.probation) {
        ProbationCall::Continue => {
            repo.put_model_version(tx, u, &rec)?;
            Ok(None)
        }
        ProbationCall::Promote(reason) => {
            rec.standing = Standing::Promoted {
                reason,
                at_ms: now_ms,
            };
            repo.put_model_version(tx, u, &rec)?;
            Ok(Some(ProbationEnd::Promoted))
        }
        ProbationCall::RollBack(reason) => {
            repo.put_model_version(tx, u, &rec)?;
            roll_back(
                repo,
                tx,
                u,
                rec.parent_version,
                &reason,
                "validator",
                now_ms,
            )?;
            let void = Verdict {
                accepted: false,
                reason: format!(
                    "not judged: the version it was measured against (v{version}) was rolled back; its batches train again from {}",
                    rec.parent_version
                        .map_or("the base model".to_string(), |p| format!("v{p}"))
                ),
                ..scored.clone()
            };
            let failed: Vec<(String, String)> = Vec::new();
            record_verdict_moving(
                repo,
                emitter,
                tx,
                user,
                run_id,
                Decision::Reject,
                &failed,
                &void,
                true,
            )?;
            Ok(Some(ProbationEnd::RolledBack))
        }
    }
}

/// Validator or publisher: `run_id` of `user` can never be judged or published (the
/// stage gave up on its record, e.g. its candidate's weights are missing, or its ONNX
/// export fails): its batches go back to `staged` and the run ends unpublished, so
/// training starts again. Nothing happens when the run is not the user's run in
/// flight, was rejected (which ended it), or was published.
pub fn abandon_run(
    repo: &Repo,
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    user: &UserId,
    run_id: &str,
) -> Res<()> {
    let u = user.as_str();
    let mut state = repo.user_state(tx, u)?;
    if state.inflight_run.as_deref() != Some(run_id) {
        return Ok(());
    }
    if let Some(run) = repo.run(tx, u, run_id)? {
        let rejected = run.verdict.as_ref().is_some_and(|v| !v.accepted);
        if rejected || run.published_version.is_some() {
            return Ok(());
        }
        for b in &run.batches {
            let r = existing(repo, tx, u, b)?;
            move_batch(repo, tx, u, b, r, BatchStatus::Staged)?;
        }
    }
    end_run(repo, emitter, tx, user, run_id, &mut state)?;
    repo.put_user_state(tx, u, &state)
}

/// End a user's in-flight run `run_id` (in `state`, which the caller writes) and, if
/// batches were staged meanwhile, re-emit a trigger for the newest.
fn end_run(
    repo: &Repo,
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    user: &UserId,
    run_id: &str,
    state: &mut UserState,
) -> Res<()> {
    if state.inflight_run.as_deref() == Some(run_id) {
        state.inflight_run = None;
    }
    let staged: Vec<(String, u32)> = repo
        .batches(tx, user.as_str())?
        .into_iter()
        .filter(|(_, r)| r.status == BatchStatus::Staged)
        .map(|(id, r)| (id, r.samples))
        .collect();
    if let Some((id, samples)) = staged.last() {
        emitter.emit(
            tx,
            &Event::BatchStaged {
                user: user.clone(),
                batch_id: BatchId::new(id.clone()).expect("stored ids are valid"),
                samples: *samples,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use swimlane_bus::embedded::EmbeddedBus;
    use swimlane_core::keys::Keys;
    use swimlane_store::embedded::EmbeddedBackend;
    use swimlane_store::{Db, RangeOption};

    fn statuses() -> Vec<BatchStatus> {
        use BatchStatus::*;
        let (r1, r2) = (|| "r1".to_string(), || "r2".to_string());
        vec![
            Staged,
            Deferred { reason: "d".into() },
            Validating { run_id: r1() },
            Validating { run_id: r2() },
            Published {
                run_id: r1(),
                version: 1,
            },
            Published {
                run_id: r2(),
                version: 1,
            },
            Rejected {
                run_id: Some(r1()),
                reason: "x".into(),
            },
            Rejected {
                run_id: Some(r2()),
                reason: "x".into(),
            },
            Rejected {
                run_id: None,
                reason: "x".into(),
            },
            Retired { reason: "x".into() },
        ]
    }

    #[test]
    fn the_transition_table() {
        let all = statuses();
        let name = |s: Option<&BatchStatus>| match s {
            None => "new".to_string(),
            Some(s) => serde_json::to_string(s).unwrap(),
        };
        let mut got = Vec::new();
        let froms: Vec<Option<&BatchStatus>> =
            std::iter::once(None).chain(all.iter().map(Some)).collect();
        for from in froms {
            for to in &all {
                if allowed(from, to) {
                    got.push(format!("{} -> {}", name(from), name(Some(to))));
                }
            }
        }
        let s = |st: &str| format!(r#"{{"state":"{st}"}}"#);
        let v = |r: &str| format!(r#"{{"state":"validating","run_id":"{r}"}}"#);
        let d = r#"{"state":"deferred","reason":"d"}"#.to_string();
        let p = |r: &str| format!(r#"{{"state":"published","run_id":"{r}","version":1}}"#);
        let rj = |r: &str| format!(r#"{{"state":"rejected","run_id":"{r}","reason":"x"}}"#);
        let rn = r#"{"state":"rejected","run_id":null,"reason":"x"}"#.to_string();
        let mut want = vec![format!("new -> {}", s("staged")), format!("new -> {d}")];
        for from in [s("staged"), d.clone()] {
            for to in [v("r1"), v("r2"), rn.clone()] {
                want.push(format!("{from} -> {to}"));
            }
        }
        for r in ["r1", "r2"] {
            for to in [s("staged"), d.clone(), p(r), rj(r)] {
                want.push(format!("{} -> {to}", v(r)));
            }
            // A rolled-back version's batches.
            want.push(format!("{} -> {d}", p(r)));
        }
        let gone = r#"{"state":"retired","reason":"x"}"#;
        for from in [
            s("staged"),
            d.clone(),
            p("r1"),
            p("r2"),
            rj("r1"),
            rj("r2"),
            rn.clone(),
        ] {
            want.push(format!("{from} -> {gone}"));
        }
        got.sort();
        want.sort();
        assert_eq!(got, want);
        // Terminal states move only to retired (or, published, to rejected by a
        // rollback), and retired never moves.
        for from in all.iter().filter(|s| s.is_terminal()) {
            for to in &all {
                if allowed(Some(from), to) {
                    assert!(
                        (matches!(to, BatchStatus::Retired { .. })
                            || matches!(
                                (from, to),
                                (BatchStatus::Published { .. }, BatchStatus::Deferred { .. })
                            ))
                            && !matches!(from, BatchStatus::Retired { .. }),
                        "{from:?} -> {to:?}"
                    );
                }
            }
        }
    }

    /// What the lifecycle should do, kept in memory.
    #[derive(Default)]
    struct Model {
        batches: BTreeMap<(String, String), BatchStatus>,
        /// Batches in the pending index.
        indexed: std::collections::BTreeSet<(String, String)>,
        /// Per user: the run in flight, its batches, and its verdict once accepted.
        inflight: BTreeMap<String, (String, Vec<String>, bool)>,
        head: BTreeMap<String, u64>,
        /// Run-mates of a batch rejected alone, back to staged.
        restaged: usize,
        abandoned: usize,
    }

    impl Model {
        fn set(&mut self, user: &str, batch: &str, to: BatchStatus) {
            let k = (user.to_string(), batch.to_string());
            if !matches!(to, BatchStatus::Staged | BatchStatus::Validating { .. }) {
                self.indexed.remove(&k);
            }
            self.batches.insert(k, to);
        }
    }

    fn verdict(accepted: bool) -> Verdict {
        Verdict {
            accepted,
            reason: "because".into(),
            candidate_heldout_accuracy: 0.9,
            current_heldout_accuracy: 0.8,
            heldout_samples: 10,
            candidate_guard_accuracy: 0.9,
            current_guard_accuracy: 0.9,
            validate_seconds: 0.0,
            validate_cpu_seconds: 0.0,
        }
    }

    /// One operation, chosen from what the model allows now.
    #[derive(Clone, Debug)]
    enum Op {
        Stage(String),
        Begin(String, Vec<String>),
        Fail(Vec<String>),
        Verdict(String, Vec<String>, Decision, bool),
        Publish(String, Vec<String>),
        Abandon(String, Vec<String>),
        Retire(String),
    }

    #[test]
    fn random_operations_agree_with_a_model_and_keep_the_pending_index() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let keys = Keys::new("t");
        let repo = Repo::new(keys.clone());
        let bus = EmbeddedBus::new(keys.clone(), 2);
        let mut m = Model::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let users = ["al", "bo", "cy"];
        for step in 0..1000u64 {
            let user = users[rng.random_range(0..users.len())];
            let uid = UserId::new(user).unwrap();
            let pending: Vec<String> = m
                .batches
                .iter()
                .filter(|((u, _), s)| u == user && s.is_pending())
                .map(|((_, b), _)| b.clone())
                .collect();
            let retirable: Vec<String> = m
                .batches
                .iter()
                .filter(|((u, _), s)| {
                    u == user
                        && !matches!(
                            s,
                            BatchStatus::Validating { .. } | BatchStatus::Retired { .. }
                        )
                })
                .map(|((_, b), _)| b.clone())
                .collect();
            let retiring = !retirable.is_empty() && rng.random_bool(0.04);
            let op = match (rng.random_range(0..13), m.inflight.get(user).cloned()) {
                _ if retiring => {
                    Op::Retire(retirable[rng.random_range(0..retirable.len())].clone())
                }
                (0..=3, _) => Op::Stage(format!("b{step}")),
                (4, None) if !pending.is_empty() => Op::Begin(format!("run{step}"), pending),
                (5, None) if pending.len() == 1 => Op::Fail(pending),
                (6..=9, Some((run, batches, false))) => {
                    let d = [Decision::Accept, Decision::Defer, Decision::Reject]
                        [rng.random_range(0..3)];
                    let alone = d == Decision::Reject && rng.random_bool(0.5);
                    Op::Verdict(run, batches, d, alone)
                }
                (10 | 11, Some((run, batches, true))) => Op::Publish(run, batches),
                // The validator gives up before a verdict; now and then the publisher
                // gives up after one accepted.
                (12, Some((run, batches, false))) => Op::Abandon(run, batches),
                (12, Some((run, batches, true))) if rng.random_bool(0.2) => {
                    Op::Abandon(run, batches)
                }
                _ => continue,
            };
            db.transact(|tx| {
                match &op {
                    Op::Stage(b) => {
                        let r = BatchRecord {
                            v: 1,
                            digest: "d".into(),
                            samples: 1,
                            heldout: 0,
                            chunks: 0,
                            staged_at_ms: step,
                            status: BatchStatus::Staged,
                            chunk_samples: 0,
                        };
                        stage_batch(&repo, tx, user, b, &r)?;
                    }
                    Op::Begin(run_id, batches) => {
                        let state = repo.user_state(tx, user)?;
                        let run = RunRecord {
                            v: 1,
                            run_id: run_id.clone(),
                            parent_version: state.head,
                            batches: batches.clone(),
                            train_samples: 1,
                            model_blob: "m".into(),
                            model_sha256: "s".into(),
                            model_bytes: 1,
                            created_at_ms: 0,
                            train_seconds: 0.0,
                            train_cpu_seconds: 0.0,
                            familiarity: None,
                            verdict: None,
                            published_version: None,
                        };
                        begin_run(&repo, &bus, tx, &uid, &run, state)?;
                    }
                    Op::Fail(batches) => fail_training(&repo, tx, user, batches, "broken")?,
                    Op::Verdict(run_id, batches, d, alone) => {
                        let failed: Vec<(String, String)> = if *alone {
                            vec![(batches[0].clone(), "alone".into())]
                        } else {
                            vec![]
                        };
                        let v = verdict(*d == Decision::Accept);
                        let done = record_verdict(&repo, &bus, tx, &uid, run_id, *d, &failed, &v)?;
                        assert_eq!(done, Some(*d));
                        // A duplicate delivery changes nothing.
                        let again = record_verdict(&repo, &bus, tx, &uid, run_id, *d, &failed, &v)?;
                        assert_eq!(again, None);
                    }
                    Op::Publish(run_id, _) => {
                        let state = repo.user_state(tx, user)?;
                        let run = repo.run(tx, user, run_id)?.expect("a run");
                        let version = crate::test_version(
                            state.last_version + 1,
                            run_id,
                            run.parent_version,
                            run.batches.clone(),
                        );
                        publish(&repo, &bus, tx, &uid, run, &version, state, false)?;
                    }
                    Op::Abandon(run_id, _) => abandon_run(&repo, &bus, tx, &uid, run_id)?,
                    Op::Retire(b) => {
                        let r = repo.batch(tx, user, b)?.expect("a batch");
                        retire(&repo, tx, user, b, r, "old")?;
                    }
                }
                Ok(())
            })
            .unwrap();
            // The same operation on the model.
            match op {
                Op::Stage(b) => {
                    m.indexed.insert((user.into(), b.clone()));
                    m.set(user, &b, BatchStatus::Staged);
                }
                Op::Begin(run_id, batches) => {
                    for b in &batches {
                        let to = BatchStatus::Validating {
                            run_id: run_id.clone(),
                        };
                        m.set(user, b, to);
                    }
                    m.inflight.insert(user.into(), (run_id, batches, false));
                }
                Op::Fail(batches) => {
                    for b in &batches {
                        let to = BatchStatus::Rejected {
                            run_id: None,
                            reason: "cannot be trained: broken".into(),
                        };
                        m.set(user, b, to);
                    }
                }
                Op::Verdict(run_id, batches, Decision::Accept, _) => {
                    m.inflight.insert(user.into(), (run_id, batches, true));
                }
                Op::Verdict(run_id, batches, d, alone) => {
                    for (i, b) in batches.iter().enumerate() {
                        let to = match (d, alone, i) {
                            (Decision::Defer, _, _) => BatchStatus::Deferred {
                                reason: "because".into(),
                            },
                            (_, true, 0) => BatchStatus::Rejected {
                                run_id: Some(run_id.clone()),
                                reason: "alone".into(),
                            },
                            (_, true, _) => {
                                m.restaged += 1;
                                BatchStatus::Staged
                            }
                            _ => BatchStatus::Rejected {
                                run_id: Some(run_id.clone()),
                                reason: "because".into(),
                            },
                        };
                        m.set(user, b, to);
                    }
                    m.inflight.remove(user);
                }
                Op::Abandon(_, batches) => {
                    for b in &batches {
                        m.set(user, b, BatchStatus::Staged);
                    }
                    m.inflight.remove(user);
                    m.abandoned += 1;
                }
                Op::Retire(b) => {
                    let from = m.batches[&(user.to_string(), b.clone())].clone();
                    m.set(user, &b, retired(&from, "old"));
                }
                Op::Publish(run_id, batches) => {
                    let v = m.head.get(user).copied().unwrap_or(0) + 1;
                    for b in &batches {
                        let to = BatchStatus::Published {
                            run_id: run_id.clone(),
                            version: v,
                        };
                        m.set(user, b, to);
                    }
                    m.head.insert(user.into(), v);
                    m.inflight.remove(user);
                }
            }
            // The store agrees with the model, the pending index included.
            for ((u, b), want) in &m.batches {
                let got = db.transact(|tx| repo.batch(tx, u, b)).unwrap().unwrap();
                assert_eq!(&got.status, want, "step {step}: {u}/{b}");
            }
            for u in users {
                let s = db.transact(|tx| repo.user_state(tx, u)).unwrap();
                let want = m.inflight.get(u).map(|r| r.0.clone());
                assert_eq!(s.inflight_run, want, "step {step}: {u}");
                assert_eq!(s.head, m.head.get(u).copied(), "step {step}: {u}");
                assert_eq!(s.last_version, s.head.unwrap_or(0), "step {step}: {u}");
            }
            let indexed: Vec<(String, String)> = db
                .transact(|tx| tx.get_range(&RangeOption::prefix(&keys.pending_batches())))
                .unwrap()
                .iter()
                .map(|(k, _)| keys.pending_batch_of(k).map(|(_, u, b)| (u, b)).unwrap())
                .collect();
            let want: Vec<(String, String)> = m.indexed.iter().cloned().collect();
            let mut got = indexed;
            got.sort();
            assert_eq!(got, want, "step {step}");
        }
        // Every kind of move happened.
        let count = |f: fn(&BatchStatus) -> bool| m.batches.values().filter(|s| f(s)).count();
        let published = count(|s| matches!(s, BatchStatus::Published { .. }));
        let rejected = count(|s| matches!(s, BatchStatus::Rejected { .. }));
        let retired = count(|s| matches!(s, BatchStatus::Retired { .. }));
        assert!(
            published > 10 && rejected > 10 && retired > 5,
            "{published} published, {rejected} rejected, {retired} retired"
        );
        assert!(m.restaged > 5, "{} run-mates restaged", m.restaged);
        assert!(m.abandoned > 5, "{} runs abandoned", m.abandoned);
        assert!(
            m.head.values().all(|v| *v >= 3),
            "every user published several versions: {:?}",
            m.head
        );
    }
}
