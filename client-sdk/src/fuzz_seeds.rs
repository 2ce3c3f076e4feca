//! Seeds for the `sdk_incoming` fuzz target: a receiver (the SDK's MLS layer and profile
//! database) joins a real openmls sender's group from its Welcome; the seeds are what the
//! sender sends next (application message, commits that add, update, remove, a proposal) and a
//! Welcome to a second group. Every seed must be processed without error. With
//! `ROOST_SEED_FUZZ_CORPUS=1` the seeds go to `fuzz/corpus/sdk_incoming/` and the receiver's
//! profile and group id to `fuzz/state/` (see fuzz/README.md).

use std::path::PathBuf;

use openmls::prelude::{
    BasicCredential, CredentialWithKey, KeyPackage, KeyPackageIn,
    MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroup, MlsGroupCreateConfig, MlsMessageOut,
    ProtocolVersion,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::types::SignatureScheme;
use roost_protocol::{ClientId, GroupId};
use tls_codec::{DeserializeBytes as _, Serialize as _};

use super::{Receiver, SdkOp, encode_ops};
use crate::mls::{CIPHERSUITE, Identity, Mls, generate_key};
use crate::store::{Changes, Store};

fn bytes(message: &MlsMessageOut) -> Vec<u8> {
    message.tls_serialize_detached().unwrap()
}

/// A plain openmls client sending to the receiver.
struct Sender {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
}

impl Sender {
    fn new(client: &str) -> Self {
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let client: ClientId = client.parse().unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(client.tls_serialize_detached().unwrap()).into(),
            signature_key: signer.public().into(),
        };
        Self {
            provider: OpenMlsRustCrypto::default(),
            signer,
            credential,
        }
    }

    /// Creates a group and adds `key_package` to it; returns the group and the Welcome.
    fn group_with(&self, id: &GroupId, key_package: &[u8]) -> (MlsGroup, Vec<u8>) {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .build();
        let mut group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            openmls::group::GroupId::from_slice(&id.to_mls_bytes()),
            self.credential.clone(),
        )
        .unwrap();
        let key_package = KeyPackageIn::tls_deserialize_exact_bytes(key_package)
            .unwrap()
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .unwrap();
        let (_, welcome, _) = group
            .add_members(&self.provider, &self.signer, &[key_package])
            .unwrap();
        group.merge_pending_commit(&self.provider).unwrap();
        (group, bytes(&welcome))
    }

    fn key_package(&self) -> KeyPackage {
        KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .unwrap()
            .key_package()
            .clone()
    }
}

