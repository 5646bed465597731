//! keelson's pure domain: the app profile and its validation, the lifecycle
//! document rendered for the agent, and liveness probe expressions. No IO.

pub mod lifecycle;
pub mod probe;
pub mod profile;
pub mod release;
