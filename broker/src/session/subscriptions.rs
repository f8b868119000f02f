//! A session's subscriptions: SUBSCRIBE and UNSUBSCRIBE (validated, authorized, placed
//! where they are served from), the retained messages a new one receives, the check
//! against a reloaded ACL, and which of them a message matches.

use super::close::Close;
use super::link::{router_subscribe, router_unsubscribe};
use super::outgoing::Owed;
use super::Session;
use crate::protocol::{reason, Outbound, SubRequest, Version};
use crate::security::acl::Action;
use mqtt_common::topic;
use std::collections::HashMap;
use tracing::{debug, warn};

pub(super) struct Subscription {
    /// The QoS granted.
    pub(super) qos: u8,
    /// MQTT 5 No Local: not the session's own messages.
    pub(super) no_local: bool,
    /// MQTT 5 Retain As Published.
    pub(super) retain_as_published: bool,
    /// MQTT 5 Subscription Identifier.
    pub(super) id: Option<usize>,
    pub(super) place: Place,
}

/// Where a subscription is served from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Place {
    /// The fan-out index: plain filters.
    Index,
    /// rumqttd's router: shared subscriptions (`$share/group/filter`).
    Router,
    /// The session itself: `$SYS` filters, fed from the `$SYS` channel.
    Edge,
}

impl Place {
    pub(super) fn of(filter: &str) -> Self {
        if topic::split_shared(filter).is_some() {
            Place::Router
        } else if filter.starts_with('$') {
            Place::Edge
        } else {
            Place::Index
        }
    }
}

/// What a session's subscriptions make of one message.
#[derive(Debug, PartialEq)]
pub(super) struct Matched {
    /// The highest QoS granted among the matching subscriptions.
    pub(super) granted: u8,
    /// How many matched: with more than one, a copy may arrive once per filter.
    pub(super) count: usize,
    pub(super) retain_as_published: bool,
    /// Their subscription identifiers.
    pub(super) ids: Vec<usize>,
}

/// The subscriptions in `subs` that `topic` matches; `own` when the message is the
/// session's own (No Local). None when none does.
pub(super) fn matching(
    subs: &HashMap<String, Subscription>,
    topic: &str,
    own: bool,
) -> Option<Matched> {
    let mut matched: Option<Matched> = None;
    for (filter, sub) in subs {
        if !topic::matches(filter, topic) || (sub.no_local && own) {
            continue;
        }
        let m = matched.get_or_insert(Matched {
            granted: sub.qos,
            count: 0,
            retain_as_published: false,
            ids: Vec::new(),
        });
        m.count += 1;
        m.granted = m.granted.max(sub.qos);
        m.retain_as_published |= sub.retain_as_published;
        m.ids.extend(sub.id);
    }
    matched
}

