//! swimlane-state: typed reads and writes of swimlane's stored records, inside the
//! caller's transaction. The key layout is `swimlane_core::keys`; the record types are
//! `swimlane_core::records`. Every function here reads or writes one user's records
//! only, under that user's keys.
//!
//! Guarantee: nothing here opens a transaction of its own except the `*_db` helpers,
//! so stages compose these calls with their position commit in one transaction.
pub mod forget;
pub mod history;
pub mod lifecycle;
pub mod tokens;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use swimlane_core::keys::Keys;
use swimlane_core::records::{
    decode_chunk, BatchRecord, BatchStatus, LiveCount, ModelVersionRecord, RunRecord, StagedSample,
    UserState,
};
use swimlane_core::stats;
use swimlane_store::{blob, Db, KvError, RangeOption, Transaction};

/// What every store access here returns: the value, or the store's error.
pub type Res<T> = Result<T, KvError>;

/// Where a user is counted in the fleet's live statistics
/// ([`Repo::refresh_live_standing`]): the live accuracy bucket of the model they run
/// (and the accuracy in millionths), and whether it fell after their last publish.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveStanding {
    pub bucket: Option<u32>,
    pub micros: i64,
    pub fell: bool,
}

/// Blob id of the deployment's base model (the parent of every user's first run).
pub const BASE_MODEL_BLOB: &str = "base-model";
/// Blob id of the population guard set (encoded with `records::encode_chunk` chunks,
/// see [`encode_sample_set`]).
pub const GUARD_SET_BLOB: &str = "guard-set";

fn corrupt(what: &str, e: impl std::fmt::Display) -> KvError {
    KvError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// A JSON record stored by this crate: it names itself for errors and carries its
/// schema version (`v`), which [`decode_record`] checks.
pub trait StoredRecord: DeserializeOwned {
    /// What the record is, for [`KvError::Corrupt`] (`"run record"`, ...).
    const WHAT: &'static str;
    /// The schema version this build writes and the only one it reads.
    const VERSION: u32 = 1;
    /// The record's `v` field.
    fn schema_version(&self) -> u32;
}

impl StoredRecord for RunRecord {
    const WHAT: &'static str = "run record";
    fn schema_version(&self) -> u32 {
        self.v
    }
}

impl StoredRecord for ModelVersionRecord {
    const WHAT: &'static str = "model version";
    fn schema_version(&self) -> u32 {
        self.v
    }
}

impl StoredRecord for UserState {
    const WHAT: &'static str = "user state";
    fn schema_version(&self) -> u32 {
        self.v
    }
}

/// Decode a stored JSON record: bytes that are not its JSON, or of another schema
/// version, are [`KvError::Corrupt`]. Never panics on any bytes (fuzzed:
/// `fuzz/fuzz_targets/stored_records.rs`).
pub fn decode_record<T: StoredRecord>(bytes: &[u8]) -> Res<T> {
    let r: T = serde_json::from_slice(bytes).map_err(|e| corrupt(T::WHAT, e))?;
    if r.schema_version() != T::VERSION {
        return Err(corrupt(
            T::WHAT,
            format!("unsupported schema version {}", r.schema_version()),
        ));
    }
    Ok(r)
}

fn get_json<T: StoredRecord>(tx: &mut Transaction<'_>, key: &[u8]) -> Res<Option<T>> {
    tx.get(key)?.map(|b| decode_record(&b)).transpose()
}

fn put_json<T: Serialize>(tx: &mut Transaction<'_>, key: &[u8], v: &T) -> Res<()> {
    tx.set(key, &serde_json::to_vec(v).expect("records serialize"))
}

/// A value a process makes from a stored blob and keeps between transactions, with the
/// SHA-256 (lowercase hex) the blob's header recorded when it was made:
/// [`Repo::blob_kept`].
pub struct Kept<T>(Mutex<Option<(String, Arc<T>)>>);

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept(Mutex::new(None))
    }
}

/// A blob's bytes, kept as they are.
pub type KeptBlob = Kept<Vec<u8>>;

/// Typed access to one deployment's records.
#[derive(Clone, Debug)]
pub struct Repo {
    pub keys: Keys,
}

impl Repo {
    pub fn new(keys: Keys) -> Self {
        Repo { keys }
    }

    pub fn batch(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        batch: &str,
    ) -> Res<Option<BatchRecord>> {
        match tx.get(&self.keys.batch(user, batch))? {
            None => Ok(None),
            Some(b) => BatchRecord::decode(&b)
                .map(Some)
                .map_err(|e| corrupt("batch record", e)),
        }
    }

    /// Write a batch record. A batch leaving the pipeline's hands (published, rejected,
    /// or deferred until the user's next upload) leaves the pending index too (see
    /// [`Repo::oldest_pending_batch`]); [`lifecycle::stage_batch`] adds to it. Only the
    /// [`lifecycle`] module moves a batch between statuses; tests that build a store in
    /// a given state write records here directly.
    pub fn put_batch(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        batch: &str,
        r: &BatchRecord,
    ) -> Res<()> {
        if !matches!(
            r.status,
            BatchStatus::Staged | BatchStatus::Validating { .. }
        ) {
            tx.clear(&self.keys.pending_batch(r.staged_at_ms, user, batch))?;
        }
        tx.set(&self.keys.batch(user, batch), &r.encode())
    }

