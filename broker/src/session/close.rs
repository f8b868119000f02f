//! How a connection ends. Every reason is a `Close`, and `Session::close` turns it into
//! its DISCONNECT (MQTT 5), its log line and its metric, in this one place; the will is
//! published or scheduled here too.

use super::Session;
use crate::message::Will;
use crate::protocol::{reason, ReadError, Version};
use crate::security::refusal::Refusal;
use std::borrow::Cow;
use std::collections::HashSet;
use tokio::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Why a connection ends.
#[derive(Debug)]
pub(super) enum Close {
    /// The client sent DISCONNECT; `with_will` for reason 0x04.
    Disconnected {
        with_will: bool,
    },
    /// The client closed its socket without DISCONNECT.
    SocketClosed,
    /// Reading the socket failed.
    Lost(String),
    /// Handing writes to the socket failed.
    WriteFailed(String),
    /// The client broke the protocol: told why (MQTT 5), logged at WARN.
    Violation {
        code: u8,
        why: String,
    },
    KeepAliveTimeout,
    /// The client left its queue full for `slow_consumer_secs`: its publishers waited.
    SlowConsumer,
    /// A new connection took the session over.
    TakenOver,
    ShuttingDown,
    /// A reloaded CRL revokes the client's certificate.
    Revoked,
    /// The store failed: nothing in this batch is acknowledged, the client resends.
    StorageFailure,
    /// The router refused a link or a batch: nothing in it is acknowledged.
    RouterUnavailable,
    /// The router dropped this session's link.
    RouterLinkLost,
}

impl Close {
    /// The MQTT 5 DISCONNECT reason sent to the client; None: the socket just closes.
    fn code(&self) -> Option<u8> {
        match self {
            Self::Disconnected { .. }
            | Self::SocketClosed
            | Self::Lost(_)
            | Self::WriteFailed(_) => None,
            Self::Violation { code, .. } => Some(*code),
            Self::KeepAliveTimeout => Some(reason::KEEP_ALIVE_TIMEOUT),
            Self::SlowConsumer => Some(reason::QUOTA_EXCEEDED),
            Self::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            Self::ShuttingDown => Some(reason::SERVER_SHUTTING_DOWN),
            Self::Revoked => Some(reason::NOT_AUTHORIZED),
            Self::StorageFailure | Self::RouterUnavailable | Self::RouterLinkLost => {
                Some(reason::UNSPECIFIED)
            }
        }
    }

    /// Whether the will is published (MQTT: on every close but DISCONNECT; a takeover
    /// or shutdown keeps the session, so its will waits).
    fn with_will(&self) -> bool {
        match self {
            Self::Disconnected { with_will } => *with_will,
            Self::TakenOver | Self::ShuttingDown => false,
            _ => true,
        }
    }

    /// Whether acknowledgements queued in this batch must not go out.
    fn discards_acks(&self) -> bool {
        matches!(self, Self::StorageFailure | Self::RouterUnavailable)
    }

    /// The reason in the log line.
    fn why(&self) -> Cow<'_, str> {
        match self {
            Self::Disconnected { .. } => "client disconnected".into(),
            Self::SocketClosed => "connection closed by client".into(),
            Self::Lost(e) => format!("connection lost: {e}").into(),
            Self::WriteFailed(e) => format!("write failed: {e}").into(),
            Self::Violation { why, .. } => why.as_str().into(),
            Self::KeepAliveTimeout => "keep alive timeout".into(),
            Self::SlowConsumer => "slow consumer: its queue stayed full".into(),
            Self::TakenOver => "session taken over by a new connection".into(),
            Self::ShuttingDown => "broker shutting down".into(),
            Self::Revoked => "certificate revoked".into(),
            Self::StorageFailure => "storage failure: publish not acknowledged".into(),
            Self::RouterUnavailable => "router unavailable: nothing acknowledged".into(),
            Self::RouterLinkLost => "router link lost".into(),
        }
    }

    /// The `reason` label of `broker_disconnections_total`.
    fn label(&self) -> &'static str {
        match self {
            Self::Disconnected { .. } => "client_disconnect",
            Self::SocketClosed => "socket_closed",
            Self::Lost(_) => "connection_lost",
            Self::WriteFailed(_) => "write_failed",
            Self::Violation { .. } => "protocol_violation",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::TakenOver => "taken_over",
            Self::ShuttingDown => "shutting_down",
            Self::Revoked => "revoked",
            Self::StorageFailure => "storage_failure",
            Self::RouterUnavailable => "router_unavailable",
            Self::RouterLinkLost => "router_link_lost",
        }
    }

    pub(super) fn violation(code: u8, why: impl Into<String>) -> Self {
        Self::Violation {
            code,
            why: why.into(),
        }
    }
}

impl From<ReadError> for Close {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Closed => Self::SocketClosed,
            ReadError::Io(e) => Self::Lost(e.to_string()),
            ReadError::TooLarge { size, max } => Self::violation(
                reason::PACKET_TOO_LARGE,
                Refusal::PacketTooLarge { size, max }.to_string(),
            ),
            ReadError::Malformed(why) => {
                Self::violation(reason::MALFORMED, format!("malformed packet: {why}"))
            }
        }
    }
}

impl Session {
    /// Closes the socket, keeping the session; the will is published, or scheduled
    /// for its delay, unless the reason says otherwise.
    pub(super) async fn close(&mut self, reason: Close) {
        // Boxed, as are the other rare paths: a future is as large as its largest
        // state, and every idle session would carry this one's.
        Box::pin(self.close_now(reason)).await;
    }

