//! What PROTOCOL.md §4.4 promises an independent client: a minimal KeyPackage (version 1,
//! suite 1, BasicCredential, capabilities listing only those, no extensions anywhere) is
//! accepted; the SDK invites its owner; the owner joins from the Welcome alone (the ratchet
//! tree travels in the Welcome's GroupInfo) and reads the SDK's text messages (§4.5).

use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, CredentialType, CredentialWithKey, KeyPackage,
    KeyPackageIn, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroupJoinConfig, MlsMessageBodyIn,
    MlsMessageIn, ProcessedMessageContent, ProtocolMessage, ProtocolVersion, StagedWelcome,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use roost_client::Content;
use roost_protocol::messages::keypackage::UploadKeyPackagesRequest;
use roost_protocol::messages::queue::{QueueFetchRequest, QueuePayload};
use tls_codec::{Deserialize as _, Serialize as _};

use crate::common::*;

const SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minimal_key_package_is_accepted_and_its_owner_joins_from_the_welcome_alone() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    let (conn, bob, bob_key) = raw_client(&t, "bob").await;

    let provider = OpenMlsRustCrypto::default();
    let capabilities = Capabilities::new(
        Some(&[ProtocolVersion::Mls10]),
        Some(&[SUITE]),
        Some(&[]),
        Some(&[]),
        Some(&[CredentialType::Basic]),
    );
    let credential = CredentialWithKey {
        credential: BasicCredential::new(bob.tls_serialize_detached().unwrap()).into(),
        signature_key: bob_key.public().into(),
    };
    let bundle = KeyPackage::builder()
        .leaf_node_capabilities(capabilities)
        .build(SUITE, &provider, &bob_key, credential)
        .unwrap();
    let bytes = bundle.key_package().tls_serialize_detached().unwrap();
    // It is as minimal as claimed.
    let kp = KeyPackageIn::tls_deserialize_exact(bytes.as_slice())
        .unwrap()
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .unwrap();
    let caps = kp.leaf_node().capabilities();
    assert_eq!(caps.versions(), [ProtocolVersion::Mls10]);
    assert_eq!(caps.ciphersuites().len(), 1);
    assert!(caps.extensions().is_empty() && caps.proposals().is_empty());
    assert_eq!(caps.credentials(), [CredentialType::Basic]);
    assert_eq!(kp.extensions().iter().count(), 0);
    assert_eq!(kp.leaf_node().extensions().iter().count(), 0);

    let uploaded = conn
        .call(UploadKeyPackagesRequest {
            key_packages: vec![bytes.into()],
            last_resort: None,
        })
        .await
        .unwrap();
    assert_eq!(uploaded.remaining, 1);

    let group = alice.create_group().await.unwrap();
    assert_eq!(
        alice.invite(&group, &[user("bob")]).await.unwrap(),
        vec![bob.clone()]
    );
    alice.send_text(&group, "hello bob").await.unwrap();
    alice.flush().await.unwrap();

    let queued = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap()
        .messages;
    let [first, second] = queued.as_slice() else {
        panic!("expected a Welcome and a message, got {queued:?}");
    };
    let QueuePayload::Welcome(welcome) = &first.payload else {
        panic!("expected a Welcome first");
    };
    let MlsMessageBodyIn::Welcome(welcome) =
        MlsMessageIn::tls_deserialize_exact(welcome.message.as_slice())
            .unwrap()
            .extract()
    else {
        panic!("not a Welcome");
    };
    let join_config = MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    // No tree passed: it must come with the Welcome.
    let mut joined = StagedWelcome::new_from_welcome(&provider, &join_config, welcome, None)
        .unwrap()
        .into_group(&provider)
        .unwrap();
    assert_eq!(joined.epoch().as_u64(), 1);
    assert_eq!(joined.members().count(), 2);

    let QueuePayload::GroupMessage(message) = &second.payload else {
        panic!("expected the text message second");
    };
    let message: ProtocolMessage = MlsMessageIn::tls_deserialize_exact(message.message.as_slice())
        .unwrap()
        .try_into_protocol_message()
        .unwrap();
    let processed = joined.process_message(&provider, message).unwrap();
    let ProcessedMessageContent::ApplicationMessage(plaintext) = processed.into_content() else {
        panic!("not an application message");
    };
    assert_eq!(
        Content::decode(&plaintext.into_bytes()),
        Ok(Content::text("hello bob"))
    );
}
