//! Installing what a deployment needs before the first upload: the base model every
//! user starts from, and the population guard set the validator checks candidates on.
use swimlane_core::keys::Keys;
use swimlane_core::records::StagedSample;
use swimlane_model::experiment::train_default_base;
use swimlane_model::synth::{derive_seed, Population};
use swimlane_model::MicroModel;
use swimlane_state::{encode_sample_set, Repo, BASE_MODEL_BLOB, GUARD_SET_BLOB};
use swimlane_store::Db;

/// Swimmers and windows per swimmer in the default guard set (a population disjoint
/// from the base model's training population).
pub const GUARD_SWIMMERS: usize = 60;
pub const GUARD_WINDOWS_PER_SWIMMER: usize = 10;
/// Seed domain of the guard population ("guard" in ASCII).
const GUARD_DOMAIN: u64 = 0x67_7561_7264;

/// What `install` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Installed {
    pub base_model_bytes: usize,
    pub guard_samples: usize,
    pub already_present: bool,
}

/// [`install`] for a deployment of `spec` (what `swimlane admin init` and `swimlane
/// dev` call): a base model given or already in the store must be of `spec`; without
/// one, only the synthetic pose spec has a base model and guard set to make (from
/// synthetic swimmers), any other spec needs a base model and a guard set of its own
/// (`install_model`, as `swimlane replay` installs them).
pub fn install_for_spec(
    db: &Db,
    deployment: &str,
    spec: &swimlane_core::ModelSpec,
    seed: u64,
    base: Option<MicroModel>,
) -> anyhow::Result<Installed> {
    let repo = Repo::new(Keys::new(deployment));
    if let Some(m) = &base {
        spec.ensure_same(m.spec())?;
    }
    if let Some(stored) = db.transact(|tx| repo.blob(tx, BASE_MODEL_BLOB))? {
        let m = MicroModel::from_bytes(&stored)?;
        spec.ensure_same(m.spec()).map_err(|e| {
            anyhow::anyhow!("the store's base model does not fit the configured spec: {e}")
        })?;
    } else if base.is_none() && *spec != swimlane_core::ModelSpec::synthetic_pose() {
        anyhow::bail!(
            "spec {:?}: no base model in the store, and only the synthetic-pose spec has one to make; install a base model and guard set of this spec (`swimlane_cli::init::install_model`, as `swimlane replay` does)",
            spec.name
        );
    }
    install(db, deployment, seed, base)
}

/// Install `base` (or, if `None`, a base model trained from `seed`) and a guard set
/// from `seed`, unless both are present already (then nothing changes).
pub fn install(
    db: &Db,
    deployment: &str,
    seed: u64,
    base: Option<MicroModel>,
) -> anyhow::Result<Installed> {
    let repo = Repo::new(Keys::new(deployment));
    let present = db.transact(|tx| {
        Ok((
            repo.blob(tx, BASE_MODEL_BLOB)?,
            repo.blob(tx, GUARD_SET_BLOB)?.is_some(),
        ))
    })?;
    if let (Some(b), true) = present {
        return Ok(Installed {
            base_model_bytes: b.len(),
            guard_samples: 0,
            already_present: true,
        });
    }
    let base = match base {
        Some(m) => m,
        None => train_default_base(seed)?.0,
    };
    let guard = Population::unseen(derive_seed(seed, GUARD_DOMAIN, 0), GUARD_SWIMMERS)
        .samples(GUARD_WINDOWS_PER_SWIMMER, seed);
    install_model(db, deployment, &base, guard)
}

/// Install `base` and the population guard set `guard` (windows of people whose data
/// no user model trains on) for a deployment of any spec, replacing what is there.
pub fn install_model(
    db: &Db,
    deployment: &str,
    base: &MicroModel,
    guard: Vec<swimlane_model::Sample>,
) -> anyhow::Result<Installed> {
    let repo = Repo::new(Keys::new(deployment));
    let weights = base.to_bytes();
    let guard: Vec<StagedSample> = guard
        .into_iter()
        .enumerate()
        .map(|(i, s)| StagedSample {
            id: format!("g{i}"),
            frames: s.frames,
            label: s.label,
            heldout: false,
            feedback: None,
        })
        .collect();
    let guard_bytes = encode_sample_set(&guard);
    db.transact(|tx| {
        repo.put_blob(tx, BASE_MODEL_BLOB, &weights)?;
        repo.put_blob(tx, GUARD_SET_BLOB, &guard_bytes)
    })?;
    Ok(Installed {
        base_model_bytes: weights.len(),
        guard_samples: guard.len(),
        already_present: false,
    })
}
