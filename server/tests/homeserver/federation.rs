//! Two real homeservers federating over QUIC with mutual TLS on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use roost_client::transport::{ClientIdentity, ConnectConfig, Endpoint, TrustConfig};
use roost_protocol::messages::auth::{AsKeysRequest, DiscoverUserRequest};
use roost_protocol::messages::delivery::CommitRequest;
use roost_protocol::messages::federation::*;
use roost_protocol::messages::keypackage::ClaimUserKeyPackagesRequest;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use roost_protocol::messages::{ClientRequest, Response};
use roost_protocol::{ErrorCode, GroupId, MessageId};
use roost_server::Server;
use roost_server::config::{Config, PeerConfig};

use crate::common::*;
use crate::mls_member::Member;
use crate::pki::Pki;

const ALPHA: &str = "alpha.test";
const BETA: &str = "beta.test";

/// A UDP port that was free a moment ago, below the ephemeral range: a peer stopped and
/// started again on it finds it free.
pub fn free_port() -> SocketAddr {
    roost_server::testing::restartable_addr().unwrap()
}

struct Pair {
    _dir: tempfile::TempDir,
    pki: Pki,
    alpha_cfg: Config,
    beta_cfg: Config,
    alpha: Server,
    beta: Option<Server>,
}

pub fn server_config(
    root: &std::path::Path,
    pki: &Pki,
    domain: &str,
    listen: SocketAddr,
    peer: (&str, SocketAddr),
) -> Config {
    let dir = root.join(domain);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = pki.issue(root, domain, &[domain]);
    let mut cfg = config(&dir);
    cfg.domain = domain.into();
    cfg.listen = listen;
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(key);
    cfg.federation.enabled = true;
    cfg.federation.ca_file = Some(pki.ca_file.clone());
    cfg.federation.retry_initial_ms = 50;
    cfg.federation.retry_max_ms = 200;
    cfg.federation.peers.insert(
        peer.0.into(),
        PeerConfig {
            address: Some(peer.1.to_string()),
            addresses: Vec::new(),
            certificate: None,
        },
    );
    cfg
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    let (a, b) = (free_port(), free_port());
    let alpha_cfg = server_config(dir.path(), &pki, ALPHA, a, (BETA, b));
    let beta_cfg = server_config(dir.path(), &pki, BETA, b, (ALPHA, a));
    let alpha = start(alpha_cfg.clone()).await;
    let beta = start(beta_cfg.clone()).await;
    Pair {
        _dir: dir,
        pki,
        alpha_cfg,
        beta_cfg,
        alpha,
        beta: Some(beta),
    }
}

impl Pair {
    fn beta(&self) -> &Server {
        self.beta.as_ref().unwrap()
    }

    async fn shutdown(mut self) {
        if let Some(beta) = self.beta.take() {
            beta.shutdown().await;
        }
        self.alpha.shutdown().await;
    }
}

/// Syncs until `member` received `count` application messages (federation is asynchronous).
async fn receive(member: &mut Member, count: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} messages arrived",
            got.len()
        );
        let received = member.sync().await;
        got.extend(received.messages);
        if got.len() < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    got
}

/// Binds the UDP address a server just stopped listening on: its socket may close a moment
/// after `shutdown` returns, so AddrInUse is retried for a while.
async fn bind_freed(addr: SocketAddr) -> tokio::net::UdpSocket {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::UdpSocket::bind(addr).await {
            Ok(socket) => return socket,
            Err(err)
                if err.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("cannot bind {addr} after its server stopped: {err}"),
        }
    }
}

/// Waits until something sends a datagram to `addr` while the server that listened there is
/// down: the hub's outbox trying to reach it. The socket is closed again on return.
async fn wait_for_delivery_attempt(addr: SocketAddr) {
    let socket = bind_freed(addr).await;
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(15), socket.recv_from(&mut buf))
        .await
        .expect("the hub did not try to deliver within 15 s")
        .unwrap();
}

/// Stands in for a server that is down: holds its UDP address and answers nothing, while it
/// tells the hub's connection attempts apart (each starts with a fresh destination connection
/// id in its QUIC long header; retransmissions repeat it).
struct Blackhole {
    socket: tokio::net::UdpSocket,
    seen: std::collections::HashSet<Vec<u8>>,
}

impl Blackhole {
    async fn bind(addr: SocketAddr) -> Self {
        let socket = bind_freed(addr).await;
        let seen = Default::default();
        Self { socket, seen }
    }

