//! Topic names and filters: validation and matching (MQTT 3.1.1 §4.7, 5.0 §4.7).
//!
//! The broker's router (rumqttd) validates neither, so the broker checks every name and
//! filter here before it reaches the router, the retained store or the ACL; the clients
//! check what they are told to subscribe to with the same rules.

/// Longest topic or filter accepted, in bytes (the MQTT string limit).
const MAX_LEN: usize = 65_535;

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_LEN && !topic.contains(['+', '#', '\0'])
}

/// A topic filter a client may subscribe with, including `$share/<group>/<filter>`.
pub fn valid_filter(filter: &str) -> bool {
    match split_shared(filter) {
        Some((group, inner)) => {
            !group.is_empty() && !group.contains(['+', '#', '/']) && valid_plain_filter(inner)
        }
        None if filter.starts_with("$share/") || filter == "$share" => false,
        None => valid_plain_filter(filter),
    }
}

/// A filter without the `$share/<group>/` prefix: wildcards fill whole levels, `#` last.
pub fn valid_plain_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_LEN || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

/// Splits `$share/<group>/<filter>` into its group and filter.
pub fn split_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    Some((group, inner))
}

/// The filter that decides matching: the inner filter of a shared subscription.
pub fn matching_part(filter: &str) -> &str {
    split_shared(filter).map_or(filter, |(_, inner)| inner)
}

/// Whether `topic` matches `filter`. Wildcards at the first level never match
/// topics starting with `$` (MQTT 3.1.1 §4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    let filter = matching_part(filter);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `inner` can match is also matched by `outer`
/// (`articulos/+/futbol` is inside `articulos/#`; `#` is not).
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    // Wildcards at the first level never reach `$` topics.
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(il)) if il != "#" => {}
            (Some(ol), Some(il)) if ol == il => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("articulos/eldiario/futbol"));
        assert!(valid_name("/"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/+/b"));
        assert!(!valid_name("a/#"));
        assert!(!valid_name("a\0b"));
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "a/+/b",
            "a/#",
            "+/+",
            "$SYS/#",
            "$share/g/a/+",
            "/",
        ] {
            assert!(valid_filter(ok), "{ok} should be valid");
        }
        for bad in [
            "",
            "a/#/b",
            "a+/b",
            "a/b#",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "#/",
        ] {
            assert!(!valid_filter(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("articulos/+/futbol", "articulos/eldiario/futbol"));
        assert!(!matches(
            "articulos/+/futbol",
            "articulos/eldiario/politica"
        ));
        assert!(matches("articulos/#", "articulos"));
        assert!(matches("articulos/#", "articulos/a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/broker/uptime", "$SYS/broker/uptime"));
        assert!(matches("$SYS/#", "$SYS/broker/uptime"));
        assert!(matches("$share/g/articulos/+/futbol", "articulos/x/futbol"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("+", ""));
    }

    #[test]
    fn covering() {
        assert!(filter_covers("articulos/#", "articulos/+/futbol"));
        assert!(filter_covers(
            "articulos/+/futbol",
            "articulos/eldiario/futbol"
        ));
        assert!(!filter_covers("articulos/#", "#"));
        assert!(!filter_covers("articulos/+/futbol", "articulos/#"));
        assert!(!filter_covers("articulos/eldiario/#", "articulos/+/futbol"));
        assert!(filter_covers("#", "anything/#"));
        assert!(!filter_covers("#", "$SYS/#"));
        assert!(filter_covers("$SYS/#", "$SYS/broker/+"));
    }
}
