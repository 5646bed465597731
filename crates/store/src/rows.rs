//! Typed column access shared by both backends' rows.

use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use crate::Result;

/// The column types keelson stores: text and 64-bit integers, maybe NULL.
pub(crate) trait Columns {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
}

macro_rules! impl_columns {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, col: &str) -> Result<String> {
                Ok(self.try_get::<String, _>(col)?)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>> {
                Ok(self.try_get::<Option<String>, _>(col)?)
            }
            fn int(&self, col: &str) -> Result<i64> {
                Ok(self.try_get::<i64, _>(col)?)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>> {
                Ok(self.try_get::<Option<i64>, _>(col)?)
            }
        }
    };
}
impl_columns!(SqliteRow);
impl_columns!(PgRow);

/// Decodes a JSON column.
pub(crate) fn json<T: serde::de::DeserializeOwned>(row: &impl Columns, col: &str) -> Result<T> {
    let text = row.text(col)?;
    serde_json::from_str(&text).map_err(|e| crate::Error::Corrupt(format!("column {col}: {e}")))
}
