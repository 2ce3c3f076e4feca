//! Server configuration: one TOML document, every field optional with a documented default.
//! `Config` is what the file says; [`Config::validate`] turns it into [`Settings`], the typed
//! form the server runs on. Library code never reads the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use roost_protocol::Domain;
use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown fields.
    #[error("invalid configuration: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The configuration file. Every field has a default; see README.md for the table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The domain this homeserver serves (the part after `@` in its user ids).
    pub domain: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Directory holding the database, the AS key and the self-signed certificate.
    pub data_dir: PathBuf,
    /// Directory holding the identity files (AS signing key, stateless-reset key, self-signed
    /// certificate) instead of `data_dir`. Every node of a domain must use the same identity:
    /// point them at one copy.
    pub identity_dir: Option<PathBuf>,
    /// Where the domain's data lives.
    pub storage: StorageConfig,
    /// PEM certificate chain to present instead of the self-signed one.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Whether registration needs a token made with `roost admin token create`.
    pub require_registration_token: bool,
    /// TCP address for `/metrics` (Prometheus text) and `/health`; off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// Limits.
    pub limits: Limits,
    /// Server-to-server federation.
    pub federation: FederationConfig,
    /// The blob service (attachments).
    pub blobs: BlobConfig,
    /// Push notifications (wake-ups for clients without a listen stream).
    pub push: PushConfig,
    /// How log lines on stderr are written: `text` (default) or `json` (one object per line).
    pub log_format: LogFormat,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines (coloured only when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line with `timestamp`, `level`, `target` and `fields`.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// The storage engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StorageBackend {
    /// An embedded redb database in `data_dir` (one process per domain).
    #[default]
    Redb,
    /// A PostgreSQL database, shared by every node of the domain.
    Postgres,
}

impl std::str::FromStr for StorageBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(Self::Redb),
            "postgres" => Ok(Self::Postgres),
            other => Err(format!(
                "unknown storage backend {other:?} (redb or postgres)"
            )),
        }
    }
}

/// `[storage]`: which engine, and how to reach PostgreSQL.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `redb` (default) or `postgres`.
    pub backend: StorageBackend,
    /// PostgreSQL connection string (`postgresql://user@host:port/db` or `host=... user=...`);
    /// required with `backend = "postgres"`. Several hosts may be listed, as libpq allows.
    pub url: Option<String>,
    /// Database connections per node.
    pub pool_size: u32,
    /// How long a request waits for a database connection or statement before it fails with
    /// UNAVAILABLE.
    pub timeout_ms: u64,
    /// Memory redb may use to cache database pages and buffer writes, in MiB (redb engine
    /// only).
    pub cache_size_mib: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Redb,
            url: None,
            pool_size: 16,
            timeout_ms: 5_000,
            cache_size_mib: 64,
        }
    }
}

