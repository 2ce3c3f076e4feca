//! Credential checks: a Welcome whose tree holds a leaf whose signature key is not the one
//! in that client's AS credential is refused by the receiving SDK; the same Welcome with the
//! honest key is accepted, unless the AS credential has expired by the receiver's clock.
//!
//! The Welcomes are made with raw openmls by "mallory" (a real, registered client) and put
//! into carol's queue directly with `Server::enqueue`, as the DS would. The same way, a
//! Welcome delivered twice is joined once and its copy dropped without an event.

use openmls::prelude::{
    BasicCredential, Ciphersuite, CredentialWithKey, GroupId as MlsGroupId, KeyPackageIn, MlsGroup,
    MlsGroupCreateConfig, ProtocolVersion,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::SignatureScheme;
use roost_client::Event;
use roost_protocol::messages::keypackage::ClaimClientKeyPackageRequest;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use roost_protocol::{ClientId, GroupId, MessageId};
use tls_codec::{DeserializeBytes, Serialize};

use crate::common::*;

/// A Welcome for `key_package` into a new group `group` whose creator's leaf claims to be
/// `identity` and signs with `leaf_key`.
fn welcome(
    identity: &ClientId,
    leaf_key: &SignatureKeyPair,
    group: &GroupId,
    key_package: &[u8],
) -> Vec<u8> {
    let provider = OpenMlsRustCrypto::default();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(identity.tls_serialize_detached().unwrap()).into(),
        signature_key: leaf_key.public().into(),
    };
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519)
        .use_ratchet_tree_extension(true)
        .build();
    let mut mls_group = MlsGroup::new_with_group_id(
        &provider,
        leaf_key,
        &config,
        MlsGroupId::from_slice(&group.to_mls_bytes()),
        credential,
    )
    .unwrap();
    let key_package = KeyPackageIn::tls_deserialize_exact_bytes(key_package)
        .unwrap()
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .unwrap();
    let (_commit, welcome, _) = mls_group
        .add_members(&provider, leaf_key, &[key_package])
        .unwrap();
    welcome.tls_serialize_detached().unwrap()
}

/// One of carol's KeyPackages, claimed over `conn`.
async fn claim_carol(conn: &roost_client::transport::Connection) -> Vec<u8> {
    conn.call(ClaimClientKeyPackageRequest {
        client: client_id("carol", "phone"),
    })
    .await
    .unwrap()
    .key_package
    .key_package
    .into_vec()
}

