//! A fleet of worker processes (`swimlane worker …` children of this binary) on one
//! store, for the benchmarks and the chaos soak: start, wait for readiness, SIGKILL,
//! restart. Every child is killed when the fleet is dropped.
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// What every worker process of the fleet gets.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// The `swimlane` binary.
    pub exe: PathBuf,
    /// `SWIMLANE_*` settings (store, deployment, bus, ...) for every worker.
    pub env: Vec<(String, String)>,
    /// Worker logs go here, one file per process start.
    pub log_dir: PathBuf,
}

/// One worker slot.
#[derive(Debug)]
pub struct Member {
    /// `ingest`, `trainer`, `validator` or `publisher`.
    pub kind: &'static str,
    /// Unique in the fleet: `trainer-1`, ...
    pub name: String,
    pub ops: SocketAddr,
    child: Option<Child>,
    /// Processes started in this slot so far.
    pub starts: usize,
}

/// Worker processes; see the module doc.
pub struct ProcFleet {
    spec: FleetSpec,
    pub ingest_api: SocketAddr,
    pub publisher_api: SocketAddr,
    pub members: Vec<Member>,
    http: ureq::Agent,
}

/// A free loopback port for a child process to listen on, distinct from every other
/// port this process handed out.
///
/// The port is checked free (bound, then released) and then the child binds it, so
/// something else may take it in between. Port 0 would hand out a port of the kernel's
/// ephemeral range, the range every outgoing connection (a Kafka client's, an HTTP
/// client's) draws its local port from, and a busy fleet makes such connections all the
/// time; so the port comes from below that range, where only listeners live.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let below = ephemeral_low().clamp(2048, 65535);
    let (lo, span) = (1024u32, below - 1024);
    // Spread processes (test binaries, benchmarks) over the range by their pid.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = lo + (start + n) % span;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return Ok(l.local_addr()?);
        }
    }
    anyhow::bail!("no free loopback port below {below}")
}

/// The lowest port of the kernel's ephemeral range (Linux's default when unknown).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

