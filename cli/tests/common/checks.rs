//! The exactly-once check shared by the crash tests, and the device-side helpers they
//! drive uploads with.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use swimlane_cli::audit::{audit, AuditUser};
use swimlane_core::records::BatchStatus;
use swimlane_model::MicroModel;
use swimlane_store::Db;

use super::{repo, request, Fleet};

/// Whether every accepted batch (`(user index, batch id)`, users named by `users`)
/// rests in a settled status and no run is in flight.
pub fn all_settled(db: &Db, users: &[String], accepted: &[(usize, String)]) -> bool {
    let repo = repo();
    db.transact(|tx| {
        let mine: BTreeSet<usize> = accepted.iter().map(|(u, _)| *u).collect();
        for u in mine {
            if repo.user_state(tx, &users[u])?.inflight_run.is_some() {
                return Ok(false);
            }
        }
        for (u, b) in accepted {
            match repo.batch(tx, &users[*u], b)? {
                Some(r)
                    if r.status.is_terminal()
                        || matches!(r.status, BatchStatus::Deferred { .. }) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    })
    .unwrap()
}

/// The model a device runs now: its published one, else the base model.
pub fn current_model(
    http: &ureq::Agent,
    publisher: &str,
    user: &str,
    token: &str,
    base: &MicroModel,
    deadline: Instant,
) -> MicroModel {
    let url = format!("{publisher}/v1/users/{user}/model");
    loop {
        match request(http, "GET", &url, Some(token), &[], None) {
            Ok(r) if r.status == 200 => return MicroModel::from_bytes(&r.body).unwrap(),
            Ok(r) if r.status == 404 => return base.clone(),
            Ok(r) if r.status >= 500 => {}
            Ok(r) => panic!(
                "GET {url}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "GET {url}: no answer");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// POST the batch until it gets 202; a transport error or a 5xx is retried with the
/// same batch id and body. Returns how many attempts were interrupted.
pub fn upload_until_accepted(
    http: &ureq::Agent,
    url: &str,
    token: &str,
    body: &[u8],
    in_flight: &AtomicUsize,
    deadline: Instant,
) -> usize {
    let mut interrupted = 0;
    loop {
        in_flight.fetch_add(1, Ordering::SeqCst);
        let r = request(http, "POST", url, Some(token), &[], Some(body));
        in_flight.fetch_sub(1, Ordering::SeqCst);
        match r {
            Ok(a) if a.status == 202 => return interrupted,
            Ok(a) if a.status >= 500 => interrupted += 1,
            Ok(a) => panic!(
                "POST {url}: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            ),
            Err(_) => interrupted += 1,
        }
        assert!(Instant::now() < deadline, "POST {url}: never accepted");
        std::thread::sleep(Duration::from_millis(30));
    }
}

pub use swimlane_cli::audit::{Events, Expect};

/// Every accepted batch was trained, validated and published (or rejected, or
/// deferred) exactly once: `swimlane_cli::audit::audit` (the checker `swimlane chaos`
/// runs) over the settled store, `events` and the HTTP APIs, against `expect`. Panics
/// with every violation.
#[allow(clippy::too_many_arguments)]
pub fn check_exactly_once(
    fleet: &Fleet,
    db: &Db,
    users: &[String],
    tokens: &[String],
    accepted: &[(usize, String)],
    events: &Events,
    expect: &Expect,
) {
    let audit_users: Vec<AuditUser> = users
        .iter()
        .enumerate()
        .map(|(i, u)| AuditUser {
            user: u.clone(),
            token: tokens[i].clone(),
            accepted: accepted
                .iter()
                .filter(|(j, _)| *j == i)
                .map(|(_, b)| b.clone())
                .collect(),
        })
        .collect();
    let (ingest, publisher) = (fleet.ingest_url(), fleet.publisher_url());
    let r = audit(
        db,
        &repo(),
        &audit_users,
        Some((&ingest, &publisher)),
        Some(events),
        expect,
    )
    .unwrap();
    eprintln!(
        "audit: {} published, {} rejected, {} deferred; {} versions, {} runs; {} lost, {} duplicated",
        r.published, r.rejected, r.deferred, r.versions, r.runs, r.lost, r.duplicated
    );
    assert!(r.events_checked);
    assert!(
        r.violations.is_empty(),
        "exactly-once violations: {:#?}",
        r.violations
    );
}
