//! Two nodes of one domain over one PostgreSQL database (a real throwaway cluster), each a
//! real homeserver on 127.0.0.1:0 with the same identity files: what a user must not be able
//! to tell from one node.

use std::time::Duration;

use roost_protocol::messages::auth::DiscoverUserRequest;
use roost_protocol::messages::queue::{ListenEvent, QueueFetchRequest};
use roost_protocol::{ErrorCode, ErrorDetail};
use roost_server::Server;
use roost_server::config::{Config, StorageBackend};

use crate::common::*;
use crate::mls_member::Member;

/// A PostgreSQL cluster, one database, a shared identity directory and two nodes on it.
pub(crate) struct Domain {
    pub(crate) cluster: roost_interop::postgres::Cluster,
    pub(crate) url: String,
    pub(crate) identity: tempfile::TempDir,
    data: Vec<tempfile::TempDir>,
}

impl Domain {
    pub(crate) fn new() -> Self {
        let cluster = roost_interop::postgres::Cluster::start().expect("a PostgreSQL cluster");
        let url = cluster.create_database("roost").unwrap();
        Domain {
            cluster,
            url,
            identity: tempfile::tempdir().unwrap(),
            data: Vec::new(),
        }
    }

    pub(crate) fn node_config(&mut self) -> Config {
        let data = tempfile::tempdir().unwrap();
        let mut config = config(data.path());
        self.data.push(data);
        config.identity_dir = Some(self.identity.path().to_owned());
        config.storage.backend = StorageBackend::Postgres;
        config.storage.url = Some(self.url.clone());
        config.storage.pool_size = 8;
        config.storage.timeout_ms = 3_000;
        config
    }

    /// Starts a node (the first one creates the identity files).
    pub(crate) async fn node(&mut self) -> Server {
        let config = self.node_config();
        start(config).await
    }
}

