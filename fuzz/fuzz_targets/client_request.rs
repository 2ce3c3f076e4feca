//! A frame body (version + message) from the network, decoded as a `ClientRequest`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_protocol::messages::ClientRequest;
use roost_protocol_fuzz::decode_and_check;

fuzz_target!(|body: &[u8]| {
    decode_and_check::<ClientRequest>(body);
});