    /// `(staged_at_ms, user, batch_id)` of the batch staged longest ago that the
    /// pipeline has not settled yet (published, rejected, or deferred for more
    /// evidence); `None` when every staged batch is settled. One short range read.
    pub fn oldest_pending_batch(
        &self,
        tx: &mut Transaction<'_>,
    ) -> Res<Option<(u64, String, String)>> {
        let rows = tx.get_range(&RangeOption::prefix(&self.keys.pending_batches()).limit(1))?;
        rows.first()
            .map(|(k, _)| {
                self.keys
                    .pending_batch_of(k)
                    .ok_or_else(|| corrupt("pending batch key", "does not decode"))
            })
            .transpose()
    }

    /// Add an upload's live counts (`records::live_counts`) to `user`'s, per model
    /// version, and to the fleet's totals: atomic adds, so uploads never conflict on
    /// them.
    pub fn add_live(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        counts: &BTreeMap<u64, LiveCount>,
    ) -> Res<()> {
        let (mut windows, mut right) = (0i64, 0i64);
        for (version, c) in counts {
            let (w, r) = (c.windows as i64, c.right as i64);
            tx.atomic_add(&self.keys.live(user, *version, "windows"), w)?;
            tx.atomic_add(&self.keys.live(user, *version, "right"), r)?;
            windows += w;
            right += r;
        }
        if windows > 0 {
            tx.atomic_add(&self.keys.stat(stats::LIVE_WINDOWS, 0), windows)?;
            tx.atomic_add(&self.keys.stat(stats::LIVE_RIGHT, 0), right)?;
            self.refresh_live_standing(tx, user, false)?;
        }
        Ok(())
    }

