//! The publishing stage: `CandidateAccepted` → the user's next version.
//!
//! Invariants:
//! - Versions of a user are 1, 2, 3, … with no gap and no repeat: the next version is
//!   `last_version + 1`, assigned in the same transaction that records the version,
//!   moves the head, marks the run published and commits the position; a duplicate
//!   event finds `published_version` set and does nothing.
//! - The version record keeps the lineage: parent version, batches, held-out metrics.
//! - Every version is published with its ONNX file (`swimlane_model::onnx`, version and
//!   lineage in its metadata), exported from the very weights the validator accepted
//!   and checked against them, stored as a blob beside the weights. The export is done
//!   before the publishing transaction for the version that transaction is expected to
//!   assign (its blob id names the run and the version, so a re-run writes the same
//!   bytes); if the transaction assigns another version, it exports again inside (a
//!   few milliseconds, one ~300 kB blob), so the file always names its own version.
//! - A device's file with the base model in it is stored in two parts
//!   (`onnx::DeviceFile`): the base model's part once for every file that has the same
//!   bytes (a blob named by their SHA-256, written before any file that needs it and
//!   never erased: it holds no user's data), the rest in the version's own blob; the
//!   record's digest and size are the whole file's (`Repo::stored_file` reads it whole).
use std::sync::Arc;

use swimlane_bus::stage::{Applied, Decoded, Effect, Stage};
use swimlane_bus::Record;
use swimlane_core::records::{ModelVersionRecord, RunRecord, Splice, Standing, StoredFile};
use swimlane_core::{policy, topics, Event, UserId};
use swimlane_model::onnx::{self, Lineage, ModelRef};
use swimlane_model::MicroModel;
use swimlane_state::{lifecycle, Kept, Repo, Res, BASE_MODEL_BLOB};
use swimlane_store::{KvError, Transaction};

use swimlane_runtime::wiring::StageEnv;

use crate::metrics::PublisherMetrics;

pub(crate) struct Publisher {
    pub env: StageEnv<PublisherMetrics>,
    pub target_accuracy: f32,
    /// The deployment's model spec: weights of another spec are never published.
    pub spec: Arc<swimlane_core::ModelSpec>,
    /// The base model of the ONNX files' fallback, with the SHA-256 of its stored
    /// weights: read again only when the stored base changes (its blob header, read in
    /// every `prepare`, records another digest).
    pub base: Kept<MicroModel>,
    /// The device files' shared prefix last stored (`onnx::DeviceFile`).
    pub prefix: Option<Arc<Prefix>>,
}

/// A prefix shared by device files (the base model's part), as stored: its blob id,
/// named by its SHA-256 so that every file with these bytes shares the one blob, and
/// the SHA-256 state after it, from which a whole file's digest is finished.
pub(crate) struct Prefix {
    bytes: Vec<u8>,
    blob: String,
    hasher: sha2::Sha256,
}

impl Prefix {
    /// `bytes`' entry: `cached` when it holds the same bytes.
    fn of(bytes: &[u8], cached: Option<&Arc<Prefix>>) -> Arc<Prefix> {
        use sha2::Digest;
        if let Some(c) = cached.filter(|c| c.bytes == bytes) {
            return c.clone();
        }
        let mut hasher = sha2::Sha256::new();
        hasher.update(bytes);
        let blob = format!("onnx-prefix-{}", hex::encode(hasher.clone().finalize()));
        Arc::new(Prefix {
            bytes: bytes.to_vec(),
            blob,
            hasher,
        })
    }

    /// Store the prefix's blob inside `tx` unless it is there (it is never deleted: it
    /// holds no user's data, and every file made with this base model shares it).
    fn ensure(&self, repo: &Repo, tx: &mut Transaction<'_>) -> Res<()> {
        if repo.blob_sha256(tx, &self.blob)?.is_none() {
            repo.put_blob(tx, &self.blob, &self.bytes)?;
        }
        Ok(())
    }

