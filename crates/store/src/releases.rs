//! Releases as durable state machines: the machine's state (one JSON
//! document the store does not interpret), its step journal and the events
//! that moved it, always written together in one transaction.
//!
//! ```text
//!   worker ──claim (lease)──► releases row ◄── version check ── user request
//!      │                        │ same transaction
//!      └─commit step──► state_json + release_journal (planned │ done │ failed)
//!                               + release_events (SSE, resumable by id)
//! ```
//!
//! Writes are optimistic: a commit names the version it read and, for a
//! worker, the lease it holds; a commit against a newer version or a lost
//! lease writes nothing and says so ([`CommitOutcome::Stale`]). A lease is
//! claimable when free, expired, or already held by the same owner (a
//! restarted worker keeps its owner name and resumes at once).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::audit::{NewAuditEvent, insert_audit};
use crate::changes::ReleaseChange;
use crate::rows::{Columns, json};
use crate::{Dialect, Error, Result, Store, Timestamp, on_pool};

/// A release about to be created.
#[derive(Debug, Clone)]
pub struct NewRelease<'a> {
    /// Its id.
    pub id: &'a str,
    /// The app.
    pub app: &'a str,
    /// The environment.
    pub env: &'a str,
    /// The machine's state.
    pub state: &'a serde_json::Value,
    /// The state's one-word label (`pending`, `running`, …).
    pub status: &'a str,
    /// Who asked for it.
    pub actor: &'a str,
    /// Facts for the audit log.
    pub detail: serde_json::Value,
}

/// A stored release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRecord {
    /// Its id.
    pub id: String,
    /// The app.
    pub app: String,
    /// The environment.
    pub env: String,
    /// The machine's state as stored.
    pub state: serde_json::Value,
    /// The state's one-word label.
    pub status: String,
    /// Whether it has ended (no worker claims it any more).
    pub finished: bool,
    /// Counts up with every write.
    pub version: i64,
    /// The worker holding it.
    pub lease_owner: Option<String>,
    /// Until when.
    pub lease_expires: Option<Timestamp>,
    /// When it was created.
    pub created_at: Timestamp,
    /// By whom.
    pub created_by: String,
    /// The last write.
    pub updated_at: Timestamp,
}

/// Where a journaled step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JournalStatus {
    /// Issued, not yet confirmed as applied.
    Planned,
    /// Applied.
    Done,
    /// Given up on.
    Failed,
}

impl JournalStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "planned" => Ok(Self::Planned),
            "done" => Ok(Self::Done),
            "failed" => Ok(Self::Failed),
            other => Err(Error::Corrupt(format!("journal status {other:?}"))),
        }
    }
}

/// One step of a release's journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JournalEntry {
    /// The step's stable id.
    pub step: String,
    /// The action as issued.
    pub action: serde_json::Value,
    /// Where it stands.
    pub status: JournalStatus,
    /// When it was issued.
    pub planned_at: Timestamp,
    /// When it was confirmed (or given up on).
    pub done_at: Option<Timestamp>,
    /// Why it failed.
    pub error: Option<String>,
}

/// One event of a release, numbered for resumable streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseEvent {
    /// Increasing over all releases.
    pub id: i64,
    /// When.
    pub at: Timestamp,
    /// What happened.
    pub body: serde_json::Value,
}

/// One state change of a release and everything written with it.
#[derive(Debug, Clone)]
pub struct ReleaseCommit<'a> {
    /// The release.
    pub id: &'a str,
    /// The version the change was computed from.
    pub expected_version: i64,
    /// A worker's lease that must still be held (None for user requests,
    /// which only rely on the version).
    pub lease_owner: Option<&'a str>,
    /// The new state.
    pub state: &'a serde_json::Value,
    /// Its label.
    pub status: &'a str,
    /// Whether the release has ended.
    pub finished: bool,
    /// Steps issued: (step id, action).
    pub planned: Vec<(String, serde_json::Value)>,
    /// Steps confirmed as applied.
    pub done: Vec<String>,
    /// Steps given up on, with why.
    pub failed: Vec<(String, String)>,
    /// The event to append, if any.
    pub event: Option<serde_json::Value>,
    /// An audit record (actor, action, detail) for a user's request.
    pub audit: Option<(&'a str, &'a str, serde_json::Value)>,
}

