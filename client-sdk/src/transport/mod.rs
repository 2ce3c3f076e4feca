//! The QUIC request layer: connects to a homeserver and runs requests on it.
//!
//! This layer knows the wire protocol (frames, requests, responses, listen events,
//! connection authentication) and nothing about MLS, so the homeserver's federation code uses
//! it too, to talk to other homeservers (with [`ConnectConfig::federation`] and a
//! [`ClientIdentity`] for mutual TLS).
//!
//! # Model
//!
//! - One [`Endpoint`] (one UDP socket) opens any number of [`Connection`]s.
//! - A [`Connection`] is cheap to clone; every request runs on its own bidirectional QUIC
//!   stream, so many requests run at once on one connection. The client writes one request
//!   frame and finishes its side; the server answers with one frame and finishes its side.
//! - A frame is `u32` big-endian body length, then the body (protocol version + message).
//!   Response headers are checked against [`ConnectConfig::max_frame_len`] before anything is
//!   allocated; bodies are decoded exactly.
//! - [`Connection::listen`] keeps its stream open and yields [`ListenEvent`]s as the server
//!   pushes them.
//! - [`Connection::authenticate`] binds the connection to a client by signing a value
//!   exported from this connection's TLS session, so the signature is useless elsewhere.
//! - [`ReconnectingConnection`] re-establishes a lost connection with capped exponential
//!   backoff and re-runs a hook (typically re-authentication) on every new connection.
//!
//! # Several addresses
//!
//! A homeserver may run as several nodes behind one domain (same certificate, same AS key).
//! [`ConnectConfig::server_addrs`] lists them; [`Endpoint::connect`] tries them in order and
//! returns the first connection that succeeds. [`ReconnectingConnection`] starts from the
//! address that last worked, moves on to the next one when an attempt fails or its connection
//! is lost, and backs off only after every address failed once (a *round*).
//!
//! # Trust
//!
//! A server is trusted either by pinning its exact certificate
//! ([`TrustConfig::PinnedCertificates`], for self-signed homeserver certificates) or through a
//! CA ([`TrustConfig::Roots`], name = the domain). TLS is 1.3 only, with the ring provider.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use roost_client::transport::{ConnectConfig, Endpoint, TrustConfig};
//! use roost_protocol::messages::queue::QueueFetchRequest;
//!
//! let trust = TrustConfig::pinned_from_pem_file("server-cert.pem")?;
//! let config = ConnectConfig::new("127.0.0.1:4433".parse()?, "example.org", trust);
//! let endpoint = Endpoint::for_servers(&config.server_addrs)?;
//! let connection = endpoint.connect(&config).await?;
//! let fetched = connection
//!     .call(QueueFetchRequest { after_seq: 0, max_messages: 100, max_bytes: 1 << 20 })
//!     .await?;
//! println!("{} messages", fetched.messages.len());
//! # Ok(())
//! # }
//! ```
//!
//! [`ListenEvent`]: roost_protocol::messages::queue::ListenEvent

mod blob;
mod connection;
mod error;
mod listen;
mod reconnect;
mod tls;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use roost_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use tracing::Instrument;

pub use blob::{BlobDownload, BlobUpload};
pub use connection::Connection;
pub use error::{RequestError, TransportError};
pub use listen::ListenStream;
pub use reconnect::{Backoff, ReconnectingConnection};
pub use tls::{ClientIdentity, TrustConfig, load_certificates_pem, load_private_key_pem};

