//! swimlane-state: typed reads and writes of swimlane's stored records, inside the
//! caller's transaction. The key layout is `swimlane_core::keys`; the record types are
//! `swimlane_core::records`. Every function here reads or writes one user's records
//! only, under that user's keys.
//!
//! Guarantee: nothing here opens a transaction of its own except the `*_db` helpers,
//! so stages compose these calls with their position commit in one transaction.
pub mod tokens;

use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use swimlane_core::keys::Keys;
use swimlane_core::records::{
    decode_chunk, BatchRecord, ModelVersionRecord, RunRecord, StagedSample, UserState,
};
use swimlane_store::{blob, Db, KvError, RangeOption, Transaction};

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

fn get_json<T: DeserializeOwned>(
    tx: &mut Transaction<'_>,
    key: &[u8],
    what: &str,
) -> Result<Option<T>, KvError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| corrupt(what, e)),
    }
}

fn put_json<T: Serialize>(tx: &mut Transaction<'_>, key: &[u8], v: &T) -> Result<(), KvError> {
    tx.set(key, &serde_json::to_vec(v).expect("records serialize"))
}

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
    ) -> Result<Option<BatchRecord>, KvError> {
        match tx.get(&self.keys.batch(user, batch))? {
            None => Ok(None),
            Some(b) => BatchRecord::decode(&b)
                .map(Some)
                .map_err(|e| corrupt("batch record", e)),
        }
    }

    pub fn put_batch(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        batch: &str,
        r: &BatchRecord,
    ) -> Result<(), KvError> {
        tx.set(&self.keys.batch(user, batch), &r.encode())
    }

    /// Every batch record of `user`, in batch-id order.
    pub fn batches(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
    ) -> Result<Vec<(String, BatchRecord)>, KvError> {
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

    /// The staged samples of one batch, in upload order.
    pub fn samples(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        batch: &str,
    ) -> Result<Vec<StagedSample>, KvError> {
        let rows = tx.get_range(&RangeOption::prefix(
            &self.keys.samples_of_batch(user, batch),
        ))?;
        let mut out = Vec::new();
        for (_, v) in rows {
            out.extend(decode_chunk(&v).map_err(|e| corrupt("sample chunk", e))?);
        }
        Ok(out)
    }

    pub fn user_state(&self, tx: &mut Transaction<'_>, user: &str) -> Result<UserState, KvError> {
        Ok(
            get_json(tx, &self.keys.user_state(user), "user state")?.unwrap_or(UserState {
                v: 1,
                ..Default::default()
            }),
        )
    }

    pub fn put_user_state(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        s: &UserState,
    ) -> Result<(), KvError> {
        put_json(tx, &self.keys.user_state(user), s)
    }

    pub fn run(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        run_id: &str,
    ) -> Result<Option<RunRecord>, KvError> {
        get_json(tx, &self.keys.run(user, run_id), "run record")
    }

    pub fn put_run(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        r: &RunRecord,
    ) -> Result<(), KvError> {
        put_json(tx, &self.keys.run(user, &r.run_id), r)
    }

    pub fn model_version(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        version: u64,
    ) -> Result<Option<ModelVersionRecord>, KvError> {
        get_json(tx, &self.keys.model_version(user, version), "model version")
    }

    pub fn put_model_version(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        r: &ModelVersionRecord,
    ) -> Result<(), KvError> {
        put_json(tx, &self.keys.model_version(user, r.version), r)
    }

    /// Every published version of `user`, oldest first.
    pub fn model_versions(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
    ) -> Result<Vec<ModelVersionRecord>, KvError> {
        let rows = tx.get_range(&RangeOption::prefix(&self.keys.model_versions(user)))?;
        rows.into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| corrupt("model version", e)))
            .collect()
    }

    /// Store a blob (weights, sample sets) inside `tx`; it must fit one transaction.
    pub fn put_blob(
        &self,
        tx: &mut Transaction<'_>,
        blob_id: &str,
        data: &[u8],
    ) -> Result<(), KvError> {
        blob::write_in(tx, &self.keys.blob(blob_id), data).map(|_| ())
    }

    /// Read a blob, checking its length and hash; `None` when absent.
    pub fn blob(
        &self,
        tx: &mut Transaction<'_>,
        blob_id: &str,
    ) -> Result<Option<Vec<u8>>, KvError> {
        blob::read_in(tx, &self.keys.blob(blob_id))
    }

    /// Read a blob of any size (several transactions for large ones).
    pub fn blob_db(&self, db: &Db, blob_id: &str) -> Result<Option<Vec<u8>>, KvError> {
        blob::read(db, &self.keys.blob(blob_id))
    }

    /// Store a blob of any size (several transactions when it does not fit one).
    pub fn put_blob_db(&self, db: &Db, blob_id: &str, data: &[u8]) -> Result<(), KvError> {
        blob::write(db, &self.keys.blob(blob_id), data).map(|_| ())
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
    for c in samples.chunks(swimlane_core::records::SAMPLES_PER_CHUNK) {
        let b = swimlane_core::records::encode_chunk(c);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    out
}

/// Decode [`encode_sample_set`] output; any other bytes give an error.
pub fn decode_sample_set(mut bytes: &[u8]) -> Result<Vec<StagedSample>, KvError> {
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

/// End a user's in-flight run `run_id` and, if batches were staged meanwhile, re-emit
/// a trigger for them. Used by the validator (rejection) and the publisher.
pub fn end_run_and_retrigger(
    repo: &Repo,
    emitter: &dyn swimlane_bus::Emitter,
    tx: &mut Transaction<'_>,
    user: &swimlane_core::UserId,
    run_id: &str,
    state: &mut UserState,
) -> Result<(), KvError> {
    if state.inflight_run.as_deref() == Some(run_id) {
        state.inflight_run = None;
    }
    let staged: Vec<(String, u32)> = repo
        .batches(tx, user.as_str())?
        .into_iter()
        .filter(|(_, r)| r.status == swimlane_core::records::BatchStatus::Staged)
        .map(|(id, r)| (id, r.samples))
        .collect();
    if let Some((id, samples)) = staged.last() {
        emitter.emit(
            tx,
            &swimlane_core::Event::BatchStaged {
                user: user.clone(),
                batch_id: swimlane_core::BatchId::new(id.clone()).expect("stored ids are valid"),
                samples: *samples,
            },
        )?;
    }
    Ok(())
}
