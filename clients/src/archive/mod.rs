//! The subscriber's archive: every article received is kept in SQLite (embedded, the
//! default kind) or PostgreSQL, and acknowledged to the broker only once its row is
//! committed, so nothing is lost when the subscriber or the database dies mid-stream.
//!
//! - `url`: which database (`sqlite:PATH`, `postgres://...`), [`ArchiveUrl`];
//! - `record`: the row built from a message, and the timestamps' text form;
//! - `schema`: the `articles` table, as migrations applied on first use;
//! - `store`, `sqlite`, `postgres`: connect, insert a batch idempotently, read back;
//! - `writer`: the task that commits rows in batches and retries while the database is down;
//! - `acks`: which PUBACKs may go out, in the order the messages came;
//! - `pipeline`: the subscriber's side, from a received PUBLISH to its PUBACK;
//! - `render`: `archive list` and `archive stats` as text or JSON.

mod acks;
mod pipeline;
mod postgres;
mod record;
mod render;
mod schema;
mod sqlite;
mod store;
mod url;
mod writer;

use std::time::Duration;

pub(crate) use pipeline::Pipeline;
pub use record::{content_id, format_time, parse_since, parse_time, Record, Refusal};
pub use render::{render_list, render_stats};
pub use store::{ErrorKind, ListQuery, StatsRow, Store, StoreError};
pub use url::{ArchiveUrl, PgUrl};
pub(crate) use writer::Commit;

/// What the subscriber archives into, and how it batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveOptions {
    pub url: ArchiveUrl,
    /// Most rows committed in one transaction.
    pub batch_max: usize,
    /// How long the first row of a batch waits for more before the batch is committed
    /// (0: as soon as the previous commit is done; rows arriving meanwhile form the next
    /// batch, so batches grow with the load by themselves).
    pub linger: Duration,
}

/// Default `batch_max`.
pub const DEFAULT_BATCH_MAX: usize = 256;

impl ArchiveOptions {
    /// `batch_max` 256, no linger.
    pub fn new(url: ArchiveUrl) -> Self {
        Self {
            url,
            batch_max: DEFAULT_BATCH_MAX,
            linger: Duration::ZERO,
        }
    }
}
