//! Plain reference rules for topic names and filters (MQTT 3.1.1 and 5.0, §4.7 and
//! §4.8.2), written from the specification without looking at `mqtt_common::topic`,
//! for the targets to check the broker's code against.
#![allow(dead_code)]

/// The longest UTF-8 string MQTT encodes.
const MAX: usize = 65_535;

/// §4.7.3: at least one character, no wildcard, no NUL (§1.5.3).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX && !name.chars().any(|c| matches!(c, '+' | '#' | '\0'))
}

/// §4.7.1: `#` alone in the last level, `+` alone in its level; §4.8.2: `$share/` then a
/// share name of at least one character without `/`, `+`, `#`, then `/` and a filter.
pub fn valid_filter(filter: &str) -> bool {
    if filter.len() > MAX {
        return false;
    }
    if let Some(rest) = filter.strip_prefix("$share/") {
        let Some(slash) = rest.find('/') else {
            return false;
        };
        let (share, inner) = (&rest[..slash], &rest[slash + 1..]);
        return !share.is_empty()
            && !share.chars().any(|c| matches!(c, '/' | '+' | '#'))
            && valid_plain(inner);
    }
    if filter == "$share" {
        return false;
    }
    valid_plain(filter)
}

fn valid_plain(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        if level.contains('#') && !(*level == "#" && last) {
            return false;
        }
        if level.contains('+') && *level != "+" {
            return false;
        }
    }
    true
}

/// The filter that matches, without a `$share/<name>/` prefix.
pub fn inner(filter: &str) -> &str {
    match filter
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/'))
    {
        Some((_, inner)) => inner,
        None => filter,
    }
}

/// §4.7: does the (valid) `filter` match the (valid) topic `name`? `+` is one level,
/// possibly empty; `#` any number of levels, zero included (`a/#` matches `a`); a
/// filter starting with a wildcard never matches a name starting with `$` (§4.7.2).
pub fn matches(filter: &str, name: &str) -> bool {
    matches_literally(inner(filter), name)
}

/// `matches` with a `$share/<name>/` prefix taken as levels like any other, as
/// `covers` takes it.
pub fn matches_literally(filter: &str, name: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = name.split('/').collect();
    if name.starts_with('$') && (f[0] == "+" || f[0] == "#") {
        return false;
    }
    levels_match(&f, &t)
}

fn levels_match(f: &[&str], t: &[&str]) -> bool {
    match (f.first(), t.first()) {
        (None, None) => true,
        (Some(&"#"), _) => f.len() == 1,
        (Some(&"+"), Some(_)) => levels_match(&f[1..], &t[1..]),
        (Some(a), Some(b)) if a == b => levels_match(&f[1..], &t[1..]),
        _ => false,
    }
}

/// A conservative "every name `inner` matches, `outer` matches too", level by level:
/// `#` covers the rest, `+` covers one level that is not `#`, a name covers itself.
/// Sound (never true when some name matches `inner` and not `outer`), not complete.
pub fn covers(outer: &str, inner: &str) -> bool {
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let o: Vec<&str> = outer.split('/').collect();
    let i: Vec<&str> = inner.split('/').collect();
    covers_levels(&o, &i)
}

fn covers_levels(o: &[&str], i: &[&str]) -> bool {
    match (o.first(), i.first()) {
        (None, None) => true,
        (Some(&"#"), _) => true,
        (Some(_), Some(&"#")) => false,
        (Some(&"+"), Some(_)) => covers_levels(&o[1..], &i[1..]),
        (Some(a), Some(b)) if a == b => covers_levels(&o[1..], &i[1..]),
        _ => false,
    }
}

/// Turns fuzz bytes into short strings over an alphabet where collisions are likely:
/// a few level names, separators and wildcards, `$`, NUL and a non-ASCII letter.
pub fn small_string(bytes: &[u8], alphabet: &[&str]) -> String {
    bytes
        .iter()
        .map(|b| alphabet[usize::from(*b) % alphabet.len()])
        .collect()
}

/// Level names, separators, wildcards, `$`, NUL, a non-ASCII letter, a share prefix.
pub const TOPIC_ALPHABET: [&str; 11] = [
    "a",
    "b",
    "/",
    "/",
    "+",
    "#",
    "$",
    "\0",
    "é",
    "$share/g/",
    "$SYS",
];
/// The same with the ACL's `%u` and `%c`, and the characters they are made of.
pub const ACL_ALPHABET: [&str; 12] = [
    "a", "/", "+", "#", "$", "%u", "%c", "%", "u", "c", "*", "\0",
];

/// Splits fuzz bytes into strings at 0xFF: mapped to the small alphabet when `small`,
/// else read as UTF-8 (lossily).
pub fn strings(data: &[u8], small: Option<&[&str]>) -> Vec<String> {
    data.split(|b| *b == 0xFF)
        .map(|part| match small {
            Some(alphabet) => small_string(part, alphabet),
            None => String::from_utf8_lossy(part).into_owned(),
        })
        .collect()
}
