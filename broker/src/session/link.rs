//! The session's link to rumqttd's router, used only for `$share` groups: made on the
//! first packet for the router, so that an idle session costs the router nothing; fed
//! in batches; drained promptly; unregistered when the session ends.

use super::Session;
use crate::routing::router;
use futures_util::FutureExt;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{self as rp, Packet as RouterPacket};
use rumqttd::Notification;
use tracing::error;

/// Router notifications drained before one flush.
const BATCH: usize = 256;

/// Both halves of a link to the router.
pub(super) struct RouterLink {
    tx: LinkTx,
    rx: LinkRx,
}

/// The router refused a link, or the link failed: what was to go through it did not.
#[derive(Debug, thiserror::Error)]
pub(super) enum RouterError {
    #[error("router refused a session link: {0}")]
    Refused(String),
    #[error("router link failed: {0}")]
    Failed(String),
}

/// The router dropped the link, or it failed.
pub(super) struct LinkLost;

/// A QoS 0 subscription in the router: QoS and retained messages are the edge's.
pub(super) fn router_subscribe(filter: &str) -> RouterPacket {
    RouterPacket::Subscribe(
        rp::Subscribe {
            pkid: 0,
            filters: vec![rp::Filter {
                path: filter.into(),
                qos: rp::QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: rp::RetainForwardRule::Never,
            }],
        },
        None,
    )
}

pub(super) fn router_unsubscribe(filter: String) -> RouterPacket {
    RouterPacket::Unsubscribe(
        rp::Unsubscribe {
            pkid: 0,
            filters: vec![filter],
        },
        None,
    )
}

/// The next router notification, or never when there is no link yet.
pub(super) async fn link_next(
    link: &mut Option<Box<RouterLink>>,
) -> Result<Option<Notification>, LinkError> {
    match link {
        Some(link) => link.rx.next().await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// Hands the batch to the router, making the link first if needed. On failure the
    /// batch is dropped, and must not be acknowledged.
    pub(super) async fn flush_router(&mut self) -> Result<(), RouterError> {
        if self.to_router.is_empty() {
            return Ok(());
        }
        if self.link.is_none() {
            let router = self.shared.router.clone();
            let link_id = format!("s{}", self.id);
            let made = tokio::task::spawn_blocking(move || router.link(&link_id))
                .await
                .map_err(|e| e.to_string())
                .and_then(|made| made);
            match made {
                Ok((tx, rx)) => self.link = Some(Box::new(RouterLink { tx, rx })),
                Err(why) => {
                    error!(identity = %self.key.identity, client_id = %self.key.client_id,
                        error = %why, "router refused a session link");
                    self.to_router.clear();
                    return Err(RouterError::Refused(why));
                }
            }
        }
        let (Some(link), Some(last)) = (self.link.as_mut(), self.to_router.pop()) else {
            return Ok(());
        };
        link.tx.buffer().extend(self.to_router.drain(..));
        // One notification for the whole batch.
        if let Err(e) = link.tx.send(last).await {
            error!(client_id = %self.key.client_id, error = %e, "router link failed");
            return Err(RouterError::Failed(e.to_string()));
        }
        Ok(())
    }

    /// Drains router notifications. Not async: a notification is large, and no
    /// session's future should have room for one.
    pub(super) fn on_link(
        &mut self,
        first: Result<Option<Notification>, LinkError>,
    ) -> Result<(), LinkLost> {
        self.recheck_subscriptions();
        let mut wake = false;
        let mut next = first;
        for i in 1..=BATCH {
            match next {
                Ok(Some(Notification::Forward(forward))) => self.on_forward(forward.publish),
                Ok(Some(Notification::Unschedule)) => wake = true,
                Ok(Some(Notification::Disconnect(..))) => {
                    error!(client_id = %self.key.client_id, "router disconnected the session link");
                    return Err(LinkLost);
                }
                Ok(_) => {}
                Err(e) => {
                    error!(client_id = %self.key.client_id, error = %e, "router link failed");
                    return Err(LinkLost);
                }
            }
            if i == BATCH {
                // The rest stays in the link for the next turn of the loop.
                break;
            }
            let Some(link) = self.link.as_mut() else {
                break;
            };
            next = match link.rx.next().now_or_never() {
                Some(n) => n,
                None => break,
            };
        }
        if wake {
            // `ready` rather than `wake`: the same send on the same bounded channel as
            // `LinkTx::send`, without an `Event`-sized future in every session's state.
            let woken = match self.link.as_ref() {
                Some(link) => link.rx.ready(),
                None => Ok(()),
            };
            if let Err(e) = woken {
                error!(client_id = %self.key.client_id, error = %e, "router link failed");
                return Err(LinkLost);
            }
        }
        Ok(())
    }

    /// A message of a shared subscription, from the router.
    fn on_forward(&mut self, publish: rp::Publish) {
        let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
            return;
        };
        let Some((envelope, payload)) = router::unwrap(publish.payload) else {
            error!(topic = %topic, "message without envelope from the router; dropped");
            return;
        };
        // Through the router, `$share` messages are not stored: a group's member is
        // chosen as the message arrives.
        self.offer(topic, payload, envelope, None);
    }

    /// The only public way to unregister a link from the router: a link merely
    /// dropped stays registered for ever.
    pub(super) async fn unregister_link(&mut self) {
        let disconnect = RouterPacket::Disconnect(
            rp::Disconnect {
                reason_code: rp::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        if let Some(link) = self.link.as_mut() {
            if let Err(e) = link.tx.send(disconnect).await {
                error!(client_id = %self.key.client_id, error = %e, "could not unregister router link");
            }
        }
    }
}
