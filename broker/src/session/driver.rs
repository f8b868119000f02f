//! The session task: waits on everything that can happen to a session (its client,
//! its inbox, its router link, `$SYS`, the registry, its timers), ends a batch with one
//! flush, and on the way out hands over, saves and unregisters what it holds.

use super::close::Close;
use super::link::link_next;
use super::subscriptions::Place;
use super::{attachment::read_attached, Session, Start};
use crate::ids::SessionKey;
use crate::protocol::{ConnectCode, Outbound};
use crate::routing::fanout::{self, Handed};
use crate::shared::registry::{Attached, Client, Control};
use crate::shared::Shared;
use rumqttd::local::LinkError;
use rumqttd::Notification;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tracing::{error, info};

/// At shutdown, the router is considered drained after this long without a message...
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// ...or after this long in all.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// What the shutdown drain took in.
enum Drained {
    Inbox(Handed),
    Link(Box<Result<Option<Notification>, LinkError>>),
}

/// Why `serve` returned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The session ended: clean session closed, expired, or its link lost.
    Ended,
    /// The broker is stopping: a persistent session is saved with its queue.
    Shutdown,
}

/// Hands an accepted connection to its live session, or starts one for it.
pub(crate) fn hand_over(shared: &Arc<Shared>, key: SessionKey, client: Box<Client>) {
    let new_id = shared.ids.next();
    if let Attached::New { client, id, rx } = shared.registry.attach(key.clone(), client, new_id) {
        // A task of its own rather than awaited by the caller: a connection's task
        // was sized for the TLS handshake, which an idle session would otherwise
        // carry for life.
        tokio::spawn(run(shared.clone(), key, id, Start::Client(client), rx));
    }
}

/// Runs a session until it ends, then unregisters it.
pub(crate) async fn run(
    shared: Arc<Shared>,
    key: SessionKey,
    id: u64,
    start: Start,
    ctrl: mpsc::UnboundedReceiver<Control>,
) {
    let (mut client, mut restored) = (None, None);
    let (outbox, inbox) = match start {
        Start::Client(c) => {
            client = Some(c);
            fanout::inbox(shared.config.session.inbox)
        }
        Start::Restored(r) => {
            let super::Restored {
                record,
                queue,
                outbox,
                inbox,
            } = *r;
            restored = Some((record, queue));
            (outbox, inbox)
        }
    };
    let mut session = Session::new(shared, key, id, ctrl, outbox, inbox);
    if let Some(client) = client {
        session.attach(client, true).await;
    } else if let Some((record, queue)) = restored {
        session.restore(record, queue).await;
    }
    let exit = 'serving: loop {
        if session.serve().await == Exit::Shutdown {
            break Exit::Shutdown;
        }
        loop {
            let next = session
                .shared
                .registry
                .finish(&session.key, session.id, &mut session.ctrl);
            match next {
                // A client arrived just as the session ended: it starts afresh.
                Some(Control::Attach(client)) => {
                    session.reset();
                    session.attach(client, true).await;
                    continue 'serving;
                }
                Some(Control::Shutdown) => break 'serving Exit::Shutdown,
                // Nothing to close: ask again.
                Some(Control::Revoked(_)) => continue,
                None => break 'serving Exit::Ended,
            }
        }
    };
    session.teardown(exit).await;
    if exit == Exit::Shutdown {
        // Saved before unregistering: shutdown flushes the store once all are gone.
        while let Some(control) =
            session
                .shared
                .registry
                .finish(&session.key, session.id, &mut session.ctrl)
        {
            if let Control::Attach(client) = control {
                refuse_unavailable(client);
            }
        }
    }
}

