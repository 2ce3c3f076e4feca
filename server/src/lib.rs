//! The roost homeserver as a library: [`Server::start`] binds the QUIC endpoint and serves
//! until [`Server::shutdown`]; [`run`] does both around a shutdown future. `main.rs` only
//! parses the command line and the configuration.
#![forbid(unsafe_code)]

pub mod admin;
pub mod clock;
pub mod config;
pub mod config_reference;
pub mod error;
pub mod identity;
pub mod ratelimit;

mod auth;
mod blob;
mod bus;
mod delivery;
mod dispatch;
mod federation;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod keypackage;
mod metrics;
mod mls;
mod push;
mod queue;
mod storage;
mod transport;

/// Test support: a homeserver whose database file sits on a backend that fails on command.
/// Not part of the configuration; only tests reach it.
#[doc(hidden)]
pub mod testing {
    pub use crate::storage::redb::fault::Faults;

    use crate::config::Settings;
    use crate::{Server, ServerError};

    /// Starts a homeserver like [`Server::start`] whose redb database file goes through a
    /// backend that fails writes or fsyncs when `faults` says so. The settings must choose the
    /// redb engine.
    pub async fn start_with_store_faults(
        settings: Settings,
        faults: Faults,
    ) -> Result<Server, ServerError> {
        Server::start_inner(settings, Some(faults)).await
    }

    /// A UDP address on 127.0.0.1 for a server that a test stops and starts again on the same
    /// port. The port lies below the system's range of ephemeral ports, so no socket bound to
    /// port 0 while the server is down (a client's, in any process) can take it; it was free
    /// when this returned. Where that range cannot be read (not Linux) or leaves no room below
    /// it, an ephemeral port.
    pub fn restartable_addr() -> std::io::Result<std::net::SocketAddr> {
        Ok(restartable_addrs(1)?.remove(0))
    }

    /// `count` distinct addresses as [`restartable_addr`] gives them.
    pub fn restartable_addrs(count: usize) -> std::io::Result<Vec<std::net::SocketAddr>> {
        use std::net::{Ipv4Addr, UdpSocket};
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok());
        // Held until every port is chosen, so that they differ.
        let mut held = Vec::with_capacity(count);
        while held.len() < count {
            let below = ephemeral_low.filter(|low| *low > 11_000).and_then(|low| {
                (0..200).find_map(|_| {
                    let port = rand::random_range(10_000..low);
                    UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).ok()
                })
            });
            held.push(match below {
                Some(socket) => socket,
                None => UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?,
            });
        }
        held.iter().map(UdpSocket::local_addr).collect()
    }

    /// From now on the server drops every hand-over of a queued message to the push outbox,
    /// as if it stopped right after the queue commit: the wake-up is lost until a node's
    /// recovery sweep finds it.
    pub fn lose_push_handovers(server: &Server) {
        server.state.push.lose_handovers();
    }
}

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use roost_protocol::messages::queue::QueuePayload;
use roost_protocol::{ClientId, MessageId, UserId, WireError};
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::tokens::create as create_registration_token;
use config::Settings;
use identity::{AsKey, TlsIdentity};
use ratelimit::RateLimiter;
use storage::{Backend, Closer};

