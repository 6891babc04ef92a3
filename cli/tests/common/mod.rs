//! Shared by the multi-process tests: a fleet of `swimlane worker …` child processes on
//! one embedded store, each on its own ports, killed when the fleet is dropped (also on
//! panic); a device's HTTP client; reads of the store and of the embedded log.
#![allow(dead_code)]

pub mod checks;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use swimlane_bus::embedded::EmbeddedBus;
use swimlane_bus::positions;
use swimlane_core::keys::Keys;
use swimlane_model::MicroModel;
use swimlane_runtime::Config;
use swimlane_state::{Repo, BASE_MODEL_BLOB};
use swimlane_store::Db;

/// The four worker kinds, in pipeline order.
pub use swimlane_runtime::Worker as Kind;

/// Addresses of every listener of the fleet.
#[derive(Clone, Debug)]
pub struct Ports {
    pub ingest_api: SocketAddr,
    pub ingest_ops: SocketAddr,
    pub trainer_ops: SocketAddr,
    pub validator_ops: SocketAddr,
    pub publisher_api: SocketAddr,
    pub publisher_ops: SocketAddr,
}

impl Ports {
    /// Free ports on 127.0.0.1, all different and outside the range outgoing
    /// connections take their ports from ([`swimlane_cli::procfleet::free_port`]).
    pub fn pick() -> Ports {
        let a: Vec<SocketAddr> = (0..6)
            .map(|_| swimlane_cli::procfleet::free_port().expect("a free port"))
            .collect();
        Ports {
            ingest_api: a[0],
            ingest_ops: a[1],
            trainer_ops: a[2],
            validator_ops: a[3],
            publisher_api: a[4],
            publisher_ops: a[5],
        }
    }
    pub fn ops(&self, k: Kind) -> SocketAddr {
        match k {
            Kind::Ingest => self.ingest_ops,
            Kind::Trainer => self.trainer_ops,
            Kind::Validator => self.validator_ops,
            Kind::Publisher => self.publisher_ops,
        }
    }
}

pub const DEPLOYMENT: &str = "proc-test";

/// The test's seed: `var` from the environment (to try another schedule), else a
/// fixed one, so that a run is the same schedule every time (the test prints it).
pub fn seed_from(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{var} is a number, not {s:?}")),
        Err(_) => 20_261_202,
    }
}

/// The night-by-night scenario the process tests (crash, Kafka) play.
pub mod nights {
    /// Swimmers.
    pub const USERS: usize = 6;
    /// Windows the phone classifies on the first night, and the most corrections it
    /// uploads.
    pub const OBSERVED: usize = 300;
    /// After the first night the models make fewer mistakes: the phone observes more
    /// windows, so that later nights still bring enough corrections to publish.
    pub const OBSERVED_LATER: usize = 1500;
    pub const MAX_CORRECTIONS: usize = 200;
    /// Config default: every process agrees on it.
    pub const PARTITIONS: u32 = 8;
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_swimlane")
}

struct Slot {
    child: Option<Child>,
    /// Processes started for this member so far (names the log files).
    started: usize,
}

/// One worker process slot: its kind and its instance number (0 for the first).
/// Instance 0 listens on [`Fleet::ports`]; others get their own ops (and API) ports.
pub type Member = (Kind, usize);

/// Worker processes on one store in a temporary directory, over the embedded bus or,
/// with [`Fleet::kafka`], over Kafka. Dropping it kills every child (SIGKILL) and
/// waits for them; when dropped by a panic it also prints the workers' warnings and
/// keeps the directory (store and logs) for a look.
pub struct Fleet {
    dir: Option<tempfile::TempDir>,
    pub ports: Ports,
    env: Vec<(String, String)>,
    slots: Mutex<BTreeMap<Member, Slot>>,
    /// Ops addresses of instances other than 0.
    extra_ops: Mutex<BTreeMap<Member, SocketAddr>>,
}

impl Fleet {
    /// A fresh store set up with `swimlane admin init`; no worker running yet.
    /// `extra_env`: more `SWIMLANE_*` settings for every worker.
    pub fn new(extra_env: &[(&str, &str)]) -> Fleet {
        let fleet = Fleet::uninitialised(extra_env);
        let out = fleet.admin(&["init"]);
        assert!(out.contains("installed"), "admin init: {out}");
        fleet
    }

