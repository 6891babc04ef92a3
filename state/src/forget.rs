//! Forgetting a user: erase every sample, batch, run, candidate, version, ONNX file,
//! blob chunk, token, index entry, counter and event of one user, so that afterwards no
//! key or value of the store names the user or holds their data.
//!
//! Guarantees:
//! - **Refusal first.** [`begin`] writes the user's erasure record
//!   (`Keys::forgotten`, state `erasing`) in one transaction. From its commit on, ingest
//!   refuses the user's uploads (410) and every stage skips the user's work as stale:
//!   each reads the record ([`is_forgotten`]) in the transaction that would write, so
//!   nothing of the user is written after the erasure began (serializable: a stage
//!   transaction that read "not forgotten" and commits after `begin` conflicts).
//! - **Bounded transactions.** [`erase`] deletes in steps of at most `chunk` records
//!   (runs with their candidate blobs, versions with their ONNX blobs, batches with
//!   their sample chunks and pending-index entries), then the rest of the user's keys,
//!   then scans the tokens, the embedded log (every topic, dead letters included) and
//!   the outbox a few hundred entries at a time, deleting what belongs to the user.
//!   Each transaction adds what it removed to the record's counts, so the counts are
//!   exact however often the erasure is interrupted.
//! - **Resumable and idempotent.** Every step deletes what is still there; a crash
//!   leaves the record `erasing` (with the user's id), and running [`erase`] again (the
//!   CLI again, or ingest at its next start: [`unfinished`]) finishes it. Erasing an
//!   erased user returns the receipt and changes nothing.
//! - **No trace.** The last transaction turns the record into the receipt: state
//!   `forgotten`, the user's id removed, keyed by a pseudonym (SHA-256 of the id), so
//!   uploads stay refused until an operator re-creates the user ([`recreate`]). Then
//!   the store purges what was cleared from its files (`Db::purge_deleted`; the
//!   embedded store: tombstones collected, `secure_delete`, the WAL truncated).
//! - Events carry ids (user, batch, run, version), never samples: what leaves the
//!   store for Kafka topics is only that, and Kafka's own retention bounds it
//!   (docs/operations.md). The base model and the guard set are built before any user
//!   exists (`swimlane admin init`: synthetic or other swimmers' recordings), never
//!   from uploads, so they hold no user's data.
use swimlane_bus::wire::{decode_log_record, decode_outbox_entry};
use swimlane_core::records::{
    BatchRecord, BatchStatus, ErasureCounts, ErasureRecord, ModelVersionRecord, RunRecord,
    UserState,
};
use swimlane_core::UserId;
use swimlane_store::{prefix_range, Db, KvError, RangeOption, Transaction};

use crate::tokens::TokenRecord;
use crate::{Repo, Res};

/// Records (runs, versions, batches) deleted per transaction by default.
pub const CHUNK: usize = 16;
/// Entries (tokens, log entries, outbox entries) scanned per transaction.
pub const SCAN: usize = 500;

impl crate::StoredRecord for ErasureRecord {
    const WHAT: &'static str = "erasure record";
    fn schema_version(&self) -> u32 {
        self.v
    }
}

/// Whether `user` is being erased or was: uploads are refused and stages skip the
/// user's work. Read it in the transaction that would write.
pub fn is_forgotten(repo: &Repo, tx: &mut Transaction<'_>, user: &str) -> Res<bool> {
    Ok(tx.get(&repo.keys.forgotten(user))?.is_some())
}

/// The erasure record of `user`, if an erasure began.
pub fn record(repo: &Repo, tx: &mut Transaction<'_>, user: &str) -> Res<Option<ErasureRecord>> {
    tx.get(&repo.keys.forgotten(user))?
        .map(|b| crate::decode_record(&b))
        .transpose()
}

/// The erasure record of `user`, which an erasure under way must have.
fn erasing(repo: &Repo, tx: &mut Transaction<'_>, user: &str) -> Res<ErasureRecord> {
    record(repo, tx, user)?.ok_or_else(|| KvError::Corrupt {
        what: "erasure record".into(),
        reason: "missing while erasing".into(),
    })
}

/// Begin erasing `user` (or find the erasure already begun or done): from this
/// commit on, nothing more of the user is accepted or written.
pub fn begin(
    repo: &Repo,
    db: &Db,
    user: &UserId,
    requested_by: &str,
    now_ms: u64,
) -> Res<ErasureRecord> {
    db.transact(|tx| {
        if let Some(r) = record(repo, tx, user.as_str())? {
            return Ok(r);
        }
        let r = ErasureRecord {
            v: 1,
            state: "erasing".into(),
            user: Some(user.to_string()),
            requested_by: requested_by.into(),
            started_at_ms: now_ms,
            finished_at_ms: None,
            erased: ErasureCounts::default(),
            files_purged: false,
        };
        put(repo, tx, user.as_str(), &r)?;
        Ok(r)
    })
}

fn put(repo: &Repo, tx: &mut Transaction<'_>, user: &str, r: &ErasureRecord) -> Res<()> {
    tx.set(
        &repo.keys.forgotten(user),
        &serde_json::to_vec(r).expect("records serialize"),
    )
}

