//! Auditing a settled deployment from its store and its HTTP APIs alone: did every
//! accepted batch reach exactly one outcome, was every stage's effect applied once, and
//! did no model learn from another user's samples? Used by `swimlane chaos`.
//!
//! Per user it checks:
//! - the stored batches are exactly the accepted ones (none lost, none extra);
//! - every batch rests in a settled status: published in exactly the version its
//!   record names, rejected with a reason and in no version, or deferred (waiting for
//!   more evidence) and in no version;
//! - versions are 1..N with no gap and no repeat, the head is N, no run in flight;
//! - every run has exactly one verdict; every accepted run is exactly one version and
//!   every version exactly one accepted run; a batch is in at most one accepted run,
//!   and versions' batches are disjoint;
//! - every run trained on exactly this user's samples: its training-sample count is
//!   the sum of the non-held-out samples of its own batches and of the batches of the
//!   versions up to its parent (the trainer's plan), and its batches are this user's;
//! - through the APIs: each batch's status word, and the model download (version
//!   header and SHA-256 of the bytes).
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;

use serde::Serialize;
use sha2::{Digest, Sha256};
use swimlane_core::records::BatchStatus;
use swimlane_state::Repo;
use swimlane_store::Db;

/// One user as the audit sees it: name, device token, accepted batch ids.
pub struct AuditUser {
    pub user: String,
    pub token: String,
    pub accepted: BTreeSet<String>,
}

/// What the audit found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditReport {
    pub users: usize,
    pub batches_accepted: usize,
    pub published: usize,
    pub rejected: usize,
    pub deferred: usize,
    pub versions: u64,
    pub runs: usize,
    /// Accepted batches missing from the store, or never settled.
    pub lost: usize,
    /// Effects applied twice: a batch in two accepted runs or two versions, a run
    /// published twice, a version number repeated.
    pub duplicated: usize,
    /// Every violated check, in words (empty when all hold).
    pub violations: Vec<String>,
}

fn word(s: &BatchStatus) -> &'static str {
    match s {
        BatchStatus::Published { .. } => "published",
        BatchStatus::Rejected { .. } => "rejected",
        BatchStatus::Deferred { .. } => "deferred",
        BatchStatus::Staged => "staged",
        BatchStatus::Validating { .. } => "validating",
    }
}

