//! Waiting for files to change: inotify on the directories a loop reads,
//! so it sleeps until someone writes instead of reading every few
//! milliseconds. The host daemon's log streams wait for supervisors to
//! write; the sidecar's watcher wakes its control loop when the traffic
//! label or an offline request changes.
//!
//! ```text
//!  loop: read what is new ─► nothing? ─► Watch::wait(timeout) ─► read again
//!                                        (wakes on a write in a watched
//!                                         directory, or at the timeout)
//! ```
//!
//! Where inotify is not available (or a directory cannot be watched yet),
//! waiting falls back to a short sleep: slower, never wrong, since a stream always reads
//! again after waiting.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::inotify::{self, CreateFlags, WatchFlags};

/// How long a wait lasts without inotify.
const FALLBACK: Duration = Duration::from_millis(10);

/// Wakes a stream when a file in one of its directories changes.
#[derive(Debug)]
pub(crate) struct Watch {
    fd: Option<OwnedFd>,
    /// Every directory asked for is watched (else waits stay short).
    complete: bool,
}

impl Watch {
    pub(crate) fn new() -> Watch {
        Watch {
            fd: inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok(),
            complete: true,
        }
    }

    /// Starts a new round of [`Watch::add`] calls: the set is complete
    /// again unless one of them fails.
    pub(crate) fn begin(&mut self) {
        self.complete = true;
    }

    /// Watches `dir` for files written, created or moved in. Adding a
    /// directory again is cheap (and watches it anew if it was replaced).
    /// A directory that cannot be watched (not there yet) keeps waits
    /// short until a round adds everything.
    pub(crate) fn add(&mut self, dir: &Path) {
        let Some(fd) = &self.fd else { return };
        let flags = WatchFlags::MODIFY
            | WatchFlags::CREATE
            | WatchFlags::MOVED_TO
            | WatchFlags::CLOSE_WRITE;
        if inotify::add_watch(fd, dir, flags).is_err() {
            self.complete = false;
        }
    }

    /// Waits until a watched directory changes (true) or `timeout` passes
    /// (false; also when it cannot tell).
    pub(crate) fn wait(&mut self, timeout: Duration) -> bool {
        let fd = match &self.fd {
            Some(fd) if self.complete => fd,
            _ => {
                std::thread::sleep(FALLBACK.min(timeout));
                return false;
            }
        };
        let timespec = Timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let ready = match rustix::event::poll(&mut fds, Some(&timespec)) {
            Ok(n) => n > 0,
            Err(_) => {
                std::thread::sleep(FALLBACK.min(timeout));
                return false;
            }
        };
        // Drain: what changed does not matter, the caller reads again.
        let mut buf = [0u8; 4096];
        while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_write_in_a_watched_directory_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = Watch::new();
        watch.add(dir.path());
        let path = dir.path().join("0.log");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(path, "line\n").unwrap();
        });
        let started = Instant::now();
        assert!(watch.wait(Duration::from_secs(20)), "woken by the write");
        writer.join().unwrap();
        watch.wait(Duration::from_millis(1)); // what the write left queued
        // Well before the timeout: the write woke it.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // Nothing new: the next wait runs to its timeout.
        let started = Instant::now();
        assert!(!watch.wait(Duration::from_millis(100)), "nothing changed");
        assert!(
            started.elapsed() >= Duration::from_millis(90),
            "{:?}",
            started.elapsed()
        );
    }
}