fn refuse_unavailable(client: Box<Client>) {
    let mut client = *client;
    let _ = client.framed.queue(Outbound::ConnAck {
        session_present: false,
        code: ConnectCode::ServerUnavailable,
        properties: None,
    });
    client.framed.shutdown();
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// Serves until the session should end: clean session closed, expired, or shutdown.
    async fn serve(&mut self) -> Exit {
        loop {
            let keep_alive = self.conn.as_ref().and_then(|c| c.deadline());
            // A connected client whose queue stays full holds its publishers back.
            if self.conn.is_some() && self.outgoing.full() {
                self.full_since.get_or_insert_with(Instant::now);
            } else {
                self.full_since = None;
            }
            let patience = Duration::from_secs(self.shared.config.session.slow_consumer_secs);
            let slow_consumer = self.full_since.map(|since| since + patience);
            let expiry = if self.conn.is_none() {
                self.expires_at
            } else {
                None
            };
            tokio::select! {
                control = self.ctrl.recv() => match control {
                    Some(Control::Attach(client)) => Box::pin(self.attach(client, false)).await,
                    Some(Control::Revoked(serials)) => Box::pin(self.close_if_revoked(&serials)).await,
                    Some(Control::Shutdown) | None => {
                        self.close(Close::ShuttingDown).await;
                        Box::pin(self.drain_at_shutdown()).await;
                        return Exit::Shutdown;
                    }
                },
                read = read_attached(&mut self.conn) => {
                    if let Some(read) = read {
                        self.on_read(read).await;
                    }
                }
                Some(first) = self.inbox.recv(), if self.takes_inbox() => {
                    self.on_inbox(first);
                    self.flush().await;
                }
                note = link_next(&mut self.link) => {
                    if self.on_link(note).is_err() {
                        self.close(Close::RouterLinkLost).await;
                        return Exit::Ended;
                    }
                    self.flush().await;
                }
                changed = self.sys.changed(), if self.has_sys_subscription() => {
                    if changed.is_ok() {
                        Box::pin(self.on_sys()).await;
                    }
                }
                _ = sleep_until(self.pending_will.as_ref().map(|(at, _)| *at)) => {
                    if let Some((_, will)) = self.pending_will.take() {
                        Box::pin(self.publish_will(will)).await;
                        self.save();
                    }
                }
                _ = sleep_until(keep_alive) => {
                    self.close(Close::KeepAliveTimeout).await;
                }
                _ = sleep_until(slow_consumer) => {
                    self.close(Close::SlowConsumer).await;
                }
                _ = sleep_until(expiry) => {
                    info!(identity = %self.key.identity, client_id = %self.key.client_id, "session expired");
                    return Exit::Ended;
                }
            }
            self.report_gauges(false);
            if self.conn.is_none() && !self.expiry.is_persistent() {
                return Exit::Ended;
            }
        }
    }

    /// Ends a batch: hands over what was published, makes durable what must be before
    /// its acknowledgement, then writes the acknowledgements and deliveries.
    pub(super) async fn flush(&mut self) {
        self.hand_over().await;
        self.record_qos2_routed();
        if std::mem::take(&mut self.store_broken) {
            self.close(Close::StorageFailure).await;
            return;
        }
        if self.flush_router().await.is_err() {
            self.close(Close::RouterUnavailable).await;
            return;
        }
        if std::mem::take(&mut self.needs_sync) {
            // Durable before acknowledged: the acks wait in the buffer for the flush.
            if let Err(e) = self.shared.retained.sync().await {
                error!(client_id = %self.key.client_id, error = %e, "retained store flush failed");
                self.close(Close::StorageFailure).await;
                return;
            }
        }
        self.write_mark(None);
        let Some(conn) = &mut self.conn else {
            return;
        };
        if conn.framed.has_pending_writes() {
            if let Err(e) = conn.framed.flush() {
                self.close(Close::WriteFailed(e.to_string())).await;
            }
        }
    }

    /// At shutdown: takes in what the inbox and the router still hold for this session
    /// (messages acknowledged to their publishers a moment ago), so it can be saved.
    async fn drain_at_shutdown(&mut self) {
        let deadline = Instant::now() + DRAIN_MAX;
        while Instant::now() < deadline {
            let (link, inbox) = (&mut self.link, &mut self.inbox);
            let next = tokio::time::timeout(DRAIN_IDLE, async move {
                tokio::select! {
                    Some(delivery) = inbox.recv() => Drained::Inbox(delivery),
                    note = link_next(link) => Drained::Link(Box::new(note)),
                }
            });
            match next.await {
                Err(_) => return,
                Ok(Drained::Inbox(delivery)) => self.on_inbox(delivery),
                Ok(Drained::Link(note)) => {
                    if self.on_link(*note).is_err() {
                        return;
                    }
                }
            }
            self.flush().await;
        }
    }

    async fn teardown(&mut self, exit: Exit) {
        self.report_gauges(true);
        // The session ends before the Will Delay: the will goes now.
        if let (Exit::Ended, Some((_, will))) = (exit, self.pending_will.take()) {
            self.publish_will(will).await;
        }
        if exit == Exit::Ended {
            self.expiry = crate::protocol::SessionExpiry::OnClose;
        }
        // Out of the index first, then what the inbox already holds goes into the queue,
        // and only then is the session saved: a message handed over meanwhile is either
        // saved or, the inbox being closed, counted as dropped by its publisher.
        for filter in self
            .subs
            .iter()
            .filter(|(_, s)| s.place == Place::Index)
            .map(|(f, _)| f)
        {
            self.shared.fanout.unsubscribe(filter, self.id);
        }
        self.inbox.close();
        while let Ok(handed) = self.inbox.try_recv() {
            self.accept(handed);
        }
        let unstored = self.outgoing.unstored(std::time::SystemTime::now());
        if self.expiry.is_persistent() {
            // Stopping with the broker: the whole queue is in the store.
            let first = self.outbox.peek_seq();
            self.store_unstored(unstored.into_iter().map(|o| o.message).collect());
            self.write_mark(Some(first));
        } else {
            // Acknowledged to their publishers and never delivered: counted.
            let lost = (unstored.len() + self.drop_stored_queue()) as u64;
            self.dropped += lost;
            self.shared.metrics.dropped.inc_by(lost);
        }
        self.report_drops();
        self.save();
        self.unplace_all();
        // Failures are logged where they happen; the session is ending either way.
        let _ = self.flush_router().await;
        self.unregister_link().await;
    }
}
