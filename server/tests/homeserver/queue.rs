use std::time::Duration;

use roost_protocol::frame::{decode_body, encode_frame};
use roost_protocol::messages::queue::*;
use roost_protocol::messages::{ClientRequest, Response};
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

    // The same data with a message age limit of one hour, an hour and a second later:
    // everything is too old.
    let mut cfg = config(dir.path());
    cfg.limits.max_message_age_secs = 3600;
    let clock = ManualClock::new();
    clock.advance(Duration::from_secs(3601));
    let server = start_with_clock(cfg, &clock).await;
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

// ---- acks on the listen stream --------------------------------------------------------------

/// The seqs of the client's queue, fetched from the start.
async fn queued(conn: &roost_client::transport::Connection) -> Vec<u64> {
    let fetched = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    fetched.messages.iter().map(|m| m.seq).collect()
}

/// Acks on a listen stream get no reply: waits until the queue holds exactly `expected`.
async fn wait_for_queue(conn: &roost_client::transport::Connection, expected: &[u64]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = queued(conn).await;
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue holds {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One frame body from a raw stream.
async fn read_body(recv: &mut quinn::RecvStream) -> Vec<u8> {
    let read = async {
        let mut header = [0u8; 4];
        recv.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        recv.read_exact(&mut body).await.unwrap();
        body
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a frame within 10 s")
}

async fn read_event(recv: &mut quinn::RecvStream) -> ListenEvent {
    decode_body::<ListenEvent>(&read_body(recv).await).unwrap()
}

async fn read_pushed(recv: &mut quinn::RecvStream) -> u64 {
    match read_event(recv).await {
        ListenEvent::Message(message) => message.seq,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Opens a listen stream by hand, writing `after_request` right behind the request frame in
/// the same write, and reads the server's response.
async fn raw_listen(
    conn: &roost_client::transport::Connection,
    after_seq: u64,
    after_request: &[u8],
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_raw_stream().await.unwrap();
    let mut bytes = encode_frame(&ClientRequest::QueueListen(QueueListenRequest {
        after_seq,
    }))
    .unwrap();
    bytes.extend_from_slice(after_request);
    send.write_all(&bytes).await.unwrap();
    let response = decode_body::<Response>(&read_body(&mut recv).await).unwrap();
    assert!(
        matches!(response, Response::QueueListen(_)),
        "expected the listen response, got {response:?}"
    );
    (send, recv)
}

fn ack_frame(up_to_seq: u64) -> Vec<u8> {
    encode_frame(&ListenControl::Ack(ListenAck { up_to_seq })).unwrap()
}

#[tokio::test]
async fn acks_on_the_listen_stream_delete_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    for n in 1..=5 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
    }
    let mut stream = conn.listen(0).await.unwrap();
    for n in 1..=5 {
        assert_eq!(next_message(&mut stream).await.seq, n);
    }
    stream.ack(2).await.unwrap();
    wait_for_queue(&conn, &[3, 4, 5]).await;

    // Several acks in a row, out of order: cumulative, everything up to the highest goes.
    stream.ack(3).await.unwrap();
    stream.ack(4).await.unwrap();
    stream.ack(1).await.unwrap();
    wait_for_queue(&conn, &[5]).await;

    // The stream still pushes after acks.
    server.enqueue(&phone.id, id(6), payload(6)).await.unwrap();
    assert_eq!(next_message(&mut stream).await.seq, 6);

    // A reconnecting listener does not get acked messages again.
    drop(stream);
    conn.close();
    let again = connect(&server).await;
    login(&again, &phone).await;
    let mut stream = again.listen(0).await.unwrap();
    assert_eq!(next_message(&mut stream).await.seq, 5);
    assert_eq!(next_message(&mut stream).await.seq, 6);

    // An ack above the head deletes what is there, not what comes later.
    stream.ack(1000).await.unwrap();
    wait_for_queue(&again, &[]).await;
    for n in 7..=8 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
    }
    assert_eq!(next_message(&mut stream).await.seq, 7);
    assert_eq!(next_message(&mut stream).await.seq, 8);
    assert_eq!(queued(&again).await, [7, 8]);

    // The QueueAck request still works alongside.
    again.call(QueueAckRequest { up_to_seq: 7 }).await.unwrap();
    assert_eq!(queued(&again).await, [8]);
    server.shutdown().await;
}

/// Many acks written at once reach the server in one read: only the highest is applied, and
/// everything up to it is gone.
#[tokio::test]
async fn a_burst_of_acks_deletes_up_to_the_highest() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    for n in 1..=40 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
    }
    let (mut send, mut recv) = raw_listen(&conn, 0, &[]).await;
    for n in 1..=40 {
        assert_eq!(read_pushed(&mut recv).await, n);
    }
    let burst: Vec<u8> = (1..=30).flat_map(ack_frame).collect();
    send.write_all(&burst).await.unwrap();
    wait_for_queue(&conn, &(31..=40).collect::<Vec<_>>()).await;
    server.shutdown().await;
}

