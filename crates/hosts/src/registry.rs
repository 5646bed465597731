//! Host groups and hosts, registered in the store as targets of kind
//! `hosts`: a group's `config.hosts` lists its hosts.
//!
//! ```json
//! {"hosts": [{"name": "vm-1", "address": "http://10.0.0.5:7400",
//!             "tokenFile": "/etc/keelson/hosts/vm-1.token",
//!             "health": {"status": "down", "since": "2026-01-01T00:00:00.000Z", "error": "…"}}]}
//! ```
//!
//! Host names are unique across groups. Health is written only when it
//! changes, so `since` is when the host last changed between up and down.
//! The registry is reached through [`TargetRegistry`]: the store itself (in
//! the server) or keelson's API (from the CLI).

use std::future::Future;

use keelson_store::{NewTarget, Store, Target, TargetKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The actor recorded in the audit log for registry writes from this crate.
pub const ACTOR: &str = "keelson-hosts";

/// Whether a host answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Its daemon answers with the host token.
    Up,
    /// Its daemon does not answer (or refuses the token).
    Down,
}

/// A host's health and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Up or down.
    pub status: HealthStatus,
    /// When it became so (RFC 3339).
    pub since: String,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One registered host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// Its name, unique across groups.
    pub name: String,
    /// Its group (a target of kind `hosts`).
    #[serde(default, skip_serializing)]
    pub group: String,
    /// Its daemon's base URL (`http://10.0.0.5:7400`).
    pub address: String,
    /// The file holding its host token (read when calling it).
    pub token_file: String,
    /// Last observed health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// Where targets are registered.
pub trait TargetRegistry: Send + Sync {
    /// All targets.
    fn targets(&self) -> impl Future<Output = Result<Vec<Target>>> + Send;
    /// Registers or updates one target.
    fn put_target(&self, target: &NewTarget) -> impl Future<Output = Result<Target>> + Send;
}

impl TargetRegistry for Store {
    async fn targets(&self) -> Result<Vec<Target>> {
        Ok(self.list_targets().await?)
    }

    async fn put_target(&self, target: &NewTarget) -> Result<Target> {
        Ok(Store::put_target(self, target, ACTOR).await?)
    }
}

