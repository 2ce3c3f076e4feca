//! Tests of the DS group engine against real openmls clients.

use std::time::Instant;

use openmls::group::GroupId;
use openmls::prelude::{
    BasicCredential, CredentialWithKey, KeyPackage, LeafNodeIndex,
    MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider, ProcessedMessageContent,
    ProtocolMessage, RatchetTreeIn, SignatureScheme, StagedWelcome,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use tls_codec::{Deserialize as _, Serialize as _};

use super::{CIPHERSUITE, DsGroup, MessageKind, MlsError, inspect};

const GROUP_ID: &[u8] = b"group-1";
const MAX: usize = 100;

fn bytes(message: &MlsMessageOut) -> Vec<u8> {
    message.tls_serialize_detached().unwrap()
}

/// Flips one byte inside the signature of a PublicMessage commit from a member: the message
/// ends with signature<V> (1 + 64), confirmation_tag<V> (1 + 32), membership_tag<V> (1 + 32).
fn flip_commit_signature(commit: &[u8]) -> Vec<u8> {
    let mut tampered = commit.to_vec();
    let at = tampered.len() - 66 - 30;
    tampered[at] ^= 0x01;
    tampered
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build()
}

/// A commit bundle as a client sends it to the DS.
struct Bundle {
    commit: Vec<u8>,
    welcome: Option<Vec<u8>>,
    group_info: Vec<u8>,
}

/// A real openmls client.
struct Client {
    identity: Vec<u8>,
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    group: Option<MlsGroup>,
}

impl Client {
    fn new(name: &str) -> Client {
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        Client::with_signer(name, signer)
    }

    /// A fresh device state (lost state) of a client that keeps its signature key.
    fn with_signer(name: &str, signer: SignatureKeyPair) -> Client {
        Client {
            identity: name.as_bytes().to_vec(),
            provider: OpenMlsRustCrypto::default(),
            signer,
            group: None,
        }
    }

    fn copy_of_signer(&self) -> SignatureKeyPair {
        SignatureKeyPair::tls_deserialize_exact(self.signer.tls_serialize_detached().unwrap())
            .unwrap()
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.identity.clone()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    fn key_package(&self) -> KeyPackage {
        KeyPackage::builder()
            .build(CIPHERSUITE, &self.provider, &self.signer, self.credential())
            .unwrap()
            .key_package()
            .clone()
    }

    fn group(&mut self) -> &mut MlsGroup {
        self.group.as_mut().unwrap()
    }

    fn epoch(&mut self) -> u64 {
        self.group().epoch().as_u64()
    }

    fn create_group(&mut self) {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(GROUP_ID),
            self.credential(),
        )
        .unwrap();
        self.group = Some(group);
    }

    fn group_info(&mut self, with_tree: bool) -> Vec<u8> {
        let group = self.group.as_ref().unwrap();
        bytes(
            &group
                .export_group_info(self.provider.crypto(), &self.signer, with_tree)
                .unwrap(),
        )
    }

    fn tree(&mut self) -> Vec<u8> {
        self.group()
            .export_ratchet_tree()
            .tls_serialize_detached()
            .unwrap()
    }

    /// Builds (without merging) a commit with a path that adds and removes.
    fn commit(&mut self, adds: Vec<KeyPackage>, removes: &[u32]) -> Bundle {
        let group = self.group.as_mut().unwrap();
        let bundle = group
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes.iter().map(|&i| LeafNodeIndex::new(i)))
            .force_self_update(true)
            .load_psks(self.provider.storage())
            .unwrap()
            .create_group_info(true)
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.signer,
                |_| true,
            )
            .unwrap()
            .stage_commit(&self.provider)
            .unwrap();
        let welcome = bundle.to_welcome_msg().map(|w| bytes(&w));
        let (commit, _, group_info) = bundle.into_contents();
        Bundle {
            commit: bytes(&commit),
            welcome,
            group_info: bytes(&MlsMessageOut::from(group_info.unwrap())),
        }
    }

    fn merge(&mut self) {
        let provider = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .merge_pending_commit(provider)
            .unwrap();
    }

    fn discard_pending_commit(&mut self) {
        let provider = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .clear_pending_commit(provider.storage())
            .unwrap();
    }

    fn join(&mut self, welcome: &[u8], tree: &[u8]) {
        let MlsMessageBodyIn::Welcome(welcome) = MlsMessageIn::tls_deserialize_exact(welcome)
            .unwrap()
            .extract()
        else {
            panic!("not a Welcome");
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(tree).unwrap();
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, Some(tree))
                .unwrap();
        self.group = Some(staged.into_group(&self.provider).unwrap());
    }

    /// Joins (or rejoins) by external commit from the DS's GroupInfo and tree.
    fn external_commit(&mut self, group_info: &[u8], tree: &[u8]) -> Bundle {
        let MlsMessageBodyIn::GroupInfo(group_info) =
            MlsMessageIn::tls_deserialize_exact(group_info)
                .unwrap()
                .extract()
        else {
            panic!("not a GroupInfo");
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(tree).unwrap();
        let (group, bundle) = MlsGroup::external_commit_builder()
            .with_ratchet_tree(tree)
            .with_config(join_config())
            .build_group(&self.provider, group_info, self.credential())
            .unwrap()
            .load_psks(self.provider.storage())
            .unwrap()
            .create_group_info(true)
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.signer,
                |_| true,
            )
            .unwrap()
            .finalize(&self.provider)
            .unwrap();
        self.group = Some(group);
        let (commit, _, group_info) = bundle.into_contents();
        Bundle {
            commit: bytes(&commit),
            welcome: None,
            group_info: bytes(&MlsMessageOut::from(group_info.unwrap())),
        }
    }

    /// Processes a handshake message the DS fanned out: merges commits, stores proposals.
    fn receive(&mut self, message: &[u8]) {
        let message: ProtocolMessage = MlsMessageIn::tls_deserialize_exact(message)
            .unwrap()
            .try_into_protocol_message()
            .unwrap();
        let provider = &self.provider;
        let group = self.group.as_mut().unwrap();
        let processed = group.process_message(provider, message).unwrap();
        match processed.into_content() {
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                group.merge_staged_commit(provider, *staged).unwrap();
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                group
                    .store_pending_proposal(provider.storage(), *proposal)
                    .unwrap();
            }
            _ => panic!("unexpected message"),
        }
    }

    fn leave(&mut self) -> Vec<u8> {
        let provider = &self.provider;
        let group = self.group.as_mut().unwrap();
        bytes(&group.leave_group(provider, &self.signer).unwrap())
    }

    fn application_message(&mut self, text: &[u8]) -> Vec<u8> {
        let provider = &self.provider;
        let group = self.group.as_mut().unwrap();
        bytes(&group.create_message(provider, &self.signer, text).unwrap())
    }
}

