//! ACL rules: validation (`config::check_acl_rules`), `%u`/`%c` expansion with
//! arbitrary identities and client ids, and publish and subscribe checks, against a
//! reference written here (one pass of substitution, `reference.rs` matching). A
//! decision that differs, in outcome, rule or expanded pattern, is a finding.
#![no_main]

use broker::acl::{Acl, Decision};
use broker::AclRule;
use libfuzzer_sys::fuzz_target;

#[path = "../reference.rs"]
mod reference;

/// `%u` and `%c` replaced in one pass from the left; None when a value would add a
/// level or a wildcard, or is empty (the pattern then grants nothing): an identity or
/// a client id never widens its own grant.
fn expand(pattern: &str, identity: &str, client_id: &str) -> Option<String> {
    let unsafe_value = |v: &str| v.is_empty() || v.contains(['/', '+', '#']);
    let mut out = String::new();
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
    // Nor may a value turn the pattern into a `$` one ($SYS, or `$share/<g>/`, which
    // would grant its inner filter): that is the operator's to write.
    if out.starts_with('$') && !pattern.starts_with('$') {
        return None;
    }
    Some(out)
}

fn decide(
    rules: &[AclRule],
    identity: &str,
    client_id: &str,
    publish: bool,
    grants: impl Fn(&str) -> bool,
) -> Decision {
    if rules.is_empty() {
        return Decision::AllowedByDefault;
    }
    for (index, rule) in rules.iter().enumerate() {
        if rule.identity != "*" && rule.identity != identity {
            continue;
        }
        let patterns = if publish {
            &rule.publish
        } else {
            &rule.subscribe
        };
        for pattern in patterns {
            if let Some(pattern) = expand(pattern, identity, client_id) {
                if grants(&pattern) {
                    return Decision::Allowed { index, pattern };
                }
            }
        }
    }
    Decision::Denied
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let alphabet = (mode & 1 == 0).then_some(&reference::ACL_ALPHABET[..]);
    let strings = reference::strings(rest, alphabet);
    let [identity, client_id, topic, rest @ ..] = &strings[..] else {
        return;
    };
    // The rest in pairs: a rule's identity (empty: `*`) and its pattern, granted for
    // publishing, subscribing or both (by the mode's bits).
    let rules: Vec<AclRule> = rest
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let pattern = pair.get(1).cloned().unwrap_or_default();
            let grants = (mode >> 1).rotate_right(i as u32 * 2);
            AclRule {
                identity: match pair[0].as_str() {
                    "" => "*".into(),
                    other => other.into(),
                },
                publish: (grants & 1 == 0)
                    .then(|| pattern.clone())
                    .into_iter()
                    .collect(),
                subscribe: (grants & 2 == 0).then_some(pattern).into_iter().collect(),
                // Grants only: the reference knows no deny rules.
                ..Default::default()
            }
        })
        .collect();
    let valid = rules.iter().all(|r| {
        !r.identity.is_empty()
            && r.publish
                .iter()
                .chain(&r.subscribe)
                .all(|p| reference::valid_filter(&p.replace("%u", "u").replace("%c", "c")))
    });
    let checked = broker::fuzzing::check_acl_rules(&rules);
    assert_eq!(
        checked.is_ok(),
        valid,
        "check_acl_rules({rules:?}): {checked:?}"
    );
    let Ok(acl) = Acl::new(rules.clone()) else {
        return;
    };
    if reference::valid_name(topic) {
        let got = acl.check_publish(identity, client_id, topic);
        let want = decide(&rules, identity, client_id, true, |p| {
            reference::valid_filter(p) && reference::matches(p, topic)
                || !reference::valid_filter(p) && mqtt_common::topic::matches(p, topic)
        });
        assert_eq!(
            got, want,
            "publish {topic:?} as {identity:?}/{client_id:?} under {rules:?}"
        );
    }
    if reference::valid_filter(topic) {
        let inner = reference::inner(topic);
        let got = acl.check_subscribe(identity, client_id, topic);
        let want = decide(&rules, identity, client_id, false, |p| {
            reference::covers(p, inner)
        });
        assert_eq!(
            got, want,
            "subscribe {topic:?} as {identity:?}/{client_id:?} under {rules:?}"
        );
    }
});
