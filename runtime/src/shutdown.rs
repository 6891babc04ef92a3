//! Shutdown: one root [`CancellationToken`] per process. Every task watches it (or a
//! child of it); cancelling it means "drain": stop taking new work, finish or abandon
//! in-flight work without committing half of it, then return.
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Exit code when a second signal forces the process down.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Watch for SIGTERM and SIGINT: the first cancels `token` (drain), the second exits
/// the process at once with [`FORCED_EXIT_CODE`]. The handlers are installed before
/// this returns. If `token` is cancelled by someone else first, the watcher stays armed
/// and the next signal exits at once. Call from inside a tokio runtime.
pub fn shutdown_signal(token: CancellationToken) -> JoinHandle<()> {
    let mut signals = Signals::install();
    tokio::spawn(async move {
        tokio::select! {
            s = signals.next() => {
                tracing::warn!(signal = s, "shutting down: draining in-flight work (send again to exit at once)");
                token.cancel();
            }
            _ = token.cancelled() => {}
        }
        let s = signals.next().await;
        tracing::error!(signal = s, "second signal: exiting at once");
        eprintln!("swimlane: second {s}, exiting at once");
        std::process::exit(FORCED_EXIT_CODE);
    })
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("installing the SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("installing the SIGINT handler"),
        }
    }
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Self {
        Signals
    }
    async fn next(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_sigterm_cancels_the_token() {
        let token = CancellationToken::new();
        let _watch = shutdown_signal(token.clone());
        assert!(!token.is_cancelled());
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        tokio::time::timeout(std::time::Duration::from_secs(5), token.cancelled())
            .await
            .expect("SIGTERM cancels the root token");
        // (A second signal would exit the test process: not sent here.)
    }
}
