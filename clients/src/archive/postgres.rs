//! The archive in PostgreSQL, with tokio-postgres on our tokio, and TLS through our one
//! rustls (ring) when the URL asks for it (`sslmode=require`, verified against
//! `sslrootcert=FILE` or the system's roots). A batch is one `INSERT ... SELECT FROM
//! UNNEST(...)` statement: one round trip, committed when it returns.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::debug;

use super::record::Record;
use super::schema::{COLUMNS, POSTGRES, POSTGRES_LOCK, POSTGRES_VERSION_TABLE};
use super::store::{ErrorKind, ListQuery, StatsRow, StoreError};
use super::PgUrl;
use crate::tls::load_certificates;

/// Connection attempt deadline, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const INSERT: &str = "INSERT INTO articles (id, newspaper, section, title, content, published_at, topic, received_at)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[], $8::timestamptz[])
 ON CONFLICT (id) DO NOTHING";

pub struct PgStore {
    /// Where, for messages (no password).
    target: String,
    /// The parsed URL.
    config: Config,
    /// CA file from `sslrootcert`, when TLS is required.
    root_cert: Option<PathBuf>,
    /// The live connection and its prepared insert; `None` after a failure.
    conn: Option<(Client, Statement)>,
}

impl PgStore {
    /// A store that connects on its first call; only a malformed URL fails here.
    pub(crate) fn new(url: &PgUrl) -> Result<Self, StoreError> {
        let bad = |e: tokio_postgres::Error| {
            StoreError::unavailable(format!("invalid PostgreSQL URL {}: {e}", url.redacted()))
        };
        let mut config = Config::from_str(&url.without_root_cert()).map_err(bad)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(Self {
            target: format!("PostgreSQL archive {}", url.redacted()),
            config,
            root_cert: url.root_cert(),
            conn: None,
        })
    }

    pub(crate) async fn connect(&mut self) -> Result<(), StoreError> {
        self.connection().await.map(|_| ())
    }

