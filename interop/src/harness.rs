//! Several real homeservers on 127.0.0.1, each a `roost serve` process.
//!
//! [`Harness::start`] generates a CA ([`crate::pki`]), a certificate per domain (`alpha.test`,
//! `beta.test`, `gamma.test`, ...), picks a free UDP port per server up front, writes one TOML
//! configuration per server whose `[federation.peers]` table points at every other server, and
//! starts the processes. A server counts as started once a QUIC handshake with it succeeds.
//! Any server can then be stopped (SIGTERM, then SIGKILL after a grace period), killed
//! (SIGKILL) and started again on the same port with the same data directory.
//!
//! Layout of the harness directory:
//!
//! ```text
//! DIR/ca.pem                       the CA certificate (trust root for clients and peers)
//! DIR/<domain>/config.toml         the server's configuration
//! DIR/<domain>/cert.pem, key.pem   its certificate (valid for the domain) and key
//! DIR/<domain>/data/               its data directory (database, AS key)
//! DIR/<domain>/roost.log           its stdout and stderr, appended across restarts
//! DIR/servers.json                 written by [`Harness::write_servers_json`]
//! ```
//!
//! With [`Storage::Postgres`] the harness also starts a PostgreSQL cluster of its own
//! (`DIR/postgres`, a free port, see [`crate::postgres`]), gives each domain a database, and
//! may run several nodes per domain ([`HarnessConfig::nodes`]): node 0 is laid out as above,
//! node N (N ≥ 1) in `DIR/<domain>/node<N>/`; all nodes of a domain share
//! `DIR/<domain>/identity/` (AS key, reset key) and its certificate, and every peer entry and
//! client configuration lists every node's address (clients and peers fail over).
//! Index-based methods ([`Harness::server`], [`Harness::stop`], ...) address node 0 of a
//! domain; the `*_node` methods address any node.
//!
//! Dropping the harness kills every server still running (SIGKILL); [`Harness::shutdown`]
//! stops them gracefully.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use roost_client::ClientConfig;
use roost_client::transport::{ClientIdentity, ConnectConfig, Endpoint, TrustConfig};
use serde::{Deserialize, Serialize};

use crate::pki::{Ca, IssuedCertificate};

/// Names of the first servers' domains (`alpha.test`, ...); later ones are `s<N>.test`.
const NAMES: [&str; 12] = [
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    "lambda", "mu",
];
/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(50);
/// Handshake limit of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a server may take to shut down after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Shutdown grace written into the configurations (in-flight requests).
const SHUTDOWN_GRACE_MS: u64 = 2_000;

/// The domain of the `index`-th server: `alpha.test`, `beta.test`, `gamma.test`, ...
pub fn domain_name(index: usize) -> String {
    match NAMES.get(index) {
        Some(name) => format!("{name}.test"),
        None => format!("s{}.test", index + 1),
    }
}

/// One server to start.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The domain it serves.
    pub domain: String,
    /// The DNS names its certificate is issued for (normally just the domain; a scenario may
    /// make a server present a certificate for another domain).
    pub certificate_names: Vec<String>,
    /// Its nodes, when not [`HarnessConfig::nodes`] (e.g. a one-node domain beside two-node
    /// ones).
    pub nodes: Option<usize>,
}

impl ServerSpec {
    /// A server for `domain` with a certificate for it.
    pub fn new(domain: impl Into<String>) -> Self {
        let domain = domain.into();
        Self {
            certificate_names: vec![domain.clone()],
            domain,
            nodes: None,
        }
    }
}

/// Where the servers keep their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// Each server its embedded redb database (one node per domain).
    #[default]
    Redb,
    /// A PostgreSQL cluster started by the harness, a database per domain.
    Postgres,
}

impl std::str::FromStr for Storage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(Self::Redb),
            "postgres" => Ok(Self::Postgres),
            other => Err(format!("unknown backend {other:?} (redb or postgres)")),
        }
    }
}

/// How to start a harness.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// The `roost` binary ([`crate::binary`]).
    pub roost: PathBuf,
    /// Directory for the CA, configurations, data and logs (created if missing).
    pub dir: PathBuf,
    /// The servers, in order.
    pub servers: Vec<ServerSpec>,
    /// `RUST_LOG` of the servers (`None`: inherited from this process).
    pub log_filter: Option<String>,
    /// Federation retry backoff of undeliverable batches: first delay (ms).
    pub retry_initial_ms: u64,
    /// Federation retry backoff: longest delay (ms).
    pub retry_max_ms: u64,
    /// How long a server may take to start answering.
    pub start_timeout: Duration,
    /// Storage engine of every server.
    pub storage: Storage,
    /// Nodes per domain (more than 1 needs [`Storage::Postgres`]).
    pub nodes: usize,
}