    /// The digest of the file made of this prefix and `rest`.
    fn sha256_with(&self, rest: &[u8]) -> String {
        use sha2::Digest;
        let mut h = self.hasher.clone();
        h.update(rest);
        hex::encode(h.finalize())
    }
}

/// Store `file` as `blob` inside `tx`: its prefix as a shared blob (`prefix`, the
/// entry for its bytes) and its own part as `blob` ([`OwnPart`]).
fn store_in(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    blob: String,
    file: &onnx::DeviceFile,
    own: OwnPart,
    prefix: Option<&Prefix>,
) -> Res<StoredFile> {
    if let Some(p) = prefix {
        p.ensure(repo, tx)?;
    }
    repo.put_blob(tx, &blob, &own.bytes)?;
    Ok(stored(blob, file, own.splices, prefix))
}

/// A device file's tensors of at least this many bytes that are the candidate's weights
/// byte for byte are not stored again (`StoredFile::splices`): the first two weight
/// matrices, all but about 3 kB of the personal model's part.
const SPLICE_MIN_BYTES: usize = 4096;

/// What the publisher stores of a device file's own part: `rest` without the bytes the
/// candidate's weights blob holds already, and the splices that put them back.
struct OwnPart {
    bytes: Vec<u8>,
    splices: Vec<Splice>,
}

impl OwnPart {
    /// `file`'s own part, sharing what it can with `weights`, the bytes of the stored
    /// blob `model_blob`.
    fn of(file: &onnx::DeviceFile, weights: &[u8], model_blob: &str) -> OwnPart {
        let shared = file.rest_shared_with(weights, SPLICE_MIN_BYTES);
        OwnPart {
            bytes: file.rest_without(&shared),
            splices: shared
                .iter()
                .map(|s| Splice {
                    at: s.at as u64,
                    blob: model_blob.to_string(),
                    offset: s.offset as u64,
                    len: s.len as u64,
                })
                .collect(),
        }
    }
}

/// The installed base model and the SHA-256 (hex) of its stored weights.
pub(crate) type BaseModel = (String, Arc<MicroModel>);

/// The installed base model, from `kept` while the stored one has the same digest.
fn base_model(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    spec: &swimlane_core::ModelSpec,
    kept: &Kept<MicroModel>,
) -> Result<BaseModel, KvError> {
    repo.blob_kept(tx, BASE_MODEL_BLOB, kept, |bytes| {
        MicroModel::load_for(&bytes, spec).map_err(|e| KvError::Corrupt {
            what: BASE_MODEL_BLOB.into(),
            reason: e.to_string(),
        })
    })?
    .ok_or_else(|| KvError::Corrupt {
        what: BASE_MODEL_BLOB.into(),
        reason: "the base model is not installed (run `swimlane admin init`)".into(),
    })
}

/// Whether `run`'s file has the base-model fallback (`export_onnx`).
fn falls_back(run: &RunRecord) -> bool {
    run.familiarity.as_ref().is_some_and(|f| f.falls_back())
}

/// The base model `run`'s file needs: `None` for a file without the fallback.
fn base_for(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    spec: &swimlane_core::ModelSpec,
    run: &RunRecord,
    kept: &Kept<MicroModel>,
) -> Result<Option<BaseModel>, KvError> {
    if falls_back(run) {
        base_model(repo, tx, spec, kept).map(Some)
    } else {
        Ok(None)
    }
}

/// Blob id of the ONNX file of `user`'s run `run_id` published as `version`.
fn onnx_blob_id(user: &str, run_id: &str, version: u64) -> String {
    format!("onnx-{user}-{run_id}-v{version}")
}