    /// Waits for the first packet of a connection attempt not seen before.
    async fn new_attempt(&mut self) {
        let mut buf = [0u8; 2048];
        let wait = async {
            loop {
                let (len, _) = self.socket.recv_from(&mut buf).await.unwrap();
                let packet = &buf[..len];
                // Long header: flags, version (4), DCID length, DCID.
                let Some(&dcid_len) = packet.get(5) else {
                    continue;
                };
                let Some(dcid) = packet.get(6..6 + usize::from(dcid_len)) else {
                    continue;
                };
                if packet[0] & 0x80 != 0 && self.seen.insert(dcid.to_vec()) {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("the hub made no new delivery attempt within 30 s");
    }
}

/// Exactly once: `sender` sends a marker after what `members` already received; the marker
/// is the next and only thing each of them gets (a duplicate would come before it).
async fn nothing_more_arrives(sender: &mut Member, members: &mut [&mut Member]) {
    let marker = b"marker".to_vec();
    sender.send(&marker).await.unwrap();
    for member in members {
        assert_eq!(receive(member, 1).await, vec![marker.clone()]);
    }
}

async fn join(member: &mut Member) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !member.sync().await.joined {
        assert!(tokio::time::Instant::now() < deadline, "no Welcome arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_discover_each_other_and_talk_across_two_homeservers() {
    let pair = pair().await;
    let mut alice = Member::new_in(&pair.alpha, "alice", ALPHA).await;
    let mut bob = Member::new_in(pair.beta(), "bob", BETA).await;
    bob.upload_key_packages(1).await;

    // Discovery and AS keys of the other domain, through the own homeserver.
    let found = alice
        .conn
        .call(DiscoverUserRequest {
            user: bob.user_id().clone(),
        })
        .await
        .unwrap();
    assert_eq!(found.clients, vec![bob.client.credential.clone()]);
    let keys = alice
        .conn
        .call(AsKeysRequest {
            domain: BETA.parse().unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(keys.keys, vec![pair.beta().as_public_key().into()]);

    // A 1:1 group hosted on alpha with bob on beta.
    alice.create_group(1).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    assert_eq!(kps.len(), 1);
    alice.commit_and_merge(kps, &[]).await;
    join(&mut bob).await;
    assert_eq!(bob.epoch(), alice.epoch());

    // Messages both ways: bob's go through beta to the hub on alpha.
    for n in 0..3u8 {
        alice.send(&[b'a', n]).await.unwrap();
        bob.send(&[b'b', n]).await.unwrap();
    }
    assert_eq!(
        receive(&mut bob, 3).await,
        (0..3u8).map(|n| vec![b'a', n]).collect::<Vec<_>>()
    );
    assert_eq!(
        receive(&mut alice, 3).await,
        (0..3u8).map(|n| vec![b'b', n]).collect::<Vec<_>>()
    );

    // A commit by the remote member goes through its homeserver to the hub.
    bob.commit_and_merge(vec![], &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while alice.epoch() != bob.epoch() {
        assert!(tokio::time::Instant::now() < deadline);
        alice.sync().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pair.shutdown().await;
}

/// Entries in `member`'s queue it has not processed yet.
async fn queued(member: &Member) -> usize {
    let fetched = member
        .conn
        .call(roost_protocol::messages::queue::QueueFetchRequest {
            after_seq: member.seen,
            max_messages: 1000,
            max_bytes: 1 << 24,
        })
        .await
        .unwrap();
    fetched.messages.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_members_send_retried_through_its_home_server_is_delivered_once() {
    let pair = pair().await;
    let mut alice = Member::new_in(&pair.alpha, "alice", ALPHA).await;
    let mut bob = Member::new_in(pair.beta(), "bob", BETA).await;
    bob.upload_key_packages(1).await;
    alice.create_group(1).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    join(&mut bob).await;
    // bob's requests go through beta to the hub on alpha; alice's queue is on the hub, so
    // what the hub accepted is there when bob's answer comes back.
    let message = bob.encrypt(b"once across domains");
    let first = bob.send_bytes(&message).await.unwrap();
    let again = bob.send_bytes(&message).await.unwrap();
    assert_eq!((first.recipients, again.recipients), (1, 1));
    assert_eq!(queued(&alice).await, 1);
    // A remote member's commit, repeated: the original epoch, applied once.
    let bundle = bob.commit(Vec::new(), &[]);
    let epoch = bob.send_commit(&bundle).await.unwrap().epoch;
    assert_eq!(bob.send_commit(&bundle).await.unwrap().epoch, epoch);
    bob.merge();
    assert_eq!(queued(&alice).await, 2);
    let got = alice.sync().await;
    assert_eq!(got.messages, [b"once across domains".to_vec()]);
    assert_eq!((got.commits, alice.epoch()), (1, epoch));
    pair.shutdown().await;
}

/// alice on alpha and bob on beta, in one group hosted by alpha.
async fn alice_and_bob_in_a_group(pair: &Pair) -> (Member, Member) {
    let mut alice = Member::new_in(&pair.alpha, "alice", ALPHA).await;
    let mut bob = Member::new_in(pair.beta(), "bob", BETA).await;
    bob.upload_key_packages(1).await;
    alice.create_group(2).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    join(&mut bob).await;
    (alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_while_the_recipients_server_is_down_and_arrive_exactly_once() {
    let mut pair = pair().await;
    let (mut alice, mut bob) = alice_and_bob_in_a_group(&pair).await;

    // Beta goes down; alice keeps sending: the hub accepts and keeps them in its outbox.
    pair.beta.take().unwrap().shutdown().await;
    for n in 0..5u8 {
        alice.send(&[n]).await.unwrap();
    }
    // The hub tries (and fails) to deliver while beta is down.
    wait_for_delivery_attempt(pair.beta_cfg.listen).await;
    let beta = start(pair.beta_cfg.clone()).await;
    bob.conn = connect(&beta).await;
    login(&bob.conn, &bob.client).await;
    pair.beta = Some(beta);
    let got = receive(&mut bob, 5).await;
    assert_eq!(got, (0..5u8).map(|n| vec![n]).collect::<Vec<_>>());
    nothing_more_arrives(&mut alice, &mut [&mut bob]).await;
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_for_several_remote_members_arrives_in_batches_the_peer_accepts() {
    // beta accepts frames of at most 64 KiB; alpha sends batches of at most 40 KiB.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    let (a, b) = (free_port(), free_port());
    let mut alpha_cfg = server_config(dir.path(), &pki, ALPHA, a, (BETA, b));
    alpha_cfg.federation.outbox_batch_bytes = 40 << 10;
    let mut beta_cfg = server_config(dir.path(), &pki, BETA, b, (ALPHA, a));
    beta_cfg.limits.max_frame_len = 64 << 10;
    let alpha = start(alpha_cfg).await;
    let beta = start(beta_cfg.clone()).await;

    let mut alice = Member::new_in(&alpha, "alice", ALPHA).await;
    let mut remote = Vec::new();
    for name in ["bob", "carol", "dave"] {
        let member = Member::new_in(&beta, name, BETA).await;
        member.upload_key_packages(1).await;
        remote.push(member);
    }
    alice.create_group(3).await;
    let users: Vec<_> = remote.iter().map(|m| m.user_id()).collect();
    let kps = alice.claim(&users).await;
    assert_eq!(kps.len(), 3);
    alice.commit_and_merge(kps, &[]).await;
    for member in &mut remote {
        join(member).await;
    }

    // beta is down while alice sends 8 messages of 12 KB: 96 KB for its three members, more
    // than beta takes in one frame. Each waits in alpha's outbox once, naming all three.
    beta.shutdown().await;
    let texts: Vec<Vec<u8>> = (0..8u8).map(|n| vec![n; 12 << 10]).collect();
    for text in &texts {
        alice.send(text).await.unwrap();
    }
    let beta = start(beta_cfg).await;
    for member in &mut remote {
        member.conn = connect(&beta).await;
        login(&member.conn, &member.client).await;
        // Every message exactly once, in order.
        assert_eq!(receive(member, 8).await, texts);
    }
    let mut members: Vec<&mut Member> = remote.iter_mut().collect();
    nothing_more_arrives(&mut alice, &mut members).await;
    beta.shutdown().await;
    alpha.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_older_than_the_message_age_limit_is_dropped_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    let (a, b) = (free_port(), free_port());
    let mut alpha_cfg = server_config(dir.path(), &pki, ALPHA, a, (BETA, b));
    alpha_cfg.limits.max_message_age_secs = 3600;
    let beta_cfg = server_config(dir.path(), &pki, BETA, b, (ALPHA, a));
    let clock = ManualClock::new();
    let alpha = start_with_clock(alpha_cfg, &clock).await;
    let beta = start(beta_cfg.clone()).await;
    let mut alice = Member::new_in(&alpha, "alice", ALPHA).await;
    let mut bob = Member::new_in(&beta, "bob", BETA).await;
    bob.upload_key_packages(1).await;
    alice.create_group(4).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    join(&mut bob).await;

    // Beta is down while alice sends; the hub keeps the messages in its outbox.
    beta.shutdown().await;
    let mut down = Blackhole::bind(b).await;
    for n in 0..3u8 {
        alice.send(&[n]).await.unwrap();
    }
    down.new_attempt().await;
    // More than the age limit passes before beta is back; then alice sends a marker. The
    // hub's next attempt (after the one in flight fails) reads its outbox after that.
    clock.advance(Duration::from_secs(3601));
    let marker = b"marker".to_vec();
    alice.send(&marker).await.unwrap();
    down.new_attempt().await;
    drop(down);
    let beta = start(beta_cfg).await;
    bob.conn = connect(&beta).await;
    login(&bob.conn, &bob.client).await;
    // Bob gets the marker and none of the messages that aged out in the outbox.
    assert_eq!(receive(&mut bob, 1).await, vec![marker]);
    beta.shutdown().await;
    alpha.shutdown().await;
}

/// Connects to `server` as a federation peer presenting `cert`/`key`.
async fn peer_connection(
    server: &Server,
    pki: &Pki,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> roost_client::transport::Connection {
    let endpoint = Endpoint::for_server(server.local_addr()).unwrap();
    let trust = TrustConfig::roots_from_pem_file(&pki.ca_file).unwrap();
    let identity = ClientIdentity::from_pem_files(cert, key).unwrap();
    let config = ConnectConfig::federation(server.local_addr(), ALPHA, trust, identity);
    endpoint.connect(&config).await.unwrap()
}

fn refused(response: Response) -> ErrorCode {
    match response {
        Response::Error(err) => err.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn peers_speak_only_for_their_own_domain() {
    let pair = pair().await;
    let (_alice, alice_client, _conn) = new_client_in(&pair.alpha, "alice", ALPHA).await;
    let dir = tempfile::tempdir().unwrap();
    // A certificate for gamma.test from the same CA: a real peer, but not beta.
    let (gamma_cert, gamma_key) = pair.pki.issue(dir.path(), "gamma", &["gamma.test"]);
    let gamma = peer_connection(&pair.alpha, &pair.pki, &gamma_cert, &gamma_key).await;

    // Forwarding on behalf of a beta.test client: refused.
    let forged_sender = "bob@beta.test/phone".parse().unwrap();
    let request = FederationRequest::Forward(ForwardRequest {
        sender: Some(forged_sender),
        request: ClientRequest::ClaimClientKeyPackage(
            roost_protocol::messages::keypackage::ClaimClientKeyPackageRequest {
                client: alice_client.id.clone(),
            },
        ),
    });
    assert_eq!(
        refused(gamma.request_federation(&request).await.unwrap()),
        ErrorCode::FORBIDDEN
    );

    // Delivering a message of a group hosted on beta.test: refused.
    let group = GroupId::new([1; 16], BETA.parse().unwrap());
    let deliver = FederationRequest::Deliver(DeliverRequest {
        deliveries: vec![Delivery {
            recipients: vec![alice_client.id.clone()],
            id: MessageId([7; 16]),
            timestamp_ms: 0,
            payload: QueuePayload::GroupMessage(GroupMessage {
                group,
                message: vec![1].into(),
            }),
        }],
    });
    assert_eq!(
        refused(gamma.request_federation(&deliver).await.unwrap()),
        ErrorCode::FORBIDDEN
    );

    // The real beta may deliver for its own groups, but not to clients of other domains.
    let (beta_cert, beta_key) = (
        pair.beta_cfg.tls_cert.clone().unwrap(),
        pair.beta_cfg.tls_key.clone().unwrap(),
    );
    let beta = peer_connection(&pair.alpha, &pair.pki, &beta_cert, &beta_key).await;
    let response = beta.request_federation(&deliver).await.unwrap();
    assert!(
        matches!(
            response,
            Response::Deliver(DeliverResponse { accepted: 1, .. })
        ),
        "{response:?}"
    );
    // Idempotent by message id.
    let response = beta.request_federation(&deliver).await.unwrap();
    assert!(
        matches!(
            response,
            Response::Deliver(DeliverResponse { accepted: 0, .. })
        ),
        "{response:?}"
    );
    let FederationRequest::Deliver(mut elsewhere) = deliver else {
        unreachable!()
    };
    // A recipient of another domain anywhere in the list, or no recipient at all: refused.
    elsewhere.deliveries[0].id = MessageId([8; 16]);
    for recipients in [
        vec!["carol@gamma.test/phone".parse().unwrap()],
        vec![
            alice_client.id.clone(),
            "carol@gamma.test/phone".parse().unwrap(),
        ],
        vec![],
    ] {
        elsewhere.deliveries[0].recipients = recipients;
        let response = beta
            .request_federation(&FederationRequest::Deliver(elsewhere.clone()))
            .await
            .unwrap();
        assert_eq!(refused(response), ErrorCode::FORBIDDEN);
    }
    // More recipients in one delivery than any sender puts there (1,024): refused before the
    // store looks any of them up.
    elsewhere.deliveries[0].recipients = vec![alice_client.id.clone(); 1025];
    let response = beta
        .request_federation(&FederationRequest::Deliver(elsewhere.clone()))
        .await
        .unwrap();
    assert_eq!(refused(response), ErrorCode::LIMIT_EXCEEDED);
    // Nothing of the refused batches was queued: the message id is still new for alice.
    elsewhere.deliveries[0].recipients = vec![alice_client.id.clone()];
    let response = beta
        .request_federation(&FederationRequest::Deliver(elsewhere))
        .await
        .unwrap();
    assert!(
        matches!(
            response,
            Response::Deliver(DeliverResponse { accepted: 1, .. })
        ),
        "{response:?}"
    );

    // A certificate from an unknown CA does not get a connection at all.
    let other_pki = Pki::new(dir.path(), "other");
    let (cert, key) = other_pki.issue(dir.path(), "beta-fake", &[BETA]);
    let endpoint = Endpoint::for_server(pair.alpha.local_addr()).unwrap();
    let trust = TrustConfig::roots_from_pem_file(&pair.pki.ca_file).unwrap();
    let identity = ClientIdentity::from_pem_files(&cert, &key).unwrap();
    let config = ConnectConfig::federation(pair.alpha.local_addr(), ALPHA, trust, identity);
    let refused_connection = match endpoint.connect(&config).await {
        Err(_) => true,
        Ok(conn) => conn.request_federation(&request).await.is_err(),
    };
    assert!(
        refused_connection,
        "a peer with an unknown CA must be refused"
    );
    let _ = pair.alpha_cfg.clone();
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_checks_remote_credentials_against_their_own_as() {
    let pair = pair().await;
    let mut alice = Member::new_in(&pair.alpha, "alice", ALPHA).await;
    let bob = Member::new_in(pair.beta(), "bob", BETA).await;
    alice.create_group(3).await;
    // A KeyPackage that names bob's client but carries another key.
    let impostor = TestClient {
        id: bob.id().clone(),
        key: keypair(),
        credential: bob.client.credential.clone(),
    };
    let forged = {
        use openmls::prelude::OpenMlsProvider as _;
        use openmls::prelude::tls_codec::Deserialize as _;
        openmls::prelude::KeyPackageIn::tls_deserialize_exact(key_package(&impostor).as_slice())
            .unwrap()
            .validate(
                openmls_rust_crypto::OpenMlsRustCrypto::default().crypto(),
                openmls::prelude::ProtocolVersion::Mls10,
            )
            .unwrap()
    };
    let bundle = alice.commit(vec![forged], &[]);
    let err = alice.send_commit(&bundle).await.unwrap_err();
    assert_eq!(err.wire_error().unwrap().code, ErrorCode::INVALID_COMMIT);
    alice.discard();
    // bob's genuine KeyPackage is accepted.
    bob.upload_key_packages(1).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    pair.shutdown().await;
}

#[tokio::test]
async fn denied_domains_are_not_federated_with() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    let (a, b) = (free_port(), free_port());
    let mut alpha_cfg = server_config(dir.path(), &pki, ALPHA, a, (BETA, b));
    alpha_cfg.federation.deny_domains = vec![BETA.into()];
    let beta_cfg = server_config(dir.path(), &pki, BETA, b, (ALPHA, a));
    let alpha = start(alpha_cfg).await;
    let beta = start(beta_cfg).await;
    let (_alice, _phone, alice) = new_client_in(&alpha, "alice", ALPHA).await;
    let (_bob, bob_client, bob) = new_client_in(&beta, "bob", BETA).await;
    // alpha does not forward to beta...
    let err = alice
        .call(DiscoverUserRequest {
            user: bob_client.id.user.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.wire_error().unwrap().code, ErrorCode::UNKNOWN_DOMAIN);
    // ...and does not accept beta's requests either.
    let err = bob
        .call(DiscoverUserRequest {
            user: "alice@alpha.test".parse().unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.wire_error().unwrap().code, ErrorCode::FORBIDDEN);
    beta.shutdown().await;
    alpha.shutdown().await;
}

/// A UDP socket on 127.0.0.1 that never answers: a peer node that is down. Keep it while the
/// test runs so its port stays taken.
fn silent_node() -> (std::net::UdpSocket, String) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    (socket, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_entry_whose_first_address_is_down_delivers_through_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    let (a, b) = (free_port(), free_port());
    let (_down_1, down_1) = silent_node();
    let (_down_2, down_2) = silent_node();
    let mut alpha_cfg = server_config(dir.path(), &pki, ALPHA, a, (BETA, b));
    let mut beta_cfg = server_config(dir.path(), &pki, BETA, b, (ALPHA, a));
    // Both forms: `address` first, then `addresses`; or `addresses` alone.
    alpha_cfg.federation.peers.insert(
        BETA.into(),
        PeerConfig {
            address: Some(down_1),
            addresses: vec![b.to_string()],
            certificate: None,
        },
    );
    beta_cfg.federation.peers.insert(
        ALPHA.into(),
        PeerConfig {
            address: None,
            addresses: vec![down_2, a.to_string()],
            certificate: None,
        },
    );
    // A second per silent address instead of the default five.
    alpha_cfg.federation.connect_timeout_ms = 1_000;
    beta_cfg.federation.connect_timeout_ms = 1_000;
    let alpha = start(alpha_cfg).await;
    let beta = start(beta_cfg).await;
    let mut alice = Member::new_in(&alpha, "alice", ALPHA).await;
    let mut bob = Member::new_in(&beta, "bob", BETA).await;
    bob.upload_key_packages(1).await;

    // alpha → beta: a forwarded claim, then the Welcome and a message through the outbox.
    alice.create_group(4).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    join(&mut bob).await;
    alice.send(b"to beta").await.unwrap();
    assert_eq!(receive(&mut bob, 1).await, vec![b"to beta".to_vec()]);
    // beta → alpha: bob's message is forwarded to the hub.
    bob.send(b"to alpha").await.unwrap();
    assert_eq!(receive(&mut alice, 1).await, vec![b"to alpha".to_vec()]);
    beta.shutdown().await;
    alpha.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_address_of_a_silent_peer_gets_the_configured_handshake_time_then_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    // Eight nodes of beta, none answering: at the default 5 s each the client's own 30 s
    // request timeout would end the claim first.
    let silent: Vec<_> = (0..8).map(|_| silent_node()).collect();
    let mut cfg = server_config(dir.path(), &pki, ALPHA, free_port(), (BETA, free_port()));
    cfg.federation.connect_timeout_ms = 250;
    cfg.federation.peers.insert(
        BETA.into(),
        PeerConfig {
            address: None,
            addresses: silent.iter().map(|(_, addr)| addr.clone()).collect(),
            certificate: None,
        },
    );
    let alpha = start(cfg).await;
    let alice = Member::new_in(&alpha, "alice", ALPHA).await;
    let bob: roost_protocol::UserId = format!("bob@{BETA}").parse().unwrap();
    let err = alice
        .conn
        .call(ClaimUserKeyPackagesRequest { user: bob })
        .await
        .unwrap_err();
    assert_eq!(err.wire_error().unwrap().code, ErrorCode::PEER_UNREACHABLE);
    // Every address was tried.
    for (socket, addr) in &silent {
        socket.set_nonblocking(true).unwrap();
        let mut datagram = [0u8; 2048];
        assert!(
            socket.recv_from(&mut datagram).is_ok(),
            "{addr} was not tried"
        );
    }
    alpha.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_peer_node_goes_away_the_outbox_moves_to_its_next_address_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    let (a, b1, b2) = (free_port(), free_port(), free_port());
    let mut alpha_cfg = server_config(dir.path(), &pki, ALPHA, a, (BETA, b1));
    if let Some(beta) = alpha_cfg.federation.peers.get_mut(BETA) {
        beta.addresses = vec![b2.to_string()];
    }
    let mut beta_cfg = server_config(dir.path(), &pki, BETA, b1, (ALPHA, a));
    let alpha = start(alpha_cfg).await;
    let beta = start(beta_cfg.clone()).await;
    let mut alice = Member::new_in(&alpha, "alice", ALPHA).await;
    let mut bob = Member::new_in(&beta, "bob", BETA).await;
    bob.upload_key_packages(1).await;
    alice.create_group(5).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    join(&mut bob).await;

    // beta's node at its first address goes away; beta (the same data) answers at the second.
    beta.shutdown().await;
    beta_cfg.listen = b2;
    let beta = start(beta_cfg).await;
    bob.conn = connect(&beta).await;
    login(&bob.conn, &bob.client).await;

    let sent = std::time::Instant::now();
    for n in 0..3u8 {
        alice.send(&[n]).await.unwrap();
    }
    let got = receive(&mut bob, 3).await;
    assert_eq!(got, (0..3u8).map(|n| vec![n]).collect::<Vec<_>>());
    // Trying the gone address again first would cost the 5 s handshake limit.
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "arrived after {:?}",
        sent.elapsed()
    );
    beta.shutdown().await;
    alpha.shutdown().await;
}

#[test]
fn peer_addresses_are_read_from_the_configuration_file() {
    let config = Config::from_toml(
        r#"
[federation.peers."beta.test"]
address = "beta-1.example.net:4433"
addresses = ["beta-2.example.net:4433", "192.0.2.7:4433"]

[federation.peers."gamma.test"]
addresses = ["gamma.example.net:4433"]
"#,
    )
    .unwrap();
    let peers = &config.federation.peers;
    assert_eq!(
        peers["beta.test"].address.as_deref(),
        Some("beta-1.example.net:4433")
    );
    assert_eq!(
        peers["beta.test"].addresses,
        ["beta-2.example.net:4433", "192.0.2.7:4433"]
    );
    assert_eq!(peers["gamma.test"].address, None);
    assert_eq!(peers["gamma.test"].addresses, ["gamma.example.net:4433"]);
    config.validate().unwrap();
}

/// Validates a KeyPackage built by a test client (what `Member::commit` takes).
fn validated(bytes: &roost_protocol::Opaque) -> openmls::prelude::KeyPackage {
    use openmls::prelude::OpenMlsProvider as _;
    use openmls::prelude::tls_codec::Deserialize as _;
    openmls::prelude::KeyPackageIn::tls_deserialize_exact(bytes.as_slice())
        .unwrap()
        .validate(
            openmls_rust_crypto::OpenMlsRustCrypto::default().crypto(),
            openmls::prelude::ProtocolVersion::Mls10,
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waiting_for_a_silent_peers_as_does_not_hold_up_the_group() {
    const SILENT: &str = "silent.test";
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    // The peer's "homeserver": a UDP socket that reads and never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cfg = server_config(
        dir.path(),
        &pki,
        ALPHA,
        free_port(),
        (SILENT, silent.local_addr().unwrap()),
    );
    let alpha = start(cfg).await;
    let mut alice = Member::new_in(&alpha, "alice", ALPHA).await;
    let mut carol = Member::new_in(&alpha, "carol", ALPHA).await;
    carol.upload_key_packages(1).await;
    alice.create_group(6).await;
    let kps = alice.claim(&[carol.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    join(&mut carol).await;

    // alice adds a client of the silent domain: the hub must ask that domain's AS first.
    let ghost = TestClient {
        id: format!("ghost@{SILENT}/phone").parse().unwrap(),
        key: keypair(),
        credential: carol.client.credential.clone(),
    };
    let bundle = alice.commit(vec![validated(&key_package(&ghost))], &[]);
    let request = CommitRequest {
        group: alice.gid(),
        commit: bundle.commit.clone().into(),
        welcome: bundle.welcome.clone().map(Into::into),
        group_info: bundle.group_info.clone().into(),
    };
    let conn = alice.conn.clone();
    let mut waiting = tokio::spawn(async move { conn.call(request).await });
    // Its first datagram shows the hub is now waiting for the silent peer.
    let mut datagram = [0u8; 2048];
    silent.recv_from(&mut datagram).await.unwrap();

    // Meanwhile the group's other operations go through: a message, then a commit.
    tokio::select! {
        biased;
        done = &mut waiting => panic!("the waiting commit ended ({done:?}) before a message could be sent"),
        sent = carol.send(b"meanwhile") => assert_eq!(sent.unwrap().recipients, 1),
    }
    let update = carol.commit(vec![], &[]);
    tokio::select! {
        biased;
        done = &mut waiting => panic!("the waiting commit ended ({done:?}) before another commit"),
        accepted = carol.send_commit(&update) => assert_eq!(accepted.unwrap().epoch, 2),
    }
    carol.merge();

    // The peer never answers: the commit that needed it fails, and changed nothing.
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(err.wire_error().unwrap().code, ErrorCode::PEER_UNREACHABLE);
    alice.discard();
    assert_eq!(receive(&mut alice, 1).await, vec![b"meanwhile".to_vec()]);
    assert_eq!(alice.epoch(), 2);
    alice.send(b"still here").await.unwrap();
    assert_eq!(receive(&mut carol, 1).await, vec![b"still here".to_vec()]);
    alpha.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_backlog_for_a_peer_that_is_down_is_exported() {
    let mut pair = pair().await;
    let (mut alice, _bob) = alice_and_bob_in_a_group(&pair).await;
    pair.beta.take().unwrap().shutdown().await;
    for n in 0..5u8 {
        alice.send(&[n]).await.unwrap();
    }
    // Alpha starts again with metrics on: the storage gauges are read when metrics start.
    let Pair {
        _dir: dir,
        alpha,
        mut alpha_cfg,
        ..
    } = pair;
    drop(alice);
    alpha.shutdown().await;
    alpha_cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let alpha = start(alpha_cfg).await;
    let addr = alpha.metrics_addr().unwrap();
    let backlog = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("roost_outbox_backlog{domain=\"beta.test\"} "))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http_get(addr, "/metrics").await;
        // One outbox entry per message (each for bob, beta's only recipient).
        if backlog(&text) == Some(5.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backlog never exported: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alpha.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn a_blob_of_another_domain_is_downloaded_through_the_clients_own_homeserver() {
    use crate::blob::{code, download, pseudo_random, sha256, upload};
    let pair = pair().await;
    let (_alice, _alice_client, alice) = new_client_in(&pair.alpha, "alice", ALPHA).await;
    let (_bob, _bob_client, bob) = new_client_in(pair.beta(), "bob", BETA).await;
    let bytes = pseudo_random(3 * 1024 * 1024 + 5, 11);
    let stored = upload(&alice, &bytes).await.unwrap();
    assert_eq!(stored.blob.domain.as_str(), ALPHA);

    // Bob talks only to beta, which fetches from alpha and streams it through.
    let back = download(&bob, &stored.blob, 0, None).await.unwrap();
    assert_eq!(sha256(&back), stored.blob.address);
    let tail = download(&bob, &stored.blob, 3 * 1024 * 1024, None)
        .await
        .unwrap();
    assert!(tail == bytes[3 * 1024 * 1024..]);
    // Alpha's answers come through as they are: a wrong token, a range past the end.
    let mut guessed = stored.blob.clone();
    guessed.token[0] ^= 1;
    assert_eq!(
        code(download(&bob, &guessed, 0, None).await.unwrap_err()),
        ErrorCode::BLOB_NOT_FOUND
    );
    assert_eq!(
        code(
            download(&bob, &stored.blob, bytes.len() as u64 + 1, None)
                .await
                .unwrap_err()
        ),
        ErrorCode::BLOB_RANGE_NOT_SATISFIABLE
    );

    // A peer may only ask for blobs the server stores itself (one hop, no relaying).
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pair.pki.issue(dir.path(), "beta2", &[BETA]);
    let peer = peer_connection(&pair.alpha, &pair.pki, &cert, &key).await;
    let mut elsewhere = stored.blob.clone();
    elsewhere.domain = "gamma.test".parse().unwrap();
    let frame = roost_protocol::frame::encode_frame(&FederationRequest::BlobDownload(
        roost_protocol::messages::blob::BlobDownloadRequest {
            blob: elsewhere,
            offset: 0,
            length: None,
        },
    ))
    .unwrap();
    let answer = peer.request_raw(&frame).await.unwrap();
    let answer = roost_protocol::frame::decode_body::<Response>(&answer).unwrap();
    assert_eq!(refused(answer), ErrorCode::BLOB_NOT_FOUND);
    pair.shutdown().await;
}

/// A client connection may have `limits.max_concurrent_streams` requests open at once (32 by
/// default: quinn keeps a slot for every stream it grants); a peer homeserver's connection,
/// which carries many clients' requests, gets `federation.max_concurrent_streams` (128).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_have_more_requests_open_than_a_client() {
    let pair = pair().await;
    let client_limit = pair.alpha_cfg.limits.max_concurrent_streams as usize;
    let peer_limit = pair.alpha_cfg.federation.max_concurrent_streams as usize;
    assert!(peer_limit > client_limit);

    // A client: every granted stream opens, the next one waits for one of them to end.
    let client = connect(&pair.alpha).await;
    let mut open = Vec::new();
    for _ in 0..client_limit {
        let (mut send, recv) = client.open_raw_stream().await.unwrap();
        send.write_all(&[0]).await.unwrap();
        open.push((send, recv));
    }
    let next = tokio::time::timeout(Duration::from_millis(500), client.open_raw_stream()).await;
    assert!(
        next.is_err(),
        "a client opened more than {client_limit} streams"
    );
    // Once some end (the client resets them; the server answers with an error), more open.
    // quinn grants new streams in batches, once more than an eighth of the limit is free.
    for _ in 0..client_limit / 8 + 1 {
        let (mut send, _recv) = open.pop().unwrap();
        send.reset(0u32.into()).unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), client.open_raw_stream())
        .await
        .expect("streams freed by the client are granted again")
        .unwrap();

    // The peer: its streams beyond the client limit are granted (after one round trip).
    let (beta_cert, beta_key) = (
        pair.beta_cfg.tls_cert.clone().unwrap(),
        pair.beta_cfg.tls_key.clone().unwrap(),
    );
    let beta = peer_connection(&pair.alpha, &pair.pki, &beta_cert, &beta_key).await;
    let mut peer_open = Vec::new();
    for n in 0..peer_limit {
        let (mut send, recv) =
            tokio::time::timeout(Duration::from_secs(10), beta.open_raw_stream())
                .await
                .unwrap_or_else(|_| panic!("the peer's stream {n} was not granted"))
                .unwrap();
        send.write_all(&[0]).await.unwrap();
        peer_open.push((send, recv));
    }
    let next = tokio::time::timeout(Duration::from_millis(500), beta.open_raw_stream()).await;
    assert!(
        next.is_err(),
        "a peer opened more than {peer_limit} streams"
    );
    drop((open, peer_open));
    pair.shutdown().await;
}
