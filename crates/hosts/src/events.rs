//! Every instance lifecycle event of every host, as one bounded channel:
//! what the release engine's runtime waits on (`online`, `app_exit`,
//! `offline`, `supervisor_exited`, …).
//!
//! ```text
//! discover (every 2 s): registry hosts ─► per host: one `POST /v1/events` stream
//!                                          (every instance's events, new ones included),
//!                                          resumed per instance from the last offsets after any break
//!                                              └─► HostEvent ─► bounded mpsc (back-pressure)
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keelson_agent_lifecycle::host::api::EventsRequest;
use keelson_core::release::InstanceChange;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::HostClient;
use crate::registry::{HostRecord, TargetRegistry, list_hosts};

/// One lifecycle event of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct HostEvent {
    /// The host.
    pub host: String,
    /// Its group.
    pub group: String,
    /// The instance on that host.
    pub instance: String,
    /// Offset in the instance's log just past this event.
    pub offset: u64,
    /// The generation of the start command of the supervisor that wrote
    /// it (see `StartRequest`), when known.
    pub generation: Option<u64>,
    /// The event: `{"ts", "component", "event", …}`.
    pub event: serde_json::Value,
}

impl HostEvent {
    /// The event's name (`online`, `app_exit`, …).
    pub fn name(&self) -> &str {
        self.event["event"].as_str().unwrap_or_default()
    }

    /// What this event means to a release, if anything: the instance went
    /// ONLINE, left traffic, failed, its app exited, or it was stopped.
    pub fn change(&self) -> Option<InstanceChange> {
        let text = |k: &str| self.event[k].as_str().unwrap_or_default().to_string();
        match self.name() {
            "online" => Some(InstanceChange::Online),
            "healthcheck_removed" => Some(InstanceChange::Offline),
            "pre_online_failed" => Some(InstanceChange::Failed {
                error: text("reason"),
            }),
            "supervisor_failed" => Some(InstanceChange::Failed {
                error: text("error"),
            }),
            "app_exit" => Some(InstanceChange::Exited {
                code: self.event["code"]
                    .as_i64()
                    .and_then(|c| i32::try_from(c).ok()),
            }),
            "supervisor_exited" => match self.event["state"].as_str() {
                Some("failed") => Some(InstanceChange::Failed {
                    error: "the instance failed; see its log".into(),
                }),
                _ => Some(InstanceChange::Gone),
            },
            _ => None,
        }
    }
}

/// Where followers of instances that exist when the stream starts begin.
/// Instances deployed later are always followed from their beginning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Their whole log.
    Beginning,
    /// Only what happens from now on.
    End,
}

/// The merged event stream of all hosts.
#[derive(Debug)]
pub struct HostEvents;

impl HostEvents {
    /// Starts following every host in `registry`; events arrive on the
    /// returned receiver (holding at most `capacity`) until `cancel`.
    pub fn spawn<R: TargetRegistry + 'static>(
        registry: Arc<R>,
        start: StartAt,
        capacity: usize,
        cancel: CancellationToken,
    ) -> mpsc::Receiver<HostEvent> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        // Ours to cancel when the receiver is dropped, without touching the caller's.
        let cancel = cancel.child_token();
        let span = tracing::info_span!("host_events");
        tokio::spawn(
            async move {
                let mut hosts: HashSet<String> = HashSet::new();
                loop {
                    match list_hosts(&*registry).await {
                        Ok(list) => {
                            for host in list {
                                if hosts.insert(host.name.clone()) {
                                    tokio::spawn(follow_host(
                                        host,
                                        start,
                                        tx.clone(),
                                        cancel.clone(),
                                    ));
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot list hosts"),
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
            .instrument(span),
        );
        rx
    }
}

async fn follow_host(
    host: HostRecord,
    start: StartAt,
    tx: mpsc::Sender<HostEvent>,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("host", host = %host.name);
    async move {
        // Per instance: where to resume, and the generation of its supervisor.
        let mut cursor: BTreeMap<String, u64> = BTreeMap::new();
        let mut generations: HashMap<String, Option<u64>> = HashMap::new();
        let mut seeded = start == StartAt::Beginning;
        loop {
            if let Ok(client) = HostClient::for_host(&host) {
                // Generations of running supervisors: a stream that starts at
                // the end misses their `supervisor_started`.
                if let Ok(views) = client.instances().await {
                    // Deleted instances need no resuming.
                    cursor.retain(|n, _| views.iter().any(|v| &v.name == n));
                    generations.retain(|n, _| views.iter().any(|v| &v.name == n));
                    for view in views {
                        if !seeded {
                            cursor.insert(view.name.clone(), view.log_offset);
                        }
                        generations.entry(view.name).or_insert(view.generation);
                    }
                    seeded = true;
                }
                if seeded {
                    let request = EventsRequest {
                        from: cursor.clone(),
                        start: Default::default(),
                        follow: true,
                    };
                    let opened = tokio::select! {
                        () = cancel.cancelled() => return,
                        s = client.events(&request) => s,
                    };
                    match opened {
                        Ok(mut stream) => loop {
                            let next = tokio::select! {
                                () = cancel.cancelled() => return,
                                n = stream.next() => n,
                            };
                            let Ok(Some(line)) = next else { break };
                            cursor.insert(line.instance.clone(), line.offset);
                            if line.event["event"] == "supervisor_started" {
                                generations.insert(
                                    line.instance.clone(),
                                    line.event["generation"].as_u64(),
                                );
                            }
                            let event = HostEvent {
                                host: host.name.clone(),
                                group: host.group.clone(),
                                generation: generations.get(&line.instance).copied().flatten(),
                                instance: line.instance,
                                offset: line.offset,
                                event: line.event,
                            };
                            if tx.send(event).await.is_err() {
                                // Nobody listens any more.
                                cancel.cancel();
                                return;
                            }
                        },
                        Err(e) => tracing::debug!(error = %e, "cannot open the event stream"),
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
    .instrument(span)
    .await;
}
