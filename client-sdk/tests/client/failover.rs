//! Several nodes of one homeserver. Two in-process homeservers share the identity files of a
//! domain (TLS certificate and key, AS key), as the nodes of one domain do; with the redb
//! backend they share no data, so these tests check the transport's failover (connect,
//! authenticate, a request), not shared state.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::signatures::Signer;
use openmls_traits::types::SignatureScheme;
use roost_client::transport::{
    Backoff, ConnectConfig, Connection, Endpoint, ReconnectingConnection, TrustConfig,
};
use roost_protocol::ClientId;
use roost_protocol::messages::keypackage::KeyPackageCountRequest;
use roost_server::Server;
use roost_server::config::Config;
use roost_server::identity::{AS_KEY_FILE, CERT_FILE, CERT_KEY_FILE};

use crate::common::{DOMAIN, client_id, enroll, start_server, user, wait_joined, wait_message};

/// A UDP port on 127.0.0.1 where nothing listens (it was free a moment ago).
fn dead_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_node(data_dir: &Path) -> Server {
    let config = Config {
        domain: DOMAIN.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    Server::start(config.validate().unwrap()).await.unwrap()
}

/// Two nodes of `example.org`: the second starts from copies of the first one's identity
/// files.
async fn two_nodes(dir: &Path) -> (Server, Server) {
    let (a_dir, b_dir) = (dir.join("node-a"), dir.join("node-b"));
    let a = start_node(&a_dir).await;
    std::fs::create_dir_all(&b_dir).unwrap();
    for file in [CERT_FILE, CERT_KEY_FILE, AS_KEY_FILE] {
        std::fs::copy(a_dir.join(file), b_dir.join(file)).unwrap();
    }
    let b = start_node(&b_dir).await;
    assert_eq!(a.certificate(), b.certificate());
    assert_eq!(a.as_public_key(), b.as_public_key());
    (a, b)
}

/// Registers the user of `user_key` and its device `phone` with `client_key` on one node.
async fn enroll_on(
    node: &Server,
    config: &ConnectConfig,
    user_key: &SignatureKeyPair,
    client_key: &SignatureKeyPair,
) {
    let endpoint = Endpoint::for_server(node.local_addr()).unwrap();
    let mut only_this_node = config.clone();
    only_this_node.server_addrs = vec![node.local_addr()];
    let conn = endpoint.connect(&only_this_node).await.unwrap();
    enroll(&conn, "alice", user_key, client_key).await;
    conn.close();
    endpoint.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_connection_moves_to_the_next_node_when_its_node_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path()).await;
    let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
    let trust = TrustConfig::PinnedCertificates(vec![a.certificate().clone()]);
    let config = ConnectConfig::with_addrs([a_addr, b_addr], DOMAIN, trust);
    // The same device, known to both nodes (a shared database would do this).
    let user_key = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    let client_key = Arc::new(SignatureKeyPair::new(SignatureScheme::ED25519).unwrap());
    for node in [&a, &b] {
        enroll_on(node, &config, &user_key, &client_key).await;
    }

    let authentications = Arc::new(AtomicUsize::new(0));
    let counter = authentications.clone();
    let reconnecting =
        ReconnectingConnection::new(Endpoint::for_servers(&config.server_addrs).unwrap(), config)
            // Far longer than the test: moving to B must not wait for a backoff.
            .with_backoff(Backoff::new(
                Duration::from_secs(60),
                Duration::from_secs(60),
            ))
            .with_on_connect(move |connection: Connection| {
                let key = client_key.clone();
                let counter = counter.clone();
                async move {
                    let client: ClientId = client_id("alice", "phone");
                    connection
                        .authenticate(&client, |input| key.sign(input).unwrap_or_default())
                        .await?;
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            });

    // KeyPackageCount needs an authenticated connection.
    reconnecting.call(KeyPackageCountRequest {}).await.unwrap();
    let on_a = reconnecting.connection().await.unwrap();
    assert_eq!(on_a.server_addr(), a_addr);

    a.shutdown().await;
    tokio::time::timeout(Duration::from_secs(5), on_a.closed())
        .await
        .expect("the client learns that node A closed");
    tokio::time::timeout(
        Duration::from_secs(5),
        reconnecting.call(KeyPackageCountRequest {}),
    )
    .await
    .expect("moved to node B in time")
    .unwrap();
    assert_eq!(
        reconnecting.connection().await.unwrap().server_addr(),
        b_addr
    );
    assert_eq!(authentications.load(Ordering::SeqCst), 2);
    reconnecting.close().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_first_address_is_dead_registers_and_talks_through_the_next() {
    let t = start_server().await;
    let mut connect = t.connect_config();
    connect.server_addrs = vec![dead_addr(), t.server.local_addr()];
    connect.connect_timeout = Duration::from_millis(300);
    let mut config = t.client_config();
    config.connect = connect;
    let alice = t.register_with("alice", config).await;
    let bob = t.register("bob").await;

    let group = alice.create_group().await.unwrap();
    alice.invite(&group, &[user("bob")]).await.unwrap();
    assert_eq!(wait_joined(&bob).await, group);
    alice.send(&group, b"hello").await.unwrap();
    assert_eq!(wait_message(&bob, &group).await.1, b"hello");
    // Alice's listener runs on the connection to the live address too.
    bob.send(&group, b"hi").await.unwrap();
    assert_eq!(wait_message(&alice, &group).await.1, b"hi");
    alice.close().await;
    bob.close().await;
}