    async fn connection(&mut self) -> Result<&(Client, Statement), StoreError> {
        if self.conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let client = self.dial().await?;
            migrate(&client)
                .await
                .map_err(|e| self.error(e, "cannot create or migrate the schema"))?;
            let insert = client
                .prepare(INSERT)
                .await
                .map_err(|e| self.error(e, "cannot prepare the insert"))?;
            self.conn = Some((client, insert));
        }
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::unavailable(format!("{}: not connected", self.target)))
    }

    async fn dial(&self) -> Result<Client, StoreError> {
        let target = self.target.clone();
        let fail = |e: tokio_postgres::Error| {
            StoreError::unavailable(format!("{target}: cannot connect: {}", describe(&e)))
        };
        let client = if self.config.get_ssl_mode() == SslMode::Require {
            let tls = self.tls()?;
            let (client, connection) = self.config.connect(tls).await.map_err(fail)?;
            tokio::spawn(drive(connection, self.target.clone()));
            client
        } else {
            let (client, connection) = self.config.connect(NoTls).await.map_err(fail)?;
            tokio::spawn(drive(connection, self.target.clone()));
            client
        };
        Ok(client)
    }

    fn tls(&self) -> Result<MakeRustlsConnect, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                for der in load_certificates("PostgreSQL CA certificate (sslrootcert)", path)
                    .map_err(|e| StoreError::unavailable(format!("{}: {e}", self.target)))?
                {
                    roots.add(der).map_err(|e| {
                        StoreError::unavailable(format!(
                            "{}: sslrootcert {}: {e}",
                            self.target,
                            path.display()
                        ))
                    })?;
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::unavailable(format!("{}: TLS: {e}", self.target)))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// A failed call: the connection is dropped unless the rows were at fault.
    fn error(&self, e: tokio_postgres::Error, what: &str) -> StoreError {
        let kind = match e.code().map(|c| &c.code()[..2]) {
            // Data exception, integrity constraint, program limit (a too-large row).
            Some("22" | "23" | "54") => ErrorKind::BadRow,
            _ => ErrorKind::Unavailable,
        };
        StoreError {
            kind,
            message: format!("{}: {what}: {}", self.target, describe(&e)),
        }
    }

    fn failed(&mut self, e: tokio_postgres::Error, what: &str) -> StoreError {
        let err = self.error(e, what);
        if err.kind == ErrorKind::Unavailable {
            self.conn = None;
        }
        err
    }

    pub(crate) async fn insert(&mut self, rows: &[Record]) -> Result<u64, StoreError> {
        let column = |f: fn(&Record) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let (ids, newspapers, sections, titles, contents, topics) = (
            column(|r| &r.id),
            column(|r| &r.newspaper),
            column(|r| &r.section),
            column(|r| &r.title),
            column(|r| &r.content),
            column(|r| &r.topic),
        );
        let published: Vec<OffsetDateTime> = rows.iter().map(|r| r.published_at).collect();
        let received: Vec<OffsetDateTime> = rows.iter().map(|r| r.received_at).collect();
        let (client, insert) = self.connection().await?;
        let result = client
            .execute(
                insert,
                &[
                    &ids,
                    &newspapers,
                    &sections,
                    &titles,
                    &contents,
                    &published,
                    &topics,
                    &received,
                ],
            )
            .await;
        result.map_err(|e| self.failed(e, "cannot insert"))
    }

    pub(crate) async fn list(&mut self, q: &ListQuery) -> Result<Vec<Record>, StoreError> {
        let mut clauses = Vec::new();
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        for (column, value) in [("section", &q.section), ("newspaper", &q.newspaper)] {
            if let Some(v) = value {
                params.push(Box::new(v.clone()));
                clauses.push(format!("{column} = ${}", params.len()));
            }
        }
        if let Some(since) = q.since {
            params.push(Box::new(since));
            clauses.push(format!("published_at >= ${}", params.len()));
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
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        let (client, _) = self.connection().await?;
        let result = client.query(&sql, &refs).await;
        let rows = result.map_err(|e| self.failed(e, "cannot list"))?;
        rows.iter()
            .map(|row| {
                Ok(Record {
                    id: row.try_get(0)?,
                    newspaper: row.try_get(1)?,
                    section: row.try_get(2)?,
                    title: row.try_get(3)?,
                    content: row.try_get(4)?,
                    published_at: row.try_get(5)?,
                    topic: row.try_get(6)?,
                    received_at: row.try_get(7)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(e, "unexpected column type in articles"))
    }

    pub(crate) async fn stats(&mut self) -> Result<Vec<StatsRow>, StoreError> {
        let (client, _) = self.connection().await?;
        let result = client
            .query(
                "SELECT newspaper, section, count(*), min(published_at), max(published_at)
                 FROM articles GROUP BY newspaper, section ORDER BY newspaper, section",
                &[],
            )
            .await;
        let rows = result.map_err(|e| self.failed(e, "cannot read statistics"))?;
        rows.iter()
            .map(|row| {
                Ok(StatsRow {
                    newspaper: row.try_get(0)?,
                    section: row.try_get(1)?,
                    articles: row.try_get::<_, i64>(2)?.max(0) as u64,
                    first: row.try_get(3)?,
                    last: row.try_get(4)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(e, "unexpected column type in articles"))
    }

    pub(crate) async fn count(&mut self) -> Result<u64, StoreError> {
        let (client, _) = self.connection().await?;
        let result = client.query_one("SELECT count(*) FROM articles", &[]).await;
        let row = result.map_err(|e| self.failed(e, "cannot count"))?;
        row.try_get::<_, i64>(0)
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.error(e, "cannot count"))
    }
}

/// Applies the missing migrations in one transaction under an advisory lock.
async fn migrate(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&POSTGRES_LOCK])
            .await?;
        client.batch_execute(POSTGRES_VERSION_TABLE).await?;
        let row = client
            .query_one("SELECT coalesce(max(version), 0) FROM archive_schema", &[])
            .await?;
        let version: i32 = row.try_get(0)?;
        for (i, sql) in POSTGRES.iter().enumerate().skip(version.max(0) as usize) {
            client.batch_execute(sql).await?;
            client
                .execute(
                    "INSERT INTO archive_schema (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => client.batch_execute("COMMIT").await,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// The connection's I/O task; its end is seen by the next call (`Client::is_closed`).
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>, target: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        debug!("{target}: connection ended: {}", describe(&e));
    }
}

/// The server's own message when there is one, else the error and its cause.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}: {})", db.message(), db.severity(), db.code().code()),
        None => e.to_string(),
    }
}
