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
use std::sync::Arc;

use keelson_core::release::{Action, Fleet, InstanceEvent};
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
