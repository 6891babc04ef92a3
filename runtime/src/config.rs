//! The one typed configuration of every swimlane process, and its layered loading.
//!
//! Layers, later ones win:
//! 1. defaults ([`Config::default`]): a configuration that runs on one machine;
//! 2. a TOML file, from `--config FILE` or `SWIMLANE_CONFIG` (optional);
//! 3. environment variables: every key has one, `SWIMLANE_` followed by the key path in
//!    upper case with `.` written as `_` (or `__`): `store` → `SWIMLANE_STORE`,
//!    `ingest.listen` → `SWIMLANE_INGEST_LISTEN`, `ingest.max_body_bytes` →
//!    `SWIMLANE_INGEST_MAX_BODY_BYTES` (also `SWIMLANE_INGEST__MAX_BODY_BYTES`),
//!    `trainer.consumer.lease_ttl_ms` → `SWIMLANE_TRAINER_CONSUMER_LEASE_TTL_MS`.
//!    [`env_names`] lists them all;
//! 4. command-line flags ([`Args`]): `--store`, `--bus`, and `--listen` /
//!    `--metrics-listen` for the running worker's section.
//!
//! Then [`Config::validate`]. Every error names the offending key and where its value
//! came from. Unknown keys are errors: in the file, and for `SWIMLANE_*` variables
//! (except the few in [`NON_CONFIG_ENV`], which are not config keys).
//!
//! Extending: add a field with a default to a section struct (or a new section with
//! `#[serde(deny_unknown_fields, default)]`). Every key needs a default value (no
//! `Option`s: use an empty string for "none"), which is also how the loader knows the
//! key's type and environment name.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use swimlane_core::policy::{ProbationPolicy, RetentionPolicy, ValidationPolicy};

/// Environment variables with the `SWIMLANE_` prefix that are not config keys.
pub const NON_CONFIG_ENV: &[&str] = &[
    "SWIMLANE_CONFIG",
    "SWIMLANE_LOG",
    "SWIMLANE_LISTEN",
    "SWIMLANE_METRICS_LISTEN",
];

/// Most samples the store can take in one batch's transaction (10 MB limit; a
/// staged sample takes at most ~2.2 kB).
pub const MAX_SAMPLES_PER_BATCH_LIMIT: u32 = 4000;

/// Largest `ingest.max_inflight`: each upload in flight may hold a blocking thread and
/// up to `max_body_bytes` of memory.
pub const MAX_INFLIGHT_LIMIT: u32 = 10_000;

/// Most windows `retention.max_training_windows` and `retention.max_heldout_windows`
/// may keep: a run reads them in one transaction (about 40 MB of windows at most,
/// far more than a micro model needs; the defaults read under 2 MB).
pub const MAX_RETAINED_WINDOWS: u32 = 20_000;

/// The worker processes (each has a config section and a metrics prefix), in pipeline
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Worker {
    Ingest,
    Trainer,
    Validator,
    Publisher,
}

impl Worker {
    pub const ALL: [Worker; 4] = [
        Worker::Ingest,
        Worker::Trainer,
        Worker::Validator,
        Worker::Publisher,
    ];
    /// The section name and metric-name component (`swimlane_<name>_...`).
    pub fn name(self) -> &'static str {
        match self {
            Worker::Ingest => "ingest",
            Worker::Trainer => "trainer",
            Worker::Validator => "validator",
            Worker::Publisher => "publisher",
        }
    }

    /// The worker's binary (and container, and Kubernetes deployment) name.
    pub fn binary(self) -> &'static str {
        match self {
            Worker::Ingest => "swimlane-ingest",
            Worker::Trainer => "swimlane-trainer",
            Worker::Validator => "swimlane-validator",
            Worker::Publisher => "swimlane-publisher",
        }
    }

    /// What a consuming worker reads: its consumer group and its topic (ingest reads
    /// no topic).
    pub fn input(self) -> Option<(&'static str, &'static str)> {
        use swimlane_core::{groups, topics};
        match self {
            Worker::Ingest => None,
            Worker::Trainer => Some((groups::TRAINERS, topics::BATCHES)),
            Worker::Validator => Some((groups::VALIDATORS, topics::CANDIDATES)),
            Worker::Publisher => Some((groups::PUBLISHERS, topics::VERDICTS)),
        }
    }
}

