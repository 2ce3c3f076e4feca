//! Tests of the DS group engine against real openmls clients.

use std::time::Instant;

use openmls::prelude::{LeafNodeIndex, MlsMessageOut, OpenMlsProvider};

use super::test_client::{
    Client, GROUP_ID, MAX, add, alice_and_ds, bytes, flip_commit_signature, identities,
};
use super::{DsGroup, MessageKind, MlsError, inspect};

#[test]
fn create_accepts_a_fresh_group() {
    let (mut alice, ds) = alice_and_ds();
    assert_eq!(ds.epoch(), 0);
    assert_eq!(ds.group_id(), GROUP_ID);
    assert_eq!(identities(&ds.members()), vec![b"alice".to_vec()]);
    let me = ds.member_by_identity(b"alice").unwrap();
    assert_eq!(me.leaf_index, 0);
    assert_eq!(me.signature_key, alice.signer.public());
    assert!(ds.member_by_identity(b"bob").is_none());
    assert_eq!(ds.export_ratchet_tree(), alice.tree());
    assert!(ds.pending_proposals().is_empty());
}

#[test]
fn create_refuses_bad_inputs() {
    let mut alice = Client::new("alice");
    alice.create_group();
    let group_info = alice.group_info(false);
    let tree = alice.tree();
    assert_eq!(
        DsGroup::create(b"other", b"alice", &group_info, &tree, MAX).unwrap_err(),
        MlsError::WrongGroup
    );
    assert_eq!(
        DsGroup::create(GROUP_ID, b"mallory", &group_info, &tree, MAX).unwrap_err(),
        MlsError::SenderMismatch
    );
    assert_eq!(
        DsGroup::create(GROUP_ID, b"alice", &group_info, &tree, 0).unwrap_err(),
        MlsError::GroupTooLarge
    );
    // Signature byte flipped (the signature ends the GroupInfo).
    let mut tampered = group_info.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(matches!(
        DsGroup::create(GROUP_ID, b"alice", &tampered, &tree, MAX),
        Err(MlsError::InvalidGroupInfo(_))
    ));
    // A GroupInfo carrying the tree is refused (the DS serves the tree).
    assert_eq!(
        DsGroup::create(GROUP_ID, b"alice", &alice.group_info(true), &tree, MAX).unwrap_err(),
        MlsError::GroupInfoHasRatchetTree
    );
    // Garbage, a tree that is not the GroupInfo's, trailing bytes.
    assert!(matches!(
        DsGroup::create(GROUP_ID, b"alice", b"\x00\x01\x00", &tree, MAX),
        Err(MlsError::Malformed(_))
    ));
    let mut trailing = group_info.clone();
    trailing.push(0);
    assert!(matches!(
        DsGroup::create(GROUP_ID, b"alice", &trailing, &tree, MAX),
        Err(MlsError::Malformed(_))
    ));
    let mut other = Client::new("alice");
    other.create_group();
    assert!(matches!(
        DsGroup::create(GROUP_ID, b"alice", &group_info, &other.tree(), MAX),
        Err(MlsError::InvalidGroupInfo(_))
    ));
    // Epoch 1: after a commit.
    alice.commit(vec![], &[]);
    alice.merge();
    assert!(matches!(
        DsGroup::create(
            GROUP_ID,
            b"alice",
            &alice.group_info(false),
            &alice.tree(),
            MAX
        ),
        Err(MlsError::InvalidGroupInfo(_))
    ));
}

