//! Packets from the client, one handler per packet. A handler that ends the connection
//! returns the reason as `Err(Close)`; `on_read` closes with it, once.

use super::attachment::AliasError;
use super::close::Close;
use super::delivery::BATCH;
use super::Session;
use crate::message::Message;
use crate::protocol::{reason, Inbound, Outbound, ReadError, SessionExpiry, Version};
use crate::security::acl::Action;
use crate::store::Sent;
use mqtt_common::topic;
use tokio::time::Instant;

impl Session {
    /// Handles the packet read and what else the read brought, up to a batch, then
    /// flushes: everything the batch acknowledges goes out together.
    pub(super) async fn on_read(&mut self, read: Result<Inbound, ReadError>) {
        self.recheck_subscriptions();
        let mut next = read;
        for i in 1..=BATCH {
            let handled = match next {
                Ok(packet) => self.on_packet(packet).await,
                Err(e) => Err(Close::from(e)),
            };
            if let Err(close) = handled {
                self.close(close).await;
                return;
            }
            if i == BATCH || self.conn.as_mut().is_some_and(|c| c.over_budget()) {
                // The rest stays buffered for the next turn of the loop (after the
                // read budget's wait, if that is why).
                break;
            }
            next = match self.conn.as_mut().map(|c| c.framed.try_read()) {
                Some(Ok(Some(packet))) => Ok(packet),
                Some(Ok(None)) | None => break,
                Some(Err(e)) => Err(e),
            };
        }
        self.flush().await;
    }

    /// Handles one packet; `Err` when the connection is to end.
    async fn on_packet(&mut self, packet: Inbound) -> Result<(), Close> {
        if let Some(c) = &mut self.conn {
            let now = Instant::now();
            c.last_seen = now;
            c.charge(now);
        }
        match packet {
            Inbound::Publish {
                message,
                pkid,
                topic_alias,
            } => self.on_publish(message, pkid, topic_alias),
            Inbound::PubAck(pkid) | Inbound::PubComp(pkid) => {
                self.on_delivered(pkid);
                Ok(())
            }
            Inbound::PubRec(pkid) => {
                self.on_pubrec(pkid);
                Ok(())
            }
            Inbound::PubRel(pkid) => {
                self.on_pubrel(pkid);
                Ok(())
            }
            // Messages published earlier in this batch are handed over first, so a
            // subscription change applies only to what follows it.
            Inbound::Subscribe { pkid, filters, id } => {
                self.hand_over().await;
                Box::pin(self.on_subscribe(pkid, filters, id)).await
            }
            Inbound::Unsubscribe { pkid, filters } => {
                self.hand_over().await;
                self.on_unsubscribe(pkid, filters);
                Ok(())
            }
            Inbound::PingReq => {
                let _ = self.send(Outbound::PingResp);
                Ok(())
            }
            Inbound::Disconnect {
                reason,
                session_expiry,
            } => Err(self.on_disconnect(reason, session_expiry)),
            Inbound::Unexpected(what) => Err(Close::violation(
                reason::PROTOCOL_ERROR,
                format!("unexpected {what}"),
            )),
        }
    }