/// Everything a swimlane process is configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root subspace of every key: several deployments can share one store.
    pub deployment: String,
    /// A path (embedded store, a directory), `fdb:` (FoundationDB, default cluster
    /// file) or `fdb:/path/to/fdb.cluster`.
    pub store: String,
    /// `embedded` (the log inside the store) or `kafka://host:port`.
    pub bus: String,
    /// Partitions per topic. Every process sharing a store must agree.
    pub partitions: u32,
    /// Embedded bus: entries of each log partition kept below the slowest consumer
    /// group's position; older ones are cleared as the consumers move on, so the log's
    /// disk stays bounded. 0: keep nothing every group has consumed.
    pub embedded_log_keep: u64,
    /// Kafka bus: prefix of every topic and consumer group name in Kafka
    /// (`<prefix>swimlane.batches`, ...), so several deployments can share one Kafka
    /// cluster. Characters `[A-Za-z0-9._-]`, at most 100.
    pub topic_prefix: String,
    /// SHA-256 (lowercase hex) of the admin bearer token; empty: no admin token. The
    /// token itself is never configured, logged or stored.
    pub admin_token_sha256: String,
    /// How log lines are written: `text` (for people; colour codes only when stderr
    /// is a terminal) or `json` (one JSON object a line, with the fields of the event
    /// and of every span it is in, e.g. `user_id` and `batch_id`).
    pub log_format: LogFormat,
    /// The model spec (window shape, channels, classes): a built-in name
    /// (`synthetic-pose`, `smartwatch`) or the path of a JSON spec file
    /// (`swimlane_core::ModelSpec`). Every process of a deployment must agree: ingest
    /// validates uploads against it and no model of another spec is trained on, scored
    /// or served.
    pub spec: String,
    pub ingest: IngestConfig,
    pub trainer: TrainerConfig,
    pub validator: ValidatorConfig,
    pub publisher: PublisherConfig,
    pub policy: PolicyConfig,
    /// How much of each user's history is kept and read (`[retention]`;
    /// `swimlane_core::policy::RetentionPolicy`). Every process of a deployment must
    /// agree: ingest retires by it, the trainer and the validator read by it.
    pub retention: RetentionPolicy,
    /// How a newly published version is watched on the user's next uploads and rolled
    /// back when significantly worse than its parent (`[probation]`;
    /// `swimlane_core::policy::ProbationPolicy`; the validator applies it).
    pub probation: ProbationPolicy,
}

/// `[ingest]`: the device-facing upload API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// Largest request body, before and after decompression.
    pub max_body_bytes: u64,
    pub max_samples_per_batch: u32,
    /// A request body must arrive within this long (slow clients get 408).
    pub body_timeout_ms: u64,
    /// A request's head (request line and headers) must arrive within this long, or
    /// the connection is closed (`swimlane_runtime::serve_draining`).
    pub header_timeout_ms: u64,
    /// On shutdown, in-flight requests get this long to finish; then the server stops
    /// (an unfinished staging transaction commits whole or not at all).
    pub drain_timeout_ms: u64,
    /// Most uploads handled at once (authenticating, reading, validating, staging);
    /// one more is answered 503 `overloaded` with `Retry-After`, having stored nothing.
    pub max_inflight: u32,
    /// Most uploads of one user in flight at once (once the caller is authenticated);
    /// one more is answered 429 `too_many_uploads` with `Retry-After`, having stored
    /// nothing, so that one device cannot hold every place of `max_inflight`.
    pub max_inflight_per_user: u32,
    /// Slowest body accepted, in bytes per second after `body_grace_ms`: a body that
    /// has not reached `body_grace_ms + bytes so far / min_body_bytes_per_sec` is cut
    /// with 408 `body_too_slow` and its place freed. 0: no rate rule (only
    /// `body_timeout_ms`).
    pub min_body_bytes_per_sec: u64,
    /// Time a body gets before the rate rule applies.
    pub body_grace_ms: u64,
    /// Most uploads one user may stage per UTC day; one more is answered 429
    /// `daily_cap` with `Retry-After` (the time to midnight UTC), having stored
    /// nothing. 0: no cap.
    pub max_uploads_per_day: u32,
}

/// A stage's bus consumer settings (`[trainer.consumer]`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// A dead member's partitions move to others after this long (embedded bus: the
    /// partition lease's time to live; Kafka bus: the group's session timeout, which
    /// a Kafka broker keeps between its `group.min.session.timeout.ms` and
    /// `group.max.session.timeout.ms`, 6 s and 30 min by default).
    pub lease_ttl_ms: u64,
    /// Longest wait between empty polls (embedded bus: an idle poll is one read
    /// transaction; a consumer waits for the store's change watch, rung after every
    /// commit, and polls at the latest after this long: `store/src/watch.rs`).
    pub poll_interval_ms: u64,
    /// Most records taken in one poll.
    pub max_batch: u32,
}

/// `[trainer]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    pub metrics_listen: SocketAddr,
    /// Threads a trainer process trains with (candle's CPU kernels); 0: one per core.
    /// 1 is fastest for the micro model: threads cost more than they save on
    /// matrices this small, and far more when the cores are busy (`swimlane bench
    /// pipeline --trainer-threads`). Scale with more trainer processes instead.
    /// Applied by [`crate::apply_model_threads`] unless `RAYON_NUM_THREADS` or
    /// `CANDLE_NUM_THREADS` is set.
    pub threads: u32,
    /// The radius of a candidate's familiar windows, in multiples of the 95th
    /// percentile of its training windows' distances to their class centroid
    /// (`swimlane_core::familiar`): the device's file answers the windows outside it that
    /// are nearer a style the candidate never trained on with the base model. Smaller
    /// falls back more often (safer for a style the swimmer never uploaded, but gives up
    /// more of what personalisation gains); 0 turns the fallback off.
    pub familiar_scale: f32,
    /// The personal model's share of the device's answer on a familiar window: the
    /// device's file answers it with this weighted average of the personal model's and
    /// the base model's probabilities (`swimlane_core::familiar`). 1 answers with the
    /// personal model alone; lower lets a base model that is sure overrule a personal
    /// model that is not, which halved the windows a device got wrong that the base got
    /// right on the real swimmers, at the cost of some it got right that the base got
    /// wrong (bench/README.md, "Familiar windows").
    pub personal_weight: f32,
    pub consumer: ConsumerConfig,
}