/// One bounded step inside a transaction: adds what it removed to the counts;
/// returns whether it found anything (the caller repeats until it does not).
type Step<'a> = dyn FnMut(&mut Transaction<'_>, &mut ErasureCounts) -> Res<bool> + 'a;

/// Run `step` in transactions until it finds nothing, each transaction also adding its
/// counts to the user's erasure record; `after_each` runs after every commit.
fn repeat(
    repo: &Repo,
    db: &Db,
    user: &str,
    step: &mut Step<'_>,
    after_each: &mut dyn FnMut(&ErasureCounts),
) -> Res<()> {
    loop {
        let (found, counts) = db.transact(|tx| {
            let mut r = erasing(repo, tx, user)?;
            let found = step(tx, &mut r.erased)?;
            if found {
                put(repo, tx, user, &r)?;
            }
            Ok((found, r.erased))
        })?;
        if !found {
            return Ok(());
        }
        after_each(&counts);
    }
}

/// A scan of `prefix` in [`SCAN`]-entry transactions, deleting the entries `mine`
/// says belong to the user, counted in `count`.
fn scrub(
    repo: &Repo,
    db: &Db,
    user: &str,
    prefix: &[u8],
    mine: &dyn Fn(&[u8], &[u8]) -> bool,
    count: Count,
    after_each: &mut dyn FnMut(&ErasureCounts),
) -> Res<()> {
    let (_, end) = prefix_range(prefix);
    let mut from = prefix.to_vec();
    loop {
        let (next, counts) = db.transact(|tx| {
            let rows = tx.get_range(&RangeOption::new(from.clone(), end.clone()).limit(SCAN))?;
            let next = rows.last().map(|(k, _)| {
                let mut k = k.clone();
                k.push(0); // the smallest key after it
                k
            });
            let doomed: Vec<Vec<u8>> = rows
                .into_iter()
                .filter(|(k, v)| mine(k, v))
                .map(|(k, _)| k)
                .collect();
            if doomed.is_empty() {
                return Ok((next, None));
            }
            let mut r = erasing(repo, tx, user)?;
            for k in &doomed {
                tx.clear(k)?;
            }
            *count(&mut r.erased) += doomed.len() as u64;
            put(repo, tx, user, &r)?;
            Ok((next, Some(r.erased)))
        })?;
        if let Some(c) = counts {
            after_each(&c);
        }
        match next {
            Some(k) => from = k,
            None => return Ok(()),
        }
    }
}

