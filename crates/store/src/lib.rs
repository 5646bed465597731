//! keelson's persistence: the one place that writes SQL.
//!
//! ```text
//!   server ──► Store ──► Pool::Sqlite (a file, WAL; the default)
//!                   └──► Pool::Postgres (chosen by a postgres:// URL)
//! ```
//!
//! Every query is written once with `$N` placeholders, which both backends
//! understand, and runs against whichever pool the URL chose (see
//! [`on_pool!`]). Every mutation runs in one transaction together with its
//! audit event, so a failure leaves nothing half-written. Profile revisions are
//! immutable and numbered per app; a profile whose canonical digest equals the
//! current one creates no revision.

mod apps;
mod audit;
mod catalog;
mod changes;
mod error;
mod releases;
mod rows;
mod time;
mod tokens;

pub mod testing;

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use apps::{
    AppFilter, AppHead, AppPage, AppRecord, AppSummary, ApplyOutcome, ApplyProfile, Revision,
    RevisionSummary, digest_of,
};
pub use audit::{AuditEvent, AuditFilter, AuditPage};
pub use catalog::{Environment, NewEnvironment, NewTarget, Target, TargetKind};
pub use changes::{ReleaseChange, next_release_change};
pub use error::{Error, Result};
pub use releases::{
    CommitOutcome, JournalEntry, JournalStatus, NewRelease, ReleaseCommit, ReleaseEvent,
    ReleaseRecord,
};
pub use time::Timestamp;
pub use tokens::{IssuedToken, NewToken, Role, SubjectKind, TokenRecord, random_hex};

/// Runs `$body` with `$pool` bound to the concrete pool of either backend.
///
/// The body is compiled once per backend, so the same query text and binds
/// serve both; `$dialect` tells the few places that differ.
macro_rules! on_pool {
    ($store:expr, |$pool:ident, $dialect:ident| $body:expr) => {
        match &$store.pool {
            $crate::Pool::Sqlite($pool) => {
                #[allow(unused_variables)]
                let $dialect = $crate::Dialect::Sqlite;
                $body
            }
            $crate::Pool::Postgres($pool) => {
                #[allow(unused_variables)]
                let $dialect = $crate::Dialect::Postgres;
                $body
            }
        }
    };
}
pub(crate) use on_pool;

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The SQL differences between the backends that the shared queries care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The statement that opens a write transaction. SQLite takes the write
    /// lock up front so two writers never deadlock on a lock upgrade.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }

    /// Row lock for a read-then-write inside a transaction (SQLite already
    /// holds the database write lock).
    pub(crate) fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }
}

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// SQLite, one file in WAL mode.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// The handle on keelson's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// SQLite has one writer at a time. Queueing writers here, instead of
    /// letting them meet SQLite's busy handler (which sleeps in growing
    /// steps), keeps write latency flat; other processes on the same file
    /// are still held off by the busy timeout.
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    changes: changes::Changes,
}

impl Store {
    /// Connects to `url`: `sqlite://PATH` (created if missing, WAL mode),
    /// `sqlite::memory:`, or `postgres://…`/`postgresql://…`. Does not migrate.
    pub async fn connect(url: &str) -> Result<Store> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(Error::connect)?;
            Ok(Store {
                pool: Pool::Postgres(pool),
                sqlite_writer: Arc::default(),
                changes: changes::Changes::default(),
            })
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| Error::InvalidUrl(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(30));
            let in_memory = url.contains(":memory:");
            let pool = SqlitePoolOptions::new()
                // An in-memory database exists once per connection.
                .max_connections(if in_memory { 1 } else { 8 })
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await
                .map_err(Error::connect)?;
            Ok(Store {
                pool: Pool::Sqlite(pool),
                sqlite_writer: Arc::default(),
                changes: changes::Changes::default(),
            })
        } else {
            Err(Error::InvalidUrl(format!(
                "unsupported database URL scheme in {:?}: use sqlite://PATH or postgres://…",
                redact(url)
            )))
        }
    }

    /// Connects to `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Store> {
        let store = Store::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations this version knows that the database lacks.
    pub async fn migrate(&self) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(pool) => migrator(SQLITE_MIGRATIONS).run(pool).await?,
            Pool::Postgres(pool) => migrator(POSTGRES_MIGRATIONS).run(pool).await?,
        }
        Ok(())
    }

    /// Subscribes to release changes: created, stepped, events appended.
    /// On SQLite these are the changes this process makes (SQLite serves
    /// one server); on PostgreSQL those of every server on the database,
    /// through LISTEN/NOTIFY. Changes may be missed (a lagging receiver, a
    /// reconnecting listener): use them to act early, not instead of
    /// reading the store. Call it inside a Tokio runtime.
    pub fn release_changes(&self) -> tokio::sync::broadcast::Receiver<ReleaseChange> {
        let receiver = self.changes.subscribe();
        if let Pool::Postgres(pool) = &self.pool {
            self.changes.listen_postgres(pool);
        }
        receiver
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Waits for this process's turn to write, on SQLite; None on PostgreSQL,
    /// whose row locks order writers.
    pub(crate) async fn writer_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.pool {
            Pool::Sqlite(_) => Some(self.sqlite_writer.lock().await),
            Pool::Postgres(_) => None,
        }
    }

    /// A round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, |pool, _d| {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Closes every connection; waits for connections in use to come back.
    pub async fn close(&self) {
        on_pool!(self, |pool, _d| pool.close().await)
    }
}

/// A URL with any password replaced, fit for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "releases",
        include_str!("../migrations/sqlite/0002_releases.sql"),
    ),
    (
        3,
        "one open release",
        include_str!("../migrations/sqlite/0003_one_open_release.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "releases",
        include_str!("../migrations/postgres/0002_releases.sql"),
    ),
    (
        3,
        "one open release",
        include_str!("../migrations/postgres/0003_one_open_release.sql"),
    ),
];

fn migrator(list: &'static [(i64, &'static str, &'static str)]) -> Migrator {
    let migrations = list
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                Cow::Borrowed(*sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://u:secret@127.0.0.1:5/db"),
            "postgres://u:***@127.0.0.1:5/db"
        );
        assert_eq!(
            redact("postgres://u@127.0.0.1:5/db"),
            "postgres://u@127.0.0.1:5/db"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
