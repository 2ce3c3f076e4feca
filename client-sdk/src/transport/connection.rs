//! One QUIC connection to a server and the request/response exchange on it: one
//! bidirectional stream per request, one frame each way.

use std::fmt;
use std::time::Duration;

use roost_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame, frame_len};
use roost_protocol::messages::auth::{
    AuthenticateRequest, AuthenticateResponse, ConnectionAuthTbs, EXPORTER_LABEL, EXPORTER_LEN,
    LABEL_CONNECTION_AUTH, signing_input,
};
use roost_protocol::messages::federation::FederationRequest;
use roost_protocol::messages::{ClientRequest, Operation, Response};
use roost_protocol::{ClientId, Opaque};
use rustls::pki_types::CertificateDer;
use tracing::Instrument;

use super::error::{RequestError, TransportError};
use super::listen::ListenStream;

/// An open connection to a server. Cloning is cheap; clones share the connection, and every
/// request runs on its own stream, so clones can run requests concurrently.
#[derive(Clone)]
pub struct Connection {
    inner: quinn::Connection,
    server_addr: std::net::SocketAddr,
    max_frame_len: u32,
    request_timeout: Duration,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("remote", &self.inner.remote_address())
            .field("id", &self.inner.stable_id())
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn new(
        inner: quinn::Connection,
        server_addr: std::net::SocketAddr,
        max_frame_len: u32,
        request_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            server_addr,
            max_frame_len,
            request_timeout,
        }
    }

    pub(crate) fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Sends a request and returns the server's response, which may be
    /// [`Response::Error`]. See [`Connection::call`] for the typed form.
    pub async fn request(&self, request: &ClientRequest) -> Result<Response, TransportError> {
        let span = tracing::debug_span!("request", kind = request.kind().name());
        async {
            let frame = encode_frame(request)?;
            let body = self.exchange(&frame).await?;
            Ok(decode_body::<Response>(&body)?)
        }
        .instrument(span)
        .await
        .inspect_err(|err| tracing::debug!(%err, "request failed"))
    }

    /// Sends an operation's request and returns its typed response. An error answer of the
    /// server is [`RequestError::Server`].
    pub async fn call<O: Operation>(&self, op: O) -> Result<O::Response, RequestError> {
        let response = self.request(&op.into_request()).await?;
        match O::from_response(response) {
            Ok(response) => Ok(response),
            Err(Response::Error(err)) => Err(RequestError::Server(err)),
            Err(_) => Err(RequestError::UnexpectedResponse { expected: O::KIND }),
        }
    }

    /// Sends a server-to-server request (on a connection made with the federation ALPN).
    pub async fn request_federation(
        &self,
        request: &FederationRequest,
    ) -> Result<Response, TransportError> {
        let span = match request {
            FederationRequest::Forward(forward) => {
                tracing::debug_span!("federation", kind = forward.request.kind().name())
            }
            FederationRequest::Deliver(deliver) => {
                tracing::debug_span!(
                    "federation",
                    kind = "Deliver",
                    count = deliver.deliveries.len()
                )
            }
            FederationRequest::BlobDownload(_) => {
                tracing::debug_span!("federation", kind = "BlobDownload")
            }
        };
        async {
            let frame = encode_frame(request)?;
            let body = self.exchange(&frame).await?;
            Ok(decode_body::<Response>(&body)?)
        }
        .instrument(span)
        .await
        .inspect_err(|err| tracing::debug!(%err, "federation request failed"))
    }

    /// Writes arbitrary bytes on a fresh stream, finishes it, and returns the body of the
    /// response frame undecoded. For tests of how a server treats hostile input.
    pub async fn request_raw(&self, bytes: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.exchange(bytes)
            .instrument(tracing::debug_span!("request", kind = "raw"))
            .await
    }

    /// Opens a bare bidirectional stream and writes nothing: for tests that misbehave below
    /// the frame level (trickle a request byte by byte, never finish). Everything else uses
    /// [`Connection::request`] and friends.
    pub async fn open_raw_stream(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        Ok(self.inner.open_bi().await?)
    }

    /// The value exported from this connection's TLS session for connection authentication
    /// (label [`EXPORTER_LABEL`], empty context). Both ends of one connection get the same
    /// value; any other connection gets another.
    pub fn export_auth_exporter(&self) -> Result<[u8; EXPORTER_LEN], TransportError> {
        let mut out = [0u8; EXPORTER_LEN];
        self.inner
            .export_keying_material(&mut out, EXPORTER_LABEL, &[])
            .map_err(|_| TransportError::KeyingMaterial)?;
        Ok(out)
    }

    /// The exact bytes `client` signs to authenticate this connection:
    /// `SignContent("connection auth", ConnectionAuthTbs { client, exporter })`.
    pub fn auth_signing_input(&self, client: &ClientId) -> Result<Vec<u8>, TransportError> {
        let tbs = ConnectionAuthTbs {
            client: client.clone(),
            exporter: Opaque::from(&self.export_auth_exporter()?[..]),
        };
        Ok(signing_input(LABEL_CONNECTION_AUTH, &tbs))
    }

    /// Authenticates this connection as `client`: `sign` receives
    /// [`Connection::auth_signing_input`] and returns the client key's signature over it.
    /// Every later request on this connection acts as that client.
    pub async fn authenticate(
        &self,
        client: &ClientId,
        sign: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> Result<AuthenticateResponse, RequestError> {
        let input = self.auth_signing_input(client)?;
        let signature = sign(&input);
        self.call(AuthenticateRequest {
            client: client.clone(),
            signature: Opaque::new(signature),
        })
        .await
    }

    /// Opens a listen stream on the authenticated client's queue, for messages with
    /// `seq > after_seq`.
    pub async fn listen(&self, after_seq: u64) -> Result<ListenStream, RequestError> {
        ListenStream::open(
            &self.inner,
            after_seq,
            self.max_frame_len,
            self.request_timeout,
        )
        .instrument(tracing::debug_span!("listen", after_seq))
        .await
    }

    /// Closes the connection; running requests fail with [`TransportError::ConnectionLost`].
    pub fn close(&self) {
        self.inner.close(quinn::VarInt::from_u32(0), b"closed");
    }

    /// Whether the connection is still usable (not closed by either side, not timed out).
    pub fn is_open(&self) -> bool {
        self.inner.close_reason().is_none()
    }

    /// Waits until the connection is closed and returns why.
    pub async fn closed(&self) -> TransportError {
        TransportError::ConnectionLost(self.inner.closed().await)
    }

    /// The server's address, as the UDP socket sees it (IPv4-mapped on a dual-stack
    /// endpoint).
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.inner.remote_address()
    }

    /// The address this connection was made to, as listed in
    /// [`ConnectConfig::server_addrs`](super::ConnectConfig::server_addrs).
    pub fn server_addr(&self) -> std::net::SocketAddr {
        self.server_addr
    }

    /// The certificate chain the server presented, end-entity first.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.inner
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()
            .map(|certs| *certs)
    }

    /// One request stream: write `frame`, finish, read exactly one response frame, all within
    /// the request timeout.
    async fn exchange(&self, frame: &[u8]) -> Result<Vec<u8>, TransportError> {
        tokio::time::timeout(self.request_timeout, async {
            let (mut send, mut recv) = self.inner.open_bi().await?;
            let written = async {
                send.write_all(frame).await?;
                send.finish()?;
                Ok::<_, TransportError>(())
            }
            .await;
            match written {
                Ok(()) => read_response(&mut recv, self.max_frame_len).await,
                // The server may refuse the rest of a request (too large, too slow) and still
                // explain why in its response.
                Err(TransportError::StreamStopped(code)) => {
                    read_response(&mut recv, self.max_frame_len)
                        .await
                        .map_err(|_| TransportError::StreamStopped(code))
                }
                Err(err) => Err(err),
            }
        })
        .await
        .map_err(|_| TransportError::Timeout)?
    }
}

/// Reads the single response frame of a request stream and the end of the stream: the header
/// is checked against `max_frame_len` before the body is read, the body must be complete, and
/// nothing may follow it.
async fn read_response(
    recv: &mut quinn::RecvStream,
    max_frame_len: u32,
) -> Result<Vec<u8>, TransportError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let len = frame_len(header, max_frame_len)?;
    let body = recv.read_to_end(len).await?;
    if body.len() != len {
        return Err(roost_protocol::frame::FrameError::Truncated.into());
    }
    Ok(body)
}