/// Acks written in the same packet as the request are not taken for part of the request, and
/// a client that then finishes its side keeps getting pushes.
#[tokio::test]
async fn acks_behind_the_request_and_a_finished_send_side() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    for n in 1..=3 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
    }
    let (mut send, mut recv) = raw_listen(&conn, 0, &ack_frame(2)).await;
    send.finish().unwrap();
    for n in 1..=3 {
        assert_eq!(read_pushed(&mut recv).await, n);
    }
    wait_for_queue(&conn, &[3]).await;
    server.enqueue(&phone.id, id(4), payload(4)).await.unwrap();
    assert_eq!(read_pushed(&mut recv).await, 4);
    server.shutdown().await;
}

/// Today's clients: the request, then FIN at once. Pushes keep coming, backlog and live.
#[tokio::test]
async fn a_listener_that_finishes_its_side_at_once_still_gets_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    server.enqueue(&phone.id, id(1), payload(1)).await.unwrap();
    let (mut send, mut recv) = conn.open_raw_stream().await.unwrap();
    let request = encode_frame(&ClientRequest::QueueListen(QueueListenRequest {
        after_seq: 0,
    }))
    .unwrap();
    send.write_all(&request).await.unwrap();
    send.finish().unwrap();
    let response = decode_body::<Response>(&read_body(&mut recv).await).unwrap();
    assert!(matches!(response, Response::QueueListen(_)), "{response:?}");
    assert_eq!(read_pushed(&mut recv).await, 1);
    for n in 2..=4 {
        server.enqueue(&phone.id, id(n), payload(n)).await.unwrap();
        assert_eq!(read_pushed(&mut recv).await, u64::from(n));
    }
    // Nothing was acked.
    assert_eq!(queued(&conn).await, [1, 2, 3, 4]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_malformed_control_frame_closes_only_that_listen() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    server.enqueue(&phone.id, id(1), payload(1)).await.unwrap();
    let ack = ack_frame(1);
    let with = |at: usize, value: &[u8]| {
        let mut bytes = ack.clone();
        bytes[at..at + value.len()].copy_from_slice(value);
        bytes
    };
    let mut trailing = ack.clone();
    trailing[3] += 1;
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>, bool, ErrorCode)> = vec![
        (
            "unknown discriminant",
            with(6, &[0, 9]),
            false,
            ErrorCode::MALFORMED,
        ),
        ("trailing bytes", trailing, false, ErrorCode::MALFORMED),
        ("short body", with(3, &[11]), false, ErrorCode::MALFORMED),
        (
            "cut off by FIN",
            ack[..7].to_vec(),
            true,
            ErrorCode::MALFORMED,
        ),
        (
            "oversized",
            with(0, &[0, 1, 0, 0]),
            false,
            ErrorCode::FRAME_TOO_LARGE,
        ),
        (
            "bad version",
            with(4, &[0, 2]),
            false,
            ErrorCode::UNSUPPORTED_VERSION,
        ),
    ];
    for (what, bytes, fin, code) in cases {
        let (mut send, mut recv) = raw_listen(&conn, 0, &[]).await;
        assert_eq!(read_pushed(&mut recv).await, 1, "{what}");
        send.write_all(&bytes).await.unwrap();
        if fin {
            send.finish().unwrap();
        }
        match read_event(&mut recv).await {
            ListenEvent::Closed(err) => assert_eq!(err.code, code, "{what}: {err:?}"),
            other => panic!("{what}: expected Closed, got {other:?}"),
        }
        // Closed is the last frame: the server finished its side.
        let end = tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(1, true))
            .await
            .expect("end of stream within 10 s");
        assert!(matches!(end, Ok(None)), "{what}: {end:?}");
        // Nothing was acked, and the connection still serves requests and new listens.
        assert_eq!(queued(&conn).await, [1], "{what}");
        let mut stream = conn.listen(0).await.unwrap();
        assert_eq!(next_message(&mut stream).await.seq, 1, "{what}");
    }
    server.shutdown().await;
}
