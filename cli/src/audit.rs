//! The exactly-once checker: auditing a settled deployment from its store, its event
//! log (or Kafka topics) and its HTTP APIs: did every accepted batch reach exactly one
//! outcome, was every stage's effect applied once, did no model learn from another
//! user's samples, and was no poisoned batch published? `swimlane chaos` prints its
//! report; the crash tests assert on it.
//!
//! From the events (the embedded log, or one Kafka record per outbox entry), when given:
//! every accepted batch has its `BatchStaged`; no run is trained twice (an effect that
//! overwrote its own key leaves its second event here, and nowhere in the store); a
//! verdict only for a trained run and at most one per run; every run has a verdict; a
//! version published once, from a run with an accepting verdict, and every accepted run
//! published; the stored versions are the published events' and their batches are
//! their run's.
//!
//! From what the caller expects: at least `min_versions` versions published (a soak in
//! which nothing was published proves nothing), no poisoned batch published, at most
//! `max_dead_letters` dead letters.
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

use serde::Serialize;
use sha2::{Digest, Sha256};
use swimlane_core::records::{BatchStatus, Standing};
use swimlane_core::{topics, Event};

use crate::client::{Device, Download};
use swimlane_state::Repo;
use swimlane_store::Db;

/// Every event of the pipeline's topics, each with its partition and offset, and the
/// dead letters' bodies.
#[derive(Clone, Debug, Default)]
pub struct Events {
    pub batches: Vec<(u32, u64, Event)>,
    pub candidates: Vec<(u32, u64, Event)>,
    pub verdicts: Vec<(u32, u64, Event)>,
    pub published: Vec<(u32, u64, Event)>,
    pub dead_letters: Vec<serde_json::Value>,
}

impl Events {
    /// The embedded log of the deployment `repo.keys` names, with `partitions`
    /// partitions per topic. Offsets must be dense up to each high watermark.
    pub fn from_log(db: &Db, repo: &Repo, partitions: u32) -> anyhow::Result<Events> {
        let bus = swimlane_bus::embedded::EmbeddedBus::new(repo.keys.clone(), partitions);
        Events::decode(|topic| {
            let all = bus.read_all(db, topic)?;
            Ok(all
                .into_iter()
                .map(|(p, r)| (p, r.offset, r.payload))
                .collect())
        })
    }

    /// Every topic's records through `read`, decoded.
    pub fn decode(
        mut read: impl FnMut(&str) -> anyhow::Result<Vec<(u32, u64, Vec<u8>)>>,
    ) -> anyhow::Result<Events> {
        let mut events = |topic: &str| -> anyhow::Result<Vec<(u32, u64, Event)>> {
            read(topic)?
                .into_iter()
                .map(|(p, o, b)| {
                    let e =
                        Event::decode(&b).map_err(|e| anyhow::anyhow!("{topic}/{p}@{o}: {e}"))?;
                    Ok((p, o, e))
                })
                .collect()
        };
        let (batches, candidates) = (events(topics::BATCHES)?, events(topics::CANDIDATES)?);
        let (verdicts, published) = (events(topics::VERDICTS)?, events(topics::PUBLISHED)?);
        let dead_letters = read(topics::DEAD_LETTER)?
            .into_iter()
            .map(|(_, _, b)| serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null))
            .collect();
        Ok(Events {
            batches,
            candidates,
            verdicts,
            published,
            dead_letters,
        })
    }
}

