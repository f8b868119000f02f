//! Authorization by certificate identity: `[[acl]]` rules in broker.toml grant each
//! identity publish and subscribe on topic patterns (`%u` identity, `%c` client id),
//! and deny some (`deny_publish`, `deny_subscribe`): every deny of every rule that
//! applies is checked before any grant. With no rule at all, every authenticated
//! identity may do everything; with rules, what is not granted is denied.

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
    Allowed { index: usize, pattern: String },
    /// Denied by rule `index` (0-based) through its deny `pattern`.
    DeniedBy { index: usize, pattern: String },
    /// No rule grants it.
    Denied,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Self::AllowedByDefault | Self::Allowed { .. })
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
        let applies = |pattern: &str| topic::matches(pattern, topic_name);
        self.check(identity, client_id, Action::Publish, applies, applies)
    }

    /// May `identity` subscribe with `filter`? Only when every topic the filter can
    /// match is granted, and not when a deny pattern covers all of them (one that
    /// covers some is left out of what the subscription delivers: `hidden`).
    pub fn check_subscribe(&self, identity: &str, client_id: &str, filter: &str) -> Decision {
        let inner = topic::matching_part(filter);
        let covers = |pattern: &str| topic::filter_covers(pattern, inner);
        self.check(identity, client_id, Action::Subscribe, covers, covers)
    }

    /// The `deny_subscribe` patterns that apply to `identity` as `client_id`: topics
    /// its subscriptions never deliver.
    pub fn hidden(&self, identity: &str, client_id: &str) -> Vec<String> {
        self.applying(identity)
            .flat_map(|(_, rule)| &rule.deny_subscribe)
            .map(|p| {
                substitute(p, identity, client_id)
                    .unwrap_or_else(|| deny_pattern(p, identity, client_id))
            })
            .collect()
    }

    fn applying<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = (usize, &'a AclRule)> {
        self.rules
            .iter()
            .enumerate()
            .filter(move |(_, rule)| rule.identity == "*" || rule.identity == identity)
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
        denies: impl Fn(&str) -> bool,
        grants: impl Fn(&str) -> bool,
    ) -> Decision {
        if self.rules.is_empty() {
            return Decision::AllowedByDefault;
        }
        let patterns = |rule: &'_ AclRule, deny: bool| -> Vec<String> {
            let list = match (action, deny) {
                (Action::Publish, false) => &rule.publish,
                (Action::Subscribe, false) => &rule.subscribe,
                (Action::Publish, true) => &rule.deny_publish,
                (Action::Subscribe, true) => &rule.deny_subscribe,
            };
            // A grant whose substitution would widen it does not apply; a deny
            // always does, and one that an identity or client id would turn into an
            // invalid pattern denies everything: denies err on the side of denying.
            list.iter()
                .filter_map(|p| match substitute(p, identity, client_id) {
                    Some(p) => Some(p),
                    None if deny => Some(deny_pattern(p, identity, client_id)),
                    None => None,
                })
                .collect()
        };
        for (index, rule) in self.applying(identity) {
            if let Some(pattern) = patterns(rule, true).into_iter().find(|p| denies(p)) {
                return Decision::DeniedBy { index, pattern };
            }
        }
        for (index, rule) in self.applying(identity) {
            if let Some(pattern) = patterns(rule, false).into_iter().find(|p| grants(p)) {
                return Decision::Allowed { index, pattern };
            }
        }
        Decision::Denied
    }
}

/// A deny pattern with `%u` and `%c` replaced whatever they hold; `#` (everything)
/// when that leaves no valid pattern.
fn deny_pattern(pattern: &str, identity: &str, client_id: &str) -> String {
    let p = fill(pattern, identity, client_id, |_| true).unwrap_or_default();
    if topic::valid_filter(&p) {
        p
    } else {
        "#".into()
    }
}

