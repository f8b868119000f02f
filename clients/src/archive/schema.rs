//! The `articles` table and its indexes, as numbered migrations per database kind. A
//! store applies the ones it has not applied yet when it connects (first use included).

/// SQLite: version kept in `PRAGMA user_version`; timestamps as fixed-width UTC text
/// (`record::format_time`), which SQLite's date functions read.
pub(crate) const SQLITE: &[&str] = &["
CREATE TABLE IF NOT EXISTS articles (
    id           TEXT PRIMARY KEY NOT NULL,
    newspaper    TEXT NOT NULL,
    section      TEXT NOT NULL,
    title        TEXT NOT NULL,
    content      TEXT NOT NULL,
    published_at TEXT NOT NULL,
    topic        TEXT NOT NULL,
    received_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS articles_section_time ON articles (section, published_at);
CREATE INDEX IF NOT EXISTS articles_newspaper_time ON articles (newspaper, published_at);
"];

/// PostgreSQL: version kept in `archive_schema`; timestamps as `timestamptz`.
pub(crate) const POSTGRES: &[&str] = &["
CREATE TABLE IF NOT EXISTS articles (
    id           text PRIMARY KEY,
    newspaper    text NOT NULL,
    section      text NOT NULL,
    title        text NOT NULL,
    content      text NOT NULL,
    published_at timestamptz NOT NULL,
    topic        text NOT NULL,
    received_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS articles_section_time ON articles (section, published_at);
CREATE INDEX IF NOT EXISTS articles_newspaper_time ON articles (newspaper, published_at);
"];

/// Run first, in the migration's transaction, after taking `POSTGRES_LOCK`: two
/// subscribers starting together migrate one after the other.
pub(crate) const POSTGRES_VERSION_TABLE: &str = "
CREATE TABLE IF NOT EXISTS archive_schema (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Advisory lock key of the migration (any constant; "arch" in ASCII).
pub(crate) const POSTGRES_LOCK: i64 = 0x6172_6368;

/// The columns, in the order every query selects them (`Record`'s fields).
pub(crate) const COLUMNS: &str =
    "id, newspaper, section, title, content, published_at, topic, received_at";
