//! The QUIC request layer against a tiny in-test quinn server on 127.0.0.1 (rcgen
//! certificates, ring provider, TLS 1.3) that answers with canned responses.

// Test helpers outside `#[test]` functions may panic on setup failures.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use roost_client::transport::{
    Backoff, ClientIdentity, ConnectConfig, Endpoint, ReconnectingConnection, RequestError,
    TransportError, TrustConfig,
};
use roost_protocol::frame::{
    DEFAULT_MAX_FRAME_LEN, FrameError, decode_body, encode_frame, frame_len,
};
use roost_protocol::messages::auth::{
    AsKeysRequest, AsKeysResponse, AuthenticateRequest, AuthenticateResponse, ClientCredential,
    ConnectionAuthTbs, DiscoverUserRequest, EXPORTER_LABEL, EXPORTER_LEN, LABEL_CONNECTION_AUTH,
    signing_input,
};
use roost_protocol::messages::federation::{DeliverRequest, DeliverResponse, FederationRequest};
use roost_protocol::messages::keypackage::KeyPackageCountRequest;
use roost_protocol::messages::queue::{
    GroupMessage, ListenEvent, QueueAckResponse, QueueFetchRequest, QueueFetchResponse,
    QueueListenResponse, QueueMessage, QueuePayload,
};
use roost_protocol::messages::{ClientRequest, RequestKind, Response};
use roost_protocol::{ClientId, ErrorCode, GroupId, MessageId, Opaque, WireError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

// `QueueFetch.after_seq` values that make the test server misbehave in one particular way.
const HANG: u64 = u64::MAX;
const TRUNCATED: u64 = u64::MAX - 1;
const TRAILING: u64 = u64::MAX - 2;
const OVERSIZED: u64 = u64::MAX - 3;
/// `QueueListen.after_seq` that the server refuses.
const LISTEN_REFUSED: u64 = u64::MAX;

// ---------------------------------------------------------------------------------------------
// Certificates.

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivatePkcs8KeyDer::from(key.serialize_der()).into()
}

fn self_signed_localhost() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        certified.cert.der().clone(),
        key_der(&certified.signing_key),
    )
}

fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn issue(
    ca: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    params.extended_key_usages = vec![usage];
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.der().clone(), key_der(&key))
}

fn roots(ca: &CertifiedIssuer<'static, KeyPair>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    roots
}

// ---------------------------------------------------------------------------------------------
// The test server.

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<rustls::RootCertStore>,
) -> quinn::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let builder = match client_roots {
        Some(roots) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(chain, key).unwrap();
    tls.alpn_protocols = vec![
        roost_protocol::ALPN_CLIENT.to_vec(),
        roost_protocol::ALPN_FEDERATION.to_vec(),
    ];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    quinn::ServerConfig::with_crypto(Arc::new(crypto))
}

struct TestServer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts a server on `addr`, retrying the bind for a while (a restarted server waits
    /// for the previous socket to be released).
    async fn start(config: quinn::ServerConfig, addr: SocketAddr) -> TestServer {
        let mut tries = 0;
        let endpoint = loop {
            match quinn::Endpoint::server(config.clone(), addr) {
                Ok(endpoint) => break endpoint,
                Err(_) if tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => panic!("cannot bind {addr}: {err}"),
            }
        };
        let addr = endpoint.local_addr().unwrap();
        let accepting = endpoint.clone();
        let accept_task = tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else {
                        return;
                    };
                    while let Ok((send, recv)) = connection.accept_bi().await {
                        tokio::spawn(handle_stream(connection.clone(), send, recv));
                    }
                });
            }
        });
        TestServer {
            endpoint,
            addr,
            accept_task,
        }
    }

    async fn localhost() -> (TestServer, CertificateDer<'static>) {
        let (cert, key) = self_signed_localhost();
        let server = TestServer::start(
            server_config(vec![cert.clone()], key, None),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await;
        (server, cert)
    }

    async fn stop(self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"restarting");
        // An abandoned handshake can keep the endpoint busy until its idle timeout: don't wait.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        self.accept_task.abort();
        let _ = self.accept_task.await;
    }
}