#[test]
fn add_one_then_twenty_members() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    let bundle = alice.commit(vec![bob.key_package()], &[]);
    assert_eq!(identities(&ds.members()), vec![b"alice".to_vec()]);
    let outcome = ds
        .process_commit(
            b"alice",
            &bundle.commit,
            bundle.welcome.as_deref(),
            &bundle.group_info,
            MAX,
        )
        .unwrap();
    alice.merge();
    assert_eq!(outcome.new_epoch, 1);
    assert_eq!(
        identities(&ds.members()),
        vec![b"alice".to_vec(), b"bob".to_vec()]
    );
    assert_eq!(identities(&outcome.added), vec![b"bob".to_vec()]);
    assert!(outcome.removed.is_empty());
    let committer = outcome.committer.unwrap();
    assert_eq!(
        (committer.leaf_index, committer.identity),
        (0, b"alice".to_vec())
    );
    assert_eq!(ds.group_info(), bundle.group_info);
    bob.join(
        bundle.welcome.as_deref().unwrap(),
        &ds.export_ratchet_tree(),
    );
    assert_eq!(bob.epoch(), ds.epoch());

    let mut joiners: Vec<Client> = (0..20)
        .map(|i| Client::new(&format!("member-{i}")))
        .collect();
    let key_packages = joiners.iter().map(Client::key_package).collect();
    let bundle = bob.commit(key_packages, &[]);
    let started = Instant::now();
    let outcome = ds
        .process_commit(
            b"bob",
            &bundle.commit,
            bundle.welcome.as_deref(),
            &bundle.group_info,
            MAX,
        )
        .unwrap();
    eprintln!(
        "process_commit adding 20 to a group of 2: {:?}",
        started.elapsed()
    );
    bob.merge();
    alice.receive(&bundle.commit);
    assert_eq!(outcome.new_epoch, 2);
    assert_eq!(ds.members().len(), 22);
    assert_eq!(outcome.added.len(), 20);
    // The added members are the new leaves, in leaf order.
    assert_eq!(
        outcome
            .added
            .iter()
            .map(|m| m.leaf_index)
            .collect::<Vec<_>>(),
        (2..22).collect::<Vec<u32>>()
    );
    assert_eq!(outcome.committer.unwrap().identity, b"bob");
    let tree = ds.export_ratchet_tree();
    assert_eq!(tree, alice.tree());
    for joiner in &mut joiners {
        joiner.join(bundle.welcome.as_deref().unwrap(), &tree);
        assert_eq!(joiner.epoch(), ds.epoch());
    }

    // A commit with a path in the 22-member group.
    let bundle = joiners[7].commit(vec![], &[]);
    let started = Instant::now();
    ds.process_commit(b"member-7", &bundle.commit, None, &bundle.group_info, MAX)
        .unwrap();
    eprintln!(
        "process_commit of an update in a group of 22: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_refused_commit_leaves_the_state_unchanged() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    let bundle = alice.commit(vec![bob.key_package()], &[]);
    let welcome = bundle.welcome.as_deref();
    let before = (
        ds.epoch(),
        ds.members(),
        ds.export_ratchet_tree(),
        ds.group_info(),
    );

    let tampered = flip_commit_signature(&bundle.commit);
    assert!(matches!(
        ds.process_commit(b"alice", &tampered, welcome, &bundle.group_info, MAX),
        Err(MlsError::InvalidCommit(_))
    ));
    assert_eq!(
        ds.process_commit(b"mallory", &bundle.commit, welcome, &bundle.group_info, MAX)
            .unwrap_err(),
        MlsError::NotMember
    );
    assert_eq!(
        ds.process_commit(b"alice", &bundle.commit, None, &bundle.group_info, MAX)
            .unwrap_err(),
        MlsError::MissingWelcome
    );
    assert_eq!(
        ds.process_commit(b"alice", &bundle.commit, welcome, &bundle.group_info, 1)
            .unwrap_err(),
        MlsError::GroupTooLarge
    );
    // The GroupInfo of the old epoch, and one of the right epoch but signed by someone else.
    assert!(matches!(
        ds.process_commit(b"alice", &bundle.commit, welcome, &ds.group_info(), MAX),
        Err(MlsError::InvalidGroupInfo(_))
    ));
    let mut tampered_info = bundle.group_info.clone();
    *tampered_info.last_mut().unwrap() ^= 1;
    assert!(matches!(
        ds.process_commit(b"alice", &bundle.commit, welcome, &tampered_info, MAX),
        Err(MlsError::InvalidGroupInfo(_))
    ));
    // Not a commit where a commit belongs.
    assert_eq!(
        ds.process_commit(
            b"alice",
            &bundle.group_info,
            welcome,
            &bundle.group_info,
            MAX
        )
        .unwrap_err(),
        MlsError::WrongContentType
    );
    assert!(matches!(
        ds.process_commit(
            b"alice",
            &bundle.commit[..40],
            welcome,
            &bundle.group_info,
            MAX
        ),
        Err(MlsError::Malformed(_))
    ));
    assert_eq!(
        before,
        (
            ds.epoch(),
            ds.members(),
            ds.export_ratchet_tree(),
            ds.group_info()
        )
    );

    // The original bundle still applies.
    ds.process_commit(b"alice", &bundle.commit, welcome, &bundle.group_info, MAX)
        .unwrap();
    alice.merge();
    bob.join(welcome.unwrap(), &ds.export_ratchet_tree());
    assert_eq!(ds.epoch(), 1);

    // A GroupInfo of the new epoch, but signed by another member than the committer.
    let bundle = alice.commit(vec![], &[]);
    bob.receive(&bundle.commit);
    let from_bob = bob.group_info(false);
    assert_eq!(
        ds.process_commit(b"alice", &bundle.commit, None, &from_bob, MAX),
        Err(MlsError::InvalidGroupInfo(
            "the GroupInfo is not signed by the committer".into()
        ))
    );
    ds.process_commit(b"alice", &bundle.commit, None, &bundle.group_info, MAX)
        .unwrap();
    alice.merge();

    // Bob's identity sending Alice's commit.
    let bundle = alice.commit(vec![], &[]);
    assert_eq!(
        ds.process_commit(b"bob", &bundle.commit, None, &bundle.group_info, MAX)
            .unwrap_err(),
        MlsError::SenderMismatch
    );
}