    /// Like [`Fleet::new`] without `swimlane admin init`: no base model, no guard set.
    pub fn uninitialised(extra_env: &[(&str, &str)]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let ports = Ports::pick();
        let store = dir.path().join("store");
        let mut env: Vec<(String, String)> = vec![
            ("SWIMLANE_STORE".into(), store.display().to_string()),
            ("SWIMLANE_DEPLOYMENT".into(), DEPLOYMENT.into()),
            ("SWIMLANE_LOG".into(), "info".into()),
            (
                "SWIMLANE_INGEST_LISTEN".into(),
                ports.ingest_api.to_string(),
            ),
            (
                "SWIMLANE_INGEST_METRICS_LISTEN".into(),
                ports.ingest_ops.to_string(),
            ),
            (
                "SWIMLANE_TRAINER_METRICS_LISTEN".into(),
                ports.trainer_ops.to_string(),
            ),
            (
                "SWIMLANE_VALIDATOR_METRICS_LISTEN".into(),
                ports.validator_ops.to_string(),
            ),
            (
                "SWIMLANE_PUBLISHER_LISTEN".into(),
                ports.publisher_api.to_string(),
            ),
            (
                "SWIMLANE_PUBLISHER_METRICS_LISTEN".into(),
                ports.publisher_ops.to_string(),
            ),
        ];
        for (k, v) in extra_env {
            env.retain(|(k2, _)| k2 != k);
            env.push((k.to_string(), v.to_string()));
        }
        Fleet {
            dir: Some(dir),
            ports,
            env,
            slots: Mutex::new(BTreeMap::new()),
            extra_ops: Mutex::new(BTreeMap::new()),
        }
    }

    /// Like [`Fleet::new`], on the Kafka bus at `bootstrap` (`host:port`), with topics
    /// and groups of a prefix of their own (so tests can share a broker), created by
    /// `swimlane admin create-topics`.
    pub fn kafka(bootstrap: &str, extra_env: &[(&str, &str)]) -> Fleet {
        let prefix = unique_prefix();
        let bus = format!("kafka://{bootstrap}");
        let mut env: Vec<(&str, &str)> = vec![
            ("SWIMLANE_BUS", bus.as_str()),
            ("SWIMLANE_TOPIC_PREFIX", prefix.as_str()),
        ];
        env.extend_from_slice(extra_env);
        let fleet = Fleet::new(&env);
        let out = fleet.admin(&["create-topics"]);
        assert!(out.contains(&prefix), "admin create-topics: {out}");
        fleet
    }