/// Federation with other homeservers (off by default).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Accept federation connections and forward requests for other domains.
    pub enabled: bool,
    /// PEM bundle of CAs whose certificates identify peer homeservers (the certificate must be
    /// valid for the domain the peer speaks for).
    pub ca_file: Option<PathBuf>,
    /// Known peers by domain: address and/or pinned certificate.
    pub peers: BTreeMap<String, PeerConfig>,
    /// If not empty, only these domains are federated with.
    pub allow_domains: Vec<String>,
    /// Never federate with these domains.
    pub deny_domains: Vec<String>,
    /// Concurrent requests towards one peer.
    pub max_in_flight_per_peer: u32,
    /// Concurrent bidirectional streams (requests) a peer homeserver may open on its
    /// connection to us; client connections have `limits.max_concurrent_streams`.
    pub max_concurrent_streams: u32,
    /// Deliveries sent to a peer in one batch.
    pub outbox_batch: u32,
    /// Bytes of encoded deliveries sent to a peer in one batch (a single larger delivery goes
    /// alone). Keep it below the peers' `limits.max_frame_len`.
    pub outbox_batch_bytes: u32,
    /// First retry delay of an undeliverable batch; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// How often each node looks for outbox entries it was not told about (with several
    /// nodes: written by another node that stopped before sending them, or held by a node
    /// whose lease ran out).
    pub outbox_rescan_ms: u64,
    /// Requests per second one peer may send us.
    pub peer_rate_per_sec: u32,
    /// Burst of requests one peer may send us.
    pub peer_burst: u32,
    /// How long a commit waits for other domains' ASes to certify the credentials it brings
    /// in (asked without holding the group's lock); then it fails with PEER_UNREACHABLE.
    pub credential_timeout_ms: u64,
    /// Signature keys of other domains' clients, as their AS certified them, kept at most
    /// this many (0: ask every time).
    pub certified_keys_cached: u32,
    /// How long a certified key is trusted without asking its AS again.
    pub certified_keys_ttl_ms: u64,
    /// How long a handshake with one address of a peer may take before the next address is
    /// tried (once all failed, the outbox retries).
    pub connect_timeout_ms: u64,
    /// How long one request to a peer may wait for its answer before the connection is taken
    /// for dead (dropped; the next request connects afresh).
    pub request_timeout_ms: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ca_file: None,
            peers: BTreeMap::new(),
            allow_domains: Vec::new(),
            deny_domains: Vec::new(),
            max_in_flight_per_peer: 64,
            max_concurrent_streams: 128,
            outbox_batch: 256,
            outbox_batch_bytes: 4 << 20,
            retry_initial_ms: 250,
            retry_max_ms: 30_000,
            outbox_rescan_ms: 5_000,
            peer_rate_per_sec: 2_000,
            peer_burst: 4_000,
            credential_timeout_ms: 5_000,
            certified_keys_cached: 10_000,
            certified_keys_ttl_ms: 60_000,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
        }
    }
}