#[test]
fn welcome_must_match_the_added_key_packages() {
    let (mut alice, mut ds) = alice_and_ds();
    let bob = Client::new("bob");
    let carol = Client::new("carol");
    let for_bob = alice.commit(vec![bob.key_package()], &[]);
    alice.discard_pending_commit();
    let for_carol = alice.commit(vec![carol.key_package()], &[]);
    assert!(matches!(
        ds.process_commit(
            b"alice",
            &for_carol.commit,
            for_bob.welcome.as_deref(),
            &for_carol.group_info,
            MAX
        ),
        Err(MlsError::InvalidWelcome(_))
    ));
    assert!(matches!(
        ds.process_commit(
            b"alice",
            &for_carol.commit,
            Some(&b"junk"[..]),
            &for_carol.group_info,
            MAX
        ),
        Err(MlsError::InvalidWelcome(_))
    ));
    // A Welcome with a commit that adds nobody.
    alice.discard_pending_commit();
    let update = alice.commit(vec![], &[]);
    assert!(matches!(
        ds.process_commit(
            b"alice",
            &update.commit,
            for_carol.welcome.as_deref(),
            &update.group_info,
            MAX
        ),
        Err(MlsError::InvalidWelcome(_))
    ));
    ds.process_commit(b"alice", &update.commit, None, &update.group_info, MAX)
        .unwrap();
}

#[test]
fn identities_stay_unique() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);
    // Another device claiming Bob's identity with another key.
    let fake_bob = Client::new("bob");
    let bundle = alice.commit(vec![fake_bob.key_package()], &[]);
    assert!(matches!(
        ds.process_commit(
            b"alice",
            &bundle.commit,
            bundle.welcome.as_deref(),
            &bundle.group_info,
            MAX
        ),
        Err(MlsError::InvalidCommit(_))
    ));
    // The credential check of the caller sees the added credentials.
    alice.discard_pending_commit();
    let carol = Client::new("carol");
    let bundle = alice.commit(vec![carol.key_package()], &[]);
    let refuse_carol = |identity: &[u8], _: &[u8]| Some(identity != b"carol");
    assert!(matches!(
        ds.process_commit_checked(
            b"alice",
            &bundle.commit,
            bundle.welcome.as_deref(),
            &bundle.group_info,
            MAX,
            &refuse_carol
        ),
        Err(MlsError::InvalidCommit(_))
    ));
    assert_eq!(ds.members().len(), 2);
    // A check that cannot decide yet: the commit is checked completely but not merged.
    let undecided = |_: &[u8], _: &[u8]| None;
    assert!(matches!(
        ds.process_commit_checked(
            b"alice",
            &bundle.commit,
            bundle.welcome.as_deref(),
            &bundle.group_info,
            MAX,
            &undecided
        ),
        Err(MlsError::CredentialsUnverified)
    ));
    assert_eq!((ds.members().len(), ds.epoch()), (2, 1));
    // Once decided, the same commit goes through.
    ds.process_commit_checked(
        b"alice",
        &bundle.commit,
        bundle.welcome.as_deref(),
        &bundle.group_info,
        MAX,
        &|_: &[u8], _: &[u8]| Some(true),
    )
    .unwrap();
    assert_eq!(ds.members().len(), 3);
}

