use roost_protocol::messages::auth::DiscoverUserRequest;
use roost_protocol::messages::keypackage::*;
use roost_protocol::messages::queue::*;
use roost_protocol::{GroupId, MessageId};

use crate::common::*;

#[tokio::test]
async fn a_data_dir_refuses_another_domain() {
    let dir = tempfile::tempdir().unwrap();
    start(config(dir.path())).await.shutdown().await;

    let mut other = config(dir.path());
    other.domain = "other.test".into();
    let Err(err) = roost_server::Server::start(other.validate().unwrap()).await else {
        panic!("a data directory of {DOMAIN} started as other.test");
    };
    let text = err.to_string();
    assert!(
        text.contains(DOMAIN) && text.contains("other.test"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");

    // Still the first domain's, and still usable by it.
    start(config(dir.path())).await.shutdown().await;
}

#[tokio::test]
async fn a_restart_keeps_users_clients_queues_key_packages_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (alice, phone, conn) = new_client(&server, "alice").await;
    let kps: Vec<_> = (0..3).map(|_| key_package(&phone)).collect();
    conn.call(UploadKeyPackagesRequest {
        key_packages: kps,
        last_resort: Some(key_package_with(&phone, &phone.id, None, true)),
    })
    .await
    .unwrap();
    let group: GroupId = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .unwrap();
    for n in 1..=4u8 {
        let payload = QueuePayload::Welcome(GroupMessage {
            group: group.clone(),
            message: vec![n].into(),
        });
        server
            .enqueue(&phone.id, MessageId([n; 16]), payload)
            .await
            .unwrap();
    }
    conn.call(QueueAckRequest { up_to_seq: 1 }).await.unwrap();
    let certificate = server.certificate().clone();
    let as_key = server.as_public_key();
    let address = server.local_addr();
    server.shutdown().await;

    let server = restart_on(config(dir.path()), address).await;
    assert_eq!(
        server.certificate(),
        &certificate,
        "same self-signed certificate"
    );
    assert_eq!(server.as_public_key(), as_key, "same AS key");
    let conn = connect(&server).await;
    login(&conn, &phone).await;
    let found = conn
        .call(DiscoverUserRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(found.clients, vec![phone.credential.clone()]);
    let count = conn.call(KeyPackageCountRequest {}).await.unwrap();
    assert_eq!((count.remaining, count.has_last_resort), (3, 1));
    let fetched = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(
        fetched.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(fetched.head_seq, 4);
    // New messages continue the sequence.
    let payload = QueuePayload::Welcome(GroupMessage {
        group,
        message: vec![5].into(),
    });
    assert_eq!(
        server
            .enqueue(&phone.id, MessageId([5; 16]), payload)
            .await
            .unwrap(),
        5
    );
    server.shutdown().await;
}