impl HarnessConfig {
    /// `count` servers `alpha.test`, `beta.test`, ... in `dir`, with a short federation retry
    /// backoff (100 ms up to 500 ms) so a restarted peer gets its messages quickly.
    pub fn new(roost: impl Into<PathBuf>, dir: impl Into<PathBuf>, count: usize) -> Self {
        Self {
            roost: roost.into(),
            dir: dir.into(),
            servers: (0..count)
                .map(|i| ServerSpec::new(domain_name(i)))
                .collect(),
            log_filter: Some("info".into()),
            retry_initial_ms: 100,
            retry_max_ms: 500,
            start_timeout: Duration::from_secs(30),
            storage: Storage::Redb,
            nodes: 1,
        }
    }
}

/// One homeserver process of the harness (a node of its domain).
#[derive(Debug)]
pub struct Homeserver {
    /// Its domain.
    pub domain: String,
    /// Which node of its domain it is (0 for the first).
    pub node: usize,
    /// Its UDP address (fixed for the harness's lifetime).
    pub addr: SocketAddr,
    /// Its directory (`DIR/<domain>`).
    pub dir: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its configuration file.
    pub config_file: PathBuf,
    /// Its certificate and key.
    pub certificate: IssuedCertificate,
    /// Its log file.
    pub log_file: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Homeserver {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// What `servers.json` holds: everything a person (or roost-cli) needs to reach the servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServersFile {
    /// The CA certificate every server certificate is issued by.
    pub ca_file: PathBuf,
    /// The servers.
    pub servers: Vec<ServerInfo>,
}

/// One server in `servers.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Its domain (the part after `@` of its users).
    pub domain: String,
    /// Its UDP address.
    pub address: SocketAddr,
    /// Its certificate (pin it, or trust `ca_file`).
    pub certificate: PathBuf,
    /// The CA certificate.
    pub ca_file: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its process id (when the file was written).
    pub pid: Option<u32>,
    /// Every node's address (the first is `address`); clients may use any of them.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
}

/// A set of running homeservers that federate with each other.
pub struct Harness {
    roost: PathBuf,
    dir: PathBuf,
    ca: Ca,
    /// Node 0 of each domain.
    servers: Vec<Homeserver>,
    /// Further nodes, by domain index.
    extra: Vec<Vec<Homeserver>>,
    /// The PostgreSQL cluster, with [`Storage::Postgres`] (dropped after the servers).
    cluster: Option<crate::postgres::Cluster>,
    log_filter: Option<String>,
    start_timeout: Duration,
    probe: Endpoint,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("dir", &self.dir)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// The TOML configuration of one server (the fields of roost-server's `Config` it sets).
#[derive(Serialize)]
struct ServerToml<'a> {
    domain: &'a str,
    listen: SocketAddr,
    data_dir: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_dir: Option<&'a Path>,
    tls_cert: &'a Path,
    tls_key: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    storage: Option<StorageToml>,
    limits: LimitsToml,
    federation: FederationToml<'a>,
}

#[derive(Serialize)]
struct StorageToml {
    backend: &'static str,
    url: String,
    pool_size: u32,
}

/// Registration and claims come from 127.0.0.1 for every user of a scenario or a load test:
/// the per-address defaults (10 per minute) would throttle them.
#[derive(Serialize)]
struct LimitsToml {
    registration_rate_per_minute: u32,
    registration_burst: u32,
    claim_rate_per_minute: u32,
    claim_burst: u32,
    shutdown_grace_ms: u64,
}

#[derive(Serialize)]
struct FederationToml<'a> {
    enabled: bool,
    ca_file: &'a Path,
    retry_initial_ms: u64,
    retry_max_ms: u64,
    peers: BTreeMap<&'a str, PeerToml>,
}

#[derive(Clone, Serialize)]
struct PeerToml {
    addresses: Vec<String>,
}