/// What a [`Store::commit_release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Written; the release now has this version.
    Written(i64),
    /// Nothing written: the release moved on or the lease was lost.
    Stale,
}

const COLUMNS: &str = "id, app, env, state_json, status, finished, version, lease_owner, lease_expires, \
                       created_at, created_by, updated_at";

fn release_from_row(row: &impl Columns) -> Result<ReleaseRecord> {
    Ok(ReleaseRecord {
        id: row.text("id")?,
        app: row.text("app")?,
        env: row.text("env")?,
        state: json(row, "state_json")?,
        status: row.text("status")?,
        finished: row.int("finished")? != 0,
        version: row.int("version")?,
        lease_owner: row.opt_text("lease_owner")?,
        lease_expires: row.opt_int("lease_expires")?.map(Timestamp),
        created_at: Timestamp(row.int("created_at")?),
        created_by: row.text("created_by")?,
        updated_at: Timestamp(row.int("updated_at")?),
    })
}

fn journal_from_row(row: &impl Columns) -> Result<JournalEntry> {
    Ok(JournalEntry {
        step: row.text("step")?,
        action: json(row, "action_json")?,
        status: JournalStatus::parse(&row.text("status")?)?,
        planned_at: Timestamp(row.int("planned_at")?),
        done_at: row.opt_int("done_at")?.map(Timestamp),
        error: row.opt_text("error")?,
    })
}