    async fn close_now(&mut self, reason: Close) {
        if matches!(reason, Close::StorageFailure) {
            // The store failed: waiting on it again would fail again.
            self.needs_sync = false;
        }
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Every path that takes the connection comes through here: the engine's window
        // closes with it.
        self.outgoing.detach();
        self.shared.metrics.closed(reason.label());
        match &reason {
            Close::Violation { why, .. } => {
                warn!(identity = %conn.identity, client_id = %conn.client_id, addr = %conn.addr,
                    reason = %why, "connection closed for a protocol violation");
            }
            Close::SlowConsumer => {
                warn!(identity = %conn.identity, client_id = %conn.client_id, addr = %conn.addr,
                    queued = self.outgoing.queued(),
                    secs = self.shared.config.session.slow_consumer_secs,
                    "client disconnected as a slow consumer: it stopped reading and its queue stayed full");
            }
            Close::Revoked => {
                let serial = conn.serial_hex();
                warn!(identity = %conn.identity, client_id = %conn.client_id, addr = %conn.addr,
                    serial = %serial, reason = "revoked certificate",
                    "connection closed: its certificate was revoked");
                self.shared.metrics.refused(&Refusal::Revoked(serial));
            }
            _ => {}
        }
        if reason.discards_acks() {
            conn.framed.discard_pending();
        }
        // Acknowledgements queued in this batch go out with the close: what they
        // acknowledge is handed over first, and made durable where it must be.
        self.hand_over().await;
        self.record_qos2_routed();
        let routed = self.flush_router().await.is_ok();
        let synced = !std::mem::take(&mut self.store_broken)
            && (!std::mem::take(&mut self.needs_sync) || self.shared.retained.sync().await.is_ok());
        if !routed || !synced {
            conn.framed.discard_pending();
        }
        if let (Some(code), Version::V5) = (reason.code(), conn.version) {
            let _ = conn
                .framed
                .queue(crate::protocol::Outbound::Disconnect { reason: code });
        }
        conn.framed.shutdown();
        info!(identity = %conn.identity, client_id = %conn.client_id, addr = %conn.addr,
            reason = %reason.why(), "client disconnected");
        if reason.with_will() {
            if let Some(will) = conn.will.take() {
                self.will_after_close(will).await;
            }
        }
        if let Some(limit) = self.expiry.limit() {
            self.expires_at = Some(Instant::now() + limit);
        }
    }

    /// Publishes the will now, or at the end of its MQTT 5 Will Delay: when the delay
    /// or the session ends, whichever comes first; a reconnection cancels it.
    async fn will_after_close(&mut self, will: Will) {
        if will.delay_secs > 0 && self.expiry.is_persistent() {
            let delay = will.delay_secs.min(self.expiry.secs());
            let at = Instant::now() + Duration::from_secs(delay.into());
            let topic = will.message.topic.clone();
            self.pending_will = Some((at, will));
            // Due even if the broker restarts meanwhile, a crash included.
            self.save();
            if let Err(e) = self.shared.retained.sync().await {
                error!(identity = %self.key.identity, client_id = %self.key.client_id,
                    error = %e, "delayed will not made durable: a crash now would lose it");
            }
            info!(identity = %self.key.identity, client_id = %self.key.client_id,
                topic = %topic, delay_secs = delay, "will delayed: published when its delay ends unless the client returns");
        } else {
            self.publish_will(will).await;
        }
    }

    pub(super) async fn publish_will(&mut self, will: Will) {
        let topic = will.message.topic.clone();
        let stored = self.route(will.message);
        // Nobody waits for a will's acknowledgement: no flush to wait for.
        self.needs_sync = false;
        self.hand_over().await;
        let flushed = self.flush_router().await;
        // Each failure was logged where it happened; these say what it cost.
        if stored.is_err() {
            warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                topic = %topic, "will not published: its retained copy could not be stored");
        } else if flushed.is_err() {
            warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                topic = %topic, "will not published to shared subscriptions: router unavailable");
        } else {
            info!(identity = %self.key.identity, client_id = %self.key.client_id,
                topic = %topic, "will published");
        }
    }

    /// Closes the connection if its certificate is among `serials`.
    pub(super) async fn close_if_revoked(&mut self, serials: &HashSet<Vec<u8>>) {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| serials.contains(&c.serial))
        {
            self.close(Close::Revoked).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_has_its_code_will_and_log() {
        let cases = [
            (Close::Disconnected { with_will: false }, None, false),
            (Close::Disconnected { with_will: true }, None, true),
            (Close::SocketClosed, None, true),
            (Close::KeepAliveTimeout, Some(0x8D), true),
            (Close::SlowConsumer, Some(0x97), true),
            (Close::TakenOver, Some(0x8E), false),
            (Close::ShuttingDown, Some(0x8B), false),
            (Close::Revoked, Some(0x87), true),
            (Close::StorageFailure, Some(0x80), true),
            (
                Close::violation(0x82, "unexpected CONNACK"),
                Some(0x82),
                true,
            ),
        ];
        for (close, code, will) in cases {
            assert_eq!(close.code(), code, "{close:?}");
            assert_eq!(close.with_will(), will, "{close:?}");
            assert!(!close.why().is_empty() && !close.label().is_empty());
        }
        assert!(Close::StorageFailure.discards_acks() && Close::RouterUnavailable.discards_acks());
        assert!(!Close::KeepAliveTimeout.discards_acks());
    }

    #[test]
    fn read_errors_become_violations_or_losses() {
        let too_large = Close::from(ReadError::TooLarge { size: 9, max: 2 });
        assert_eq!(too_large.code(), Some(reason::PACKET_TOO_LARGE));
        assert!(too_large.why().contains("packet too large"));
        let malformed = Close::from(ReadError::Malformed("bad flags".into()));
        assert_eq!(malformed.why(), "malformed packet: bad flags");
        assert!(matches!(
            Close::from(ReadError::Closed),
            Close::SocketClosed
        ));
    }
}
