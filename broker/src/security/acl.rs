//! Authorization by certificate identity: `[[acl]]` rules in broker.toml grant each
//! identity publish and subscribe on topic patterns (`%u` identity, `%c` client id).
//! With no rule at all, every authenticated identity may do everything.

use crate::config::AclRule;
use mqtt_common::topic;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Publish,
    Subscribe,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
        })
    }
}

/// The outcome of a check, with the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No rules configured: everything is allowed.
    AllowedByDefault,
    /// Allowed by rule `index` (0-based) through `pattern`.
    Allowed {
        index: usize,
        pattern: String,
    },
    Denied,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        !matches!(self, Self::Denied)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<AclRule>,
}

impl Acl {
    /// Checks every rule; the error names the rule and the pattern.
    pub fn new(rules: Vec<AclRule>) -> Result<Self, String> {
        crate::config::check_acl_rules(&rules)?;
        Ok(Self { rules })
    }

    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[AclRule] {
        &self.rules
    }

    /// May `identity` (connected as `client_id`) publish to `topic`?
    pub fn check_publish(&self, identity: &str, client_id: &str, topic_name: &str) -> Decision {
        self.check(identity, client_id, Action::Publish, |pattern| {
            topic::matches(pattern, topic_name)
        })
    }

    /// May `identity` subscribe with `filter`? Only when every topic the filter can
    /// match is granted.
    pub fn check_subscribe(&self, identity: &str, client_id: &str, filter: &str) -> Decision {
        let inner = topic::matching_part(filter);
        self.check(identity, client_id, Action::Subscribe, |pattern| {
            topic::filter_covers(pattern, inner)
        })
    }

    pub fn check_action(
        &self,
        identity: &str,
        client_id: &str,
        action: Action,
        topic: &str,
    ) -> Decision {
        match action {
            Action::Publish => self.check_publish(identity, client_id, topic),
            Action::Subscribe => self.check_subscribe(identity, client_id, topic),
        }
    }

    fn check(
        &self,
        identity: &str,
        client_id: &str,
        action: Action,
        grants: impl Fn(&str) -> bool,
    ) -> Decision {
        if self.rules.is_empty() {
            return Decision::AllowedByDefault;
        }
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.identity != "*" && rule.identity != identity {
                continue;
            }
            let patterns = match action {
                Action::Publish => &rule.publish,
                Action::Subscribe => &rule.subscribe,
            };
            for pattern in patterns {
                let Some(pattern) = substitute(pattern, identity, client_id) else {
                    continue;
                };
                if grants(&pattern) {
                    return Decision::Allowed { index, pattern };
                }
            }
        }
        Decision::Denied
    }
}

