//! keelson's release engine: the doing side of core's release state machine.
//!
//! ```text
//!  API ──create / pause / resume / abort / rollback──► store: releases row
//!                                                      (state JSON, version, lease)
//!  Worker ──claim (lease)──► drive one release:              ▲ one transaction per step:
//!     ┌──────────────────────────────────────────────────┐   │ state + journal + event
//!     │ runtime events ─┐                                 │   │
//!     │ action done  ───┼─► core::step ─► commit ─────────┼───┘
//!     │ deadline tick ──┘        │                        │
//!     │                          └─► new actions ─► Runtime::apply (idempotent)
//!     └──────────────────────────────────────────────────┘
//! ```
//!
//! Decisions stay in `keelson_core::release`; this crate only stores, applies
//! and feeds back. Every state change is written with its journal entries
//! (steps issued `planned`, steps confirmed `done`) in one transaction, so
//! after a crash the stored state says exactly which actions may not have
//! happened: the `pending` ones, which a worker applies again (each command
//! is idempotent; a step journaled `done` is never applied again). Kill
//! points ([`kill`]) let tests crash a worker at any step.

pub mod engine;
pub mod hosts;
pub mod kill;
pub mod local;
pub mod profile;
pub mod runtime;

pub use engine::{
    NewReleaseRequest, PLANNING, REFUSED, ReleaseView, StoredRelease, Worker, WorkerConfig,
    create_release, release_view, request, step_name, submit_release,
};
pub use runtime::{Runtime, RuntimeError, Runtimes};

/// Result of the engine's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] keelson_store::Error),
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The release could not be planned (bad batches, no instances, …).
    #[error("cannot plan the release: {0}")]
    Plan(String),
    /// The state machine refused a user's request in the release's state.
    #[error("{0}")]
    Rejected(String),
    /// The stored state does not decode.
    #[error("corrupt release state: {0}")]
    Corrupt(String),
    /// Another writer kept changing the release.
    #[error("release {0} keeps changing; try again")]
    Busy(String),
}
