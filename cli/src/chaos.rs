//! `swimlane chaos`: a seeded chaos soak. The workers run as separate processes (one
//! ingest, two trainers, one validator, one publisher) on a fresh embedded store, over
//! the embedded bus or Kafka (an external broker, or a tansu broker this command starts
//! and restarts). Simulated devices upload batches through the ingest API (a share of
//! them poisoned: labels shuffled) while a killer SIGKILLs a worker at a random moment,
//! restarting it at once, every worker kind in turn in a shuffled order, and, with
//! tansu, restarts the broker. When every accepted batch has settled, [`crate::audit`]
//! checks the store, the events (the embedded log, or the Kafka topics), the APIs, that
//! no poisoned batch was published and that at least half the swimmers got a version.
//! The schedule is drawn from the seed and printed, so
//! a failing seed replays the same kills (process timing still varies).
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use swimlane_core::keys::Keys;
use swimlane_core::records::BatchStatus;
use swimlane_core::UserId;
use swimlane_model::synth::{corrections, derive_seed, poison, Swimmer};
use swimlane_model::MicroModel;
use swimlane_runtime::Config;
use swimlane_state::Repo;
use swimlane_store::Db;

use crate::audit::{audit, AuditReport, AuditUser, Events, Expect};
use crate::client::Device;
use crate::procfleet::{free_port, FleetSpec, ProcFleet};

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The `swimlane` binary (built with `--features kafka` for Kafka).
    pub exe: PathBuf,
    /// `embedded` or `kafka://host:port` (an external broker; not restarted).
    pub bus: String,
    /// Start a tansu broker from this binary (in the scratch directory, sqlite
    /// storage) and run over it, restarting it `broker_restarts` times.
    pub tansu: Option<PathBuf>,
    pub users: usize,
    pub batches: usize,
    pub kills: usize,
    pub broker_restarts: usize,
    pub poison_rate: f64,
    pub seed: u64,
    pub trainers: usize,
    /// Where the scratch directory goes (default: the system temporary directory).
    pub dir: Option<PathBuf>,
    /// Keep the scratch directory (store, logs) after the run.
    pub keep: bool,
}

/// The JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub bus: String,
    pub users: usize,
    pub batches_uploaded: usize,
    pub poisoned_uploaded: usize,
    /// Upload attempts that met a dead ingest (transport error or 5xx) and were
    /// retried with the same batch id.
    pub upload_attempts_interrupted: usize,
    pub kills: BTreeMap<String, usize>,
    pub kills_total: usize,
    pub broker_restarts: usize,
    /// Longest time from a SIGKILL until the restarted worker answered `/readyz`
    /// again (its store open, its consumer started; partitions then move to it, or to
    /// the surviving trainer, within a lease time to live).
    pub longest_recovery_ms: u64,
    pub seconds: f64,
    pub lost: usize,
    pub duplicated: usize,
    pub violations: usize,
    pub audit: AuditReport,
    /// Where the store and logs were kept (`--keep`, or on violations).
    pub kept_dir: Option<String>,
}

const DEPLOYMENT: &str = "chaos";
const OBSERVED: usize = 300;
const MAX_CORRECTIONS: usize = 150;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1800);
/// A seed domain for the devices' data ("chaos").
const DATA_DOMAIN: u64 = 0x63_6861_6f73;

/// A tansu broker this command owns.
struct Broker {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    starts: usize,
}

impl Broker {
    fn start(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("tansu-{}.log", self.starts)))?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "tansu did not listen in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One scheduled fault.
#[derive(Clone, Debug)]
enum Fault {
    /// SIGKILL fleet slot `slot` (a worker kind's instance) after `after_ms`.
    Kill { slot: usize, after_ms: u64 },
    /// Restart the broker after `after_ms`.
    Broker { after_ms: u64 },
}

