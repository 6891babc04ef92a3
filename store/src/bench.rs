//! The store benchmark behind `swimlane bench store`: durable single-key commits per
//! second (one and two writer threads), bulk fill throughput, and range-read
//! throughput, on the embedded backend, next to the disk's own append + fdatasync rate
//! measured in the same directory (the ceiling for one-at-a-time durable commits).
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::embedded::EmbeddedBackend;
use crate::kv::{prefix_range, Db, RangeOption};
use crate::KvError;

/// What to measure.
#[derive(Clone, Debug)]
pub struct StoreBenchOptions {
    /// Directory to put the scratch store in (a temporary subdirectory, removed after);
    /// `None`: the system temporary directory.
    pub dir: Option<PathBuf>,
    /// Length of each timed phase.
    pub seconds: f64,
    /// Bytes of 1–10 kB values to fill before the range scans.
    pub fill_bytes: usize,
}

impl Default for StoreBenchOptions {
    fn default() -> Self {
        StoreBenchOptions {
            dir: None,
            seconds: 3.0,
            fill_bytes: 64_000_000,
        }
    }
}

/// Results. Rates are per second over the timed phase; MB = 10^6 bytes.
#[derive(Clone, Debug)]
pub struct StoreBenchReport {
    pub backend: &'static str,
    pub dir: String,
    /// 4 KiB append + fdatasync per second, same directory.
    pub disk_fsyncs_per_sec: f64,
    /// Sequential durable commits of one 16-byte key and 100-byte value.
    pub commits_per_sec_1_thread: f64,
    pub commit_p50_us: f64,
    pub commit_p99_us: f64,
    /// The same with two writer threads (total over both).
    pub commits_per_sec_2_threads: f64,
    /// The same with [`CONCURRENT_WRITERS`] writer threads: what group commit is for
    /// (many committers, one fsync per group).
    pub commits_per_sec_concurrent: f64,
    pub fill_bytes: u64,
    pub fill_keys: u64,
    pub fill_mb_per_sec: f64,
    /// Full scans of the filled data, 1,000 keys per read transaction.
    pub range_read_mb_per_sec: f64,
    pub range_scans: u32,
}

/// Writer threads of the concurrent phase.
pub const CONCURRENT_WRITERS: usize = 16;

fn mb(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

/// Run the benchmark on a fresh embedded store.
pub fn run_embedded(opts: &StoreBenchOptions) -> Result<StoreBenchReport, KvError> {
    let io = |what: &str, e: std::io::Error| KvError::Backend(format!("bench: {what}: {e}"));
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).map_err(|e| io("creating the directory", e))?;
    let tmp = tempfile::Builder::new()
        .prefix("swimlane-bench-")
        .tempdir_in(&base)
        .map_err(|e| io("creating a scratch directory", e))?;
    let phase = Duration::from_secs_f64(opts.seconds.max(0.1));

    // Disk baseline.
    let disk_fsyncs_per_sec = {
        let mut f = std::fs::File::create(tmp.path().join("fsync-probe"))
            .map_err(|e| io("creating the fsync probe", e))?;
        let block = [0x5au8; 4096];
        let (start, mut n) = (Instant::now(), 0u64);
        while start.elapsed() < phase {
            f.write_all(&block).map_err(|e| io("write", e))?;
            f.sync_data().map_err(|e| io("fdatasync", e))?;
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };

    let db = Db::new(EmbeddedBackend::open_in_dir(tmp.path())?);
    let value = [7u8; 100];

    // One writer.
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < phase {
        let t = Instant::now();
        let k = format!("c1/{i:013}");
        db.transact(|tx| tx.set(k.as_bytes(), &value))?;
        lat.push(t.elapsed());
        i += 1;
    }
    let commits_per_sec_1_thread = i as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let (commit_p50_us, commit_p99_us) = (pct(0.5), pct(0.99));

    // Two writers, then many.
    let writers = |threads: usize, prefix: &str| -> Result<f64, KvError> {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let db = &db;
                    s.spawn(move || -> Result<u64, KvError> {
                        let mut n = 0u64;
                        while start.elapsed() < phase {
                            let k = format!("{prefix}/{t}/{n:011}");
                            db.transact(|tx| tx.set(k.as_bytes(), &value))?;
                            n += 1;
                        }
                        Ok(n)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("bench thread"))
                .sum::<Result<u64, KvError>>()
        })?;
        Ok(total as f64 / start.elapsed().as_secs_f64())
    };
    let commits_per_sec_2_threads = writers(2, "c2")?;
    let commits_per_sec_concurrent = writers(CONCURRENT_WRITERS, "cn")?;

    // Fill.
    let mut rng = StdRng::seed_from_u64(1);
    let (mut filled, mut keys) = (0u64, 0u64);
    let start = Instant::now();
    while (filled as usize) < opts.fill_bytes {
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        while batch_bytes < 4_000_000 && (filled as usize + batch_bytes) < opts.fill_bytes {
            let mut v = vec![0u8; rng.random_range(1_000..=10_000)];
            rng.fill_bytes(&mut v);
            let k = format!("r/{:010}", keys + batch.len() as u64).into_bytes();
            batch_bytes += k.len() + v.len();
            batch.push((k, v));
        }
        db.transact(|tx| {
            for (k, v) in &batch {
                tx.set(k, v)?;
            }
            Ok(())
        })?;
        filled += batch_bytes as u64;
        keys += batch.len() as u64;
    }
    let fill_mb_per_sec = mb(filled, start.elapsed().as_secs_f64());

    // Range scans.
    let (_, end) = prefix_range(b"r/");
    let (start, mut read, mut scans) = (Instant::now(), 0u64, 0u32);
    while scans == 0 || start.elapsed() < phase {
        let mut begin = b"r/".to_vec();
        loop {
            let page = db.transact(|tx| {
                tx.get_range(&RangeOption::new(begin.clone(), end.clone()).limit(1_000))
            })?;
            let Some((last, _)) = page.last() else { break };
            begin = last.clone();
            begin.push(0);
            read += page
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64)
                .sum::<u64>();
        }
        scans += 1;
    }
    let range_read_mb_per_sec = mb(read, start.elapsed().as_secs_f64());

    Ok(StoreBenchReport {
        backend: db.backend_name(),
        dir: base.display().to_string(),
        disk_fsyncs_per_sec,
        commits_per_sec_1_thread,
        commit_p50_us,
        commit_p99_us,
        commits_per_sec_2_threads,
        commits_per_sec_concurrent,
        fill_bytes: filled,
        fill_keys: keys,
        fill_mb_per_sec,
        range_read_mb_per_sec,
        range_scans: scans,
    })
}
