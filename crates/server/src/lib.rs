//! keelson's server: the HTTP API over the store, its access control, and the
//! client side (a typed HTTP client and the CLI's client commands).
//!
//! ```text
//!   keelson apply/get/history/diff ──► client ──HTTP──► api ──► access ──► keelson_store
//!                                                        │
//!                          keelson serve ──► serve ──────┘  (graceful shutdown, logs, metrics)
//! ```

pub mod access;
pub mod api;
pub mod cli;
pub mod client;
pub mod diff;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod output;
pub mod profile_input;
pub mod releases;
pub mod sample;
pub mod serve;

pub use error::ApiError;