#[cfg(feature = "kafka")]
impl Events {
    /// The pipeline's Kafka topics (their names with `prefix`), `partitions` each: one
    /// event per outbox entry. A relay may produce an entry twice (delivery into Kafka
    /// is at least once); both copies carry the entry's header and the same bytes.
    /// Other bytes under one entry, or a record no relay produced, are errors.
    ///
    /// Events a stage committed may still wait in the store's outbox (the relay that
    /// held the lease was killed, and the lease runs out before another relay takes
    /// over): it first waits until the outbox is empty ([`wait_outbox_drained`]).
    pub fn from_kafka(
        db: &Db,
        repo: &Repo,
        bootstrap: &str,
        prefix: &str,
        partitions: u32,
    ) -> anyhow::Result<Events> {
        wait_outbox_drained(db, repo, std::time::Duration::from_secs(120))?;
        Events::decode(|topic| {
            let name = swimlane_bus::kafka::kafka_name(prefix, topic);
            let mut seen: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut out = Vec::new();
            for (p, o, entry, payload) in read_kafka_topic(bootstrap, &name, partitions)? {
                let entry = entry
                    .ok_or_else(|| anyhow::anyhow!("{name}/{p}@{o}: a record no relay produced"))?;
                match seen.get(&entry) {
                    Some(first) if *first == payload => continue,
                    Some(_) => anyhow::bail!("{name}: an outbox entry relayed with other bytes"),
                    None => {
                        seen.insert(entry, payload.clone());
                        out.push((p, o, payload));
                    }
                }
            }
            Ok(out)
        })
    }
}

/// Wait until every event committed to the Kafka bus's outbox has been relayed (the
/// emitting processes' relays must be running), at most `within`.
#[cfg(feature = "kafka")]
pub fn wait_outbox_drained(
    db: &Db,
    repo: &Repo,
    within: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = db.transact(|tx| swimlane_bus::kafka::read_outbox(tx, &repo.keys, 1))?;
        if left.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "events still in the outbox after {within:?}: no relay is moving them"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every record of a Kafka topic up to its high watermarks: (partition, offset, outbox
/// entry header, payload).
#[cfg(feature = "kafka")]
#[allow(clippy::type_complexity)]
fn read_kafka_topic(
    bootstrap: &str,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<Vec<(u32, u64, Option<Vec<u8>>, Vec<u8>)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::{Headers as _, Message as _};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    use std::time::{Duration, Instant};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", swimlane_bus::member_id("swimlane-audit"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut high = BTreeMap::new();
    for p in 0..partitions {
        let (_, h) = c.fetch_watermarks(topic, p as i32, Duration::from_secs(10))?;
        if h > 0 {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
            high.insert(p, h as u64);
        }
    }
    let mut out = Vec::new();
    if high.is_empty() {
        return Ok(out);
    }
    c.assign(&tpl)?;
    let mut next: BTreeMap<u32, u64> = high.keys().map(|p| (*p, 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while next.iter().any(|(p, n)| *n < high[p]) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading {topic}: {next:?} of {high:?}"
        );
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let p = m.partition() as u32;
        let entry = m.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == swimlane_bus::kafka::OUTBOX_ENTRY_HEADER)
                .and_then(|x| x.value)
                .map(|v| v.to_vec())
        });
        next.insert(p, m.offset() as u64 + 1);
        out.push((
            p,
            m.offset() as u64,
            entry,
            m.payload().unwrap_or_default().to_vec(),
        ));
    }
    Ok(out)
}

/// What the caller knows the run must show.
#[derive(Clone, Debug)]
pub struct Expect {
    /// Versions published over all users, at least.
    pub min_versions: u64,
    /// `(user, batch)` uploads whose labels were poisoned: none may be published.
    pub poisoned: BTreeSet<(String, String)>,
    /// Dead letters the run may leave (records it fed in that no stage can process).
    pub max_dead_letters: usize,
    /// The fleet's `retention.max_training_windows`: a run trains on at most this many
    /// of the user's most recent training windows.
    pub max_training_windows: u64,
}

impl Default for Expect {
    /// Nothing required, and the default retention budget.
    fn default() -> Self {
        Expect {
            min_versions: 0,
            poisoned: BTreeSet::new(),
            max_dead_letters: 0,
            max_training_windows: swimlane_core::policy::RetentionPolicy::default()
                .max_training_windows
                .into(),
        }
    }
}

/// One user as the audit sees it: name, device token, accepted batch ids.
pub struct AuditUser {
    pub user: String,
    pub token: String,
    pub accepted: BTreeSet<String>,
}