/// Requested size of the UDP socket buffers. Without it the kernel default (about 200 KiB)
/// drops packets under load. The kernel may grant less; that is not an error.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Per-stream receive window cap.
const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// How to reach and trust one server, and the limits of connections to it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectConfig {
    /// The server's UDP addresses, tried in this order: the nodes of one homeserver, which all
    /// present a certificate that [`ConnectConfig::trust`] accepts. Connecting with an empty
    /// list is a [`TransportError::Config`].
    pub server_addrs: Vec<SocketAddr>,
    /// The server's domain: sent as SNI and checked against the certificate (with
    /// [`TrustConfig::Roots`]).
    pub server_name: String,
    /// How the server's certificate is trusted.
    pub trust: TrustConfig,
    /// The application protocol (default [`roost_protocol::ALPN_CLIENT`]).
    pub alpn: Vec<u8>,
    /// A TLS client certificate to present (mutual TLS between homeservers).
    pub client_identity: Option<ClientIdentity>,
    /// Largest response frame body accepted (default [`DEFAULT_MAX_FRAME_LEN`]).
    pub max_frame_len: u32,
    /// The connection is closed after this long without any packet (default 30 s).
    pub idle_timeout: Duration,
    /// Send keep-alive packets this often while the connection is idle (default 10 s), so a
    /// healthy but quiet connection (e.g. a listen stream) stays open.
    pub keep_alive_interval: Option<Duration>,
    /// Limit for the handshake (default 10 s).
    pub connect_timeout: Duration,
    /// Limit for one request, from opening its stream to its complete response (default 30 s).
    /// Listen streams use it for the first response only.
    pub request_timeout: Duration,
    /// Connection-wide receive window in bytes (default 16 MiB): how much the server may have
    /// in flight towards us over all streams together.
    pub receive_window: u32,
}

impl ConnectConfig {
    /// A client configuration with the defaults, for a server at one address.
    pub fn new(
        server_addr: SocketAddr,
        server_name: impl Into<String>,
        trust: TrustConfig,
    ) -> Self {
        Self::with_addrs([server_addr], server_name, trust)
    }

    /// A client configuration with the defaults, for a server reachable at several addresses
    /// (tried in this order).
    pub fn with_addrs(
        server_addrs: impl IntoIterator<Item = SocketAddr>,
        server_name: impl Into<String>,
        trust: TrustConfig,
    ) -> Self {
        Self {
            server_addrs: server_addrs.into_iter().collect(),
            server_name: server_name.into(),
            trust,
            alpn: roost_protocol::ALPN_CLIENT.to_vec(),
            client_identity: None,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_secs(10)),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            receive_window: 16 * 1024 * 1024,
        }
    }

    /// A server-to-server configuration: ALPN [`roost_protocol::ALPN_FEDERATION`] and the
    /// homeserver's own certificate as client identity.
    pub fn federation(
        server_addr: SocketAddr,
        server_name: impl Into<String>,
        trust: TrustConfig,
        identity: ClientIdentity,
    ) -> Self {
        let mut config = Self::new(server_addr, server_name, trust);
        config.alpn = roost_protocol::ALPN_FEDERATION.to_vec();
        config.client_identity = Some(identity);
        config
    }

    fn quinn_client_config(&self) -> Result<quinn::ClientConfig, TransportError> {
        let tls = tls::client_config(&self.trust, self.client_identity.as_ref(), &self.alpn)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|err| TransportError::Config(err.to_string()))?;
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TransportError::Config("idle timeout out of range".into()))?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive_interval)
            .receive_window(quinn::VarInt::from_u32(self.receive_window))
            .stream_receive_window(quinn::VarInt::from_u32(
                self.receive_window.min(STREAM_RECEIVE_WINDOW),
            ))
            // Only the client opens streams.
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// A local QUIC endpoint (one UDP socket) that opens connections to servers.
///
/// Cloning is cheap and shares the socket. Must be created inside a tokio runtime.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
}

impl Endpoint {
    /// Binds the unspecified address of `server`'s address family (`0.0.0.0:0` or `[::]:0`).
    /// An IPv6 endpoint is made dual-stack where the system allows it.
    pub fn for_server(server: SocketAddr) -> Result<Self, TransportError> {
        Self::for_servers(&[server])
    }

