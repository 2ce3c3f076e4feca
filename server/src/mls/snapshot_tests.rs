//! Tests of the persisted form of a DS group: [`DsGroup::snapshot`] and
//! [`DsGroup::from_snapshot`].

use std::time::{Duration, Instant};

use openmls::prelude::{
    CreationFromExternalError, KeyPackage, Lifetime, ProposalStore, PublicGroup, RatchetTreeIn,
};
use openmls::treesync::errors::{LeafNodeValidationError, LifetimeError};
use openmls_rust_crypto::RustCrypto;
use tls_codec::Deserialize as _;

use super::super::snapshot::{Recorder, Snapshot, StoredState};
use super::decode_group_info;
use super::test_client::{Bundle, Client, GROUP_ID, MAX, add, alice_and_ds, identities};
use super::{DsGroup, MlsError};

/// What the DS did before snapshots: rebuild the `PublicGroup` from GroupInfo and tree.
fn from_external(
    group_info: &[u8],
    tree: &[u8],
) -> Result<PublicGroup, CreationFromExternalError<super::super::snapshot::SnapshotError>> {
    let verifiable = decode_group_info(group_info).unwrap();
    let tree = RatchetTreeIn::tls_deserialize_exact(tree).unwrap();
    PublicGroup::from_external(
        &RustCrypto::default(),
        &Recorder::new(&mut StoredState::default()),
        tree,
        verifiable,
        ProposalStore::new(),
    )
    .map(|(group, _)| group)
}

fn round_trip(ds: &DsGroup) -> DsGroup {
    let snapshot = ds.snapshot().unwrap();
    let restored = DsGroup::from_snapshot(&snapshot).unwrap();
    assert_eq!(restored.epoch(), ds.epoch());
    assert_eq!(restored.group_id(), ds.group_id());
    assert_eq!(restored.members(), ds.members());
    assert_eq!(restored.export_ratchet_tree(), ds.export_ratchet_tree());
    assert_eq!(restored.group_info(), ds.group_info());
    assert_eq!(restored.pending_proposals(), ds.pending_proposals());
    // Nothing is lost or added on the way: the restored group snapshots to the same bytes.
    assert_eq!(restored.snapshot().unwrap(), snapshot);
    restored
}

fn accept(ds: &mut DsGroup, committer: &mut Client, bundle: &Bundle) {
    let identity = committer.identity.clone();
    ds.process_commit(
        &identity,
        &bundle.commit,
        bundle.welcome.as_deref(),
        &bundle.group_info,
        MAX,
    )
    .unwrap();
    committer.merge();
}

#[test]
fn a_snapshot_continues_where_it_left() {
    let (mut alice, mut ds) = alice_and_ds();
    let fresh = round_trip(&ds);
    assert_eq!(fresh.epoch(), 0);
    let mut bob = Client::new("bob");
    let mut carol = Client::new("carol");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob, &mut carol]);
    let leave = carol.leave();
    ds.add_leave_proposal(b"carol", &leave).unwrap();

    let mut restored = round_trip(&ds);
    assert_eq!(restored.pending_proposals(), vec![leave.clone()]);
    // The restored group still knows the leave: sent again, it is not stored twice.
    restored.add_leave_proposal(b"carol", &leave).unwrap();
    assert_eq!(restored.pending_proposals(), vec![leave.clone()]);

    // It still insists on the pending leave.
    let without = bob.commit(vec![], &[]);
    assert_eq!(
        restored
            .process_commit(b"bob", &without.commit, None, &without.group_info, MAX)
            .unwrap_err(),
        MlsError::MissingProposals
    );
    bob.discard_pending_commit();
    bob.receive(&leave);
    let with = bob.commit(vec![], &[]);
    let outcome = restored
        .process_commit(b"bob", &with.commit, None, &with.group_info, MAX)
        .unwrap();
    assert_eq!(identities(&outcome.removed), vec![b"carol".to_vec()]);
    bob.merge();
    alice.receive(&leave);
    alice.receive(&with.commit);
    assert_eq!(alice.epoch(), restored.epoch());

    // After the commit: no pending proposal, the next epoch's GroupInfo, and a client that
    // joins from what the restored DS serves.
    let mut restored = round_trip(&restored);
    assert!(restored.pending_proposals().is_empty());
    assert_eq!(restored.group_info(), with.group_info);
    let mut dave = Client::new("dave");
    let join = dave.external_commit(&restored.group_info(), &restored.export_ratchet_tree());
    restored
        .process_external_commit(b"dave", &join.commit, &join.group_info, MAX)
        .unwrap();
    alice.receive(&join.commit);
    bob.receive(&join.commit);
    let mut restored = round_trip(&restored);
    let update = dave.commit(vec![], &[]);
    accept(&mut restored, &mut dave, &update);
    alice.receive(&update.commit);
    assert_eq!(alice.epoch(), restored.epoch());
    assert_eq!(alice.tree(), restored.export_ratchet_tree());
}