/// Audit `users` on `db` (deployment keys in `repo`) and, given `api` (the ingest and
/// publisher base URLs), through the APIs.
pub fn audit(
    db: &Db,
    repo: &Repo,
    users: &[AuditUser],
    api: Option<(&str, &str)>,
) -> anyhow::Result<AuditReport> {
    let http = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .build();
    let mut r = AuditReport {
        users: users.len(),
        ..Default::default()
    };
    for au in users {
        let u = au.user.as_str();
        r.batches_accepted += au.accepted.len();
        let bad = |r: &mut AuditReport, m: String| r.violations.push(format!("{u}: {m}"));
        let (batches, versions, state, runs) = db.transact(|tx| {
            Ok((
                repo.batches(tx, u)?,
                repo.model_versions(tx, u)?,
                repo.user_state(tx, u)?,
                repo.runs(tx, u)?,
            ))
        })?;
        let batch_of: BTreeMap<&str, &swimlane_core::records::BatchRecord> =
            batches.iter().map(|(b, rec)| (b.as_str(), rec)).collect();
        for b in &au.accepted {
            if !batch_of.contains_key(b.as_str()) {
                r.lost += 1;
                bad(&mut r, format!("accepted batch {b} is not in the store"));
            }
        }
        for b in batch_of.keys() {
            if !au.accepted.contains(*b) {
                bad(&mut r, format!("batch {b} stored but never accepted"));
            }
        }

        // Versions 1..N.
        let n = versions.len() as u64;
        r.versions += n;
        let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        if numbers != (1..=n).collect::<Vec<_>>() {
            let distinct: BTreeSet<u64> = numbers.iter().copied().collect();
            r.duplicated += numbers.len() - distinct.len();
            bad(&mut r, format!("versions {numbers:?} are not 1..={n}"));
        }
        if state.last_version != n || state.head != (n > 0).then_some(n) {
            bad(
                &mut r,
                format!(
                    "state says last {} head {:?}, versions say {n}",
                    state.last_version, state.head
                ),
            );
        }
        if let Some(run) = &state.inflight_run {
            bad(&mut r, format!("run {run} still in flight"));
        }

        // Runs, verdicts, versions.
        r.runs += runs.len();
        let run_of: BTreeMap<&str, &swimlane_core::records::RunRecord> =
            runs.iter().map(|x| (x.run_id.as_str(), x)).collect();
        let mut version_of_batch: BTreeMap<&str, u64> = BTreeMap::new();
        for v in &versions {
            match run_of.get(v.run_id.as_str()) {
                None => bad(
                    &mut r,
                    format!("v{} names run {} with no record", v.version, v.run_id),
                ),
                Some(run) => {
                    if run.published_version != Some(v.version) {
                        r.duplicated += 1;
                        bad(
                            &mut r,
                            format!(
                                "v{} from run {} which records version {:?}",
                                v.version, run.run_id, run.published_version
                            ),
                        );
                    }
                    if !run.verdict.as_ref().is_some_and(|x| x.accepted) {
                        bad(
                            &mut r,
                            format!(
                                "v{} from run {} without an accepting verdict",
                                v.version, run.run_id
                            ),
                        );
                    }
                    if run.batches != v.batches {
                        bad(
                            &mut r,
                            format!("v{}: batches differ from its run's", v.version),
                        );
                    }
                }
            }
            for b in &v.batches {
                if let Some(other) = version_of_batch.insert(b, v.version) {
                    r.duplicated += 1;
                    bad(&mut r, format!("batch {b} in v{other} and v{}", v.version));
                }
            }
        }
        let non_heldout = |b: &str| -> Option<u64> {
            batch_of
                .get(b)
                .map(|rec| rec.samples.saturating_sub(rec.heldout) as u64)
        };
        let mut accepted_runs_of_batch: BTreeMap<&str, usize> = BTreeMap::new();
        for run in &runs {
            let Some(verdict) = &run.verdict else {
                bad(&mut r, format!("run {} has no verdict", run.run_id));
                continue;
            };
            if verdict.accepted {
                for b in &run.batches {
                    *accepted_runs_of_batch.entry(b.as_str()).or_default() += 1;
                }
                match run.published_version {
                    Some(v)
                        if versions
                            .get(v as usize - 1)
                            .is_some_and(|x| x.run_id == run.run_id) => {}
                    other => bad(
                        &mut r,
                        format!("accepted run {} published as {other:?}", run.run_id),
                    ),
                }
            } else if run.published_version.is_some() {
                bad(&mut r, format!("rejected run {} was published", run.run_id));
            }
            // Provenance: this user's batches only, and exactly the plan's samples.
            let mut expected = 0u64;
            for b in &run.batches {
                match non_heldout(b) {
                    Some(k) => expected += k,
                    None => bad(
                        &mut r,
                        format!(
                            "run {} trained on batch {b}, not one of this user's",
                            run.run_id
                        ),
                    ),
                }
            }
            let parent = run.parent_version.unwrap_or(0);
            for v in versions.iter().filter(|v| v.version <= parent) {
                for b in &v.batches {
                    expected += non_heldout(b).unwrap_or(0);
                }
            }
            if run.train_samples as u64 != expected {
                bad(
                    &mut r,
                    format!(
                        "run {} trained on {} samples; this user's batches give {expected}",
                        run.run_id, run.train_samples
                    ),
                );
            }
        }
        for (b, k) in &accepted_runs_of_batch {
            if *k > 1 {
                r.duplicated += 1;
                bad(&mut r, format!("batch {b} in {k} accepted runs"));
            }
        }

        // Batches settle once, consistently with the versions.
        for (b, rec) in &batches {
            match &rec.status {
                BatchStatus::Published { run_id, version } => {
                    r.published += 1;
                    if version_of_batch.get(b.as_str()) != Some(version) {
                        bad(
                            &mut r,
                            format!("batch {b} published as v{version}, versions disagree"),
                        );
                    }
                    if versions
                        .get(*version as usize - 1)
                        .is_none_or(|v| &v.run_id != run_id)
                    {
                        bad(
                            &mut r,
                            format!("batch {b}: run {run_id} is not v{version}'s"),
                        );
                    }
                }
                BatchStatus::Rejected { reason, .. } => {
                    r.rejected += 1;
                    if reason.is_empty() {
                        bad(&mut r, format!("batch {b} rejected without a reason"));
                    }
                    if version_of_batch.contains_key(b.as_str()) {
                        bad(&mut r, format!("batch {b} rejected yet in a version"));
                    }
                }
                BatchStatus::Deferred { .. } => {
                    r.deferred += 1;
                    if version_of_batch.contains_key(b.as_str()) {
                        bad(&mut r, format!("batch {b} deferred yet in a version"));
                    }
                }
                other => {
                    r.lost += 1;
                    bad(&mut r, format!("batch {b} never settled: {other:?}"));
                }
            }
            // The device sees the same.
            let Some((ingest_url, _)) = api else { continue };
            let url = format!("{ingest_url}/v1/users/{u}/batches/{b}");
            match http
                .get(&url)
                .set("Authorization", &format!("Bearer {}", au.token))
                .call()
            {
                Ok(resp) => {
                    let j: serde_json::Value = resp.into_json()?;
                    if j["status"] != word(&rec.status) {
                        bad(
                            &mut r,
                            format!(
                                "batch {b}: API says {}, store {}",
                                j["status"],
                                word(&rec.status)
                            ),
                        );
                    }
                }
                Err(e) => bad(&mut r, format!("GET {url}: {e}")),
            }
        }

        // The device downloads the head.
        let Some((_, publisher_url)) = api else {
            continue;
        };
        let url = format!("{publisher_url}/v1/users/{u}/model");
        match http
            .get(&url)
            .set("Authorization", &format!("Bearer {}", au.token))
            .call()
        {
            Ok(resp) if n > 0 => {
                let v = resp.header("x-model-version").unwrap_or("").to_string();
                let mut body = Vec::new();
                resp.into_reader().read_to_end(&mut body)?;
                let sha = hex::encode(Sha256::digest(&body));
                if v != n.to_string() || sha != versions[n as usize - 1].sha256 {
                    bad(
                        &mut r,
                        format!("model download: version {v}, sha {sha}; expected v{n}"),
                    );
                }
            }
            Ok(resp) => bad(
                &mut r,
                format!("model download {} with no version", resp.status()),
            ),
            Err(ureq::Error::Status(404, _)) if n == 0 => {}
            Err(e) => bad(&mut r, format!("GET {url}: {e}")),
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use swimlane_core::keys::Keys;
    use swimlane_store::embedded::EmbeddedBackend;

    fn rec<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn batch(status: serde_json::Value, samples: u32, heldout: u32) -> serde_json::Value {
        json!({"v": 1, "digest": "d", "samples": samples, "heldout": heldout, "chunks": 1,
               "staged_at_ms": 1, "status": status})
    }

    fn run(
        id: &str,
        parent: Option<u64>,
        batches: &[&str],
        train: u32,
        accepted: bool,
        published: Option<u64>,
    ) -> serde_json::Value {
        json!({"v": 1, "run_id": id, "parent_version": parent, "batches": batches,
               "train_samples": train, "model_blob": "m", "model_sha256": "s",
               "model_bytes": 1, "created_at_ms": 1, "train_seconds": 0.1,
               "verdict": {"accepted": accepted, "reason": "r",
                           "candidate_heldout_accuracy": 0.9, "current_heldout_accuracy": 0.8,
                           "heldout_samples": 10, "candidate_guard_accuracy": 0.8,
                           "current_guard_accuracy": 0.8},
               "published_version": published})
    }

    fn version(v: u64, run: &str, batches: &[&str]) -> serde_json::Value {
        json!({"v": 1, "version": v, "run_id": run, "parent_version": null, "batches": batches,
               "model_blob": "m", "sha256": "s", "size_bytes": 1, "heldout_accuracy": 0.9,
               "parent_heldout_accuracy": 0.8, "guard_accuracy": 0.8, "published_at_ms": 2})
    }

    /// One user: b1 published as v1 by r1; b2 rejected by r2 (trained from v1, so on
    /// b1's and b2's training samples); b3 deferred.
    fn settled_store() -> (Db, Repo) {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let repo = Repo::new(Keys::new("t"));
        db.transact(|tx| {
            repo.put_batch(
                tx,
                "u",
                "b1",
                &rec(batch(
                    json!({"state": "published", "run_id": "r1", "version": 1}),
                    100,
                    20,
                )),
            )?;
            repo.put_batch(
                tx,
                "u",
                "b2",
                &rec(batch(
                    json!({"state": "rejected", "run_id": "r2", "reason": "no gain"}),
                    50,
                    10,
                )),
            )?;
            repo.put_batch(
                tx,
                "u",
                "b3",
                &rec(batch(
                    json!({"state": "deferred", "reason": "too little"}),
                    10,
                    2,
                )),
            )?;
            repo.put_run(tx, "u", &rec(run("r1", None, &["b1"], 80, true, Some(1))))?;
            repo.put_run(tx, "u", &rec(run("r2", Some(1), &["b2"], 120, false, None)))?;
            repo.put_model_version(tx, "u", &rec(version(1, "r1", &["b1"])))?;
            let mut st = repo.user_state(tx, "u")?;
            st.head = Some(1);
            st.last_version = 1;
            repo.put_user_state(tx, "u", &st)
        })
        .unwrap();
        (db, repo)
    }

    fn user(batches: &[&str]) -> Vec<AuditUser> {
        vec![AuditUser {
            user: "u".into(),
            token: String::new(),
            accepted: batches.iter().map(|b| b.to_string()).collect(),
        }]
    }

    #[test]
    fn a_consistent_store_passes() {
        let (db, repo) = settled_store();
        let r = audit(&db, &repo, &user(&["b1", "b2", "b3"]), None).unwrap();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(
            (r.published, r.rejected, r.deferred, r.versions, r.runs),
            (1, 1, 1, 1, 2)
        );
    }

    #[test]
    fn a_lost_batch_a_second_publish_and_foreign_samples_are_each_caught() {
        let (db, repo) = settled_store();
        let r = audit(&db, &repo, &user(&["b1", "b2", "b3", "b4"]), None).unwrap();
        assert_eq!(r.lost, 1, "{:?}", r.violations);

        let (db, repo) = settled_store();
        db.transact(|tx| repo.put_model_version(tx, "u", &rec(version(2, "r1", &["b1"]))))
            .unwrap();
        let r = audit(&db, &repo, &user(&["b1", "b2", "b3"]), None).unwrap();
        assert!(r.duplicated >= 1, "{:?}", r.violations);

        let (db, repo) = settled_store();
        db.transact(|tx| {
            repo.put_run(tx, "u", &rec(run("r2", Some(1), &["b2"], 125, false, None)))
        })
        .unwrap();
        let r = audit(&db, &repo, &user(&["b1", "b2", "b3"]), None).unwrap();
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("trained on 125 samples")),
            "{:?}",
            r.violations
        );
    }
}
