//! The project's scrape config, recording and alert rules and Grafana dashboards against
//! a real Prometheus (Debian's `prometheus`, named by `SWIMLANE_TEST_PROMETHEUS`;
//! deploy/check.sh installs it and sets it) scraping the four workers as separate
//! processes on an embedded store:
//! - deploy/prometheus/prometheus.yml is loaded with only its targets rewritten to the
//!   fleet's loopback ports (and 1 s intervals), with the project's rule files;
//! - devices upload corrections for a few users until models are published;
//! - Prometheus's HTTP API then shows every target up, every recording and alert rule
//!   evaluated without error, every recording rule and every expression of every
//!   dashboard panel returning at least one series, and every metric name they use
//!   exported by some worker. A panel naming a metric no worker exports fails here.
//!
//! Without `SWIMLANE_TEST_PROMETHEUS` (a plain `cargo test`) the test says so and
//! passes without running.
mod common;

use swimlane_cli::client::{Device, Download};

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent, request, upload_body, Fleet, Kind};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use swimlane_model::synth::{corrections, Swimmer};

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Path of the `prometheus` binary to test against.
const PROMETHEUS_ENV: &str = "SWIMLANE_TEST_PROMETHEUS";

const USERS: [&str; 3] = ["ana", "ben", "cleo"];

/// What the dashboards' Grafana variables stand for here (1 s scrapes).
const GRAFANA_VARIABLES: [(&str, &str); 2] = [("$__rate_interval", "1m"), ("$__interval", "5s")];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_addr() -> SocketAddr {
    swimlane_cli::procfleet::free_port().expect("a free loopback port")
}

/// A Prometheus server on a loopback port with a temporary data directory; killed on
/// drop (printing its log when dropped by a panic).
struct Prometheus {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
}