/// The ONNX file of `run`'s candidate published as `version`, checked against the
/// candidate (`swimlane_model::onnx::export_device_checked`): with the base-model
/// fallback for the windows the candidate does not know when the run recorded its
/// familiarity (`swimlane_core::familiar`).
fn export_onnx(
    spec: &swimlane_core::ModelSpec,
    run: &RunRecord,
    (weights, weights_sha256): (&[u8], &str),
    base: Option<&BaseModel>,
    version: u64,
) -> Result<onnx::DeviceFile, KvError> {
    let model = MicroModel::load_for(weights, spec).map_err(|e| KvError::Corrupt {
        what: format!("candidate weights {}", run.model_blob),
        reason: e.to_string(),
    })?;
    let lineage = Lineage {
        model_version: ModelRef::Version(version),
        parent_version: Some(run.parent_version.map_or(ModelRef::Base, ModelRef::Version)),
        training_run: Some(run.run_id.clone()),
    };
    // The export is a function of the weights: one that fails fails every time, so it is
    // an error retrying cannot fix (the runner gives up on the record after its bound,
    // and `abandon` ends the run). The weights' digest is the one the blob read checked
    // them against.
    let fallback = run
        .familiarity
        .as_ref()
        .zip(base)
        .map(|(familiarity, base)| onnx::Fallback {
            base: &base.1,
            base_weights_sha256: &base.0,
            familiarity,
        });
    onnx::export_device_parts_checked(&model, &lineage, weights_sha256, fallback.as_ref()).map_err(
        |e| KvError::Corrupt {
            what: format!("ONNX export of run {}", run.run_id),
            reason: e.to_string(),
        },
    )
}

/// The ONNX file stored as `blob` with `splices` (after `prefix`'s blob when it has
/// one), and its digest.
fn stored(
    blob: String,
    file: &onnx::DeviceFile,
    splices: Vec<Splice>,
    prefix: Option<&Prefix>,
) -> StoredFile {
    use sha2::Digest;
    StoredFile {
        blob,
        sha256: prefix.map_or_else(
            || hex::encode(sha2::Sha256::digest(&file.rest)),
            |p| p.sha256_with(&file.rest),
        ),
        size_bytes: file.len() as u64,
        prefix_blob: prefix.map(|p| p.blob.clone()),
        splices,
    }
}

/// Read `run`'s candidate weights inside `tx`, with the SHA-256 the read checked them
/// against.
fn weights(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    run: &RunRecord,
) -> Result<(Vec<u8>, String), KvError> {
    repo.blob_with_sha256(tx, &run.model_blob)?
        .ok_or_else(|| KvError::Corrupt {
            what: format!("candidate weights {}", run.model_blob),
            reason: format!("missing for accepted run {}", run.run_id),
        })
}

/// An accepted run, and its ONNX file if one was made beforehand: (the version the
/// publishing transaction was expected to assign, the file's record, the bytes of its
/// own part, which that transaction writes).
pub(crate) struct Accepted {
    user: UserId,
    run_id: String,
    onnx: Option<(u64, StoredFile, Vec<u8>)>,
}

/// A version published.
pub(crate) struct Published {
    user: String,
    version: u64,
    heldout_accuracy: f32,
    /// When the version's batches were staged (for upload-to-publish latency).
    staged_at_ms: Vec<u64>,
    published_at_ms: u64,
    /// Whether its ONNX file has the base-model fallback.
    fallback: bool,
}

impl Stage for Publisher {
    /// A user's run with an accepting verdict.
    type Work = (UserId, String);
    type Prepared = Accepted;
    type Outcome = Published;

    fn decode(&self, r: &Record) -> Decoded<Self::Work> {
        Decoded::event(r, topics::VERDICTS, |e| match e {
            Event::CandidateAccepted { user, run_id } => Some(Decoded::Work((user, run_id))),
            Event::CandidateRejected { .. } => Some(Decoded::Ignore),
            _ => None,
        })
    }