impl FederationConfig {
    fn check(&self) -> Result<(), ConfigError> {
        if self.connect_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "federation.connect_timeout_ms and federation.request_timeout_ms must be at least 1"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `[push]`: wake-ups sent through Web Push, APNs and FCM to clients without a listen stream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Accept Web Push (RFC 8030) subscriptions, UnifiedPush included.
    pub web_push: bool,
    /// The VAPID `sub` claim (RFC 8292): a `mailto:` or `https:` contact for push services
    /// (default: `mailto:postmaster@` and the domain).
    pub vapid_subject: Option<String>,
    /// At most one wake-up per client per this interval; messages in between share it.
    pub coalesce_ms: u64,
    /// How long after a message lands a wake-up waits; if the client has fetched or
    /// acknowledged everything by then (it was online), none is sent.
    pub delay_ms: u64,
    /// First retry delay of a failed wake-up; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Attempts of one wake-up before it is given up (the registration stays).
    pub max_attempts: u32,
    /// Time limit of one request to a push service (connect, TLS, answer).
    pub request_timeout_ms: u64,
    /// Wake-ups sent at once by one node.
    pub max_in_flight: u32,
    /// How often each node looks for wake-ups that are due (scheduled by another node, or
    /// waiting for a retry).
    pub poll_ms: u64,
    /// How often (and at start) each node schedules the wake-ups a node lost by stopping
    /// between a queue commit and the push outbox; it looks at messages at least this old
    /// (at start: every message).
    pub recover_ms: u64,
    /// Longest wait a push service may ask for with `Retry-After` (429, 503); a longer one
    /// is cut to this.
    pub retry_after_max_ms: u64,
    /// How long a push service keeps an undelivered wake-up (Web Push `TTL`, APNs
    /// expiration, FCM `ttl`).
    pub ttl_secs: u32,
    /// Address ranges (CIDR) push endpoints must not resolve to; checked when a client
    /// registers and before every connection (SSRF protection).
    pub forbidden_ranges: Vec<String>,
    /// PEM bundle of the CAs push services' certificates must chain to, instead of the
    /// built-in Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// APNs: the `.p8` signing key (PKCS#8 PEM) from the Apple developer account; APNs is off
    /// without it.
    pub apns_key_file: Option<PathBuf>,
    /// APNs: the key's id (`kid`).
    pub apns_key_id: Option<String>,
    /// APNs: the team id (`iss`).
    pub apns_team_id: Option<String>,
    /// APNs: base URL (the sandbox is `https://api.sandbox.push.apple.com`).
    pub apns_url: String,
    /// FCM: the Firebase project id; FCM is off without it.
    pub fcm_project_id: Option<String>,
    /// FCM: a file holding a current OAuth 2 access token for the project's service account
    /// (scope `https://www.googleapis.com/auth/firebase.messaging`), read before every send;
    /// the operator keeps it fresh (see docs/SECURITY.md).
    pub fcm_access_token_file: Option<PathBuf>,
    /// FCM: base URL of the HTTP v1 API.
    pub fcm_url: String,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            web_push: true,
            vapid_subject: None,
            coalesce_ms: 60_000,
            delay_ms: 2_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 600_000,
            max_attempts: 12,
            request_timeout_ms: 10_000,
            max_in_flight: 32,
            poll_ms: 1_000,
            recover_ms: 60_000,
            retry_after_max_ms: 3_600_000,
            ttl_secs: 86_400,
            forbidden_ranges: [
                "0.0.0.0/8",
                "10.0.0.0/8",
                "100.64.0.0/10",
                "127.0.0.0/8",
                "169.254.0.0/16",
                "172.16.0.0/12",
                "192.0.0.0/24",
                "192.0.2.0/24",
                "192.168.0.0/16",
                "198.18.0.0/15",
                "198.51.100.0/24",
                "203.0.113.0/24",
                "224.0.0.0/3",
                "::/128",
                "::1/128",
                "64:ff9b::/96",
                "2001:db8::/32",
                "fc00::/7",
                "fe80::/10",
                "ff00::/8",
            ]
            .map(String::from)
            .to_vec(),
            ca_file: None,
            apns_key_file: None,
            apns_key_id: None,
            apns_team_id: None,
            apns_url: "https://api.push.apple.com".into(),
            fcm_project_id: None,
            fcm_access_token_file: None,
            fcm_url: "https://fcm.googleapis.com".into(),
        }
    }
}

/// One known peer.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// `host:port` (default, when `addresses` is empty too: the domain itself, port 4433).
    pub address: Option<String>,
    /// More `host:port` addresses of the peer (the nodes of a homeserver that runs several),
    /// tried in order after `address`; the next one is used when one fails or its connection
    /// is lost.
    pub addresses: Vec<String>,
    /// PEM certificate the peer presents (pinned; trusted without a CA).
    pub certificate: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            domain: "localhost".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], roost_protocol::DEFAULT_PORT)),
            data_dir: PathBuf::from("roost-data"),
            identity_dir: None,
            storage: StorageConfig::default(),
            tls_cert: None,
            tls_key: None,
            require_registration_token: false,
            metrics_listen: None,
            limits: Limits::default(),
            federation: FederationConfig::default(),
            blobs: BlobConfig::default(),
            push: PushConfig::default(),
            log_format: LogFormat::Text,
        }
    }
}

/// `[blobs]`: where encrypted attachments are stored and how much each user may store.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobConfig {
    /// Directory of the blob files (default: `blobs` in `data_dir`). Only with the redb
    /// engine: with PostgreSQL, blobs are stored in the database (setting it is an error).
    pub dir: Option<PathBuf>,
    /// Largest blob accepted, in bytes.
    pub max_blob_size: u64,
    /// Bytes of unexpired blobs a user may store.
    pub quota_per_user: u64,
    /// Uploads per minute per user.
    pub upload_rate_per_minute: u32,
    /// Burst of uploads per user.
    pub upload_burst: u32,
    /// Downloads per minute per client (and per federation peer for proxy downloads).
    pub download_rate_per_minute: u32,
    /// Burst of downloads per client.
    pub download_burst: u32,
    /// Blobs are deleted this long after their upload.
    pub expiry_secs: u64,
    /// An upload whose bytes stop arriving for this long is cut off and discarded.
    pub stall_timeout_ms: u64,
}

