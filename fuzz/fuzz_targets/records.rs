//! The store's records: arbitrary bytes through every decoder (`decode`,
//! `decode_session`, `decode_queued`, `decode_recipients`, `decode_sent`,
//! `decode_batch`, `split_entry_key`, `session_key`): a damaged record is None, never a
//! panic, and one that decodes is written again the same. With an odd first byte, the
//! bytes build records instead, which must read back as written.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        if let Err(e) = broker::fuzzing::records_round_trip(rest) {
            panic!("{e}");
        }
        return;
    }
    // The key is the first (mode / 2) % 24 bytes: entry keys are 16.
    let split = usize::from(mode >> 1) % 24;
    let (key, value) = rest.split_at(split.min(rest.len()));
    if let Err(e) = broker::fuzzing::decode_records(key, value) {
        panic!("{e}");
    }
});