/// File name of the database in the data directory.
pub const DATABASE_FILE: &str = "roost.redb";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Keys or certificate.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The database.
    #[error("database: {0}")]
    Store(#[from] storage::StoreError),
    /// TLS configuration.
    #[error("tls: {0}")]
    Tls(String),
    /// Push keys or provider settings.
    #[error("push: {0}")]
    Push(String),
    /// Binding the socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Shared state of the services.
pub(crate) struct State {
    pub(crate) settings: Settings,
    /// What every decision by time reads (a copy of `settings.clock`).
    pub(crate) clock: clock::Clock,
    pub(crate) store: Backend,
    pub(crate) as_key: AsKey,
    pub(crate) queues: queue::Notifier,
    pub(crate) registration_limiter: RateLimiter<IpAddr>,
    /// AddClient requests per user.
    pub(crate) add_client_limiter: RateLimiter<UserId>,
    /// KeyPackage claims per (claiming user, target client): every device of a claimer
    /// shares one bucket.
    pub(crate) claim_limiter: RateLimiter<(UserId, ClientId)>,
    pub(crate) send_limiter: RateLimiter<ClientId>,
    /// The blob store and the uploads in progress.
    pub(crate) blobs: blob::Blobs,
    pub(crate) blob_reservations: blob::Reservations,
    /// Blob uploads per user.
    pub(crate) blob_upload_limiter: RateLimiter<UserId>,
    /// Blob downloads per client (by its id) or per peer (by its certificate hash).
    pub(crate) blob_download_limiter: RateLimiter<Vec<u8>>,
    pub(crate) federation: federation::Federation,
    pub(crate) groups: delivery::GroupCache,
    pub(crate) shutdown: CancellationToken,
    /// Push registrations' key, providers, and wake-ups waiting to be scheduled.
    pub(crate) push: push::Push,
    /// Clients removed while this process runs (here or, through the bus, on another node).
    revoked: bus::Revoked,
    /// Told when another node of the domain stopped (through the bus).
    pub(crate) nodes_gone: Arc<tokio::sync::Notify>,
}

impl State {
    pub(crate) fn revoke(&self, client_num: u64) {
        self.revoked.insert(client_num);
    }

    pub(crate) fn is_revoked(&self, client_num: u64) -> bool {
        self.revoked.contains(client_num)
    }
}

/// Milliseconds since the Unix epoch by the system clock, for bookkeeping stamps the storage
/// engines take themselves (creation times) that no decision reads. Services decide by
/// [`State::clock`].
pub(crate) fn unix_millis() -> u64 {
    clock::Clock::system().unix_millis()
}

/// A running homeserver.
pub struct Server {
    metrics_addr: Option<SocketAddr>,
    state: Arc<State>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    certificate: CertificateDer<'static>,
    cert_path: PathBuf,
    tracker: TaskTracker,
    closer: Closer,
}

impl Server {
    /// Opens the data directory (creating the database, AS key and self-signed certificate on
    /// first start), binds the endpoint and starts serving.
    pub async fn start(settings: Settings) -> Result<Self, ServerError> {
        Self::start_inner(settings, None).await
    }

    async fn start_inner(
        settings: Settings,
        redb_faults: Option<storage::redb::fault::Faults>,
    ) -> Result<Self, ServerError> {
        let dir = settings.data_dir.clone();
        for dir in [&settings.data_dir, &settings.identity_dir] {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::DataDir {
                path: dir.clone(),
                source,
            })?;
        }
        let identity_dir = settings.identity_dir.clone();
        let as_key = AsKey::load_or_create(&identity_dir)?;
        let tls = match &settings.tls_files {
            Some((cert, key)) => TlsIdentity::load(cert, key)?,
            None => {
                TlsIdentity::load_or_create_self_signed(&identity_dir, settings.domain.as_str())?
            }
        };
        let certificate = tls
            .cert_chain
            .first()
            .cloned()
            .ok_or_else(|| ServerError::Tls("no certificate".into()))?;
        let cert_path = tls.cert_path.clone();
        let queues = queue::Notifier::default();
        let revoked = bus::Revoked::default();
        let nodes_gone = Arc::new(tokio::sync::Notify::new());
        let sink = bus::BusSink {
            queues: queues.clone(),
            revoked: revoked.clone(),
            nodes_gone: nodes_gone.clone(),
        };
        let (store, closer) = storage::open(
            &settings,
            &dir.join(DATABASE_FILE),
            &as_key.public_key(),
            sink,
            redb_faults.clone(),
        )
        .await?;
        let federation = federation::Federation::new(&settings, &tls)?;
        let blobs = blob::Blobs::open(&settings, redb_faults)?;
        let push = push::Push::new(&settings).map_err(ServerError::Push)?;
        let limits = &settings.limits;
        let blob_limits = &settings.blobs;
        let clock = settings.clock.clone();
        let state = Arc::new(State {
            federation,
            registration_limiter: RateLimiter::new(
                f64::from(limits.registration_rate_per_minute) / 60.0,
                limits.registration_burst,
            )
            .with_clock(clock.clone()),
            add_client_limiter: RateLimiter::new(
                f64::from(limits.add_client_rate_per_hour) / 3600.0,
                limits.add_client_burst,
            )
            .with_clock(clock.clone()),
            claim_limiter: RateLimiter::new(
                f64::from(limits.claim_rate_per_minute) / 60.0,
                limits.claim_burst,
            )
            .with_clock(clock.clone()),
            send_limiter: RateLimiter::new(f64::from(limits.send_rate_per_sec), limits.send_burst)
                .with_clock(clock.clone()),
            blobs,
            blob_reservations: blob::Reservations::default(),
            blob_upload_limiter: RateLimiter::new(
                f64::from(blob_limits.upload_rate_per_minute) / 60.0,
                blob_limits.upload_burst,
            )
            .with_clock(clock.clone()),
            blob_download_limiter: RateLimiter::new(
                f64::from(blob_limits.download_rate_per_minute) / 60.0,
                blob_limits.download_burst,
            )
            .with_clock(clock.clone()),
            groups: delivery::GroupCache::new(limits.max_cached_groups as usize),
            queues,
            shutdown: CancellationToken::new(),
            push,
            revoked,
            nodes_gone,
            as_key,
            store,
            clock,
            settings,
        });
        let endpoint = transport::bind(&state, tls)?;
        let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind {
            addr: state.settings.listen,
            source,
        })?;
        let tracker = TaskTracker::new();
        tracker.spawn(transport::accept_loop(
            endpoint.clone(),
            state.clone(),
            tracker.clone(),
        ));
        tracker.spawn(sweeper(state.clone()));
        federation::outbox::start(state.clone(), &tracker);
        push::start(state.clone(), &tracker);
        match admin::serve(state.clone(), &tracker).await {
            Ok(path) => tracing::info!(socket = %path.display(), "admin socket listening"),
            Err(err) => {
                tracing::warn!(%err, "no admin socket: roost admin cannot reach this server")
            }
        }
        let metrics_addr = match state.settings.metrics_listen {
            Some(addr) => Some(
                metrics::start(addr, state.clone(), &tracker)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            ),
            None => None,
        };
        tracing::info!(
            domain = %state.settings.domain,
            %local_addr,
            certificate = %cert_path.display(),
            "homeserver listening"
        );
        Ok(Self {
            metrics_addr,
            state,
            endpoint,
            local_addr,
            certificate,
            cert_path,
            tracker,
            closer,
        })
    }

    /// The bound UDP address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound address of `/metrics` and `/health`, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The certificate clients should pin.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// Where the certificate is stored (PEM).
    pub fn certificate_path(&self) -> &std::path::Path {
        &self.cert_path
    }

    /// The AS verifying key.
    pub fn as_public_key(&self) -> Vec<u8> {
        self.state.as_key.public_key()
    }

    /// Enqueues a message for a local client, as the DS and federation do. Resolves when it
    /// is durable; returns its sequence number.
    pub async fn enqueue(
        &self,
        recipient: &ClientId,
        id: MessageId,
        payload: QueuePayload,
    ) -> Result<u64, WireError> {
        queue::enqueue(&self.state, recipient, id, payload)
            .await
            .map_err(|e| e.to_wire())
    }

    /// Stops accepting, lets in-flight requests finish (up to `shutdown_grace_ms`), ends
    /// listen streams, closes connections and the database.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.state.shutdown.cancel();
        self.tracker.close();
        let grace = self.state.settings.limits.shutdown_grace();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish within the grace period");
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        drop(self.endpoint);
        self.state.blobs.shut().await;
        drop(self.state);
        let closer = self.closer;
        // Anything still holding the store (an abandoned task) would keep the writer alive;
        // join on a blocking thread with a bound.
        let join = tokio::task::spawn_blocking(move || closer.join());
        if tokio::time::timeout(grace, join).await.is_err() {
            tracing::warn!("database did not close within the grace period");
        }
        tracing::info!("stopped");
    }
}

/// Runs a homeserver until `shutdown` resolves, then shuts it down gracefully.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = Server::start(settings).await?;
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

/// Drops expired queue messages, KeyPackages, blobs and request receipts once a minute.
async fn sweeper(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = queue::cutoff_ms(&state);
        let result = async {
            let messages = queue::QueueStore::expire(&state.store, cutoff).await?;
            let key_packages =
                keypackage::KeyPackageStore::purge_expired(&state.store, state.clock.unix_secs())
                    .await?;
            Ok::<_, error::ServiceError>((messages, key_packages))
        }
        .await;
        match result {
            Ok((0, 0)) => {}
            Ok((messages, key_packages)) => tracing::info!(messages, key_packages, "expired"),
            Err(err) => tracing::warn!(%err, "expiry sweep failed"),
        }
        match blob::expire(&state).await {
            Ok(0) => {}
            Ok(blobs) => tracing::info!(blobs, "blobs expired"),
            Err(err) => tracing::warn!(%err, "blob expiry failed"),
        }
        match delivery::receipt::prune(&state).await {
            Ok(0) => {}
            Ok(receipts) => tracing::debug!(receipts, "receipts pruned"),
            Err(err) => tracing::warn!(%err, "receipt pruning failed"),
        }
    }
}