fn server_exporter(connection: &quinn::Connection) -> [u8; EXPORTER_LEN] {
    let mut out = [0u8; EXPORTER_LEN];
    connection
        .export_keying_material(&mut out, EXPORTER_LABEL, &[])
        .unwrap();
    out
}

fn is_federation(connection: &quinn::Connection) -> bool {
    connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|alpn| alpn == roost_protocol::ALPN_FEDERATION)
}

fn frame(response: &Response) -> Vec<u8> {
    encode_frame(response).unwrap()
}

/// The body of a complete request frame, checked like a real server does.
fn frame_body(bytes: &[u8]) -> Result<&[u8], WireError> {
    let header: [u8; 4] = bytes
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| FrameError::Truncated.to_wire())?;
    let len = frame_len(header, DEFAULT_MAX_FRAME_LEN).map_err(|e| e.to_wire())?;
    if bytes.len() != 4 + len {
        return Err(FrameError::Truncated.to_wire());
    }
    Ok(&bytes[4..])
}

/// The body length, if `bytes` start with a complete QueueListen request frame.
fn complete_listen_request(bytes: &[u8]) -> Option<usize> {
    let header: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(header) as usize;
    let kind = (RequestKind::QueueListen as u16).to_be_bytes();
    (bytes.len() >= 4 + len && bytes.get(6..8) == Some(&kind[..])).then_some(len)
}

async fn handle_stream(
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // Read to the end of the stream, except after a complete QueueListen request: a listening
    // client keeps its side open for acks (this fake server ignores them).
    let mut bytes = Vec::new();
    loop {
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk.bytes),
            Ok(None) => break,
            Err(_) => return,
        }
        if bytes.len() > 1 << 20 {
            return;
        }
        if let Some(len) = complete_listen_request(&bytes) {
            bytes.truncate(4 + len);
            break;
        }
    }
    let body = frame_body(&bytes);
    let response = if is_federation(&connection) {
        match body.and_then(|b| decode_body::<FederationRequest>(b).map_err(|e| e.to_wire())) {
            Ok(FederationRequest::Deliver(deliver)) => frame(&Response::Deliver(DeliverResponse {
                accepted: deliver.deliveries.len() as u32,
                unknown_recipients: 0,
                queue_full: 0,
            })),
            Ok(_) => frame(&WireError::new(ErrorCode::WRONG_STREAM, "not here").into()),
            Err(err) => frame(&Response::Error(err)),
        }
    } else {
        match body.and_then(|b| decode_body::<ClientRequest>(b).map_err(|e| e.to_wire())) {
            Ok(ClientRequest::QueueListen(listen)) => {
                return serve_listen(send, listen.after_seq).await;
            }
            Ok(request) => answer(&connection, request).await,
            Err(err) => frame(&Response::Error(err)),
        }
    };
    let _ = send.write_all(&response).await;
    let _ = send.finish();
}

/// `head` followed by `tail`.
fn concat(head: &[u8], tail: &[u8]) -> Vec<u8> {
    [head, tail].concat()
}

/// The canned answer (a whole response frame, or deliberately broken bytes) to a request.
async fn answer(connection: &quinn::Connection, request: ClientRequest) -> Vec<u8> {
    match request {
        ClientRequest::QueueFetch(fetch) => match fetch.after_seq {
            HANG => std::future::pending().await,
            TRUNCATED => concat(&100u32.to_be_bytes(), &[0; 10]),
            TRAILING => concat(&frame(&Response::QueueAck(QueueAckResponse {})), &[0]),
            OVERSIZED => concat(&u32::MAX.to_be_bytes(), &[0; 64]),
            seq => frame(&Response::QueueFetch(QueueFetchResponse {
                messages: Vec::new(),
                head_seq: seq,
            })),
        },
        // The server's exporter, so tests can compare both ends of a connection.
        ClientRequest::AsKeys(request) => frame(&Response::AsKeys(AsKeysResponse {
            domain: request.domain,
            keys: vec![Opaque::from(&server_exporter(connection)[..])],
        })),
        // The "signature" is the signing input itself: the server accepts it iff it was built
        // from this connection's exporter.
        ClientRequest::Authenticate(auth) => {
            let tbs = ConnectionAuthTbs {
                client: auth.client.clone(),
                exporter: Opaque::from(&server_exporter(connection)[..]),
            };
            if auth.signature.as_slice() != signing_input(LABEL_CONNECTION_AUTH, &tbs) {
                return frame(&WireError::new(ErrorCode::BAD_SIGNATURE, "bad signature").into());
            }
            frame(&Response::Authenticate(AuthenticateResponse {
                credential: ClientCredential {
                    client: auth.client,
                    signature_key: Opaque::default(),
                    not_before: 0,
                    not_after: 0,
                    as_signature: Opaque::default(),
                },
            }))
        }
        // Answered with a response of the wrong kind.
        ClientRequest::KeyPackageCount(_) => frame(&Response::QueueAck(QueueAckResponse {})),
        _ => frame(
            &WireError::new(ErrorCode::WRONG_STREAM, "not supported by the test server").into(),
        ),
    }
}

