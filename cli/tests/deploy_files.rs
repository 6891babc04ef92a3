//! The deployment files agree with the code and with each other (no external tool
//! needed; deploy/check.sh runs the operators' tools on the same files):
//! - every worker's environment in deploy/compose.yaml and deploy/k8s/ loads, through
//!   the workers' own config loader, into a valid configuration, and probes, ports and
//!   healthchecks use the addresses that configuration listens on;
//! - the Kubernetes manifests reference their Secrets, never inline one; every worker
//!   has probes, requests and limits, a non-root read-only container and a
//!   PodDisruptionBudget; the trainer autoscaler is capped at the partition count;
//! - both Prometheus scrape configs scrape the four workers on their metrics ports;
//! - every alert has a summary, a runbook link to a section of docs/operations.md that
//!   exists, and promtool unit tests that show it firing and not firing;
//! - every dashboard panel queries the provisioned Prometheus data source.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml::Value;
use swimlane_runtime::config::{Args, Config, Worker};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A YAML file, with its `<<` merge keys applied.
fn yaml(rel: &str) -> Value {
    let mut v: Value = serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    v.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
    v
}

/// Every document of a multi-document YAML file.
fn yaml_docs(rel: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&read(rel))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn worker(name: &str) -> Worker {
    Worker::ALL
        .into_iter()
        .find(|w| w.name() == name)
        .unwrap_or_else(|| panic!("no worker {name}"))
}

/// Load `env` (SWIMLANE_* variables) as `w`'s configuration, with the workers' loader.
fn load(env: &BTreeMap<String, String>, w: Worker, what: &str) -> Config {
    let c = Config::load_from(&Args::default(), Some(w), env.clone())
        .unwrap_or_else(|e| panic!("{what}: its SWIMLANE_* environment does not load: {e}"));
    c.validate()
        .unwrap_or_else(|e| panic!("{what}: its configuration is invalid: {e}"));
    c
}

/// Compose's `${VAR:-default}` interpolation, with nothing set (the defaults).
fn interpolate(v: &str) -> String {
    match v.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        Some(inner) => inner
            .split_once(":-")
            .map(|(_, d)| d.to_string())
            .unwrap_or_default(),
        None => v.to_string(),
    }
}

const WORKERS: [&str; 4] = ["ingest", "trainer", "validator", "publisher"];

