//! Arbitrary bytes from an upstream (3.1.1 or 5.0) or from the bridge's local session:
//! decoding, relaying and encoding what the relay sends on never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = broker::fuzzing::bridge(data);
});