impl AuditUser {
    /// One for each of `users` (with `tokens[i]`), with the batches `accepted(i)`.
    pub fn each(
        users: &[String],
        tokens: &[String],
        accepted: impl Fn(usize) -> BTreeSet<String>,
    ) -> Vec<AuditUser> {
        let each = users.iter().zip(tokens).enumerate();
        each.map(|(i, (user, token))| AuditUser {
            user: user.clone(),
            token: token.clone(),
            accepted: accepted(i),
        })
        .collect()
    }
}

/// What the audit found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditReport {
    pub users: usize,
    pub batches_accepted: usize,
    pub published: usize,
    pub rejected: usize,
    pub deferred: usize,
    /// Batches retired by the retention policy (after being published, rejected or
    /// never trained).
    pub retired: usize,
    pub versions: u64,
    pub runs: usize,
    /// Accepted batches missing from the store, or never settled.
    pub lost: usize,
    /// Effects applied twice: a batch in two accepted runs or two versions, a run
    /// published twice, a version number repeated.
    pub duplicated: usize,
    /// Poisoned batches that were published.
    pub poisoned_published: usize,
    /// Versions rolled back (by probation or an operator).
    pub rolled_back: usize,
    /// Whether the events were checked too (the log or the Kafka topics).
    pub events_checked: bool,
    pub dead_letters: usize,
    /// Every violated check, in words (empty when all hold).
    pub violations: Vec<String>,
}

fn word(s: &BatchStatus) -> &'static str {
    s.name()
}

