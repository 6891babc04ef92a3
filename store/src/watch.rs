//! Waiting for a store to change, instead of sleeping between polls.
//!
//! A consumer of the embedded log, or the outbox relay, finds new work by reading the
//! store. Between empty reads it used to sleep a fixed interval, so every hop of a
//! record through the pipeline waited half an interval on average. A [`ChangeWatch`]
//! lets it sleep until the store changes instead, with the interval as an upper bound.
//!
//! # Guarantees
//! - [`ChangeWatch::wait`] returns once the store may have changed since the previous
//!   call returned (or since the watch was made), or when the timeout passes, whichever
//!   comes first. It may return early for no reason (callers re-read and wait again);
//!   it never misses a change: a commit that completes after the watch was made and
//!   after the previous `wait` returned makes the next `wait` return promptly, from any
//!   thread or process that opened the same store.
//! - Correctness never depends on it: a caller must still bound every wait with its own
//!   poll interval (a backend without watches, or a lost notification, then costs
//!   latency, never a record).
//!
//! # The embedded backend's watch (Linux)
//! Beside the store's file lies a *bell* file (`<store>-bell`, one byte). After every
//! group `COMMIT` has returned (so the commit is visible to any new read transaction),
//! the committing process writes that byte (no fsync: the bell carries no data). A watch
//! is an inotify descriptor on the bell for `IN_MODIFY`, waited on with `poll(2)` and
//! drained on return. The bell is rung after the commit, not on the write-ahead log's
//! own writes, because SQLite writes the log's frames before the commit becomes
//! visible: a reader woken by those could read too early and then sleep a whole
//! interval. Elsewhere, or if inotify is unavailable, there is no watch and callers
//! sleep their interval as before.
use std::path::{Path, PathBuf};
use std::time::Duration;

/// See the module doc.
pub trait ChangeWatch: Send {
    /// Return once the store may have changed since the previous return, or after
    /// `timeout`.
    fn wait(&mut self, timeout: Duration);
}

/// Wait on `watch` for at most `timeout`, or sleep `timeout` when there is none (what
/// every poller does between empty polls).
pub fn wait_or_sleep(watch: &mut Option<Box<dyn ChangeWatch>>, timeout: Duration) {
    match watch {
        Some(w) => w.wait(timeout),
        None => std::thread::sleep(timeout),
    }
}

/// The bell of an embedded store: rung after every commit.
pub(crate) struct Bell {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl Bell {
    /// The bell of the store file `store` (created if missing). A bell that cannot be
    /// opened is silent: watchers then wait their full interval.
    pub(crate) fn open(store: &Path) -> Bell {
        let mut name = store.as_os_str().to_owned();
        name.push("-bell");
        let path = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok();
        Bell { path, file }
    }

    /// Tell every watcher the store changed.
    pub(crate) fn ring(&self) {
        #[cfg(unix)]
        if let Some(f) = &self.file {
            use std::os::unix::fs::FileExt;
            // A failed ring only costs watchers latency.
            let _ = f.write_at(&[0], 0);
        }
    }

    /// A new watch on this bell, if the platform has one.
    pub(crate) fn watch(&self) -> Option<Box<dyn ChangeWatch>> {
        self.file.as_ref()?;
        #[cfg(target_os = "linux")]
        {
            inotify::BellWatch::new(&self.path).map(|w| Box::new(w) as Box<dyn ChangeWatch>)
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

#[cfg(target_os = "linux")]
mod inotify {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::time::Duration;

    /// An inotify descriptor watching one file for `IN_MODIFY`.
    pub(super) struct BellWatch {
        fd: libc::c_int,
    }

    impl BellWatch {
        pub(super) fn new(path: &Path) -> Option<BellWatch> {
            let c = CString::new(path.as_os_str().as_bytes()).ok()?;
            // SAFETY: plain syscalls on a descriptor this value owns; `c` outlives the
            // call that reads it.
            unsafe {
                let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
                if fd < 0 {
                    return None;
                }
                if libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MODIFY) < 0 {
                    libc::close(fd);
                    return None;
                }
                Some(BellWatch { fd })
            }
        }

        /// Read every queued event (the descriptor is non-blocking).
        fn drain(&self) {
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: `buf` is valid for `buf.len()` bytes.
                let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
            }
        }
    }

    impl super::ChangeWatch for BellWatch {
        fn wait(&mut self, timeout: Duration) {
            // Whole milliseconds, rounded up: a positive timeout never becomes a
            // busy loop of zero-length polls.
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd. An interrupted poll returns early, as allowed.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            self.drain();
        }
    }

    impl Drop for BellWatch {
        fn drop(&mut self) {
            // SAFETY: the descriptor is this value's and closed once.
            unsafe { libc::close(self.fd) };
        }
    }
}
