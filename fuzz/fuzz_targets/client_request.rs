//! A frame body (version + message) a server receives from a client: decoded as a
//! `ClientRequest` (the first frame of a stream) and as a `ListenControl` (the frames that may
//! follow a QueueListen request on the same stream).
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_protocol::messages::ClientRequest;
use roost_protocol::messages::queue::ListenControl;
use roost_protocol_fuzz::decode_and_check;

fuzz_target!(|body: &[u8]| {
    decode_and_check::<ClientRequest>(body);
    decode_and_check::<ListenControl>(body);
});
