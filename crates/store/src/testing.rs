//! Test support: a fresh, empty database of either backend.
//!
//! PostgreSQL comes from `KEELSON_TEST_POSTGRES_URL`, or else from the env
//! file that `scripts/pg.sh start` writes (`$KEELSON_PG_DIR/env`, or
//! `$TMPDIR/keelson-pg.current` for the last one started), one new database
//! per call. When neither is
//! there the PostgreSQL variant of a test fails, unless
//! `KEELSON_SKIP_POSTGRES=1` says to skip it.

use std::path::PathBuf;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::Backend;

/// Names the PostgreSQL server tests use (a superuser URL).
pub const POSTGRES_URL_VAR: &str = "KEELSON_TEST_POSTGRES_URL";
/// Set to `1` to skip PostgreSQL tests on a machine without PostgreSQL.
pub const SKIP_POSTGRES_VAR: &str = "KEELSON_SKIP_POSTGRES";

/// A scratch database; a SQLite file is removed on drop.
#[derive(Debug)]
pub struct TestDatabase {
    /// The URL to hand to `Store::open` or `keelson serve --database`.
    pub url: String,
    dir: Option<PathBuf>,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn random_suffix() -> String {
    let mut buf = [0u8; 8];
    getrandom::fill(&mut buf).expect("randomness for a test database name");
    hex::encode(buf)
}

/// A new empty database of `backend`, or None when PostgreSQL is skipped
/// on purpose.
///
/// # Panics
/// When PostgreSQL is asked for, not configured, and not explicitly skipped,
/// or when the scratch database cannot be made: a test must not pass then.
pub async fn test_database(backend: Backend) -> Option<TestDatabase> {
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(format!("keelson-test-{}", random_suffix()));
            std::fs::create_dir_all(&dir).expect("create a scratch directory");
            let url = format!("sqlite://{}", dir.join("keelson.db").display());
            Some(TestDatabase {
                url,
                dir: Some(dir),
            })
        }
        Backend::Postgres => {
            let Some(base) = postgres_url() else {
                if std::env::var(SKIP_POSTGRES_VAR).as_deref() == Ok("1") {
                    eprintln!("skipping the PostgreSQL variant: {SKIP_POSTGRES_VAR}=1");
                    return None;
                }
                panic!(
                    "{POSTGRES_URL_VAR} is not set and scripts/pg.sh is not running: run \
                     `scripts/pg.sh start` first, or set {SKIP_POSTGRES_VAR}=1 to skip PostgreSQL tests on purpose"
                );
            };
            let name = format!("keelson_test_{}", random_suffix());
            let mut conn = PgConnection::connect(&base)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR}: {e}"));
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
            let _ = conn.close().await;
            Some(TestDatabase {
                url: with_database(&base, &name),
                dir: None,
            })
        }
    }
}

/// The PostgreSQL server URL from the environment, or from the env file of
/// the server `scripts/pg.sh` started last.
pub fn postgres_url() -> Option<String> {
    if let Ok(url) = std::env::var(POSTGRES_URL_VAR) {
        return Some(url);
    }
    let file = match std::env::var_os("KEELSON_PG_DIR") {
        Some(dir) => PathBuf::from(dir).join("env"),
        None => std::env::temp_dir().join("keelson-pg.current"),
    };
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .find_map(|line| line.strip_prefix(POSTGRES_URL_VAR)?.strip_prefix('='))
        .map(|url| url.trim().to_string())
}

/// `base` with its database name replaced by `name`.
fn with_database(base: &str, name: &str) -> String {
    let (without_query, query) = match base.split_once('?') {
        Some((url, query)) => (url, Some(query)),
        None => (base, None),
    };
    let authority_start = without_query.find("://").map_or(0, |i| i + 3);
    let root = match without_query[authority_start..].find('/') {
        Some(slash) => &without_query[..authority_start + slash],
        None => without_query,
    };
    match query {
        Some(query) => format!("{root}/{name}?{query}"),
        None => format!("{root}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres", "x"),
            "postgres://u@127.0.0.1:5432/x"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            with_database("postgres://u@h:1/db?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
    }
}