    /// The ONNX file, made outside the publishing transaction for the version it is
    /// expected to assign.
    fn prepare(&mut self, (user, run_id): &(UserId, String)) -> Result<Option<Accepted>, KvError> {
        let (repo, u) = (&self.env.repo, user.as_str());
        let (spec, kept) = (&self.spec, &self.base);
        let found = self.env.db.transact(|tx| {
            let Some(run) = repo.run(tx, u, run_id)? else {
                return Ok(None);
            };
            if run.published_version.is_some() || !run.verdict.as_ref().is_some_and(|v| v.accepted)
            {
                return Ok(None);
            }
            let version = repo.user_state(tx, u)?.last_version + 1;
            let w = weights(repo, tx, &run)?;
            let base = base_for(repo, tx, spec, &run, kept)?;
            Ok(Some((run, version, w, base)))
        })?;
        let onnx = match found {
            None => None,
            Some((run, version, (w, sha256), base)) => {
                let file = export_onnx(&self.spec, &run, (&w, &sha256), base.as_ref(), version)?;
                let prefix = file
                    .prefix
                    .as_ref()
                    .map(|p| Prefix::of(p, self.prefix.as_ref()));
                if let Some(p) = &prefix {
                    // New bytes for this process: stored once, in a transaction of their own.
                    if !self.prefix.as_ref().is_some_and(|c| Arc::ptr_eq(c, p)) {
                        self.env.db.transact(|tx| p.ensure(repo, tx))?;
                        self.prefix = Some(p.clone());
                    }
                }
                let blob = onnx_blob_id(u, run_id, version);
                let own = OwnPart::of(&file, &w, &run.model_blob);
                let record = stored(blob, &file, own.splices, prefix.as_deref());
                Some((version, record, own.bytes))
            }
        };
        Ok(Some(Accepted {
            user: user.clone(),
            run_id: run_id.clone(),
            onnx,
        }))
    }

    fn apply(&self, tx: &mut Transaction<'_>, a: &Accepted, now_ms: u64) -> Effect<Published> {
        let (repo, u, run_id) = (&self.env.repo, a.user.as_str(), &a.run_id);
        // An erasure began: nothing more of this user is written.
        if swimlane_state::forget::is_forgotten(repo, tx, u)? {
            return Ok(Applied::Stale);
        }
        let Some(run) = repo.run(tx, u, run_id)? else {
            return Ok(Applied::Dead("run record missing".into()));
        };
        let Some(verdict) = run.verdict.clone().filter(|v| v.accepted) else {
            return Ok(Applied::Dead("run has no accepting verdict".into()));
        };
        if run.published_version.is_some() {
            return Ok(Applied::Stale); // duplicate delivery
        }
        let state = repo.user_state(tx, u)?;
        let version = state.last_version + 1;
        let fallback = falls_back(&run);
        let onnx_file = match &a.onnx {
            // The own part goes in with the version that names it: a few kB (the
            // weight matrices are the candidate's blob's, `OwnPart`), no transaction
            // of its own, and nothing written for a run that turns out stale.
            Some((v, file, own)) if *v == version => {
                repo.put_blob(tx, &file.blob, own)?;
                file.clone()
            }
            _ => {
                // Not made beforehand for this version: make it here.
                let (w, sha256) = weights(repo, tx, &run)?;
                let base = base_for(repo, tx, &self.spec, &run, &self.base)?;
                let file = export_onnx(&self.spec, &run, (&w, &sha256), base.as_ref(), version)?;
                let prefix = file
                    .prefix
                    .as_ref()
                    .map(|p| Prefix::of(p, self.prefix.as_ref()));
                let blob = onnx_blob_id(u, run_id, version);
                let own = OwnPart::of(&file, &w, &run.model_blob);
                store_in(repo, tx, blob, &file, own, prefix.as_deref())?
            }
        };
        let record = ModelVersionRecord {
            v: 1,
            version,
            run_id: run_id.clone(),
            parent_version: run.parent_version,
            batches: run.batches.clone(),
            model_blob: run.model_blob.clone(),
            sha256: run.model_sha256.clone(),
            size_bytes: run.model_bytes,
            heldout_accuracy: verdict.candidate_heldout_accuracy,
            parent_heldout_accuracy: verdict.current_heldout_accuracy,
            guard_accuracy: verdict.candidate_guard_accuracy,
            published_at_ms: now_ms,
            onnx: Some(onnx_file),
            standing: Standing::Probation,
            probation: Default::default(),
        };
        let converged = policy::converged(verdict.candidate_heldout_accuracy, self.target_accuracy);
        let staged_at_ms = lifecycle::publish(
            repo,
            self.env.emitter.as_ref(),
            tx,
            &a.user,
            run,
            &record,
            state,
            converged,
        )?;
        Ok(Applied::Done(Published {
            user: u.to_string(),
            version,
            heldout_accuracy: verdict.candidate_heldout_accuracy,
            staged_at_ms,
            published_at_ms: now_ms,
            fallback,
        }))
    }