/// Audit `users` on `db` (deployment keys in `repo`), on `events` when given, and,
/// given `api` (the ingest and publisher base URLs), through the APIs, against
/// `expect`.
pub fn audit(
    db: &Db,
    repo: &Repo,
    users: &[AuditUser],
    api: Option<(&str, &str)>,
    events: Option<&Events>,
    expect: &Expect,
) -> anyhow::Result<AuditReport> {
    let mut r = AuditReport {
        users: users.len(),
        ..Default::default()
    };
    let ev = events.map(|e| EventIndex::of(e, &mut r));
    for au in users {
        let u = au.user.as_str();
        r.batches_accepted += au.accepted.len();
        let bad = |r: &mut AuditReport, m: String| r.violations.push(format!("{u}: {m}"));
        let device = api.map(|(ingest, publisher)| Device::new(ingest, publisher, u, &au.token));
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
        if let Some(ev) = &ev {
            for b in &au.accepted {
                if !ev.staged.contains(&(u.to_string(), b.clone())) {
                    bad(&mut r, format!("batch {b} has no BatchStaged event"));
                }
            }
            let logged: Vec<u64> = ev
                .version_run
                .keys()
                .filter(|(vu, _)| vu == u)
                .map(|(_, v)| *v)
                .collect();
            let stored: Vec<u64> = versions.iter().map(|v| v.version).collect();
            if logged != stored {
                bad(
                    &mut r,
                    format!("ModelPublished events {logged:?}, versions {stored:?}"),
                );
            }
            for v in &versions {
                let key = (u.to_string(), v.run_id.clone());
                if ev.version_run.get(&(u.to_string(), v.version)) != Some(&v.run_id) {
                    bad(
                        &mut r,
                        format!("v{}: its ModelPublished names another run", v.version),
                    );
                }
                if ev.trained.get(&key) != Some(&v.batches) {
                    bad(
                        &mut r,
                        format!("v{}: batches differ from its CandidateTrained", v.version),
                    );
                }
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
        // The head is the newest version, or where probation or an operator moved it
        // back from there.
        let rolled_back_to = |v: &swimlane_core::records::ModelVersionRecord| match &v.standing {
            Standing::RolledBack { to, .. } => Some(*to),
            _ => None,
        };
        let expected_head = match versions.last() {
            None => None,
            Some(last) => rolled_back_to(last).unwrap_or(Some(last.version)),
        };
        let rolled_back: BTreeSet<u64> = versions
            .iter()
            .filter(|v| rolled_back_to(v).is_some())
            .map(|v| v.version)
            .collect();
        r.rolled_back += rolled_back.len();
        if state.last_version != n || state.head != expected_head {
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
                // A rolled-back version's batches are deferred, and may be published
                // again with new evidence: only then in two versions.
                if let Some(other) = version_of_batch.insert(b, v.version) {
                    if !rolled_back.contains(&other) {
                        r.duplicated += 1;
                        bad(&mut r, format!("batch {b} in v{other} and v{}", v.version));
                    }
                }
            }
        }
        // The version a batch stands in: its newest, unless that one was rolled back.
        let live_version_of = |b: &str| {
            version_of_batch
                .get(b)
                .copied()
                .filter(|v| !rolled_back.contains(v))
        };
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
            let standing = run
                .published_version
                .map_or(true, |v| !rolled_back.contains(&v));
            if verdict.accepted && standing {
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
            // Provenance: this user's batches only, and exactly the plan's samples: the
            // training windows of its own batches and of the versions up to its parent,
            // at most the retention budget. A batch retired since may or may not have
            // been retired when the run was planned: then the count lies between the
            // windows of the batches never retired and all of them.
            let (mut expected, mut never_retired) = (0u64, 0u64);
            let parent = run.parent_version.unwrap_or(0);
            let inherited = versions
                .iter()
                .filter(|v| v.version <= parent)
                .flat_map(|v| v.batches.iter().map(|b| (v.version, b)));
            for (own, b) in run
                .batches
                .iter()
                .map(|b| (true, b))
                .chain(inherited.clone().map(|(_, b)| (false, b)))
            {
                // A rolled-back version's batches, like retired ones, were trained on
                // by runs planned before the rollback and not by those after.
                let of_rolled_back = inherited
                    .clone()
                    .any(|(v, ib)| ib == b && rolled_back.contains(&v));
                match non_heldout(b) {
                    Some(k) => {
                        expected += k;
                        let retired = batch_of
                            .get(b.as_str())
                            .is_some_and(|rec| matches!(rec.status, BatchStatus::Retired { .. }));
                        if !retired && !(of_rolled_back && !own) {
                            never_retired += k;
                        }
                    }
                    None if own => bad(
                        &mut r,
                        format!(
                            "run {} trained on batch {b}, not one of this user's",
                            run.run_id
                        ),
                    ),
                    None => {}
                }
            }
            let budget = expect.max_training_windows;
            let (lo, hi) = (never_retired.min(budget), expected.min(budget));
            let trained = run.train_samples as u64;
            if !(lo..=hi).contains(&trained) {
                bad(
                    &mut r,
                    format!(
                        "run {} trained on {trained} samples; this user's batches give {}",
                        run.run_id,
                        if lo == hi {
                            lo.to_string()
                        } else {
                            format!("{lo} to {hi}")
                        }
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
                    if expect.poisoned.contains(&(u.to_string(), b.clone())) {
                        r.poisoned_published += 1;
                        bad(
                            &mut r,
                            format!("poisoned batch {b} published in v{version}"),
                        );
                    }
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
                BatchStatus::Rejected { reason, run_id } => {
                    r.rejected += 1;
                    if reason.is_empty() {
                        bad(&mut r, format!("batch {b} rejected without a reason"));
                    }
                    if let Some(run_id) = run_id {
                        let rejecting = run_of
                            .get(run_id.as_str())
                            .and_then(|run| run.verdict.as_ref())
                            .is_some_and(|v| !v.accepted);
                        if !rejecting {
                            bad(&mut r, format!("batch {b} rejected by run {run_id}, whose verdict does not reject"));
                        }
                    }
                    if let Some(v) = live_version_of(b) {
                        bad(&mut r, format!("batch {b} rejected yet in v{v}"));
                    }
                }
                BatchStatus::Deferred { .. } => {
                    r.deferred += 1;
                    if let Some(v) = live_version_of(b) {
                        bad(&mut r, format!("batch {b} deferred yet in v{v}"));
                    }
                }
                BatchStatus::Retired { reason } => {
                    r.retired += 1;
                    // Its reason says what it was: published in its version, or not.
                    match live_version_of(b).as_ref() {
                        Some(v) => {
                            if !reason.contains(&format!("was published as version {v};"))
                                && !reason.ends_with(&format!("was published as version {v}"))
                            {
                                bad(
                                    &mut r,
                                    format!("batch {b} is in v{v} but retired as: {reason}"),
                                );
                            }
                            if expect.poisoned.contains(&(u.to_string(), b.clone())) {
                                r.poisoned_published += 1;
                                bad(&mut r, format!("poisoned batch {b} published in v{v}"));
                            }
                        }
                        None if reason.contains("was published") => {
                            bad(
                                &mut r,
                                format!("batch {b} is in no version but retired as: {reason}"),
                            );
                        }
                        None => {}
                    }
                }
                other => {
                    r.lost += 1;
                    bad(&mut r, format!("batch {b} never settled: {other:?}"));
                }
            }
            if let Some(ev) = &ev {
                let accepted_runs = ev
                    .trained
                    .iter()
                    .filter(|((ru, run), bs)| {
                        ru == u
                            && bs.contains(b)
                            && ev.verdict_of.get(&(ru.clone(), run.clone())) == Some(&true)
                            // A run whose version was rolled back no longer stands.
                            && run_of
                                .get(run.as_str())
                                .and_then(|x| x.published_version)
                                .map_or(true, |v| !rolled_back.contains(&v))
                    })
                    .count();
                let published = matches!(rec.status, BatchStatus::Published { .. })
                    || (matches!(rec.status, BatchStatus::Retired { .. })
                        && live_version_of(b).is_some());
                if accepted_runs > 1 || (accepted_runs == 1) != published {
                    r.duplicated += usize::from(accepted_runs > 1);
                    bad(
                        &mut r,
                        format!(
                            "batch {b} is {} but in {accepted_runs} accepted runs (events)",
                            word(&rec.status)
                        ),
                    );
                }
            }
            // The device sees the same.
            let Some(device) = &device else { continue };
            match device.status(b) {
                Ok(j) if j["status"] == word(&rec.status) => {}
                Ok(j) => bad(
                    &mut r,
                    format!(
                        "batch {b}: API says {}, store {}",
                        j["status"],
                        word(&rec.status)
                    ),
                ),
                Err(e) => bad(&mut r, format!("{e}")),
            }
        }

        // The device downloads the head.
        let Some(device) = &device else { continue };
        match device.download(None) {
            Ok(Download::Model { version, bytes, .. }) if expected_head.is_some() => {
                let sha = hex::encode(Sha256::digest(&bytes));
                if let Err(e) = swimlane_model::MicroModel::from_bytes(&bytes) {
                    bad(&mut r, format!("model download does not load: {e}"));
                }
                let want = expected_head.unwrap_or(0);
                let want_sha = versions
                    .iter()
                    .find(|v| v.version == want)
                    .map(|v| v.sha256.as_str());
                if version != want || Some(sha.as_str()) != want_sha {
                    bad(
                        &mut r,
                        format!("model download: v{version}, sha {sha}; expected v{want}"),
                    );
                }
            }
            Ok(Download::NoModel) if expected_head.is_none() => {}
            Ok(other) => bad(
                &mut r,
                format!("model download: {other:?} with {n} versions"),
            ),
            Err(e) => bad(&mut r, format!("{e}")),
        }
    }
    if r.versions < expect.min_versions {
        r.violations.push(format!(
            "{} versions published, fewer than the {} this run must show",
            r.versions, expect.min_versions
        ));
    }
    if r.dead_letters > expect.max_dead_letters {
        r.violations.push(format!(
            "{} dead letters, at most {} expected",
            r.dead_letters, expect.max_dead_letters
        ));
    }
    Ok(r)
}

/// What the events say happened, by user and run; checked as it is built.
struct EventIndex {
    /// (user, batch) with a `BatchStaged`.
    staged: BTreeSet<(String, String)>,
    /// (user, run) → its batches, from `CandidateTrained`.
    trained: BTreeMap<(String, String), Vec<String>>,
    /// (user, run) → accepted?
    verdict_of: BTreeMap<(String, String), bool>,
    /// (user, version) → run, from `ModelPublished`.
    version_run: BTreeMap<(String, u64), String>,
}

impl EventIndex {
    fn of(events: &Events, r: &mut AuditReport) -> EventIndex {
        r.events_checked = true;
        r.dead_letters = events.dead_letters.len();
        let mut bad = |m: String| r.violations.push(m);
        let mut duplicated = 0;
        let mut staged = BTreeSet::new();
        let by_topic = [
            (topics::BATCHES, &events.batches),
            (topics::CANDIDATES, &events.candidates),
            (topics::VERDICTS, &events.verdicts),
            (topics::PUBLISHED, &events.published),
        ];
        for (topic, list) in by_topic {
            for (p, o, e) in list.iter().filter(|(_, _, e)| e.topic() != topic) {
                bad(format!("{topic}/{p}@{o}: a {} event", e.topic()));
            }
        }
        for (_, _, e) in &events.batches {
            if let Event::BatchStaged { user, batch_id, .. } = e {
                staged.insert((user.to_string(), batch_id.as_str().to_string()));
            }
        }
        let mut trained = BTreeMap::new();
        for (_, _, e) in &events.candidates {
            let Event::CandidateTrained {
                user,
                run_id,
                batches,
            } = e
            else {
                continue;
            };
            let key = (user.to_string(), run_id.clone());
            let bs = batches.iter().map(|b| b.as_str().to_string()).collect();
            if trained.insert(key, bs).is_some() {
                duplicated += 1;
                bad(format!("{user}: run {run_id} trained twice"));
            }
        }
        let mut verdict_of = BTreeMap::new();
        for (_, _, e) in &events.verdicts {
            let (user, run_id, accepted) = match e {
                Event::CandidateAccepted { user, run_id } => (user, run_id, true),
                Event::CandidateRejected { user, run_id, .. } => (user, run_id, false),
                _ => continue,
            };
            let key = (user.to_string(), run_id.clone());
            if !trained.contains_key(&key) {
                bad(format!("{user}: a verdict for run {run_id}, never trained"));
            }
            if verdict_of.insert(key, accepted).is_some() {
                duplicated += 1;
                bad(format!("{user}: run {run_id} got two verdicts"));
            }
        }
        let mut version_run = BTreeMap::new();
        let mut run_version = BTreeMap::new();
        for (_, _, e) in &events.published {
            let Event::ModelPublished {
                user,
                run_id,
                version,
            } = e
            else {
                continue;
            };
            let u = user.to_string();
            if version_run
                .insert((u.clone(), *version), run_id.clone())
                .is_some()
            {
                duplicated += 1;
                bad(format!("{u}: version {version} published twice"));
            }
            if run_version
                .insert((u.clone(), run_id.clone()), *version)
                .is_some()
            {
                duplicated += 1;
                bad(format!("{u}: run {run_id} published twice"));
            }
            if verdict_of.get(&(u.clone(), run_id.clone())) != Some(&true) {
                bad(format!(
                    "{u}: run {run_id} published without an accepting verdict"
                ));
            }
        }
        for (key, accepted) in &verdict_of {
            if *accepted && !run_version.contains_key(key) {
                bad(format!("{}: accepted run {} never published", key.0, key.1));
            }
        }
        for key in trained.keys() {
            if !verdict_of.contains_key(key) {
                bad(format!("{}: run {} has no verdict", key.0, key.1));
            }
        }
        r.duplicated += duplicated;
        EventIndex {
            staged,
            trained,
            verdict_of,
            version_run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use swimlane_core::keys::Keys;
    use swimlane_core::{BatchId, UserId};
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

    /// Audits the store alone (no events), with the default expectations.
    fn audit_store(db: &Db, repo: &Repo, accepted: &[&str]) -> AuditReport {
        audit(db, repo, &user(accepted), None, None, &Expect::default()).unwrap()
    }

    #[test]
    fn a_consistent_store_passes() {
        let (db, repo) = settled_store();
        let r = audit_store(&db, &repo, &["b1", "b2", "b3"]);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(
            (r.published, r.rejected, r.deferred, r.versions, r.runs),
            (1, 1, 1, 1, 2)
        );
    }

    #[test]
    fn a_lost_batch_a_second_publish_and_foreign_samples_are_each_caught() {
        let (db, repo) = settled_store();
        let r = audit_store(&db, &repo, &["b1", "b2", "b3", "b4"]);
        assert_eq!(r.lost, 1, "{:?}", r.violations);

        let (db, repo) = settled_store();
        db.transact(|tx| repo.put_model_version(tx, "u", &rec(version(2, "r1", &["b1"]))))
            .unwrap();
        let r = audit_store(&db, &repo, &["b1", "b2", "b3"]);
        assert!(r.duplicated >= 1, "{:?}", r.violations);

        let (db, repo) = settled_store();
        db.transact(|tx| {
            repo.put_run(tx, "u", &rec(run("r2", Some(1), &["b2"], 125, false, None)))
        })
        .unwrap();
        let r = audit_store(&db, &repo, &["b1", "b2", "b3"]);
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("trained on 125 samples")),
            "{:?}",
            r.violations
        );
    }

    /// Retire [`settled_store`]'s published batch b1 with a reason ending in `was`.
    fn retire_b1(db: &Db, repo: &Repo, was: &str) {
        db.transact(|tx| {
            let mut b1 = repo.batch(tx, "u", "b1")?.unwrap();
            b1.status = BatchStatus::Retired {
                reason: format!("retention: old; {was}"),
            };
            repo.put_batch(tx, "u", "b1", &b1)
        })
        .unwrap();
    }

    #[test]
    fn a_published_batch_retired_later_is_settled() {
        let (db, repo) = settled_store();
        retire_b1(&db, &repo, "was published as version 1");
        let r = audit_with(&db, &repo, &settled_events(), &Expect::default());
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.retired, r.lost), (1, 0));
        // A poisoned batch is caught after it was retired too.
        let poisoned = Expect {
            poisoned: [("u".to_string(), "b1".to_string())].into(),
            ..Expect::default()
        };
        let r = audit_with(&db, &repo, &settled_events(), &poisoned);
        assert_eq!(r.poisoned_published, 1, "{:?}", r.violations);
    }

    /// The events of [`settled_store`]'s history.
    fn settled_events() -> Events {
        let u = || UserId::new("u").unwrap();
        let b = |id: &str| BatchId::new(id).unwrap();
        let at = |es: Vec<Event>| -> Vec<(u32, u64, Event)> {
            es.into_iter()
                .enumerate()
                .map(|(i, e)| (0, i as u64, e))
                .collect()
        };
        Events {
            batches: at(["b1", "b2", "b3"]
                .iter()
                .map(|id| Event::BatchStaged {
                    user: u(),
                    batch_id: b(id),
                    samples: 1,
                })
                .collect()),
            candidates: at(vec![
                Event::CandidateTrained {
                    user: u(),
                    run_id: "r1".into(),
                    batches: vec![b("b1")],
                },
                Event::CandidateTrained {
                    user: u(),
                    run_id: "r2".into(),
                    batches: vec![b("b2")],
                },
            ]),
            verdicts: at(vec![
                Event::CandidateAccepted {
                    user: u(),
                    run_id: "r1".into(),
                },
                Event::CandidateRejected {
                    user: u(),
                    run_id: "r2".into(),
                    reason: "no gain".into(),
                },
            ]),
            published: at(vec![Event::ModelPublished {
                user: u(),
                run_id: "r1".into(),
                version: 1,
            }]),
            dead_letters: Vec::new(),
        }
    }

    fn audit_with(db: &Db, repo: &Repo, events: &Events, expect: &Expect) -> AuditReport {
        audit(
            db,
            repo,
            &user(&["b1", "b2", "b3"]),
            None,
            Some(events),
            expect,
        )
        .unwrap()
    }

    #[test]
    fn the_store_and_its_events_pass_together() {
        let (db, repo) = settled_store();
        let expect = Expect {
            min_versions: 1,
            poisoned: [("u".to_string(), "b2".to_string())].into(),
            max_dead_letters: 0,
            ..Expect::default()
        };
        let r = audit_with(&db, &repo, &settled_events(), &expect);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert!(r.events_checked);
    }

    /// The `i`th event of a stream delivered once more.
    fn twice(stream: &mut Vec<(u32, u64, Event)>, i: usize) {
        let again = stream[i].2.clone();
        stream.push((0, 9, again));
    }

    /// Each check, shown to catch what it is for: the same store and events, broken in
    /// one way, fail with the check's words.
    #[test]
    fn every_check_catches_what_it_is_for() {
        type Break = fn(&Db, &Repo, &mut Events, &mut Expect);
        let cases: Vec<(&str, Break, &str)> = vec![
            // An effect applied twice that overwrote its own key: a run trained again.
            (
                "a run trained again",
                |_, _, e, _| twice(&mut e.candidates, 0),
                "trained twice",
            ),
            (
                "a run published without an accepting verdict",
                |_, _, e, _| {
                    e.published.push((
                        0,
                        9,
                        Event::ModelPublished {
                            user: UserId::new("u").unwrap(),
                            run_id: "r2".into(),
                            version: 2,
                        },
                    ));
                },
                "without an accepting verdict",
            ),
            (
                "two verdicts for one run",
                |_, _, e, _| twice(&mut e.verdicts, 1),
                "two verdicts",
            ),
            (
                "a run without a verdict",
                |_, _, e, _| {
                    e.verdicts.remove(1);
                },
                "has no verdict",
            ),
            (
                "a version published twice",
                |_, _, e, _| twice(&mut e.published, 0),
                "published twice",
            ),
            (
                "a stored version the events never published",
                |_, _, e, _| {
                    e.published.clear();
                },
                "ModelPublished events",
            ),
            (
                "an accepted batch with no BatchStaged event",
                |_, _, e, _| {
                    e.batches.remove(2);
                },
                "no BatchStaged event",
            ),
            (
                "a rejected batch whose run's verdict accepted",
                |db, repo, _, _| {
                    db.transact(|tx| {
                        repo.put_run(tx, "u", &rec(run("r2", Some(1), &["b2"], 120, true, None)))
                    })
                    .unwrap();
                },
                "whose verdict does not reject",
            ),
            (
                "a poisoned batch published",
                |_, _, _, x| {
                    x.poisoned.insert(("u".to_string(), "b1".to_string()));
                },
                "poisoned batch b1 published",
            ),
            (
                "a run that published too little to prove anything",
                |_, _, _, x| {
                    x.min_versions = 2;
                },
                "fewer than the 2",
            ),
            (
                "a run that trained on more than the retention budget",
                |_, _, _, x| {
                    x.max_training_windows = 10;
                },
                "trained on",
            ),
            (
                "a published batch retired as if it were another version's",
                |db, repo, _, _| retire_b1(db, repo, "was published as version 7"),
                "retired as",
            ),
            (
                "dead letters nobody fed in",
                |_, _, e, _| {
                    e.dead_letters.push(json!({"reason": "x"}));
                },
                "dead letters",
            ),
        ];
        for (what, breaks, words) in cases {
            let (db, repo) = settled_store();
            let mut events = settled_events();
            let mut expect = Expect::default();
            breaks(&db, &repo, &mut events, &mut expect);
            let r = audit_with(&db, &repo, &events, &expect);
            assert!(
                r.violations.iter().any(|v| v.contains(words)),
                "{what}: not caught ({words:?} not in {:?})",
                r.violations
            );
        }
    }
}