#[test]
fn a_member_whose_key_package_expired_still_loads() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    // openmls backdates not_before by an hour; this KeyPackage expires 2 s from now.
    let key_package = bob.key_package_with_lifetime(Lifetime::new(2));
    let bundle = alice.commit(vec![key_package.clone()], &[]);
    accept(&mut ds, &mut alice, &bundle);
    bob.join(
        bundle.welcome.as_deref().unwrap(),
        &ds.export_ratchet_tree(),
    );
    // Bob never commits: his leaf is still the one from his KeyPackage.
    let snapshot = ds.snapshot().unwrap();
    assert!(from_external(&ds.group_info(), &ds.export_ratchet_tree()).is_ok());

    let deadline = Instant::now() + Duration::from_secs(10);
    while key_package.life_time().validate().is_ok() {
        assert!(Instant::now() < deadline, "the KeyPackage does not expire");
        std::thread::sleep(Duration::from_millis(200));
    }

    // What the DS did before: the group can no longer be loaded.
    assert!(matches!(
        from_external(&ds.group_info(), &ds.export_ratchet_tree()),
        Err(CreationFromExternalError::LeafNodeValidation(
            LeafNodeValidationError::Lifetime(LifetimeError::Expired { .. })
        ))
    ));

    // The snapshot loads and the group goes on.
    let mut restored = DsGroup::from_snapshot(&snapshot).unwrap();
    assert_eq!(restored.members(), ds.members());
    let update = alice.commit(vec![], &[]);
    accept(&mut restored, &mut alice, &update);
    bob.receive(&update.commit);
    let mut restored = round_trip(&restored);
    let carol = Client::new("carol");
    let add_carol = bob.commit(vec![carol.key_package()], &[]);
    accept(&mut restored, &mut bob, &add_carol);
    alice.receive(&add_carol.commit);
    assert_eq!(alice.epoch(), restored.epoch());
    assert_eq!(identities(&restored.members()).len(), 3);
}

#[test]
fn damaged_snapshots_are_refused() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);
    let leave = bob.leave();
    ds.add_leave_proposal(b"bob", &leave).unwrap();
    let snapshot = ds.snapshot().unwrap();
    let refused = |bytes: &[u8]| {
        assert!(
            matches!(DsGroup::from_snapshot(bytes), Err(MlsError::State(_))),
            "accepted a damaged snapshot"
        );
    };

    refused(&[]);
    // Unknown formats, and known ones this snapshot is not in (their layout leaves bytes over).
    for version in [0, 1, 2, 4, 255] {
        let mut other_version = snapshot.clone();
        other_version[0] = version;
        refused(&other_version);
    }
    refused(&snapshot[..snapshot.len() - 1]);
    let mut trailing = snapshot.clone();
    trailing.push(0);
    refused(&trailing);

    let parts = Snapshot::decode(&snapshot).unwrap();
    assert_eq!(parts.encode().unwrap(), snapshot);
    // A GroupInfo of another epoch.
    let bundle = alice.commit(vec![], &[]);
    let mut mismatched = parts.clone();
    mismatched.group_info = bundle.group_info;
    refused(&mismatched.encode().unwrap());
    // The DS's pending proposals and openmls's queue disagree.
    let mut forgotten = parts.clone();
    forgotten.pending.clear();
    refused(&forgotten.encode().unwrap());
    // openmls values that do not decode: the tree cut short, with a byte too many, and in
    // neither encoding.
    let tree = parts.state.tree.clone().unwrap();
    for damaged in [
        tree[..tree.len() - 1].to_vec(),
        [tree.as_slice(), &[0]].concat(),
        [&[7u8][..], &tree[1..]].concat(),
    ] {
        let mut garbled = parts.clone();
        garbled.state.tree = Some(damaged);
        refused(&garbled.encode().unwrap());
    }
}

