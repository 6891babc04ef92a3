//! Opening the configured store.
use swimlane_store::Db;

use crate::config::{Config, StoreLocation};
use crate::RuntimeError;

/// Open the store `config.store` names: a directory holds the embedded store (its file
/// is created if missing); `fdb:[cluster-file]` is FoundationDB, available when this
/// crate is built with the `fdb` feature. Blocking: call it before starting work, or
/// from `spawn_blocking`.
pub fn open_store(config: &Config) -> Result<Db, RuntimeError> {
    match config.store_location()? {
        StoreLocation::Embedded(dir) => {
            let backend =
                swimlane_store::embedded::EmbeddedBackend::open_in_dir(&dir).map_err(|source| {
                    RuntimeError::Store {
                        location: dir.display().to_string(),
                        source,
                    }
                })?;
            Ok(Db::new(backend))
        }
        StoreLocation::Fdb(cluster_file) => open_fdb(&config.store, cluster_file),
    }
}

#[cfg(feature = "fdb")]
fn open_fdb(location: &str, cluster_file: Option<std::path::PathBuf>) -> Result<Db, RuntimeError> {
    let backend =
        swimlane_store::fdb::FdbBackend::open(cluster_file.as_deref()).map_err(|source| {
            RuntimeError::Store {
                location: location.to_string(),
                source,
            }
        })?;
    Ok(Db::new(backend))
}

#[cfg(not(feature = "fdb"))]
fn open_fdb(location: &str, _cluster_file: Option<std::path::PathBuf>) -> Result<Db, RuntimeError> {
    Err(RuntimeError::FdbNotBuilt {
        location: location.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_an_embedded_store_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            store: dir.path().join("data").display().to_string(),
            ..Config::default()
        };
        let db = open_store(&config).unwrap();
        db.transact(|tx| tx.set(b"k", b"v")).unwrap();
        drop(db);
        let db = open_store(&config).unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[cfg(not(feature = "fdb"))]
    #[test]
    fn fdb_without_the_feature_says_how_to_get_it() {
        let config = Config {
            store: "fdb:".into(),
            ..Config::default()
        };
        let e = open_store(&config).unwrap_err().to_string();
        assert!(e.contains("--features fdb"), "{e}");
    }
}
