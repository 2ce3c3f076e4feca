//! Shared helpers of the server's integration tests: an in-process homeserver on
//! 127.0.0.1:0, clients connected over real QUIC, users and devices with real keys, and
//! KeyPackages built with openmls.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;

use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, CredentialWithKey, ExtensionType, KeyPackage,
    Lifetime, tls_codec::Serialize as _,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::Signer;
use openmls_traits::types::SignatureScheme;
use roost_client::transport::{ConnectConfig, Connection, Endpoint, TrustConfig};
use roost_protocol::messages::auth::*;
use roost_protocol::{ClientId, Opaque, UserId};
use roost_server::Server;
pub use roost_server::clock::ManualClock;
use roost_server::config::Config;

pub const DOMAIN: &str = "example.org";
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// A test configuration: port 0, data in `dir`.
pub fn config(dir: &Path) -> Config {
    Config {
        domain: DOMAIN.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        ..Config::default()
    }
}

pub async fn start(config: Config) -> Server {
    Server::start(config.validate().unwrap()).await.unwrap()
}

/// Starts a server again on the address it had (as an operator's restart does), or on a new
/// port when something else took that one meanwhile: the tests' other servers bind port 0 all
/// the time, and clients connect to [`Server::local_addr`] either way.
pub async fn restart_on(mut config: Config, address: std::net::SocketAddr) -> Server {
    config.listen = match std::net::UdpSocket::bind(address) {
        Ok(_free) => address,
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => "127.0.0.1:0".parse().unwrap(),
        Err(err) => panic!("restart on {address}: {err}"),
    };
    start(config).await
}

/// A plain HTTP GET (for `/health` and `/metrics`); the whole response, head and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Starts a server whose clock stands still until the test advances it.
pub async fn start_with_clock(config: Config, clock: &ManualClock) -> Server {
    let mut settings = config.validate().unwrap();
    settings.clock = clock.clock();
    Server::start(settings).await.unwrap()
}

pub async fn connect(server: &Server) -> Connection {
    let endpoint = Endpoint::for_server(server.local_addr()).unwrap();
    let trust = TrustConfig::PinnedCertificates(vec![server.certificate().clone()]);
    let config = ConnectConfig::new(server.local_addr(), DOMAIN, trust);
    endpoint.connect(&config).await.unwrap()
}

pub fn keypair() -> SignatureKeyPair {
    SignatureKeyPair::new(SignatureScheme::ED25519).unwrap()
}

pub fn sign(key: &SignatureKeyPair, message: &[u8]) -> Vec<u8> {
    key.sign(message).unwrap()
}

pub struct TestUser {
    pub id: UserId,
    pub key: SignatureKeyPair,
}

pub struct TestClient {
    pub id: ClientId,
    pub key: SignatureKeyPair,
    pub credential: ClientCredential,
}

pub fn register_request(
    user: &UserId,
    key: &SignatureKeyPair,
    token: Option<&str>,
) -> RegisterUserRequest {
    let tbs = RegisterUserTbs {
        user: user.clone(),
        user_key: key.public().into(),
    };
    RegisterUserRequest {
        user: user.clone(),
        user_key: key.public().into(),
        registration_token: token.map(|t| Opaque::from(t.as_bytes())),
        signature: sign(key, &signing_input(LABEL_REGISTER_USER, &tbs)).into(),
    }
}

pub async fn register(conn: &Connection, name: &str) -> TestUser {
    register_in(conn, name, DOMAIN).await
}

pub async fn register_in(conn: &Connection, name: &str, domain: &str) -> TestUser {
    let id: UserId = format!("{name}@{domain}").parse().unwrap();
    let key = keypair();
    conn.call(register_request(&id, &key, None)).await.unwrap();
    TestUser { id, key }
}

pub fn add_client_request(
    user: &TestUser,
    client: &ClientId,
    client_key: &SignatureKeyPair,
) -> AddClientRequest {
    let tbs = AddClientTbs {
        client: client.clone(),
        client_key: client_key.public().into(),
    };
    AddClientRequest {
        client: client.clone(),
        client_key: client_key.public().into(),
        user_signature: sign(&user.key, &signing_input(LABEL_ADD_CLIENT, &tbs)).into(),
    }
}

pub async fn add_client(conn: &Connection, user: &TestUser, device: &str) -> TestClient {
    let id = ClientId::new(user.id.clone(), device.parse().unwrap());
    let key = keypair();
    let response = conn
        .call(add_client_request(user, &id, &key))
        .await
        .unwrap();
    TestClient {
        id,
        key,
        credential: response.credential,
    }
}

pub fn remove_client_request(user: &TestUser, client: &ClientId) -> RemoveClientRequest {
    let tbs = RemoveClientTbs {
        client: client.clone(),
    };
    RemoveClientRequest {
        client: client.clone(),
        user_signature: sign(&user.key, &signing_input(LABEL_REMOVE_CLIENT, &tbs)).into(),
    }
}

/// Registers `name` with one device `phone` and returns an authenticated connection.
pub async fn new_client(server: &Server, name: &str) -> (TestUser, TestClient, Connection) {
    new_client_in(server, name, DOMAIN).await
}

/// The same on a server of another domain.
pub async fn new_client_in(
    server: &Server,
    name: &str,
    domain: &str,
) -> (TestUser, TestClient, Connection) {
    let conn = connect(server).await;
    let user = register_in(&conn, name, domain).await;
    let client = add_client(&conn, &user, "phone").await;
    login(&conn, &client).await;
    (user, client, conn)
}

pub async fn login(conn: &Connection, client: &TestClient) {
    conn.authenticate(&client.id, |input| sign(&client.key, input))
        .await
        .unwrap();
}

/// Builds a KeyPackage for `client` with the given lifetime (seconds after now).
pub fn key_package_with(
    client: &TestClient,
    identity_of: &ClientId,
    lifetime: Option<u64>,
    last_resort: bool,
) -> Opaque {
    key_package_lifetime(
        client,
        identity_of,
        lifetime.map(Lifetime::new),
        last_resort,
    )
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Builds a KeyPackage with an explicit lifetime.
pub fn key_package_lifetime(
    client: &TestClient,
    identity_of: &ClientId,
    lifetime: Option<Lifetime>,
    last_resort: bool,
) -> Opaque {
    let provider = OpenMlsRustCrypto::default();
    let identity = identity_of.tls_serialize_detached().unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(identity).into(),
        signature_key: client.key.public().into(),
    };
    let mut builder = KeyPackage::builder();
    if let Some(lifetime) = lifetime {
        builder = builder.key_package_lifetime(lifetime);
    }
    if last_resort {
        // The leaf must declare every extension the KeyPackage carries.
        let capabilities = Capabilities::builder()
            .extensions(vec![ExtensionType::LastResort])
            .build();
        builder = builder
            .mark_as_last_resort()
            .leaf_node_capabilities(capabilities);
    }
    let bundle = builder
        .build(CIPHERSUITE, &provider, &client.key, credential)
        .unwrap();
    bundle
        .key_package()
        .tls_serialize_detached()
        .unwrap()
        .into()
}

pub fn key_package(client: &TestClient) -> Opaque {
    key_package_with(client, &client.id, None, false)
}
