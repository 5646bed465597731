//! The store's errors: what a caller can act on (not found, conflict, denied)
//! kept apart from database failures, which callers log and do not show.

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named thing does not exist (or is deleted).
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// What was looked for: "app", "revision", "token", …
        kind: &'static str,
        /// Its name or number.
        name: String,
    },
    /// The write conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The caller's authorization check refused the change; nothing was written.
    #[error("{0}")]
    Denied(String),
    /// The input cannot be stored as given.
    #[error("{0}")]
    Invalid(String),
    /// The database URL is not one the store understands.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// The database could not be reached.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database failure.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Stored data that does not decode (a bug or a hand-edited database).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl Error {
    pub(crate) fn connect(e: sqlx::Error) -> Error {
        Error::Connect(e)
    }

    /// True for a unique-key violation, which a retry may resolve.
    pub(crate) fn is_unique_violation(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::Database(db)) if db.is_unique_violation())
    }
}
