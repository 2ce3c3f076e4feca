//! Real openmls clients driving a [`DsGroup`], for the tests of the DS group engine.

use openmls::group::GroupId;
use openmls::prelude::Lifetime;
use openmls::prelude::{
    BasicCredential, CredentialWithKey, KeyPackage, LeafNodeIndex,
    MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider, ProcessedMessageContent,
    ProtocolMessage, RatchetTreeIn, SignatureScheme, StagedWelcome,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use tls_codec::{Deserialize as _, Serialize as _};

use super::{CIPHERSUITE, DsGroup};

pub(super) const GROUP_ID: &[u8] = b"group-1";
pub(super) const MAX: usize = 100;

pub(super) fn bytes(message: &MlsMessageOut) -> Vec<u8> {
    message.tls_serialize_detached().unwrap()
}

/// Flips one byte inside the signature of a PublicMessage commit from a member: the message
/// ends with signature<V> (1 + 64), confirmation_tag<V> (1 + 32), membership_tag<V> (1 + 32).
pub(super) fn flip_commit_signature(commit: &[u8]) -> Vec<u8> {
    let mut tampered = commit.to_vec();
    let at = tampered.len() - 66 - 30;
    tampered[at] ^= 0x01;
    tampered
}

pub(super) fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build()
}

/// A commit bundle as a client sends it to the DS.
pub(super) struct Bundle {
    pub(super) commit: Vec<u8>,
    pub(super) welcome: Option<Vec<u8>>,
    pub(super) group_info: Vec<u8>,
}

/// A real openmls client.
pub(super) struct Client {
    pub(super) identity: Vec<u8>,
    pub(super) provider: OpenMlsRustCrypto,
    pub(super) signer: SignatureKeyPair,
    pub(super) group: Option<MlsGroup>,
    /// Whether the GroupInfo of our commits carries the `ratchet_tree` extension (the default
    /// of some MLS libraries; the DS refuses it).
    pub(super) tree_in_group_info: bool,
}

impl Client {
    pub(super) fn new(name: &str) -> Client {
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        Client::with_signer(name, signer)
    }

    /// A fresh device state (lost state) of a client that keeps its signature key.
    pub(super) fn with_signer(name: &str, signer: SignatureKeyPair) -> Client {
        Client {
            identity: name.as_bytes().to_vec(),
            provider: OpenMlsRustCrypto::default(),
            signer,
            group: None,
            tree_in_group_info: false,
        }
    }

    pub(super) fn copy_of_signer(&self) -> SignatureKeyPair {
        SignatureKeyPair::tls_deserialize_exact(self.signer.tls_serialize_detached().unwrap())
            .unwrap()
    }

    pub(super) fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.identity.clone()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    pub(super) fn key_package(&self) -> KeyPackage {
        self.key_package_with_lifetime(Lifetime::default())
    }

    pub(super) fn key_package_with_lifetime(&self, lifetime: Lifetime) -> KeyPackage {
        KeyPackage::builder()
            .key_package_lifetime(lifetime)
            .build(CIPHERSUITE, &self.provider, &self.signer, self.credential())
            .unwrap()
            .key_package()
            .clone()
    }

    pub(super) fn group(&mut self) -> &mut MlsGroup {
        self.group.as_mut().unwrap()
    }

    pub(super) fn epoch(&mut self) -> u64 {
        self.group().epoch().as_u64()
    }

    pub(super) fn create_group(&mut self) {
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

    pub(super) fn group_info(&mut self, with_tree: bool) -> Vec<u8> {
        let group = self.group.as_ref().unwrap();
        bytes(
            &group
                .export_group_info(self.provider.crypto(), &self.signer, with_tree)
                .unwrap(),
        )
    }

    pub(super) fn tree(&mut self) -> Vec<u8> {
        self.group()
            .export_ratchet_tree()
            .tls_serialize_detached()
            .unwrap()
    }

    /// Builds (without merging) a commit with a path that adds and removes.
    pub(super) fn commit(&mut self, adds: Vec<KeyPackage>, removes: &[u32]) -> Bundle {
        let group = self.group.as_mut().unwrap();
        let bundle = group
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes.iter().map(|&i| LeafNodeIndex::new(i)))
            .force_self_update(true)
            .load_psks(self.provider.storage())
            .unwrap()
            .create_group_info(true)
            .use_ratchet_tree_extension(self.tree_in_group_info)
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

    pub(super) fn merge(&mut self) {
        let provider = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .merge_pending_commit(provider)
            .unwrap();
    }

    pub(super) fn discard_pending_commit(&mut self) {
        let provider = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .clear_pending_commit(provider.storage())
            .unwrap();
    }

    pub(super) fn join(&mut self, welcome: &[u8], tree: &[u8]) {
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
    pub(super) fn external_commit(&mut self, group_info: &[u8], tree: &[u8]) -> Bundle {
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
            .use_ratchet_tree_extension(self.tree_in_group_info)
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
    pub(super) fn receive(&mut self, message: &[u8]) {
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

    pub(super) fn leave(&mut self) -> Vec<u8> {
        let provider = &self.provider;
        let group = self.group.as_mut().unwrap();
        bytes(&group.leave_group(provider, &self.signer).unwrap())
    }

    pub(super) fn application_message(&mut self, text: &[u8]) -> Vec<u8> {
        let provider = &self.provider;
        let group = self.group.as_mut().unwrap();
        bytes(&group.create_message(provider, &self.signer, text).unwrap())
    }
}

/// Alice creates the group and registers it with the DS.
pub(super) fn alice_and_ds() -> (Client, DsGroup) {
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
pub(super) fn add(
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

pub(super) fn identities(members: &[super::Member]) -> Vec<Vec<u8>> {
    members.iter().map(|m| m.identity.clone()).collect()
}