impl Default for BlobConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_blob_size: 256 * 1024 * 1024,
            quota_per_user: 2 * 1024 * 1024 * 1024,
            upload_rate_per_minute: 60,
            upload_burst: 60,
            download_rate_per_minute: 600,
            download_burst: 600,
            expiry_secs: 30 * 24 * 3600,
            stall_timeout_ms: 10_000,
        }
    }
}

impl BlobConfig {
    fn check(&self) -> Result<(), ConfigError> {
        let nonzero: [(&str, u64); 6] = [
            ("upload_burst", self.upload_burst.into()),
            ("upload_rate_per_minute", self.upload_rate_per_minute.into()),
            ("download_burst", self.download_burst.into()),
            (
                "download_rate_per_minute",
                self.download_rate_per_minute.into(),
            ),
            ("expiry_secs", self.expiry_secs),
            ("stall_timeout_ms", self.stall_timeout_ms),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "blobs.{name} must be at least 1"
                )));
            }
        }
        Ok(())
    }

    /// `stall_timeout_ms` as a duration.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_ms)
    }
}

/// Every limit of the server. Times are in milliseconds or seconds as the name says.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame body accepted, in bytes.
    pub max_frame_len: u32,
    /// A request must arrive completely within this time after its stream opened.
    pub request_read_timeout_ms: u64,
    /// QUIC idle timeout.
    pub idle_timeout_ms: u64,
    /// Concurrent bidirectional streams a client may open per connection (every connection
    /// holds the stream slots it grants: docs/BENCHMARKS.md, "Memory per idle listener").
    pub max_concurrent_streams: u32,
    /// Per-stream receive window, bytes.
    pub stream_receive_window: u32,
    /// Per-connection receive window, bytes (quinn's default is unlimited).
    pub connection_receive_window: u32,
    /// Concurrent connections; more are refused.
    pub max_connections: u32,
    /// Once more handshakes than this are in progress, new ones must prove their address
    /// (QUIC Retry).
    pub retry_threshold: u32,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// KeyPackages per upload request.
    pub max_key_packages_per_upload: u32,
    /// Ordinary KeyPackages held per client.
    pub max_key_packages_per_client: u32,
    /// Tolerated clock skew when checking KeyPackage lifetimes.
    pub key_package_clock_skew_secs: u64,
    /// Longest KeyPackage lifetime (not_after - not_before) accepted.
    pub key_package_max_lifetime_secs: u64,
    /// KeyPackage claims per minute per (claiming user, target client). All devices of the
    /// claiming user (or of a remote claimer's user) share one bucket.
    pub claim_rate_per_minute: u32,
    /// Burst of KeyPackage claims per (claiming user, target client).
    pub claim_burst: u32,
    /// AddClient requests per hour per user (counted after the user signature verified).
    pub add_client_rate_per_hour: u32,
    /// Burst of AddClient requests per user.
    pub add_client_burst: u32,
    /// Active clients per user; removed clients do not count. AddClient beyond it fails with
    /// LIMIT_EXCEEDED.
    pub max_clients_per_user: u32,
    /// Registrations per minute per source IP address.
    pub registration_rate_per_minute: u32,
    /// Burst of registrations per source IP address.
    pub registration_burst: u32,
    /// IPv6 sources are limited per network of this prefix length (one host usually holds a
    /// whole /64); IPv4 sources per address.
    pub registration_ipv6_prefix: u8,
    /// Messages per second a client may send (application messages, commits, proposals).
    pub send_rate_per_sec: u32,
    /// Burst of messages a client may send.
    pub send_burst: u32,
    /// Messages held per queue; a full queue refuses more.
    pub max_queue_depth: u64,
    /// Messages older than this are dropped from queues.
    pub max_message_age_secs: u64,
    /// Messages returned by one fetch, at most.
    pub max_fetch_messages: u32,
    /// Payload bytes returned by one fetch, at most (at least one message is returned).
    pub max_fetch_bytes: u32,
    /// Members per group.
    pub max_group_size: u32,
    /// Past epochs for which application messages are still accepted.
    pub past_epochs: u32,
    /// Validity of an issued client credential.
    pub credential_validity_secs: u64,
    /// Most write operations coalesced into one durable transaction.
    pub max_write_batch: u32,
    /// Groups whose MLS public state stays in memory (least recently used ones are dropped).
    pub max_cached_groups: u32,
    /// How long an accepted SendMessage, Commit, ExternalJoin or LeaveGroup is remembered:
    /// a repeat of the same bytes by the same client within this time gets the original
    /// answer and enqueues nothing (see PROTOCOL.md, "Idempotent submission").
    pub receipt_window_secs: u64,
    /// Most such receipts stored; beyond it the oldest are dropped early (the window
    /// shrinks), so the store holds at most this many (about 100 bytes each).
    pub max_receipts: u64,
    /// Connections to `metrics_listen` served at once; more are closed at once.
    pub metrics_max_connections: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_len: roost_protocol::frame::DEFAULT_MAX_FRAME_LEN,
            request_read_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            max_concurrent_streams: 32,
            stream_receive_window: 1024 * 1024,
            connection_receive_window: 16 * 1024 * 1024,
            max_connections: 20_000,
            retry_threshold: 512,
            shutdown_grace_ms: 5_000,
            max_key_packages_per_upload: 100,
            max_key_packages_per_client: 1_000,
            key_package_clock_skew_secs: 300,
            key_package_max_lifetime_secs: 366 * 24 * 3600,
            claim_rate_per_minute: 10,
            claim_burst: 10,
            add_client_rate_per_hour: 10,
            add_client_burst: 10,
            max_clients_per_user: 32,
            registration_rate_per_minute: 10,
            registration_burst: 10,
            registration_ipv6_prefix: 64,
            send_rate_per_sec: 200,
            send_burst: 400,
            max_queue_depth: 10_000,
            max_message_age_secs: 14 * 24 * 3600,
            max_fetch_messages: 1_000,
            max_fetch_bytes: 4 * 1024 * 1024,
            max_group_size: 10_000,
            past_epochs: 2,
            credential_validity_secs: 365 * 24 * 3600,
            max_write_batch: 1_024,
            max_cached_groups: 1_024,
            receipt_window_secs: 24 * 3600,
            max_receipts: 1_000_000,
            metrics_max_connections: 64,
        }
    }
}

