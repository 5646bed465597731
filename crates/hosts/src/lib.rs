//! The hosts runtime, control side: keelson's view of plain hosts (VMs) that
//! run `keelson-agent host`.
//!
//! ```text
//!  store: targets of kind `hosts` ──► registry (host groups, hosts, health + since)
//!                                        │
//!      HostClient (HTTP, host token) ◄───┤──► HostMonitor: GET /v1/host each round;
//!        deploy/start/stop/logs          │      a host that stops answering is `down` since then
//!                                        └──► HostEvents: every instance's lifecycle events
//!                                               of every host, as one bounded channel
//! ```
//!
//! Hosts are registered in the store as part of their host group's target
//! (`config.hosts`), so registering a host is registering the group again;
//! only a reference to each host's token file is stored, never the token.
//! The API types are shared with the daemon
//! ([`keelson_agent_lifecycle::host::api`]).

pub mod cli;
pub mod client;
pub mod events;
pub mod health;
pub mod registry;

pub use client::HostClient;
pub use events::{HostEvent, HostEvents, StartAt};
pub use health::{HealthReport, HostMonitor};
pub use registry::{Health, HealthStatus, HostRecord, ServerRegistry, TargetRegistry};

/// Errors of the hosts runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] keelson_store::Error),
    /// keelson's server refused or failed a registry call.
    #[error("server {url}: {message}")]
    Server {
        /// The URL called.
        url: String,
        /// What happened.
        message: String,
    },
    /// The host's daemon could not be reached.
    #[error("cannot reach host `{host}` at {url}: {message}")]
    Unreachable {
        /// The host.
        host: String,
        /// The URL called.
        url: String,
        /// Why.
        message: String,
    },
    /// The host's daemon answered with an error.
    #[error("host `{host}` answered HTTP {status} ({code}): {message}")]
    Api {
        /// The host.
        host: String,
        /// The status.
        status: u16,
        /// The daemon's error code (`instance_not_found`, …).
        code: String,
        /// The daemon's message.
        message: String,
        /// The request field at fault.
        field: Option<String>,
    },
    /// The host's daemon answered something that is not its API.
    #[error("host `{host}` answered {url} with HTTP {status} and an unexpected body: {reason}")]
    Unexpected {
        /// The host.
        host: String,
        /// The URL called.
        url: String,
        /// The status.
        status: u16,
        /// Why it was rejected.
        reason: String,
    },
    /// No host has this name.
    #[error("no host named `{0}` is registered")]
    UnknownHost(String),
    /// Bad input, with the field at fault.
    #[error("{field}: {message}")]
    Invalid {
        /// The field (`address`, `name`, `group`, …).
        field: &'static str,
        /// What would be valid.
        message: String,
    },
    /// A host's token file cannot be read.
    #[error("cannot read the token of host `{host}` from {path}: {message}")]
    Token {
        /// The host.
        host: String,
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

/// Result of the hosts runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;