/// Distinct UDP ports on 127.0.0.1 that were free a moment ago, below the system's ephemeral
/// range: a server killed and started again on its port (chaos, failover) must not find it
/// taken by a client socket bound to port 0 meanwhile.
fn free_ports(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > 11_000);
    let bind = |port: u16| UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, port));
    let mut sockets = Vec::with_capacity(count);
    while sockets.len() < count {
        // An ephemeral port only where there is no room below the range.
        let socket = low
            .and_then(|low| (0..200).find_map(|_| bind(rand::random_range(10_000..low)).ok()))
            .map_or_else(|| bind(0), Ok)
            .context("cannot reserve UDP ports")?;
        sockets.push(socket);
    }
    Ok(sockets
        .iter()
        .map(UdpSocket::local_addr)
        .collect::<Result<Vec<_>, _>>()?)
}

impl Harness {
    /// Generates the PKI and configurations and starts every server; returns once each one
    /// answers QUIC handshakes.
    pub async fn start(config: HarnessConfig) -> anyhow::Result<Harness> {
        if config.servers.is_empty() {
            bail!("a harness needs at least one server");
        }
        let nodes_of = |spec: &ServerSpec| spec.nodes.unwrap_or(config.nodes).max(1);
        let total: usize = config.servers.iter().map(nodes_of).sum();
        if total > config.servers.len() && config.storage != Storage::Postgres {
            bail!("several nodes per domain need the postgres backend");
        }
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("cannot create {}", config.dir.display()))?;
        let ca = Ca::generate("roost-interop", &config.dir.join("ca.pem"))?;
        let cluster = match config.storage {
            Storage::Redb => None,
            Storage::Postgres => Some(
                crate::postgres::Cluster::start_in(&config.dir.join("postgres"))
                    .context("cannot start PostgreSQL")?,
            ),
        };
        let addrs = free_ports(total)?;
        let mut servers = Vec::with_capacity(config.servers.len());
        let mut extra = Vec::with_capacity(config.servers.len());
        let mut addrs = addrs.into_iter();
        for spec in &config.servers {
            let dir = config.dir.join(&spec.domain);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let certificate = ca.issue(
                &spec.certificate_names,
                &dir.join("cert.pem"),
                &dir.join("key.pem"),
            )?;
            let nodes = nodes_of(spec);
            let mut domain_nodes = Vec::with_capacity(nodes);
            for node in 0..nodes {
                let node_dir = if node == 0 {
                    dir.clone()
                } else {
                    dir.join(format!("node{node}"))
                };
                let data_dir = node_dir.join("data");
                std::fs::create_dir_all(&data_dir)
                    .with_context(|| format!("cannot create {}", data_dir.display()))?;
                domain_nodes.push(Homeserver {
                    domain: spec.domain.clone(),
                    node,
                    addr: addrs.next().context("no port")?,
                    config_file: node_dir.join("config.toml"),
                    log_file: node_dir.join("roost.log"),
                    data_dir,
                    dir: node_dir,
                    certificate: certificate.clone(),
                    child: None,
                    starts: 0,
                });
            }
            let first = domain_nodes.remove(0);
            servers.push(first);
            extra.push(domain_nodes);
        }
        let all_addrs = |index: usize| -> Vec<SocketAddr> {
            std::iter::once(servers[index].addr)
                .chain(extra[index].iter().map(|n| n.addr))
                .collect()
        };
        for (index, spec) in config.servers.iter().enumerate() {
            let peers = servers
                .iter()
                .enumerate()
                .filter(|(_, peer)| peer.domain != spec.domain)
                .map(|(peer_index, peer)| {
                    let addresses = all_addrs(peer_index)
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    (peer.domain.as_str(), PeerToml { addresses })
                })
                .collect::<BTreeMap<_, _>>();
            let storage = match &cluster {
                None => None,
                Some(cluster) => {
                    let name = spec.domain.replace(['.', '-'], "_");
                    let url = cluster.create_database(&name).with_context(|| {
                        format!("cannot create the database of {}", spec.domain)
                    })?;
                    Some(url)
                }
            };
            let identity_dir = storage
                .as_ref()
                .map(|_| servers[index].dir.join("identity"));
            let domain_nodes: Vec<&Homeserver> = std::iter::once(&servers[index])
                .chain(extra[index].iter())
                .collect();
            for server in domain_nodes {
                let toml = ServerToml {
                    domain: &server.domain,
                    listen: server.addr,
                    data_dir: &server.data_dir,
                    identity_dir: identity_dir.as_deref(),
                    storage: storage.as_ref().map(|url| StorageToml {
                        backend: "postgres",
                        url: url.clone(),
                        pool_size: 16,
                    }),
                    tls_cert: &server.certificate.cert_file,
                    tls_key: &server.certificate.key_file,
                    limits: LimitsToml {
                        registration_rate_per_minute: 100_000,
                        registration_burst: 100_000,
                        claim_rate_per_minute: 100_000,
                        claim_burst: 100_000,
                        shutdown_grace_ms: SHUTDOWN_GRACE_MS,
                    },
                    federation: FederationToml {
                        enabled: true,
                        ca_file: ca.ca_file(),
                        retry_initial_ms: config.retry_initial_ms,
                        retry_max_ms: config.retry_max_ms,
                        peers: peers.clone(),
                    },
                };
                let text = toml::to_string(&toml).context("cannot encode a configuration")?;
                std::fs::write(&server.config_file, text)
                    .with_context(|| format!("cannot write {}", server.config_file.display()))?;
            }
        }
        let probe =
            Endpoint::for_server(servers[0].addr).context("cannot bind a probe endpoint")?;
        let mut harness = Harness {
            roost: config.roost,
            dir: config.dir,
            ca,
            servers,
            extra,
            cluster,
            log_filter: config.log_filter,
            start_timeout: config.start_timeout,
            probe,
        };
        // Node 0 first: it creates a domain's identity files, which the other nodes share.
        for index in 0..harness.servers.len() {
            harness.spawn_node(index, 0)?;
        }
        for index in 0..harness.servers.len() {
            harness.wait_ready(index, 0).await?;
        }
        for index in 0..harness.servers.len() {
            for node in 1..harness.node_count(index) {
                harness.spawn_node(index, node)?;
            }
        }
        for index in 0..harness.servers.len() {
            for node in 1..harness.node_count(index) {
                harness.wait_ready(index, node).await?;
            }
        }
        Ok(harness)
    }

    /// The harness directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate file (the trust root of every server certificate).
    pub fn ca_file(&self) -> &Path {
        self.ca.ca_file()
    }

    /// The CA, to issue more certificates (e.g. for a forged peer).
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Every server.
    pub fn servers(&self) -> &[Homeserver] {
        &self.servers
    }

    /// The `index`-th server.
    pub fn server(&self, index: usize) -> anyhow::Result<&Homeserver> {
        self.servers
            .get(index)
            .with_context(|| format!("no server {index}"))
    }

    /// Every node of domain `index`, node 0 first.
    pub fn nodes(&self, index: usize) -> anyhow::Result<Vec<&Homeserver>> {
        let first = self.server(index)?;
        let rest = self.extra.get(index).map(Vec::as_slice).unwrap_or(&[]);
        Ok(std::iter::once(first).chain(rest).collect())
    }

    /// How many nodes domain `index` runs.
    pub fn node_count(&self, index: usize) -> usize {
        self.extra.get(index).map_or(0, Vec::len) + 1
    }

    /// Node `node` of domain `index`.
    pub fn node(&self, index: usize, node: usize) -> anyhow::Result<&Homeserver> {
        self.nodes(index)?
            .get(node)
            .copied()
            .with_context(|| format!("no node {node} of server {index}"))
    }

    /// The PostgreSQL cluster, with [`Storage::Postgres`].
    pub fn cluster(&self) -> Option<&crate::postgres::Cluster> {
        self.cluster.as_ref()
    }

    /// The PostgreSQL cluster, to stop and start it ([`crate::postgres::Cluster::kill`]).
    pub fn cluster_mut(&mut self) -> Option<&mut crate::postgres::Cluster> {
        self.cluster.as_mut()
    }

    fn node_mut(&mut self, index: usize, node: usize) -> anyhow::Result<&mut Homeserver> {
        if node == 0 {
            return self
                .servers
                .get_mut(index)
                .with_context(|| format!("no server {index}"));
        }
        self.extra
            .get_mut(index)
            .and_then(|nodes| nodes.get_mut(node - 1))
            .with_context(|| format!("no node {node} of server {index}"))
    }

    /// Every node's address of domain `index`, starting with node `first`.
    pub(crate) fn addresses_from(
        &self,
        index: usize,
        first: usize,
    ) -> anyhow::Result<Vec<SocketAddr>> {
        let mut addrs: Vec<SocketAddr> = self.nodes(index)?.iter().map(|n| n.addr).collect();
        if first >= addrs.len() {
            bail!("no node {first} of server {index}");
        }
        addrs.rotate_left(first);
        Ok(addrs)
    }

    /// The index of the server of `domain`.
    pub fn index_of(&self, domain: &str) -> anyhow::Result<usize> {
        self.servers
            .iter()
            .position(|s| s.domain == domain)
            .with_context(|| format!("no server for {domain}"))
    }

    /// How a client reaches server `index`: its domain checked against the harness CA.
    pub fn connect_config(&self, index: usize) -> anyhow::Result<ConnectConfig> {
        self.node_connect_config(index, 0)
    }

    /// How a client reaches domain `index` trying node `node` first, then the others.
    pub fn node_connect_config(&self, index: usize, node: usize) -> anyhow::Result<ConnectConfig> {
        let server = self.server(index)?;
        let trust = TrustConfig::roots_from_pem_file(self.ca_file())?;
        Ok(ConnectConfig::with_addrs(
            self.addresses_from(index, node)?,
            server.domain.clone(),
            trust,
        ))
    }

    /// An SDK configuration for a user of domain `index` whose client tries node `node` first.
    pub fn node_client_config(&self, index: usize, node: usize) -> anyhow::Result<ClientConfig> {
        Ok(small_client_config(self.node_connect_config(index, node)?))
    }

    /// How a client reaches server `index` by pinning its certificate (works whatever names
    /// the certificate carries).
    pub fn pinned_connect_config(&self, index: usize) -> anyhow::Result<ConnectConfig> {
        let server = self.server(index)?;
        let trust = TrustConfig::pinned_from_pem_file(&server.certificate.cert_file)?;
        Ok(ConnectConfig::new(
            server.addr,
            server.domain.clone(),
            trust,
        ))
    }

    /// An SDK configuration for a user of server `index` (trusting the CA) with a small
    /// KeyPackage stock, which keeps scenarios fast.
    pub fn client_config(&self, index: usize) -> anyhow::Result<ClientConfig> {
        Ok(small_client_config(self.connect_config(index)?))
    }

    /// Server `index`'s certificate and key as a TLS client identity (to speak to another
    /// server as that server's peer).
    pub fn peer_identity(&self, index: usize) -> anyhow::Result<ClientIdentity> {
        let cert = &self.server(index)?.certificate;
        Ok(ClientIdentity::from_pem_files(
            &cert.cert_file,
            &cert.key_file,
        )?)
    }

    /// Whether server `index`'s process (node 0) is running.
    pub fn is_running(&mut self, index: usize) -> bool {
        self.is_node_running(index, 0)
    }

    /// Whether node `node` of server `index` is running.
    pub fn is_node_running(&mut self, index: usize, node: usize) -> bool {
        let Ok(server) = self.node_mut(index, node) else {
            return false;
        };
        match server.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                server.child = None;
                false
            }
            None => false,
        }
    }

    fn spawn_node(&mut self, index: usize, node: usize) -> anyhow::Result<()> {
        let roost = self.roost.clone();
        let log_filter = self.log_filter.clone();
        let server = self.node_mut(index, node)?;
        if server.child.is_some() {
            bail!("{} is running already", server.domain);
        }
        server.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log_file)
            .with_context(|| format!("cannot open {}", server.log_file.display()))?;
        writeln!(log, "=== roost-interop: start {} ===", server.starts)?;
        let mut command = Command::new(&roost);
        command
            .arg("serve")
            .arg("--config")
            .arg(&server.config_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(filter) = log_filter {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", roost.display()))?;
        server.child = Some(child);
        Ok(())
    }

    /// Waits until a node completes a QUIC handshake (or fails if it exits).
    async fn wait_ready(&mut self, index: usize, node: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        let mut probe = self.pinned_connect_config(index)?;
        probe.server_addrs = vec![self.node(index, node)?.addr];
        probe.connect_timeout = PROBE_TIMEOUT;
        let attempts = self.start_timeout.as_millis() / POLL.as_millis() + 1;
        for _ in 0..attempts {
            if !self.is_node_running(index, node) {
                let server = self.node(index, node)?;
                bail!(
                    "{} exited while starting; log:\n{}",
                    server.domain,
                    server.log_tail(30)
                );
            }
            if let Ok(conn) = self.probe.connect(&probe).await {
                conn.close();
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let server = self.node(index, node)?;
        bail!(
            "{} did not answer within {:?}; log:\n{}",
            server.domain,
            self.start_timeout,
            server.log_tail(30)
        )
    }

    /// Starts server `index` again (after [`Harness::stop`] or [`Harness::kill`]) on the same
    /// port with the same data directory, and waits until it answers.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.restart_node(index, 0).await
    }

    /// Starts node `node` of server `index` again without waiting for it to answer (the
    /// caller measures when it does).
    pub fn launch_node(&mut self, index: usize, node: usize) -> anyhow::Result<()> {
        self.spawn_node(index, node)
    }

    /// Starts node `node` of server `index` again.
    pub async fn restart_node(&mut self, index: usize, node: usize) -> anyhow::Result<()> {
        self.spawn_node(index, node)?;
        self.wait_ready(index, node).await
    }

    /// Stops server `index` with SIGTERM (graceful shutdown) and waits for it to exit; kills
    /// it if it takes longer than 10 s. Returns its exit status.
    pub async fn stop(&mut self, index: usize) -> anyhow::Result<ExitStatus> {
        self.stop_node(index, 0).await
    }

    /// Stops node `node` of server `index` gracefully (see [`Harness::stop`]).
    pub async fn stop_node(&mut self, index: usize, node: usize) -> anyhow::Result<ExitStatus> {
        let server = self.node_mut(index, node)?;
        let domain = server.domain.clone();
        let mut child = server
            .child
            .take()
            .with_context(|| format!("{domain} is not running"))?;
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("bad process id")?;
        if let Err(err) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
            // Already gone (ESRCH) is fine: wait collects it below.
            if err != rustix::io::Errno::SRCH {
                bail!("cannot signal {domain}: {err}");
            }
        }
        let attempts = STOP_TIMEOUT.as_millis() / POLL.as_millis() + 1;
        for _ in 0..attempts {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(POLL).await;
        }
        child.kill()?;
        let status = child.wait()?;
        bail!("{domain} did not stop within {STOP_TIMEOUT:?} after SIGTERM (killed: {status})")
    }

    /// Kills server `index` with SIGKILL (no shutdown at all) and reaps it.
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        self.kill_node(index, 0)
    }

    /// Kills node `node` of server `index` with SIGKILL and reaps it.
    pub fn kill_node(&mut self, index: usize, node: usize) -> anyhow::Result<()> {
        let server = self.node_mut(index, node)?;
        let mut child = server
            .child
            .take()
            .with_context(|| format!("{} is not running", server.domain))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// What `servers.json` holds.
    pub fn servers_file(&self) -> ServersFile {
        ServersFile {
            ca_file: self.ca_file().to_owned(),
            servers: self
                .servers
                .iter()
                .enumerate()
                .map(|(index, s)| ServerInfo {
                    addresses: self.addresses_from(index, 0).unwrap_or_default(),
                    domain: s.domain.clone(),
                    address: s.addr,
                    certificate: s.certificate.cert_file.clone(),
                    ca_file: self.ca_file().to_owned(),
                    data_dir: s.data_dir.clone(),
                    config: s.config_file.clone(),
                    log: s.log_file.clone(),
                    pid: s.pid(),
                })
                .collect(),
        }
    }

    /// Writes [`Harness::servers_file`] as `DIR/servers.json` and returns its path.
    pub fn write_servers_json(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("servers.json");
        let text = serde_json::to_string_pretty(&self.servers_file())?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Stops every running server gracefully (SIGTERM), the last one first.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        for index in (0..self.servers.len()).rev() {
            let nodes = self.extra.get(index).map_or(0, Vec::len) + 1;
            for node in (0..nodes).rev() {
                if self.is_node_running(index, node)
                    && let Err(err) = self.stop_node(index, node).await
                {
                    first_error.get_or_insert(err);
                }
            }
        }
        self.probe.close();
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for server in self
            .servers
            .iter_mut()
            .chain(self.extra.iter_mut().flatten())
        {
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The SDK defaults with a small KeyPackage stock (3, topped up below 2).
pub fn small_client_config(connect: ConnectConfig) -> ClientConfig {
    let mut config = ClientConfig::new(connect);
    config.key_package_target = 3;
    config.key_package_low_water = 2;
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_named_in_order() {
        assert_eq!(domain_name(0), "alpha.test");
        assert_eq!(domain_name(2), "gamma.test");
        assert_eq!(domain_name(12), "s13.test");
    }

    #[test]
    fn ports_are_distinct() {
        let ports = free_ports(8).unwrap();
        let unique: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), 8);
        assert!(ports.iter().all(|p| p.ip().is_loopback()));
    }
}