    fn committed(&mut self, published: Vec<Published>) {
        for p in &published {
            tracing::info!(user_id = %p.user, version = p.version, heldout_accuracy = p.heldout_accuracy, "model published");
            self.env
                .metrics
                .heldout_accuracy
                .observe(p.heldout_accuracy as f64);
            for t in &p.staged_at_ms {
                self.env
                    .metrics
                    .upload_to_publish_seconds
                    .observe(p.published_at_ms.saturating_sub(*t) as f64 / 1000.0);
            }
        }
        self.env.metrics.publishes.inc_by(published.len() as u64);
        let fallback = published.iter().filter(|p| p.fallback).count();
        self.env.metrics.fallback_files.inc_by(fallback as u64);
    }

    /// The runner gave up on an accepted run (its weights are missing, or its export
    /// fails): its batches go back to `staged` and the run ends, so the user trains
    /// again rather than waiting on a version that can never be published.
    fn abandon(&self, tx: &mut Transaction<'_>, (user, run_id): &(UserId, String)) -> Res<()> {
        lifecycle::abandon_run(&self.env.repo, self.env.emitter.as_ref(), tx, user, run_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_bus::embedded::EmbeddedBus;
    use swimlane_bus::stage::{Runner, StageHandler};
    use swimlane_bus::Emitter;
    use swimlane_bus::{positions, Delivery};
    use swimlane_core::keys::Keys;
    use swimlane_core::records::Verdict;
    use swimlane_core::StrokeClass;
    use swimlane_model::onnx::OnnxModel;
    use swimlane_model::Sample;
    use swimlane_state::sha256_hex;
    use swimlane_store::embedded::EmbeddedBackend;
    use swimlane_store::Db;

    fn candidate(seed: u64) -> MicroModel {
        let spec = swimlane_core::ModelSpec::synthetic_pose();
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let samples: Vec<Sample> = swimlane_model::synth::Swimmer::new(seed)
            .windows(64, &mut rng)
            .into_iter()
            .map(|s| Sample {
                frames: s.frames,
                label: StrokeClass::Turn.into(),
            })
            .collect();
        MicroModel::init(&spec, &samples, seed).unwrap()
    }

    /// Two accepted runs of one user in one delivery. The stage never sees this in
    /// operation (one run in flight per user), but it is what makes the publishing
    /// transaction assign a version other than the one the ONNX file was made for: the
    /// second run's file must be made again, inside, for version 2.
    #[test]
    fn every_version_gets_an_onnx_file_naming_its_own_version() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let keys = Keys::new("t");
        let repo = Repo::new(keys.clone());
        let user = UserId::new("ana").unwrap();
        let runs = [("r-a", candidate(1)), ("r-b", candidate(2))];
        // The installed base model, and what r-b's candidate trained on: r-b's file has
        // the base-model fallback, r-a's (a record from before familiarity was kept)
        // has none.
        let base = candidate(3);
        let base_bytes = base.to_bytes();
        db.transact(|tx| repo.put_blob(tx, BASE_MODEL_BLOB, &base_bytes))
            .unwrap();
        let trained: Vec<Sample> = {
            use rand::SeedableRng;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
            swimlane_model::synth::Swimmer::new(2).windows(64, &mut rng)
        };
        let (mean, std) = runs[1].1.normalisation();
        // Trained on the first two classes; the population has every class.
        let familiarity = swimlane_core::familiar::Familiarity::of(
            trained
                .iter()
                .filter(|s| s.label.0 < 2)
                .map(|s| (s.frames.as_slice(), s.label)),
            trained.iter().map(|s| (s.frames.as_slice(), s.label)),
            mean,
            std,
            swimlane_core::familiar::DEFAULT_SCALE,
        )
        .unwrap();
        for (run_id, m) in &runs {
            let bytes = m.to_bytes();
            let blob = format!("cand-{run_id}");
            db.transact(|tx| {
                repo.put_blob(tx, &blob, &bytes)?;
                repo.put_run(
                    tx,
                    "ana",
                    &RunRecord {
                        v: 1,
                        run_id: run_id.to_string(),
                        parent_version: None,
                        batches: vec![],
                        train_samples: 1,
                        model_blob: blob.clone(),
                        model_sha256: sha256_hex(&bytes),
                        model_bytes: bytes.len() as u64,
                        created_at_ms: 0,
                        train_seconds: 0.0,
                        train_cpu_seconds: 0.0,
                        familiarity: (*run_id == "r-b").then(|| familiarity.clone()),
                        verdict: Some(Verdict {
                            accepted: true,
                            candidate_heldout_accuracy: 0.9,
                            current_heldout_accuracy: 0.8,
                            candidate_guard_accuracy: 0.9,
                            ..Verdict::default()
                        }),
                        published_version: None,
                    },
                )
            })
            .unwrap();
        }
        let fence = db
            .transact(|tx| {
                positions::acquire(
                    tx,
                    &keys,
                    swimlane_core::groups::PUBLISHERS,
                    topics::VERDICTS,
                    0,
                    "me",
                    0,
                    u64::MAX / 2,
                    false,
                )
            })
            .unwrap()
            .unwrap();
        let records = runs
            .iter()
            .enumerate()
            .map(|(i, (run_id, _))| Record {
                offset: i as u64,
                key: "ana".into(),
                payload: Event::CandidateAccepted {
                    user: user.clone(),
                    run_id: run_id.to_string(),
                }
                .encode(),
            })
            .collect();
        let delivery = Delivery { fence, records };
        let emitter: Arc<dyn Emitter> = Arc::new(EmbeddedBus::new(keys.clone(), 1));
        let metrics = PublisherMetrics::register(&prometheus::Registry::new()).unwrap();
        let stage = Publisher {
            env: StageEnv {
                db: db.clone(),
                repo: repo.clone(),
                emitter: emitter.clone(),
                metrics: metrics.clone(),
            },
            target_accuracy: 0.97,
            spec: Arc::new(swimlane_core::ModelSpec::synthetic_pose()),
            base: Default::default(),
            prefix: None,
        };
        let mut p = Runner::new(stage, db.clone(), keys.clone(), emitter);
        p.handle(&delivery).unwrap();
        let versions = db.transact(|tx| repo.model_versions(tx, "ana")).unwrap();
        assert_eq!(versions.len(), 2);
        assert_eq!(
            (metrics.publishes.get(), metrics.fallback_files.get()),
            (2, 1)
        );
        let probes = onnx::probe_windows(&runs[0].1);
        let refs: Vec<&[f32]> = probes.iter().map(Vec::as_slice).collect();
        for (rec, (run_id, m)) in versions.iter().zip(&runs) {
            assert_eq!(rec.run_id, *run_id);
            let file = rec.onnx.clone().expect("an ONNX file");
            let bytes = db
                .transact(|tx| repo.stored_file(tx, &file))
                .unwrap()
                .unwrap();
            // A file with the fallback keeps the base model's part in a shared blob
            // that names no user.
            assert_eq!(file.prefix_blob.is_some(), *run_id == "r-b", "{file:?}");
            let (own, weights) = db
                .transact(|tx| Ok((repo.blob(tx, &file.blob)?, repo.blob(tx, &rec.model_blob)?)))
                .unwrap();
            let (own, weights) = (own.unwrap(), weights.unwrap());
            // The personal model's weight matrices are not stored again: they are the
            // version's weights blob's bytes (two splices: fc1 and fc2, 288 kB). Its own
            // blob keeps the rest: a few kB, and the familiarity's matrices in a file
            // with the fallback.
            assert_eq!(file.splices.len(), 2, "{:?}", file.splices);
            let spliced: u64 = file.splices.iter().map(|s| s.len).sum();
            assert_eq!(spliced, 4 * (128 * 512 + 64 * 128));
            assert!(own.len() < 50_000, "{}", own.len());
            let mut part = own.clone();
            for s in &file.splices {
                assert_eq!(s.blob, rec.model_blob);
                let (o, l) = (s.offset as usize, s.len as usize);
                part.splice(
                    s.at as usize..s.at as usize,
                    weights[o..o + l].iter().copied(),
                );
            }
            if let Some(prefix) = &file.prefix_blob {
                assert!(prefix.starts_with("onnx-prefix-") && !prefix.contains("ana"));
                let shared = db.transact(|tx| repo.blob(tx, prefix)).unwrap().unwrap();
                assert_eq!([shared.clone(), part].concat(), bytes);
                // The base model's weights: most of the file's other half.
                assert!(shared.len() > 250_000, "{}", shared.len());
            } else {
                assert_eq!(part, bytes);
            }
            assert_eq!(file.sha256, sha256_hex(&bytes));
            assert_eq!(file.size_bytes, bytes.len() as u64);
            assert_eq!(file.blob, onnx_blob_id("ana", run_id, rec.version));
            let o = OnnxModel::from_bytes(&bytes).unwrap();
            assert_eq!(o.metadata()["model_version"], rec.version.to_string());
            assert_eq!(o.metadata()["parent_version"], "base");
            assert_eq!(o.metadata()["training_run"], *run_id);
            assert_eq!(o.metadata()["weights_sha256"], rec.sha256);
            if *run_id == "r-a" {
                assert!(!o.metadata().contains_key("fallback"));
                assert!(onnx::parity(m, &o, &refs).unwrap().holds());
                continue;
            }
            let base_sha = sha256_hex(&base_bytes);
            assert_eq!(o.metadata()["fallback"], "base");
            assert_eq!(o.metadata()["base_weights_sha256"], base_sha);
            let fb = onnx::Fallback {
                base: &base,
                base_weights_sha256: &base_sha,
                familiarity: &familiarity,
            };
            let mut windows = probes.clone();
            windows.extend(trained.iter().map(|s| s.frames.clone()));
            let refs: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
            let familiar = refs
                .iter()
                .filter(|w| familiarity.knows(w, mean, std))
                .count();
            assert!(familiar > 0 && familiar < refs.len(), "{familiar}");
            let want = onnx::predict_proba_with_fallback(m, Some(&fb), &refs).unwrap();
            assert!(onnx::compare(&want, &o.predict_proba(&refs).unwrap()).holds());
        }
        // Delivered again (a crash before the consumer moved on): nothing changes.
        p.handle(&delivery).unwrap();
        assert_eq!(
            db.transact(|tx| repo.model_versions(tx, "ana")).unwrap(),
            versions
        );
        assert_eq!(
            db.transact(|tx| repo.user_state(tx, "ana"))
                .unwrap()
                .last_version,
            2
        );
    }
}
