//! The audit log: one event per mutation, written in the mutation's own
//! transaction, so the log and the data cannot disagree.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rows::{Columns, json};
use crate::{Result, Store, Timestamp, on_pool};

/// An event about to be written.
pub(crate) struct NewAuditEvent<'a> {
    pub at: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub resource_kind: &'a str,
    pub resource: &'a str,
    pub revision: Option<i64>,
    pub digest_before: Option<&'a str>,
    pub digest_after: Option<&'a str>,
    pub detail: serde_json::Value,
}

/// Writes a [`NewAuditEvent`] on a transaction of either backend.
macro_rules! insert_audit {
    ($conn:expr, $event:expr) => {{
        let event: &$crate::audit::NewAuditEvent<'_> = $event;
        sqlx::query(
            "INSERT INTO audit_events (at, actor, action, resource_kind, resource, revision, digest_before, \
             digest_after, detail_json) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(event.at)
        .bind(event.actor)
        .bind(event.action)
        .bind(event.resource_kind)
        .bind(event.resource)
        .bind(event.revision)
        .bind(event.digest_before)
        .bind(event.digest_after)
        .bind(event.detail.to_string())
        .execute($conn)
        .await?;
    }};
}
pub(crate) use insert_audit;

/// One recorded mutation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Increasing identifier.
    pub id: i64,
    /// When.
    pub at: Timestamp,
    /// Who (a token's subject).
    pub actor: String,
    /// What: `app.create`, `app.update`, `app.rollback`, `app.delete`,
    /// `app.restore`, `environment.put`, `target.put`, `token.create`, `token.revoke`.
    pub action: String,
    /// The kind of thing changed: `app`, `environment`, `target`, `token`.
    pub resource_kind: String,
    /// Its name.
    pub resource: String,
    /// The revision made (or deleted), for apps.
    pub revision: Option<i64>,
    /// Digest of the state before.
    pub digest_before: Option<String>,
    /// Digest of the state after.
    pub digest_after: Option<String>,
    /// Action-specific facts (message, team before/after, role, …).
    pub detail: serde_json::Value,
}

/// Which events to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this kind of resource.
    pub resource_kind: Option<String>,
    /// Only this resource (by name).
    pub resource: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only events older than this id (the previous page's `next_cursor`).
    pub before: Option<i64>,
    /// Page size, 1..=1000.
    pub limit: u32,
}

/// A page of audit events, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// The events.
    pub items: Vec<AuditEvent>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}

fn event_from_row(row: &impl Columns) -> Result<AuditEvent> {
    Ok(AuditEvent {
        id: row.int("id")?,
        at: Timestamp(row.int("at")?),
        actor: row.text("actor")?,
        action: row.text("action")?,
        resource_kind: row.text("resource_kind")?,
        resource: row.text("resource")?,
        revision: row.opt_int("revision")?,
        digest_before: row.opt_text("digest_before")?,
        digest_after: row.opt_text("digest_after")?,
        detail: json(row, "detail_json")?,
    })
}

impl Store {
    /// Audit events, newest first.
    pub async fn list_audit(&self, filter: &AuditFilter) -> Result<AuditPage> {
        let limit = i64::from(filter.limit.clamp(1, 1000));
        let mut sql = String::from(
            "SELECT id, at, actor, action, resource_kind, resource, revision, digest_before, digest_after, \
             detail_json FROM audit_events WHERE 1 = 1",
        );
        let mut texts: Vec<&str> = Vec::new();
        for (column, value) in [
            ("resource_kind", &filter.resource_kind),
            ("resource", &filter.resource),
            ("actor", &filter.actor),
        ] {
            if let Some(value) = value {
                texts.push(value);
                sql += &format!(" AND {column} = ${}", texts.len());
            }
        }
        let mut n = texts.len();
        if filter.before.is_some() {
            n += 1;
            sql += &format!(" AND id < ${n}");
        }
        sql += &format!(" ORDER BY id DESC LIMIT ${}", n + 1);
        let mut items = on_pool!(self, |pool, _d| {
            let mut query = sqlx::query(&sql);
            for value in &texts {
                query = query.bind(*value);
            }
            if let Some(before) = filter.before {
                query = query.bind(before);
            }
            let rows = query.bind(limit + 1).fetch_all(pool).await?;
            rows.iter()
                .map(event_from_row)
                .collect::<Result<Vec<_>>>()?
        });
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|e| e.id)
        } else {
            None
        };
        Ok(AuditPage { items, next_cursor })
    }
}
