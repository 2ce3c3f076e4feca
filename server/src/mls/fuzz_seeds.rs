//! Seeds for the server's fuzz targets (`fuzz/`): real KeyPackages for `keypackage`, and for
//! `ds_group` a real two-member group (its snapshot is the state the target loads) with the
//! commits, Welcome, GroupInfos, proposals and application messages real openmls clients send
//! to it. Every seed must be accepted, so the fuzzer starts deep inside the checks. With
//! `ROOST_SEED_FUZZ_CORPUS=1` the seeds go to `fuzz/corpus/<target>/` and the snapshot to
//! `fuzz/state/ds_group.snapshot` (see fuzz/README.md).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use openmls::prelude::{Capabilities, ExtensionType, KeyPackage, Lifetime};
use tls_codec::Serialize as _;

use super::test_client::{Client, add, alice_and_ds};
use crate::fuzzing::{DsHarness, DsOp, encode_ds_ops, key_package};
use crate::mls::CIPHERSUITE;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn write_seeds(target: &str, seeds: &[(&str, Vec<u8>)]) {
    if std::env::var_os("ROOST_SEED_FUZZ_CORPUS").is_none() {
        return;
    }
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

#[test]
fn keypackage_fuzz_seeds_are_valid_key_packages() {
    let alice = Client::new("alice");
    let last_resort = KeyPackage::builder()
        .leaf_node_capabilities(
            Capabilities::builder()
                .extensions(vec![ExtensionType::LastResort])
                .build(),
        )
        .mark_as_last_resort()
        .build(
            CIPHERSUITE,
            &alice.provider,
            &alice.signer,
            alice.credential(),
        )
        .unwrap()
        .key_package()
        .clone();
    let seeds = [
        ("default", alice.key_package()),
        (
            "one-day",
            alice.key_package_with_lifetime(Lifetime::new(86_400)),
        ),
        ("last-resort", last_resort),
    ]
    .map(|(name, kp)| (name, kp.tls_serialize_detached().unwrap()));
    for (name, bytes) in &seeds {
        key_package(bytes, now()).unwrap_or_else(|e| panic!("seed {name} refused: {e}"));
    }
    write_seeds("keypackage", &seeds);
}

#[test]
fn ds_group_fuzz_seeds_are_accepted_by_the_snapshot_group() {
    // Epoch 0 of a new group: the CreateGroup seed.
    let (mut creator, _) = alice_and_ds();
    let create = DsOp::Create {
        creator: creator.identity.clone(),
        group_info: creator.group_info(false),
        ratchet_tree: creator.tree(),
    };

    // The state the target loads: alice and bob at epoch 1.
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);
    let snapshot = ds.snapshot().unwrap();

    let carol = Client::new("carol");
    let add_carol = alice.commit(vec![carol.key_package()], &[]);
    alice.discard_pending_commit();
    let commit = |sender, bundle: super::test_client::Bundle| DsOp::Commit {
        sender,
        commit: bundle.commit,
        welcome: bundle.welcome.unwrap_or_default(),
        group_info: bundle.group_info,
    };
    let add_carol = commit(0, add_carol);
    let bob_update = bob.commit(vec![], &[]);
    bob.discard_pending_commit();
    let bob_update = commit(1, bob_update);
    let remove_bob = alice.commit(vec![], &[1]);
    alice.discard_pending_commit();
    let remove_bob = commit(0, remove_bob);
    let hello = DsOp::Application {
        past_epochs: 2,
        message: bob.application_message(b"hello"),
    };
    let mut dave = Client::new("dave");
    let dave_joins = dave.external_commit(&ds.group_info(), &ds.export_ratchet_tree());
    let dave_joins = DsOp::External {
        joiner: dave.identity.clone(),
        commit: dave_joins.commit,
        group_info: dave_joins.group_info,
    };
    // Last: alice keeps bob's leave as a pending proposal.
    let leave = bob.leave();
    alice.receive(&leave);
    let commit_leave = alice.commit(vec![], &[]);
    let leave = DsOp::Leave {
        sender: 1,
        proposal: leave,
    };
    let commit_leave = commit(0, commit_leave);

    let seeds = [
        ("create", vec![create]),
        ("add", vec![add_carol.clone()]),
        ("update", vec![bob_update]),
        ("remove", vec![remove_bob]),
        ("application", vec![hello.clone()]),
        ("external", vec![dave_joins]),
        ("leave-commit", vec![leave, commit_leave]),
        // The message of epoch 1 is still accepted one epoch later.
        ("add-then-application", vec![add_carol, hello]),
    ]
    .map(|(name, ops)| (name, encode_ds_ops(&ops)));
    let mut harness = DsHarness::new(&snapshot).unwrap();
    for (name, input) in &seeds {
        let run = harness.run(input);
        assert!(!run.results.is_empty(), "seed {name} has no operation");
        for result in run.results {
            result.unwrap_or_else(|e| panic!("seed {name} refused: {e}"));
        }
    }
    // The harness went back to the snapshot after each: the add is accepted again.
    assert!(harness.run(&seeds[1].1).results[0].is_ok());
    write_seeds("ds_group", &seeds);
    if std::env::var_os("ROOST_SEED_FUZZ_CORPUS").is_some() {
        let state = fuzz_dir().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("ds_group.snapshot"), &snapshot).unwrap();
    }
}