    fn on_publish(
        &mut self,
        mut message: Message,
        pkid: u16,
        alias: Option<u16>,
    ) -> Result<(), Close> {
        if let (Some(alias), Some(conn)) = (alias, self.conn.as_mut()) {
            conn.alias_incoming(&mut message, alias)
                .map_err(|e| match e {
                    AliasError::OutOfRange => {
                        Close::violation(reason::TOPIC_ALIAS_INVALID, "topic alias out of range")
                    }
                    AliasError::Unknown => {
                        Close::violation(reason::PROTOCOL_ERROR, "unknown topic alias")
                    }
                })?;
        }
        if !topic::valid_name(&message.topic) {
            let why = format!("invalid topic name {:?} in PUBLISH", message.topic);
            return Err(Close::violation(reason::TOPIC_NAME_INVALID, why));
        }
        if let Some(why) = self.topic_over_limits(&message.topic) {
            return Err(Close::violation(reason::TOPIC_NAME_INVALID, why));
        }
        if message.qos == 2 && self.qos2_in.contains(&pkid) {
            // A resent QoS 2 PUBLISH we already routed: acknowledge only.
            let _ = self.send(Outbound::PubRec {
                pkid,
                reason: reason::SUCCESS,
            });
            return Ok(());
        }
        let receive_maximum = self.shared.config.session.receive_maximum;
        if message.qos == 2 && self.qos2_in.len() >= usize::from(receive_maximum) {
            // MQTT-3.3.4-9: more than the Receive Maximum told in CONNACK.
            let why = format!(
                "more than {receive_maximum} QoS 2 messages awaiting PUBREL (session.receive_maximum)"
            );
            return Err(Close::violation(reason::RECEIVE_MAXIMUM_EXCEEDED, why));
        }
        self.shared.metrics.received(message.qos);
        let acl = self.shared.policy.acl();
        // `$` topics belong to the broker ($SYS): no client publishes there.
        if message.topic.starts_with('$')
            || !acl
                .check_publish(&self.key.identity, &self.key.client_id, &message.topic)
                .allowed()
        {
            self.deny_publish(&message, pkid);
            return Ok(());
        }
        if let Some(p) = message.properties.as_mut() {
            // Only the broker sets these, per subscriber.
            p.subscription_identifiers.clear();
        }
        let qos = message.qos;
        self.route(message).map_err(|_| Close::StorageFailure)?;
        let ack = match qos {
            1 => Outbound::PubAck {
                pkid,
                reason: reason::SUCCESS,
            },
            2 => {
                self.qos2_in.insert(pkid);
                self.qos2_routed(pkid);
                Outbound::PubRec {
                    pkid,
                    reason: reason::SUCCESS,
                }
            }
            _ => return Ok(()),
        };
        let _ = self.send(ack);
        Ok(())
    }

    /// A PUBLISH the ACL denies: not delivered, not retained. MQTT 5 says so in its
    /// acknowledgement; 3.1.1 acknowledges and drops, as Mosquitto does, having no
    /// code for it.
    fn deny_publish(&mut self, message: &Message, pkid: u16) {
        self.log_denial(Action::Publish, &message.topic);
        let code = match self.version() {
            Version::V5 => reason::NOT_AUTHORIZED,
            Version::V311 => reason::SUCCESS,
        };
        let ack = match message.qos {
            1 => Outbound::PubAck { pkid, reason: code },
            2 => {
                if code == reason::SUCCESS {
                    self.qos2_in.insert(pkid);
                }
                Outbound::PubRec { pkid, reason: code }
            }
            _ => return,
        };
        let _ = self.send(ack);
    }

    /// PUBACK or PUBCOMP: delivered; the window has room for the next.
    fn on_delivered(&mut self, pkid: u16) {
        if let Some(owed) = self.outgoing.acknowledged(pkid) {
            if let Some(seq) = owed.seq {
                if owed.message.qos == 2 {
                    self.qos2_completed(seq, owed.id);
                }
                self.release(owed.id);
            }
        }
        self.pump();
    }

    /// PUBREC: the client has the message; release it.
    fn on_pubrec(&mut self, pkid: u16) {
        if let Some((id, true)) = self.outgoing.received(pkid) {
            // The PUBREL resumes after a restart, rather than the PUBLISH again.
            self.record_qos2_out(
                id,
                Some(Sent::InFlight {
                    pkid,
                    released: true,
                }),
            );
            self.needs_sync = true;
        }
        let _ = self.send(Outbound::PubRel { pkid });
    }

    /// PUBREL: the client releases a QoS 2 message it sent; complete it.
    fn on_pubrel(&mut self, pkid: u16) {
        if self.qos2_in.remove(&pkid) {
            self.qos2_released(pkid);
        }
        let _ = self.send(Outbound::PubComp { pkid });
    }

    /// DISCONNECT, with the session expiry the client may change (MQTT 5 §3.14.2.2.2).
    fn on_disconnect(&mut self, code: u8, session_expiry: Option<SessionExpiry>) -> Close {
        if let Some(expiry) = session_expiry {
            if !self.expiry.is_persistent() && expiry.is_persistent() {
                return Close::violation(
                    reason::PROTOCOL_ERROR,
                    "session expiry set on DISCONNECT after 0 on CONNECT",
                );
            }
            self.expiry = expiry;
            self.became(expiry);
        }
        Close::Disconnected {
            with_will: code == reason::DISCONNECT_WITH_WILL,
        }
    }

    pub(super) fn version(&self) -> Version {
        self.conn.as_ref().map_or(Version::V311, |c| c.version)
    }
}