/// Run the soak and audit it. The report says what was found; the caller decides to
/// fail on violations.
pub fn run(opts: &ChaosOptions) -> anyhow::Result<ChaosReport> {
    anyhow::ensure!(
        opts.users >= 1 && opts.batches >= opts.users,
        "--batches must be at least --users (>= 1)"
    );
    anyhow::ensure!((1..=8).contains(&opts.trainers), "--trainers: 1 to 8");
    anyhow::ensure!(
        opts.broker_restarts == 0 || opts.tansu.is_some(),
        "--broker-restarts needs --tansu (a broker this command starts)"
    );
    let t0 = Instant::now();
    let tmp = match &opts.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let mut broker = None;
    let bus = match &opts.tansu {
        Some(bin) => {
            let port = free_port()?.port();
            let dir = tmp.path().join("tansu");
            std::fs::create_dir_all(&dir)?;
            let mut b = Broker {
                bin: bin.clone(),
                dir,
                port,
                child: None,
                starts: 0,
            };
            b.start()?;
            broker = Some(b);
            format!("kafka://127.0.0.1:{port}")
        }
        None => opts.bus.clone(),
    };
    let kafka = bus != "embedded";
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let config = Config {
        deployment: DEPLOYMENT.into(),
        store: tmp.path().join("store").display().to_string(),
        bus: bus.clone(),
        topic_prefix: format!("chaos-{}-{nanos}.", std::process::id()),
        ..Config::default()
    };
    config.validate()?;
    swimlane_runtime::wiring::create_topics(&config, 1)?;
    let db = swimlane_runtime::open_store(&config)?;
    eprintln!(
        "chaos: seed {} (--seed {} replays the schedule); bus {bus}",
        opts.seed, opts.seed
    );
    eprintln!("training the base model...");
    let (base, _) = swimlane_model::experiment::train_default_base(opts.seed)?;
    crate::init::install(&db, DEPLOYMENT, opts.seed, Some(base.clone()))?;
    let repo = Repo::new(Keys::new(DEPLOYMENT));
    let users: Vec<String> = (0..opts.users).map(|i| format!("swimmer-{i:03}")).collect();
    let mut tokens = Vec::new();
    for u in &users {
        let token = swimlane_state::tokens::new_token();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let id = UserId::new(u.clone())?;
        db.transact(|tx| repo.put_token(tx, &id, &token, now))?;
        tokens.push(token);
    }

    // Leases short enough that a killed worker's partitions move within seconds (the
    // Kafka session timeout follows them; 3 s is what the tests use against tansu).
    let ttl = if kafka { "3000" } else { "1500" };
    let env: Vec<(String, String)> = vec![
        ("SWIMLANE_STORE".into(), config.store.clone()),
        ("SWIMLANE_DEPLOYMENT".into(), DEPLOYMENT.into()),
        ("SWIMLANE_BUS".into(), bus.clone()),
        ("SWIMLANE_TOPIC_PREFIX".into(), config.topic_prefix.clone()),
        ("SWIMLANE_LOG".into(), "info".into()),
        ("SWIMLANE_TRAINER_CONSUMER_LEASE_TTL_MS".into(), ttl.into()),
        (
            "SWIMLANE_VALIDATOR_CONSUMER_LEASE_TTL_MS".into(),
            ttl.into(),
        ),
        (
            "SWIMLANE_PUBLISHER_CONSUMER_LEASE_TTL_MS".into(),
            ttl.into(),
        ),
    ];
    let mut fleet = ProcFleet::new(
        FleetSpec {
            exe: opts.exe.clone(),
            env,
            log_dir: tmp.path().join("logs"),
        },
        opts.trainers,
    )?;
    fleet.start_all(Duration::from_secs(120))?;

    // The schedule: every kind in turn, in a shuffled order, at random moments.
    let mut sched = ChaCha8Rng::seed_from_u64(opts.seed);
    let slots_of = |kind: &str| -> Vec<usize> {
        fleet
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.kind == kind)
            .map(|(i, _)| i)
            .collect()
    };
    let kinds = ["ingest", "trainer", "validator", "publisher"];
    let mut order: Vec<&str> = (0..opts.kills).map(|k| kinds[k % kinds.len()]).collect();
    order.shuffle(&mut sched);
    let mut faults: Vec<Fault> = order
        .iter()
        .map(|kind| {
            let slots = slots_of(kind);
            Fault::Kill {
                slot: slots[sched.random_range(0..slots.len())],
                after_ms: sched.random_range(300..2500),
            }
        })
        .collect();
    for k in 0..opts.broker_restarts {
        let at = (k + 1) * faults.len() / (opts.broker_restarts + 1);
        faults.insert(
            at.min(faults.len()),
            Fault::Broker {
                after_ms: sched.random_range(300..2500),
            },
        );
    }
    eprintln!("schedule (seed {}):", opts.seed);
    for (i, f) in faults.iter().enumerate() {
        match f {
            Fault::Kill { slot, after_ms } => {
                eprintln!(
                    "  {i:3}: +{after_ms:4} ms kill {}",
                    fleet.members[*slot].name
                )
            }
            Fault::Broker { after_ms } => eprintln!("  {i:3}: +{after_ms:4} ms restart the broker"),
        }
    }

    // The devices: batches in night order, a few uploads at a time, each retried with
    // the same id until accepted.
    let nights = opts.batches.div_ceil(opts.users);
    let plan: Vec<(usize, usize)> = (0..nights)
        .flat_map(|n| (0..opts.users).map(move |u| (u, n)))
        .take(opts.batches)
        .collect();
    let next = AtomicUsize::new(0);
    let interrupted = AtomicUsize::new(0);
    let poisoned: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
    let accepted: Mutex<BTreeMap<usize, BTreeSet<String>>> = Mutex::new(BTreeMap::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let ingest = fleet.ingest_url();
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut longest_recovery = Duration::ZERO;
    let mut restarts = 0;
    let outcome: anyhow::Result<()> = std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let http = ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(1))
                    .timeout(Duration::from_secs(30))
                    .build();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(u, n)) = plan.get(i) else { break };
                    let (body, bad) = device_batch(&base, opts, u, n);
                    if bad {
                        poisoned
                            .lock()
                            .unwrap()
                            .insert((users[u].clone(), format!("night-{n}")));
                    }
                    let device = Device {
                        agent: http.clone(),
                        ..Device::new(&ingest, "", &users[u], &tokens[u])
                    };
                    let deadline = Instant::now() + Duration::from_secs(600);
                    match device.upload_until_accepted(&body, deadline, None) {
                        Ok(n) => {
                            interrupted.fetch_add(n, Ordering::SeqCst);
                        }
                        Err(e) => {
                            *failure.lock().unwrap() = Some(e.to_string());
                            return;
                        }
                    }
                    accepted
                        .lock()
                        .unwrap()
                        .entry(u)
                        .or_default()
                        .insert(format!("night-{n}"));
                }
            });
        }
        // The killer, on this thread.
        let r = (|| -> anyhow::Result<()> {
            for (i, f) in faults.iter().enumerate() {
                let after_ms = match f {
                    Fault::Kill { after_ms, .. } | Fault::Broker { after_ms } => *after_ms,
                };
                std::thread::sleep(Duration::from_millis(after_ms));
                if let Some(e) = failure.lock().unwrap().clone() {
                    anyhow::bail!("a device failed: {e}");
                }
                match f {
                    Fault::Kill { slot, .. } => {
                        let pid = fleet.kill(*slot)?;
                        let killed = Instant::now();
                        fleet.spawn(*slot)?;
                        fleet.wait_ready(*slot, Duration::from_secs(120))?;
                        let took = killed.elapsed();
                        longest_recovery = longest_recovery.max(took);
                        let m = &fleet.members[*slot];
                        *kills.entry(m.kind.to_string()).or_default() += 1;
                        eprintln!(
                            "[{:7.1}s] fault {i}: killed {} (pid {pid}); ready again in {} ms; {} of {} batches handed out",
                            t0.elapsed().as_secs_f64(),
                            m.name,
                            took.as_millis(),
                            next.load(Ordering::SeqCst).min(plan.len()),
                            plan.len()
                        );
                    }
                    Fault::Broker { .. } => {
                        let b = broker.as_mut().expect("checked: --tansu");
                        b.kill();
                        // The broker stays down a moment, as after a crash.
                        std::thread::sleep(Duration::from_millis(500));
                        b.start()?;
                        restarts += 1;
                        eprintln!(
                            "[{:7.1}s] fault {i}: restarted the broker",
                            t0.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            Ok(())
        })();
        r
    });
    outcome?;
    if let Some(e) = failure.lock().unwrap().clone() {
        anyhow::bail!("a device failed: {e}");
    }
    let accepted = accepted.into_inner().unwrap();
    let uploaded: usize = accepted.values().map(|b| b.len()).sum();
    anyhow::ensure!(
        uploaded == plan.len(),
        "only {uploaded} of {} uploads accepted",
        plan.len()
    );
    eprintln!(
        "[{:7.1}s] all {uploaded} uploads accepted, {} faults done; waiting for the pipeline to settle",
        t0.elapsed().as_secs_f64(),
        faults.len()
    );
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        fleet.check_alive()?;
        let open = unsettled(&db, &repo, &users, &accepted)?;
        if open == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{open} batches not settled after {SETTLE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("[{:7.1}s] settled; auditing", t0.elapsed().as_secs_f64());
    let audit_users = AuditUser::each(&users, &tokens, |i| {
        accepted.get(&i).cloned().unwrap_or_default()
    });
    let (ingest_url, publisher_url) = (fleet.ingest_url(), fleet.publisher_url());
    let events = match bus.strip_prefix("kafka://") {
        None => Events::from_log(&db, &repo, config.partitions)?,
        Some(bootstrap) => read_kafka_events(&db, &repo, bootstrap, &config)?,
    };
    let poisoned = poisoned.into_inner().unwrap();
    let expect = Expect {
        // Every other swimmer's model improves at least once in a soak this long.
        min_versions: (opts.users as u64 / 2).min(uploaded as u64 / 4),
        poisoned: poisoned.clone(),
        max_dead_letters: 0,
        max_training_windows: config.retention.max_training_windows.into(),
    };
    let a = audit(
        &db,
        &repo,
        &audit_users,
        Some((&ingest_url, &publisher_url)),
        Some(&events),
        &expect,
    )?;
    drop(fleet);
    drop(broker);
    let keep = opts.keep || !a.violations.is_empty();
    let kept_dir = keep.then(|| tmp.keep().display().to_string());
    Ok(ChaosReport {
        seed: opts.seed,
        bus: if opts.tansu.is_some() {
            "kafka (tansu, started by the soak)".into()
        } else {
            bus
        },
        users: opts.users,
        batches_uploaded: uploaded,
        poisoned_uploaded: poisoned.len(),
        upload_attempts_interrupted: interrupted.into_inner(),
        kills_total: kills.values().sum(),
        kills,
        broker_restarts: restarts,
        longest_recovery_ms: longest_recovery.as_millis() as u64,
        seconds: (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        lost: a.lost,
        duplicated: a.duplicated,
        violations: a.violations.len(),
        audit: a,
        kept_dir,
    })
}

/// The Kafka topics' events (feature `kafka`).
#[cfg(feature = "kafka")]
fn read_kafka_events(
    db: &Db,
    repo: &Repo,
    bootstrap: &str,
    config: &Config,
) -> anyhow::Result<Events> {
    Events::from_kafka(db, repo, bootstrap, &config.topic_prefix, config.partitions)
}

#[cfg(not(feature = "kafka"))]
fn read_kafka_events(_: &Db, _: &Repo, _: &str, _: &Config) -> anyhow::Result<Events> {
    anyhow::bail!("auditing a Kafka bus needs the `kafka` feature")
}

/// Device `u`'s batch of night `n`: corrections of the base model on fresh windows of
/// its swimmer, or (with probability `poison_rate`) the same windows with their labels
/// shuffled. Deterministic in (seed, u, n). Returns the upload body and whether it is
/// poisoned.
fn device_batch(base: &MicroModel, opts: &ChaosOptions, u: usize, n: usize) -> (Vec<u8>, bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
        opts.seed,
        DATA_DOMAIN,
        (u * 100_000 + n) as u64,
    ));
    let swimmer = Swimmer::new(derive_seed(opts.seed, DATA_DOMAIN + 1, u as u64));
    let bad = rng.random_bool(opts.poison_rate.clamp(0.0, 1.0));
    let samples = if bad {
        let w = swimmer.windows(MAX_CORRECTIONS, &mut rng);
        poison(&w, &mut rng)
    } else {
        corrections(base, &swimmer, OBSERVED, MAX_CORRECTIONS, &mut rng).unwrap_or_default()
    };
    let samples = if samples.is_empty() {
        swimmer.windows(20, &mut rng)
    } else {
        samples
    };
    (
        crate::upload::upload_body(&format!("night-{n}"), &samples),
        bad,
    )
}

/// Accepted batches not yet settled (or users with a run in flight).
fn unsettled(
    db: &Db,
    repo: &Repo,
    users: &[String],
    accepted: &BTreeMap<usize, BTreeSet<String>>,
) -> anyhow::Result<usize> {
    Ok(db.transact(|tx| {
        let mut open = 0;
        for (u, batches) in accepted {
            let name = &users[*u];
            if repo.user_state(tx, name)?.inflight_run.is_some() {
                open += 1;
            }
            for b in batches {
                match repo.batch(tx, name, b)? {
                    Some(r)
                        if r.status.is_terminal()
                            || matches!(r.status, BatchStatus::Deferred { .. }) => {}
                    _ => open += 1,
                }
            }
        }
        Ok(open)
    })?)
}
