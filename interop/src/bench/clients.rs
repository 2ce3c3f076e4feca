//! Many benchmark clients, fast: users registered and devices added with raw requests (Ed25519
//! keys from openmls's basic credential crate), one authenticated QUIC connection per client
//! opened concurrently, and KeyPackages built locally with openmls.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use indicatif::ProgressBar;
use openmls::prelude::{BasicCredential, Ciphersuite, CredentialWithKey, KeyPackage};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::Signer as _;
use openmls_traits::types::SignatureScheme;
use roost_client::transport::{ConnectConfig, Connection, Endpoint};
use roost_protocol::messages::auth::{
    AddClientRequest, AddClientTbs, LABEL_ADD_CLIENT, LABEL_REGISTER_USER, RegisterUserRequest,
    RegisterUserTbs, signing_input,
};
use roost_protocol::{ClientId, UserId};
use tls_codec::Serialize as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::stats::Latencies;

/// The only ciphersuite roost accepts.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Requests in flight while setting clients up.
const SETUP_CONCURRENCY: usize = 64;
/// Connections per client-side UDP endpoint.
const CONNECTIONS_PER_ENDPOINT: usize = 512;

/// One device of a benchmark user.
#[derive(Clone)]
pub struct BenchClient {
    /// Its id.
    pub id: ClientId,
    /// Its signature key (AS-registered).
    pub key: Arc<SignatureKeyPair>,
    /// Its authenticated connection, once [`connect_all`] ran.
    pub conn: Option<Connection>,
    /// The endpoint of that connection (kept alive with it).
    pub endpoint: Option<Endpoint>,
}

impl std::fmt::Debug for BenchClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchClient")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl BenchClient {
    /// Its authenticated connection.
    pub fn conn(&self) -> anyhow::Result<&Connection> {
        self.conn
            .as_ref()
            .with_context(|| format!("{} is not connected", self.id))
    }

    /// Its MLS credential: a BasicCredential whose identity is the TLS-encoded ClientId.
    pub fn credential(&self) -> anyhow::Result<CredentialWithKey> {
        Ok(CredentialWithKey {
            credential: BasicCredential::new(self.id.tls_serialize_detached()?).into(),
            signature_key: self.key.public().into(),
        })
    }

    /// A fresh KeyPackage of this client (its private keys are left in `provider`).
    pub fn key_package(&self, provider: &OpenMlsRustCrypto) -> anyhow::Result<KeyPackage> {
        let bundle = KeyPackage::builder()
            .build(CIPHERSUITE, provider, &*self.key, self.credential()?)
            .map_err(|e| anyhow::anyhow!("cannot build a KeyPackage: {e}"))?;
        Ok(bundle.key_package().clone())
    }
}

fn new_key() -> anyhow::Result<SignatureKeyPair> {
    SignatureKeyPair::new(SignatureScheme::ED25519)
        .map_err(|e| anyhow::anyhow!("cannot generate an Ed25519 key: {e:?}"))
}

fn sign(key: &SignatureKeyPair, input: &[u8]) -> anyhow::Result<Vec<u8>> {
    key.sign(input)
        .map_err(|e| anyhow::anyhow!("cannot sign: {e:?}"))
}

/// Endpoints to spread `count` connections over.
pub fn endpoints(connect: &ConnectConfig, count: usize) -> anyhow::Result<Vec<Endpoint>> {
    (0..count.div_ceil(CONNECTIONS_PER_ENDPOINT).max(1))
        .map(|_| Endpoint::for_servers(&connect.server_addrs).context("cannot bind an endpoint"))
        .collect()
}

/// Registers users `<prefix><i>@<domain>` for `i` in `0..count`, each with one device `d`,
/// over a few shared (unauthenticated) connections, `SETUP_CONCURRENCY` requests at a time.
pub async fn register(
    connect: &ConnectConfig,
    domain: &str,
    prefix: &str,
    count: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<BenchClient>> {
    let endpoint = Endpoint::for_servers(&connect.server_addrs)?;
    let mut shared = Vec::new();
    for _ in 0..8 {
        shared.push(endpoint.connect(connect).await?);
    }
    let limit = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let conn = shared[i % shared.len()].clone();
        let limit = limit.clone();
        let user: UserId = format!("{prefix}{i}@{domain}")
            .parse()
            .with_context(|| format!("bad user name {prefix}{i}"))?;
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let client = register_one(&conn, user).await?;
            Ok::<_, anyhow::Error>((i, client))
        });
    }
    let mut clients: Vec<Option<BenchClient>> = vec![None; count];
    while let Some(done) = tasks.join_next().await {
        let (i, client) = done??;
        clients[i] = Some(client);
        progress.inc(1);
    }
    for conn in &shared {
        conn.close();
    }
    clients
        .into_iter()
        .map(|c| c.context("a registration did not finish"))
        .collect()
}