fn listen_message(seq: u64) -> QueueMessage {
    QueueMessage {
        seq,
        id: MessageId([seq as u8; 16]),
        timestamp_ms: seq * 1000,
        payload: QueuePayload::GroupMessage(GroupMessage {
            group: GroupId::new([7; 16], "localhost".parse().unwrap()),
            message: Opaque::from(vec![seq as u8; 3]),
        }),
    }
}

async fn serve_listen(mut send: quinn::SendStream, after_seq: u64) {
    if after_seq == LISTEN_REFUSED {
        let refusal = Response::Error(WireError::new(ErrorCode::UNAUTHENTICATED, "log in first"));
        let _ = send.write_all(&frame(&refusal)).await;
        let _ = send.finish();
        return;
    }
    let accepted = Response::QueueListen(QueueListenResponse {
        head_seq: after_seq + 3,
    });
    if send.write_all(&frame(&accepted)).await.is_err() {
        return;
    }
    for seq in after_seq + 1..=after_seq + 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let event = encode_frame(&ListenEvent::Message(listen_message(seq))).unwrap();
        // Split the frame so the client has to reassemble it.
        let (a, b) = event.split_at(3);
        if send.write_all(a).await.is_err() || send.write_all(b).await.is_err() {
            return;
        }
    }
    let closed = ListenEvent::Closed(WireError::new(ErrorCode::UNAVAILABLE, "shutting down"));
    let _ = send.write_all(&encode_frame(&closed).unwrap()).await;
    let _ = send.finish();
}

// ---------------------------------------------------------------------------------------------
// Client helpers.

fn pinned(addr: SocketAddr, cert: &CertificateDer<'static>) -> ConnectConfig {
    let mut config = ConnectConfig::new(
        addr,
        "localhost",
        TrustConfig::PinnedCertificates(vec![cert.clone()]),
    );
    config.connect_timeout = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(10);
    config
}

fn fetch(after_seq: u64) -> QueueFetchRequest {
    QueueFetchRequest {
        after_seq,
        max_messages: 10,
        max_bytes: 1024,
    }
}

fn client_id() -> ClientId {
    "alice@localhost/phone".parse().unwrap()
}

fn transport_error<T: std::fmt::Debug>(result: Result<T, RequestError>) -> TransportError {
    match result {
        Err(RequestError::Transport(err)) => err,
        other => panic!("expected a transport error, got {other:?}"),
    }
}

fn empty_delivery() -> FederationRequest {
    FederationRequest::Deliver(DeliverRequest {
        deliveries: Vec::new(),
    })
}

fn assert_untrusted<T: std::fmt::Debug>(result: Result<T, TransportError>) {
    assert!(
        matches!(result, Err(TransportError::UntrustedCertificate(_))),
        "expected an untrusted certificate, got {result:?}"
    );
}