/// On PostgreSQL, notifies every server's listener of a release change when
/// the transaction commits (and not if it rolls back).
async fn notify<'c, DB>(
    tx: &mut sqlx::Transaction<'c, DB>,
    dialect: Dialect,
    id: &str,
    version: Option<i64>,
) -> Result<()>
where
    DB: sqlx::Database,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'e> &'e mut <DB as sqlx::Database>::Connection: sqlx::Executor<'e, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if dialect == Dialect::Postgres {
        sqlx::query::<DB>("SELECT pg_notify($1, $2)")
            .bind(crate::changes::CHANNEL)
            .bind(ReleaseChange::payload(id, version))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl Store {
    /// Tells this process's subscribers of a committed release change (on
    /// SQLite; PostgreSQL's notification reaches them through the listener).
    fn changed(&self, id: &str, version: Option<i64>) {
        if self.backend() == crate::Backend::Sqlite {
            self.changes.send(id, version);
        }
    }

    /// Creates a release (unclaimed, version 1); audited as `release.create`.
    pub async fn create_release(&self, release: &NewRelease<'_>) -> Result<ReleaseRecord> {
        match self.insert_release(release).await {
            Err(e) if e.is_unique_violation() => Err(Error::Conflict(format!(
                "release {:?} already exists, or another release of {} in {} has not finished",
                release.id, release.app, release.env
            ))),
            other => other,
        }
    }

    async fn insert_release(&self, release: &NewRelease<'_>) -> Result<ReleaseRecord> {
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let now = Timestamp::now().0;
            sqlx::query(
                "INSERT INTO releases (id, app, env, state_json, status, finished, version, created_at, \
                 created_by, updated_at) VALUES ($1, $2, $3, $4, $5, 0, 1, $6, $7, $6)",
            )
            .bind(release.id)
            .bind(release.app)
            .bind(release.env)
            .bind(release.state.to_string())
            .bind(release.status)
            .bind(now)
            .bind(release.actor)
            .execute(&mut *tx)
            .await?;
            let body = serde_json::json!({"kind": "created", "status": release.status});
            sqlx::query(
                "INSERT INTO release_events (release_id, at, body_json) VALUES ($1, $2, $3)",
            )
            .bind(release.id)
            .bind(now)
            .bind(body.to_string())
            .execute(&mut *tx)
            .await?;
            insert_audit!(
                &mut *tx,
                &NewAuditEvent {
                    at: now,
                    actor: release.actor,
                    action: "release.create",
                    resource_kind: "release",
                    resource: release.id,
                    revision: None,
                    digest_before: None,
                    digest_after: None,
                    detail: release.detail.clone(),
                }
            );
            let row = sqlx::query(&format!("SELECT {COLUMNS} FROM releases WHERE id = $1"))
                .bind(release.id)
                .fetch_one(&mut *tx)
                .await?;
            let record = release_from_row(&row)?;
            notify(&mut tx, dialect, release.id, Some(record.version)).await?;
            tx.commit().await?;
            self.changed(release.id, Some(record.version));
            Ok(record)
        })
    }

    /// The release with this id.
    pub async fn release(&self, id: &str) -> Result<ReleaseRecord> {
        let row = on_pool!(self, |pool, _d| {
            let row = sqlx::query(&format!("SELECT {COLUMNS} FROM releases WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            row.map(|r| release_from_row(&r)).transpose()?
        });
        row.ok_or_else(|| Error::NotFound {
            kind: "release",
            name: id.to_string(),
        })
    }

    /// The releases of an app (in one environment, if given), newest first.
    pub async fn releases_of(
        &self,
        app: &str,
        env: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ReleaseRecord>> {
        on_pool!(self, |pool, _d| {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM releases WHERE app = $1 AND ($2 IS NULL OR env = $2) \
                 ORDER BY created_at DESC, id DESC LIMIT $3"
            ))
            .bind(app)
            .bind(env)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            rows.iter().map(release_from_row).collect()
        })
    }

    /// Claims up to `limit` unfinished releases whose lease is free, expired
    /// or already `owner`'s, for `lease_ms` from now. On PostgreSQL,
    /// releases another server is claiming at the same moment are skipped.
    pub async fn claim_releases(
        &self,
        owner: &str,
        lease_ms: u64,
        limit: u32,
    ) -> Result<Vec<ReleaseRecord>> {
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let now = Timestamp::now().0;
            let skip = match dialect {
                crate::Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
                crate::Dialect::Sqlite => "",
            };
            let ids: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM releases WHERE finished = 0 AND (lease_owner IS NULL OR \
                 lease_expires < $1 OR lease_owner = $2) ORDER BY created_at, id LIMIT $3{skip}"
            ))
            .bind(now)
            .bind(owner)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            let mut claimed = Vec::with_capacity(ids.len());
            for id in ids {
                let row = sqlx::query(&format!(
                    "UPDATE releases SET lease_owner = $2, lease_expires = $3 WHERE id = $1 \
                     RETURNING {COLUMNS}"
                ))
                .bind(&id)
                .bind(owner)
                .bind(now.saturating_add(lease_ms as i64))
                .fetch_one(&mut *tx)
                .await?;
                claimed.push(release_from_row(&row)?);
            }
            tx.commit().await?;
            Ok(claimed)
        })
    }

    /// Extends `owner`'s lease on a release; false when it is no longer
    /// held (expired and claimed by another, or the release finished).
    pub async fn renew_release_lease(&self, id: &str, owner: &str, lease_ms: u64) -> Result<bool> {
        let _turn = self.writer_turn().await;
        let now = Timestamp::now().0;
        let changed = on_pool!(self, |pool, _d| {
            sqlx::query(
                "UPDATE releases SET lease_expires = $3 WHERE id = $1 AND lease_owner = $2 AND finished = 0",
            )
            .bind(id)
            .bind(owner)
            .bind(now.saturating_add(lease_ms as i64))
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(changed == 1)
    }

    /// Gives up `owner`'s lease (a worker shutting down cleanly).
    pub async fn drop_release_lease(&self, id: &str, owner: &str) -> Result<()> {
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, _d| {
            sqlx::query(
                "UPDATE releases SET lease_owner = NULL, lease_expires = NULL WHERE id = $1 AND lease_owner = $2",
            )
            .bind(id)
            .bind(owner)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Writes one state change with its journal entries, event and audit
    /// record in one transaction, if the release is still at
    /// `expected_version` (and the lease, if named, still held).
    pub async fn commit_release(&self, commit: &ReleaseCommit<'_>) -> Result<CommitOutcome> {
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let now = Timestamp::now().0;
            let new_version = commit.expected_version + 1;
            let updated = sqlx::query(
                "UPDATE releases SET state_json = $3, status = $4, finished = $5, version = $6, updated_at = $7, \
                 lease_owner = CASE WHEN $5 = 1 THEN NULL ELSE lease_owner END, \
                 lease_expires = CASE WHEN $5 = 1 THEN NULL ELSE lease_expires END \
                 WHERE id = $1 AND version = $2 AND ($8 IS NULL OR lease_owner = $8)",
            )
            .bind(commit.id)
            .bind(commit.expected_version)
            .bind(commit.state.to_string())
            .bind(commit.status)
            .bind(i64::from(commit.finished))
            .bind(new_version)
            .bind(now)
            .bind(commit.lease_owner)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                tx.rollback().await?;
                return Ok(CommitOutcome::Stale);
            }
            for (step, action) in &commit.planned {
                sqlx::query(
                    "INSERT INTO release_journal (release_id, step, action_json, status, planned_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (release_id, step) DO NOTHING",
                )
                .bind(commit.id)
                .bind(step)
                .bind(action.to_string())
                .bind(JournalStatus::Planned.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            for step in &commit.done {
                sqlx::query(
                    "UPDATE release_journal SET status = $3, done_at = $4 WHERE release_id = $1 AND step = $2",
                )
                .bind(commit.id)
                .bind(step)
                .bind(JournalStatus::Done.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            for (step, error) in &commit.failed {
                sqlx::query(
                    "UPDATE release_journal SET status = $3, done_at = $4, error = $5 \
                     WHERE release_id = $1 AND step = $2",
                )
                .bind(commit.id)
                .bind(step)
                .bind(JournalStatus::Failed.as_str())
                .bind(now)
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(body) = &commit.event {
                sqlx::query(
                    "INSERT INTO release_events (release_id, at, body_json) VALUES ($1, $2, $3)",
                )
                .bind(commit.id)
                .bind(now)
                .bind(body.to_string())
                .execute(&mut *tx)
                .await?;
            }
            if let Some((actor, action, detail)) = &commit.audit {
                insert_audit!(
                    &mut *tx,
                    &NewAuditEvent {
                        at: now,
                        actor,
                        action,
                        resource_kind: "release",
                        resource: commit.id,
                        revision: None,
                        digest_before: None,
                        digest_after: None,
                        detail: detail.clone(),
                    }
                );
            }
            notify(&mut tx, dialect, commit.id, Some(new_version)).await?;
            tx.commit().await?;
            self.changed(commit.id, Some(new_version));
            Ok(CommitOutcome::Written(new_version))
        })
    }

    /// Appends events to a release's stream without changing its state
    /// (what happened around the release, such as its hooks' output), in
    /// one transaction. Nothing is written for a release that does not
    /// exist.
    pub async fn append_release_events(
        &self,
        id: &str,
        bodies: &[serde_json::Value],
    ) -> Result<()> {
        if bodies.is_empty() {
            return Ok(());
        }
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let now = Timestamp::now().0;
            for body in bodies {
                sqlx::query(
                    "INSERT INTO release_events (release_id, at, body_json) \
                     SELECT id, $2, $3 FROM releases WHERE id = $1",
                )
                .bind(id)
                .bind(now)
                .bind(body.to_string())
                .execute(&mut *tx)
                .await?;
            }
            notify(&mut tx, dialect, id, None).await?;
            tx.commit().await?;
            self.changed(id, None);
            Ok(())
        })
    }

    /// A release's journal, in the order the steps were issued.
    pub async fn release_journal(&self, id: &str) -> Result<Vec<JournalEntry>> {
        on_pool!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT step, action_json, status, planned_at, done_at, error FROM release_journal \
                 WHERE release_id = $1 ORDER BY planned_at, step",
            )
            .bind(id)
            .fetch_all(pool)
            .await?;
            rows.iter().map(journal_from_row).collect()
        })
    }

    /// A release's events after event `after` (0 for all), oldest first.
    pub async fn release_events(
        &self,
        id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ReleaseEvent>> {
        on_pool!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT id, at, body_json FROM release_events WHERE release_id = $1 AND id > $2 \
                 ORDER BY id LIMIT $3",
            )
            .bind(id)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(ReleaseEvent {
                        id: row.int("id")?,
                        at: Timestamp(row.int("at")?),
                        body: json(row, "body_json")?,
                    })
                })
                .collect()
        })
    }
}