fn group_id(n: u8) -> GroupId {
    GroupId::new([n; 16], DOMAIN.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_key_that_does_not_match_the_as_credential_is_refused() {
    let t = start_server().await;
    let carol = t.register("carol").await;
    let (conn, mallory, mallory_key) = raw_client(&t, "mallory").await;
    let claim = || claim_carol(&conn);

    // Forged: mallory's leaf carries a key the AS never certified for mallory/phone.
    let forged_key = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    let forged_group = group_id(1);
    let forged = welcome(
        &mallory,
        &forged_key,
        &forged_group,
        claim().await.as_slice(),
    );
    t.server
        .enqueue(
            carol.client_id(),
            MessageId([1; 16]),
            QueuePayload::Welcome(GroupMessage {
                group: forged_group.clone(),
                message: forged.into(),
            }),
        )
        .await
        .unwrap();
    let event = wait_for(&carol, "rejection", |e| {
        matches!(e, Event::CredentialRejected { .. } | Event::Joined { .. })
    })
    .await;
    match event {
        Event::CredentialRejected { group, client, .. } => {
            assert_eq!(group, forged_group);
            assert_eq!(client, Some(mallory.clone()));
        }
        other => panic!("the forged Welcome was accepted: {other:?}"),
    }
    assert!(carol.groups().unwrap().is_empty());

    // Control: the same Welcome with mallory's real key is accepted.
    let honest_group = group_id(2);
    let honest = welcome(
        &mallory,
        &mallory_key,
        &honest_group,
        claim().await.as_slice(),
    );
    t.server
        .enqueue(
            carol.client_id(),
            MessageId([2; 16]),
            QueuePayload::Welcome(GroupMessage {
                group: honest_group.clone(),
                message: honest.into(),
            }),
        )
        .await
        .unwrap();
    let event = wait_for(&carol, "join", |e| {
        matches!(e, Event::CredentialRejected { .. } | Event::Joined { .. })
    })
    .await;
    assert_eq!(
        event,
        Event::Joined {
            group: honest_group.clone(),
            inviter: mallory
        }
    );
    assert_eq!(carol.groups().unwrap(), vec![honest_group]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_as_credential_has_expired_is_refused() {
    let t = start_server_with(|config| config.limits.credential_validity_secs = 3600).await;
    let clock = roost_client::clock::ManualClock::new();
    let mut config = t.client_config();
    config.clock = clock.clock();
    let carol = t.register_with("carol", config).await;
    let (conn, mallory, mallory_key) = raw_client(&t, "mallory").await;
    let key_package = conn
        .call(ClaimClientKeyPackageRequest {
            client: client_id("carol", "phone"),
        })
        .await
        .unwrap()
        .key_package
        .key_package;
    // Mallory's credential was issued for an hour; by carol's clock that hour and the
    // tolerated skew (300 s) are over. The Welcome is otherwise the honest one the test above
    // accepts.
    clock.advance(std::time::Duration::from_secs(3600 + 300 + 60));
    let group = group_id(3);
    let honest = welcome(&mallory, &mallory_key, &group, key_package.as_slice());
    t.server
        .enqueue(
            carol.client_id(),
            MessageId([3; 16]),
            QueuePayload::Welcome(GroupMessage {
                group: group.clone(),
                message: honest.into(),
            }),
        )
        .await
        .unwrap();
    let event = wait_for(&carol, "rejection", |e| {
        matches!(e, Event::CredentialRejected { .. } | Event::Joined { .. })
    })
    .await;
    match event {
        Event::CredentialRejected {
            group: refused,
            client,
            reason,
        } => {
            assert_eq!(refused, group);
            assert_eq!(client, Some(mallory));
            assert!(reason.contains("not valid now"), "{reason}");
        }
        other => panic!("a member with an expired credential was accepted: {other:?}"),
    }
    assert!(carol.groups().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_delivered_twice_is_joined_once_without_a_group_error() {
    let t = start_server().await;
    let carol = t.register("carol").await;
    let (conn, mallory, mallory_key) = raw_client(&t, "mallory").await;
    let claim = || claim_carol(&conn);
    let (first, second) = (group_id(3), group_id(4));
    let twice = welcome(&mallory, &mallory_key, &first, claim().await.as_slice());
    let then = welcome(&mallory, &mallory_key, &second, claim().await.as_slice());
    // The same Welcome twice (as a redelivery would queue it: another queue entry, the same
    // bytes), then a Welcome to another group.
    for (n, group, bytes) in [
        (3, &first, &twice),
        (4, &first, &twice),
        (5, &second, &then),
    ] {
        t.server
            .enqueue(
                carol.client_id(),
                MessageId([n; 16]),
                QueuePayload::Welcome(GroupMessage {
                    group: group.clone(),
                    message: bytes.clone().into(),
                }),
            )
            .await
            .unwrap();
    }
    let mut events = Vec::new();
    while events.len() < 2 {
        let event = wait_for(&carol, "join", |e| {
            matches!(
                e,
                Event::Joined { .. } | Event::GroupError { .. } | Event::CredentialRejected { .. }
            )
        })
        .await;
        events.push(event);
    }
    assert_eq!(
        events,
        [first.clone(), second.clone()].map(|group| Event::Joined {
            group,
            inviter: mallory.clone()
        })
    );
    let mut groups = carol.groups().unwrap();
    groups.sort();
    let mut expected = vec![first, second];
    expected.sort();
    assert_eq!(groups, expected);
}