fn code(err: roost_client::transport::RequestError) -> ErrorCode {
    err.wire_error().expect("a wire error").code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_across_two_nodes_is_pushed_and_everyone_agrees() {
    let mut domain = Domain::new();
    let a = domain.node().await;
    let b = domain.node().await;
    assert_eq!(a.certificate(), b.certificate(), "one identity");
    assert_eq!(a.as_public_key(), b.as_public_key());

    let mut alice = Member::new(&a, "alice").await;
    let mut bob = Member::new(&b, "bob").await;
    let mut carol = Member::new(&a, "carol").await;
    bob.upload_key_packages(2).await;
    carol.upload_key_packages(2).await;
    // Users of one node are found from the other.
    let conn = connect(&b).await;
    login(&conn, &bob.client).await;
    let found = conn
        .call(DiscoverUserRequest {
            user: alice.user_id().clone(),
        })
        .await
        .unwrap();
    assert_eq!(found.clients.len(), 1);

    alice.create_group(1).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    assert!(bob.sync().await.joined);

    // Bob listens on node B; alice sends through node A: pushed across nodes.
    let listener = connect(&b).await;
    login(&listener, &bob.client).await;
    let mut stream = listener.listen(bob.seen).await.unwrap();
    alice.send(b"hello from A").await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(ListenEvent::Message(message)))) => assert_eq!(message.seq, bob.seen + 1),
        other => panic!("expected a pushed message, got {other:?}"),
    }
    assert_eq!(bob.sync().await.messages, vec![b"hello from A".to_vec()]);

    // Node B caches the group at this epoch (bob sends through it).
    bob.send(b"hello from B").await.unwrap();
    assert_eq!(alice.sync().await.messages, vec![b"hello from B".to_vec()]);

    // Alice adds carol through node A: B's cached state is now one epoch behind. Bob's next
    // message (of the new epoch) goes through B and must reach carol, the new member.
    let kps = alice.claim(&[carol.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    assert!(carol.sync().await.joined);
    assert_eq!(bob.sync().await.commits, 1);
    bob.send(b"welcome carol").await.unwrap();
    assert_eq!(carol.sync().await.messages, vec![b"welcome carol".to_vec()]);
    assert_eq!(alice.sync().await.messages, vec![b"welcome carol".to_vec()]);

    // Queue order holds whichever node enqueued: strictly increasing, no gaps.
    for i in 0..10u8 {
        let sender = if i % 2 == 0 { &mut alice } else { &mut carol };
        sender.send(&[i]).await.unwrap();
    }
    let fetched = conn
        .call(QueueFetchRequest {
            after_seq: bob.seen,
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    let seqs: Vec<u64> = fetched.messages.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (bob.seen + 1..=bob.seen + 10).collect();
    assert_eq!(seqs, expected);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_epoch_commits_on_two_nodes_one_wins_every_round() {
    let mut domain = Domain::new();
    let a = domain.node().await;
    let b = domain.node().await;
    let mut alice = Member::new(&a, "alice").await;
    let mut bob = Member::new(&b, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(2).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;

    for round in 0..10 {
        let epoch = alice.epoch();
        assert_eq!(bob.epoch(), epoch);
        let ca = alice.commit(vec![], &[]);
        let cb = bob.commit(vec![], &[]);
        let (ra, rb) = tokio::join!(alice.send_commit(&ca), bob.send_commit(&cb));
        let (winner_is_alice, err) = match (ra, rb) {
            (Ok(r), Err(e)) => {
                assert_eq!(r.epoch, epoch + 1);
                (true, e)
            }
            (Err(e), Ok(r)) => {
                assert_eq!(r.epoch, epoch + 1);
                (false, e)
            }
            other => panic!("round {round}: exactly one commit must win: {other:?}"),
        };
        let wire = err.wire_error().unwrap();
        assert_eq!(wire.code, ErrorCode::STALE_EPOCH, "round {round}");
        assert_eq!(
            wire.detail,
            ErrorDetail::StaleEpoch {
                current_epoch: epoch + 1
            }
        );
        let (winner, loser) = if winner_is_alice {
            (&mut alice, &mut bob)
        } else {
            (&mut bob, &mut alice)
        };
        winner.merge();
        loser.discard();
        assert_eq!(loser.sync().await.commits, 1, "round {round}");
        assert_eq!(loser.epoch(), epoch + 1);
    }
    // Still one group, both able to talk.
    alice.send(b"still here").await.unwrap();
    assert_eq!(bob.sync().await.messages, vec![b"still here".to_vec()]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_removed_through_one_node_is_cut_off_on_the_other() {
    let mut domain = Domain::new();
    let a = domain.node().await;
    let b = domain.node().await;
    let (alice, phone, conn_a) = new_client(&a, "alice").await;
    let conn_b = connect(&b).await;
    login(&conn_b, &phone).await;
    let mut stream = conn_b.listen(0).await.unwrap();
    let fetch = QueueFetchRequest {
        after_seq: 0,
        max_messages: 1,
        max_bytes: 1 << 20,
    };
    conn_b.call(fetch.clone()).await.unwrap();

    conn_a
        .call(remove_client_request(&alice, &phone.id))
        .await
        .unwrap();
    // The listener on B is closed by the removal (via the bus).
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(ListenEvent::Closed(err)))) => assert_eq!(err.code, ErrorCode::CLIENT_NOT_FOUND),
        other => panic!("expected the listener to close, got {other:?}"),
    }
    // And B's connection, authenticated before the removal, is refused.
    let err = conn_b.call(fetch).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::CLIENT_NOT_FOUND);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_gets_unavailable_and_the_node_recovers_by_itself() {
    let mut domain = Domain::new();
    let mut cfg = domain.node_config();
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let a = start(cfg).await;
    let health = a.metrics_addr().unwrap();
    assert!(
        http_get(health, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let (_alice, phone, conn) = new_client(&a, "alice").await;
    let fetch = QueueFetchRequest {
        after_seq: 0,
        max_messages: 1,
        max_bytes: 1 << 20,
    };
    conn.call(fetch.clone()).await.unwrap();

    domain.cluster.kill().unwrap();
    let started = std::time::Instant::now();
    let err = conn.call(fetch.clone()).await.unwrap_err();
    let wire = err.wire_error().expect("a wire error");
    assert_eq!(wire.code, ErrorCode::UNAVAILABLE);
    // With a suggested wait, as for a failed redb disk.
    assert!(
        matches!(wire.detail, roost_protocol::ErrorDetail::RateLimited { retry_after_ms } if retry_after_ms > 0),
        "{wire:?}"
    );
    // Typed, and before the request deadline (not a hang).
    assert!(started.elapsed() < Duration::from_secs(10));
    let down = http_get(health, "/health").await;
    assert!(down.starts_with("HTTP/1.1 503"), "{down}");

    domain.cluster.restart().unwrap();
    let mut recovered = false;
    for _ in 0..100 {
        if conn.call(fetch.clone()).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the node did not recover when the database came back"
    );
    assert!(
        http_get(health, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
    // New connections authenticate again too.
    let again = connect(&a).await;
    login(&again, &phone).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_database_of_another_domain() {
    let mut domain = Domain::new();
    let a = domain.node().await;
    a.shutdown().await;
    let mut other = domain.node_config();
    other.domain = "other.test".into();
    let err = Server::start(other.validate().unwrap())
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(text.contains("belongs to domain"), "{text}");
    // Nor one made with another AS key (identity files not shared).
    let mut stranger = domain.node_config();
    let elsewhere = tempfile::tempdir().unwrap();
    stranger.identity_dir = Some(elsewhere.path().to_owned());
    let err = Server::start(stranger.validate().unwrap())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("identity"), "{err}");
}