impl Prometheus {
    fn start(bin: &Path, config: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = free_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut p = Prometheus {
            child: Some(child),
            dir,
            url: format!("http://{addr}"),
        };
        p.wait_ready();
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let http = agent();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = request(
                &http,
                "GET",
                &format!("{}/-/ready", self.url),
                None,
                &[],
                None,
            ) {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("prometheus exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET an API path; the `data` of a `success` answer, or the error it gave.
    fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Json, String> {
        let mut req = agent().get(&format!("{}{path}", self.url));
        for (k, v) in query {
            req = req.query(k, v);
        }
        let body: Json = match req.call() {
            Ok(r) => r.into_json().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(code, r)) => {
                let j: Json = r.into_json().unwrap_or(Json::Null);
                return Err(format!("{code}: {}", j["error"]));
            }
            Err(e) => return Err(e.to_string()),
        };
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// Evaluate `expr` now: the number of series it returns.
    fn series(&self, expr: &str) -> Result<usize, String> {
        let d = self.api("/api/v1/query", &[("query", expr)])?;
        Ok(match d["resultType"].as_str() {
            Some("vector") | Some("matrix") => d["result"].as_array().map_or(0, |a| a.len()),
            // A scalar or string is one value.
            _ => 1,
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- prometheus log (last 40 lines) ---");
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// deploy/prometheus/prometheus.yml with each job's service discovery replaced by the
/// fleet's address for it, 1 s scrape and evaluation intervals, and its rule files by
/// absolute path. Panics unless it has exactly the four workers' jobs.
fn scrape_config_for(fleet: &Fleet) -> String {
    let dir = repo_root().join("deploy/prometheus");
    let text = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    let mut cfg: Yaml = serde_yaml::from_str(&text).unwrap();
    cfg["global"]["scrape_interval"] = "1s".into();
    cfg["global"]["scrape_timeout"] = "1s".into();
    cfg["global"]["evaluation_interval"] = "1s".into();
    let rules: Vec<Yaml> = cfg["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .map(|f| dir.join(f.as_str().unwrap()).display().to_string().into())
        .collect();
    assert!(!rules.is_empty());
    cfg["rule_files"] = Yaml::Sequence(rules);
    let mut jobs = BTreeSet::new();
    for job in cfg["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs")
    {
        let name = job["job_name"].as_str().unwrap().to_string();
        let kind = Kind::ALL
            .into_iter()
            .find(|k| name == format!("swimlane-{}", k.name()))
            .unwrap_or_else(|| panic!("unexpected job {name}"));
        let m = job.as_mapping_mut().unwrap();
        let sd: Vec<Yaml> = m
            .keys()
            .filter(|k| k.as_str().is_some_and(|k| k.ends_with("_sd_configs")))
            .cloned()
            .collect();
        assert_eq!(sd.len(), 1, "{name}: one service discovery to rewrite");
        m.remove(&sd[0]);
        let target = fleet.ports.ops(kind).to_string();
        let statics: Yaml = serde_yaml::from_str(&format!("[{{targets: ['{target}']}}]")).unwrap();
        m.insert("static_configs".into(), statics);
        jobs.insert(name);
    }
    assert_eq!(jobs.len(), 4, "{jobs:?}");
    serde_yaml::to_string(&cfg).unwrap()
}

/// Every (file, panel title, expression) of every dashboard, Grafana variables
/// substituted.
fn dashboard_exprs() -> Vec<(String, String, String)> {
    let dir = repo_root().join("deploy/grafana/dashboards");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let d: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        for p in d["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().into_iter().flatten() {
                let mut e = t["expr"].as_str().expect("expr").to_string();
                for (var, value) in GRAFANA_VARIABLES {
                    e = e.replace(var, value);
                }
                assert!(!e.contains('$'), "{file}: a Grafana variable left in {e}");
                out.push((file.clone(), p["title"].as_str().unwrap().to_string(), e));
            }
        }
    }
    assert!(out.len() >= 20, "{} panel expressions", out.len());
    out
}

/// Metric names an expression selects: identifiers outside string literals that are
/// metrics of ours or of the process collector (recording rule names, with `:`, and
/// functions are left out).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.chars().peekable();
    let mut word = String::new();
    let mut flush = |w: &mut String| {
        let is_ours = w.starts_with("swimlane_") || w.starts_with("process_") || w == "up";
        if is_ours && !w.contains(':') {
            names.insert(w.clone());
        }
        w.clear();
    };
    while let Some(c) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            flush(&mut word);
            // Skip the string literal (with escapes).
            while let Some(d) = chars.next() {
                if d == '\\' {
                    chars.next();
                } else if d == c {
                    break;
                }
            }
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            flush(&mut word);
        }
    }
    flush(&mut word);
    names
}

/// The problems of `exprs` (labelled) now: an evaluation error, no series, or a metric
/// name none of `exported` has.
fn problems(
    prom: &Prometheus,
    exprs: &[(String, String)],
    exported: &BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (what, e) in exprs {
        for name in metric_names(e) {
            if !exported.contains(&name) {
                out.push(format!(
                    "{what}: `{name}` is not exported by any worker ({e})"
                ));
            }
        }
        match prom.series(e) {
            Ok(0) => out.push(format!("{what}: no series ({e})")),
            Ok(_) => {}
            Err(err) => out.push(format!("{what}: evaluation failed: {err} ({e})")),
        }
    }
    out
}

fn exported_names(prom: &Prometheus) -> BTreeSet<String> {
    prom.api("/api/v1/label/__name__/values", &[])
        .expect("metric names")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dashboards_and_rules_evaluate_against_a_real_prometheus_scraping_the_fleet() {
    let Some(bin) = std::env::var_os(PROMETHEUS_ENV) else {
        eprintln!(
            "skipped: set {PROMETHEUS_ENV} to a prometheus binary to run this test \
             (deploy/check.sh installs Debian's and sets it)"
        );
        return;
    };
    let t0 = Instant::now();
    let fleet = Fleet::new(&[]);
    let tokens: Vec<String> = USERS.iter().map(|u| fleet.token(u)).collect();
    fleet.start_all();
    let prom = Prometheus::start(Path::new(&bin), &scrape_config_for(&fleet));
    eprintln!(
        "fleet and prometheus ready after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // Devices upload one night of corrections each (swimmers the base model gets wrong
    // often enough that one night is enough evidence), and one malformed upload.
    let (ingest, publisher) = (fleet.ingest_url(), fleet.publisher_url());
    let http = agent();
    let base = common::base_model(&fleet.db());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut seed = 1000;
    for (i, u) in USERS.iter().enumerate() {
        let batch = loop {
            let c = corrections(&base, &Swimmer::new(seed), 400, 200, &mut rng).unwrap();
            seed += 1;
            if c.len() >= 80 {
                break c;
            }
        };
        let url = format!("{ingest}/v1/users/{u}/batches");
        let body = upload_body("night-1", &batch);
        let r = request(&http, "POST", &url, Some(&tokens[i]), &[], Some(&body)).unwrap();
        assert_eq!(r.status, 202, "{u}: {:?}", r.json());
    }
    let url = format!("{ingest}/v1/users/{}/batches", USERS[0]);
    let r = request(&http, "POST", &url, Some(&tokens[0]), &[], Some(b"{")).unwrap();
    assert_eq!(r.status, 400);

    // Until every batch has settled; at least one model must be published.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut published = 0;
    for (i, u) in USERS.iter().enumerate() {
        let device = Device::new(&ingest, &publisher, u, &tokens[i]);
        let status = loop {
            fleet.assert_alive();
            let st = device.status("night-1").unwrap()["status"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if common::settled(&st) {
                break st;
            }
            assert!(Instant::now() < deadline, "{u}: not settled in 180 s");
            std::thread::sleep(Duration::from_millis(100));
        };
        if status == "published" {
            published += 1;
            let model = device.download(None).unwrap();
            assert!(matches!(model, Download::Model { .. }), "{u}: {model:?}");
        }
    }
    assert!(published >= 1, "no model published");
    eprintln!(
        "{published} of {} published after {:.1}s",
        USERS.len(),
        t0.elapsed().as_secs_f64()
    );

    // Every target is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = prom.api("/api/v1/targets", &[]).expect("targets");
        let targets = t["activeTargets"].as_array().unwrap();
        let up: BTreeMap<String, String> = targets
            .iter()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap().to_string(),
                    t["health"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let all_up = up.len() == 4 && up.values().all(|h| h == "up");
        if all_up && prom.series("up == 1") == Ok(4) {
            break;
        }
        assert!(Instant::now() < deadline, "targets not all up: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every rule has been evaluated, without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let groups = prom.api("/api/v1/rules", &[]).expect("rules")["groups"].clone();
        let rules: Vec<Json> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        let errors: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] == "err")
            .map(|r| format!("{}: {}", r["name"], r["lastError"]))
            .collect();
        assert!(errors.is_empty(), "rules failed to evaluate: {errors:#?}");
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not evaluated in 30 s: {rules:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let record: Vec<&Json> = rules.iter().filter(|r| r["type"] == "recording").collect();
    let alerting: Vec<&Json> = rules.iter().filter(|r| r["type"] == "alerting").collect();
    assert!(record.len() >= 8 && alerting.len() >= 8, "{rules:#?}");

    // Every dashboard expression, every recording rule (its query and its recorded
    // series) returns a series; every metric name used anywhere, alerts included,
    // is exported.
    let mut exprs: Vec<(String, String)> = dashboard_exprs()
        .into_iter()
        .map(|(f, t, e)| (format!("dashboard {f} panel {t:?}"), e))
        .collect();
    for r in &record {
        let name = r["name"].as_str().unwrap();
        exprs.push((
            format!("recording rule {name}"),
            r["query"].as_str().unwrap().to_string(),
        ));
        exprs.push((format!("recorded series {name}"), name.to_string()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let exported = exported_names(&prom);
        let mut left = problems(&prom, &exprs, &exported);
        for a in &alerting {
            for name in metric_names(a["query"].as_str().unwrap()) {
                if !exported.contains(&name) {
                    left.push(format!("alert {}: `{name}` is not exported", a["name"]));
                }
            }
        }
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        left.is_empty(),
        "{} problems:\n{}",
        left.len(),
        left.join("\n")
    );

    // The check itself catches a panel naming a metric nobody exports.
    let bogus = vec![(
        "a panel with a typo".to_string(),
        "sum(rate(swimlane_ingest_batches_acepted_total[1m]))".to_string(),
    )];
    let caught = problems(&prom, &bogus, &exported_names(&prom));
    assert_eq!(caught.len(), 2, "{caught:?}");
    assert!(caught[0].contains("not exported") && caught[1].contains("no series"));

    eprintln!(
        "{} expressions checked against prometheus in {:.1}s",
        exprs.len(),
        t0.elapsed().as_secs_f64()
    );
}
