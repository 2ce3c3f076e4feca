//! Blobs on the scale-out deployment: two nodes of one domain over one PostgreSQL database (a
//! real throwaway cluster). A blob uploaded through one node is read through the other, the
//! quota counts a user's blobs on every node, a node killed mid-upload leaves nothing, and
//! expiry deletes the bytes and gives the quota back.

use std::time::Duration;

use roost_protocol::ErrorCode;
use roost_server::Server;

use crate::blob::{
    code, download, kill_when, pseudo_random, sha256, spawn_roost, upload, upload_in_progress,
};
use crate::common::*;
use crate::multinode::Domain;

const MIB: usize = 1024 * 1024;

/// Rows of `table` as psql counts them.
fn count(domain: &Domain, table: &str) -> u64 {
    domain
        .cluster
        .psql("roost", &format!("SELECT count(*) FROM {table}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_uploaded_through_one_node_is_read_through_the_other_ranges_too() {
    let mut domain = Domain::new();
    let a = domain.node().await;
    let b = domain.node().await;
    let (_alice, _client, on_a) = new_client(&a, "alice").await;
    let (_bob, _bob_client, on_b) = new_client(&b, "bob").await;

    // Several chunks of the store and a short last one.
    let bytes = pseudo_random(3 * MIB + 12_345, 21);
    let stored = upload(&on_a, &bytes).await.unwrap();
    assert_eq!(stored.blob.address, sha256(&bytes));
    let back = download(&on_b, &stored.blob, 0, None).await.unwrap();
    assert_eq!(sha256(&back), stored.blob.address);
    assert!(back == bytes);
    // Ranges: inside one chunk, across chunk boundaries, to the end, past the end.
    for (offset, length) in [
        (17usize, Some(1000usize)),
        (256 * 1024 - 3, Some(7)),
        (MIB - 100, Some(2 * MIB)),
        (3 * MIB, None),
        (bytes.len() - 1, Some(50)),
        (bytes.len(), None),
    ] {
        let part = download(&on_b, &stored.blob, offset as u64, length.map(|l| l as u64))
            .await
            .unwrap();
        let end = length.map_or(bytes.len(), |l| (offset + l).min(bytes.len()));
        assert!(part == bytes[offset..end], "range {offset} +{length:?}");
    }
    assert_eq!(
        code(
            download(&on_b, &stored.blob, bytes.len() as u64 + 1, None)
                .await
                .unwrap_err()
        ),
        ErrorCode::BLOB_RANGE_NOT_SATISFIABLE
    );
    // The read token is checked on every node.
    let mut guessed = stored.blob.clone();
    guessed.token[3] ^= 0x40;
    assert_eq!(
        code(download(&on_b, &guessed, 0, None).await.unwrap_err()),
        ErrorCode::BLOB_NOT_FOUND
    );

    // Empty and one-byte blobs, uploaded through b and read through a.
    for small in [Vec::new(), vec![0x5a]] {
        let stored = upload(&on_b, &small).await.unwrap();
        assert_eq!(download(&on_a, &stored.blob, 0, None).await.unwrap(), small);
    }
    // The same bytes again (through the other node) are the same blob, stored once.
    let again = upload(&on_b, &bytes).await.unwrap();
    assert_eq!(again.blob, stored.blob);
    assert_eq!(count(&domain, "blobs"), 3);
    assert_eq!(
        count(&domain, "blob_chunks"),
        (bytes.len() as u64).div_ceil(256 * 1024) + 1
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_quota_counts_their_blobs_on_every_node() {
    let mut domain = Domain::new();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut config = domain.node_config();
        config.blobs.quota_per_user = 3 * MIB as u64 / 2;
        nodes.push(start(config).await);
    }
    let (alice, alice_client, on_a) = new_client(&nodes[0], "alice").await;
    let on_b = connect(&nodes[1]).await;
    login(&on_b, &alice_client).await;

    upload(&on_a, &pseudo_random(MIB, 1)).await.unwrap();
    assert_eq!(
        code(upload(&on_b, &pseudo_random(MIB, 2)).await.unwrap_err()),
        ErrorCode::BLOB_QUOTA_EXCEEDED
    );
    // What fits is stored, through either node.
    upload(&on_b, &pseudo_random(MIB / 4, 3)).await.unwrap();
    assert_eq!(count(&domain, "blobs"), 2);
    drop(alice);

    // Two uploads at once, one through each node, that fit the quota only one at a time:
    // each node sees no other upload in progress, and exactly one is stored.
    let (_carol, carol_client, carol_a) = new_client(&nodes[0], "carol").await;
    let carol_b = connect(&nodes[1]).await;
    login(&carol_b, &carol_client).await;
    // Both bytes are sent before either upload ends: each node has checked the quota
    // already, and only the commit can tell.
    let (first, second) = (pseudo_random(MIB, 4), pseudo_random(MIB, 5));
    let mut up_a = carol_a.start_blob_upload(MIB as u64).await.unwrap();
    let mut up_b = carol_b.start_blob_upload(MIB as u64).await.unwrap();
    let (wrote_a, wrote_b) = tokio::join!(up_a.write(&first), up_b.write(&second));
    wrote_a.unwrap();
    wrote_b.unwrap();
    let (one, other) = tokio::join!(up_a.finish(), up_b.finish());
    let refused: Vec<ErrorCode> = [one, other]
        .into_iter()
        .filter_map(|result| result.err().map(code))
        .collect();
    assert_eq!(refused, vec![ErrorCode::BLOB_QUOTA_EXCEEDED]);
    assert_eq!(count(&domain, "blobs"), 3);
    assert_eq!(
        count(&domain, "blob_chunks"),
        4 + 1 + 4,
        "only the stored blobs' chunks are kept"
    );
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_blobs_are_gone_from_every_node_and_their_quota_is_given_back() {
    let mut domain = Domain::new();
    let clock = ManualClock::new();
    let node_config = |domain: &mut Domain| {
        let mut config = domain.node_config();
        config.blobs.expiry_secs = 3600;
        config.blobs.quota_per_user = MIB as u64;
        config
    };
    let a = start_with_clock(node_config(&mut domain), &clock).await;
    let b = start_with_clock(node_config(&mut domain), &clock).await;
    let (_alice, alice_client, on_a) = new_client(&a, "alice").await;
    let on_b = connect(&b).await;
    login(&on_b, &alice_client).await;
    let bytes = pseudo_random(MIB, 8);
    let stored = upload(&on_a, &bytes).await.unwrap();
    assert!(download(&on_b, &stored.blob, 0, None).await.unwrap() == bytes);

    clock.advance(Duration::from_secs(3601));
    assert_eq!(
        code(download(&on_b, &stored.blob, 0, None).await.unwrap_err()),
        ErrorCode::BLOB_NOT_FOUND
    );
    // A node sweeps when it starts (and every minute): the bytes go, and the quota is free.
    let c = start_with_clock(node_config(&mut domain), &clock).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(&domain, "blobs") + count(&domain, "blob_chunks") > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    upload(&on_b, &pseudo_random(MIB, 9)).await.unwrap();
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

#[test]
fn a_node_killed_mid_upload_leaves_nothing_in_the_database() {
    let mut domain = Domain::new();
    let config = domain.node_config();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let port_arg = port.to_string();
    let url_arg = domain.url.clone();
    let mut child = spawn_roost(&[
        "--data".as_ref(),
        config.data_dir.as_os_str(),
        "--identity".as_ref(),
        domain.identity.path().as_os_str(),
        "--listen".as_ref(),
        port_arg.as_ref(),
        "--domain".as_ref(),
        DOMAIN.as_ref(),
        "--backend".as_ref(),
        "postgres".as_ref(),
        "--database-url".as_ref(),
        url_arg.as_ref(),
    ]);
    // Chunks written by a transaction that has not committed.
    let writing = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'roost-blobs' AND backend_xid IS NOT NULL";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let alice = runtime.block_on(async {
        let cert = domain
            .identity
            .path()
            .join(roost_server::identity::CERT_FILE);
        let (client, upload) = upload_in_progress(port, &cert).await;
        kill_when(&mut child, upload, || {
            domain.cluster.psql("roost", writing).unwrap().trim() != "0"
        })
        .await;
        client
    });
    // PostgreSQL notices the connection is gone and discards the transaction.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while domain.cluster.psql("roost", writing).unwrap().trim() != "0" {
        assert!(std::time::Instant::now() < deadline, "upload still open");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(&domain, "blobs"), 0);
    assert_eq!(count(&domain, "blob_chunks"), 0);
    assert_eq!(count(&domain, "blob_usage"), 0);
    // Another node serves on, and the user's whole quota is free.
    runtime.block_on(async {
        let mut config = domain.node_config();
        config.blobs.quota_per_user = 8 * MIB as u64;
        let node: Server = start(config).await;
        let conn = connect(&node).await;
        login(&conn, &alice).await;
        let bytes = pseudo_random(8 * MIB, 3);
        let stored = upload(&conn, &bytes).await.unwrap();
        assert!(download(&conn, &stored.blob, 0, None).await.unwrap() == bytes);
        node.shutdown().await;
    });
}