/// `[validator]`: the acceptance rule, whose keys are [`ValidationPolicy`]'s fields
/// (`validator.margin`, ...; the documentation and defaults are there). Not
/// `deny_unknown_fields` (serde cannot flatten with it): the loader refuses a key the
/// defaults do not have before anything is deserialized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ValidatorConfig {
    pub metrics_listen: SocketAddr,
    #[serde(flatten)]
    pub policy: ValidationPolicy,
    pub consumer: ConsumerConfig,
}

/// `[publisher]`: versions accepted models and serves them to devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublisherConfig {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// On shutdown, in-flight model requests get this long to finish; then the server
    /// stops.
    pub drain_timeout_ms: u64,
    /// Most API requests reading the store at once; more wait their turn (without a
    /// thread), so that thousands of devices downloading at once keep the publisher's
    /// memory bounded (`swimlane bench downloads`, bench/README.md).
    pub max_concurrent_reads: u32,
    /// A request's head must arrive within this long, or the connection is closed
    /// (as `ingest.header_timeout_ms`).
    pub header_timeout_ms: u64,
    pub consumer: ConsumerConfig,
}

/// `[policy]`: when a user's model is good enough.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Held-out accuracy at which a user counts as converged (not retrained until a
    /// new batch arrives).
    pub target_accuracy: f32,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("default addresses parse")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            deployment: "default".into(),
            store: "./swimlane-data".into(),
            bus: "embedded".into(),
            partitions: 8,
            embedded_log_keep: 10_000,
            topic_prefix: String::new(),
            admin_token_sha256: String::new(),
            log_format: LogFormat::Text,
            spec: swimlane_core::spec::SYNTHETIC_POSE.into(),
            ingest: IngestConfig::default(),
            trainer: TrainerConfig::default(),
            validator: ValidatorConfig::default(),
            publisher: PublisherConfig::default(),
            policy: PolicyConfig::default(),
            retention: RetentionPolicy::default(),
            probation: ProbationPolicy::default(),
        }
    }
}
impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: addr("127.0.0.1:8080"),
            metrics_listen: addr("127.0.0.1:9101"),
            max_body_bytes: 8 << 20,
            max_samples_per_batch: 1000,
            body_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            drain_timeout_ms: 10_000,
            max_inflight: 64,
            max_inflight_per_user: 4,
            min_body_bytes_per_sec: 4096,
            body_grace_ms: 2_000,
            max_uploads_per_day: 100,
        }
    }
}
impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            lease_ttl_ms: 10_000,
            poll_interval_ms: 10,
            max_batch: 64,
        }
    }
}
impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            metrics_listen: addr("127.0.0.1:9102"),
            threads: 1,
            familiar_scale: swimlane_core::familiar::DEFAULT_SCALE,
            personal_weight: swimlane_core::familiar::DEFAULT_PERSONAL_WEIGHT,
            consumer: ConsumerConfig::default(),
        }
    }
}
impl Default for ValidatorConfig {
    fn default() -> Self {
        ValidatorConfig {
            metrics_listen: addr("127.0.0.1:9103"),
            policy: ValidationPolicy::default(),
            consumer: ConsumerConfig::default(),
        }
    }
}
impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            listen: addr("127.0.0.1:8081"),
            metrics_listen: addr("127.0.0.1:9104"),
            drain_timeout_ms: 10_000,
            max_concurrent_reads: 16,
            header_timeout_ms: 10_000,
            consumer: ConsumerConfig::default(),
        }
    }
}
impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            target_accuracy: 0.95,
        }
    }
}

impl ConsumerConfig {
    pub fn lease_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lease_ttl_ms)
    }
    pub fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.poll_interval_ms)
    }
}

/// How log lines are written (config key `log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; colour codes only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// Where a store lives, parsed from [`Config::store`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded store in this directory.
    Embedded(PathBuf),
    /// FoundationDB; `None`: the default cluster file.
    Fdb(Option<PathBuf>),
}

/// Which bus, parsed from [`Config::bus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusLocation {
    Embedded,
    /// `host:port` of a Kafka bootstrap server.
    Kafka(String),
}

/// Why a configuration could not be loaded. Every variant names the key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("unknown config key `{key}` (in {origin})")]
    UnknownKey { key: String, origin: String },
    #[error("invalid value for `{key}`{}: {reason}", origin_suffix(.origin))]
    Invalid {
        key: String,
        /// Where the value came from (file, variable or flag), if not the default.
        origin: Option<String>,
        reason: String,
    },
}

fn origin_suffix(o: &Option<String>) -> String {
    o.as_ref()
        .map(|o| format!(" (from {o})"))
        .unwrap_or_default()
}

