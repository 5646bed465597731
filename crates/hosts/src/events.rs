//! Every instance lifecycle event of every host, as one bounded channel:
//! what the release engine's runtime waits on (`online`, `app_exit`,
//! `offline`, `supervisor_exited`, …).
//!
//! ```text
//! discover (every 2 s): registry hosts ─► per host: list instances (every 1 s)
//!                                          └─► per instance: follow its log, events only,
//!                                              resuming from the last offset after any break
//!                                                  └─► HostEvent ─► bounded mpsc (back-pressure)
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_core::release::InstanceChange;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Error;
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

type Followed = Arc<Mutex<HashSet<(String, String)>>>;

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
                let followed: Followed = Arc::default();
                loop {
                    match list_hosts(&*registry).await {
                        Ok(list) => {
                            for host in list {
                                if hosts.insert(host.name.clone()) {
                                    tokio::spawn(follow_host(
                                        host,
                                        start,
                                        tx.clone(),
                                        followed.clone(),
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
    followed: Followed,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("host", host = %host.name);
    async move {
        let mut first_listing = true;
        loop {
            match HostClient::for_host(&host) {
                Ok(client) => match client.instances().await {
                    Ok(instances) => {
                        for view in instances {
                            let key = (host.name.clone(), view.name.clone());
                            let new = followed
                                .lock()
                                .map(|mut f| f.insert(key.clone()))
                                .unwrap_or(false);
                            if !new {
                                continue;
                            }
                            let offset = if first_listing && start == StartAt::End {
                                view.log_offset
                            } else {
                                0
                            };
                            let position = Position {
                                instance: view.name,
                                offset,
                                generation: view.generation,
                            };
                            tokio::spawn(follow_instance(
                                client.clone(),
                                host.group.clone(),
                                position,
                                tx.clone(),
                                followed.clone(),
                                cancel.clone(),
                            ));
                        }
                        first_listing = false;
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot list instances"),
                },
                Err(e) => tracing::debug!(error = %e, "no client"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    .instrument(span)
    .await;
}

/// Where a follower is in one instance's log.
struct Position {
    instance: String,
    offset: u64,
    generation: Option<u64>,
}

async fn follow_instance(
    client: HostClient,
    group: String,
    position: Position,
    tx: mpsc::Sender<HostEvent>,
    followed: Followed,
    cancel: CancellationToken,
) {
    let Position {
        instance,
        mut offset,
        mut generation,
    } = position;
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            s = client.logs(&instance, offset, true, true) => s,
        };
        match stream {
            Ok(mut stream) => loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => break,
                    n = stream.next() => n,
                };
                match next {
                    Ok(Some(line)) => {
                        offset = line.offset;
                        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line.line)
                        else {
                            continue;
                        };
                        if event["event"] == "supervisor_started" {
                            generation = event["generation"].as_u64();
                        }
                        let event = HostEvent {
                            generation,
                            host: client.name().to_string(),
                            group: group.clone(),
                            instance: instance.clone(),
                            offset,
                            event,
                        };
                        if tx.send(event).await.is_err() {
                            // Nobody listens any more.
                            cancel.cancel();
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            },
            // Deleted: stop following (a new deploy is found again).
            Err(Error::Api { status: 404, .. }) => break,
            // Deleted and deployed again: a new log.
            Err(Error::Api {
                status: 400,
                field: Some(f),
                ..
            }) if f == "offset" => offset = 0,
            Err(_) => {}
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    if let Ok(mut f) = followed.lock() {
        f.remove(&(client.name().to_string(), instance));
    }
}
