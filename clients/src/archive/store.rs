//! The archive's storage, whichever the database: connect (and migrate), insert a batch
//! idempotently, read back. A lost connection is re-made on the next call.

use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;

use super::postgres::PgStore;
use super::record::{format_time, Record};
use super::sqlite::SqliteStore;
use super::ArchiveUrl;

/// What a failed call means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The database cannot be reached or cannot write now (down, locked, full, refused
    /// our password): retry later, the rows are fine.
    Unavailable,
    /// The database refused these rows' content: retrying the same rows cannot help.
    BadRow,
}

/// A failed database call, with a message that names the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StoreError {
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            message: message.into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {}

/// Filters of `archive list`; newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub section: Option<String>,
    pub newspaper: Option<String>,
    /// Only articles published at or after this time.
    pub since: Option<OffsetDateTime>,
    pub limit: u64,
}

/// Articles of one (newspaper, section): how many, first and last published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatsRow {
    pub newspaper: String,
    pub section: String,
    pub articles: u64,
    #[serde(serialize_with = "serialize_time")]
    pub first: OffsetDateTime,
    #[serde(serialize_with = "serialize_time")]
    pub last: OffsetDateTime,
}

fn serialize_time<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

/// An open archive.
pub enum Store {
    Sqlite(SqliteStore),
    /// Boxed: its configuration is ten times an SQLite store's.
    Postgres(Box<PgStore>),
}

impl Store {
    /// Connects and applies the schema's missing migrations; `create`: an SQLite file
    /// that does not exist is created (the subscriber), else refused (the read commands).
    pub async fn open(url: &ArchiveUrl, create: bool) -> Result<Store, StoreError> {
        let mut store = Store::new(url, create)?;
        store.connect().await?;
        Ok(store)
    }

    /// A store that connects (and migrates) on its first call; only a malformed URL
    /// fails here.
    pub fn new(url: &ArchiveUrl, create: bool) -> Result<Store, StoreError> {
        Ok(match url {
            ArchiveUrl::Sqlite(path) => Store::Sqlite(SqliteStore::new(path, create)),
            ArchiveUrl::Postgres(url) => Store::Postgres(Box::new(PgStore::new(url)?)),
        })
    }

    /// Connects now if not connected.
    pub async fn connect(&mut self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.connect().await,
            Store::Postgres(s) => s.connect().await,
        }
    }

    /// Inserts the rows in one transaction, skipping ids already stored (a redelivery
    /// changes nothing); returns how many were new. Committed when it returns `Ok`.
    pub async fn insert(&mut self, rows: &[Record]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Sqlite(s) => s.insert(rows).await,
            Store::Postgres(s) => s.insert(rows).await,
        }
    }

    pub async fn list(&mut self, query: &ListQuery) -> Result<Vec<Record>, StoreError> {
        match self {
            Store::Sqlite(s) => s.list(query).await,
            Store::Postgres(s) => s.list(query).await,
        }
    }

    /// Per (newspaper, section), ordered by newspaper then section.
    pub async fn stats(&mut self) -> Result<Vec<StatsRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.stats().await,
            Store::Postgres(s) => s.stats().await,
        }
    }

    /// Rows in `articles`.
    pub async fn count(&mut self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.count().await,
            Store::Postgres(s) => s.count().await,
        }
    }
}