impl Session {
    pub(super) async fn on_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubRequest>,
        id: Option<usize>,
    ) -> Result<(), Close> {
        let v5 = self.version() == Version::V5;
        let acl = self.shared.policy.acl();
        let mut codes = Vec::with_capacity(filters.len());
        let mut wanted_retained = Vec::new();
        for req in filters {
            let invalid = if topic::valid_filter(&req.filter) {
                self.topic_over_limits(&req.filter)
            } else {
                Some("invalid topic filter".to_string())
            };
            if let Some(why) = invalid {
                if let Some(c) = &self.conn {
                    warn!(identity = %c.identity, client_id = %c.client_id, addr = %c.addr,
                        filter = %req.filter, "subscribe refused: {why}");
                }
                codes.push(if v5 {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    reason::SUB_FAILURE_V4
                });
                continue;
            }
            if !acl
                .check_subscribe(&self.key.identity, &self.key.client_id, &req.filter)
                .allowed()
            {
                self.log_denial(Action::Subscribe, &req.filter);
                codes.push(if v5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::SUB_FAILURE_V4
                });
                continue;
            }
            let max = self.shared.config.session.max_subscriptions;
            if self.subs.len() >= max && !self.subs.contains_key(&req.filter) {
                if let Some(c) = &self.conn {
                    warn!(identity = %c.identity, client_id = %c.client_id, addr = %c.addr,
                        filter = %req.filter, limit = max,
                        "subscribe refused: the session holds as many subscriptions as it may (session.max_subscriptions)");
                }
                codes.push(if v5 {
                    reason::QUOTA_EXCEEDED
                } else {
                    reason::SUB_FAILURE_V4
                });
                continue;
            }
            let place = Place::of(&req.filter);
            let existed = self
                .subs
                .insert(
                    req.filter.clone(),
                    Subscription {
                        qos: req.qos,
                        no_local: req.no_local,
                        retain_as_published: req.retain_as_published,
                        id,
                        place,
                    },
                )
                .is_some();
            if !existed {
                self.place(&req.filter, place);
            }
            codes.push(req.qos);
            let send_retained = place != Place::Router
                && match req.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if send_retained {
                wanted_retained.push((req.filter, req.qos));
            }
        }
        if let Some(c) = &self.conn {
            debug!(identity = %c.identity, client_id = %c.client_id, codes = ?codes, "subscribed");
        }
        let _ = self.send(Outbound::SubAck { pkid, codes });
        if self.expiry.is_persistent() {
            self.save();
        }
        // The subscription is in place before the retained snapshot is taken, so a
        // message published meanwhile arrives live if it is not in the snapshot.
        self.flush_router()
            .await
            .map_err(|_| Close::RouterUnavailable)?;
        for (filter, granted) in wanted_retained {
            for mut message in self.shared.retained.matching(&filter) {
                if self.is_hidden(&message.topic) {
                    continue;
                }
                message.qos = message.qos.min(granted);
                message.retain = true;
                if let Some(id) = id {
                    message
                        .properties
                        .get_or_insert_with(Default::default)
                        .subscription_identifiers = vec![id];
                }
                self.deliver(
                    Owed {
                        id: 0,
                        seq: None,
                        message,
                    },
                    true,
                );
            }
        }
        Ok(())
    }

    pub(super) fn on_unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let mut codes = Vec::with_capacity(filters.len());
        for filter in filters {
            match self.subs.remove(&filter) {
                Some(sub) => {
                    self.unplace(filter, sub.place);
                    codes.push(reason::SUCCESS);
                }
                None => codes.push(reason::NO_SUBSCRIPTION_EXISTED),
            }
        }
        // Always answered here: the router never acknowledges an unknown filter.
        let _ = self.send(Outbound::UnsubAck { pkid, codes });
        if self.expiry.is_persistent() {
            self.save();
        }
    }

    /// Puts a new subscription where it is served from.
    pub(super) fn place(&mut self, filter: &str, place: Place) {
        match place {
            Place::Index => self
                .shared
                .fanout
                .subscribe(filter, self.id, self.outbox.clone()),
            Place::Router => {
                self.shared.fanout.shared_subscribed();
                self.to_router.push(router_subscribe(filter));
            }
            Place::Edge => {}
        }
    }

    pub(super) fn unplace(&mut self, filter: String, place: Place) {
        match place {
            Place::Index => self.shared.fanout.unsubscribe(&filter, self.id),
            Place::Router => {
                self.shared.fanout.shared_unsubscribed();
                self.to_router.push(router_unsubscribe(filter));
            }
            Place::Edge => {}
        }
    }

    /// Takes every subscription out of where it is served from.
    pub(super) fn unplace_all(&mut self) {
        let subs: Vec<(String, Subscription)> = self.subs.drain().collect();
        for (filter, sub) in subs {
            self.unplace(filter, sub.place);
        }
    }

    /// After an ACL change, drops the subscriptions the new rules no longer grant.
    /// Why a topic name or filter is over this broker's limits, if it is.
    pub(super) fn topic_over_limits(&self, name: &str) -> Option<String> {
        let limits = &self.shared.config.session;
        let levels = name.split('/').count();
        if name.len() > limits.max_topic_length {
            Some(format!(
                "topic of {} bytes; the limit is {} (session.max_topic_length)",
                name.len(),
                limits.max_topic_length
            ))
        } else if levels > limits.max_topic_levels {
            Some(format!(
                "topic of {levels} levels; the limit is {} (session.max_topic_levels)",
                limits.max_topic_levels
            ))
        } else {
            None
        }
    }

    pub(super) fn recheck_subscriptions(&mut self) {
        let generation = self.shared.policy.acl_generation();
        if generation == self.acl_generation {
            return;
        }
        self.acl_generation = generation;
        let acl = self.shared.policy.acl();
        self.hidden = acl.hidden(&self.key.identity, &self.key.client_id);
        let revoked: Vec<String> = self
            .subs
            .keys()
            .filter(|f| {
                !acl.check_subscribe(&self.key.identity, &self.key.client_id, f)
                    .allowed()
            })
            .cloned()
            .collect();
        for filter in revoked {
            self.log_denial(Action::Subscribe, &filter);
            if let Some(sub) = self.subs.remove(&filter) {
                self.unplace(filter, sub.place);
            }
        }
    }

    pub(super) fn has_sys_subscription(&self) -> bool {
        self.subs.values().any(|s| s.place == Place::Edge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(qos: u8, no_local: bool, retain_as_published: bool, id: Option<usize>) -> Subscription {
        Subscription {
            qos,
            no_local,
            retain_as_published,
            id,
            place: Place::Index,
        }
    }

    #[test]
    fn filters_are_served_where_they_belong() {
        assert_eq!(Place::of("articulos/+/futbol"), Place::Index);
        assert_eq!(Place::of("$share/g/articulos/#"), Place::Router);
        assert_eq!(Place::of("$SYS/broker/uptime"), Place::Edge);
    }

    #[test]
    fn overlapping_subscriptions_grant_the_highest_qos_and_every_id() {
        let mut subs = HashMap::new();
        subs.insert("articulos/#".to_string(), sub(0, false, false, Some(1)));
        subs.insert(
            "articulos/+/futbol".to_string(),
            sub(2, false, true, Some(2)),
        );
        subs.insert("otros/#".to_string(), sub(1, false, false, Some(3)));
        let mut m = matching(&subs, "articulos/marca/futbol", false).unwrap();
        m.ids.sort_unstable();
        assert_eq!(
            m,
            Matched {
                granted: 2,
                count: 2,
                retain_as_published: true,
                ids: vec![1, 2],
            }
        );
        assert_eq!(matching(&subs, "nada", false), None);
    }

    #[test]
    fn no_local_skips_the_sessions_own_messages() {
        let mut subs = HashMap::new();
        subs.insert("chat/#".to_string(), sub(1, true, false, None));
        assert_eq!(matching(&subs, "chat/x", true), None);
        assert_eq!(matching(&subs, "chat/x", false).map(|m| m.granted), Some(1));
    }
}