    /// The value of a `SWIMLANE_*` setting every worker gets, if set.
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The fleet's directory: `store/` and `logs/`.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("until dropped").path()
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir().join("store")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(bin());
        // Only our settings: a stray SWIMLANE_* variable would change the config (or,
        // unknown, be refused).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SWIMLANE_") {
                c.env_remove(k);
            }
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        // An error's message, not a backtrace, in the worker's log: the log's tail is
        // what a failing test shows (panics keep their backtraces).
        c.env("RUST_LIB_BACKTRACE", "0");
        c
    }

    /// Run `swimlane admin ARGS --store DIR` and return its standard output.
    pub fn admin(&self, args: &[&str]) -> String {
        let mut c = self.command();
        c.arg("admin").args(args);
        c.arg("--store").arg(self.store_path());
        let out = c.output().expect("run swimlane admin");
        assert!(
            out.status.success(),
            "swimlane admin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A new device token for `user`, through `swimlane admin token create`.
    pub fn token(&self, user: &str) -> String {
        let out = self.admin(&["token", "create", "--user", user]);
        let t = out.trim().to_string();
        assert!(t.starts_with("swl_"), "token create printed {out:?}");
        t
    }

    fn log_path(&self, m: Member, n: usize) -> PathBuf {
        let name = match m.1 {
            0 => m.0.name().to_string(),
            i => format!("{}.{i}", m.0.name()),
        };
        self.dir().join("logs").join(format!("{name}-{n}.log"))
    }

    /// The ops (`/metrics`, `/readyz`) address of a member.
    pub fn ops(&self, m: Member) -> SocketAddr {
        if m.1 == 0 {
            return self.ports.ops(m.0);
        }
        *self
            .extra_ops
            .lock()
            .unwrap()
            .entry(m)
            .or_insert_with(|| swimlane_cli::procfleet::free_port().expect("a free port"))
    }

    /// Start a `k` worker, instance 0 (there must be none running); does not wait for
    /// readiness.
    pub fn spawn(&self, k: Kind) -> u32 {
        self.spawn_member((k, 0))
    }

    /// Start worker `m` (it must not be running); does not wait for readiness.
    /// Instances other than 0 of ingest and publisher are not supported (their API
    /// ports are fixed).
    pub fn spawn_member(&self, m: Member) -> u32 {
        assert!(
            m.1 == 0 || matches!(m.0, Kind::Trainer | Kind::Validator),
            "one {} per fleet",
            m.0.name()
        );
        let ops = self.ops(m);
        let mut slots = self.slots.lock().unwrap();
        let slot = slots.entry(m).or_insert(Slot {
            child: None,
            started: 0,
        });
        assert!(slot.child.is_none(), "{m:?} already running");
        slot.started += 1;
        let log = std::fs::File::create(self.log_path(m, slot.started)).unwrap();
        let mut c = self.command();
        c.args(["worker", m.0.name()])
            .env(
                format!(
                    "SWIMLANE_{}_METRICS_LISTEN",
                    m.0.name().to_ascii_uppercase()
                ),
                ops.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = c.spawn().expect("spawn swimlane worker");
        let pid = child.id();
        slot.child = Some(child);
        pid
    }

    /// Wait until the `k` worker (instance 0) answers 200 on `/readyz`; panics (with
    /// its log) if it exits or is not ready in time.
    pub fn wait_ready(&self, k: Kind, within: Duration) {
        self.wait_member_ready((k, 0), within)
    }

    /// Wait until worker `m` answers 200 on `/readyz`; panics (with its log) if it
    /// exits or is not ready in time.
    pub fn wait_member_ready(&self, m: Member, within: Duration) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let url = format!("http://{}/readyz", self.ops(m));
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = agent.get(&url).call() {
                if r.status() == 200 {
                    return;
                }
            }
            {
                let mut slots = self.slots.lock().unwrap();
                if let Some(slot) = slots.get_mut(&m) {
                    if let Some(c) = slot.child.as_mut() {
                        if let Ok(Some(st)) = c.try_wait() {
                            let n = slot.started;
                            drop(slots);
                            panic!(
                                "{m:?} worker exited ({st}) before it was ready; its log:\n{}",
                                self.log_tail(m, n)
                            );
                        }
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "{m:?} not ready within {within:?}; its log:\n{}",
                self.log_tail(m, self.started_member(m))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn started(&self, k: Kind) -> usize {
        self.started_member((k, 0))
    }

    pub fn started_member(&self, m: Member) -> usize {
        self.slots
            .lock()
            .unwrap()
            .get(&m)
            .map(|s| s.started)
            .unwrap_or(0)
    }

    /// Start all four workers and wait until each is ready.
    pub fn start_all(&self) {
        for k in Kind::ALL {
            self.spawn(k);
        }
        for k in Kind::ALL {
            self.wait_ready(k, Duration::from_secs(60));
        }
    }

    /// SIGKILL the running `k` worker (instance 0) and reap it; returns its pid.
    /// Panics if it had already exited (a worker must never die on its own).
    pub fn kill(&self, k: Kind) -> u32 {
        self.kill_member((k, 0))
    }

    /// SIGKILL the running worker `m` and reap it; returns its pid. Panics if it had
    /// already exited (a worker must never die on its own).
    pub fn kill_member(&self, m: Member) -> u32 {
        let mut slots = self.slots.lock().unwrap();
        let slot = slots.get_mut(&m).expect("worker started");
        let mut child = slot.child.take().expect("worker running");
        if let Ok(Some(st)) = child.try_wait() {
            let n = slot.started;
            drop(slots);
            panic!(
                "{m:?} worker had exited on its own ({st}); its log:\n{}",
                self.log_tail(m, n)
            );
        }
        let pid = child.id();
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        pid
    }

    /// Check that every running worker is still alive.
    pub fn assert_alive(&self) {
        let mut slots = self.slots.lock().unwrap();
        let mut dead = Vec::new();
        for (m, slot) in slots.iter_mut() {
            if let Some(c) = slot.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    dead.push((*m, slot.started, st));
                }
            }
        }
        drop(slots);
        if let Some((m, n, st)) = dead.first() {
            panic!(
                "{m:?} worker exited on its own ({st}); its log:\n{}",
                self.log_tail(*m, *n)
            );
        }
    }

    /// The whole `n`-th log of worker `m` (empty if there is none yet).
    pub fn log(&self, m: Member, n: usize) -> String {
        std::fs::read_to_string(self.log_path(m, n)).unwrap_or_default()
    }

    /// The pid of running worker `m`, if it runs.
    pub fn pid(&self, m: Member) -> Option<u32> {
        self.slots
            .lock()
            .unwrap()
            .get(&m)
            .and_then(|s| s.child.as_ref().map(|c| c.id()))
    }

    /// The last lines of the `n`-th log of worker `m`.
    pub fn log_tail(&self, m: Member, n: usize) -> String {
        let s = std::fs::read_to_string(self.log_path(m, n)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Every line at WARN or ERROR level in every worker log, with the log's name.
    pub fn warnings(&self) -> Vec<String> {
        let members: Vec<(Member, usize)> = self
            .slots
            .lock()
            .map(|s| s.iter().map(|(m, slot)| (*m, slot.started)).collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for (m, started) in members {
            for n in 1..=started {
                let s = std::fs::read_to_string(self.log_path(m, n)).unwrap_or_default();
                for l in s.lines().map(strip_ansi) {
                    if l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked") {
                        out.push(format!("{}.{}-{n}: {l}", m.0.name(), m.1));
                    }
                }
            }
        }
        out
    }

    /// The store, opened in this process (the embedded store is safe to share between
    /// processes).
    pub fn db(&self) -> Db {
        let mut config = Config::default();
        config.store = self.store_path().display().to_string();
        config.deployment = DEPLOYMENT.into();
        swimlane_runtime::open_store(&config).expect("open the store")
    }

    pub fn ingest_url(&self) -> String {
        format!("http://{}", self.ports.ingest_api)
    }
    pub fn publisher_url(&self) -> String {
        format!("http://{}", self.ports.publisher_api)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        for slot in slots.values_mut() {
            if let Some(mut c) = slot.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        drop(slots);
        if std::thread::panicking() {
            let w = self.warnings();
            eprintln!(
                "--- worker warnings and errors ({} lines, last 80) ---",
                w.len()
            );
            for l in &w[w.len().saturating_sub(80)..] {
                eprintln!("{l}");
            }
            if let Some(d) = self.dir.take() {
                eprintln!(
                    "--- store and worker logs kept in {} ---",
                    d.keep().display()
                );
            }
        }
    }
}

/// A topic prefix no other test run uses: `t<pid>-<nanos>-<n>.`.
pub fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "t{}-{nanos}-{}.",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `line` without terminal colour sequences (`ESC [ … m`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn keys() -> Keys {
    Keys::new(DEPLOYMENT)
}
pub fn repo() -> Repo {
    Repo::new(keys())
}

/// The deployment's base model, read from the store.
pub fn base_model(db: &Db) -> MicroModel {
    let bytes = db
        .transact(|tx| repo().blob(tx, BASE_MODEL_BLOB))
        .unwrap()
        .expect("base model installed");
    MicroModel::from_bytes(&bytes).unwrap()
}

pub use swimlane_cli::upload::upload_body;

/// An HTTP answer: status, headers we look at, body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }
}

/// One request; `Err` only for transport errors (connection refused or reset, …).
pub fn request(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Answer, String> {
    let mut req = agent.request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    for (k, v) in extra {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
        None => req.call(),
    };
    let r = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = r.status();
    let mut headers = BTreeMap::new();
    for name in r.headers_names() {
        if let Some(v) = r.header(&name) {
            headers.insert(name.to_ascii_lowercase(), v.to_string());
        }
    }
    let mut body = Vec::new();
    r.into_reader()
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .build()
}

/// Records a consumer group has not committed yet, over every partition of its topic.
pub fn backlog(db: &Db, k: Kind, partitions: u32) -> u64 {
    let Some((group, topic)) = k.input() else {
        return 0;
    };
    let bus = EmbeddedBus::new(keys(), partitions);
    let keys = keys();
    db.transact(|tx| {
        let mut n = 0;
        for p in 0..partitions {
            let hw = bus.high_watermark(tx, topic, p)?;
            let pos = positions::position(tx, &keys, group, topic, p)?;
            n += hw.saturating_sub(pos);
        }
        Ok(n)
    })
    .unwrap()
}

/// Whether `status` (the API's word) is one a batch rests in.
#[allow(unused_imports)] // not every test binary polls statuses
pub use swimlane_cli::client::settled;
