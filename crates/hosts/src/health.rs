//! Host health: each round asks every host's daemon who it is
//! (`GET /v1/host` with its token). A host that does not answer in time, or
//! refuses its token, is `down`; the registry records a change with the time
//! it was seen, so `since` says since when a host has been down (or up).
//!
//! ```text
//! every interval: probe all hosts at once ─► compare with the recorded health
//!                                           ─► record only the changes (status + since)
//! ```

use std::sync::Arc;
use std::time::Duration;

use keelson_agent_lifecycle::host::api::HostInfo;
use keelson_agent_lifecycle::output::rfc3339_now;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Result;
use crate::client::HostClient;
use crate::registry::{Health, HealthStatus, HostRecord, TargetRegistry, list_hosts, set_health};

/// One host's result of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// The host.
    pub host: HostRecord,
    /// Its health after this round.
    pub health: Health,
    /// Whether this round changed it.
    pub changed: bool,
    /// What the daemon said, when it answered.
    pub info: Option<HostInfo>,
}

/// Checks hosts and records their health.
#[derive(Debug)]
pub struct HostMonitor<R> {
    registry: Arc<R>,
    timeout: Duration,
}

impl<R: TargetRegistry + 'static> HostMonitor<R> {
    /// A monitor over `registry`; a host gets `timeout` to answer.
    pub fn new(registry: Arc<R>, timeout: Duration) -> Self {
        HostMonitor { registry, timeout }
    }

    /// Probes every host once, concurrently, and records the changes.
    pub async fn check_once(&self) -> Result<Vec<HealthReport>> {
        let hosts = list_hosts(&*self.registry).await?;
        let mut probes = JoinSet::new();
        for (i, host) in hosts.iter().cloned().enumerate() {
            let timeout = self.timeout;
            probes.spawn(async move { (i, probe(&host, timeout).await) });
        }
        let mut results = vec![None; hosts.len()];
        while let Some(done) = probes.join_next().await {
            if let Ok((i, result)) = done {
                results[i] = Some(result);
            }
        }
        let mut reports = Vec::with_capacity(hosts.len());
        for (host, result) in hosts.into_iter().zip(results) {
            let result = result.unwrap_or_else(|| Err("the probe panicked".into()));
            let status = if result.is_ok() {
                HealthStatus::Up
            } else {
                HealthStatus::Down
            };
            let error = result.as_ref().err().cloned();
            let previous = host.health.clone();
            let changed = previous.as_ref().is_none_or(|h| {
                h.status != status || (status == HealthStatus::Down && h.error.is_none())
            });
            let health = match previous {
                Some(h) if !changed => h,
                _ => Health {
                    status,
                    since: rfc3339_now(),
                    error,
                },
            };
            if changed {
                set_health(&*self.registry, &host.name, &health).await?;
                tracing::info!(host = %host.name, status = ?health.status, error = ?health.error, "host health changed");
            }
            reports.push(HealthReport {
                host,
                health,
                changed,
                info: result.ok(),
            });
        }
        Ok(reports)
    }

    /// Checks every `interval` until `cancel`.
    pub async fn run(self, interval: Duration, cancel: CancellationToken) {
        let span = tracing::info_span!("host_monitor");
        async move {
            loop {
                if let Err(e) = self.check_once().await {
                    tracing::warn!(error = %e, "host health round failed");
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
            }
        }
        .instrument(span)
        .await;
    }
}

async fn probe(host: &HostRecord, timeout: Duration) -> Result<HostInfo, String> {
    let client = HostClient::for_host(host).map_err(|e| e.to_string())?;
    client.host_info(timeout).await.map_err(|e| e.to_string())
}