async fn register_one(conn: &Connection, user: UserId) -> anyhow::Result<BenchClient> {
    let user_key = new_key()?;
    let tbs = RegisterUserTbs {
        user: user.clone(),
        user_key: user_key.public().into(),
    };
    conn.call(RegisterUserRequest {
        user: user.clone(),
        user_key: user_key.public().into(),
        registration_token: None,
        signature: sign(&user_key, &signing_input(LABEL_REGISTER_USER, &tbs))?.into(),
    })
    .await
    .with_context(|| format!("registering {user}"))?;
    let id = ClientId::new(user, "d".parse()?);
    let key = new_key()?;
    let tbs = AddClientTbs {
        client: id.clone(),
        client_key: key.public().into(),
    };
    conn.call(AddClientRequest {
        client: id.clone(),
        client_key: key.public().into(),
        user_signature: sign(&user_key, &signing_input(LABEL_ADD_CLIENT, &tbs))?.into(),
    })
    .await
    .with_context(|| format!("adding {id}"))?;
    Ok(BenchClient {
        id,
        key: Arc::new(key),
        conn: None,
        endpoint: None,
    })
}

/// Opens one connection per client and authenticates it, `SETUP_CONCURRENCY` at a time;
/// returns the connect + authenticate latencies.
pub async fn connect_all(
    connect: &ConnectConfig,
    clients: &mut [BenchClient],
    progress: &ProgressBar,
) -> anyhow::Result<Latencies> {
    connect_all_with(connect, clients, progress, SETUP_CONCURRENCY).await
}

/// [`connect_all`] with `concurrency` connections being set up at a time.
pub async fn connect_all_with(
    connect: &ConnectConfig,
    clients: &mut [BenchClient],
    progress: &ProgressBar,
    concurrency: usize,
) -> anyhow::Result<Latencies> {
    let endpoints = endpoints(connect, clients.len())?;
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let connect = connect.clone();
        let limit = limit.clone();
        let (id, key) = (client.id.clone(), client.key.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let start = Instant::now();
            let conn = endpoint
                .connect(&connect)
                .await
                .with_context(|| format!("connecting {id}"))?;
            let input = conn.auth_signing_input(&id)?;
            let signature = sign(&key, &input)?;
            conn.authenticate(&id, |_| signature)
                .await
                .with_context(|| format!("authenticating {id}"))?;
            Ok::<_, anyhow::Error>((i, conn, endpoint, start.elapsed()))
        });
    }
    let mut latencies = Latencies::new();
    while let Some(done) = tasks.join_next().await {
        let (i, conn, endpoint, elapsed) = done??;
        latencies.record(elapsed);
        if let Some(client) = clients.get_mut(i) {
            client.conn = Some(conn);
            client.endpoint = Some(endpoint);
        }
        progress.inc(1);
    }
    Ok(latencies)
}

/// Registers and connects `count` clients.
pub async fn ready_clients(
    connect: &ConnectConfig,
    domain: &str,
    prefix: &str,
    count: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<BenchClient>> {
    let mut clients = register(connect, domain, prefix, count, progress).await?;
    connect_all(connect, &mut clients, progress).await?;
    Ok(clients)
}

/// Builds one KeyPackage per client on blocking threads (two at a time, one per core).
pub async fn key_packages(clients: &[BenchClient]) -> anyhow::Result<Vec<KeyPackage>> {
    let half = clients.len().div_ceil(2);
    let mut tasks = JoinSet::new();
    for (part, chunk) in clients.chunks(half.max(1)).enumerate() {
        let chunk = chunk.to_vec();
        tasks.spawn_blocking(move || {
            let provider = OpenMlsRustCrypto::default();
            let kps = chunk
                .iter()
                .map(|c| c.key_package(&provider))
                .collect::<anyhow::Result<Vec<_>>>();
            (part, kps)
        });
    }
    let mut parts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (part, kps) = done?;
        parts.push((part, kps?));
    }
    parts.sort_by_key(|(part, _)| *part);
    Ok(parts.into_iter().flat_map(|(_, kps)| kps).collect())
}

/// Closes every client's connection.
pub fn close_all(clients: &[BenchClient]) {
    for client in clients {
        if let Some(conn) = &client.conn {
            conn.close();
        }
    }
}