    /// Binds an endpoint that can reach all of `servers`: `[::]:0` (dual-stack where the
    /// system allows it) if any of them is IPv6, else `0.0.0.0:0`.
    pub fn for_servers(servers: &[SocketAddr]) -> Result<Self, TransportError> {
        let local = if servers.iter().any(SocketAddr::is_ipv6) {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        };
        Self::bind(local)
    }

    /// Binds `local`, with 4 MiB socket buffers where the kernel allows.
    pub fn bind(local: SocketAddr) -> Result<Self, TransportError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::Config(
                "an endpoint must be created inside a tokio runtime".into(),
            ));
        }
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(local),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if local.is_ipv6()
            && let Err(err) = socket.set_only_v6(false)
        {
            tracing::debug!(%err, "cannot make the socket dual-stack");
        }
        if let Err(err) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
            tracing::debug!(%err, "cannot enlarge the UDP receive buffer");
        }
        if let Err(err) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
            tracing::debug!(%err, "cannot enlarge the UDP send buffer");
        }
        socket.set_nonblocking(true)?;
        socket.bind(&local.into())?;
        let inner = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket.into(),
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Self { inner })
    }

    /// Connects to the first of [`ConnectConfig::server_addrs`] that completes the handshake,
    /// trying each in order, each within [`ConnectConfig::connect_timeout`].
    ///
    /// If every address fails, the error is that of the last one, except that a failure that
    /// may pass ([`TransportError::is_transient`]) wins over one that will not: while some node
    /// is merely unreachable, retrying later is worthwhile. A configuration error is returned
    /// before any address is tried.
    pub async fn connect(&self, config: &ConnectConfig) -> Result<Connection, TransportError> {
        let client_config = config.quinn_client_config()?;
        let mut failure = Failure::default();
        for &addr in &config.server_addrs {
            match self.connect_addr(config, client_config.clone(), addr).await {
                Ok(connection) => return Ok(connection),
                Err(err) => failure.record(err),
            }
        }
        Err(failure.into_error())
    }

    /// One connection attempt to `addr`.
    pub(crate) async fn connect_addr(
        &self,
        config: &ConnectConfig,
        client_config: quinn::ClientConfig,
        addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        let span = tracing::debug_span!("connect", server = %config.server_name, %addr);
        async {
            let result = self.connect_inner(config, client_config, addr).await;
            match &result {
                Ok(_) => tracing::debug!("connected"),
                Err(err) => tracing::debug!(%err, "connect failed"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn connect_inner(
        &self,
        config: &ConnectConfig,
        client_config: quinn::ClientConfig,
        addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        let connecting = self
            .inner
            .connect_with(client_config, addr, &config.server_name)?;
        let inner = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Err(_) => return Err(TransportError::Timeout),
            Ok(Err(err)) => return Err(TransportError::from_handshake(err)),
            Ok(Ok(inner)) => inner,
        };
        let negotiated = inner
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol);
        if negotiated.as_deref() != Some(config.alpn.as_slice()) {
            inner.close(quinn::VarInt::from_u32(0), b"alpn");
            return Err(TransportError::AlpnMismatch);
        }
        Ok(Connection::new(
            inner,
            addr,
            config.max_frame_len,
            config.request_timeout,
        ))
    }

    /// The bound local address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.inner.local_addr()?)
    }

    /// Closes every connection of this endpoint at once.
    pub fn close(&self) {
        self.inner.close(quinn::VarInt::from_u32(0), b"closing");
    }

    /// Waits until every connection of this endpoint is fully closed (call after
    /// [`Endpoint::close`] so the peers learn of it before the process exits).
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

/// The failures of one pass over a server's addresses, reduced to the error to report: the
/// last one, but a transient failure wins over a permanent one (see [`Endpoint::connect`]).
#[derive(Debug)]
pub(crate) struct Failure<E> {
    error: Option<E>,
}

impl<E> Default for Failure<E> {
    fn default() -> Self {
        Self { error: None }
    }
}

/// What [`Failure`] needs to know of an error.
pub(crate) trait Transient: From<TransportError> {
    fn transient(&self) -> bool;
}

impl Transient for TransportError {
    fn transient(&self) -> bool {
        self.is_transient()
    }
}

impl Transient for RequestError {
    fn transient(&self) -> bool {
        self.is_transient()
    }
}

impl<E: Transient> Failure<E> {
    pub(crate) fn record(&mut self, err: E) {
        let keep_previous = self
            .error
            .as_ref()
            .is_some_and(|previous| previous.transient() && !err.transient());
        if !keep_previous {
            self.error = Some(err);
        }
    }

    /// The error to report; with no address tried, a configuration error.
    pub(crate) fn into_error(self) -> E {
        self.error
            .unwrap_or_else(|| TransportError::Config("no server address configured".into()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let trust = TrustConfig::PinnedCertificates(Vec::new());
        let config = ConnectConfig::new("127.0.0.1:4433".parse().unwrap(), "example.org", trust);
        assert_eq!(config.alpn, roost_protocol::ALPN_CLIENT);
        assert_eq!(config.max_frame_len, DEFAULT_MAX_FRAME_LEN);
        assert_eq!(config.keep_alive_interval, Some(Duration::from_secs(10)));
        assert!(config.client_identity.is_none());
    }

    #[test]
    fn bind_outside_a_runtime_is_an_error_not_a_panic() {
        assert!(matches!(
            Endpoint::bind("127.0.0.1:0".parse().unwrap()),
            Err(TransportError::Config(_))
        ));
    }

    #[tokio::test]
    async fn endpoint_family_follows_the_server() {
        let v4 = Endpoint::for_server("192.0.2.1:4433".parse().unwrap()).unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
        assert_ne!(v4.local_addr().unwrap().port(), 0);
    }

    #[tokio::test]
    async fn endpoint_for_several_servers_takes_ipv6_if_any_needs_it() {
        let v4: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:4433".parse().unwrap();
        let endpoint = Endpoint::for_servers(&[v4, v4]).unwrap();
        assert!(endpoint.local_addr().unwrap().is_ipv4());
        // Binding [::] may fail on hosts without IPv6; only check the family when it works.
        if let Ok(endpoint) = Endpoint::for_servers(&[v4, v6]) {
            assert!(endpoint.local_addr().unwrap().is_ipv6());
        }
    }

    #[test]
    fn a_transient_failure_outweighs_later_permanent_ones() {
        let mut failure = Failure::<TransportError>::default();
        failure.record(TransportError::AlpnMismatch);
        failure.record(TransportError::Timeout);
        failure.record(TransportError::UntrustedCertificate("not pinned".into()));
        assert!(matches!(failure.into_error(), TransportError::Timeout));

        let mut failure = Failure::<TransportError>::default();
        failure.record(TransportError::Timeout);
        failure.record(TransportError::StreamReset(1));
        assert!(matches!(
            failure.into_error(),
            TransportError::StreamReset(1)
        ));

        let mut failure = Failure::<TransportError>::default();
        failure.record(TransportError::AlpnMismatch);
        assert!(matches!(failure.into_error(), TransportError::AlpnMismatch));

        let none = Failure::<TransportError>::default();
        assert!(matches!(none.into_error(), TransportError::Config(_)));
    }

    #[tokio::test]
    async fn connect_with_empty_pins_fails_before_sending() {
        let endpoint = Endpoint::for_server("127.0.0.1:9".parse().unwrap()).unwrap();
        let config = ConnectConfig::new(
            "127.0.0.1:9".parse().unwrap(),
            "localhost",
            TrustConfig::PinnedCertificates(Vec::new()),
        );
        assert!(matches!(
            endpoint.connect(&config).await,
            Err(TransportError::Config(_))
        ));
    }
}