/// A `spec` value (a built-in name, or a JSON spec file: a value with a `/` or ending in
/// `.json`) as the spec it names; errors name the key `spec`.
pub fn resolve_spec(value: &str) -> Result<swimlane_core::ModelSpec, ConfigError> {
    use swimlane_core::ModelSpec;
    if value.contains('/') || value.ends_with(".json") {
        let bytes = std::fs::read(value)
            .map_err(|e| invalid("spec", format!("cannot read spec file: {e}")))?;
        ModelSpec::from_json(&bytes).map_err(|e| invalid("spec", e.to_string()))
    } else {
        ModelSpec::builtin(value).map_err(|e| invalid("spec", e.to_string()))
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        origin: None,
        reason: reason.into(),
    }
}

/// Flags every worker binary takes (`#[command(flatten)]`); each also reads its
/// environment twin.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Args {
    /// TOML config file (optional).
    #[arg(long, env = "SWIMLANE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store: a directory (embedded) or `fdb:[/path/to/fdb.cluster]`.
    #[arg(long, env = "SWIMLANE_STORE")]
    pub store: Option<String>,
    /// Bus: `embedded` or `kafka://host:port`.
    #[arg(long, env = "SWIMLANE_BUS")]
    pub bus: Option<String>,
    /// Address this worker's API listens on (ingest, publisher).
    #[arg(long, env = "SWIMLANE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address of this worker's /metrics, /healthz and /readyz server.
    #[arg(long, env = "SWIMLANE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// The `SWIMLANE_*` variable of every config key, as (variable, key path).
pub fn env_names() -> Vec<(String, String)> {
    let mut out = Vec::new();
    leaves(&defaults_table(), "", &mut |path, _| {
        out.push((env_name(path), path.to_string()))
    });
    out
}

fn env_name(path: &str) -> String {
    format!("SWIMLANE_{}", path.replace('.', "_").to_ascii_uppercase())
}

fn defaults_table() -> toml::Table {
    toml::Table::try_from(Config::default()).expect("defaults serialize to TOML")
}

fn leaves(t: &toml::Table, prefix: &str, f: &mut dyn FnMut(&str, &toml::Value)) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => leaves(sub, &path, f),
            _ => f(&path, v),
        }
    }
}

/// Set `path` (dotted) in `t` to `v`.
fn set_path(t: &mut toml::Table, path: &str, v: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("non-empty path");
    let mut cur = t;
    for p in parts {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("sections are tables");
    }
    cur.insert(last.to_string(), v);
}

/// Merge a file's table into `base`, refusing keys the defaults do not have.
fn merge_file(
    base: &mut toml::Table,
    file: toml::Table,
    prefix: &str,
    origin: &str,
    origins: &mut HashMap<String, String>,
) -> Result<(), ConfigError> {
    for (k, v) in file {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (base.get_mut(&k), v) {
            (None, _) => {
                return Err(ConfigError::UnknownKey {
                    key: path,
                    origin: origin.into(),
                })
            }
            (Some(toml::Value::Table(sub)), toml::Value::Table(fv)) => {
                merge_file(sub, fv, &path, origin, origins)?
            }
            (Some(toml::Value::Table(_)), _) => {
                return Err(ConfigError::Invalid {
                    key: path,
                    origin: Some(origin.into()),
                    reason: "expected a table (a [section])".into(),
                })
            }
            (Some(slot), v) => {
                *slot = v;
                origins.insert(path, origin.into());
            }
        }
    }
    Ok(())
}

/// Parse an environment variable's text as the type of the key's default.
fn env_value(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    Ok(match default {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("expected an integer, found {raw:?}"))?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            raw.trim()
                .parse()
                .map_err(|_| format!("expected a number, found {raw:?}"))?,
        ),
        toml::Value::Boolean(_) => match raw.trim() {
            "true" | "1" => toml::Value::Boolean(true),
            "false" | "0" => toml::Value::Boolean(false),
            _ => return Err(format!("expected true or false, found {raw:?}")),
        },
        _ => {
            let t: toml::Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|e| format!("expected a TOML value: {e}"))?;
            t["v"].clone()
        }
    })
}

