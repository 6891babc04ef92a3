// The checks of the fuzz target `blob_read` (fuzz/fuzz_targets/blob_read.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use std::sync::OnceLock;

use swimlane_store::blob::{self, BlobHeader, HEADER_LEN};
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::Db;

const PREFIX: &[u8] = b"fuzz-blob";

fn db() -> &'static Db {
    static DB: OnceLock<(Db, tempfile::TempDir)> = OnceLock::new();
    &DB.get_or_init(|| {
        // Memory-backed when the machine has /dev/shm: no fsync per execution.
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary directory");
        let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).expect("the store opens"));
        (db, dir)
    })
    .0
}

pub fn check(data: &[u8]) {
    // As long as the header its first byte names (a version 1 header is shorter).
    let len = data
        .first()
        .and_then(|&v| blob::header_len(v))
        .unwrap_or(HEADER_LEN);
    let split = data.len().min(len);
    let (header, rest) = data.split_at(split);
    let decoded = BlobHeader::decode("fuzz", header).ok();
    let db = db();
    db.transact(|tx| {
        tx.clear_prefix(PREFIX)?;
        tx.set(PREFIX, header)?;
        if let Some(h) = &decoded {
            let size = (h.chunk_size as usize).clamp(1, rest.len().max(1));
            for (i, c) in rest.chunks(size).take(8).enumerate() {
                tx.set(&blob::chunk_key(PREFIX, h.generation, i as u32), c)?;
            }
        }
        Ok(())
    })
    .expect("the store takes the write");
    let in_one = db.transact(|tx| blob::read_in(tx, PREFIX));
    let whole = blob::read(db, PREFIX);
    for r in [in_one, whole] {
        match r {
            Ok(Some(v)) => {
                let h = decoded
                    .as_ref()
                    .expect("a blob read back has a valid header");
                assert_eq!(v.len() as u64, h.len);
                assert_eq!(v, rest[..v.len()]);
            }
            Ok(None) => panic!("the header is there"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
