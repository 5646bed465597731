//! Environments and targets (Kubernetes clusters and host groups): only
//! their registration lives here; using them is the runtimes' business.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::audit::{NewAuditEvent, insert_audit};
use crate::rows::{Columns, json};
use crate::{Error, Result, Store, Timestamp, digest_of, on_pool};

/// An environment to register or update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewEnvironment {
    /// `prod`, `staging`, `test`, or a named test environment.
    pub name: String,
    /// `production`, `staging` or `test`.
    pub tier: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// A registered environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "RegisteredEnvironment")]
pub struct Environment {
    /// Its name, tier and description.
    #[serde(flatten)]
    pub spec: NewEnvironment,
    /// First registered.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// What kind of place a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// A Kubernetes cluster (zone).
    Cluster,
    /// A group of plain hosts (VMs).
    Hosts,
}

impl TargetKind {
    fn as_str(self) -> &'static str {
        match self {
            TargetKind::Cluster => "cluster",
            TargetKind::Hosts => "hosts",
        }
    }

    fn parse(text: &str) -> Result<TargetKind> {
        match text {
            "cluster" => Ok(TargetKind::Cluster),
            "hosts" => Ok(TargetKind::Hosts),
            other => Err(Error::Corrupt(format!("unknown target kind {other:?}"))),
        }
    }
}

/// A target to register or update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewTarget {
    /// Its name, referenced by profiles.
    pub name: String,
    /// Cluster or host group.
    pub kind: TargetKind,
    /// The environment it serves, if only one.
    #[serde(default)]
    pub environment: Option<String>,
    /// How to reach it (e.g. a kubeconfig reference, or host addresses).
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// A registered target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "RegisteredTarget")]
pub struct Target {
    /// What was registered.
    #[serde(flatten)]
    pub spec: NewTarget,
    /// First registered.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

fn environment_from_row(row: &impl Columns) -> Result<Environment> {
    Ok(Environment {
        spec: NewEnvironment {
            name: row.text("name")?,
            tier: row.text("tier")?,
            description: row.opt_text("description")?,
        },
        created_at: Timestamp(row.int("created_at")?),
        updated_at: Timestamp(row.int("updated_at")?),
    })
}

fn target_from_row(row: &impl Columns) -> Result<Target> {
    Ok(Target {
        spec: NewTarget {
            name: row.text("name")?,
            kind: TargetKind::parse(&row.text("kind")?)?,
            environment: row.opt_text("environment")?,
            config: json(row, "config_json")?,
            description: row.opt_text("description")?,
        },
        created_at: Timestamp(row.int("created_at")?),
        updated_at: Timestamp(row.int("updated_at")?),
    })
}

fn digest_json<T: Serialize>(value: &T) -> String {
    digest_of(&serde_json::to_string(value).unwrap_or_default())
}

impl Store {
    /// Registers an environment or updates it; audited when it changes.
    pub async fn put_environment(&self, env: &NewEnvironment, actor: &str) -> Result<Environment> {
        let after = digest_json(env);
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let select = "SELECT name, tier, description, created_at, updated_at FROM environments WHERE name = $1";
            let before = match sqlx::query(&format!("{select}{}", dialect.for_update()))
                .bind(&env.name)
                .fetch_optional(&mut *tx)
                .await?
            {
                Some(row) => Some(environment_from_row(&row)?),
                None => None,
            };
            let before_digest = before.as_ref().map(|e| digest_json(&e.spec));
            if before_digest.as_deref() == Some(after.as_str()) {
                return before.ok_or_else(|| Error::Corrupt("environment vanished".into()));
            }
            let now = Timestamp::now().0;
            sqlx::query(
                "INSERT INTO environments (name, tier, description, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (name) DO UPDATE SET tier = excluded.tier, description = excluded.description, \
                 updated_at = excluded.updated_at",
            )
            .bind(&env.name)
            .bind(&env.tier)
            .bind(&env.description)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let event = NewAuditEvent {
                at: now,
                actor,
                action: "environment.put",
                resource_kind: "environment",
                resource: &env.name,
                revision: None,
                digest_before: before_digest.as_deref(),
                digest_after: Some(&after),
                detail: serde_json::json!({ "tier": env.tier }),
            };
            insert_audit!(&mut *tx, &event);
            let row = sqlx::query(select)
                .bind(&env.name)
                .fetch_one(&mut *tx)
                .await?;
            let stored = environment_from_row(&row)?;
            tx.commit().await?;
            Ok(stored)
        })
    }

    /// All environments by name.
    pub async fn list_environments(&self) -> Result<Vec<Environment>> {
        on_pool!(self, |pool, _d| {
            let rows =
                sqlx::query("SELECT name, tier, description, created_at, updated_at FROM environments ORDER BY name")
                    .fetch_all(pool)
                    .await?;
            rows.iter().map(environment_from_row).collect()
        })
    }

    /// Registers a target or updates it; audited when it changes.
    pub async fn put_target(&self, target: &NewTarget, actor: &str) -> Result<Target> {
        let after = digest_json(target);
        let config =
            serde_json::to_string(&target.config).map_err(|e| Error::Invalid(e.to_string()))?;
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let select = "SELECT name, kind, environment, config_json, description, created_at, updated_at \
                          FROM targets WHERE name = $1";
            let before = match sqlx::query(&format!("{select}{}", dialect.for_update()))
                .bind(&target.name)
                .fetch_optional(&mut *tx)
                .await?
            {
                Some(row) => Some(target_from_row(&row)?),
                None => None,
            };
            let before_digest = before.as_ref().map(|t| digest_json(&t.spec));
            if before_digest.as_deref() == Some(after.as_str()) {
                return before.ok_or_else(|| Error::Corrupt("target vanished".into()));
            }
            let now = Timestamp::now().0;
            sqlx::query(
                "INSERT INTO targets (name, kind, environment, config_json, description, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, \
                 environment = excluded.environment, config_json = excluded.config_json, \
                 description = excluded.description, updated_at = excluded.updated_at",
            )
            .bind(&target.name)
            .bind(target.kind.as_str())
            .bind(&target.environment)
            .bind(&config)
            .bind(&target.description)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let event = NewAuditEvent {
                at: now,
                actor,
                action: "target.put",
                resource_kind: "target",
                resource: &target.name,
                revision: None,
                digest_before: before_digest.as_deref(),
                digest_after: Some(&after),
                detail: serde_json::json!({ "kind": target.kind, "environment": target.environment }),
            };
            insert_audit!(&mut *tx, &event);
            let row = sqlx::query(select)
                .bind(&target.name)
                .fetch_one(&mut *tx)
                .await?;
            let stored = target_from_row(&row)?;
            tx.commit().await?;
            Ok(stored)
        })
    }

    /// All targets by name.
    pub async fn list_targets(&self) -> Result<Vec<Target>> {
        on_pool!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT name, kind, environment, config_json, description, created_at, updated_at \
                 FROM targets ORDER BY name",
            )
            .fetch_all(pool)
            .await?;
            rows.iter().map(target_from_row).collect()
        })
    }
}
