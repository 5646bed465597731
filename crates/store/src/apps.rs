//! Apps and their profile revisions.
//!
//! ```text
//!   apply(profile) ─► lock the app row ─► authorize(stored head) ─► same digest? ─► done, no revision
//!                                                               └► revision N+1 + app row + owners/labels + audit event, one transaction
//! ```
//!
//! The store never interprets a profile: the caller hands it the facts it
//! indexes (team, owners, labels), the posted text and the canonical JSON,
//! whose SHA-256 is the revision's digest.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{NewAuditEvent, insert_audit};
use crate::rows::{Columns, json};
use crate::{Error, Result, Store, Timestamp, on_pool};

/// `sha256:<hex>` of the canonical JSON of a profile.
pub fn digest_of(canonical_json: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical_json.as_bytes()))
    )
}

/// A profile to store as the app's next revision.
#[derive(Debug, Clone)]
pub struct ApplyProfile {
    /// `metadata.name`.
    pub name: String,
    /// `spec.team`.
    pub team: String,
    /// `spec.owners`.
    pub owners: Vec<String>,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.description`.
    pub description: Option<String>,
    /// The text as posted (YAML or JSON), kept verbatim.
    pub text: String,
    /// The canonical JSON of the parsed profile; its digest decides whether
    /// anything changed.
    pub canonical_json: String,
    /// Who applies it (a token's subject).
    pub author: String,
    /// Why, in the author's words.
    pub message: Option<String>,
    /// Set when this revision restores an earlier one.
    pub rolled_back_to: Option<i64>,
}

/// What authorization needs to know of the stored app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppHead {
    /// The app's name.
    pub name: String,
    /// Its team in the current revision.
    pub team: String,
    /// Its owners in the current revision.
    pub owners: Vec<String>,
    /// The current revision number.
    pub current_revision: i64,
    /// The current revision's digest.
    pub digest: String,
    /// Whether the app is (soft) deleted.
    pub deleted: bool,
}

/// One app as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppSummary {
    /// The app's name.
    pub name: String,
    /// Its team.
    pub team: String,
    /// Its owners.
    pub owners: Vec<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its description.
    pub description: Option<String>,
    /// The current revision number.
    pub revision: i64,
    /// The current revision's digest.
    pub digest: String,
    /// When the app was first created.
    pub created_at: Timestamp,
    /// Who created it.
    pub created_by: String,
    /// When its current revision was made.
    pub updated_at: Timestamp,
    /// Who made it.
    pub updated_by: String,
}

/// One revision without its profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSummary {
    /// The revision number, from 1.
    pub number: i64,
    /// `sha256:` digest of the canonical profile.
    pub digest: String,
    /// Who made it.
    pub author: String,
    /// Why.
    pub message: Option<String>,
    /// The revision this one restored, for rollbacks.
    pub rolled_back_to: Option<i64>,
    /// When.
    pub created_at: Timestamp,
}

/// One revision with its profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// The app's name.
    pub app: String,
    /// Number, digest, author, message, time.
    #[serde(flatten)]
    pub summary: RevisionSummary,
    /// The profile text as it was posted.
    pub profile_text: String,
    /// The canonical profile.
    pub profile: serde_json::Value,
}

/// An app with its current revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppRecord {
    /// The app.
    pub app: AppSummary,
    /// Its current revision.
    pub revision: Revision,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApplyOutcome {
    /// The app after the apply.
    pub app: AppSummary,
    /// The app did not exist (or was deleted) before.
    pub created: bool,
    /// A new revision was made (false: the profile equals the current one).
    pub changed: bool,
}

/// Which apps to list.
#[derive(Debug, Clone, Default)]
pub struct AppFilter {
    /// Only apps of this team.
    pub team: Option<String>,
    /// Only apps this subject owns.
    pub owner: Option<String>,
    /// Only apps carrying all these labels.
    pub labels: Vec<(String, String)>,
    /// Start after this name (the previous page's `next_cursor`).
    pub after: Option<String>,
    /// Page size, 1..=1000.
    pub limit: u32,
}

/// A page of apps, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppPage {
    /// The apps of this page.
    pub items: Vec<AppSummary>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

const HEAD_COLS: &str = "name, team, owners_json, current_revision, digest, deleted_at";
const SUMMARY_COLS: &str = "name, team, owners_json, labels_json, description, current_revision, digest, \
     created_at, created_by, updated_at, updated_by";
const REVISION_COLS: &str =
    "app, number, digest, author, message, rolled_back_to, created_at, profile_text, profile_json";

fn head_from_row(row: &impl Columns) -> Result<AppHead> {
    Ok(AppHead {
        name: row.text("name")?,
        team: row.text("team")?,
        owners: json(row, "owners_json")?,
        current_revision: row.int("current_revision")?,
        digest: row.text("digest")?,
        deleted: row.opt_int("deleted_at")?.is_some(),
    })
}

fn summary_from_row(row: &impl Columns) -> Result<AppSummary> {
    Ok(AppSummary {
        name: row.text("name")?,
        team: row.text("team")?,
        owners: json(row, "owners_json")?,
        labels: json(row, "labels_json")?,
        description: row.opt_text("description")?,
        revision: row.int("current_revision")?,
        digest: row.text("digest")?,
        created_at: Timestamp(row.int("created_at")?),
        created_by: row.text("created_by")?,
        updated_at: Timestamp(row.int("updated_at")?),
        updated_by: row.text("updated_by")?,
    })
}

fn revision_summary_from_row(row: &impl Columns) -> Result<RevisionSummary> {
    Ok(RevisionSummary {
        number: row.int("number")?,
        digest: row.text("digest")?,
        author: row.text("author")?,
        message: row.opt_text("message")?,
        rolled_back_to: row.opt_int("rolled_back_to")?,
        created_at: Timestamp(row.int("created_at")?),
    })
}

fn revision_from_row(row: &impl Columns) -> Result<Revision> {
    Ok(Revision {
        app: row.text("app")?,
        summary: revision_summary_from_row(row)?,
        profile_text: row.text("profile_text")?,
        profile: json(row, "profile_json")?,
    })
}

fn to_json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Invalid(e.to_string()))
}

/// Decides, from the stored head (None for a new app), whether the caller
/// may make the change; the `Err` text is shown to the caller.
pub type Authorize<'a> = &'a (dyn Fn(Option<&AppHead>) -> std::result::Result<(), String> + Sync);

impl Store {
    /// Stores `profile` as the app's next revision, unless it equals the
    /// current one. `authorize` sees the stored head inside the transaction,
    /// so the decision and the write cannot be separated by another writer.
    pub async fn apply_profile(
        &self,
        profile: &ApplyProfile,
        authorize: Authorize<'_>,
    ) -> Result<ApplyOutcome> {
        let digest = digest_of(&profile.canonical_json);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_apply(profile, &digest, authorize).await {
                // Two first applies of one new app raced on PostgreSQL: the
                // loser retries and now sees the winner's row.
                Err(e) if e.is_unique_violation() && attempt < 3 => continue,
                other => return other,
            }
        }
    }

    async fn try_apply(
        &self,
        p: &ApplyProfile,
        digest: &str,
        authorize: Authorize<'_>,
    ) -> Result<ApplyOutcome> {
        let owners_json = to_json(&p.owners)?;
        let labels_json = to_json(&p.labels)?;
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let sql = format!(
                "SELECT {HEAD_COLS} FROM apps WHERE name = $1{}",
                dialect.for_update()
            );
            let head = match sqlx::query(&sql)
                .bind(&p.name)
                .fetch_optional(&mut *tx)
                .await?
            {
                Some(row) => Some(head_from_row(&row)?),
                None => None,
            };
            authorize(head.as_ref()).map_err(Error::Denied)?;
            if let Some(h) = head.as_ref().filter(|h| !h.deleted && h.digest == digest) {
                let row = sqlx::query(&format!("SELECT {SUMMARY_COLS} FROM apps WHERE name = $1"))
                    .bind(&h.name)
                    .fetch_one(&mut *tx)
                    .await?;
                let app = summary_from_row(&row)?;
                tx.rollback().await?;
                return Ok(ApplyOutcome {
                    app,
                    created: false,
                    changed: false,
                });
            }
            let now = Timestamp::now().0;
            let number = head.as_ref().map_or(1, |h| h.current_revision + 1);
            let created = head.as_ref().is_none_or(|h| h.deleted);
            if head.is_none() {
                sqlx::query(
                    "INSERT INTO apps (name, team, owners_json, labels_json, description, current_revision, digest, \
                     created_at, created_by, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, $9)",
                )
                .bind(&p.name)
                .bind(&p.team)
                .bind(&owners_json)
                .bind(&labels_json)
                .bind(&p.description)
                .bind(number)
                .bind(digest)
                .bind(now)
                .bind(&p.author)
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query(
                    "UPDATE apps SET team = $2, owners_json = $3, labels_json = $4, description = $5, \
                     current_revision = $6, digest = $7, updated_at = $8, updated_by = $9, deleted_at = NULL, \
                     deleted_by = NULL WHERE name = $1",
                )
                .bind(&p.name)
                .bind(&p.team)
                .bind(&owners_json)
                .bind(&labels_json)
                .bind(&p.description)
                .bind(number)
                .bind(digest)
                .bind(now)
                .bind(&p.author)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO revisions (app, number, digest, profile_text, profile_json, author, message, \
                 rolled_back_to, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&p.name)
            .bind(number)
            .bind(digest)
            .bind(&p.text)
            .bind(&p.canonical_json)
            .bind(&p.author)
            .bind(&p.message)
            .bind(p.rolled_back_to)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM app_owners WHERE app = $1")
                .bind(&p.name)
                .execute(&mut *tx)
                .await?;
            let mut owners = p.owners.clone();
            owners.sort();
            owners.dedup();
            for owner in &owners {
                sqlx::query("INSERT INTO app_owners (app, owner) VALUES ($1, $2)")
                    .bind(&p.name)
                    .bind(owner)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM app_labels WHERE app = $1")
                .bind(&p.name)
                .execute(&mut *tx)
                .await?;
            for (key, value) in &p.labels {
                sqlx::query("INSERT INTO app_labels (app, key, value) VALUES ($1, $2, $3)")
                    .bind(&p.name)
                    .bind(key)
                    .bind(value)
                    .execute(&mut *tx)
                    .await?;
            }
            let action = match (&head, p.rolled_back_to) {
                (_, Some(_)) => "app.rollback",
                (None, None) => "app.create",
                (Some(h), None) if h.deleted => "app.restore",
                (Some(_), None) => "app.update",
            };
            let event = NewAuditEvent {
                at: now,
                actor: &p.author,
                action,
                resource_kind: "app",
                resource: &p.name,
                revision: Some(number),
                digest_before: head
                    .as_ref()
                    .filter(|h| !h.deleted)
                    .map(|h| h.digest.as_str()),
                digest_after: Some(digest),
                detail: serde_json::json!({
                    "message": p.message,
                    "team": p.team,
                    "teamBefore": head.as_ref().map(|h| &h.team),
                    "rolledBackTo": p.rolled_back_to,
                }),
            };
            insert_audit!(&mut *tx, &event);
            let row = sqlx::query(&format!("SELECT {SUMMARY_COLS} FROM apps WHERE name = $1"))
                .bind(&p.name)
                .fetch_one(&mut *tx)
                .await?;
            let app = summary_from_row(&row)?;
            tx.commit().await?;
            Ok(ApplyOutcome {
                app,
                created,
                changed: true,
            })
        })
    }

    /// The stored head of an app, deleted or not; None if it never existed.
    pub async fn app_head(&self, name: &str) -> Result<Option<AppHead>> {
        on_pool!(self, |pool, _d| {
            match sqlx::query(&format!("SELECT {HEAD_COLS} FROM apps WHERE name = $1"))
                .bind(name)
                .fetch_optional(pool)
                .await?
            {
                Some(row) => Ok(Some(head_from_row(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// An app with its current revision; None if missing or deleted.
    pub async fn get_app(&self, name: &str) -> Result<Option<AppRecord>> {
        let summary = on_pool!(self, |pool, _d| {
            match sqlx::query(&format!(
                "SELECT {SUMMARY_COLS} FROM apps WHERE name = $1 AND deleted_at IS NULL"
            ))
            .bind(name)
            .fetch_optional(pool)
            .await?
            {
                Some(row) => summary_from_row(&row)?,
                None => return Ok(None),
            }
        });
        // Revisions are immutable, so reading it outside the first read's
        // snapshot cannot mix two states.
        let revision = self
            .get_revision(name, summary.revision)
            .await?
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "app {name:?} points at missing revision {}",
                    summary.revision
                ))
            })?;
        Ok(Some(AppRecord {
            app: summary,
            revision,
        }))
    }

    /// Revision `number` of a live app; None if either is missing.
    pub async fn get_revision(&self, name: &str, number: i64) -> Result<Option<Revision>> {
        on_pool!(self, |pool, _d| {
            let sql = format!(
                "SELECT {REVISION_COLS} FROM revisions WHERE app = $1 AND number = $2 \
                 AND EXISTS (SELECT 1 FROM apps WHERE apps.name = $1 AND apps.deleted_at IS NULL)"
            );
            match sqlx::query(&sql)
                .bind(name)
                .bind(number)
                .fetch_optional(pool)
                .await?
            {
                Some(row) => Ok(Some(revision_from_row(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// The revisions of a live app, newest first; None if the app is missing.
    pub async fn list_revisions(&self, name: &str) -> Result<Option<Vec<RevisionSummary>>> {
        on_pool!(self, |pool, _d| {
            let mut tx = pool.begin().await?;
            let live = sqlx::query("SELECT 1 FROM apps WHERE name = $1 AND deleted_at IS NULL")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !live {
                return Ok(None);
            }
            let rows = sqlx::query(
                "SELECT number, digest, author, message, rolled_back_to, created_at FROM revisions \
                 WHERE app = $1 ORDER BY number DESC",
            )
            .bind(name)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            rows.iter()
                .map(revision_summary_from_row)
                .collect::<Result<Vec<_>>>()
                .map(Some)
        })
    }

    /// Live apps by name, filtered and paged.
    pub async fn list_apps(&self, filter: &AppFilter) -> Result<AppPage> {
        let limit = i64::from(filter.limit.clamp(1, 1000));
        let mut sql = format!("SELECT {SUMMARY_COLS} FROM apps WHERE deleted_at IS NULL");
        let mut binds: Vec<&str> = Vec::new();
        fn next<'a>(binds: &mut Vec<&'a str>, value: &'a str) -> usize {
            binds.push(value);
            binds.len()
        }
        if let Some(team) = &filter.team {
            sql += &format!(" AND team = ${}", next(&mut binds, team.as_str()));
        }
        if let Some(owner) = &filter.owner {
            sql += &format!(
                " AND EXISTS (SELECT 1 FROM app_owners o WHERE o.app = apps.name AND o.owner = ${})",
                next(&mut binds, owner.as_str())
            );
        }
        for (key, value) in &filter.labels {
            let k = next(&mut binds, key.as_str());
            let v = next(&mut binds, value.as_str());
            sql += &format!(
                " AND EXISTS (SELECT 1 FROM app_labels l WHERE l.app = apps.name AND l.key = ${k} AND l.value = ${v})"
            );
        }
        if let Some(after) = &filter.after {
            sql += &format!(" AND name > ${}", next(&mut binds, after.as_str()));
        }
        sql += &format!(" ORDER BY name LIMIT ${}", binds.len() + 1);
        let mut items = on_pool!(self, |pool, _d| {
            let mut query = sqlx::query(&sql);
            for value in &binds {
                query = query.bind(*value);
            }
            let rows = query.bind(limit + 1).fetch_all(pool).await?;
            rows.iter()
                .map(summary_from_row)
                .collect::<Result<Vec<_>>>()?
        });
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|a| a.name.clone())
        } else {
            None
        };
        Ok(AppPage { items, next_cursor })
    }

    /// Soft-deletes a live app: it disappears from reads, its history and
    /// audit trail stay, and a later apply restores it.
    pub async fn delete_app(
        &self,
        name: &str,
        actor: &str,
        authorize: Authorize<'_>,
    ) -> Result<AppHead> {
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let sql = format!(
                "SELECT {HEAD_COLS} FROM apps WHERE name = $1{}",
                dialect.for_update()
            );
            let head = match sqlx::query(&sql)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
            {
                Some(row) => head_from_row(&row)?,
                None => {
                    return Err(Error::NotFound {
                        kind: "app",
                        name: name.to_string(),
                    });
                }
            };
            if head.deleted {
                return Err(Error::NotFound {
                    kind: "app",
                    name: name.to_string(),
                });
            }
            authorize(Some(&head)).map_err(Error::Denied)?;
            let now = Timestamp::now().0;
            sqlx::query("UPDATE apps SET deleted_at = $2, deleted_by = $3 WHERE name = $1")
                .bind(name)
                .bind(now)
                .bind(actor)
                .execute(&mut *tx)
                .await?;
            let event = NewAuditEvent {
                at: now,
                actor,
                action: "app.delete",
                resource_kind: "app",
                resource: name,
                revision: Some(head.current_revision),
                digest_before: Some(&head.digest),
                digest_after: None,
                detail: serde_json::json!({ "team": head.team }),
            };
            insert_audit!(&mut *tx, &event);
            tx.commit().await?;
            Ok(AppHead {
                deleted: true,
                ..head
            })
        })
    }
}