async fn connect(config: &ConnectConfig) -> roost_client::transport::Connection {
    Endpoint::for_servers(&config.server_addrs)
        .unwrap()
        .connect(config)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_certificate_and_many_concurrent_calls_on_one_connection() {
    let (server, cert) = TestServer::localhost().await;
    let connection = connect(&pinned(server.addr, &cert)).await;
    assert_eq!(connection.remote_address(), server.addr);
    assert_eq!(connection.peer_certificates(), Some(vec![cert.clone()]));

    let mut calls = tokio::task::JoinSet::new();
    for seq in 0..200u64 {
        let connection = connection.clone();
        calls.spawn(async move { (seq, connection.call(fetch(seq)).await) });
    }
    // Every call is answered, each with its own answer.
    let answers = calls.join_all().await;
    assert_eq!(answers.len(), 200);
    for (seq, result) in answers {
        assert_eq!(result.unwrap().head_seq, seq);
    }
    connection.close();
    assert!(!connection.is_open());
    assert!(matches!(
        connection.call(fetch(1)).await,
        Err(RequestError::Transport(TransportError::ConnectionLost(_)))
    ));
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_pinned_certificate_is_rejected() {
    let (server, _cert) = TestServer::localhost().await;
    let (other, _) = self_signed_localhost();
    let endpoint = Endpoint::for_server(server.addr).unwrap();
    assert_untrusted(endpoint.connect(&pinned(server.addr, &other)).await);
    server.stop().await;
}

#[tokio::test]
async fn a_ca_signed_certificate_verifies_with_roots() {
    let ca = make_ca("roost test CA");
    let (cert, key) = issue(&ca, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let server = TestServer::start(
        server_config(vec![cert.clone()], key, None),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let endpoint = Endpoint::for_server(server.addr).unwrap();

    let mut config = ConnectConfig::new(server.addr, "localhost", TrustConfig::Roots(roots(&ca)));
    config.connect_timeout = Duration::from_secs(5);
    let connection = endpoint.connect(&config).await.unwrap();
    assert_eq!(connection.call(fetch(42)).await.unwrap().head_seq, 42);

    // The certificate is for "localhost", not for another domain.
    config.server_name = "other.example".into();
    assert_untrusted(endpoint.connect(&config).await);

    // Another CA does not vouch for it.
    config.server_name = "localhost".into();
    config.trust = TrustConfig::Roots(roots(&make_ca("someone else")));
    assert_untrusted(endpoint.connect(&config).await);

    // Pinning is of the end-entity certificate: pinning the CA is not enough.
    config.trust = TrustConfig::PinnedCertificates(vec![ca.der().clone()]);
    assert_untrusted(endpoint.connect(&config).await);
    server.stop().await;
}

#[tokio::test]
async fn server_errors_and_wrong_kinds_are_typed() {
    let (server, cert) = TestServer::localhost().await;
    let connection = connect(&pinned(server.addr, &cert)).await;

    let discover = DiscoverUserRequest {
        user: "bob@localhost".parse().unwrap(),
    };
    match connection.call(discover).await {
        Err(RequestError::Server(err)) => {
            assert_eq!(err.code, ErrorCode::WRONG_STREAM);
            assert_eq!(err.reason(), "not supported by the test server");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    match connection.call(KeyPackageCountRequest {}).await {
        Err(RequestError::UnexpectedResponse { expected }) => {
            assert_eq!(expected, RequestKind::KeyPackageCount)
        }
        other => panic!("expected an unexpected response, got {other:?}"),
    }
    // The untyped form hands the error response back as a response.
    let raw = connection
        .request(&ClientRequest::DiscoverUser(DiscoverUserRequest {
            user: "bob@localhost".parse().unwrap(),
        }))
        .await
        .unwrap();
    assert!(matches!(raw, Response::Error(ref e) if e.code == ErrorCode::WRONG_STREAM));
    server.stop().await;
}

#[tokio::test]
async fn bad_response_framing_is_a_typed_error_and_the_connection_survives() {
    let (server, cert) = TestServer::localhost().await;
    let connection = connect(&pinned(server.addr, &cert)).await;

    assert!(matches!(
        transport_error(connection.call(fetch(OVERSIZED)).await),
        TransportError::Frame(FrameError::TooLarge {
            len: u32::MAX,
            max: DEFAULT_MAX_FRAME_LEN
        })
    ));
    assert!(matches!(
        transport_error(connection.call(fetch(TRUNCATED)).await),
        TransportError::Frame(FrameError::Truncated)
    ));
    assert!(matches!(
        transport_error(connection.call(fetch(TRAILING)).await),
        TransportError::TrailingData
    ));
    assert_eq!(connection.call(fetch(5)).await.unwrap().head_seq, 5);

    // A receiver's own limit applies to ordinary responses too.
    let mut config = pinned(server.addr, &cert);
    config.max_frame_len = 4;
    assert!(matches!(
        transport_error(connect(&config).await.call(fetch(1)).await),
        TransportError::Frame(FrameError::TooLarge { max: 4, .. })
    ));
    server.stop().await;
}

#[tokio::test]
async fn a_request_without_answer_times_out() {
    let (server, cert) = TestServer::localhost().await;
    let mut config = pinned(server.addr, &cert);
    config.request_timeout = Duration::from_millis(300);
    let connection = connect(&config).await;
    let started = std::time::Instant::now();
    assert!(matches!(
        transport_error(connection.call(fetch(HANG)).await),
        TransportError::Timeout
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(connection.call(fetch(3)).await.unwrap().head_seq, 3);
    server.stop().await;
}

#[tokio::test]
async fn raw_requests_carry_hostile_bytes() {
    let (server, cert) = TestServer::localhost().await;
    let connection = connect(&pinned(server.addr, &cert)).await;

    let cases: [(&[u8], ErrorCode); 3] = [
        // "hell" read as a length is far over the limit.
        (b"hello", ErrorCode::FRAME_TOO_LARGE),
        // Protocol version 9.
        (&[0, 0, 0, 2, 0, 9], ErrorCode::UNSUPPORTED_VERSION),
        // Version 1, unknown request discriminant.
        (&[0, 0, 0, 4, 0, 1, 0xff, 0xff], ErrorCode::MALFORMED),
    ];
    for (bytes, code) in cases {
        let body = connection.request_raw(bytes).await.unwrap();
        match decode_body::<Response>(&body).unwrap() {
            Response::Error(err) => assert_eq!(err.code, code),
            other => panic!("expected an error for {bytes:?}, got {other:?}"),
        }
    }
    // A well-formed frame written in pieces on a bare stream gets a normal answer.
    let request = encode_frame(&ClientRequest::QueueFetch(fetch(9))).unwrap();
    let (mut send, mut recv) = connection.open_raw_stream().await.unwrap();
    for byte in &request {
        send.write_all(&[*byte]).await.unwrap();
    }
    send.finish().unwrap();
    let answer = recv.read_to_end(1024).await.unwrap();
    assert!(matches!(
        decode_body::<Response>(&answer[4..]).unwrap(),
        Response::QueueFetch(QueueFetchResponse { head_seq: 9, .. })
    ));
    server.stop().await;
}

#[tokio::test]
async fn listen_yields_messages_in_order_then_closed_then_none() {
    let (server, cert) = TestServer::localhost().await;
    let connection = connect(&pinned(server.addr, &cert)).await;

    let mut stream = connection.listen(10).await.unwrap();
    assert_eq!(stream.head_seq(), 13);
    for seq in 11..=13 {
        match stream.next().await {
            Some(Ok(ListenEvent::Message(message))) => assert_eq!(message, listen_message(seq)),
            other => panic!("expected message {seq}, got {other:?}"),
        }
    }
    match stream.next().await {
        Some(Ok(ListenEvent::Closed(err))) => assert_eq!(err.code, ErrorCode::UNAVAILABLE),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
    assert!(stream.next().await.is_none());

    match connection.listen(LISTEN_REFUSED).await {
        Err(RequestError::Server(err)) => assert_eq!(err.code, ErrorCode::UNAUTHENTICATED),
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn auth_exporter_binds_the_signature_to_one_connection() {
    let (server, cert) = TestServer::localhost().await;
    let config = pinned(server.addr, &cert);
    let endpoint = Endpoint::for_server(server.addr).unwrap();
    let first = endpoint.connect(&config).await.unwrap();
    let second = endpoint.connect(&config).await.unwrap();

    let server_view = |connection: roost_client::transport::Connection| async move {
        let response = connection
            .call(AsKeysRequest {
                domain: "localhost".parse().unwrap(),
            })
            .await
            .unwrap();
        response.keys[0].as_slice().to_vec()
    };
    let first_exporter = first.export_auth_exporter().unwrap();
    let second_exporter = second.export_auth_exporter().unwrap();
    assert_eq!(server_view(first.clone()).await, first_exporter);
    assert_eq!(server_view(second.clone()).await, second_exporter);
    assert_ne!(first_exporter, second_exporter);
    assert_eq!(first.export_auth_exporter().unwrap(), first_exporter);

    // The test server accepts the signing input itself as "signature".
    let client = client_id();
    let accepted = first
        .authenticate(&client, |input| input.to_vec())
        .await
        .unwrap();
    assert_eq!(accepted.credential.client, client);

    // A signature made for the first connection is refused on the second.
    let replayed = first.auth_signing_input(&client).unwrap();
    let result = second
        .call(AuthenticateRequest {
            client: client.clone(),
            signature: Opaque::new(replayed),
        })
        .await;
    assert!(
        matches!(result, Err(RequestError::Server(ref e)) if e.code == ErrorCode::BAD_SIGNATURE),
        "{result:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn federation_with_mutual_tls() {
    let ca = make_ca("federation CA");
    let (server_cert, server_key) = issue(&ca, "hub.example", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = issue(&ca, "home.example", ExtendedKeyUsagePurpose::ClientAuth);
    let server = TestServer::start(
        server_config(vec![server_cert], server_key, Some(roots(&ca))),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let endpoint = Endpoint::for_server(server.addr).unwrap();
    let identity = ClientIdentity::new(vec![client_cert], client_key);
    let mut config = ConnectConfig::federation(
        server.addr,
        "hub.example",
        TrustConfig::Roots(roots(&ca)),
        identity,
    );
    config.connect_timeout = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(5);
    let connection = endpoint.connect(&config).await.unwrap();
    let response = connection
        .request_federation(&empty_delivery())
        .await
        .unwrap();
    assert_eq!(
        response,
        Response::Deliver(DeliverResponse {
            accepted: 0,
            unknown_recipients: 0,
            queue_full: 0
        })
    );

    // Without a client certificate the server refuses us: at the handshake or at the first
    // request, depending on when the refusal arrives.
    config.client_identity = None;
    if let Ok(connection) = endpoint.connect(&config).await {
        let result = connection.request_federation(&empty_delivery()).await;
        assert!(result.is_err(), "{result:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_alpn_and_unreachable_servers_fail_typed() {
    let (server, cert) = TestServer::localhost().await;
    let endpoint = Endpoint::for_server(server.addr).unwrap();
    let mut config = pinned(server.addr, &cert);
    config.alpn = b"other/1".to_vec();
    let result = endpoint.connect(&config).await;
    assert!(
        matches!(
            result,
            Err(TransportError::Handshake(_) | TransportError::AlpnMismatch)
        ),
        "{result:?}"
    );
    let addr = server.addr;
    server.stop().await;

    let mut config = pinned(addr, &cert);
    config.connect_timeout = Duration::from_millis(200);
    // Nothing answers (a timeout), or the closing endpoint still refuses: both are worth
    // retrying.
    let err = endpoint.connect(&config).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_restarts_on_the_same_port() {
    let (cert, key) = self_signed_localhost();
    let server_tls = server_config(vec![cert.clone()], key, None);
    let server = TestServer::start(server_tls.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;

    let mut config = pinned(addr, &cert);
    config.connect_timeout = Duration::from_millis(300);
    let hooks = Arc::new(AtomicUsize::new(0));
    let hook_count = hooks.clone();
    let reconnecting = Arc::new(
        ReconnectingConnection::new(Endpoint::for_server(addr).unwrap(), config)
            .with_backoff(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(400),
            ))
            .with_on_connect(move |connection| {
                let hook_count = hook_count.clone();
                async move {
                    connection
                        .authenticate(&client_id(), |input| input.to_vec())
                        .await?;
                    hook_count.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
    );

    assert_eq!(reconnecting.call(fetch(1)).await.unwrap().head_seq, 1);
    assert_eq!(hooks.load(Ordering::SeqCst), 1);
    let old = reconnecting.connection().await.unwrap();
    assert_eq!(
        hooks.load(Ordering::SeqCst),
        1,
        "the live connection is reused"
    );

    server.stop().await;
    let lost = tokio::time::timeout(Duration::from_secs(5), old.closed())
        .await
        .expect("the client learns that the server closed");
    assert!(lost.is_connection_lost());

    // While the server is down the call keeps retrying with backoff: a socket holding the
    // address (answering nothing) sees a second connection attempt after the first failed.
    let down = bind_when_free(addr).await;
    let pending = {
        let reconnecting = reconnecting.clone();
        tokio::spawn(async move { reconnecting.call(fetch(2)).await })
    };
    wait_for_attempts(&down, 2).await;
    drop(down);
    if pending.is_finished() {
        panic!("gave up while the server was down: {:?}", pending.await);
    }
    let restarted = TestServer::start(server_tls, addr).await;
    assert_eq!(restarted.addr, addr);

    let answer = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("reconnected within the backoff")
        .unwrap()
        .unwrap();
    assert_eq!(answer.head_seq, 2);
    assert_eq!(hooks.load(Ordering::SeqCst), 2, "the hook ran again");
    restarted.stop().await;
}

/// Binds `addr` once the stopped server's endpoint released it.
async fn bind_when_free(addr: SocketAddr) -> tokio::net::UdpSocket {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::UdpSocket::bind(addr).await {
            Ok(socket) => return socket,
            Err(err) => assert!(
                tokio::time::Instant::now() < deadline,
                "{addr} still in use: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `count` distinct QUIC connection attempts reached `socket` (each begins with
/// a fresh destination connection id in its long header; retransmissions repeat it).
async fn wait_for_attempts(socket: &tokio::net::UdpSocket, count: usize) {
    let mut seen = std::collections::HashSet::new();
    let mut buf = [0u8; 2048];
    let wait = async {
        while seen.len() < count {
            let (len, _) = socket.recv_from(&mut buf).await.unwrap();
            let packet = &buf[..len];
            // Long header: flags, version (4), DCID length, DCID.
            let dcid = packet
                .get(5)
                .and_then(|&n| packet.get(6..6 + usize::from(n)));
            if let Some(dcid) = dcid.filter(|_| packet[0] & 0x80 != 0) {
                seen.insert(dcid.to_vec());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the client stopped trying to connect");
}

#[tokio::test]
async fn reconnecting_gives_up_on_untrusted_servers_at_once() {
    let (server, _cert) = TestServer::localhost().await;
    let (other, _) = self_signed_localhost();
    let reconnecting = ReconnectingConnection::new(
        Endpoint::for_server(server.addr).unwrap(),
        pinned(server.addr, &other),
    );
    let started = std::time::Instant::now();
    let result = reconnecting.call(fetch(1)).await;
    assert_untrusted(result.map_err(|err| transport_error::<()>(Err(err))));
    assert!(started.elapsed() < Duration::from_secs(2));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Several addresses of one server.

/// A UDP port on 127.0.0.1 where nothing listens (it was free a moment ago).
fn dead_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Pinned `cert` at `addrs`, with a short handshake limit so a dead address costs little.
fn pinned_at(addrs: &[SocketAddr], cert: &CertificateDer<'static>) -> ConnectConfig {
    let mut config = ConnectConfig::with_addrs(
        addrs.iter().copied(),
        "localhost",
        TrustConfig::PinnedCertificates(vec![cert.clone()]),
    );
    config.connect_timeout = Duration::from_millis(300);
    config.request_timeout = Duration::from_secs(10);
    config
}

/// A backoff far longer than any of these tests: failing over must never wait for it.
fn slow_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(60), Duration::from_secs(60))
}

/// `future`'s output, or a panic naming `what` after `limit`.
async fn within<T>(what: &str, limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took too long"))
}

/// Authenticates every new connection and counts them.
fn counting_hook(
    reconnecting: ReconnectingConnection,
    hooks: &Arc<AtomicUsize>,
) -> ReconnectingConnection {
    let hooks = hooks.clone();
    reconnecting.with_on_connect(move |connection| {
        let hooks = hooks.clone();
        async move {
            connection
                .authenticate(&client_id(), |input| input.to_vec())
                .await?;
            hooks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
}

#[tokio::test]
async fn connect_skips_addresses_where_nothing_answers_or_the_certificate_is_wrong() {
    let (server, cert) = TestServer::localhost().await;
    let (impostor, _) = TestServer::localhost().await;
    let addrs = [dead_addr(), impostor.addr, server.addr];
    let config = pinned_at(&addrs, &cert);
    let endpoint = Endpoint::for_servers(&config.server_addrs).unwrap();
    let connection = endpoint.connect(&config).await.unwrap();
    assert_eq!(connection.server_addr(), server.addr);
    assert_eq!(connection.call(fetch(7)).await.unwrap().head_seq, 7);

    // Nothing answers anywhere: worth retrying, though one node's certificate is wrong.
    let err = endpoint
        .connect(&pinned_at(&[impostor.addr, dead_addr()], &cert))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // Only wrong certificates: not worth retrying.
    assert_untrusted(endpoint.connect(&pinned_at(&[impostor.addr], &cert)).await);
    // No address at all.
    let err = endpoint.connect(&pinned_at(&[], &cert)).await.unwrap_err();
    assert!(matches!(err, TransportError::Config(_)), "{err:?}");
    impostor.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_tries_every_address_before_backing_off() {
    let (server, cert) = TestServer::localhost().await;
    let addrs = [dead_addr(), dead_addr(), server.addr];
    let reconnecting = ReconnectingConnection::new(
        Endpoint::for_servers(&addrs).unwrap(),
        pinned_at(&addrs, &cert),
    )
    .with_backoff(slow_backoff());
    let answer = tokio::time::timeout(Duration::from_secs(5), reconnecting.call(fetch(3)))
        .await
        .expect("the live address was tried before backing off")
        .unwrap();
    assert_eq!(answer.head_seq, 3);
    assert_eq!(
        reconnecting.connection().await.unwrap().server_addr(),
        server.addr
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_fails_over_when_its_server_goes_away_and_stays_with_the_new_one() {
    // Two nodes of one server: the same certificate at two addresses.
    let (cert, key) = self_signed_localhost();
    let tls = server_config(vec![cert.clone()], key, None);
    let a = TestServer::start(tls.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let b = TestServer::start(tls.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (a_addr, b_addr) = (a.addr, b.addr);
    // A handshake with a node that is gone costs this much: failing over must not try it.
    let mut config = pinned_at(&[a_addr, b_addr], &cert);
    config.connect_timeout = Duration::from_secs(3);
    let failover = Duration::from_secs(2);
    let hooks = Arc::new(AtomicUsize::new(0));
    let reconnecting = counting_hook(
        ReconnectingConnection::new(Endpoint::for_servers(&[a_addr, b_addr]).unwrap(), config)
            .with_backoff(slow_backoff()),
        &hooks,
    );
    let noticed = Duration::from_secs(5);
    assert_eq!(reconnecting.call(fetch(1)).await.unwrap().head_seq, 1);
    let on_a = reconnecting.connection().await.unwrap();
    assert_eq!(on_a.server_addr(), a_addr);

    // A goes away: the next call runs on B, authenticated again, without any backoff and
    // without trying A again first.
    a.stop().await;
    within("noticing that A closed", noticed, on_a.closed()).await;
    let answer = within("failing over to B", failover, reconnecting.call(fetch(2))).await;
    assert_eq!(answer.unwrap().head_seq, 2);
    let on_b = reconnecting.connection().await.unwrap();
    assert_eq!(on_b.server_addr(), b_addr);
    assert_eq!(hooks.load(Ordering::SeqCst), 2, "the hook ran on B");

    // A is back; a new connection still starts with B, the address that last worked.
    let a = TestServer::start(tls, a_addr).await;
    reconnecting.close().await;
    assert_eq!(reconnecting.call(fetch(3)).await.unwrap().head_seq, 3);
    assert_eq!(
        reconnecting.connection().await.unwrap().server_addr(),
        b_addr
    );

    // B goes away: the list wraps around to A.
    let on_b = reconnecting.connection().await.unwrap();
    b.stop().await;
    within("noticing that B closed", noticed, on_b.closed()).await;
    let answer = within(
        "failing over back to A",
        failover,
        reconnecting.call(fetch(4)),
    )
    .await;
    assert_eq!(answer.unwrap().head_seq, 4);
    assert_eq!(
        reconnecting.connection().await.unwrap().server_addr(),
        a_addr
    );
    assert_eq!(hooks.load(Ordering::SeqCst), 4);
    a.stop().await;
}
