//! The writer task: takes rows in the order the subscriber received them, commits them
//! in batches (bounded in rows and in waiting time), tells the subscriber which are done,
//! and, while the database is down, keeps them and retries with backoff.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::record::Record;
use super::store::{ErrorKind, Store, StoreError};
use crate::backoff::{Backoff, BackoffPolicy};

/// While the database stays down, one WARN per this period.
pub(crate) const OUTAGE_WARN_PERIOD: Duration = Duration::from_secs(30);

/// A row and its place in the order of reception.
pub(crate) struct Entry {
    pub seq: u64,
    pub record: Record,
}

/// What one commit resolved.
#[derive(Debug, Default)]
pub(crate) struct Commit {
    /// Every entry up to this `seq` is stored or refused.
    pub upto: u64,
    /// Ids now in the table (new or already there).
    pub stored: Vec<String>,
    /// How many of them are new rows.
    pub inserted: u64,
    /// Rows the database refused, with its reason (id, reason).
    pub refused: Vec<(String, String)>,
}

pub(crate) struct Writer {
    /// The database.
    pub store: Store,
    /// The database, for log lines.
    pub target: String,
    /// Most rows per transaction.
    pub batch_max: usize,
    /// How long a batch's first row waits for more.
    pub linger: Duration,
    /// Rows to store, from the subscriber.
    pub input: mpsc::Receiver<Entry>,
    /// What was resolved, to the subscriber.
    pub output: mpsc::UnboundedSender<Commit>,
}

/// The batch being committed: seqs and rows side by side.
#[derive(Default)]
struct Batch {
    seqs: Vec<u64>,
    rows: Vec<Record>,
}

impl Batch {
    fn push(&mut self, e: Entry) {
        self.seqs.push(e.seq);
        self.rows.push(e.record);
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    /// Forgets the first `n`, which are resolved.
    fn drain(&mut self, n: usize) {
        self.seqs.drain(..n);
        self.rows.drain(..n);
    }
}

impl Writer {
    /// Runs until the subscriber closes its side and every row taken is resolved.
    pub(crate) async fn run(mut self) {
        let mut batch = Batch::default();
        let mut backoff = Backoff::new(BackoffPolicy::default());
        let mut outage = Outage::default();
        loop {
            if batch.len() == 0 {
                match self.input.recv().await {
                    Some(e) => batch.push(e),
                    None => return,
                }
            }
            self.fill(&mut batch).await;
            match self.commit(&mut batch).await {
                Ok(()) => {
                    backoff.reset();
                    outage.recovered(&self.target);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    outage.failed(&self.target, &e, batch.len() + self.input.len(), delay);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Adds waiting rows, up to `batch_max`, waiting up to `linger` for them.
    async fn fill(&mut self, batch: &mut Batch) {
        while batch.len() < self.batch_max {
            match self.input.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if self.linger.is_zero() {
            return;
        }
        let deadline = Instant::now() + self.linger;
        while batch.len() < self.batch_max {
            match tokio::time::timeout_at(deadline, self.input.recv()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// One transaction for the batch; if the database refuses its content, row by row,
    /// so that one bad row is refused alone and never blocks the others.
    async fn commit(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        match self.store.insert(&batch.rows).await {
            Ok(inserted) => {
                let commit = Commit {
                    upto: batch.seqs.last().copied().unwrap_or_default(),
                    stored: batch.rows.iter().map(|r| r.id.clone()).collect(),
                    inserted,
                    refused: Vec::new(),
                };
                batch.drain(batch.len());
                let _ = self.output.send(commit);
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::BadRow => self.one_by_one(batch).await,
            Err(e) => Err(e),
        }
    }

    async fn one_by_one(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        let mut commit = Commit::default();
        let mut done = 0;
        let mut result = Ok(());
        for i in 0..batch.len() {
            let id = batch.rows[i].id.clone();
            match self.store.insert(&batch.rows[i..=i]).await {
                Ok(n) => {
                    commit.inserted += n;
                    commit.stored.push(id);
                }
                Err(e) if e.kind == ErrorKind::BadRow => commit.refused.push((id, e.message)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            commit.upto = batch.seqs[i];
            done = i + 1;
        }
        if done > 0 {
            batch.drain(done);
            let _ = self.output.send(commit);
        }
        result
    }
}

/// The state of an outage, for its log lines: one WARN when it starts, one per
/// `OUTAGE_WARN_PERIOD` while it lasts, one INFO when it ends.
#[derive(Default)]
struct Outage {
    /// When the first failure of this outage happened.
    since: Option<Instant>,
    /// When the last WARN was logged.
    last_warn: Option<Instant>,
    /// Failed attempts since the last WARN.
    attempts: u64,
}

impl Outage {
    fn failed(&mut self, target: &str, e: &StoreError, waiting: usize, delay: Duration) {
        let now = Instant::now();
        self.attempts += 1;
        match (self.since, self.last_warn) {
            (None, _) => {
                self.since = Some(now);
                self.last_warn = Some(now);
                self.attempts = 0;
                warn!(
                    archive = %target,
                    waiting,
                    "archive unavailable: {e}; acknowledgements held (the broker keeps the messages); retrying with backoff, next in {delay:?}"
                );
            }
            (Some(since), Some(last)) if now.duration_since(last) >= OUTAGE_WARN_PERIOD => {
                warn!(
                    archive = %target,
                    waiting,
                    "archive still unavailable after {} s ({} more attempts): {e}",
                    now.duration_since(since).as_secs(),
                    self.attempts
                );
                self.last_warn = Some(now);
                self.attempts = 0;
            }
            _ => {}
        }
    }

    fn recovered(&mut self, target: &str) {
        if let Some(since) = self.since.take() {
            info!(
                archive = %target,
                "archive available again after {:.1} s; catching up",
                since.elapsed().as_secs_f64()
            );
            self.last_warn = None;
            self.attempts = 0;
        }
    }
}