/// The registry through keelson's API (`/api/v1/targets`), for the CLI.
#[derive(Debug, Clone)]
pub struct ServerRegistry {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Items<T> {
    items: Vec<T>,
}

impl ServerRegistry {
    /// A registry at `server` (`http://127.0.0.1:8080`) with an API token.
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        if !server.starts_with("http://") && !server.starts_with("https://") {
            return Err(Error::Invalid {
                field: "server",
                message: format!("`{server}` is not a URL; expected http://HOST:PORT"),
            });
        }
        Ok(ServerRegistry {
            base: server.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::new(),
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T> {
        let request = match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        let fail = |message: String| Error::Server {
            url: url.to_string(),
            message,
        };
        let response = request.send().await.map_err(|e| fail(e.to_string()))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| fail(e.to_string()))?;
        if !(200..300).contains(&status) {
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let message = body["error"]["message"].as_str().map_or_else(
                || String::from_utf8_lossy(&bytes).into_owned(),
                str::to_string,
            );
            return Err(fail(format!("HTTP {status}: {message}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("unexpected body: {e}")))
    }
}

impl TargetRegistry for ServerRegistry {
    async fn targets(&self) -> Result<Vec<Target>> {
        let url = format!("{}/api/v1/targets", self.base);
        let items: Items<Target> = self.call(self.http.get(&url), &url).await?;
        Ok(items.items)
    }

    async fn put_target(&self, target: &NewTarget) -> Result<Target> {
        let url = format!("{}/api/v1/targets", self.base);
        self.call(self.http.post(&url).json(target), &url).await
    }
}

/// The hosts of a group target.
fn hosts_of(target: &Target) -> Vec<HostRecord> {
    let mut hosts: Vec<HostRecord> = target
        .spec
        .config
        .get("hosts")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    for h in &mut hosts {
        h.group = target.spec.name.clone();
    }
    hosts
}

fn with_hosts(target: &Target, hosts: &[HostRecord]) -> NewTarget {
    let mut spec = target.spec.clone();
    if !spec.config.is_object() {
        spec.config = serde_json::json!({});
    }
    spec.config["hosts"] = serde_json::to_value(hosts).unwrap_or_default();
    spec
}

/// Every registered host, by group then name.
pub async fn list_hosts(registry: &impl TargetRegistry) -> Result<Vec<HostRecord>> {
    let mut hosts: Vec<HostRecord> = registry
        .targets()
        .await?
        .iter()
        .filter(|t| t.spec.kind == TargetKind::Hosts)
        .flat_map(hosts_of)
        .collect();
    hosts.sort_by(|a, b| (&a.group, &a.name).cmp(&(&b.group, &b.name)));
    Ok(hosts)
}

/// One host by name.
pub async fn find_host(registry: &impl TargetRegistry, name: &str) -> Result<HostRecord> {
    list_hosts(registry)
        .await?
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| Error::UnknownHost(name.to_string()))
}

/// Whether `name` may name a host or group: 1–63 of `[a-z0-9.-]`, starting
/// and ending with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Registers `host` in its group (creating the group as a `hosts` target),
/// or updates its address and token file. Its health is kept.
pub async fn add_host(registry: &impl TargetRegistry, host: &HostRecord) -> Result<HostRecord> {
    for (field, value) in [("name", &host.name), ("group", &host.group)] {
        if !valid_name(value) {
            return Err(Error::Invalid {
                field,
                message: format!(
                    "`{value}` is not a valid {field}: use 1-63 of a-z, 0-9, `-`, `.`, starting and ending with a letter or digit"
                ),
            });
        }
    }
    let parsed = reqwest::Url::parse(&host.address).ok();
    if !parsed.is_some_and(|u| u.scheme() == "http" && u.host_str().is_some()) {
        return Err(Error::Invalid {
            field: "address",
            message: format!(
                "`{}` is not a daemon address; expected http://HOST:PORT (the host daemon speaks plain http)",
                host.address
            ),
        });
    }
    if host.token_file.is_empty() {
        return Err(Error::Invalid {
            field: "token_file",
            message: "a token file is required".into(),
        });
    }
    let targets = registry.targets().await?;
    if let Some(other) = targets
        .iter()
        .filter(|t| t.spec.kind == TargetKind::Hosts && t.spec.name != host.group)
        .find(|t| hosts_of(t).iter().any(|h| h.name == host.name))
    {
        return Err(Error::Invalid {
            field: "name",
            message: format!(
                "host `{}` is already registered in group `{}`",
                host.name, other.spec.name
            ),
        });
    }
    let mut record = host.clone();
    record.address = host.address.trim_end_matches('/').to_string();
    let group = match targets.iter().find(|t| t.spec.name == host.group) {
        Some(t) if t.spec.kind != TargetKind::Hosts => {
            return Err(Error::Invalid {
                field: "group",
                message: format!("target `{}` is a cluster, not a host group", host.group),
            });
        }
        Some(t) => t.clone(),
        None => Target {
            spec: NewTarget {
                name: host.group.clone(),
                kind: TargetKind::Hosts,
                environment: None,
                config: serde_json::json!({"hosts": []}),
                description: Some("host group".into()),
            },
            created_at: keelson_store::Timestamp(0),
            updated_at: keelson_store::Timestamp(0),
        },
    };
    let mut hosts = hosts_of(&group);
    match hosts.iter_mut().find(|h| h.name == record.name) {
        Some(existing) => {
            record.health = existing.health.clone();
            *existing = record.clone();
        }
        None => hosts.push(record.clone()),
    }
    registry.put_target(&with_hosts(&group, &hosts)).await?;
    Ok(record)
}

/// Records a host's new health (only call on a change).
pub async fn set_health(registry: &impl TargetRegistry, name: &str, health: &Health) -> Result<()> {
    let targets = registry.targets().await?;
    let group = targets
        .iter()
        .filter(|t| t.spec.kind == TargetKind::Hosts)
        .find(|t| hosts_of(t).iter().any(|h| h.name == name))
        .ok_or_else(|| Error::UnknownHost(name.to_string()))?;
    let mut hosts = hosts_of(group);
    for h in hosts.iter_mut().filter(|h| h.name == name) {
        h.health = Some(health.clone());
    }
    registry.put_target(&with_hosts(group, &hosts)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("vm-1.dc2"));
        assert!(!valid_name("VM"));
        assert!(!valid_name("-a"));
        assert!(!valid_name("a-"));
        assert!(!valid_name(""));
    }
}
