//! The conformance suite on FoundationDB. Needs the `fdb` feature, libfdb_c and a
//! cluster; the cluster file comes from `SWIMLANE_FDB_CLUSTER_FILE`. Without it every
//! test prints "skipped: SWIMLANE_FDB_CLUSTER_FILE not set" and passes.
#![cfg(feature = "fdb")]

use swimlane_store::conformance::StoreFactory;
use swimlane_store::fdb::FdbBackend;
use swimlane_store::Db;

struct Fdb(std::path::PathBuf);

impl StoreFactory for Fdb {
    fn open(&self) -> Result<Db, String> {
        FdbBackend::open(Some(&self.0))
            .map(Db::new)
            .map_err(|e| e.to_string())
    }
}

fn fdb() -> Result<Fdb, String> {
    std::env::var_os("SWIMLANE_FDB_CLUSTER_FILE")
        .map(|p| Fdb(p.into()))
        .ok_or_else(|| "SWIMLANE_FDB_CLUSTER_FILE not set".to_string())
}

swimlane_store::conformance_tests!(fdb());
