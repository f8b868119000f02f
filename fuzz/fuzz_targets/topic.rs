//! Topic names and filters: `mqtt_common::topic`'s validation, matching and covering,
//! and the broker's subscription index (routing/fanout.rs), each checked against the
//! plain reference rules in `reference.rs`. Any disagreement is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_common::topic;

#[path = "../reference.rs"]
mod reference;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let alphabet = (mode & 1 == 0).then_some(&reference::TOPIC_ALPHABET[..]);
    let strings = reference::strings(rest, alphabet);
    for s in &strings {
        assert_eq!(
            topic::valid_name(s),
            reference::valid_name(s),
            "valid_name({s:?})"
        );
        assert_eq!(
            topic::valid_filter(s),
            reference::valid_filter(s),
            "valid_filter({s:?})"
        );
        if reference::valid_filter(s) {
            assert_eq!(
                topic::matching_part(s),
                reference::inner(s),
                "matching_part({s:?})"
            );
        }
    }
    let (name, filters) = strings
        .split_first()
        .expect("split yields one part at least");
    // At most 8 filters: enough for overlaps, and pairs stay cheap.
    let filters: Vec<&str> = filters
        .iter()
        .map(String::as_str)
        .filter(|f| reference::valid_filter(f))
        .take(8)
        .collect();
    for outer in &filters {
        for inner in &filters {
            let inner_part = reference::inner(inner);
            let covers = topic::filter_covers(outer, inner_part);
            assert_eq!(
                covers,
                reference::covers(outer, inner_part),
                "filter_covers({outer:?}, {inner_part:?})"
            );
            // Soundness on a name: what the inner filter matches, the outer does too
            // (both read literally, as `filter_covers` reads them).
            if covers
                && reference::valid_name(name)
                && reference::matches_literally(inner_part, name)
            {
                assert!(
                    reference::matches_literally(outer, name),
                    "{outer:?} covers {inner_part:?} but does not match {name:?}"
                );
            }
        }
    }
    if !reference::valid_name(name) {
        return;
    }
    for filter in &filters {
        assert_eq!(
            topic::matches(filter, name),
            reference::matches(filter, name),
            "matches({filter:?}, {name:?})"
        );
    }
    // The index holds plain filters, never `$` ones (the session keeps those itself):
    // three sessions subscribe, some filters are unsubscribed again.
    let plain: Vec<&str> = filters
        .iter()
        .copied()
        .filter(|f| !f.starts_with('$'))
        .collect();
    let mut ops: Vec<(bool, &str, u64)> = plain
        .iter()
        .enumerate()
        .map(|(i, f)| (true, *f, i as u64 % 3))
        .collect();
    let dropped: Vec<(bool, &str, u64)> = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + usize::from(mode >> 1)) % 4 == 0)
        .map(|(_, (_, f, s))| (false, *f, *s))
        .collect();
    ops.extend(dropped.iter().copied());
    let mut expected: Vec<u64> = ops
        .iter()
        .filter(|(sub, f, s)| *sub && !dropped.iter().any(|(_, df, ds)| df == f && ds == s))
        .filter(|(_, f, _)| reference::matches(f, name))
        .map(|(_, _, s)| *s)
        .collect();
    expected.sort_unstable();
    expected.dedup();
    let mut got = broker::fuzzing::fanout_receivers(&ops, name);
    got.sort_unstable();
    assert_eq!(got, expected, "index for {name:?} after {ops:?}");
});
