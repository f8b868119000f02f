//! The archive in an SQLite file (embedded, compiled in: nothing to install). WAL
//! journal, `synchronous = FULL`: a committed batch survives a crash of the process or of
//! the machine. Calls run on tokio's blocking threads, one at a time per store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params_from_iter, Connection, ErrorCode, OpenFlags, TransactionBehavior};
use time::OffsetDateTime;

use super::record::{format_time, parse_time, Record};
use super::schema::{COLUMNS, SQLITE};
use super::store::{ErrorKind, ListQuery, StatsRow, StoreError};

/// How long a write waits for another process's lock (a reader of `archive list`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    /// The database file.
    path: PathBuf,
    /// Whether `open` may create the file.
    create: bool,
    /// The connection; `None` after a failure, re-opened on the next call.
    conn: Option<Arc<Mutex<Connection>>>,
}

impl SqliteStore {
    /// A store that opens the file on its first call.
    pub(crate) fn new(path: &Path, create: bool) -> Self {
        Self {
            path: path.to_owned(),
            create,
            conn: None,
        }
    }

    pub(crate) async fn connect(&mut self) -> Result<(), StoreError> {
        self.connection().await.map(|_| ())
    }

    async fn connection(&mut self) -> Result<Arc<Mutex<Connection>>, StoreError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let (path, create) = (self.path.clone(), self.create);
        let conn = blocking(move || connect(&path, create)).await?;
        let conn = Arc::new(Mutex::new(conn));
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `f` on the connection on a blocking thread; a failure that is not the rows'
    /// fault drops the connection, so the next call opens the file again.
    async fn with<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.connection().await?;
        let path = self.path.clone();
        let result = blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::unavailable("the SQLite connection was poisoned"))?;
            f(&mut guard).map_err(|e| classify(&path, e))
        })
        .await;
        if matches!(&result, Err(e) if e.kind == ErrorKind::Unavailable) {
            self.conn = None;
        }
        result
    }

    pub(crate) async fn insert(&mut self, rows: &[Record]) -> Result<u64, StoreError> {
        let rows = rows.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut inserted = 0;
            {
                let mut stmt = tx.prepare(&format!(
                    "INSERT OR IGNORE INTO articles ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ))?;
                for r in &rows {
                    inserted += stmt.execute([
                        r.id.as_str(),
                        &r.newspaper,
                        &r.section,
                        &r.title,
                        &r.content,
                        &format_time(r.published_at),
                        &r.topic,
                        &format_time(r.received_at),
                    ])? as u64;
                }
            }
            tx.commit()?;
            Ok(inserted)
        })
        .await
    }

    pub(crate) async fn list(&mut self, q: &ListQuery) -> Result<Vec<Record>, StoreError> {
        let mut clauses = Vec::new();
        let mut params: Vec<String> = Vec::new();
        for (column, value) in [("section", &q.section), ("newspaper", &q.newspaper)] {
            if let Some(v) = value {
                params.push(v.clone());
                clauses.push(format!("{column} = ?{}", params.len()));
            }
        }
        if let Some(since) = q.since {
            params.push(format_time(since));
            clauses.push(format!("published_at >= ?{}", params.len()));
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM articles {filter} ORDER BY published_at DESC, id LIMIT {}",
            q.limit.min(i64::MAX as u64)
        );
        self.with(move |conn| {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params.iter()), |row| {
                Ok(Record {
                    id: row.get(0)?,
                    newspaper: row.get(1)?,
                    section: row.get(2)?,
                    title: row.get(3)?,
                    content: row.get(4)?,
                    published_at: time_column(row.get(5)?),
                    topic: row.get(6)?,
                    received_at: time_column(row.get(7)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub(crate) async fn stats(&mut self) -> Result<Vec<StatsRow>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT newspaper, section, count(*), min(published_at), max(published_at)
                 FROM articles GROUP BY newspaper, section ORDER BY newspaper, section",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(StatsRow {
                    newspaper: row.get(0)?,
                    section: row.get(1)?,
                    articles: row.get::<_, i64>(2)?.max(0) as u64,
                    first: time_column(row.get(3)?),
                    last: time_column(row.get(4)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub(crate) async fn count(&mut self) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT count(*) FROM articles", [], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
        })
        .await
    }
}

/// Opens the file (and its folder, when creating), sets the journal and applies the
/// schema's missing migrations.
fn connect(path: &Path, create: bool) -> Result<Connection, StoreError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::unavailable(format!("SQLite archive {}: {what}: {e}", path.display()))
    };
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| unavailable("cannot create its folder", &e))?;
        }
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    } else if !path.is_file() {
        return Err(StoreError::unavailable(format!(
            "no archive at {}: the subscriber creates it (subscriber --archive sqlite:{}); check the path",
            path.display(),
            path.display()
        )));
    }
    let mut conn =
        Connection::open_with_flags(path, flags).map_err(|e| unavailable("cannot open", &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
        .map_err(|e| unavailable("cannot configure", &e))?;
    migrate(&mut conn).map_err(|e| unavailable("cannot create or migrate the schema", &e))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in SQLITE.iter().enumerate().skip(version.max(0) as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    tx.commit()
}

/// Rows always hold `format_time` text; one edited by hand into something else reads as
/// the epoch rather than failing the whole listing.
fn time_column(text: String) -> OffsetDateTime {
    parse_time(&text).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    let kind = match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch) => {
            ErrorKind::BadRow
        }
        _ => ErrorKind::Unavailable,
    };
    StoreError {
        kind,
        message: format!("SQLite archive {}: {e}", path.display()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::unavailable(format!("SQLite call failed: {e}"))))
}
