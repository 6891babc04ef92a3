//! Says, in every test run, whether the FoundationDB conformance suite ran and why not.
//! (The suite itself is `conformance_fdb.rs`: it needs the `fdb` feature, libfdb_c and
//! a cluster file in `SWIMLANE_FDB_CLUSTER_FILE`.)

#[test]
fn foundationdb_conformance_status() {
    let feature = cfg!(feature = "fdb");
    let cluster = std::env::var_os("SWIMLANE_FDB_CLUSTER_FILE");
    match (feature, cluster) {
        (false, _) => println!(
            "skipped: FoundationDB conformance suite not built (run `cargo test -p swimlane-store --features fdb` with SWIMLANE_FDB_CLUSTER_FILE set)"
        ),
        (true, None) => println!("skipped: SWIMLANE_FDB_CLUSTER_FILE not set; the FoundationDB suite ran no checks"),
        (true, Some(p)) => println!("FoundationDB conformance suite runs against {}", p.to_string_lossy()),
    }
}