/// Replaces `%u` and `%c`; a value that would add a level or a wildcard to the
/// pattern makes the pattern not apply, so an identity or client id can never widen
/// its own grant.
fn substitute(pattern: &str, identity: &str, client_id: &str) -> Option<String> {
    let unsafe_value = |v: &str| v.contains(['/', '+', '#']) || v.is_empty();
    // One pass from the left: a value put in is never read again as a pattern, so an
    // identity holding `%c` cannot pull in the client id, which was not checked
    // (fuzz target `acl`: identity `aa%caaaa` widened `a/%uaaaa`).
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let value = match rest.as_bytes().get(at + 1) {
            Some(b'u') => identity,
            Some(b'c') => client_id,
            _ => {
                out.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        };
        if unsafe_value(value) {
            return None;
        }
        out.push_str(value);
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    // Nor may a value make the pattern a `$` one: client id `$SYS` in `%c/#` granted
    // `$SYS/#`, and `$share` in `%c/g/#` would grant `#` (fuzz target `acl`).
    if out.starts_with('$') && !pattern.starts_with('$') {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Acl {
        Acl::new(vec![
            AclRule {
                identity: "publisher".into(),
                publish: vec!["articulos/#".into()],
                subscribe: vec![],
            },
            AclRule {
                identity: "subscriber".into(),
                publish: vec![],
                subscribe: vec!["articulos/#".into(), "$SYS/#".into()],
            },
        ])
        .unwrap()
    }

    #[test]
    fn publisher_publishes_subscriber_subscribes() {
        let acl = shipped();
        assert!(acl
            .check_publish("publisher", "p", "articulos/a/futbol")
            .allowed());
        assert!(!acl.check_publish("publisher", "p", "otros/a").allowed());
        assert!(!acl
            .check_subscribe("publisher", "p", "articulos/#")
            .allowed());
        assert!(!acl
            .check_publish("subscriber", "s", "articulos/a/futbol")
            .allowed());
        assert!(acl
            .check_subscribe("subscriber", "s", "articulos/+/futbol")
            .allowed());
        assert!(acl
            .check_subscribe("subscriber", "s", "$share/g/articulos/+/futbol")
            .allowed());
        assert!(acl
            .check_subscribe("subscriber", "s", "$SYS/broker/uptime")
            .allowed());
        assert!(!acl.check_subscribe("subscriber", "s", "#").allowed());
        assert!(!acl
            .check_subscribe("stranger", "x", "articulos/#")
            .allowed());
    }

    #[test]
    fn deciding_rule_is_reported() {
        let acl = shipped();
        assert_eq!(
            acl.check_subscribe("subscriber", "s", "$SYS/#"),
            Decision::Allowed {
                index: 1,
                pattern: "$SYS/#".into()
            }
        );
        assert_eq!(
            Acl::default().check_publish("a", "b", "c"),
            Decision::AllowedByDefault
        );
    }

    #[test]
    fn substitution_of_identity_and_client_id() {
        let acl = Acl::new(vec![AclRule {
            identity: "*".into(),
            publish: vec!["devices/%u/%c/#".into()],
            subscribe: vec!["inbox/%c".into()],
        }])
        .unwrap();
        assert!(acl
            .check_publish("sensor", "c1", "devices/sensor/c1/temp")
            .allowed());
        assert!(!acl
            .check_publish("sensor", "c1", "devices/other/c1/temp")
            .allowed());
        assert!(acl.check_subscribe("anyone", "c9", "inbox/c9").allowed());
        assert!(!acl.check_subscribe("anyone", "c9", "inbox/c8").allowed());
        // A client id cannot widen its grant with wildcards or levels.
        assert!(!acl.check_subscribe("anyone", "+", "inbox/+").allowed());
        assert!(!acl.check_subscribe("anyone", "#", "inbox/#").allowed());
        assert!(!acl
            .check_publish("sensor", "a/b", "devices/sensor/a/b/x")
            .allowed());
    }

    /// Fuzz finding (target `acl`): the identity was substituted, then the client id
    /// into the result, so an identity holding `%c` took the unchecked client id.
    #[test]
    fn a_substituted_value_is_not_substituted_again() {
        let acl = Acl::new(vec![AclRule {
            identity: "*".into(),
            publish: vec!["a/%uaaaa".into(), "a/%u/#".into()],
            subscribe: vec!["a/%u".into()],
        }])
        .unwrap();
        assert!(!acl.check_publish("aa%caaaa", "a", "a/aaaaaaa").allowed());
        assert!(acl
            .check_publish("aa%caaaa", "a", "a/aa%caaaaaaaa")
            .allowed());
        // Before: `a/%c` then `a/#`, a grant of everything under `a/`.
        assert!(!acl.check_subscribe("%c", "#", "a/#").allowed());
        assert!(acl.check_subscribe("%c", "#", "a/%c").allowed());
    }

    /// Fuzz finding (target `acl`, minimised: identity `$`, pattern `%u`, topic `$`): a
    /// value could turn a pattern into a `$` one, the broker's own or a shared filter.
    #[test]
    fn a_substituted_value_never_makes_a_dollar_pattern() {
        let acl = Acl::new(vec![AclRule {
            identity: "*".into(),
            publish: vec!["%u".into(), "%c/g/#".into()],
            subscribe: vec!["%c/#".into()],
        }])
        .unwrap();
        assert!(!acl.check_publish("$", "c", "$").allowed());
        assert!(!acl
            .check_subscribe("s", "$SYS", "$SYS/broker/uptime")
            .allowed());
        assert!(!acl.check_publish("p", "$share", "otros/x").allowed());
        assert!(acl.check_subscribe("s", "c1", "c1/x").allowed());
    }

    #[test]
    fn invalid_patterns_are_named() {
        let err = Acl::new(vec![AclRule {
            identity: "x".into(),
            publish: vec!["ok/#".into(), "bad/#/x".into()],
            subscribe: vec![],
        }])
        .unwrap_err();
        assert!(err.contains("acl[0].publish[1]"), "{err}");
    }
}