#[test]
fn epochs_first_commit_wins() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);
    let from_alice = alice.commit(vec![], &[]);
    let from_bob = bob.commit(vec![], &[]);
    ds.process_commit(
        b"alice",
        &from_alice.commit,
        None,
        &from_alice.group_info,
        MAX,
    )
    .unwrap();
    alice.merge();
    assert_eq!(
        ds.process_commit(b"bob", &from_bob.commit, None, &from_bob.group_info, MAX)
            .unwrap_err(),
        MlsError::StaleEpoch { current: 2 }
    );
    bob.discard_pending_commit();
    bob.receive(&from_alice.commit);

    // Alice runs ahead of the DS.
    alice.commit(vec![], &[]);
    alice.merge();
    let ahead = alice.commit(vec![], &[]);
    assert_eq!(
        ds.process_commit(b"alice", &ahead.commit, None, &ahead.group_info, MAX)
            .unwrap_err(),
        MlsError::FutureEpoch { current: 2 }
    );
}

#[test]
fn remove_a_member() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    let mut carol = Client::new("carol");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob, &mut carol]);
    assert_eq!(ds.members().len(), 3);
    let bundle = alice.commit(vec![], &[1]);
    let outcome = ds
        .process_commit(b"alice", &bundle.commit, None, &bundle.group_info, MAX)
        .unwrap();
    alice.merge();
    carol.receive(&bundle.commit);
    assert_eq!(identities(&outcome.removed), vec![b"bob".to_vec()]);
    assert_eq!(
        identities(&ds.members()),
        vec![b"alice".to_vec(), b"carol".to_vec()]
    );
    assert!(outcome.added.is_empty());
    assert!(ds.member_by_identity(b"bob").is_none());
    assert_eq!(carol.epoch(), ds.epoch());
}

#[test]
fn a_leave_must_be_committed() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    let mut carol = Client::new("carol");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob, &mut carol]);

    let leave = bob.leave();
    assert_eq!(
        ds.add_leave_proposal(b"carol", &leave).unwrap_err(),
        MlsError::SenderMismatch
    );
    assert_eq!(
        ds.add_leave_proposal(b"mallory", &leave).unwrap_err(),
        MlsError::NotMember
    );
    let recipients = ds.add_leave_proposal(b"bob", &leave).unwrap();
    assert_eq!(recipients.len(), 3);
    // Idempotent.
    ds.add_leave_proposal(b"bob", &leave).unwrap();
    assert_eq!(ds.pending_proposals(), vec![leave.clone()]);

    // A proposal removing someone else is not a leave.
    let provider = &carol.provider;
    let (remove_alice, _) = carol
        .group
        .as_mut()
        .unwrap()
        .propose_remove_member(provider, &carol.signer, LeafNodeIndex::new(0))
        .unwrap();
    assert!(matches!(
        ds.add_leave_proposal(b"carol", &bytes(&remove_alice)),
        Err(MlsError::InvalidProposal(_))
    ));
    let provider = &carol.provider;
    carol
        .group
        .as_mut()
        .unwrap()
        .clear_pending_proposals(provider.storage())
        .unwrap();

    // Carol has not seen the leave: her commit does not cover it.
    let without = carol.commit(vec![], &[]);
    assert_eq!(
        ds.process_commit(b"carol", &without.commit, None, &without.group_info, MAX)
            .unwrap_err(),
        MlsError::MissingProposals
    );
    carol.discard_pending_commit();

    alice.receive(&leave);
    carol.receive(&leave);
    let with = alice.commit(vec![], &[]);
    let outcome = ds
        .process_commit(b"alice", &with.commit, None, &with.group_info, MAX)
        .unwrap();
    alice.merge();
    carol.receive(&with.commit);
    assert_eq!(identities(&outcome.removed), vec![b"bob".to_vec()]);
    assert!(outcome.discarded_proposals.is_empty());
    assert!(ds.pending_proposals().is_empty());
    assert_eq!(carol.epoch(), ds.epoch());
    // A leave of an old epoch.
    assert_eq!(
        ds.add_leave_proposal(b"bob", &leave).unwrap_err(),
        MlsError::StaleEpoch { current: 2 }
    );
}