#[test]
fn a_group_stored_in_format_1_loads_and_migrates() {
    let (mut alice, mut ds) = alice_and_ds();
    // Every value from here on is written as format 1 did (serde_json).
    ds.stored.legacy_json = true;
    let mut bob = Client::new("bob");
    let mut carol = Client::new("carol");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob, &mut carol]);
    let leave = carol.leave();
    ds.add_leave_proposal(b"carol", &leave).unwrap();
    let old = ds.snapshot().unwrap();
    assert_eq!(old[0], 1);
    let json = |bytes: &[u8]| bytes.windows(11).any(|w| w == b"\"tree_hash\"");
    assert!(json(&old), "format 1 stores JSON values");

    let mut restored = DsGroup::from_snapshot(&old).unwrap();
    assert_eq!(restored.members(), ds.members());
    assert_eq!(restored.export_ratchet_tree(), ds.export_ratchet_tree());
    assert_eq!(restored.pending_proposals(), vec![leave.clone()]);
    // The JSON-stored leave is recognised when it comes again, and a commit must cover it.
    restored.add_leave_proposal(b"carol", &leave).unwrap();
    assert_eq!(restored.pending_proposals(), vec![leave.clone()]);
    let without = bob.commit(vec![], &[]);
    assert_eq!(
        restored
            .process_commit(b"bob", &without.commit, None, &without.group_info, MAX)
            .unwrap_err(),
        MlsError::MissingProposals
    );
    bob.discard_pending_commit();
    bob.receive(&leave);
    let with = bob.commit(vec![], &[]);
    accept(&mut restored, &mut bob, &with);
    alice.receive(&leave);
    alice.receive(&with.commit);

    // After the commit every value was rewritten: the current format and no JSON left.
    let new = restored.snapshot().unwrap();
    assert_eq!(new[0], 3);
    assert!(!json(&new), "a JSON value survived the commit");
    assert!(new.len() < old.len());
    let restored = round_trip(&restored);
    assert_eq!(alice.epoch(), restored.epoch());
    assert_eq!(alice.tree(), restored.export_ratchet_tree());
}

#[test]
fn a_twenty_member_group_round_trips() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut joiners: Vec<Client> = (0..20)
        .map(|i| Client::new(&format!("member-{i}")))
        .collect();
    let key_packages: Vec<KeyPackage> = joiners.iter().map(Client::key_package).collect();
    let bundle = alice.commit(key_packages, &[]);
    accept(&mut ds, &mut alice, &bundle);
    let tree = ds.export_ratchet_tree();
    for joiner in &mut joiners {
        joiner.join(bundle.welcome.as_deref().unwrap(), &tree);
    }
    assert_eq!(ds.members().len(), 21);
    let mut restored = round_trip(&ds);

    const RUNS: u32 = 20;
    let started = Instant::now();
    for _ in 0..RUNS {
        ds.snapshot().unwrap();
    }
    let snapshot_time = started.elapsed() / RUNS;
    let snapshot = ds.snapshot().unwrap();
    let started = Instant::now();
    for _ in 0..RUNS {
        DsGroup::from_snapshot(&snapshot).unwrap();
    }
    let load_time = started.elapsed() / RUNS;
    let (group_info, tree) = (ds.group_info(), ds.export_ratchet_tree());
    let started = Instant::now();
    for _ in 0..RUNS {
        from_external(&group_info, &tree).unwrap();
    }
    let from_external_time = started.elapsed() / RUNS;
    // What every merge adds: the write of the tree, as stored and as format 1 stored it.
    let started = Instant::now();
    for _ in 0..RUNS {
        postcard::to_allocvec(ds.public.treesync()).unwrap();
    }
    let tree_write_time = started.elapsed() / RUNS;
    let started = Instant::now();
    for _ in 0..RUNS {
        serde_json::to_vec(ds.public.treesync()).unwrap();
    }
    let json_tree_write_time = started.elapsed() / RUNS;
    eprintln!(
        "21 members: snapshot {} B (before: GroupInfo {} B + tree {} B); snapshot() \
         {snapshot_time:?}, from_snapshot {load_time:?}, from_external {from_external_time:?}, \
         tree write on merge {tree_write_time:?} (JSON: {json_tree_write_time:?})",
        snapshot.len(),
        group_info.len(),
        tree.len(),
    );

    let update = joiners[7].commit(vec![], &[]);
    accept(&mut restored, &mut joiners[7], &update);
    alice.receive(&update.commit);
    assert_eq!(alice.tree(), restored.export_ratchet_tree());
    assert_eq!(round_trip(&restored).epoch(), 2);
    assert_eq!(&restored.group_id(), GROUP_ID);
}

