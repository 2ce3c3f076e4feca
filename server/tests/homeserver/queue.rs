use std::time::Duration;

use roost_protocol::messages::queue::*;
use roost_protocol::{ErrorCode, GroupId, MessageId};

use crate::common::*;

fn payload(n: u8) -> QueuePayload {
    let group: GroupId = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .unwrap();
    QueuePayload::GroupMessage(GroupMessage {
        group,
        message: vec![n; 10].into(),
    })
}

fn id(n: u8) -> MessageId {
    MessageId([n; 16])
}

async fn next_message(stream: &mut roost_client::transport::ListenStream) -> QueueMessage {
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(ListenEvent::Message(message)))) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn fetch_ack_and_idempotent_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    for n in 1..=5 {
        assert_eq!(
            server.enqueue(&phone.id, id(n), payload(n)).await.unwrap(),
            u64::from(n)
        );
    }
    // The same message id again: acknowledged, not queued twice.
    assert_eq!(
        server.enqueue(&phone.id, id(3), payload(3)).await.unwrap(),
        3
    );

    let all = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(all.head_seq, 5);
    let seqs: Vec<u64> = all.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(all.messages[2].payload, payload(3));
    assert_eq!(all.messages[2].id, id(3));

    // Paging by count and by bytes (at least one message always comes back).
    let page = conn
        .call(QueueFetchRequest {
            after_seq: 1,
            max_messages: 2,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [2, 3]
    );
    let page = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 100,
            max_bytes: 1,
        })
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);

    conn.call(QueueAckRequest { up_to_seq: 3 }).await.unwrap();
    let rest = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(
        rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [4, 5]
    );
    // Acking past the head deletes what is there, not what comes later.
    conn.call(QueueAckRequest { up_to_seq: 1000 })
        .await
        .unwrap();
    assert_eq!(
        server.enqueue(&phone.id, id(6), payload(6)).await.unwrap(),
        6
    );
    let rest = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [6]);
    server.shutdown().await;
}

#[tokio::test]
async fn only_the_owner_reads_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, _alice_conn) = new_client(&server, "alice").await;
    let (_bob, _bob_phone, bob_conn) = new_client(&server, "bob").await;
    server.enqueue(&phone.id, id(1), payload(1)).await.unwrap();

    // Bob's requests act on bob's queue only: there is no way to name alice's.
    let bobs = bob_conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert!(bobs.messages.is_empty());
    assert_eq!(bobs.head_seq, 0);
    bob_conn
        .call(QueueAckRequest { up_to_seq: 10 })
        .await
        .unwrap();

    let anon = connect(&server).await;
    for err in [
        anon.call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap_err(),
        anon.call(QueueAckRequest { up_to_seq: 10 })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.wire_error().unwrap().code, ErrorCode::UNAUTHENTICATED);
    }
    let err = anon.listen(0).await.unwrap_err();
    assert_eq!(err.wire_error().unwrap().code, ErrorCode::UNAUTHENTICATED);

    // Alice's message is still there.
    let alice_conn = connect(&server).await;
    login(&alice_conn, &phone).await;
    let mine = alice_conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(mine.messages.len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn listen_delivers_backlog_then_live_messages_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    for n in 1..=3 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
    }
    // Fetch, then listen from the fetched head: nothing is missed in between.
    let fetched = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 2,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    let after = fetched.messages.last().unwrap().seq;
    let mut stream = conn.listen(after).await.unwrap();
    assert_eq!(next_message(&mut stream).await.seq, 3);
    for n in 4..=20 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
    }
    for n in 4..=20u8 {
        let message = next_message(&mut stream).await;
        assert_eq!(message.seq, u64::from(n));
        assert_eq!(message.payload, payload(n));
    }

    // Reconnect: a new connection and listener continue after the last seen seq.
    drop(stream);
    conn.close();
    let again = connect(&server).await;
    login(&again, &phone).await;
    server
        .enqueue(&phone.id, id(21), payload(21))
        .await
        .unwrap();
    let mut stream = again.listen(20).await.unwrap();
    assert_eq!(next_message(&mut stream).await.seq, 21);
    server
        .enqueue(&phone.id, id(22), payload(22))
        .await
        .unwrap();
    assert_eq!(next_message(&mut stream).await.seq, 22);

    // A listener is told when its client is removed.
    let remover = connect(&server).await;
    remover
        .call(remove_client_request(&_alice, &phone.id))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(ListenEvent::Closed(err)))) => assert_eq!(err.code, ErrorCode::CLIENT_NOT_FOUND),
        other => panic!("expected Closed, got {other:?}"),
    }
    server.shutdown().await;
}

/// Payloads and requests many times the stream receive window arrive intact: pushed on a
/// listen stream (each frame's own head, then the payload's shared bytes), fetched, and read
/// by the server chunk by chunk.
#[tokio::test]
async fn payloads_and_requests_larger_than_the_receive_window_arrive_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.stream_receive_window = 16 * 1024;
    let server = start(cfg).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let group: GroupId = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .unwrap();
    let big = |n: u8| {
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 ^ n).collect();
        QueuePayload::Welcome(GroupMessage {
            group: group.clone(),
            message: message.into(),
        })
    };
    server.enqueue(&phone.id, id(1), big(1)).await.unwrap();
    let mut stream = conn.listen(0).await.unwrap();
    assert_eq!(next_message(&mut stream).await.payload, big(1));
    for n in 2..=4 {
        server.enqueue(&phone.id, id(n), big(n)).await.unwrap();
    }
    for n in 2..=4u8 {
        let message = next_message(&mut stream).await;
        assert_eq!((message.seq, message.id), (u64::from(n), id(n)));
        assert_eq!(message.payload, big(n));
    }
    let fetched = conn
        .call(QueueFetchRequest {
            after_seq: 3,
            max_messages: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(fetched.messages.len(), 1);
    assert_eq!(fetched.messages[0].payload, big(4));

    // A 200 KB request is read whole and reaches the Delivery Service, which knows no such
    // group (a framing failure would be MALFORMED).
    let err = conn
        .call(roost_protocol::messages::delivery::SendMessageRequest {
            group: group.clone(),
            message: vec![7u8; 200_000].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.wire_error().map(|e| e.code),
        Some(ErrorCode::GROUP_NOT_FOUND)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn full_queues_refuse_and_old_messages_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_queue_depth = 3;
    let server = start(cfg).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    for n in 1..=3 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
    }
    let err = server
        .enqueue(&phone.id, id(4), payload(4))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::QUEUE_FULL);
    conn.call(QueueAckRequest { up_to_seq: 1 }).await.unwrap();
    assert_eq!(
        server.enqueue(&phone.id, id(4), payload(4)).await.unwrap(),
        4
    );
    server.shutdown().await;

    // The same data with a message age limit of one second: everything is too old.
    let mut cfg = config(dir.path());
    cfg.limits.max_message_age_secs = 1;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let server = start(cfg).await;
    let conn = connect(&server).await;
    login(&conn, &phone).await;
    let fetched = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert!(fetched.messages.is_empty());
    assert_eq!(fetched.head_seq, 4, "sequence numbers are never reused");
    server.shutdown().await;
}