#[test]
fn external_commits_join_and_rejoin() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);

    // Dave joins from the DS's GroupInfo and tree.
    let mut dave = Client::new("dave");
    let bundle = dave.external_commit(&ds.group_info(), &ds.export_ratchet_tree());
    assert!(matches!(
        ds.process_external_commit(b"mallory", &bundle.commit, &bundle.group_info, MAX),
        Err(MlsError::SenderMismatch)
    ));
    let outcome = ds
        .process_external_commit(b"dave", &bundle.commit, &bundle.group_info, MAX)
        .unwrap();
    assert_eq!(identities(&outcome.added), vec![b"dave".to_vec()]);
    assert_eq!(outcome.committer.unwrap().identity, b"dave");
    assert!(outcome.removed.is_empty());
    alice.receive(&bundle.commit);
    bob.receive(&bundle.commit);

    // Bob lost his state; with the same signature key openmls removes his old leaf.
    let mut new_bob = Client::with_signer("bob", bob.copy_of_signer());
    let bundle = new_bob.external_commit(&ds.group_info(), &ds.export_ratchet_tree());
    // Through the member path it is refused.
    assert_eq!(
        ds.process_commit(b"bob", &bundle.commit, None, &bundle.group_info, MAX)
            .unwrap_err(),
        MlsError::NotMember
    );
    let outcome = ds
        .process_external_commit(b"bob", &bundle.commit, &bundle.group_info, MAX)
        .unwrap();
    assert_eq!(identities(&outcome.removed), vec![b"bob".to_vec()]);
    assert_eq!(identities(&outcome.added), vec![b"bob".to_vec()]);
    assert_eq!(ds.members().len(), 3);
    alice.receive(&bundle.commit);
    dave.receive(&bundle.commit);
    assert_eq!(alice.epoch(), ds.epoch());
    assert_eq!(new_bob.epoch(), ds.epoch());

    // A rejoin that keeps the old leaf (new key, so openmls adds no Remove) is refused.
    let mut other_bob = Client::new("bob");
    let bundle = other_bob.external_commit(&ds.group_info(), &ds.export_ratchet_tree());
    assert!(matches!(
        ds.process_external_commit(b"bob", &bundle.commit, &bundle.group_info, MAX),
        Err(MlsError::InvalidCommit(_))
    ));
    // A member commit is not an external commit.
    let update = alice.commit(vec![], &[]);
    assert!(matches!(
        ds.process_external_commit(b"alice", &update.commit, &update.group_info, MAX),
        Err(MlsError::InvalidCommit(_))
    ));
    ds.process_commit(b"alice", &update.commit, None, &update.group_info, MAX)
        .unwrap();
}

#[test]
fn application_messages_within_the_epoch_window() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);
    let message = bob.application_message(b"hello");
    ds.check_application_message(&message, 0).unwrap();
    let info = inspect(&message).unwrap();
    assert_eq!(
        (info.group_id.as_slice(), info.epoch, info.kind),
        (GROUP_ID, 1, MessageKind::Private)
    );

    for _ in 0..2 {
        let bundle = alice.commit(vec![], &[]);
        ds.process_commit(b"alice", &bundle.commit, None, &bundle.group_info, MAX)
            .unwrap();
        alice.merge();
        bob.receive(&bundle.commit);
    }
    assert_eq!(
        ds.check_application_message(&message, 1).unwrap_err(),
        MlsError::StaleEpoch { current: 3 }
    );
    ds.check_application_message(&message, 2).unwrap();
    ds.check_application_message(&bob.application_message(b"now"), 0)
        .unwrap();

    let bundle = alice.commit(vec![], &[]);
    assert_eq!(
        ds.check_application_message(&bundle.commit, 5).unwrap_err(),
        MlsError::WrongContentType
    );
    // Ahead of the DS.
    alice.merge();
    assert_eq!(
        ds.check_application_message(&alice.application_message(b"ahead"), 5)
            .unwrap_err(),
        MlsError::FutureEpoch { current: 3 }
    );
}

#[test]
fn inspect_names_every_kind() {
    let (mut alice, _ds) = alice_and_ds();
    let bob = Client::new("bob");
    let key_package = bytes(&MlsMessageOut::from(bob.key_package()));
    assert_eq!(inspect(&key_package).unwrap().kind, MessageKind::KeyPackage);
    let bundle = alice.commit(vec![bob.key_package()], &[]);
    let commit = inspect(&bundle.commit).unwrap();
    assert_eq!(
        (commit.group_id.as_slice(), commit.epoch, commit.kind),
        (GROUP_ID, 0, MessageKind::PublicCommit)
    );
    assert_eq!(
        inspect(bundle.welcome.as_deref().unwrap()).unwrap().kind,
        MessageKind::Welcome
    );
    let group_info = inspect(&bundle.group_info).unwrap();
    assert_eq!(
        (group_info.epoch, group_info.kind),
        (1, MessageKind::GroupInfo)
    );
    alice.merge();
    let leave = alice.leave();
    assert_eq!(inspect(&leave).unwrap().kind, MessageKind::PublicProposal);
    let mut trailing = bundle.commit.clone();
    trailing.push(0);
    assert!(matches!(inspect(&trailing), Err(MlsError::Malformed(_))));
    assert!(matches!(inspect(&[]), Err(MlsError::Malformed(_))));
}