#[test]
fn recent_joins_survive_a_snapshot_and_are_forgotten_once_old() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);
    assert_eq!(ds.epoch(), 1);
    assert_eq!(ds.joined_after(0), vec![b"bob".as_slice()]);
    assert!(ds.joined_after(1).is_empty());
    let mut restored = round_trip(&ds);
    assert_eq!(restored.joined_after(0), vec![b"bob".as_slice()]);
    restored.forget_joins_up_to(1);
    assert!(round_trip(&restored).joined_after(0).is_empty());
}

/// A group stored the way the DS stores it (a delta per commit on a base, see
/// `storage::group_delta`) in a real store: after every restart the loaded group is the live
/// one, down to the bytes of its full snapshot, and goes on accepting commits; most commits
/// stored only a fraction of the snapshot.
#[test]
fn a_group_stored_as_base_and_deltas_loads_as_the_full_snapshot() {
    use crate::delivery::{GroupState, GroupStore, GroupWrite};
    use crate::storage::group_delta::{self, Chain, Stored};
    use crate::storage::redb::Store;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let open = || Store::open(&path, "example.org", 8).unwrap();
    let (mut store, mut writer) = open();

    let (mut alice, mut ds) = alice_and_ds();
    let members: Vec<Client> = (0..30).map(|n| Client::new(&format!("m{n}"))).collect();
    let joined = alice.commit(members.iter().map(Client::key_package).collect(), &[]);
    accept(&mut ds, &mut alice, &joined);
    let key = ds.group_id();
    let mut stored = ds.snapshot().unwrap();
    runtime
        .block_on(store.create_group(GroupState {
            key: key.clone(),
            epoch: ds.epoch(),
            version: 0,
            snapshot: stored.clone(),
            chain: Chain::default(),
        }))
        .unwrap();
    let (mut version, mut chain) = (0u64, Chain::default());
    // Bytes written for the state, and what writing every snapshot in full would have been.
    let (mut written, mut full_bytes, mut deltas) = (0usize, 0usize, 0);
    let last = members.last().unwrap();
    for step in 0..60 {
        // Alice updates her path, removes the last member, adds it back, in turn.
        let bundle = match step % 3 {
            0 => alice.commit(vec![], &[]),
            1 => {
                let leaf = ds
                    .member_by_identity(&last.identity)
                    .map(|m| m.leaf_index)
                    .unwrap();
                alice.commit(vec![], &[leaf])
            }
            _ => alice.commit(vec![last.key_package()], &[]),
        };
        accept(&mut ds, &mut alice, &bundle);
        let snapshot = ds.snapshot().unwrap();
        let (form, after) = group_delta::next(&stored, &snapshot, chain);
        full_bytes += snapshot.len();
        if matches!(form, Stored::Delta(_)) {
            deltas += 1;
        }
        let write = GroupWrite {
            key: key.clone(),
            loaded: version,
            state: Some(GroupState {
                key: key.clone(),
                epoch: ds.epoch(),
                version: version + 1,
                snapshot: form.into_bytes(),
                chain: after,
            }),
            receipt: None,
            lazy: false,
        };
        written += write.state.as_ref().map_or(0, |s| s.snapshot.len());
        runtime
            .block_on(store.apply(write, Vec::new(), 10))
            .unwrap();
        (stored, chain, version) = (snapshot, after, version + 1);
        if step % 7 == 6 {
            // A restart: the store is closed and opened again, the group loaded from it.
            drop(store);
            writer.join();
            (store, writer) = open();
            let loaded = runtime
                .block_on(store.load_group(key.clone()))
                .unwrap()
                .unwrap();
            assert_eq!(
                (loaded.version, loaded.epoch, loaded.chain),
                (version, ds.epoch(), chain)
            );
            assert!(
                loaded.snapshot == stored,
                "step {step}: not the full snapshot"
            );
            let restored = DsGroup::from_snapshot(&loaded.snapshot).unwrap();
            assert_eq!(restored.members(), ds.members());
            assert_eq!(restored.export_ratchet_tree(), ds.export_ratchet_tree());
            assert_eq!(restored.group_info(), ds.group_info());
            ds = restored;
        }
    }
    // Even in this small group (≈ 6 KB snapshots, a delta ≈ 15 % of one) most writes are
    // deltas, and deltas with the bases written meanwhile are well under the full snapshots.
    assert!(deltas > 40, "{deltas} of 60 writes were deltas");
    assert!(
        written * 2 < full_bytes,
        "wrote {written} B, in full {full_bytes} B"
    );
    drop(store);
    writer.join();
}
