//! What this session publishes: a retained message stored (durable before it is
//! acknowledged), every message handed to the subscriber sessions' inboxes (waiting
//! for room where one is full), and to the router while `$share` groups exist.

use super::Session;
use crate::message::{now_micros, Envelope, Message};
use crate::routing::fanout::{Delivery, HandOver, Outbox};
use crate::routing::router;
use crate::store::{QueuedMessage, StoreError};
use bytes::Bytes;
use rumqttd::protocol::{self as rp, Packet as RouterPacket};
use std::sync::Arc;
use tracing::error;

impl Session {
    /// Stores a retained message and queues the message for the subscriber sessions
    /// and the router. When the retained message cannot be stored it goes nowhere.
    pub(super) fn route(&mut self, mut message: Message) -> Result<(), StoreError> {
        if message.retain {
            if let Err(e) = self.shared.retained.set(&message) {
                error!(client_id = %self.key.client_id, topic = %message.topic, error = %e,
                    "retained message not stored");
                return Err(e);
            }
            self.needs_sync |= message.qos > 0;
        }
        let envelope = Envelope {
            qos: message.qos,
            retain: message.retain,
            origin: self.id,
            id: self.shared.ids.next(),
            received_at: now_micros(),
            properties: message.properties.take(),
        };
        if self.shared.fanout.has_shared_subscriptions() {
            let publish = rp::Publish::new(
                Bytes::from(message.topic.clone()),
                router::wrap(&envelope, &message.payload),
                false,
            );
            self.to_router.push(RouterPacket::Publish(publish, None));
        }
        self.deliveries.push(Arc::new(Delivery {
            topic: message.topic,
            payload: message.payload,
            envelope,
        }));
        Ok(())
    }

    /// Hands this batch's messages to the subscriber sessions, and stores the QoS 1/2
    /// ones owed to persistent sessions (durable with this batch's flush, before the
    /// publisher's acknowledgements go out): each message once, whatever the
    /// fan-out. Where an inbox is full the publisher waits, and with it its
    /// acknowledgements: it is slowed down, and nothing is dropped.
    pub(super) async fn hand_over(&mut self) {
        if self.deliveries.is_empty() {
            return;
        }
        let store = self.shared.store.clone();
        for delivery in std::mem::take(&mut self.deliveries) {
            let id = delivery.envelope.id;
            let mut staged = None;
            let HandOver {
                full,
                ended,
                mut ended_stored,
                mut recipients,
            } = self.shared.fanout.hand_over(&delivery, |n| {
                // Its recipients, and this session until it has written it; they read
                // it staged until then.
                let queued = Arc::new(queued_message(&delivery));
                store.stage(id, n + 1, queued.clone());
                staged = Some(queued);
            });
            for _ in 0..ended {
                self.lost_to_ended_session(&delivery.topic);
            }
            for (outbox, store_id) in full {
                self.shared.metrics.publisher_waits.inc();
                match self
                    .wait_for_room(&outbox, delivery.clone(), store_id != 0)
                    .await
                {
                    Some(Some(seq)) => recipients.push((store_id, seq)),
                    Some(None) => {}
                    None => ended_stored += u32::from(store_id != 0),
                }
            }
            let Some(queued) = staged else {
                continue;
            };
            for _ in 0..ended_stored {
                self.release(id);
            }
            if recipients.is_empty() {
                store.unstage(id);
            } else {
                // Its index entries go with the group commit this session's
                // acknowledgements wait for.
                match store.queue_message(id, &queued, &recipients) {
                    Ok(()) => self.needs_sync = true,
                    Err(e) => {
                        error!(client_id = %self.key.client_id, topic = %delivery.topic,
                            error = %e, "message not stored for persistent sessions: not acknowledged");
                        self.store_broken = true;
                    }
                }
            }
            // This session's own hold, now that the record is written.
            self.release(id);
        }
        // The subscriber sessions just woken run first, on this thread, and write to
        // their clients before this session writes its acknowledgements.
        tokio::task::yield_now().await;
    }

    /// Waits for room in a full inbox and hands `delivery` over (its sequence number
    /// when `stored`); None when the session ended meanwhile (counted as lost).
    async fn wait_for_room(
        &mut self,
        outbox: &Outbox,
        delivery: Arc<Delivery>,
        stored: bool,
    ) -> Option<Option<u64>> {
        // One reservation for the whole wait: made again, it would lose its place in line.
        let topic = delivery.topic.clone();
        let hand = outbox.hand(delivery, stored);
        tokio::pin!(hand);
        loop {
            tokio::select! {
                handed = &mut hand => {
                    return match handed {
                        Ok(seq) => Some(seq),
                        Err(()) => {
                            self.lost_to_ended_session(&topic);
                            None
                        }
                    };
                }
                // Our own inbox keeps draining meanwhile: two sessions publishing to
                // each other never wait on each other for ever.
                Some(incoming) = self.inbox.recv() => self.accept(incoming),
            }
        }
    }
}

/// `delivery` as the store keeps it.
fn queued_message(delivery: &Delivery) -> QueuedMessage {
    QueuedMessage {
        message: Message {
            topic: delivery.topic.clone(),
            payload: delivery.payload.clone(),
            qos: delivery.envelope.qos,
            retain: delivery.envelope.retain,
            properties: delivery.envelope.properties.clone(),
        },
        origin: delivery.envelope.origin,
        received_at: delivery.envelope.received_at,
        recipients: Vec::new(),
    }
}