/// `group_info` (an MLSMessage GroupInfo signed by `signer`) re-signed by `signer`, with its
/// extensions kept or dropped: GroupInfoTBS = group_context || extensions<V> ||
/// confirmation_tag<V> || uint32 signer, signed as SignContent("MLS 1.0 GroupInfoTBS", tbs).
fn resigned(signer: &Client, group_info: &[u8], keep_extensions: bool) -> Vec<u8> {
    use openmls::prelude::{MlsMessageBodyIn, MlsMessageIn, Verifiable as _};
    use openmls_traits::signatures::Signer as _;
    use tls_codec::{Deserialize as _, Serialize as _, Size as _, VLBytes};
    let MlsMessageBodyIn::GroupInfo(info) = MlsMessageIn::tls_deserialize_exact(group_info)
        .unwrap()
        .extract()
    else {
        panic!("not a GroupInfo");
    };
    let payload = info.unsigned_payload().unwrap();
    let context_len = info.group_context().tls_serialized_len();
    let prefix_len = context_len + info.extensions().tls_serialized_len();
    let mut tbs = payload[..context_len].to_vec();
    if keep_extensions {
        tbs.extend_from_slice(&payload[context_len..prefix_len]);
    } else {
        tbs.push(0); // an empty extension vector
    }
    tbs.extend_from_slice(&payload[prefix_len..]);
    let mut content = VLBytes::new(b"MLS 1.0 GroupInfoTBS".to_vec())
        .tls_serialize_detached()
        .unwrap();
    content.extend(VLBytes::new(tbs.clone()).tls_serialize_detached().unwrap());
    let signature = signer.signer.sign(&content).unwrap();
    let mut out = vec![0, 1, 0, 4]; // MLSMessage: mls10, wire format group_info
    out.extend(tbs);
    out.extend(VLBytes::new(signature).tls_serialize_detached().unwrap());
    out
}

#[test]
fn group_infos_with_the_tree_or_without_external_pub_are_refused_by_name() {
    // CreateGroup: without external_pub (otherwise valid: the same GroupInfo re-signed with its
    // extensions kept is accepted).
    let mut alice = Client::new("alice");
    alice.create_group();
    let tree = alice.tree();
    let info = alice.group_info(false);
    assert_eq!(
        DsGroup::create(
            GROUP_ID,
            b"alice",
            &resigned(&alice, &info, false),
            &tree,
            MAX
        )
        .unwrap_err(),
        MlsError::GroupInfoWithoutExternalPub
    );
    let mut ds = DsGroup::create(
        GROUP_ID,
        b"alice",
        &resigned(&alice, &info, true),
        &tree,
        MAX,
    )
    .unwrap();

    // Commit: openmls puts the tree into the GroupInfo with `use_ratchet_tree_extension`.
    let mut bob = Client::new("bob");
    alice.tree_in_group_info = true;
    let bundle = alice.commit(vec![bob.key_package()], &[]);
    let before = (ds.epoch(), ds.members(), ds.group_info());
    assert_eq!(
        ds.process_commit(
            b"alice",
            &bundle.commit,
            bundle.welcome.as_deref(),
            &bundle.group_info,
            MAX
        )
        .unwrap_err(),
        MlsError::GroupInfoHasRatchetTree
    );
    // The same commit with a GroupInfo re-signed without extensions lacks external_pub.
    assert_eq!(
        ds.process_commit(
            b"alice",
            &bundle.commit,
            bundle.welcome.as_deref(),
            &resigned(&alice, &bundle.group_info, false),
            MAX
        )
        .unwrap_err(),
        MlsError::GroupInfoWithoutExternalPub
    );
    assert_eq!(before, (ds.epoch(), ds.members(), ds.group_info()));
    alice.discard_pending_commit();
    alice.tree_in_group_info = false;
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob]);

    // ExternalJoin.
    let mut dave = Client::new("dave");
    dave.tree_in_group_info = true;
    let bundle = dave.external_commit(&ds.group_info(), &ds.export_ratchet_tree());
    assert_eq!(
        ds.process_external_commit(b"dave", &bundle.commit, &bundle.group_info, MAX)
            .unwrap_err(),
        MlsError::GroupInfoHasRatchetTree
    );
    assert_eq!(ds.epoch(), 1);
}