impl ProcFleet {
    /// Slots for one ingest, `trainers` trainers, one validator and one publisher; none
    /// started yet.
    pub fn new(spec: FleetSpec, trainers: usize) -> anyhow::Result<ProcFleet> {
        std::fs::create_dir_all(&spec.log_dir)?;
        let mut members = Vec::new();
        let mut add = |kind: &'static str, name: String| -> anyhow::Result<()> {
            members.push(Member {
                kind,
                name,
                ops: free_port()?,
                child: None,
                starts: 0,
            });
            Ok(())
        };
        add("ingest", "ingest".into())?;
        for i in 0..trainers {
            add("trainer", format!("trainer-{i}"))?;
        }
        add("validator", "validator".into())?;
        add("publisher", "publisher".into())?;
        Ok(ProcFleet {
            spec,
            ingest_api: free_port()?,
            publisher_api: free_port()?,
            members,
            http: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(1))
                .timeout(Duration::from_secs(2))
                .build(),
        })
    }

    pub fn ingest_url(&self) -> String {
        format!("http://{}", self.ingest_api)
    }

    pub fn publisher_url(&self) -> String {
        format!("http://{}", self.publisher_api)
    }

    /// Start the process of slot `i` (it must not run).
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<u32> {
        let (ingest_api, publisher_api) = (self.ingest_api, self.publisher_api);
        let m = &mut self.members[i];
        anyhow::ensure!(m.child.is_none(), "{} already runs", m.name);
        m.starts += 1;
        let log = std::fs::File::create(
            self.spec
                .log_dir
                .join(format!("{}-{}.log", m.name, m.starts)),
        )?;
        let mut c = Command::new(&self.spec.exe);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SWIMLANE_") {
                c.env_remove(k);
            }
        }
        // An error's message, not its backtrace, at the end of the worker's log (what
        // the soak prints when a worker dies); panics keep their backtraces.
        c.envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LIB_BACKTRACE", "0")
            .env("SWIMLANE_INGEST_LISTEN", ingest_api.to_string())
            .env("SWIMLANE_PUBLISHER_LISTEN", publisher_api.to_string())
            .env(
                format!("SWIMLANE_{}_METRICS_LISTEN", m.kind.to_ascii_uppercase()),
                m.ops.to_string(),
            )
            .args(["worker", m.kind])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = c
            .spawn()
            .with_context(|| format!("starting {} worker {}", self.spec.exe.display(), m.kind))?;
        let pid = child.id();
        m.child = Some(child);
        Ok(pid)
    }

    /// Peak resident memory (`VmHWM`, MiB) of every running slot's process, by name
    /// (Linux; a slot whose `/proc` entry cannot be read is left out).
    pub fn peak_rss_mib(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        for m in &self.members {
            let Some(child) = &m.child else { continue };
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
            let kib = status.ok().and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            });
            if let Some(kib) = kib {
                out.insert(m.name.clone(), (kib / 1024.0 * 10.0).round() / 10.0);
            }
        }
        out
    }

    /// CPU seconds (user + system, `/proc/PID/stat`) every running slot's process has
    /// used so far, by name (Linux; a slot whose entry cannot be read is left out).
    pub fn cpu_seconds(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        for m in &self.members {
            let Some(child) = &m.child else { continue };
            if let Some(t) = process_cpu_seconds(child.id()) {
                out.insert(m.name.clone(), t);
            }
        }
        out
    }

    /// Send `signal` (`STOP`, `CONT`, ...) to slot `i`'s process (`kill -s`).
    pub fn signal(&self, i: usize, signal: &str) -> anyhow::Result<()> {
        let m = &self.members[i];
        let pid = m
            .child
            .as_ref()
            .with_context(|| format!("{} is not running", m.name))?
            .id();
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(
            status.success(),
            "kill -s {signal} {pid} ({}) failed",
            m.name
        );
        Ok(())
    }

    /// Start every slot and wait until each is ready.
    pub fn start_all(&mut self, within: Duration) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_ready(i, within)?;
        }
        Ok(())
    }

    /// Wait until slot `i` answers 200 on `/readyz`; an error if it exits or is not
    /// ready in time.
    pub fn wait_ready(&mut self, i: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let url = format!("http://{}/readyz", self.members[i].ops);
        loop {
            self.check_alive()?;
            if self.http.get(&url).call().is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not ready within {within:?}{}",
                self.members[i].name,
                self.log_tail(i)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL slot `i`'s process and reap it; returns its pid.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<u32> {
        self.check_alive()?;
        let m = &mut self.members[i];
        let mut child = m
            .child
            .take()
            .with_context(|| format!("{} is not running", m.name))?;
        let pid = child.id();
        child.kill()?;
        child.wait()?;
        Ok(pid)
    }

    /// An error naming the first worker that exited on its own (workers never should).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            let exited = match self.members[i].child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(st) = exited {
                self.members[i].child = None;
                anyhow::bail!(
                    "worker {} exited on its own ({st}){}",
                    self.members[i].name,
                    self.log_tail(i)
                );
            }
        }
        Ok(())
    }

    /// The last lines of slot `i`'s current log, for error messages.
    pub fn log_tail(&self, i: usize) -> String {
        let m = &self.members[i];
        let log = std::fs::read_to_string(
            self.spec
                .log_dir
                .join(format!("{}-{}.log", m.name, m.starts)),
        )
        .unwrap_or_default();
        // A panic's or an error's backtrace would fill the tail: leave its frames out,
        // so the message that says what went wrong is what shows.
        let lines: Vec<&str> = log.lines().filter(|l| !is_backtrace_frame(l)).collect();
        format!(
            "; its log ends (backtrace frames left out):\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

/// A line of a Rust backtrace (`  12: symbol` or `      at file:line`), not a message.
fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ")
        || t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The CPU seconds (user and system) process `pid` has used, from `/proc/PID/stat`;
/// `None` when it cannot be read (the process is gone, or this is not Linux).
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    // utime and stime are fields 14 and 15, in clock ticks; the fields after the
    // command name (in parentheses, which may hold spaces) start at field 3.
    const TICKS_PER_SEC: f64 = 100.0;
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / TICKS_PER_SEC)
}

#[cfg(test)]
mod tests {
    #[test]
    fn backtrace_frames_are_told_from_messages() {
        let log = "2026-12-01T09:00:00Z ERROR trainer: handling failed\n\
                   thread 'main' panicked at trainer/src/lib.rs:10:5:\n\
                   Error: bus error: 3: no\n   0: __rustc::rust_begin_unwind\n\
                   \x20            at /rustc/library/std/src/panicking.rs:689:5\n  12: main";
        let kept: Vec<&str> = log
            .lines()
            .filter(|l| !super::is_backtrace_frame(l))
            .collect();
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert!(kept[2].starts_with("Error: bus error"));
    }
}

impl Drop for ProcFleet {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
