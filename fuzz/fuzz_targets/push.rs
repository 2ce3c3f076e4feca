//! The push parsers: an endpoint URL, the `forbidden_ranges` setting, a push service's
//! `Retry-After`, a RegisterPush endpoint (checks, sealing at rest, RFC 8291 encryption to the
//! client's keys) and a push service's answer — one case per input, chosen by its first byte
//! (`roost_server::fuzzing::push`, format in `server/src/push/fuzz.rs`). A broken invariant is
//! a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Err(finding) = roost_server::fuzzing::push(input) {
        panic!("{finding}");
    }
});
