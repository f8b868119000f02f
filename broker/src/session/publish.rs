//! What this session publishes: a retained message stored (durable before it is
//! acknowledged), every message handed to the subscriber sessions' inboxes (waiting
//! for room where one is full), and to the router while `$share` groups exist.

use super::Session;
use crate::message::{now_micros, Envelope, Message};
use crate::routing::fanout::{Delivery, HandOver, Handed, Outbox};
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

    /// Hands this batch's messages to the subscriber sessions, after storing the QoS
    /// 1/2 ones owed to persistent sessions (durable with this batch's flush, before
    /// the publisher's acknowledgements go out). Where an inbox is full the publisher
    /// waits, and with it its acknowledgements: it is slowed down, and nothing is
    /// dropped.
    pub(super) async fn hand_over(&mut self) {
        if self.deliveries.is_empty() {
            return;
        }
        for delivery in std::mem::take(&mut self.deliveries) {
            let store = &self.shared.store;
            let stored = self.shared.fanout.hand_over(&delivery, |store_ids| {
                let queued = QueuedMessage {
                    message: Message {
                        topic: delivery.topic.clone(),
                        payload: delivery.payload.clone(),
                        qos: delivery.envelope.qos,
                        retain: delivery.envelope.retain,
                        properties: delivery.envelope.properties.clone(),
                    },
                    origin: delivery.envelope.origin,
                    received_at: delivery.envelope.received_at,
                };
                store.put_queued(delivery.envelope.id, &queued, store_ids)
            });
            let HandOver { full, ended, .. } = match stored {
                Ok(outcome) => {
                    self.needs_sync |= outcome.stored;
                    outcome
                }
                Err(e) => {
                    error!(client_id = %self.key.client_id, topic = %delivery.topic, error = %e,
                        "message not stored for persistent sessions: not acknowledged");
                    self.store_broken = true;
                    continue;
                }
            };
            for _ in 0..ended {
                self.lost_to_ended_session(&delivery.topic);
            }
            for (outbox, handed) in full {
                self.shared.metrics.publisher_waits.inc();
                self.wait_for_room(&outbox, handed).await;
            }
        }
        // The subscriber sessions just woken run first, on this thread, and write to
        // their clients before this session writes its acknowledgements.
        tokio::task::yield_now().await;
    }

    async fn wait_for_room(&mut self, outbox: &Outbox, handed: Handed) {
        // One reservation for the whole wait: made again, it would lose its place in line.
        let reserve = outbox.reserve();
        tokio::pin!(reserve);
        loop {
            tokio::select! {
                permit = &mut reserve => {
                    match permit {
                        Ok(permit) => permit.send(handed),
                        Err(_) => self.lost_to_ended_session(&handed.delivery.topic),
                    }
                    return;
                }
                // Our own inbox keeps draining meanwhile: two sessions publishing to
                // each other never wait on each other for ever.
                Some(incoming) = self.inbox.recv() => self.accept(incoming),
            }
        }
    }
}