impl Limits {
    /// `request_read_timeout_ms` as a duration.
    pub fn request_read_timeout(&self) -> Duration {
        Duration::from_millis(self.request_read_timeout_ms)
    }

    /// `idle_timeout_ms` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// `shutdown_grace_ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let nonzero: [(&str, u64); 22] = [
            ("max_frame_len", self.max_frame_len.into()),
            ("request_read_timeout_ms", self.request_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("max_concurrent_streams", self.max_concurrent_streams.into()),
            ("stream_receive_window", self.stream_receive_window.into()),
            (
                "connection_receive_window",
                self.connection_receive_window.into(),
            ),
            ("max_connections", self.max_connections.into()),
            (
                "max_key_packages_per_upload",
                self.max_key_packages_per_upload.into(),
            ),
            (
                "max_key_packages_per_client",
                self.max_key_packages_per_client.into(),
            ),
            ("claim_burst", self.claim_burst.into()),
            ("add_client_burst", self.add_client_burst.into()),
            ("max_clients_per_user", self.max_clients_per_user.into()),
            ("registration_burst", self.registration_burst.into()),
            ("send_burst", self.send_burst.into()),
            ("max_queue_depth", self.max_queue_depth),
            ("max_fetch_messages", self.max_fetch_messages.into()),
            ("max_group_size", self.max_group_size.into()),
            ("max_write_batch", self.max_write_batch.into()),
            ("max_cached_groups", self.max_cached_groups.into()),
            ("receipt_window_secs", self.receipt_window_secs),
            ("max_receipts", self.max_receipts),
            (
                "metrics_max_connections",
                self.metrics_max_connections.into(),
            ),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be at least 1"
                )));
            }
        }
        if self.registration_ipv6_prefix > 128 {
            return Err(ConfigError::Invalid(
                "limits.registration_ipv6_prefix must be at most 128".into(),
            ));
        }
        if self.max_frame_len > (1 << 30) {
            return Err(ConfigError::Invalid(
                "limits.max_frame_len must be at most 1 GiB".into(),
            ));
        }
        Ok(())
    }
}

