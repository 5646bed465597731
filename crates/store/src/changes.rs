//! Release changes pushed to whoever waits for them (the release worker,
//! the event streams), so that they act at once instead of at their next
//! poll.
//!
//! ```text
//!  SQLite:     commit ─► broadcast (this process; SQLite serves one server)
//!  PostgreSQL: commit ─► pg_notify in the same transaction ─► LISTEN task
//!              (started by the first subscriber) ─► broadcast, in every
//!              server on the database, this one included
//! ```
//!
//! Notifications can be lost (a full channel, a dropped PostgreSQL
//! connection): they only wake readers early, and readers still poll
//! slowly to cover those gaps.

use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;

/// The PostgreSQL channel release changes are notified on.
pub(crate) const CHANNEL: &str = "keelson_release_changes";

/// One change to a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseChange {
    /// The release.
    pub id: String,
    /// Its row's version after the change; None when only events were
    /// appended to its stream.
    pub version: Option<i64>,
}

impl ReleaseChange {
    /// The notification payload: `<version or -> <id>`.
    pub(crate) fn payload(id: &str, version: Option<i64>) -> String {
        match version {
            Some(v) => format!("{v} {id}"),
            None => format!("- {id}"),
        }
    }

    fn parse(payload: &str) -> Option<ReleaseChange> {
        let (version, id) = payload.split_once(' ')?;
        Some(ReleaseChange {
            id: id.to_string(),
            version: match version {
                "-" => None,
                v => Some(v.parse().ok()?),
            },
        })
    }
}

/// Returns at the next change `wanted` accepts, or when changes were missed
/// (the receiver lagged): either way the caller reads the store again. Never
/// returns once the store is gone.
pub async fn next_release_change(
    changes: &mut broadcast::Receiver<ReleaseChange>,
    wanted: impl Fn(&ReleaseChange) -> bool,
) {
    loop {
        match changes.recv().await {
            Ok(change) if wanted(&change) => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// The broadcast of one store (all its clones).
#[derive(Debug, Clone)]
pub(crate) struct Changes {
    sender: broadcast::Sender<ReleaseChange>,
    listening: Arc<OnceLock<()>>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            sender: broadcast::channel(1024).0,
            listening: Arc::default(),
        }
    }
}

impl Changes {
    pub(crate) fn send(&self, id: &str, version: Option<i64>) {
        // No receiver is fine: nobody waits.
        let _ = self.sender.send(ReleaseChange {
            id: id.to_string(),
            version,
        });
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ReleaseChange> {
        self.sender.subscribe()
    }

    /// Starts, once per store, the task that forwards PostgreSQL's
    /// notifications; it ends when the store's pool closes.
    pub(crate) fn listen_postgres(&self, pool: &sqlx::PgPool) {
        if self.listening.set(()).is_err() {
            return;
        }
        let pool = pool.clone();
        let sender = self.sender.downgrade();
        tokio::spawn(async move {
            // Until the store closes its pool or every store clone is gone.
            while !pool.is_closed() && sender.strong_count() > 0 {
                let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for release changes; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(CHANNEL).await {
                    tracing::warn!(error = %e, "cannot listen for release changes; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                // recv reconnects by itself after a lost connection; the
                // listener's connection goes back as soon as the pool
                // closes, so closing never waits for it.
                let closed = pool.close_event();
                tokio::pin!(closed);
                loop {
                    let notification = tokio::select! {
                        () = &mut closed => return,
                        n = listener.recv() => match n {
                            Ok(n) => n,
                            Err(_) => break,
                        },
                    };
                    let Some(sender) = sender.upgrade() else {
                        return; // the store is gone
                    };
                    if let Some(change) = ReleaseChange::parse(notification.payload()) {
                        let _ = sender.send(change);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_read_back() {
        for version in [Some(7), None] {
            let payload = ReleaseChange::payload("shop-prod-1 x", version);
            assert_eq!(
                ReleaseChange::parse(&payload),
                Some(ReleaseChange {
                    id: "shop-prod-1 x".into(),
                    version
                })
            );
        }
        assert_eq!(ReleaseChange::parse("seven x"), None);
    }
}
