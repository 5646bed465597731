//! Instrumentation: request counts by verb, resource and namespace, and
//! fault injection (latency, error statuses, dropped watches) per resource.
//!
//! Tests use these to prove what a client did ("no LIST of pods across all
//! namespaces") and to make the server misbehave on purpose.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::broadcast;

/// An API verb, as in audit logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// GET of one object.
    Get,
    /// GET of a collection.
    List,
    /// GET of a collection with `watch=true`.
    Watch,
    /// POST.
    Create,
    /// PUT.
    Update,
    /// PATCH.
    Patch,
    /// DELETE of one object.
    Delete,
    /// DELETE of a collection.
    #[serde(rename = "deletecollection")]
    DeleteCollection,
}

impl Verb {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }
}

/// One counter of [`Metrics::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCount {
    /// The verb.
    pub verb: Verb,
    /// The resource, with `/subresource` when one was addressed.
    pub resource: String,
    /// The namespace of the request; `None` for cluster-scoped or
    /// all-namespaces requests.
    pub namespace: Option<String>,
    /// How many requests.
    pub count: u64,
}

type CountKey = (Verb, String, Option<String>);

/// Request counters.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<HashMap<CountKey, u64>>,
}

impl Metrics {
    /// Counts one request.
    pub fn record(&self, verb: Verb, resource: &str, namespace: Option<&str>) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry((verb, resource.to_string(), namespace.map(String::from)))
            .or_default() += 1;
    }

    /// Requests with this verb on this resource in exactly this namespace
    /// (`None`: cluster-scoped or across all namespaces).
    pub fn count(&self, verb: Verb, resource: &str, namespace: Option<&str>) -> u64 {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.get(&(verb, resource.to_string(), namespace.map(String::from)))
            .copied()
            .unwrap_or(0)
    }

    /// Requests with this verb on this resource, in any namespace or none.
    pub fn total(&self, verb: Verb, resource: &str) -> u64 {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.iter()
            .filter(|((v, r, _), _)| *v == verb && r == resource)
            .map(|(_, n)| n)
            .sum()
    }

    /// Every counter.
    pub fn snapshot(&self) -> Vec<RequestCount> {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<RequestCount> = c
            .iter()
            .map(|((verb, resource, namespace), count)| RequestCount {
                verb: *verb,
                resource: resource.clone(),
                namespace: namespace.clone(),
                count: *count,
            })
            .collect();
        out.sort_by(|a, b| {
            (a.resource.as_str(), a.verb.as_str(), &a.namespace).cmp(&(
                b.resource.as_str(),
                b.verb.as_str(),
                &b.namespace,
            ))
        });
        out
    }

    /// Sets every counter to zero.
    pub fn reset(&self) {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// What to do to matching requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status (and a matching `Status` body; 429 and
    /// 503 carry `Retry-After: 1`).
    Status(u16),
    /// Wait this long before handling the request.
    Latency(Duration),
    /// Cut every open watch connection of the resource at once (the client
    /// sees the connection drop mid-stream). Not kept as a rule.
    DropWatch,
}

/// A fault rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// The resource plural (`pods`), optionally with `/subresource`.
    pub resource: String,
    /// Only requests with this verb, or all when `None`.
    pub verb: Option<Verb>,
    /// The fault.
    pub fault: Fault,
    /// Only this many times, or until cleared when `None`.
    pub times: Option<u32>,
}

impl Injection {
    /// A rule for every request on `resource`, until cleared.
    pub fn new(resource: &str, fault: Fault) -> Self {
        Injection {
            resource: resource.to_string(),
            verb: None,
            fault,
            times: None,
        }
    }

    /// Restricts the rule to one verb.
    pub fn verb(mut self, verb: Verb) -> Self {
        self.verb = Some(verb);
        self
    }

    /// Limits the rule to `n` requests.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
}

/// What the faults decided for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Delay before handling.
    pub latency: Duration,
    /// Fail with this status.
    pub status: Option<u16>,
}

/// The active fault rules.
#[derive(Debug)]
pub struct Faults {
    rules: Mutex<Vec<(u64, Injection)>>,
    next: AtomicU64,
    drops: broadcast::Sender<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            rules: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
            drops: broadcast::channel(64).0,
        }
    }
}

impl Faults {
    /// Adds a rule; returns its id (0 for [`Fault::DropWatch`], which acts
    /// at once and is not kept).
    pub fn inject(&self, rule: Injection) -> u64 {
        if rule.fault == Fault::DropWatch {
            let _ = self.drops.send(rule.resource);
            return 0;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, rule));
        id
    }

    /// Removes one rule.
    pub fn remove(&self, id: u64) {
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Receives the resources whose watches must drop now.
    pub fn drops(&self) -> broadcast::Receiver<String> {
        self.drops.subscribe()
    }

    /// Decides the fate of one request, consuming counted rules.
    pub fn decide(&self, verb: Verb, resource: &str) -> Decision {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let mut d = Decision::default();
        let base = resource.split('/').next().unwrap_or(resource);
        for (_, r) in rules.iter_mut() {
            let res_match =
                r.resource == resource || r.resource == base && !r.resource.contains('/');
            if !res_match || r.verb.is_some_and(|v| v != verb) || r.times == Some(0) {
                continue;
            }
            match &r.fault {
                Fault::Latency(l) => d.latency += *l,
                Fault::Status(code) => {
                    if d.status.is_some() {
                        continue;
                    }
                    d.status = Some(*code);
                }
                Fault::DropWatch => continue,
            }
            if let Some(t) = r.times.as_mut() {
                *t -= 1;
            }
        }
        rules.retain(|(_, r)| r.times != Some(0));
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_rules_expire() {
        let f = Faults::default();
        f.inject(
            Injection::new("pods", Fault::Status(429))
                .verb(Verb::List)
                .times(2),
        );
        assert_eq!(f.decide(Verb::Get, "pods").status, None);
        assert_eq!(f.decide(Verb::List, "pods").status, Some(429));
        assert_eq!(f.decide(Verb::List, "pods/status").status, Some(429));
        assert_eq!(f.decide(Verb::List, "pods").status, None);
    }

    #[test]
    fn metrics_count_by_namespace() {
        let m = Metrics::default();
        m.record(Verb::List, "pods", None);
        m.record(Verb::List, "pods", Some("a"));
        m.record(Verb::List, "pods", Some("a"));
        assert_eq!(m.count(Verb::List, "pods", None), 1);
        assert_eq!(m.count(Verb::List, "pods", Some("a")), 2);
        assert_eq!(m.total(Verb::List, "pods"), 3);
    }
}