#[test]
fn sdk_incoming_fuzz_seeds_are_processed() {
    let seeding = std::env::var_os("ROOST_SEED_FUZZ_CORPUS").is_some();
    let temp = tempfile::tempdir().unwrap();
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let state = if seeding {
        fuzz.join("state")
    } else {
        temp.path().to_path_buf()
    };
    std::fs::create_dir_all(&state).unwrap();
    let profile = state.join("sdk_incoming.redb");
    let _ = std::fs::remove_file(&profile);

    // The receiver: two KeyPackages, one for its group, one for the Welcome seed.
    let store = std::sync::Arc::new(Store::open(&profile).unwrap());
    let mls = Mls::new(store.clone());
    let (key, _) = generate_key().unwrap();
    let identity = Identity::new("bob@example.org/phone".parse().unwrap(), &key).unwrap();
    let (key_packages, _) = mls.new_key_packages(&identity, 2, false).unwrap();
    store.commit(Changes::default()).unwrap();

    let alice = Sender::new("alice@example.org/laptop");
    let domain = "example.org".parse().unwrap();
    let group_id = GroupId::new([7; 16], domain);
    let (mut group, welcome) = alice.group_with(&group_id, &key_packages[0]);
    let join = mls.process_welcome(&welcome).unwrap();
    mls.finish_join(join).unwrap();
    store.commit(Changes::default()).unwrap();

    let other_group = GroupId::new([8; 16], "example.org".parse().unwrap());
    let (_, second_welcome) = alice.group_with(&other_group, &key_packages[1]);

    let provider = &alice.provider;
    let signer = &alice.signer;
    let hello = bytes(&group.create_message(provider, signer, b"hello").unwrap());
    let carol = Sender::new("carol@example.org/phone");
    let (add_carol, _, _) = group
        .add_members(provider, signer, &[carol.key_package()])
        .unwrap();
    group.clear_pending_commit(provider.storage()).unwrap();
    let remove_bob = group
        .remove_members(provider, signer, &[openmls::prelude::LeafNodeIndex::new(1)])
        .unwrap()
        .0;
    group.clear_pending_commit(provider.storage()).unwrap();
    let update = group
        .self_update(provider, signer, Default::default())
        .unwrap()
        .into_contents()
        .0;
    group.merge_pending_commit(provider).unwrap();
    let hello_epoch_2 = bytes(&group.create_message(provider, signer, b"again").unwrap());
    let leave = bytes(&group.leave_group(provider, signer).unwrap());

    let seeds = [
        ("application", vec![SdkOp::Group(hello.clone())]),
        ("add", vec![SdkOp::Group(bytes(&add_carol))]),
        ("remove", vec![SdkOp::Group(bytes(&remove_bob))]),
        (
            "update-then-application",
            vec![
                SdkOp::Group(hello),
                SdkOp::Group(bytes(&update)),
                SdkOp::Group(hello_epoch_2),
            ],
        ),
        (
            "update-then-leave",
            vec![SdkOp::Group(bytes(&update)), SdkOp::Group(leave)],
        ),
        ("welcome", vec![SdkOp::Welcome(second_welcome)]),
    ]
    .map(|(name, ops)| (name, encode_ops(&ops)));
    drop(mls);
    drop(store);

    let receiver = Receiver::open(&profile, &group_id.to_mls_bytes()).unwrap();
    for (name, input) in &seeds {
        for result in receiver.run(input) {
            result.unwrap_or_else(|e| panic!("seed {name} refused: {e}"));
        }
    }
    // Nothing was kept: the first seed is processed again.
    assert_eq!(receiver.run(&seeds[0].1), vec![Ok("application")]);

    if seeding {
        std::fs::write(state.join("sdk_incoming.group"), group_id.to_mls_bytes()).unwrap();
        let dir = fuzz.join("corpus/sdk_incoming");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, input) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
        }
    }
}

/// The SDK's replay detection reads openmls's typed errors: a second copy of a message whose
/// ratchet secret is used up is `Replayed` (dropped silently by the inbox), while a message
/// that fails decryption for another reason (a damaged ciphertext) is still refused.
#[test]
fn a_replayed_message_is_recognised_and_a_damaged_one_is_refused() {
    use crate::mls::MlsError;

    let temp = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&temp.path().join("bob.redb")).unwrap());
    let mls = Mls::new(store.clone());
    let (key, _) = generate_key().unwrap();
    let identity = Identity::new("bob@example.org/phone".parse().unwrap(), &key).unwrap();
    let (key_packages, _) = mls.new_key_packages(&identity, 1, false).unwrap();
    store.commit(Changes::default()).unwrap();
    let alice = Sender::new("alice@example.org/laptop");
    let group_id = GroupId::new([9; 16], "example.org".parse().unwrap());
    let (mut group, welcome) = alice.group_with(&group_id, &key_packages[0]);
    let join = mls.process_welcome(&welcome).unwrap();
    mls.finish_join(join).unwrap();
    store.commit(Changes::default()).unwrap();

    let (provider, signer) = (&alice.provider, &alice.signer);
    let hello = bytes(&group.create_message(provider, signer, b"hello").unwrap());
    mls.process(&group_id, &hello).unwrap();
    store.commit(Changes::default()).unwrap();
    assert!(matches!(
        mls.process(&group_id, &hello),
        Err(MlsError::Replayed)
    ));
    store.discard();

    let mut damaged = bytes(&group.create_message(provider, signer, b"again").unwrap());
    let last = damaged.len() - 1;
    damaged[last] ^= 0x01;
    match mls.process(&group_id, &damaged) {
        Err(MlsError::Refused { context, .. }) => assert_eq!(context, "processing"),
        Err(other) => panic!("a damaged message gave {other:?}"),
        Ok(_) => panic!("a damaged message was accepted"),
    }
}
