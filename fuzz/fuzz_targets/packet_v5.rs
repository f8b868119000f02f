//! Arbitrary bytes after a 5.0 CONNECT: decoding never panics, and neither does
//! encoding what the broker answers and forwards for each packet decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = broker::fuzzing::packets(true, data);
    if let Some(e) = decoded.store_mismatch {
        panic!("a published message does not read back from the store: {e}");
    }
});