    /// Keep `user`'s place in the fleet's live statistics (`stats::USERS_LIVE_ACCURACY`,
    /// `stats::USERS_LIVE_FELL`) true to the user's live counts and head now: called
    /// where either changes (an upload's counts, a publish, a rollback). `gone`: the
    /// user is being erased, take them out. Atomic adds on the fleet counters.
    pub fn refresh_live_standing(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        gone: bool,
    ) -> Res<()> {
        let new = if gone {
            LiveStanding::default()
        } else {
            let state = self.user_state(tx, user)?;
            let live = self.live(tx, user)?;
            let accuracy = |v: u64| {
                live.get(&v)
                    .filter(|c| c.windows >= stats::MIN_LIVE_WINDOWS)
                    .and_then(|c| c.accuracy())
            };
            let now = accuracy(state.head.unwrap_or(0));
            let before = match state.head {
                Some(v) => self
                    .model_version(tx, user, v)?
                    .and_then(|r| accuracy(r.parent_version.unwrap_or(0))),
                None => None,
            };
            LiveStanding {
                bucket: now.map(|a| stats::accuracy_bucket(a as f32)),
                micros: now.map_or(0, |a| stats::micros(a as f32)),
                fell: matches!((now, before), (Some(a), Some(b)) if a < b),
            }
        };
        let key = self.keys.live_standing(user);
        let old: LiveStanding = match tx.get(&key)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| corrupt("live standing", e))?,
            None => LiveStanding::default(),
        };
        if old == new {
            return Ok(());
        }
        for (s, sign) in [(&old, -1i64), (&new, 1)] {
            if let Some(b) = s.bucket {
                tx.atomic_add(&self.keys.stat(stats::USERS_LIVE_ACCURACY, b), sign)?;
                tx.atomic_add(
                    &self.keys.stat(stats::USERS_LIVE_ACCURACY_SUM, 0),
                    sign * s.micros,
                )?;
            }
            if s.fell {
                tx.atomic_add(&self.keys.stat(stats::USERS_LIVE_FELL, 0), sign)?;
            }
        }
        if new == LiveStanding::default() {
            tx.clear(&key)
        } else {
            put_json(tx, &key, &new)
        }
    }

    /// The fleet's live statistics: users per live accuracy bucket, the sum of their
    /// live accuracies, and how many fell after their last publish.
    pub fn live_accuracy_histogram(&self, tx: &mut Transaction<'_>) -> Res<(Vec<u64>, f64, u64)> {
        let (counts, sum) = self.accuracy_histogram(
            tx,
            stats::USERS_LIVE_ACCURACY,
            stats::USERS_LIVE_ACCURACY_SUM,
        )?;
        let fell = tx.get_counter(&self.keys.stat(stats::USERS_LIVE_FELL, 0))?;
        Ok((counts, sum, fell.max(0) as u64))
    }

    /// Users per bucket of the counter family `buckets` (`stats::ACCURACY_BUCKETS`,
    /// then the rest), and the sum of their accuracies from `sum_micros`.
    fn accuracy_histogram(
        &self,
        tx: &mut Transaction<'_>,
        buckets: &str,
        sum_micros: &str,
    ) -> Res<(Vec<u64>, f64)> {
        let mut counts = Vec::with_capacity(stats::ACCURACY_BUCKETS.len() + 1);
        for i in 0..=stats::ACCURACY_BUCKETS.len() as u32 {
            let n = tx.get_counter(&self.keys.stat(buckets, i))?;
            counts.push(n.max(0) as u64);
        }
        let sum = tx.get_counter(&self.keys.stat(sum_micros, 0))?;
        Ok((counts, sum.max(0) as f64 / 1e6))
    }

    /// `user`'s live counts per model version (0: the base model).
    pub fn live(&self, tx: &mut Transaction<'_>, user: &str) -> Res<BTreeMap<u64, LiveCount>> {
        let mut out = BTreeMap::<u64, LiveCount>::new();
        for (k, v) in tx.get_range(&RangeOption::prefix(&self.keys.lives(user)))? {
            let (version, what) = self
                .keys
                .live_of(user, &k)
                .ok_or_else(|| corrupt("live count key", "does not decode"))?;
            let n: [u8; 8] = v
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("live count", "not 8 bytes"))?;
            let n = u64::try_from(i64::from_le_bytes(n)).unwrap_or(0);
            let c = out.entry(version).or_default();
            match what.as_str() {
                "windows" => c.windows = n,
                "right" => c.right = n,
                _ => return Err(corrupt("live count key", format!("unknown count {what}"))),
            }
        }
        Ok(out)
    }

    /// The fleet's live totals: windows classified and windows right.
    pub fn live_totals(&self, tx: &mut Transaction<'_>) -> Res<LiveCount> {
        Ok(LiveCount {
            windows: tx
                .get_counter(&self.keys.stat(stats::LIVE_WINDOWS, 0))?
                .max(0) as u64,
            right: tx
                .get_counter(&self.keys.stat(stats::LIVE_RIGHT, 0))?
                .max(0) as u64,
        })
    }

    /// How many users' head model has a held-out accuracy in each bucket of
    /// `stats::ACCURACY_BUCKETS` (not cumulative; the last entry counts accuracies
    /// above the last bound), and the sum of those accuracies.
    pub fn head_accuracy_histogram(&self, tx: &mut Transaction<'_>) -> Res<(Vec<u64>, f64)> {
        self.accuracy_histogram(tx, stats::HEAD_ACCURACY, stats::HEAD_ACCURACY_SUM)
    }

    /// Every batch record of `user`, in batch-id order.
    pub fn batches(&self, tx: &mut Transaction<'_>, user: &str) -> Res<Vec<(String, BatchRecord)>> {
        let rows = tx.get_range(&RangeOption::prefix(&self.keys.batches(user)))?;
        rows.into_iter()
            .map(|(k, v)| {
                let id = self
                    .keys
                    .batch_id_of(user, &k)
                    .ok_or_else(|| corrupt("batch key", "does not decode"))?;
                let r = BatchRecord::decode(&v).map_err(|e| corrupt("batch record", e))?;
                Ok((id, r))
            })
            .collect()
    }

    /// The staged samples of one batch, in stored order (upload order; with
    /// `BatchRecord::chunk_samples`, the training samples first).
    pub fn samples(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        batch: &str,
    ) -> Res<Vec<StagedSample>> {
        let rows = tx.get_range(&RangeOption::prefix(
            &self.keys.samples_of_batch(user, batch),
        ))?;
        let mut out = Vec::new();
        for (_, v) in rows {
            out.extend(decode_chunk(&v).map_err(|e| corrupt("sample chunk", e))?);
        }
        Ok(out)
    }

    /// At most `max` samples of one split (`heldout`) of a batch whose record is `r`,
    /// reading only the chunks that hold them when the record says the splits are
    /// stored apart (`BatchRecord::chunk_samples`); otherwise every chunk, filtered.
    pub fn samples_of(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        batch: &str,
        r: &BatchRecord,
        heldout: bool,
        max: usize,
    ) -> Res<Vec<StagedSample>> {
        let (first, count) = if heldout {
            (r.training() as usize, r.heldout as usize)
        } else {
            (0, r.training() as usize)
        };
        let want = count.min(max);
        if want == 0 {
            return Ok(Vec::new());
        }
        let rows = if r.chunk_samples == 0 {
            tx.get_range(&RangeOption::prefix(
                &self.keys.samples_of_batch(user, batch),
            ))?
        } else {
            let per = r.chunk_samples as usize;
            let (c0, c1) = (first / per, (first + want - 1) / per + 1);
            tx.get_range(&RangeOption::new(
                self.keys.sample_chunk(user, batch, c0 as u32),
                self.keys.sample_chunk(user, batch, c1 as u32),
            ))?
        };
        let mut out = Vec::with_capacity(want);
        for (_, v) in rows {
            let chunk = decode_chunk(&v).map_err(|e| corrupt("sample chunk", e))?;
            out.extend(chunk.into_iter().filter(|s| s.heldout == heldout));
            if out.len() >= want {
                break;
            }
        }
        out.truncate(want);
        Ok(out)
    }

    /// The user's most recent samples of one split (`heldout`) from the batches of
    /// `batches` (the user's, as [`Repo::batches`] lists them) that `include` keeps: at
    /// most `budget` of them, taken from the newest batch (`staged_at_ms`, then id)
    /// backwards, and returned in the batches' key order (so that, under the budget,
    /// the result is what reading every batch gives). The read is bounded by `budget`
    /// whatever the user's history (`policy::RetentionPolicy`).
    pub fn recent_samples(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        batches: &[(String, BatchRecord)],
        include: impl Fn(&str, &BatchRecord) -> bool,
        heldout: bool,
        budget: usize,
    ) -> Res<Vec<StagedSample>> {
        let mut newest: Vec<(usize, &(String, BatchRecord))> = batches
            .iter()
            .enumerate()
            .filter(|(_, (id, r))| include(id, r))
            .collect();
        newest
            .sort_by(|(_, (a, ra)), (_, (b, rb))| (rb.staged_at_ms, b).cmp(&(ra.staged_at_ms, a)));
        let mut chosen = Vec::new();
        let mut taken = 0usize;
        for (i, (id, r)) in newest {
            let room = budget.saturating_sub(taken);
            if room == 0 {
                break;
            }
            let read = self.samples_of(tx, user, id, r, heldout, room)?;
            taken += read.len();
            chosen.push((i, read));
        }
        chosen.sort_by_key(|(i, _)| *i);
        Ok(chosen.into_iter().flat_map(|(_, read)| read).collect())
    }

    pub fn user_state(&self, tx: &mut Transaction<'_>, user: &str) -> Res<UserState> {
        Ok(
            get_json(tx, &self.keys.user_state(user))?.unwrap_or(UserState {
                v: 1,
                ..Default::default()
            }),
        )
    }

    /// Write a user's state, keeping the `stats::HEAD_ACCURACY` counters in step with
    /// the head's held-out accuracy: the user moves from the bucket it was counted in
    /// (as stored, read here) to the bucket of `s.head_heldout_accuracy`. Atomic adds:
    /// concurrent writers for other users never conflict on the counters.
    pub fn put_user_state(&self, tx: &mut Transaction<'_>, user: &str, s: &UserState) -> Res<()> {
        let old = self.user_state(tx, user)?;
        let mut s = s.clone();
        let old_count = old
            .counted_accuracy_bucket
            .map(|b| (b, old.head_heldout_accuracy.map(stats::micros).unwrap_or(0)));
        let new_count = s
            .head_heldout_accuracy
            .map(|a| (stats::accuracy_bucket(a), stats::micros(a)));
        if old_count != new_count {
            if let Some((b, micros)) = old_count {
                tx.atomic_add(&self.keys.stat(stats::HEAD_ACCURACY, b), -1)?;
                tx.atomic_add(&self.keys.stat(stats::HEAD_ACCURACY_SUM, 0), -micros)?;
            }
            if let Some((b, micros)) = new_count {
                tx.atomic_add(&self.keys.stat(stats::HEAD_ACCURACY, b), 1)?;
                tx.atomic_add(&self.keys.stat(stats::HEAD_ACCURACY_SUM, 0), micros)?;
            }
        }
        s.counted_accuracy_bucket = new_count.map(|(b, _)| b);
        put_json(tx, &self.keys.user_state(user), &s)
    }

    pub fn run(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        run_id: &str,
    ) -> Res<Option<RunRecord>> {
        get_json(tx, &self.keys.run(user, run_id))
    }

    /// Every run record of `user`, in run-id order (operators and audits).
    pub fn runs(&self, tx: &mut Transaction<'_>, user: &str) -> Res<Vec<RunRecord>> {
        let rows = tx.get_range(&RangeOption::prefix(&self.keys.runs(user)))?;
        rows.into_iter().map(|(_, v)| decode_record(&v)).collect()
    }

    pub fn put_run(&self, tx: &mut Transaction<'_>, user: &str, r: &RunRecord) -> Res<()> {
        put_json(tx, &self.keys.run(user, &r.run_id), r)
    }

    pub fn model_version(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        version: u64,
    ) -> Res<Option<ModelVersionRecord>> {
        get_json(tx, &self.keys.model_version(user, version))
    }

    pub fn put_model_version(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        r: &ModelVersionRecord,
    ) -> Res<()> {
        put_json(tx, &self.keys.model_version(user, r.version), r)
    }

    /// Every published version of `user`, oldest first.
    pub fn model_versions(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
    ) -> Res<Vec<ModelVersionRecord>> {
        let rows = tx.get_range(&RangeOption::prefix(&self.keys.model_versions(user)))?;
        rows.into_iter().map(|(_, v)| decode_record(&v)).collect()
    }

    /// Store a blob (weights, sample sets) inside `tx`; it must fit one transaction.
    /// Returns the data's SHA-256 (lowercase hex, [`sha256_hex`]), computed once for
    /// the blob's header.
    pub fn put_blob(&self, tx: &mut Transaction<'_>, blob_id: &str, data: &[u8]) -> Res<String> {
        blob::write_in(tx, &self.keys.blob(blob_id), data).map(|h| hex::encode(h.sha256))
    }

    /// Read a blob, checking its length and hash; `None` when absent.
    pub fn blob(&self, tx: &mut Transaction<'_>, blob_id: &str) -> Res<Option<Vec<u8>>> {
        blob::read_in(tx, &self.keys.blob(blob_id))
    }

    /// [`Repo::blob`], with the SHA-256 (lowercase hex) the data was checked against.
    pub fn blob_with_sha256(
        &self,
        tx: &mut Transaction<'_>,
        blob_id: &str,
    ) -> Res<Option<(Vec<u8>, String)>> {
        Ok(blob::read_in_with_header(tx, &self.keys.blob(blob_id))?
            .map(|(data, h)| (data, hex::encode(h.sha256))))
    }

    /// What `make` makes of `blob_id`'s bytes, with the blob's SHA-256: the value `kept`
    /// holds while the stored blob's header records the same SHA-256 (one key read
    /// instead of the whole blob), otherwise made from the blob read whole and checked
    /// ([`Repo::blob`]) and kept. `None` when absent. For a blob most runs read again
    /// (the base model: every new user's parent and current model, the publisher's
    /// fallback; the guard set).
    pub fn blob_kept<T>(
        &self,
        tx: &mut Transaction<'_>,
        blob_id: &str,
        kept: &Kept<T>,
        make: impl FnOnce(Vec<u8>) -> Res<T>,
    ) -> Res<Option<(String, Arc<T>)>> {
        let Some(sha) = self.blob_sha256(tx, blob_id)? else {
            return Ok(None);
        };
        let mut k = kept.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = k.as_ref().filter(|(s, _)| *s == sha) {
            return Ok(Some(held.clone()));
        }
        let Some((bytes, sha)) = self.blob_with_sha256(tx, blob_id)? else {
            return Ok(None);
        };
        let made = (sha, Arc::new(make(bytes)?));
        *k = Some(made.clone());
        Ok(Some(made))
    }

    /// The SHA-256 (lowercase hex) a blob's header records, without reading the blob;
    /// `None` when absent.
    pub fn blob_sha256(&self, tx: &mut Transaction<'_>, blob_id: &str) -> Res<Option<String>> {
        Ok(blob::header_in(tx, &self.keys.blob(blob_id))?.map(|h| hex::encode(h.sha256)))
    }

    /// The bytes of a stored file: its shared prefix, if it has one, then its own part
    /// (its own blob with its splices put back); `None` when a blob it is made of is
    /// absent. Splices out of order, overlapping or past the end of a blob are
    /// [`KvError::Corrupt`].
    pub fn stored_file(
        &self,
        tx: &mut Transaction<'_>,
        file: &swimlane_core::records::StoredFile,
    ) -> Res<Option<Vec<u8>>> {
        let bad = |reason: String| KvError::Corrupt {
            what: format!("stored file {}", file.blob),
            reason,
        };
        let mut out = match &file.prefix_blob {
            Some(id) => match self.blob(tx, id)? {
                Some(p) => p,
                None => return Ok(None),
            },
            None => Vec::new(),
        };
        let Some(own) = self.blob(tx, &file.blob)? else {
            return Ok(None);
        };
        let prefix_len = out.len();
        // Sized by what is stored, not by what the record claims.
        out.reserve(own.len());
        // Each source blob read once, however many splices it gives.
        let mut sources: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut used = 0usize; // bytes of `own` copied so far
        for s in &file.splices {
            let part = (out.len() - prefix_len) as u64;
            let literal = s.at.checked_sub(part).ok_or_else(|| {
                bad(format!(
                    "a splice at {} comes before byte {part}, where the one before it ends",
                    s.at
                ))
            })? as usize;
            let end = used
                .checked_add(literal)
                .filter(|&e| e <= own.len())
                .ok_or_else(|| bad(format!("a splice at {} is past the end", s.at)))?;
            out.extend_from_slice(&own[used..end]);
            used = end;
            let i = match sources.iter().position(|(id, _)| *id == s.blob) {
                Some(i) => i,
                None => match self.blob(tx, &s.blob)? {
                    Some(b) => {
                        sources.push((&s.blob, b));
                        sources.len() - 1
                    }
                    None => return Ok(None),
                },
            };
            let src = &sources[i].1;
            let range = usize::try_from(s.offset)
                .ok()
                .zip(usize::try_from(s.len).ok())
                .and_then(|(o, l)| Some(o..o.checked_add(l)?))
                .filter(|r| r.end <= src.len())
                .ok_or_else(|| {
                    bad(format!(
                        "bytes {}+{} of blob {} are past its end ({} bytes)",
                        s.offset,
                        s.len,
                        s.blob,
                        src.len()
                    ))
                })?;
            out.extend_from_slice(&src[range]);
        }
        out.extend_from_slice(&own[used..]);
        Ok(Some(out))
    }

    /// Read a blob of any size (several transactions for large ones).
    pub fn blob_db(&self, db: &Db, blob_id: &str) -> Res<Option<Vec<u8>>> {
        blob::read(db, &self.keys.blob(blob_id))
    }

    /// What of `blobs` (installed by `swimlane admin init`: [`BASE_MODEL_BLOB`],
    /// [`GUARD_SET_BLOB`]) is missing, said for `/readyz`; `None` when all are there.
    pub fn not_installed(&self, db: &Db, blobs: &[&str]) -> Res<Option<String>> {
        // The headers only: a blob's header is written once the blob is whole.
        let present = db.transact(|tx| {
            blobs
                .iter()
                .map(|b| Ok(blob::header_in(tx, &self.keys.blob(b))?.is_some()))
                .collect::<Res<Vec<bool>>>()
        })?;
        let mut missing = Vec::new();
        for (&b, present) in blobs.iter().zip(present) {
            if !present {
                missing.push(match b {
                    BASE_MODEL_BLOB => "the base model",
                    GUARD_SET_BLOB => "the guard set",
                    other => other,
                });
            }
        }
        Ok((!missing.is_empty())
            .then(|| format!("{} (run `swimlane admin init`)", missing.join(" and "))))
    }
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Encode a set of samples (e.g. the guard set) as one byte string: a sequence of
/// `[len u32 LE][records::encode_chunk bytes]` frames.
pub fn encode_sample_set(samples: &[StagedSample]) -> Vec<u8> {
    let mut out = Vec::new();
    let per_chunk =
        swimlane_core::records::samples_per_chunk(samples.first().map_or(1, |s| s.frames.len()));
    for c in samples.chunks(per_chunk) {
        let b = swimlane_core::records::encode_chunk(c);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    out
}

/// Decode [`encode_sample_set`] output; any other bytes give an error.
pub fn decode_sample_set(mut bytes: &[u8]) -> Res<Vec<StagedSample>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 4 {
            return Err(corrupt("sample set", "truncated length"));
        }
        let n = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        let body = bytes
            .get(4..4 + n)
            .ok_or_else(|| corrupt("sample set", "truncated chunk"))?;
        out.extend(decode_chunk(body).map_err(|e| corrupt("sample set", e))?);
        bytes = &bytes[4 + n..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_store::embedded::EmbeddedBackend;

    fn setup() -> (Db, Repo) {
        (
            Db::new(EmbeddedBackend::open_temp().unwrap()),
            Repo::new(Keys::new("t")),
        )
    }

    fn record(staged_at_ms: u64, status: BatchStatus) -> BatchRecord {
        BatchRecord {
            v: 1,
            digest: "d".into(),
            samples: 1,
            heldout: 0,
            chunks: 1,
            staged_at_ms,
            status,
            chunk_samples: 0,
        }
    }

    #[test]
    fn a_kept_blob_is_read_again_only_when_the_stored_one_changes() {
        let (db, repo) = setup();
        let kept = KeptBlob::default();
        let read = |kept: &KeptBlob| {
            db.transact(|tx| repo.blob_kept(tx, "w", kept, Ok))
                .unwrap()
                .map(|(_, b)| b)
        };
        assert_eq!(read(&kept), None);
        db.transact(|tx| repo.put_blob(tx, "w", b"first")).unwrap();
        let a = read(&kept).unwrap();
        assert_eq!(a.as_slice(), b"first");
        // The same digest stored: the kept bytes, not a new read.
        assert!(Arc::ptr_eq(&a, &read(&kept).unwrap()));
        db.transact(|tx| repo.put_blob(tx, "w", b"second")).unwrap();
        let b = read(&kept).unwrap();
        assert_eq!(b.as_slice(), b"second");
        assert!(Arc::ptr_eq(&b, &read(&kept).unwrap()));
        // Another blob id through the same keeper: its own bytes, whatever is kept.
        db.transact(|tx| repo.put_blob(tx, "v", b"other")).unwrap();
        let c = db
            .transact(|tx| repo.blob_kept(tx, "v", &kept, Ok))
            .unwrap()
            .unwrap()
            .1;
        assert_eq!(c.as_slice(), b"other");
        db.transact(|tx| blob::delete_in(tx, &repo.keys.blob("w")))
            .unwrap();
        assert_eq!(read(&kept), None);
    }

    #[test]
    fn stored_records_of_another_version_or_shape_are_corrupt() {
        let run = br#"{"v":1,"run_id":"r","parent_version":null,"batches":["b"],"train_samples":3,"model_blob":"m","model_sha256":"s","model_bytes":9,"created_at_ms":1,"train_seconds":0.5,"verdict":null,"published_version":null}"#;
        let r: RunRecord = decode_record(run).unwrap();
        assert_eq!((r.run_id.as_str(), r.train_samples), ("r", 3));
        let v2 = String::from_utf8_lossy(run).replacen("\"v\":1", "\"v\":2", 1);
        let e = decode_record::<RunRecord>(v2.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("run record") && e.to_string().contains("version 2"),
            "{e}"
        );
        for bad in [&b""[..], b"\xff", b"[]", b"{\"v\":1}", br#"{"v":-1}"#] {
            assert!(matches!(
                decode_record::<UserState>(bad),
                Err(KvError::Corrupt { .. })
            ));
            assert!(decode_record::<ModelVersionRecord>(bad).is_err());
        }
        let (db, repo) = setup();
        db.transact(|tx| tx.set(&repo.keys.user_state("al"), br#"{"v":7}"#))
            .unwrap();
        let e = db.transact(|tx| repo.user_state(tx, "al")).unwrap_err();
        assert!(e.to_string().contains("user state"), "{e}");
    }

    #[test]
    fn a_stored_file_is_its_prefix_then_its_own_blob_with_its_splices_put_back() {
        use swimlane_core::records::{Splice, StoredFile};
        let (db, repo) = setup();
        db.transact(|tx| {
            repo.put_blob(tx, "pre", b"PRE-")?;
            repo.put_blob(tx, "own", b"a_c_e")?;
            repo.put_blob(tx, "w", b"0123456789")?;
            Ok(())
        })
        .unwrap();
        let splice = |at: u64, offset: u64, len: u64| Splice {
            at,
            blob: "w".into(),
            offset,
            len,
        };
        let file = |prefix: bool, splices: Vec<Splice>| StoredFile {
            blob: "own".into(),
            sha256: String::new(),
            size_bytes: 0,
            prefix_blob: prefix.then(|| "pre".into()),
            splices,
        };
        let read = |f: &StoredFile| db.transact(|tx| repo.stored_file(tx, f));
        assert_eq!(read(&file(false, vec![])).unwrap().unwrap(), b"a_c_e");
        assert_eq!(read(&file(true, vec![])).unwrap().unwrap(), b"PRE-a_c_e");
        // "a" + "12" + "_c" + "789" + "_e": each `at` counts in the whole part.
        let spliced = file(true, vec![splice(1, 1, 2), splice(5, 7, 3)]);
        assert_eq!(read(&spliced).unwrap().unwrap(), b"PRE-a12_c789_e");
        // At the very start and the very end, and the same bytes twice.
        let ends = file(
            false,
            vec![splice(0, 0, 1), splice(6, 0, 1), splice(7, 9, 1)],
        );
        assert_eq!(read(&ends).unwrap().unwrap(), b"0a_c_e09");
        // A source that is gone: the file is gone (as when its own blob is).
        let gone = Splice {
            blob: "nothing".into(),
            ..splice(1, 0, 1)
        };
        assert_eq!(read(&file(false, vec![gone])).unwrap(), None);
        // Damaged records: an error that names the file, never a panic.
        for bad in [
            vec![splice(3, 0, 2), splice(4, 0, 1)], // overlapping
            vec![splice(9, 0, 1)],                  // past the end of its own blob
            vec![splice(1, 8, 3)],                  // past the end of the source
            vec![splice(1, u64::MAX, 2)],           // offset + len overflows
        ] {
            let e = read(&file(false, bad.clone())).unwrap_err();
            assert!(
                matches!(&e, KvError::Corrupt { what, .. } if what == "stored file own"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn settling_a_batch_takes_it_out_of_the_pending_index() {
        let (db, repo) = setup();
        let oldest = |db: &Db| db.transact(|tx| repo.oldest_pending_batch(tx)).unwrap();
        assert_eq!(oldest(&db), None);
        // Ingest stages two batches (it writes the index entries itself).
        db.transact(|tx| {
            for (at, u, b) in [(100, "bo", "b1"), (50, "al", "a1")] {
                tx.set(&repo.keys.pending_batch(at, u, b), b"")?;
                repo.put_batch(tx, u, b, &record(at, BatchStatus::Staged))?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(oldest(&db), Some((50, "al".into(), "a1".into())));
        // Training it keeps it pending; its verdict settles it.
        let validating = BatchStatus::Validating { run_id: "r".into() };
        db.transact(|tx| repo.put_batch(tx, "al", "a1", &record(50, validating.clone())))
            .unwrap();
        assert_eq!(oldest(&db), Some((50, "al".into(), "a1".into())));
        let deferred = BatchStatus::Deferred {
            reason: "few".into(),
        };
        db.transact(|tx| repo.put_batch(tx, "al", "a1", &record(50, deferred.clone())))
            .unwrap();
        assert_eq!(oldest(&db), Some((100, "bo".into(), "b1".into())));
        // A deferred batch trained again with a newer one is not pending again.
        db.transact(|tx| repo.put_batch(tx, "al", "a1", &record(50, validating.clone())))
            .unwrap();
        assert_eq!(oldest(&db), Some((100, "bo".into(), "b1".into())));
        let published = BatchStatus::Published {
            run_id: "r".into(),
            version: 1,
        };
        db.transact(|tx| repo.put_batch(tx, "bo", "b1", &record(100, published.clone())))
            .unwrap();
        assert_eq!(oldest(&db), None);
    }

    #[test]
    fn head_accuracy_counts_each_user_once_in_the_bucket_of_their_head() {
        let (db, repo) = setup();
        let hist = |db: &Db| db.transact(|tx| repo.head_accuracy_histogram(tx)).unwrap();
        let set = |db: &Db, user: &str, acc: Option<f32>| {
            db.transact(|tx| {
                let mut s = repo.user_state(tx, user)?;
                s.head_heldout_accuracy = acc;
                repo.put_user_state(tx, user, &s)
            })
            .unwrap()
        };
        let (counts, sum) = hist(&db);
        assert_eq!(counts, vec![0; stats::ACCURACY_BUCKETS.len() + 1]);
        assert_eq!(sum, 0.0);
        set(&db, "al", Some(0.82)); // bucket 4 (<= 0.85)
        set(&db, "bo", Some(0.82));
        set(&db, "bo", Some(0.96)); // moves to bucket 8 (<= 0.975)
                                    // Writes that leave the accuracy alone (the trainer's, the validator's) keep
                                    // the count; so does writing the same state twice in one transaction.
        db.transact(|tx| {
            let mut s = repo.user_state(tx, "al")?;
            s.inflight_run = Some("r".into());
            repo.put_user_state(tx, "al", &s)?;
            repo.put_user_state(tx, "al", &s)
        })
        .unwrap();
        let (counts, sum) = hist(&db);
        assert_eq!(counts.iter().sum::<u64>(), 2);
        assert_eq!(counts[4], 1);
        assert_eq!(counts[8], 1);
        assert!((sum - 1.78).abs() < 1e-6, "{sum}");
        // A state from before these counters (not counted) is counted from its next
        // write on, and never subtracted.
        db.transact(|tx| {
            let s = UserState {
                v: 1,
                head: Some(3),
                head_heldout_accuracy: Some(0.7),
                ..Default::default()
            };
            tx.set(
                &repo.keys.user_state("cy"),
                &serde_json::to_vec(&s).unwrap(),
            )
        })
        .unwrap();
        set(&db, "cy", Some(0.99));
        let (counts, _) = hist(&db);
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(counts[9], 1);
        assert_eq!(counts[2], 0);
    }
}

/// A version record with placeholder figures, for this crate's tests.
#[cfg(test)]
pub(crate) fn test_version(
    version: u64,
    run_id: &str,
    parent_version: Option<u64>,
    batches: Vec<String>,
) -> swimlane_core::records::ModelVersionRecord {
    swimlane_core::records::ModelVersionRecord {
        v: 1,
        version,
        run_id: run_id.into(),
        parent_version,
        batches,
        model_blob: "m".into(),
        sha256: "s".into(),
        size_bytes: 1,
        heldout_accuracy: 0.9,
        parent_heldout_accuracy: 0.8,
        guard_accuracy: 0.9,
        published_at_ms: 0,
        onnx: None,
        standing: Default::default(),
        probation: Default::default(),
    }
}

#[cfg(test)]
mod live_standing_tests {
    use super::*;
    use swimlane_store::embedded::EmbeddedBackend;

    fn counts(windows: u64, right: u64) -> LiveCount {
        LiveCount { windows, right }
    }

    #[test]
    fn the_fleet_counts_each_user_once_in_the_live_bucket_of_the_model_they_run() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let repo = Repo::new(Keys::new("t"));
        let fleet = |tx: &mut Transaction<'_>| repo.live_accuracy_histogram(tx);
        // The base model, 27 of 30 right: counted at 0.9, nothing fell.
        db.transact(|tx| repo.add_live(tx, "u", &BTreeMap::from([(0, counts(30, 27))])))
            .unwrap();
        let (h, sum, fell) = db.transact(fleet).unwrap();
        assert_eq!(
            (
                h[stats::accuracy_bucket(0.9) as usize],
                h.iter().sum::<u64>()
            ),
            (1, 1)
        );
        assert!((sum - 0.9).abs() < 1e-6 && fell == 0);
        // Version 1 is published (parent: the base) and gets half of 30 right: the
        // user moves to the 0.5 bucket and counts as fallen.
        db.transact(|tx| {
            let v = crate::test_version(1, "r", None, vec![]);
            repo.put_model_version(tx, "u", &v)?;
            let mut s = repo.user_state(tx, "u")?;
            s.head = Some(1);
            repo.put_user_state(tx, "u", &s)?;
            repo.refresh_live_standing(tx, "u", false)?;
            // Fewer than MIN_LIVE_WINDOWS: not counted yet.
            repo.add_live(tx, "u", &BTreeMap::from([(1, counts(10, 5))]))
        })
        .unwrap();
        assert_eq!(db.transact(fleet).unwrap().0.iter().sum::<u64>(), 0);
        db.transact(|tx| repo.add_live(tx, "u", &BTreeMap::from([(1, counts(20, 10))])))
            .unwrap();
        let (h, sum, fell) = db.transact(fleet).unwrap();
        assert_eq!(
            (
                h[stats::accuracy_bucket(0.5) as usize],
                h.iter().sum::<u64>()
            ),
            (1, 1)
        );
        assert!((sum - 0.5).abs() < 1e-6);
        assert_eq!(fell, 1);
        // Erased: out of every count.
        db.transact(|tx| repo.refresh_live_standing(tx, "u", true))
            .unwrap();
        let (h, sum, fell) = db.transact(fleet).unwrap();
        assert_eq!((h.iter().sum::<u64>(), fell), (0, 0));
        assert!(sum.abs() < 1e-9);
    }
}
