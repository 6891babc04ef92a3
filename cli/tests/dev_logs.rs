//! `swimlane dev 2>log`: the log a file or a pipe gets has no colour codes, and with
//! `SWIMLANE_LOG_FORMAT=json` every line of it is one JSON object.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use swimlane_cli::procfleet::free_port;

/// Run `swimlane dev` on a fresh store with stderr into a file, until every worker is
/// ready; then stop it (SIGTERM) and return what it logged.
fn dev_log(extra_env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log");
    let mut env: Vec<(String, String)> = vec![
        (
            "SWIMLANE_STORE".into(),
            dir.path().join("store").display().to_string(),
        ),
        ("SWIMLANE_LOG".into(), "info".into()),
    ];
    let mut ready_urls = Vec::new();
    for w in ["INGEST", "TRAINER", "VALIDATOR", "PUBLISHER"] {
        let ops = free_port().unwrap();
        env.push((format!("SWIMLANE_{w}_METRICS_LISTEN"), ops.to_string()));
        ready_urls.push(format!("http://{ops}/readyz"));
    }
    for w in ["INGEST", "PUBLISHER"] {
        env.push((
            format!("SWIMLANE_{w}_LISTEN"),
            free_port().unwrap().to_string(),
        ));
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swimlane"));
    cmd.arg("dev")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    for (k, v) in env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra_env.iter().copied())
    {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    let deadline = Instant::now() + Duration::from_secs(120);
    for url in &ready_urls {
        while agent.get(url).call().is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "swimlane dev exited: {}",
                std::fs::read_to_string(&log_path).unwrap()
            );
            assert!(Instant::now() < deadline, "{url} not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let status = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();
    std::fs::read_to_string(&log_path).unwrap()
}

#[test]
fn dev_logs_to_a_file_without_colour_codes_and_as_json_lines_when_asked() {
    let text = dev_log(&[]);
    assert!(text.contains("swimlane dev: ingest on http://"), "{text}");
    assert!(text.contains("ingest API listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");

    let json = dev_log(&[("SWIMLANE_LOG_FORMAT", "json")]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{json}");
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("swimlane dev: ingest on"))),
        "{json}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string()),
        "{json}"
    );
}
