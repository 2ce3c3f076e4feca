//! A KeyPackage upload's bytes, through the KeyPackage service's validation: the server's own
//! lifetime parser (it runs before openmls), openmls's decoding and verification, and the
//! policy checks. The parser must agree with openmls (`roost_server::fuzzing::key_package`).
#![no_main]

use std::time::{SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let _ = roost_server::fuzzing::key_package(bytes, now);
});
