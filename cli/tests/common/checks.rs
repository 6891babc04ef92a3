//! The exactly-once check shared by the crash tests, and the device-side helpers they
//! drive uploads with.
use std::collections::BTreeSet;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use swimlane_cli::audit::{audit, AuditUser};
use swimlane_cli::client::Device;
use swimlane_core::records::BatchStatus;
use swimlane_model::MicroModel;
use swimlane_store::Db;

use super::{repo, Fleet};

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

/// The model a device runs now: its published one, else the base model. Asked again
/// while the publisher cannot answer (it may have just been killed), until `deadline`.
pub fn current_model(
    http: &ureq::Agent,
    publisher: &str,
    user: &str,
    token: &str,
    base: &MicroModel,
    deadline: Instant,
) -> MicroModel {
    let d = Device {
        agent: http.clone(),
        ..Device::new("", publisher, user, token)
    };
    loop {
        match d.current_model() {
            Ok(Some(m)) => return m,
            Ok(None) => return base.clone(),
            Err(e) => assert!(Instant::now() < deadline, "{user}: no model answer: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// POST the batch until it gets 202 (`Device::upload_until_accepted`: a transport error
/// or a 5xx is retried with the same batch id and body; a 4xx fails the test). Returns
/// how many attempts were interrupted.
pub fn upload_until_accepted(
    http: &ureq::Agent,
    ingest: &str,
    user: &str,
    token: &str,
    body: &[u8],
    in_flight: &AtomicUsize,
    deadline: Instant,
) -> usize {
    let d = Device {
        agent: http.clone(),
        ..Device::new(ingest, "", user, token)
    };
    d.upload_until_accepted(body, deadline, Some(in_flight))
        .unwrap_or_else(|e| panic!("{e}"))
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
    let mine = |i: usize| {
        let of_i = accepted.iter().filter(|(j, _)| *j == i);
        of_i.map(|(_, b)| b.clone()).collect()
    };
    let audit_users = AuditUser::each(users, tokens, mine);
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
