//! The doing side of a release, as a runtime (hosts, Kubernetes, local
//! processes) offers it to the engine.
//!
//! The contract, which `keelson_core::release` relies on:
//! - [`Runtime::events`] first reports every instance the runtime knows,
//!   then every change as it happens, pushed (not polled) where the runtime
//!   can push; events about one instance arrive in the order they happened;
//! - [`Runtime::apply`] is idempotent: applying an action twice (after a
//!   crash between applying it and journaling it) has the effect of
//!   applying it once; it returns once the command took effect, and
//!   observations (ONLINE, failed) come through the event stream, before or
//!   after the return;
//! - `TakeOffline` holds an instance out of traffic, across restarts of the
//!   engine and of the instance, until `BringOnline` or a fresh start;
//! - hosts tag processes with the command's generation and report it back.
//!
//! The engine, for its part, delivers ticks at the deadlines the machine
//! names and applies `release.pending` again after a restart.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keelson_core::release::{Action, Fleet, InstanceEvent, InstanceId, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A runtime's failure, as text (it ends up in the release's state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(pub String);

/// One app in one environment on one runtime.
pub trait Runtime: Send + Sync + 'static {
    /// The instances as they run now, to plan a release from.
    fn fleet(&self) -> impl Future<Output = Result<Fleet, RuntimeError>> + Send;

    /// Applies one action (idempotently); an `Err` makes the step fail.
    fn apply(&self, action: &Action) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Subscribes to instance events: every known instance first, then
    /// changes. The stream ends only when the runtime goes away.
    fn events(
        &self,
    ) -> impl Future<Output = Result<mpsc::Receiver<InstanceEvent>, RuntimeError>> + Send;

    /// Subscribes to the output lines of the instances' lifecycle hooks
    /// (preStart, preOnline, preOffline) of runs that began at `since` or
    /// later, live, for showing them; never an input of the machine. None
    /// when the runtime cannot show them. The subscription ends when it is
    /// dropped.
    fn hook_output(&self, since: Timestamp) -> Option<HookOutput> {
        let _ = since;
        None
    }
}

/// The longest hook output line passed on, in bytes; longer lines are cut
/// (at a character boundary) and end with `…`.
pub const MAX_HOOK_LINE_BYTES: usize = 1024;

/// How many hook output lines a subscription holds before the runtime
/// drops (and counts) further ones.
pub const HOOK_OUTPUT_BACKLOG: usize = 1024;

/// One output line of one run of a lifecycle hook of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookLine {
    /// The instance (`<host>@<track>`).
    pub instance: InstanceId,
    /// The hook: `preStart`, `preOnline` or `preOffline`.
    pub hook: String,
    /// When the hook's run began: the lines of one run share it.
    pub run: Timestamp,
    /// The line, without its newline, at most [`MAX_HOOK_LINE_BYTES`].
    pub line: String,
}

/// A subscription to hook output lines.
#[derive(Debug)]
pub struct HookOutput {
    /// The lines, in the order each hook wrote them.
    pub lines: mpsc::Receiver<HookLine>,
    /// Lines dropped because `lines` was full (the subscriber was slower
    /// than the hooks); the subscriber takes (swaps out) the count.
    pub dropped: Arc<AtomicU64>,
}

struct HookSubscriber {
    since: Timestamp,
    lines: mpsc::Sender<HookLine>,
    dropped: Arc<AtomicU64>,
}

/// The subscribers of a runtime's hook output: it never waits for them
/// (a full subscriber loses lines, counted), so hooks are never slowed.
#[derive(Default)]
pub struct HookSubscribers {
    subscribers: Mutex<Vec<HookSubscriber>>,
}

impl std::fmt::Debug for HookSubscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookSubscribers")
            .field("subscribers", &self.lock().len())
            .finish()
    }
}

impl HookSubscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HookSubscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new subscription to runs that began at `since` or later.
    pub fn subscribe(&self, since: Timestamp) -> HookOutput {
        let (tx, rx) = mpsc::channel(HOOK_OUTPUT_BACKLOG);
        let dropped = Arc::new(AtomicU64::new(0));
        self.lock().push(HookSubscriber {
            since,
            lines: tx,
            dropped: dropped.clone(),
        });
        HookOutput { lines: rx, dropped }
    }

    /// Whether someone wants the output of a run that began at `run`.
    pub fn wants(&self, run: Timestamp) -> bool {
        let mut subscribers = self.lock();
        subscribers.retain(|s| !s.lines.is_closed());
        subscribers.iter().any(|s| s.since <= run)
    }

    /// Passes a line on to every subscriber that wants it, cut to
    /// [`MAX_HOOK_LINE_BYTES`].
    pub fn publish(&self, instance: &InstanceId, hook: &str, run: Timestamp, line: &str) {
        let mut subscribers = self.lock();
        subscribers.retain(|s| !s.lines.is_closed());
        if subscribers.iter().all(|s| s.since > run) {
            return;
        }
        let line = HookLine {
            instance: instance.clone(),
            hook: hook.to_string(),
            run,
            line: cut_line(line),
        };
        for subscriber in subscribers.iter().filter(|s| s.since <= run) {
            if subscriber.lines.try_send(line.clone()).is_err() {
                subscriber.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `line` without trailing `\r`, cut to [`MAX_HOOK_LINE_BYTES`].
pub fn cut_line(line: &str) -> String {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.len() <= MAX_HOOK_LINE_BYTES {
        return line.to_string();
    }
    let mut end = MAX_HOOK_LINE_BYTES - '…'.len_utf8();
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// Finds the runtime of an app in an environment.
pub trait Runtimes: Send + Sync + 'static {
    /// The runtime type.
    type Runtime: Runtime;

    /// The runtime that runs `app` in `env`. An error for a release that is
    /// still being planned refuses it (nothing runs it there); for a planned
    /// one it is taken as passing, and the release is claimed again later.
    fn runtime(
        &self,
        app: &str,
        env: &str,
    ) -> impl Future<Output = Result<Arc<Self::Runtime>, RuntimeError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_at_a_character_boundary() {
        assert_eq!(cut_line("short\r"), "short");
        let long = "é".repeat(MAX_HOOK_LINE_BYTES);
        let cut = cut_line(&long);
        assert!(cut.len() <= MAX_HOOK_LINE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…') && cut.starts_with("éé"));
    }

    #[test]
    fn a_full_subscriber_loses_lines_and_counts_them_and_old_runs_are_not_sent() {
        let hooks = HookSubscribers::default();
        let mut output = hooks.subscribe(Timestamp(100));
        let id = InstanceId("vm-0@blue".into());
        hooks.publish(&id, "preOnline", Timestamp(99), "before the subscription");
        assert!(!hooks.wants(Timestamp(99)) && hooks.wants(Timestamp(100)));
        for n in 0..HOOK_OUTPUT_BACKLOG + 5 {
            hooks.publish(&id, "preOnline", Timestamp(100), &format!("line {n}"));
        }
        assert_eq!(output.dropped.load(Ordering::Relaxed), 5);
        let first = output.lines.try_recv().expect("a line");
        assert_eq!(first.line, "line 0");
        drop(output);
        assert!(
            !hooks.wants(Timestamp(200)),
            "a dropped subscription is gone"
        );
    }
}