#[test]
fn compose_workers_are_configured_by_valid_swimlane_variables_and_healthchecked() {
    let compose = yaml("deploy/compose.yaml");
    let services = s(&compose, &["services"]);
    for name in WORKERS {
        let svc = &services[name];
        assert!(svc.is_mapping(), "compose has no `{name}` service");
        let mut env = BTreeMap::new();
        for (k, v) in s(svc, &["environment"]).as_mapping().expect("a mapping") {
            let (k, v) = (str_of(k), interpolate(&str_of(v)));
            assert!(
                k.starts_with("SWIMLANE_"),
                "{name}: {k} is not a SWIMLANE_* variable"
            );
            env.insert(k, v);
        }
        let w = worker(name);
        let c = load(&env, w, &format!("compose service {name}"));
        assert_eq!(c.store, "fdb:/etc/foundationdb/fdb.cluster", "{name}");
        assert!(c.bus.starts_with("kafka://"), "{name}: {}", c.bus);
        let ops = c.metrics_listen(w);
        assert!(ops.ip().is_unspecified(), "{name}: {ops} is not reachable");
        let test: Vec<String> = s(svc, &["healthcheck", "test"])
            .as_sequence()
            .expect("healthcheck test")
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(
            test.last().unwrap(),
            &format!("http://127.0.0.1:{}/healthz", ops.port()),
            "{name}: the healthcheck probes /healthz on the metrics port"
        );
        assert_eq!(str_of(&svc["command"][0]), format!("swimlane-{name}"));
        assert_eq!(str_of(&svc["read_only"]), "true", "{name}");
    }
    assert_eq!(
        s(services, &["trainer", "deploy", "replicas"]).as_u64(),
        Some(2)
    );
    // The cluster file is shared by FoundationDB with the workers.
    let fdb_env = s(services, &["fdb", "environment", "FDB_CLUSTER_FILE"]);
    assert_eq!(str_of(fdb_env), "/etc/foundationdb/fdb.cluster");
    for (svc, ro) in [("fdb", ""), ("ingest", ":ro")] {
        let vols: Vec<String> = s(services, &[svc, "volumes"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(str_of)
            .collect();
        assert!(
            vols.contains(&format!("fdb-cluster:/etc/foundationdb{ro}")),
            "{svc}: {vols:?}"
        );
    }
}

#[test]
fn kubernetes_workers_are_safe_probed_and_configured_by_valid_variables() {
    let configmap = yaml("deploy/k8s/configmap.yaml");
    let shared: BTreeMap<String, String> = s(&configmap, &["data"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (str_of(k), str_of(v)))
        .collect();
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    let listed: BTreeSet<String> = s(&kustomization, &["resources"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    let mut pdbs = BTreeSet::new();
    let mut hpa_max = None;
    let mut services = BTreeSet::new();
    for name in WORKERS {
        let file = format!("{name}.yaml");
        assert!(listed.contains(&file), "kustomization lacks {file}");
        for doc in yaml_docs(&format!("deploy/k8s/{file}")) {
            let kind = str_of(&doc["kind"]);
            assert_ne!(
                kind, "Secret",
                "{file}: secrets are referenced, never inlined"
            );
            match kind.as_str() {
                "PodDisruptionBudget" => {
                    pdbs.insert(str_of(s(&doc, &["metadata", "name"])));
                }
                "Service" => {
                    services.insert(str_of(s(&doc, &["metadata", "name"])));
                }
                "HorizontalPodAutoscaler" => {
                    assert_eq!(
                        str_of(s(&doc, &["spec", "scaleTargetRef", "name"])),
                        "swimlane-trainer"
                    );
                    assert_eq!(
                        str_of(&doc["spec"]["metrics"][0]["type"]),
                        "External",
                        "trainers scale on the lag, an external metric"
                    );
                    hpa_max = doc["spec"]["maxReplicas"].as_u64();
                }
                "Deployment" => check_deployment(name, &doc, &shared),
                other => panic!("{file}: unexpected kind {other}"),
            }
        }
        assert!(pdbs.contains(&format!("swimlane-{name}")), "{name}: no PDB");
        assert!(
            services.contains(&format!("swimlane-{name}-metrics")),
            "{name}: no metrics Service"
        );
    }
    assert!(services.contains("swimlane-ingest") && services.contains("swimlane-publisher"));
    let partitions: u64 = shared["SWIMLANE_PARTITIONS"].parse().unwrap();
    assert_eq!(
        hpa_max,
        Some(partitions),
        "the trainer autoscaler is capped at the partition count"
    );
}

fn check_deployment(name: &str, doc: &Value, shared: &BTreeMap<String, String>) {
    let pod = s(doc, &["spec", "template", "spec"]);
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    assert_eq!(str_of(&c["args"][0]), format!("swimlane-{name}"));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{name}"
    );
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            assert!(!c["resources"][r][k].is_null(), "{name}: {r}.{k}");
        }
    }
    // The environment: the ConfigMap, then the container's own variables; secrets by
    // reference only.
    let mut env = shared.clone();
    let mut secrets = BTreeSet::new();
    for e in c["env"].as_sequence().unwrap() {
        let k = str_of(&e["name"]);
        if let Some(v) = e.get("value") {
            env.insert(k, str_of(v));
        } else {
            let r = &e["valueFrom"]["secretKeyRef"];
            assert!(
                r.is_mapping(),
                "{name}: {k} is neither a value nor a secret"
            );
            secrets.insert(str_of(&r["name"]));
            // A plausible placeholder, so the loader checks the key's name.
            env.insert(k, "0".repeat(64));
        }
    }
    assert!(secrets.contains("swimlane-admin"), "{name}: {secrets:?}");
    let w = worker(name);
    let config = load(&env, w, &format!("Deployment swimlane-{name}"));
    let ports: BTreeMap<String, u64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (str_of(&p["name"]), p["containerPort"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        ports.get("metrics").copied(),
        Some(config.metrics_listen(w).port() as u64),
        "{name}: the metrics port is where the worker serves /metrics"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(str_of(&c[probe]["httpGet"]["path"]), path, "{name} {probe}");
        assert_eq!(str_of(&c[probe]["httpGet"]["port"]), "metrics", "{name}");
    }
    let fdb = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some("fdb-cluster"))
        .expect("the cluster file volume");
    assert_eq!(str_of(&fdb["secret"]["secretName"]), "swimlane-fdb-cluster");
    assert_eq!(
        config.store, "fdb:/etc/foundationdb/fdb.cluster",
        "{name}: the store is the mounted cluster file"
    );
}

#[test]
fn both_scrape_configs_scrape_the_four_workers_on_their_metrics_ports() {
    let defaults = Config::default();
    for file in [
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/prometheus-kubernetes.yml",
    ] {
        let cfg = yaml(file);
        let jobs: BTreeMap<String, u64> = cfg["scrape_configs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|j| {
                (
                    str_of(&j["job_name"]),
                    j["dns_sd_configs"][0]["port"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: BTreeMap<String, u64> = Worker::ALL
            .into_iter()
            .map(|w| {
                (
                    format!("swimlane-{}", w.name()),
                    defaults.metrics_listen(w).port() as u64,
                )
            })
            .collect();
        assert_eq!(jobs, want, "{file}");
    }
}

/// GitHub's anchor of a markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_has_a_summary_a_runbook_section_and_promtool_tests_both_ways() {
    let docs = read("docs/operations.md");
    let anchors: BTreeSet<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let rules = yaml("deploy/prometheus/rules/alerts.yml");
    let tests = yaml("deploy/prometheus/tests/alerts_test.yml");
    // alert -> (a case expecting it to fire, a case expecting silence)
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for t in tests["tests"].as_sequence().unwrap() {
        for c in t["alert_rule_test"].as_sequence().unwrap() {
            let e = cases.entry(str_of(&c["alertname"])).or_default();
            let fires = c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
            if fires {
                e.0 = true;
            } else {
                e.1 = true;
            }
        }
    }
    let mut alerts = 0;
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let Some(name) = r["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            assert!(
                r["annotations"]["summary"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: no summary"
            );
            let link = str_of(&r["annotations"]["runbook_url"]);
            let (doc, frag) = link.split_once('#').expect("a section link");
            assert_eq!(doc, "docs/operations.md", "{name}");
            assert!(
                anchors.contains(frag),
                "{name}: docs/operations.md has no section #{frag}"
            );
            assert_eq!(frag, name.to_lowercase(), "{name}: its section is its name");
            assert_eq!(
                cases.get(name),
                Some(&(true, true)),
                "{name}: needs a promtool test that fires it and one that does not"
            );
        }
    }
    assert!(alerts >= 8, "{alerts} alerts");
}

#[test]
fn every_dashboard_panel_queries_the_provisioned_prometheus() {
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yaml");
    let uid = str_of(&ds["datasources"][0]["uid"]);
    let provider = yaml("deploy/grafana/provisioning/dashboards/swimlane.yaml");
    assert_eq!(
        str_of(&provider["providers"][0]["options"]["path"]),
        "/var/lib/grafana/dashboards"
    );
    let dir = root().join("deploy/grafana/dashboards");
    let mut panels = 0;
    let mut uids = BTreeSet::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(uids.insert(d["uid"].as_str().unwrap().to_string()));
        for p in d["panels"].as_array().unwrap() {
            if p["type"] == "row" {
                continue;
            }
            panels += 1;
            let title = p["title"].as_str().unwrap();
            assert_eq!(p["datasource"]["uid"], uid.as_str(), "{title}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{title}");
            for t in targets {
                assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}");
                assert_eq!(t["datasource"]["uid"], uid.as_str(), "{title}");
            }
        }
    }
    assert!(panels >= 20, "{panels} panels");
}