/// Erase everything of `user` whose erasure [`begin`] started, resuming where an
/// interrupted erasure stopped; the receipt. `chunk`: records per transaction
/// ([`CHUNK`]); `after_each`: called after every committed step (progress).
pub fn erase(
    repo: &Repo,
    db: &Db,
    user: &UserId,
    now_ms: &dyn Fn() -> u64,
    chunk: usize,
    after_each: &mut dyn FnMut(&ErasureCounts),
) -> Res<ErasureRecord> {
    let u = user.as_str();
    let keys = &repo.keys;
    let chunk = chunk.max(1);
    match db.transact(|tx| record(repo, tx, u))? {
        None => {
            return Err(KvError::InvalidArgument(format!(
                "no erasure of {u} was begun"
            )))
        }
        Some(r) if r.state == "forgotten" => return Ok(r),
        Some(_) => {}
    }
    // Runs and their candidates' weights; versions, their weights (the run's, usually
    // gone already) and ONNX files (their own blobs: a device file's shared prefix, the
    // base model's part, holds no user's data and stays for the other users' files).
    let run_blobs =
        |v: &[u8]| crate::decode_record::<RunRecord>(v).map_or(Vec::new(), |r| vec![r.model_blob]);
    let version_blobs = |v: &[u8]| {
        crate::decode_record::<ModelVersionRecord>(v).map_or(Vec::new(), |r| {
            std::iter::once(r.model_blob)
                .chain(r.onnx.map(|f| f.blob))
                .collect()
        })
    };
    for (prefix, blobs_of, count) in [
        (
            keys.runs(u),
            &run_blobs as &dyn Fn(&[u8]) -> Vec<String>,
            runs as Count,
        ),
        (keys.model_versions(u), &version_blobs, versions),
    ] {
        repeat(
            repo,
            db,
            u,
            &mut |tx, c| {
                let rows = tx.get_range(&RangeOption::prefix(&prefix).limit(chunk))?;
                for (k, v) in &rows {
                    for blob in blobs_of(v) {
                        c.blobs += clear_blob(repo, tx, &blob)?;
                    }
                    tx.clear(k)?;
                    *count(c) += 1;
                }
                Ok(!rows.is_empty())
            },
            after_each,
        )?;
    }
    // Batches: their samples and pending-index entries.
    repeat(
        repo,
        db,
        u,
        &mut |tx, c| {
            let rows = tx.get_range(&RangeOption::prefix(&keys.batches(u)).limit(chunk))?;
            for (k, v) in &rows {
                if let (Some(id), Ok(b)) = (keys.batch_id_of(u, k), BatchRecord::decode(v)) {
                    let pending = keys.pending_batch(b.staged_at_ms, u, &id);
                    if tx.get(&pending)?.is_some() {
                        tx.clear(&pending)?;
                        c.index_entries += 1;
                    }
                    if !matches!(b.status, BatchStatus::Retired { .. }) {
                        c.samples += u64::from(b.samples);
                    }
                    tx.clear_prefix(&keys.samples_of_batch(u, &id))?;
                }
                tx.clear(k)?;
                c.batches += 1;
            }
            Ok(!rows.is_empty())
        },
        after_each,
    )?;
    // Everything else under the user's prefix (state, head, live and upload counters,
    // any sample chunk left), the user's share of the fleet statistics first.
    repeat(
        repo,
        db,
        u,
        &mut |tx, c| {
            let rows = tx.get_range(&RangeOption::prefix(&keys.user_prefix(u)).limit(SCAN))?;
            if rows.is_empty() {
                return Ok(false);
            }
            if tx.get(&keys.user_state(u))?.is_some() {
                // Takes the user out of the fleet's head-accuracy histogram.
                repo.put_user_state(tx, u, &UserState::default())?;
            }
            // And out of the fleet's live statistics.
            repo.refresh_live_standing(tx, u, true)?;
            for (k, _) in &rows {
                tx.clear(k)?;
            }
            c.other_keys += rows.len() as u64;
            Ok(true)
        },
        after_each,
    )?;
    // Tokens, the embedded log (dead letters included) and the outbox: scanned, the
    // user's entries deleted.
    scrub(
        repo,
        db,
        u,
        &keys.tokens(),
        &|_, v| serde_json::from_slice::<TokenRecord>(v).is_ok_and(|t| t.user.as_str() == u),
        |c| &mut c.tokens,
        after_each,
    )?;
    scrub(
        repo,
        db,
        u,
        &keys.log_all(),
        &|_, v| decode_log_record(v).is_ok_and(|(key, _)| key == u),
        |c| &mut c.events,
        after_each,
    )?;
    scrub(
        repo,
        db,
        u,
        &keys.outbox_prefix(),
        &|_, v| decode_outbox_entry(v).is_ok_and(|e| e.key == u),
        |c| &mut c.events,
        after_each,
    )?;
    // The receipt: the record no longer names the user.
    let done = db.transact(|tx| {
        let mut r = erasing(repo, tx, u)?;
        if r.state != "forgotten" {
            r.state = "forgotten".into();
            r.user = None;
            r.finished_at_ms = Some(now_ms());
            put(repo, tx, u, &r)?;
        }
        Ok(r)
    })?;
    let purged = db.purge_deleted()?;
    let files_purged = !purged.supported || purged.log_truncated;
    db.transact(|tx| {
        let mut r = record(repo, tx, u)?.unwrap_or_else(|| done.clone());
        r.files_purged = files_purged;
        put(repo, tx, u, &r)?;
        Ok(r)
    })
}

/// Which count of the receipt a step adds to.
type Count = fn(&mut ErasureCounts) -> &mut u64;
fn runs(c: &mut ErasureCounts) -> &mut u64 {
    &mut c.runs
}
fn versions(c: &mut ErasureCounts) -> &mut u64 {
    &mut c.versions
}

/// Clear blob `id` if it is there; 1 if it was.
fn clear_blob(repo: &Repo, tx: &mut Transaction<'_>, id: &str) -> Res<u64> {
    let prefix = repo.keys.blob(id);
    let there = !tx
        .get_range(&RangeOption::prefix(&prefix).limit(1))?
        .is_empty();
    if there {
        swimlane_store::blob::delete_in(tx, &prefix)?;
    }
    Ok(u64::from(there))
}

/// Users whose erasure began and did not finish (a crash): to resume.
pub fn unfinished(repo: &Repo, db: &Db) -> Res<Vec<UserId>> {
    let rows = db.transact(|tx| tx.get_range(&RangeOption::prefix(&repo.keys.forgottens())))?;
    let mut out = Vec::new();
    for (_, v) in rows {
        let r: ErasureRecord = crate::decode_record(&v)?;
        if let (true, Some(u)) = (r.state == "erasing", r.user) {
            out.push(UserId::new(u).map_err(|e| KvError::Corrupt {
                what: "erasure record".into(),
                reason: e.to_string(),
            })?);
        }
    }
    Ok(out)
}

/// Let an erased user exist again (an operator's decision): the receipt is removed
/// and uploads are accepted once the user has a token. `false` when the user was not
/// erased; an error while the erasure is still running.
pub fn recreate(repo: &Repo, tx: &mut Transaction<'_>, user: &str) -> Res<bool> {
    match record(repo, tx, user)? {
        None => Ok(false),
        Some(r) if r.state != "forgotten" => Err(KvError::InvalidArgument(format!(
            "the erasure of {user} has not finished; finish it first (`swimlane admin forget --user {user}`)"
        ))),
        Some(_) => {
            tx.clear(&repo.keys.forgotten(user))?;
            Ok(true)
        }
    }
}