impl Config {
    /// Load for `worker` (or for a process running every worker, `None`) from the
    /// flags, the file they name and the process environment.
    pub fn load(args: &Args, worker: Option<Worker>) -> Result<Config, ConfigError> {
        Self::load_from(args, worker, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        args: &Args,
        worker: Option<Worker>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let defaults = defaults_table();
        let mut merged = defaults.clone();
        let mut origins: HashMap<String, String> = HashMap::new();

        // 2. The file.
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            merged = Self::merge_toml(merged, &text, path, &mut origins)?;
        }

        // 3. The environment.
        let mut by_env: BTreeMap<String, (String, toml::Value)> = BTreeMap::new();
        leaves(&defaults, "", &mut |path, v| {
            by_env.insert(env_name(path), (path.to_string(), v.clone()));
        });
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SWIMLANE_"))
            .collect();
        env.sort();
        for (name, raw) in env {
            if NON_CONFIG_ENV.contains(&name.as_str()) {
                continue;
            }
            let normal = name.replace("__", "_");
            let Some((path, default)) = by_env.get(&normal) else {
                return Err(ConfigError::UnknownKey {
                    key: name.clone(),
                    origin: "the environment; see swimlane_runtime::config::env_names".into(),
                });
            };
            let value = env_value(default, &raw).map_err(|reason| ConfigError::Invalid {
                key: path.clone(),
                origin: Some(format!("environment variable {name}")),
                reason,
            })?;
            set_path(&mut merged, path, value);
            origins.insert(path.clone(), format!("environment variable {name}"));
        }

        // 4. The flags.
        let mut flag = |path: String, flag: &str, v: toml::Value| {
            set_path(&mut merged, &path, v);
            origins.insert(path, format!("flag {flag}"));
        };
        if let Some(s) = &args.store {
            flag("store".into(), "--store", toml::Value::String(s.clone()));
        }
        if let Some(b) = &args.bus {
            flag("bus".into(), "--bus", toml::Value::String(b.clone()));
        }
        if let Some(a) = args.listen {
            match worker {
                Some(w @ (Worker::Ingest | Worker::Publisher)) => flag(
                    format!("{}.listen", w.name()),
                    "--listen",
                    toml::Value::String(a.to_string()),
                ),
                Some(w) => {
                    return Err(invalid(
                        "--listen",
                        format!("the {} serves no API; use --metrics-listen", w.name()),
                    ))
                }
                None => {
                    return Err(invalid(
                        "--listen",
                        "this process runs several workers; set ingest.listen / publisher.listen",
                    ))
                }
            }
        }
        if let Some(a) = args.metrics_listen {
            match worker {
                Some(w) => flag(
                    format!("{}.metrics_listen", w.name()),
                    "--metrics-listen",
                    toml::Value::String(a.to_string()),
                ),
                None => {
                    return Err(invalid(
                        "--metrics-listen",
                        "this process runs several workers; set <worker>.metrics_listen",
                    ))
                }
            }
        }

        // Typed, then checked.
        let with_origin = |e: ConfigError, origins: &HashMap<String, String>| match e {
            ConfigError::Invalid {
                key,
                origin: None,
                reason,
            } => ConfigError::Invalid {
                origin: origins.get(&key).cloned(),
                key,
                reason,
            },
            e => e,
        };
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
                let key = e.path().to_string();
                with_origin(invalid(&key, e.into_inner().to_string()), &origins)
            })?;
        config.validate().map_err(|e| with_origin(e, &origins))?;
        Ok(config)
    }

    fn merge_toml(
        mut base: toml::Table,
        text: &str,
        path: &Path,
        origins: &mut HashMap<String, String>,
    ) -> Result<toml::Table, ConfigError> {
        let file: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let origin = format!("config file {}", path.display());
        merge_file(&mut base, file, "", &origin, origins)?;
        Ok(base)
    }

    /// The deployment's model spec: the built-in named by `spec`, or the JSON file it
    /// names (a value with a `/` or ending in `.json`).
    pub fn model_spec(&self) -> Result<swimlane_core::ModelSpec, ConfigError> {
        resolve_spec(&self.spec)
    }

    /// Check values the types cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.deployment.is_empty() {
            return Err(invalid("deployment", "must not be empty"));
        }
        self.model_spec()?;
        self.store_location()?;
        self.bus_location()?;
        if !(1..=4096).contains(&self.partitions) {
            return Err(invalid("partitions", "must be between 1 and 4096"));
        }
        if self.trainer.threads > 1024 {
            return Err(invalid(
                "trainer.threads",
                "must be at most 1024 (0: one per core)",
            ));
        }
        if !(0.0..=10.0).contains(&self.trainer.familiar_scale) {
            return Err(invalid(
                "trainer.familiar_scale",
                "must be between 0 (no fallback) and 10",
            ));
        }
        if !(self.trainer.personal_weight > 0.0 && self.trainer.personal_weight <= 1.0) {
            return Err(invalid(
                "trainer.personal_weight",
                "must be above 0 and at most 1 (1: the personal model alone)",
            ));
        }
        if self.topic_prefix.len() > 100
            || !self
                .topic_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(
                "topic_prefix",
                "may only hold A-Z, a-z, 0-9, '.', '_' and '-', at most 100 of them",
            ));
        }
        let h = &self.admin_token_sha256;
        if !h.is_empty()
            && (h.len() != 64
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(invalid(
                "admin_token_sha256",
                "must be empty or 64 lowercase hex digits (the SHA-256 of the token, never the token)",
            ));
        }
        if !(1024..=256 << 20).contains(&self.ingest.max_body_bytes) {
            return Err(invalid(
                "ingest.max_body_bytes",
                "must be between 1024 and 268435456",
            ));
        }
        if !(1..=MAX_SAMPLES_PER_BATCH_LIMIT).contains(&self.ingest.max_samples_per_batch) {
            return Err(invalid(
                "ingest.max_samples_per_batch",
                format!(
                    "must be between 1 and {MAX_SAMPLES_PER_BATCH_LIMIT} (one batch is staged in one store transaction)"
                ),
            ));
        }
        for (key, value) in [
            ("ingest.body_timeout_ms", self.ingest.body_timeout_ms),
            ("ingest.header_timeout_ms", self.ingest.header_timeout_ms),
            (
                "publisher.header_timeout_ms",
                self.publisher.header_timeout_ms,
            ),
            (
                "ingest.max_inflight_per_user",
                self.ingest.max_inflight_per_user.into(),
            ),
            (
                "publisher.max_concurrent_reads",
                self.publisher.max_concurrent_reads.into(),
            ),
            (
                "retention.max_batch_records",
                self.retention.max_batch_records.into(),
            ),
            (
                "probation.promote_windows",
                self.probation.promote_windows.into(),
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        // A run reads these in one transaction (about 2 kB a window).
        for (key, value, most) in [
            (
                "retention.max_training_windows",
                self.retention.max_training_windows,
                MAX_RETAINED_WINDOWS,
            ),
            (
                "retention.max_heldout_windows",
                self.retention.max_heldout_windows,
                MAX_RETAINED_WINDOWS,
            ),
        ] {
            if !(1..=most).contains(&value) {
                return Err(invalid(key, format!("must be between 1 and {most}")));
            }
        }
        if !(1..=MAX_INFLIGHT_LIMIT).contains(&self.ingest.max_inflight) {
            return Err(invalid(
                "ingest.max_inflight",
                format!("must be between 1 and {MAX_INFLIGHT_LIMIT}"),
            ));
        }
        for (section, c) in [
            ("trainer", &self.trainer.consumer),
            ("validator", &self.validator.consumer),
            ("publisher", &self.publisher.consumer),
        ] {
            if c.poll_interval_ms == 0 {
                return Err(invalid(
                    &format!("{section}.consumer.poll_interval_ms"),
                    "must be at least 1",
                ));
            }
            if c.lease_ttl_ms < 2 * c.poll_interval_ms {
                return Err(invalid(
                    &format!("{section}.consumer.lease_ttl_ms"),
                    "must be at least twice poll_interval_ms",
                ));
            }
            if c.max_batch == 0 {
                return Err(invalid(
                    &format!("{section}.consumer.max_batch"),
                    "must be at least 1",
                ));
            }
        }
        if !(0.0..1.0).contains(&self.validator.policy.margin) {
            return Err(invalid("validator.margin", "must be in [0, 1)"));
        }
        if !(0.0..=10.0).contains(&self.validator.policy.significance_z) {
            return Err(invalid("validator.significance_z", "must be in [0, 10]"));
        }
        if !(0.0..=10.0).contains(&self.validator.policy.gain_z) {
            return Err(invalid("validator.gain_z", "must be in [0, 10]"));
        }
        if !(0.5..=10.0).contains(&self.probation.z) {
            return Err(invalid("probation.z", "must be in [0.5, 10]"));
        }
        if !(0.0..=1.0).contains(&self.validator.policy.history_max_drop) {
            return Err(invalid("validator.history_max_drop", "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.validator.policy.guard_max_drop) {
            return Err(invalid("validator.guard_max_drop", "must be in [0, 1]"));
        }
        if !(self.policy.target_accuracy > 0.0 && self.policy.target_accuracy <= 1.0) {
            return Err(invalid("policy.target_accuracy", "must be in (0, 1]"));
        }
        if self.ingest.listen == self.ingest.metrics_listen && self.ingest.listen.port() != 0 {
            return Err(invalid(
                "ingest.metrics_listen",
                "must differ from ingest.listen",
            ));
        }
        if self.publisher.listen == self.publisher.metrics_listen
            && self.publisher.listen.port() != 0
        {
            return Err(invalid(
                "publisher.metrics_listen",
                "must differ from publisher.listen",
            ));
        }
        Ok(())
    }

    /// The parsed `store` setting.
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        let s = self.store.trim();
        if s.is_empty() {
            return Err(invalid("store", "must not be empty"));
        }
        if let Some(rest) = s.strip_prefix("fdb:") {
            return Ok(StoreLocation::Fdb(
                (!rest.is_empty()).then(|| PathBuf::from(rest)),
            ));
        }
        if s.contains("://") {
            return Err(invalid(
                "store",
                format!("{s:?} is neither a directory path nor fdb:[cluster-file]"),
            ));
        }
        Ok(StoreLocation::Embedded(PathBuf::from(s)))
    }

    /// The parsed `bus` setting.
    pub fn bus_location(&self) -> Result<BusLocation, ConfigError> {
        match self.bus.as_str() {
            "embedded" => Ok(BusLocation::Embedded),
            b => match b.strip_prefix("kafka://") {
                Some(hp)
                    if hp
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
                {
                    Ok(BusLocation::Kafka(hp.to_string()))
                }
                _ => Err(invalid(
                    "bus",
                    format!("{b:?} is neither `embedded` nor kafka://host:port"),
                )),
            },
        }
    }

    /// The API address of `worker` (ingest and publisher have one).
    pub fn listen(&self, worker: Worker) -> Option<SocketAddr> {
        match worker {
            Worker::Ingest => Some(self.ingest.listen),
            Worker::Publisher => Some(self.publisher.listen),
            _ => None,
        }
    }

    /// The /metrics server address of `worker`.
    pub fn metrics_listen(&self, worker: Worker) -> SocketAddr {
        match worker {
            Worker::Ingest => self.ingest.metrics_listen,
            Worker::Trainer => self.trainer.metrics_listen,
            Worker::Validator => self.validator.metrics_listen,
            Worker::Publisher => self.publisher.metrics_listen,
        }
    }

    /// The effective configuration as TOML (safe to print: it holds no secret).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The config of a file holding `text` (no worker, no environment).
    fn load_file(text: &str) -> Result<Config, ConfigError> {
        let f = file(text);
        let args = Args {
            config: Some(f.path().to_path_buf()),
            ..Args::default()
        };
        Config::load_from(&args, None, env(&[]))
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_load_and_validate() {
        let c = Config::load_from(&Args::default(), Some(Worker::Ingest), env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.deployment, "default");
        assert_eq!(
            c.store_location().unwrap(),
            StoreLocation::Embedded("./swimlane-data".into())
        );
        assert_eq!(c.bus_location().unwrap(), BusLocation::Embedded);
        assert_eq!(c.ingest.listen.to_string(), "127.0.0.1:8080");
        let ports: std::collections::HashSet<_> =
            Worker::ALL.iter().map(|w| c.metrics_listen(*w)).collect();
        assert_eq!(ports.len(), 4);
        assert_eq!(c.validator.policy, ValidationPolicy::default());
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let f = file(
            r#"
            deployment = "from-file"
            store = "/data/file"
            partitions = 4
            [ingest]
            max_samples_per_batch = 200
            listen = "127.0.0.1:7000"
            [trainer.consumer]
            lease_ttl_ms = 3000
            "#,
        );
        let args = Args {
            config: Some(f.path().to_path_buf()),
            store: Some("/data/flag".into()),
            listen: Some("127.0.0.1:7002".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:7003".parse().unwrap()),
            ..Args::default()
        };
        let c = Config::load_from(
            &args,
            Some(Worker::Ingest),
            env(&[
                ("SWIMLANE_STORE", "/data/env"),
                ("SWIMLANE_PARTITIONS", "16"),
                ("SWIMLANE_INGEST__MAX_BODY_BYTES", "65536"),
                ("SWIMLANE_INGEST_LISTEN", "127.0.0.1:7001"),
                ("SWIMLANE_INGEST_MAX_INFLIGHT", "5"),
                ("SWIMLANE_VALIDATOR_MARGIN", "0.05"),
                ("SWIMLANE_LOG_FORMAT", "json"),
                ("SWIMLANE_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.deployment, "from-file"); // file over default
        assert_eq!(c.ingest.max_samples_per_batch, 200);
        assert_eq!(c.trainer.consumer.lease_ttl_ms, 3000);
        assert_eq!(c.trainer.consumer.poll_interval_ms, 10); // untouched default
        assert_eq!(c.partitions, 16); // env over file
        assert_eq!(c.ingest.max_body_bytes, 65536);
        assert_eq!(c.ingest.max_inflight, 5); // env
        assert_eq!(c.validator.policy.margin, 0.05);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.store, "/data/flag"); // flag over env
        assert_eq!(c.ingest.listen.to_string(), "127.0.0.1:7002");
        assert_eq!(c.ingest.metrics_listen.to_string(), "127.0.0.1:7003");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = load_file("[ingest]\nlisen = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, .. } if key == "ingest.lisen"),
            "{e}"
        );
        assert!(e.to_string().contains("ingest.lisen"));

        let e = load_file("nope = 1\n").unwrap_err();
        assert!(e.to_string().contains("`nope`"), "{e}");

        // `[validator]` flattens the validation policy: its unknown keys are refused
        // all the same, and a wrongly typed policy key is named.
        let e = load_file("[validator]\nmargn = 0.1\n").unwrap_err();
        assert!(e.to_string().contains("validator.margn"), "{e}");
        let e = load_file("[validator]\nmin_heldout = \"ten\"\n").unwrap_err();
        assert!(e.to_string().contains("validator"), "{e}");
        let c = load_file("[validator]\nmin_heldout = 12\ngain_z = 1.0\n").unwrap();
        assert_eq!(
            (c.validator.policy.min_heldout, c.validator.policy.gain_z),
            (12, 1.0)
        );

        let e = Config::load_from(
            &Args::default(),
            None,
            env(&[("SWIMLANE_INGEST_LISTN", "x")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("SWIMLANE_INGEST_LISTN"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_where_it_came_from() {
        let e = Config::load_from(
            &Args::default(),
            None,
            env(&[("SWIMLANE_PARTITIONS", "many")]),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("`partitions`") && m.contains("SWIMLANE_PARTITIONS"),
            "{m}"
        );

        let m = load_file("[ingest]\nlisten = \"not-an-address\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("`ingest.listen`") && m.contains("config file"),
            "{m}"
        );

        let m = load_file("ingest = 5\n").unwrap_err().to_string();
        assert!(m.contains("`ingest`"), "{m}");

        let m = Config::load_from(&Args::default(), None, env(&[("SWIMLANE_PARTITIONS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("`partitions`") && m.contains("SWIMLANE_PARTITIONS"),
            "{m}"
        );

        let f = file("this is not toml");
        let args = Args {
            config: Some(f.path().to_path_buf()),
            ..Args::default()
        };
        assert!(matches!(
            Config::load_from(&args, None, env(&[])),
            Err(ConfigError::Parse { .. })
        ));
        let args = Args {
            config: Some("/nonexistent/swimlane.toml".into()),
            ..Args::default()
        };
        assert!(matches!(
            Config::load_from(&args, None, env(&[])),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn validate_checks_each_key() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("deployment", Box::new(|c| c.deployment.clear())),
            ("store", Box::new(|c| c.store = "s3://bucket".into())),
            ("bus", Box::new(|c| c.bus = "kafka://nohost".into())),
            ("bus", Box::new(|c| c.bus = "rabbit".into())),
            ("spec", Box::new(|c| c.spec = "no-such-builtin".into())),
            ("spec", Box::new(|c| c.spec = "/no/such/spec.json".into())),
            ("topic_prefix", Box::new(|c| c.topic_prefix = "a/b".into())),
            (
                "admin_token_sha256",
                Box::new(|c| c.admin_token_sha256 = "secret".into()),
            ),
            (
                "ingest.max_body_bytes",
                Box::new(|c| c.ingest.max_body_bytes = 10),
            ),
            (
                "ingest.max_samples_per_batch",
                Box::new(|c| c.ingest.max_samples_per_batch = 100_000),
            ),
            (
                "validator.consumer.max_batch",
                Box::new(|c| c.validator.consumer.max_batch = 0),
            ),
            (
                "trainer.consumer.lease_ttl_ms",
                Box::new(|c| c.trainer.consumer.lease_ttl_ms = 10),
            ),
            (
                "trainer.familiar_scale",
                Box::new(|c| c.trainer.familiar_scale = f32::NAN),
            ),
            (
                "trainer.familiar_scale",
                Box::new(|c| c.trainer.familiar_scale = -1.0),
            ),
            (
                "trainer.personal_weight",
                Box::new(|c| c.trainer.personal_weight = 0.0),
            ),
            (
                "trainer.personal_weight",
                Box::new(|c| c.trainer.personal_weight = 1.5),
            ),
            (
                "trainer.personal_weight",
                Box::new(|c| c.trainer.personal_weight = f32::NAN),
            ),
            (
                "validator.margin",
                Box::new(|c| c.validator.policy.margin = 1.5),
            ),
            (
                "policy.target_accuracy",
                Box::new(|c| c.policy.target_accuracy = 0.0),
            ),
            (
                "ingest.metrics_listen",
                Box::new(|c| c.ingest.metrics_listen = c.ingest.listen),
            ),
            (
                "ingest.max_inflight",
                Box::new(|c| c.ingest.max_inflight = 0),
            ),
            (
                "ingest.max_inflight_per_user",
                Box::new(|c| c.ingest.max_inflight_per_user = 0),
            ),
        ];
        for (key, f) in cases {
            let mut c = Config::default();
            f(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        let mut c = Config {
            store: "fdb:".into(),
            bus: "kafka://localhost:9092".into(),
            admin_token_sha256: "a".repeat(64),
            ..Config::default()
        };
        c.validate().unwrap();
        assert_eq!(c.store_location().unwrap(), StoreLocation::Fdb(None));
        c.store = "fdb:/etc/foundationdb/fdb.cluster".into();
        assert_eq!(
            c.store_location().unwrap(),
            StoreLocation::Fdb(Some("/etc/foundationdb/fdb.cluster".into()))
        );
        assert_eq!(
            c.bus_location().unwrap(),
            BusLocation::Kafka("localhost:9092".into())
        );
    }

    #[test]
    fn listen_flags_apply_to_the_workers_section() {
        let args = Args {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..Args::default()
        };
        let c = Config::load_from(&args, Some(Worker::Publisher), env(&[])).unwrap();
        assert_eq!(c.publisher.listen.port(), 1);
        assert!(Config::load_from(&args, Some(Worker::Trainer), env(&[])).is_err());
        assert!(Config::load_from(&args, None, env(&[])).is_err());
        let args = Args {
            metrics_listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Args::default()
        };
        let c = Config::load_from(&args, Some(Worker::Validator), env(&[])).unwrap();
        assert_eq!(c.validator.metrics_listen.port(), 2);
    }

    #[test]
    fn every_key_has_a_distinct_env_name_and_the_file_round_trips() {
        let names = env_names();
        let set: std::collections::HashSet<_> = names.iter().map(|(n, _)| n).collect();
        assert_eq!(set.len(), names.len());
        assert!(names
            .iter()
            .any(|(n, k)| n == "SWIMLANE_INGEST_LISTEN" && k == "ingest.listen"));
        assert!(names
            .iter()
            .all(|(n, _)| !NON_CONFIG_ENV.contains(&n.as_str())));
        let f = file(&Config::default().to_toml());
        let args = Args {
            config: Some(f.path().to_path_buf()),
            ..Args::default()
        };
        assert_eq!(
            Config::load_from(&args, None, env(&[])).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn clap_args_parse_flags() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::try_parse_from([
            "w",
            "--store",
            "/tmp/x",
            "--bus",
            "embedded",
            "--listen",
            "127.0.0.1:5",
            "--metrics-listen",
            "127.0.0.1:6",
            "--config",
            "c.toml",
        ])
        .unwrap();
        assert_eq!(cli.args.store.as_deref(), Some("/tmp/x"));
        assert_eq!(cli.args.listen.unwrap().port(), 5);
        assert_eq!(cli.args.config.unwrap(), PathBuf::from("c.toml"));
    }
}
