//! What other members send to an SDK client: group messages of its group and Welcomes, in the
//! format of `roost_client::fuzzing::decode_ops`. The receiver is opened once from
//! `state/sdk_incoming.redb` (written by the seeding test, see README); every change an input
//! makes is dropped afterwards.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use roost_client::fuzzing::Receiver;

const STATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/state");

static RECEIVER: OnceLock<Receiver> = OnceLock::new();

fuzz_target!(
    init: {
        let group = std::fs::read(format!("{STATE}/sdk_incoming.group"))
            .unwrap_or_else(|e| panic!("{STATE}/sdk_incoming.group: {e}; seed first (fuzz/README.md)"));
        let receiver = Receiver::open(format!("{STATE}/sdk_incoming.redb").as_ref(), &group)
            .expect("the seeded profile opens");
        let _ = RECEIVER.set(receiver);
    },
    |input: &[u8]| {
        if let Some(receiver) = RECEIVER.get() {
            receiver.run(input);
        }
    }
);
