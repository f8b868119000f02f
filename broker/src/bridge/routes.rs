//! Which topics a bridge forwards, and how their names change on the way: topic T is
//! `local_prefix + T` here and `remote_prefix + T` upstream (Mosquitto's convention).

use super::wire::Filter;
use crate::config::BridgeTopic;
use mqtt_common::topic;

/// One `[[bridge.topic]]`, with both of its filters spelled out.
#[derive(Debug, Clone)]
struct Route {
    local_filter: String,
    remote_filter: String,
    local_prefix: String,
    remote_prefix: String,
    out: bool,
    inward: bool,
    qos: u8,
}

/// A bridge's topics.
#[derive(Debug, Clone)]
pub(super) struct Routes(Vec<Route>);

impl Routes {
    pub(super) fn new(topics: &[BridgeTopic]) -> Self {
        Self(
            topics
                .iter()
                .map(|t| Route {
                    local_filter: format!("{}{}", t.local_prefix, t.pattern),
                    remote_filter: format!("{}{}", t.remote_prefix, t.pattern),
                    local_prefix: t.local_prefix.clone(),
                    remote_prefix: t.remote_prefix.clone(),
                    out: t.direction.out(),
                    inward: t.direction.inward(),
                    qos: t.qos,
                })
                .collect(),
        )
    }

    /// The local session's subscriptions: what goes out. No Local keeps what the
    /// bridge itself brings in from going back; retained messages go up once, when a
    /// subscription is new.
    pub(super) fn local_filters(&self) -> Vec<Filter> {
        self.0
            .iter()
            .filter(|r| r.out)
            .map(|r| filter(&r.local_filter, r.qos))
            .collect()
    }

    /// The subscriptions upstream: what comes in (No Local is MQTT 5's; a 3.1.1
    /// upstream ignores it, and the relay recognises the echoes instead).
    pub(super) fn remote_filters(&self) -> Vec<Filter> {
        self.0
            .iter()
            .filter(|r| r.inward)
            .map(|r| filter(&r.remote_filter, r.qos))
            .collect()
    }

    /// The upstream's name for a local topic going out; None when no route takes it.
    pub(super) fn outward(&self, local: &str) -> Option<String> {
        self.0.iter().filter(|r| r.out).find_map(|r| {
            let rest = local.strip_prefix(&r.local_prefix)?;
            topic::matches(&r.local_filter, local).then(|| format!("{}{rest}", r.remote_prefix))
        })
    }

    /// The local name of a topic coming in; None when no route takes it.
    pub(super) fn inward(&self, remote: &str) -> Option<String> {
        self.0.iter().filter(|r| r.inward).find_map(|r| {
            let rest = remote.strip_prefix(&r.remote_prefix)?;
            topic::matches(&r.remote_filter, remote).then(|| format!("{}{rest}", r.local_prefix))
        })
    }

    /// Whether a message sent upstream on `remote` comes back on our own subscription
    /// there (an upstream without No Local echoes it).
    pub(super) fn comes_back(&self, remote: &str) -> bool {
        self.0
            .iter()
            .any(|r| r.inward && topic::matches(&r.remote_filter, remote))
    }

    /// Whether anything sent upstream can come back at all.
    pub(super) fn can_echo(&self) -> bool {
        self.0.iter().filter(|r| r.out).any(|o| {
            self.0
                .iter()
                .filter(|r| r.inward)
                .any(|i| overlap(&o.remote_filter, &i.remote_filter))
        })
    }
}

fn filter(path: &str, qos: u8) -> Filter {
    Filter {
        filter: path.to_string(),
        qos,
        no_local: true,
        retain_as_published: true,
        retain_handling: 1,
    }
}

/// Whether some topic matches both filters.
fn overlap(a: &str, b: &str) -> bool {
    let mut a = a.split('/');
    let mut b = b.split('/');
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;

    fn topic(pattern: &str, direction: Direction, local: &str, remote: &str) -> BridgeTopic {
        BridgeTopic {
            pattern: pattern.into(),
            direction,
            qos: 1,
            local_prefix: local.into(),
            remote_prefix: remote.into(),
        }
    }

    #[test]
    fn names_change_by_prefix_each_way() {
        let routes = Routes::new(&[
            topic("articulos/#", Direction::Out, "", "sites/edge-1/"),
            topic("ordenes/+", Direction::In, "local/", "cloud/"),
        ]);
        assert_eq!(
            routes.outward("articulos/a/futbol").as_deref(),
            Some("sites/edge-1/articulos/a/futbol")
        );
        assert_eq!(routes.outward("ordenes/x"), None);
        assert_eq!(
            routes.inward("cloud/ordenes/x").as_deref(),
            Some("local/ordenes/x")
        );
        assert_eq!(routes.inward("cloud/ordenes/x/y"), None);
        assert_eq!(routes.inward("sites/edge-1/articulos/a"), None);
        let local: Vec<_> = routes
            .local_filters()
            .into_iter()
            .map(|f| f.filter)
            .collect();
        assert_eq!(local, ["articulos/#"]);
        let remote: Vec<_> = routes
            .remote_filters()
            .into_iter()
            .map(|f| f.filter)
            .collect();
        assert_eq!(remote, ["cloud/ordenes/+"]);
        assert!(!routes.can_echo());
    }

    #[test]
    fn a_topic_both_ways_can_echo_and_is_recognised() {
        let routes = Routes::new(&[topic("chat/#", Direction::Both, "", "")]);
        assert!(routes.can_echo());
        assert!(routes.comes_back("chat/a"));
        assert!(!routes.comes_back("other"));
        let apart = Routes::new(&[
            topic("a/#", Direction::Out, "", "up/"),
            topic("a/#", Direction::In, "", "down/"),
        ]);
        assert!(!apart.can_echo());
    }

    #[test]
    fn filters_overlap_level_by_level() {
        assert!(overlap("a/+/c", "a/b/#"));
        assert!(overlap("#", "x"));
        assert!(overlap("a/b", "a/+"));
        assert!(!overlap("a/b", "a/c"));
        assert!(!overlap("a/b", "a/b/c"));
    }
}
