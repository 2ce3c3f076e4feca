//! A homeserver whose disk fails under it, end to end over real QUIC: while the disk is full,
//! sends and commits are refused with UNAVAILABLE (and a suggested wait), `/health` says
//! unhealthy and the failure is counted; once space is back the server has reopened its
//! database by itself, the same connections send again, and every acknowledged message is
//! delivered exactly once.

use std::time::{Duration, Instant};

use roost_protocol::{ErrorCode, ErrorDetail};
use roost_server::testing::{Faults, start_with_store_faults};

use crate::common::*;
use crate::mls_member::Member;

/// The value of `roost_storage_failures_total{engine="redb"}` (0 when absent).
fn failures(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("roost_storage_failures_total{engine=\"redb\"} "))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Asserts the error is UNAVAILABLE with a suggested wait.
fn assert_unavailable(err: roost_client::transport::RequestError, what: &str) {
    let wire = err
        .wire_error()
        .unwrap_or_else(|| panic!("{what}: not a server error: {err}"));
    assert_eq!(wire.code, ErrorCode::UNAVAILABLE, "{what}: {wire:?}");
    assert!(
        matches!(wire.detail, ErrorDetail::RateLimited { retry_after_ms } if retry_after_ms > 0),
        "{what}: no suggested wait: {wire:?}"
    );
    assert!(err.is_transient(), "{what}: not retryable");
}

/// Waits (bounded, so a server that never recovers fails the test) for `/health` to answer 200.
async fn wait_healthy(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http_get(addr, "/health").await.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server never became healthy again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_sends_unavailable_until_the_server_reopens_its_store_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let faults = Faults::new();
    let server = start_with_store_faults(cfg.validate().unwrap(), faults.clone())
        .await
        .unwrap();
    let metrics = server.metrics_addr().unwrap();
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(1).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    assert_eq!(alice.commit_and_merge(kps, &[]).await, 1);
    assert!(bob.sync().await.joined);

    let mut acknowledged: Vec<Vec<u8>> = Vec::new();
    for i in 0..5 {
        let text = format!("before {i}").into_bytes();
        alice.send(&text).await.unwrap();
        acknowledged.push(text);
    }
    assert!(
        http_get(metrics, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let failures_before = failures(&http_get(metrics, "/metrics").await);

    // The disk fills up.
    faults.fail_writes_after(0);
    for i in 0..5 {
        let err = alice
            .send(format!("lost {i}").as_bytes())
            .await
            .unwrap_err();
        assert_unavailable(err, "a send on a full disk");
    }
    let bundle = alice.commit(Vec::new(), &[]);
    let err = alice.send_commit(&bundle).await.unwrap_err();
    assert_unavailable(err, "a commit on a full disk");
    alice.discard();
    let health = http_get(metrics, "/health").await;
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    let counted = failures(&http_get(metrics, "/metrics").await);
    assert!(counted > failures_before, "failures not counted: {counted}");

    // Space is freed: no restart, the same connections.
    faults.clear();
    wait_healthy(metrics).await;
    for i in 0..5 {
        let text = format!("after {i}").into_bytes();
        alice.send(&text).await.unwrap();
        acknowledged.push(text);
    }
    // The group state is still good: a commit after recovery is accepted.
    assert_eq!(alice.commit_and_merge(Vec::new(), &[]).await, 2);

    // A transient fsync failure: the answer says whether the message was stored.
    faults.fail_next_sync();
    let text = b"around a failed fsync".to_vec();
    match alice.send(&text).await {
        Ok(_) => acknowledged.push(text),
        Err(err) => assert_unavailable(err, "a send whose fsync failed"),
    }
    wait_healthy(metrics).await;
    let text = b"last".to_vec();
    alice.send(&text).await.unwrap();
    acknowledged.push(text);

    // Every acknowledged message arrives once, in order; nothing refused arrives.
    let received = bob.sync().await;
    assert_eq!(received.commits, 1);
    assert_eq!(received.messages, acknowledged);
    server.shutdown().await;
}

/// A send whose fsync failed is answered UNAVAILABLE when the store cannot be reopened at once;
/// its batch may still be in the file (PROTOCOL.md §9.2). Once the store is back, a listening
/// recipient gets it without waiting for another write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reads_the_store_again_after_a_reopen() {
    use roost_protocol::messages::queue::ListenEvent;

    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let server = start_with_store_faults(config(dir.path()).validate().unwrap(), faults.clone())
        .await
        .unwrap();
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(1).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    assert!(bob.sync().await.joined);
    alice.send(b"first").await.unwrap();
    let mut stream = bob.conn.listen(bob.seen).await.unwrap();
    let first = match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
        Ok(Some(Ok(ListenEvent::Message(message)))) => message,
        other => panic!("expected the first message, got {other:?}"),
    };

    // Every fsync from the send's commit on fails: the commit fails after writing the batch
    // (so it is in the file) and so does the first reopen. Not `fail_syncs_after(0)`: when
    // the send's transaction grows the file, redb's fsync of the grown file comes first, and
    // its failure leaves nothing of the batch in the file (recovery_tests shows both).
    faults.fail_syncs_from_next_commit();
    let err = alice.send(b"in doubt").await.unwrap_err();
    assert_unavailable(err, "a send whose fsync failed");
    faults.clear();
    // No other write happens: the listener learns of the entry from the reopen alone.
    match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
        Ok(Some(Ok(ListenEvent::Message(message)))) => assert!(message.seq > first.seq),
        other => panic!("expected the landed message, got {other:?}"),
    }
    server.shutdown().await;
}
