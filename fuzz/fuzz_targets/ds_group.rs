//! Operations on one DS group (CreateGroup, Commit with Welcome and GroupInfo, ExternalJoin,
//! LeaveGroup, SendMessage), in the format of `roost_server::fuzzing::decode_ds_ops`. The group
//! is loaded once from `state/ds_group.snapshot` (written by the seeding test, see README) and
//! goes back to that state after every input that changed it.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use roost_server::fuzzing::DsHarness;

const SNAPSHOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/state/ds_group.snapshot");

static HARNESS: Mutex<Option<DsHarness>> = Mutex::new(None);

fuzz_target!(
    init: {
        let snapshot = std::fs::read(SNAPSHOT).unwrap_or_else(|e| {
            panic!("{SNAPSHOT}: {e}; seed first (fuzz/README.md)")
        });
        let harness = DsHarness::new(&snapshot).expect("the seeded snapshot loads");
        *HARNESS.lock().unwrap() = Some(harness);
    },
    |input: &[u8]| {
        let mut harness = HARNESS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(harness) = harness.as_mut() {
            harness.run(input);
        }
    }
);
