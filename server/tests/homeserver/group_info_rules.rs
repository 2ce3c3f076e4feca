//! PROTOCOL.md §4.4 over the wire: a GroupInfo carrying the `ratchet_tree` extension (what
//! openmls makes for a group created with `use_ratchet_tree_extension`) is refused with
//! GROUP_INFO_HAS_RATCHET_TREE on CreateGroup and on Commit, and nothing is created, stored or
//! queued; the same group made without it works.

use openmls::prelude::{
    BasicCredential, CredentialWithKey, GroupId as MlsGroupId, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY,
    MlsGroup, MlsGroupCreateConfig, OpenMlsProvider as _, tls_codec::Serialize as _,
};
use roost_protocol::messages::delivery::*;
use roost_protocol::messages::queue::QueueFetchRequest;
use roost_protocol::{ErrorCode, GroupId};

use crate::common::*;
use crate::mls_member::Member;

fn code(err: roost_client::transport::RequestError) -> ErrorCode {
    err.wire_error()
        .map(|e| e.code)
        .unwrap_or_else(|| panic!("not a server error: {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_info_with_the_ratchet_tree_is_refused_by_name_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let bob = Member::new(&server, "bob").await;
    bob.upload_key_packages(1).await;

    let group_id = GroupId::new([21; 16], alice.client.id.domain().clone());
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .build();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(alice.client.id.tls_serialize_detached().unwrap()).into(),
        signature_key: alice.client.key.public().into(),
    };
    let group = MlsGroup::new_with_group_id(
        &alice.provider,
        &alice.client.key,
        &config,
        MlsGroupId::from_slice(&group_id.to_mls_bytes()),
        credential,
    )
    .unwrap();
    let tree = group
        .export_ratchet_tree()
        .tls_serialize_detached()
        .unwrap();
    let group_info = |with_tree: bool| {
        group
            .export_group_info(alice.provider.crypto(), &alice.client.key, with_tree)
            .unwrap()
            .tls_serialize_detached()
            .unwrap()
    };

    // CreateGroup with the tree in the GroupInfo: refused, no group.
    let err = alice
        .conn
        .call(CreateGroupRequest {
            group: group_id.clone(),
            group_info: group_info(true).into(),
            ratchet_tree: tree.clone().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::GROUP_INFO_HAS_RATCHET_TREE);
    let err = alice
        .conn
        .call(FetchGroupInfoRequest {
            group: group_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::GROUP_NOT_FOUND);
    // Without it: created.
    let created = alice
        .conn
        .call(CreateGroupRequest {
            group: group_id.clone(),
            group_info: group_info(false).into(),
            ratchet_tree: tree.into(),
        })
        .await
        .unwrap();
    assert_eq!(created.epoch, 0);
    alice.group = Some(group);
    alice.group_id = Some(group_id.clone());

    // A commit of this group: openmls puts the tree into its GroupInfo. Refused; the group
    // stays at epoch 0 and bob gets no Welcome.
    let key_packages = alice.claim(&[bob.user_id()]).await;
    let bundle = alice.commit(key_packages, &[]);
    let err = alice.send_commit(&bundle).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::GROUP_INFO_HAS_RATCHET_TREE);
    let info = alice
        .conn
        .call(FetchGroupInfoRequest { group: group_id })
        .await
        .unwrap();
    assert_eq!(info.epoch, 0);
    let queued = bob
        .conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert!(queued.messages.is_empty());
    server.shutdown().await;
}