/// The validated `[storage]` section.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StorageSettings {
    /// redb in the data directory.
    Redb,
    /// PostgreSQL.
    Postgres {
        /// Connection string (may hold a password: never log it).
        url: String,
        /// Connections per node.
        pool_size: u32,
        /// Wait for a connection or statement.
        timeout: Duration,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This server's domain.
    pub domain: Domain,
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Identity files' directory (`identity_dir`, else `data_dir`).
    pub identity_dir: PathBuf,
    /// Storage engine.
    pub storage: StorageSettings,
    /// redb's cache size in bytes (`storage.cache_size_mib`; unused with PostgreSQL).
    pub redb_cache_size: usize,
    /// Certificate chain and key files, if not self-signed.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Registration gating.
    pub require_registration_token: bool,
    /// Metrics/health address.
    pub metrics_listen: Option<SocketAddr>,
    /// Limits.
    pub limits: Limits,
    /// Federation.
    pub federation: FederationConfig,
    /// The blob service (`dir` absent: `blobs` in `data_dir`; with PostgreSQL always absent).
    pub blobs: BlobConfig,
    /// Push notifications.
    pub push: PushConfig,
    /// The clock the services decide by: the system clock unless a test sets a
    /// [`ManualClock`](crate::clock::ManualClock)'s (not configurable from a file).
    pub clock: crate::clock::Clock,
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Checks every value and produces the typed settings.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let domain: Domain = self.domain.parse().map_err(|_| {
            ConfigError::Invalid(format!("domain {:?} is not a valid domain", self.domain))
        })?;
        let tls_files = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "tls_cert and tls_key go together".into(),
                ));
            }
        };
        self.limits.check()?;
        self.blobs.check()?;
        self.federation.check()?;
        let redb_cache_size = self
            .storage
            .cache_size_mib
            .checked_mul(1024 * 1024)
            .and_then(|bytes| usize::try_from(bytes).ok())
            .filter(|&bytes| bytes > 0)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "storage.cache_size_mib must be at least 1 and fit in memory, not {}",
                    self.storage.cache_size_mib
                ))
            })?;
        let storage = match self.storage.backend {
            StorageBackend::Redb => StorageSettings::Redb,
            StorageBackend::Postgres => {
                let Some(url) = self.storage.url.filter(|u| !u.is_empty()) else {
                    return Err(ConfigError::Invalid(
                        "storage.url is required with storage.backend = \"postgres\"".into(),
                    ));
                };
                if self.storage.pool_size == 0 || self.storage.timeout_ms == 0 {
                    return Err(ConfigError::Invalid(
                        "storage.pool_size and storage.timeout_ms must be at least 1".into(),
                    ));
                }
                if self.blobs.dir.is_some() {
                    return Err(ConfigError::Invalid(
                        "blobs.dir is for storage.backend = \"redb\": with \"postgres\" blobs are stored in the database".into(),
                    ));
                }
                StorageSettings::Postgres {
                    url,
                    pool_size: self.storage.pool_size,
                    timeout: Duration::from_millis(self.storage.timeout_ms),
                }
            }
        };
        for name in self
            .federation
            .peers
            .keys()
            .chain(&self.federation.allow_domains)
            .chain(&self.federation.deny_domains)
        {
            if name.parse::<Domain>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "federation: {name:?} is not a valid domain"
                )));
            }
        }
        crate::push::check_config(&self.push).map_err(ConfigError::Invalid)?;
        Ok(Settings {
            domain,
            listen: self.listen,
            identity_dir: self.identity_dir.unwrap_or_else(|| self.data_dir.clone()),
            data_dir: self.data_dir,
            storage,
            redb_cache_size,
            tls_files,
            require_registration_token: self.require_registration_token,
            metrics_listen: self.metrics_listen,
            limits: self.limits,
            federation: self.federation,
            blobs: self.blobs,
            push: self.push,
            clock: crate::clock::Clock::system(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let settings = Config::default().validate().unwrap();
        assert_eq!(settings.domain.as_str(), "localhost");
        assert_eq!(settings.listen.port(), 4433);
    }

    #[test]
    fn toml_overrides_and_rejects_unknown_fields() {
        let config = Config::from_toml(
            "domain = \"example.org\"\nlisten = \"0.0.0.0:5000\"\n[limits]\nmax_queue_depth = 5\n",
        )
        .unwrap();
        assert_eq!(config.limits.max_queue_depth, 5);
        assert_eq!(
            config.limits.max_group_size,
            Limits::default().max_group_size
        );
        assert!(Config::from_toml("domian = \"x\"").is_err());
        assert!(Config::from_toml("[limits]\nmax_queue_depht = 1").is_err());
    }

    #[test]
    fn invalid_values_are_refused() {
        let config = Config {
            domain: "Not A Domain".into(),
            ..Config::default()
        };
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.limits.max_frame_len = 0;
        assert!(config.validate().is_err());
        let config = Config {
            tls_cert: Some("a.pem".into()),
            ..Config::default()
        };
        assert!(config.validate().is_err());
        // A peer would never be reached, or every request to one would fail at once.
        let mut config = Config::default();
        config.federation.connect_timeout_ms = 0;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.federation.request_timeout_ms = 0;
        assert!(config.validate().is_err());
    }

    #[test]
    fn postgres_needs_a_url() {
        let config = Config::from_toml("[storage]\nbackend = \"postgres\"\n").unwrap();
        assert!(config.validate().is_err());
        let config = Config::from_toml(
            "[storage]\nbackend = \"postgres\"\nurl = \"postgresql://roost@127.0.0.1/roost\"\n",
        )
        .unwrap();
        assert!(matches!(
            config.validate().unwrap().storage,
            StorageSettings::Postgres { pool_size: 16, .. }
        ));
        // Blobs live in the database with PostgreSQL: a blob directory is a mistake.
        let config = Config::from_toml(
            "[storage]\nbackend = \"postgres\"\nurl = \"postgresql://roost@127.0.0.1/roost\"\n[blobs]\ndir = \"/srv/blobs\"\n",
        )
        .unwrap();
        let refused = config.validate().unwrap_err().to_string();
        assert!(refused.contains("blobs.dir"), "{refused}");
        assert!(Config::from_toml("[storage]\nbackend = \"mysql\"\n").is_err());
        let config = Config::from_toml("[storage]\ncache_size_mib = 8\n").unwrap();
        assert_eq!(config.validate().unwrap().redb_cache_size, 8 << 20);
        let config = Config::from_toml("[storage]\ncache_size_mib = 0\n").unwrap();
        assert!(config.validate().is_err());
        let config = Config::from_toml(&format!("[storage]\ncache_size_mib = {}\n", u64::MAX));
        assert!(config.unwrap().validate().is_err());
        assert_eq!(Config::default().log_format, LogFormat::Text);
        let config = Config::from_toml("log_format = \"json\"\n").unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(Config::from_toml("log_format = \"xml\"\n").is_err());
        assert!(matches!(
            Config::default().validate().unwrap().storage,
            StorageSettings::Redb
        ));
    }
}
