//! API tokens: 256 random bits shown once at creation; only their SHA-256
//! is stored, so a leaked database does not leak credentials.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{NewAuditEvent, insert_audit};
use crate::rows::{Columns, json};
use crate::{Error, Result, Store, Timestamp, on_pool};

/// Prefix of every token secret, so scanners and people can recognise one.
pub const SECRET_PREFIX: &str = "kst_";

/// What a token may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads only.
    Viewer,
    /// Changes the apps it owns or its teams own.
    Member,
    /// Changes anything, including an app's team and tokens.
    Admin,
}

impl Role {
    /// `admin`, `member` or `viewer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Role, String> {
        match text {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?}: expected admin, member or viewer"
            )),
        }
    }
}

/// Who holds a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubjectKind {
    /// A person.
    Person,
    /// A service (CI, a release bot, …).
    Service,
}

impl SubjectKind {
    fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Person => "person",
            SubjectKind::Service => "service",
        }
    }
}

/// A token to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewToken {
    /// The person or service acting with it; recorded as the author of changes.
    pub subject: String,
    /// Person or service.
    #[serde(default = "default_kind")]
    pub subject_kind: SubjectKind,
    /// Teams whose apps the subject may change (as a member).
    #[serde(default)]
    pub teams: Vec<String>,
    /// Admin, member or viewer.
    pub role: Role,
    /// What the token is for.
    #[serde(default)]
    pub description: Option<String>,
}

fn default_kind() -> SubjectKind {
    SubjectKind::Person
}

/// A stored token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// Public identifier (`tok_…`), safe to show and log.
    pub id: String,
    /// Subject, kind, teams, role, description.
    #[serde(flatten)]
    pub token: NewToken,
    /// When it was made.
    pub created_at: Timestamp,
    /// By whom.
    pub created_by: String,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
}

/// A token just created: the only time its secret exists outside its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IssuedToken {
    /// The stored record.
    #[serde(flatten)]
    pub record: TokenRecord,
    /// The bearer secret.
    pub secret: String,
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// `bytes` random bytes from the system's generator, as hex (secrets,
/// token ids).
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| Error::Invalid(format!("no randomness available: {e}")))?;
    Ok(hex::encode(buf))
}

const TOKEN_COLS: &str =
    "id, subject, subject_kind, teams_json, role, description, created_at, created_by, revoked_at";

fn token_from_row(row: &impl Columns) -> Result<TokenRecord> {
    let role = row.text("role")?.parse::<Role>().map_err(Error::Corrupt)?;
    let subject_kind = match row.text("subject_kind")?.as_str() {
        "person" => SubjectKind::Person,
        "service" => SubjectKind::Service,
        other => return Err(Error::Corrupt(format!("unknown subject kind {other:?}"))),
    };
    Ok(TokenRecord {
        id: row.text("id")?,
        token: NewToken {
            subject: row.text("subject")?,
            subject_kind,
            teams: json(row, "teams_json")?,
            role,
            description: row.opt_text("description")?,
        },
        created_at: Timestamp(row.int("created_at")?),
        created_by: row.text("created_by")?,
        revoked_at: row.opt_int("revoked_at")?.map(Timestamp),
    })
}

impl Store {
    /// Creates a token and returns its secret, which is not stored.
    pub async fn create_token(&self, token: &NewToken, actor: &str) -> Result<IssuedToken> {
        if token.subject.trim().is_empty() {
            return Err(Error::Invalid("subject must not be empty".into()));
        }
        let id = format!("tok_{}", random_hex(8)?);
        let secret = format!("{SECRET_PREFIX}{}", random_hex(32)?);
        let hash = hash_secret(&secret);
        let teams =
            serde_json::to_string(&token.teams).map_err(|e| Error::Invalid(e.to_string()))?;
        let _turn = self.writer_turn().await;
        let record = on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let now = Timestamp::now().0;
            sqlx::query(
                "INSERT INTO api_tokens (id, secret_hash, subject, subject_kind, teams_json, role, description, \
                 created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&id)
            .bind(&hash)
            .bind(&token.subject)
            .bind(token.subject_kind.as_str())
            .bind(&teams)
            .bind(token.role.as_str())
            .bind(&token.description)
            .bind(now)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
            let event = NewAuditEvent {
                at: now,
                actor,
                action: "token.create",
                resource_kind: "token",
                resource: &id,
                revision: None,
                digest_before: None,
                digest_after: None,
                detail: serde_json::json!({ "subject": token.subject, "role": token.role, "teams": token.teams }),
            };
            insert_audit!(&mut *tx, &event);
            let row = sqlx::query(&format!(
                "SELECT {TOKEN_COLS} FROM api_tokens WHERE id = $1"
            ))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            let record = token_from_row(&row)?;
            tx.commit().await?;
            record
        });
        Ok(IssuedToken { record, secret })
    }

    /// The live token whose secret this is; None for unknown or revoked ones.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<TokenRecord>> {
        if !secret.starts_with(SECRET_PREFIX) {
            return Ok(None);
        }
        let hash = hash_secret(secret);
        on_pool!(self, |pool, _d| {
            let sql = format!(
                "SELECT {TOKEN_COLS} FROM api_tokens WHERE secret_hash = $1 AND revoked_at IS NULL"
            );
            match sqlx::query(&sql).bind(&hash).fetch_optional(pool).await? {
                Some(row) => Ok(Some(token_from_row(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// All tokens, oldest first, without secrets.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        on_pool!(self, |pool, _d| {
            let rows = sqlx::query(&format!(
                "SELECT {TOKEN_COLS} FROM api_tokens ORDER BY created_at, id"
            ))
            .fetch_all(pool)
            .await?;
            rows.iter().map(token_from_row).collect()
        })
    }

    /// Revokes a token at once; audited.
    pub async fn revoke_token(&self, id: &str, actor: &str) -> Result<TokenRecord> {
        let _turn = self.writer_turn().await;
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin_with(dialect.begin_write()).await?;
            let now = Timestamp::now().0;
            let done = sqlx::query(
                "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 0 {
                return Err(Error::NotFound {
                    kind: "token",
                    name: id.to_string(),
                });
            }
            let event = NewAuditEvent {
                at: now,
                actor,
                action: "token.revoke",
                resource_kind: "token",
                resource: id,
                revision: None,
                digest_before: None,
                digest_after: None,
                detail: serde_json::json!({}),
            };
            insert_audit!(&mut *tx, &event);
            let row = sqlx::query(&format!(
                "SELECT {TOKEN_COLS} FROM api_tokens WHERE id = $1"
            ))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            let record = token_from_row(&row)?;
            tx.commit().await?;
            Ok(record)
        })
    }
}
