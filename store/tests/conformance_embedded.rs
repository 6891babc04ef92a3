//! The conformance suite on the embedded (SQLite) backend, plus what only it can show:
//! several processes writing to one store file at once.
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};

use swimlane_store::conformance::{self, TempEmbedded};
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::Db;

swimlane_store::conformance_tests!(TempEmbedded::new());

const CHILD_ENV: &str = "SWIMLANE_STORE_TEST_CHILD";
const CHILDREN: u32 = 2;
const INCREMENTS: u32 = 200;
const PREFIX: &[u8] = b"multi-process/";

/// Child mode of `two_processes_one_store`: does nothing unless the parent set
/// `SWIMLANE_STORE_TEST_CHILD=<store file>:<child id>`. Waits for a "go" line on stdin
/// (so both children start together), then increments.
#[test]
fn multi_process_child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (path, id) = spec.rsplit_once(':').expect("path:id");
    let id: u32 = id.parse().expect("child id");
    let db = Db::new(EmbeddedBackend::open(path).expect("child opens the store"));
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    conformance::multi_process_child(&db, PREFIX, id, INCREMENTS).expect("child increments");
}

/// Two processes do read-modify-write increments of one counter in one store file at
/// the same time: no increment is lost.
#[test]
fn two_processes_one_store() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.sqlite");
    let db = Db::new(EmbeddedBackend::open(&path).unwrap());
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..CHILDREN)
        .map(|id| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "multi_process_child_entry",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("{}:{id}", path.display()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    // Barrier: every child has opened the store before any starts writing.
    for c in &mut children {
        let mut out = std::io::BufReader::new(c.stdout.as_mut().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("child exited before it was ready");
            }
        }
    }
    for c in &mut children {
        writeln!(c.stdin.as_mut().unwrap(), "go").unwrap();
    }
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
    }
    conformance::multi_process_check(&db, PREFIX, CHILDREN, INCREMENTS).unwrap();
}
