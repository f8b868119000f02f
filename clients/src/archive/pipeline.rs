//! The subscriber's side of the archive: a received PUBLISH becomes a row for the
//! writer task, and each commit releases the PUBACKs it allows.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, Publish};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::acks::AckTracker;
use super::record::{Record, Refusal};
use super::store::{Store, StoreError};
use super::writer::{Commit, Entry, Writer};
use super::ArchiveOptions;
use crate::connection::{emit, ClientEvent, Session};
use crate::payload::Payload;

/// Rows handed to the writer and not yet resolved, at most. The broker's inflight window
/// (100 by default) keeps far fewer unacknowledged; beyond this a message is left
/// unacknowledged (the broker sends it again on the next connection).
const MAX_WAITING: usize = 10_000;

/// How long a graceful stop waits for the rows already taken to be committed.
const DRAIN_WAIT: Duration = Duration::from_secs(3);

/// Repeated warnings of one kind: one line per this period, with the count of the others.
const REPEAT_PERIOD: Duration = Duration::from_secs(60);

pub(crate) struct Pipeline {
    /// The database, for log lines.
    target: String,
    /// Rows to the writer; `None` once closing.
    entries: Option<mpsc::Sender<Entry>>,
    /// What the writer resolved.
    commits: mpsc::UnboundedReceiver<Commit>,
    /// The writer task.
    writer: JoinHandle<()>,
    /// PUBACKs owed and due.
    acks: AckTracker,
    /// Messages not archived (not articles, or refused by the database).
    refusals: Repeats,
    /// Messages left unacknowledged because too many rows wait for the database.
    overflow: Repeats,
    /// New rows committed.
    pub(crate) archived: u64,
    /// Messages acknowledged without a row.
    pub(crate) refused: u64,
}

impl Pipeline {
    /// Opens the archive (schema created or migrated) and starts the writer. With
    /// `retry`, a database that cannot be reached yet is retried by the writer instead.
    pub(crate) async fn start(opts: &ArchiveOptions, retry: bool) -> Result<Self, StoreError> {
        let target = opts.url.to_string();
        let mut store = Store::new(&opts.url, true)?;
        match store.connect().await {
            Ok(()) => {
                info!(archive = %target, "archiving articles; each is acknowledged once stored")
            }
            Err(e) if retry => warn!(archive = %target, "{e}; retrying in the background"),
            Err(e) => return Err(e),
        }
        let (entries, input) = mpsc::channel(MAX_WAITING);
        let (output, commits) = mpsc::unbounded_channel();
        let writer = Writer {
            store,
            target: target.clone(),
            batch_max: opts.batch_max.max(1),
            linger: opts.linger,
            input,
            output,
        };
        Ok(Self {
            target,
            entries: Some(entries),
            commits,
            writer: tokio::spawn(writer.run()),
            acks: AckTracker::default(),
            refusals: Repeats::default(),
            overflow: Repeats::default(),
            archived: 0,
            refused: 0,
        })
    }

    /// A message received: its row goes to the writer, and its PUBACK waits for it.
    pub(crate) fn on_publish(&mut self, publish: &Publish, payload: &Payload) {
        let now = OffsetDateTime::now_utc();
        let record = match Record::from_message(&publish.topic, &publish.payload, payload, now) {
            Ok(record) => record,
            Err(Refusal(reason)) => {
                self.refused += 1;
                if let Some(others) = self.refusals.due() {
                    warn!(
                        topic = %publish.topic,
                        "message not archived: {reason}; acknowledged, so it is not sent again{}",
                        others_since(others)
                    );
                }
                self.acks.after_previous(publish);
                return;
            }
        };
        let Some(entries) = &self.entries else {
            return; // Closing: the broker sends it again next time.
        };
        let entry = Entry {
            seq: self.acks.next_seq(),
            record,
        };
        match entries.try_send(entry) {
            Ok(()) => self.acks.after_row(publish),
            Err(_) => {
                if let Some(others) = self.overflow.due() {
                    warn!(
                        archive = %self.target,
                        topic = %publish.topic,
                        "{MAX_WAITING} articles already wait for the archive; this one is left unacknowledged and the broker sends it again on the next connection{}",
                        others_since(others)
                    );
                }
            }
        }
    }

    /// The writer's next result; cancel-safe. `None` once the writer has ended.
    pub(crate) async fn next_commit(&mut self) -> Option<Commit> {
        self.commits.recv().await
    }

    /// Applies a commit; returns the ids stored.
    pub(crate) fn on_commit(&mut self, commit: Commit) -> Vec<String> {
        self.archived += commit.inserted;
        for (id, reason) in &commit.refused {
            self.refused += 1;
            if let Some(others) = self.refusals.due() {
                warn!(archive = %self.target, id = %id, "article not archived, the database refused it: {reason}; acknowledged{}", others_since(others));
            }
        }
        self.acks.resolved(commit.upto);
        commit.stored
    }

    /// Hands due PUBACKs to rumqttc (as many as its queue takes now).
    pub(crate) fn pump(&mut self, client: &AsyncClient) {
        self.acks.pump(client);
    }

    /// A new connection: the old one's unacknowledged messages come again.
    pub(crate) fn new_connection(&mut self) {
        self.acks.new_connection();
    }

    /// PUBACKs due and not yet handed to rumqttc.
    pub(crate) fn acks_due(&self) -> usize {
        self.acks.due()
    }

    /// PUBACKs owed, due or waiting for rows.
    pub(crate) fn acks_owed(&self) -> usize {
        self.acks.owed()
    }

    /// Takes no more rows; the writer commits those it has, then ends.
    pub(crate) fn close_input(&mut self) {
        self.entries = None;
    }

    /// At a graceful stop: takes no more rows, waits (bounded) for the writer to commit
    /// those it has and hands their PUBACKs to the session, which the caller then
    /// disconnects (DISCONNECT goes after them). What is left is sent again by the broker.
    pub(crate) async fn drain(
        &mut self,
        mut session: Option<&mut Session>,
        events: &Option<mpsc::UnboundedSender<ClientEvent>>,
    ) {
        self.close_input();
        let deadline = Instant::now() + DRAIN_WAIT;
        let mut writer_done = false;
        loop {
            if let Some(s) = session.as_deref_mut() {
                self.pump(&s.client);
            }
            if writer_done && (session.is_none() || self.acks_due() == 0) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    if !writer_done {
                        warn!(
                            archive = %self.target,
                            "stopping before the archive committed every article received; the broker sends the {} unacknowledged again next time",
                            self.acks_owed()
                        );
                    }
                    return;
                }
                commit = self.commits.recv(), if !writer_done => match commit {
                    Some(c) => {
                        let ids = self.on_commit(c);
                        emit(events, ClientEvent::Archived { ids });
                    }
                    None => writer_done = true,
                },
                event = next_event(&mut session) => {
                    if event.is_err() {
                        session = None;
                    }
                }
            }
        }
    }
}

async fn next_event(session: &mut Option<&mut Session>) -> Result<Event, ConnectionError> {
    match session {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// One warning per `REPEAT_PERIOD`, counting the ones not logged.
#[derive(Default)]
struct Repeats {
    /// When the last line was logged.
    last: Option<Instant>,
    /// Occurrences not logged since.
    silent: u64,
}

impl Repeats {
    /// `Some(occurrences not logged since the last line)` when this one is to be logged.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < REPEAT_PERIOD => {
                self.silent += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.silent))
            }
        }
    }
}

fn others_since(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last such warning)")
    }
}