/// Alice creates the group and registers it with the DS.
fn alice_and_ds() -> (Client, DsGroup) {
    let mut alice = Client::new("alice");
    alice.create_group();
    let ds = DsGroup::create(
        GROUP_ID,
        b"alice",
        &alice.group_info(false),
        &alice.tree(),
        MAX,
    )
    .unwrap();
    (alice, ds)
}

/// Alice adds the given clients (accepted by the DS); they join from the Welcome.
fn add(
    ds: &mut DsGroup,
    committer: &mut Client,
    others: &mut [&mut Client],
    new: &mut [&mut Client],
) {
    let key_packages = new.iter().map(|c| c.key_package()).collect();
    let bundle = committer.commit(key_packages, &[]);
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
    for other in others {
        other.receive(&bundle.commit);
    }
    let tree = ds.export_ratchet_tree();
    for joiner in new {
        joiner.join(bundle.welcome.as_deref().unwrap(), &tree);
    }
}

fn identities(members: &[super::Member]) -> Vec<Vec<u8>> {
    members.iter().map(|m| m.identity.clone()).collect()
}

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
    assert!(matches!(
        DsGroup::create(GROUP_ID, b"alice", &alice.group_info(true), &tree, MAX),
        Err(MlsError::InvalidGroupInfo(_))
    ));
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
    assert_eq!(identities(&outcome.members_before), vec![b"alice".to_vec()]);
    assert_eq!(
        identities(&outcome.members_after),
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
    assert_eq!(outcome.members_before.len(), 2);
    assert_eq!(outcome.members_after.len(), 22);
    assert_eq!(outcome.added.len(), 20);
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
    let refuse_carol = |identity: &[u8], _: &[u8]| identity != b"carol";
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
    let bundle = alice.commit(vec![], &[1]);
    let outcome = ds
        .process_commit(b"alice", &bundle.commit, None, &bundle.group_info, MAX)
        .unwrap();
    alice.merge();
    carol.receive(&bundle.commit);
    assert_eq!(identities(&outcome.removed), vec![b"bob".to_vec()]);
    assert_eq!(identities(&outcome.members_before).len(), 3);
    assert_eq!(
        identities(&outcome.members_after),
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
    assert_eq!(outcome.members_after.len(), 3);
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
fn restore_continues_where_it_left() {
    let (mut alice, mut ds) = alice_and_ds();
    let mut bob = Client::new("bob");
    let mut carol = Client::new("carol");
    add(&mut ds, &mut alice, &mut [], &mut [&mut bob, &mut carol]);
    let leave = carol.leave();
    ds.add_leave_proposal(b"carol", &leave).unwrap();

    let mut restored = DsGroup::restore(
        &ds.group_info(),
        &ds.export_ratchet_tree(),
        &ds.pending_proposals(),
    )
    .unwrap();
    assert_eq!(restored.epoch(), ds.epoch());
    assert_eq!(restored.group_id(), ds.group_id());
    assert_eq!(restored.members(), ds.members());
    assert_eq!(restored.pending_proposals(), vec![leave.clone()]);

    // The restored group still insists on the pending leave.
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

    assert!(matches!(
        DsGroup::restore(&ds.group_info(), b"\x01", &[]),
        Err(MlsError::Malformed(_))
    ));
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