/// Replaces `%u` and `%c`; a value that would add a level or a wildcard to the
/// pattern makes the pattern not apply, so an identity or client id can never widen
/// its own grant.
fn substitute(pattern: &str, identity: &str, client_id: &str) -> Option<String> {
    let safe = |v: &str| !(v.contains(['/', '+', '#']) || v.is_empty());
    let out = fill(pattern, identity, client_id, safe)?;
    // Nor may a value make the pattern a `$` one: client id `$SYS` in `%c/#` granted
    // `$SYS/#`, and `$share` in `%c/g/#` would grant `#` (fuzz target `acl`).
    if out.starts_with('$') && !pattern.starts_with('$') {
        return None;
    }
    Some(out)
}

/// `%u` and `%c` replaced in one pass from the left: a value put in is never read
/// again as a pattern, so an identity holding `%c` cannot pull in the client id (fuzz
/// target `acl`: identity `aa%caaaa` widened `a/%uaaaa`). None when `accept` refuses
/// a value.
fn fill(
    pattern: &str,
    identity: &str,
    client_id: &str,
    accept: impl Fn(&str) -> bool,
) -> Option<String> {
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
        if !accept(value) {
            return None;
        }
        out.push_str(value);
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
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
                ..Default::default()
            },
            AclRule {
                identity: "subscriber".into(),
                publish: vec![],
                subscribe: vec!["articulos/#".into(), "$SYS/#".into()],
                ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
    fn denies_are_checked_before_any_grant_and_say_which_rule() {
        let acl = Acl::new(vec![
            AclRule {
                identity: "*".into(),
                publish: vec!["articulos/#".into()],
                subscribe: vec!["articulos/#".into()],
                ..Default::default()
            },
            AclRule {
                identity: "subscriber".into(),
                deny_publish: vec!["articulos/privado/#".into()],
                deny_subscribe: vec!["articulos/privado/#".into(), "buzon/%c/#".into()],
                ..Default::default()
            },
        ])
        .unwrap();
        let denied = Decision::DeniedBy {
            index: 1,
            pattern: "articulos/privado/#".into(),
        };
        assert_eq!(
            acl.check_publish("subscriber", "s", "articulos/privado/x"),
            denied
        );
        assert!(!denied.allowed());
        assert!(acl
            .check_publish("subscriber", "s", "articulos/a/x")
            .allowed());
        // Another identity: the deny rule does not apply.
        assert!(acl
            .check_publish("otro", "o", "articulos/privado/x")
            .allowed());
        // A filter inside a denied pattern is refused; a wider one is granted, and
        // the denied topics are hidden from it.
        assert_eq!(
            acl.check_subscribe("subscriber", "s", "articulos/privado/+"),
            denied
        );
        assert!(acl
            .check_subscribe("subscriber", "s", "articulos/#")
            .allowed());
        assert_eq!(
            acl.hidden("subscriber", "s"),
            ["articulos/privado/#", "buzon/s/#"]
        );
        assert!(acl.hidden("otro", "o").is_empty());
        // A client id that would turn a deny into an invalid pattern denies it all.
        assert_eq!(acl.hidden("subscriber", "#"), ["articulos/privado/#", "#"]);
        assert!(!acl
            .check_subscribe("subscriber", "#", "articulos/x")
            .allowed());
    }

    #[test]
    fn invalid_patterns_are_named() {
        let err = Acl::new(vec![AclRule {
            identity: "x".into(),
            publish: vec!["ok/#".into(), "bad/#/x".into()],
            subscribe: vec![],
            ..Default::default()
        }])
        .unwrap_err();
        assert!(err.contains("acl[0].publish[1]"), "{err}");
        let err = Acl::new(vec![AclRule {
            identity: "x".into(),
            deny_subscribe: vec!["a/#/b".into()],
            ..Default::default()
        }])
        .unwrap_err();
        assert!(err.contains("acl[0].deny_subscribe[0]"), "{err}");
    }
}
