//! Errors of the request layer: [`TransportError`] for everything below the protocol (QUIC,
//! TLS, framing, decoding) and [`RequestError`] for typed calls, which adds the server's own
//! error answer and answers of the wrong kind.
//!
//! Conversions from quinn's error types live here, in one place, so every stream and
//! connection failure maps to the same variant wherever it happens.

use std::path::PathBuf;

use roost_protocol::WireError;
use roost_protocol::frame::{DecodeError, FrameError};
use roost_protocol::messages::RequestKind;

/// TLS alert codes that mean "the certificate was not accepted" (RFC 8446 §6.2):
/// bad_certificate, unsupported_certificate, certificate_revoked, certificate_expired,
/// certificate_unknown, unknown_ca.
const CERTIFICATE_ALERTS: [u8; 6] = [42, 43, 44, 45, 46, 48];

/// A failure of the transport: connecting, the QUIC connection or stream, framing or decoding.
///
/// Nothing a peer sends makes this layer panic; every bad input ends up as one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The configuration cannot be used (no pinned certificate, bad client key, a timeout out
    /// of range, no tokio runtime, ...).
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot load {}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The local UDP socket could not be set up.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The connection attempt could not even start (bad server name or address, endpoint
    /// closed).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The server's certificate was not accepted: not pinned, not issued by a trusted CA, not
    /// valid for the server name, expired, ...
    #[error("server certificate rejected: {0}")]
    UntrustedCertificate(String),
    /// The QUIC/TLS handshake failed for another reason (the peer refused us, no common ALPN,
    /// unreachable before the connect timeout's underlying idle timeout, ...).
    #[error("handshake failed: {0}")]
    Handshake(quinn::ConnectionError),
    /// The server selected another application protocol than the one asked for.
    #[error("the server did not agree to the application protocol")]
    AlpnMismatch,
    /// The connection is gone (closed by either side, timed out, reset).
    #[error("connection lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    /// The connect timeout or the request timeout expired.
    #[error("timed out")]
    Timeout,
    /// The peer reset the stream carrying our response, with this application error code.
    #[error("stream reset by the peer (code {0})")]
    StreamReset(u64),
    /// The peer stopped reading our request, with this application error code.
    #[error("the peer stopped reading the request (code {0})")]
    StreamStopped(u64),
    /// Another stream-level failure (a stream used after it was closed, 0-RTT rejected).
    #[error("stream error: {0}")]
    Stream(String),
    /// The response's framing is unacceptable: too large, or the stream ended inside it.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer sent bytes after the one response frame of a request stream.
    #[error("the peer sent data after the response frame")]
    TrailingData,
    /// The response body could not be decoded.
    #[error("cannot decode the response: {0}")]
    Decode(#[from] DecodeError),
    /// The TLS session refused to export keying material.
    #[error("keying material export failed")]
    KeyingMaterial,
}

impl TransportError {
    /// Whether the connection this error came from is unusable, so a new one is needed.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, TransportError::ConnectionLost(_))
    }

    /// Whether trying again later (on a new connection if need be) may succeed: the failure is
    /// about reachability or timing, not about configuration, trust or a misbehaving peer.
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::ConnectionLost(_)
            | TransportError::Timeout
            | TransportError::Io(_)
            | TransportError::StreamReset(_)
            | TransportError::StreamStopped(_) => true,
            TransportError::Handshake(err) => match err {
                quinn::ConnectionError::TimedOut
                | quinn::ConnectionError::Reset
                | quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::LocallyClosed => true,
                // A server that is shutting down or overloaded refuses new connections.
                quinn::ConnectionError::ConnectionClosed(close) => {
                    close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Classifies a handshake failure: a certificate alert that our own TLS stack raised means
    /// we did not trust the server.
    pub(crate) fn from_handshake(err: quinn::ConnectionError) -> Self {
        if let quinn::ConnectionError::TransportError(ref transport) = err {
            let is_cert_alert = CERTIFICATE_ALERTS
                .iter()
                .any(|alert| transport.code == quinn::TransportErrorCode::crypto(*alert));
            if is_cert_alert {
                return TransportError::UntrustedCertificate(transport.reason.clone());
            }
        }
        TransportError::Handshake(err)
    }
}

impl From<quinn::ConnectionError> for TransportError {
    fn from(err: quinn::ConnectionError) -> Self {
        TransportError::ConnectionLost(err)
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(err: quinn::WriteError) -> Self {
        match err {
            quinn::WriteError::Stopped(code) => TransportError::StreamStopped(code.into_inner()),
            quinn::WriteError::ConnectionLost(err) => TransportError::ConnectionLost(err),
            other => TransportError::Stream(other.to_string()),
        }
    }
}

impl From<quinn::ClosedStream> for TransportError {
    fn from(err: quinn::ClosedStream) -> Self {
        TransportError::Stream(err.to_string())
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(err: quinn::ReadError) -> Self {
        match err {
            quinn::ReadError::Reset(code) => TransportError::StreamReset(code.into_inner()),
            quinn::ReadError::ConnectionLost(err) => TransportError::ConnectionLost(err),
            other => TransportError::Stream(other.to_string()),
        }
    }
}

impl From<quinn::ReadExactError> for TransportError {
    fn from(err: quinn::ReadExactError) -> Self {
        match err {
            quinn::ReadExactError::FinishedEarly(_) => TransportError::Frame(FrameError::Truncated),
            quinn::ReadExactError::ReadError(err) => err.into(),
        }
    }
}

impl From<quinn::ReadToEndError> for TransportError {
    fn from(err: quinn::ReadToEndError) -> Self {
        match err {
            quinn::ReadToEndError::TooLong => TransportError::TrailingData,
            quinn::ReadToEndError::Read(err) => err.into(),
        }
    }
}

/// A failed typed request ([`Connection::call`](super::Connection::call) and friends).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The server answered with an error response.
    #[error("server error {0}")]
    Server(WireError),
    /// The request or its response was lost on the way.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server answered with a response of another kind than the request's.
    #[error("unexpected response to a {} request", expected.name())]
    UnexpectedResponse {
        /// The kind of the request that was sent.
        expected: RequestKind,
    },
}

impl RequestError {
    /// The server's error, if the server answered with one.
    pub fn wire_error(&self) -> Option<&WireError> {
        match self {
            RequestError::Server(err) => Some(err),
            _ => None,
        }
    }

    /// Whether trying again may succeed: a transient transport failure, or a server error whose
    /// code says so (`INTERNAL`, `UNAVAILABLE`, `RATE_LIMITED`, `PEER_UNREACHABLE`).
    pub fn is_transient(&self) -> bool {
        use roost_protocol::ErrorCode;
        match self {
            RequestError::Transport(err) => err.is_transient(),
            RequestError::Server(err) => [
                ErrorCode::INTERNAL,
                ErrorCode::UNAVAILABLE,
                ErrorCode::RATE_LIMITED,
                ErrorCode::PEER_UNREACHABLE,
            ]
            .contains(&err.code),
            RequestError::UnexpectedResponse { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_protocol::ErrorCode;

    #[test]
    fn handshake_timeouts_are_not_certificate_errors() {
        let err = TransportError::from_handshake(quinn::ConnectionError::TimedOut);
        assert!(matches!(
            err,
            TransportError::Handshake(quinn::ConnectionError::TimedOut)
        ));
        assert!(err.is_transient());
    }

    #[test]
    fn read_errors_map_to_typed_variants() {
        assert!(matches!(
            TransportError::from(quinn::ReadExactError::FinishedEarly(2)),
            TransportError::Frame(FrameError::Truncated)
        ));
        assert!(matches!(
            TransportError::from(quinn::ReadToEndError::TooLong),
            TransportError::TrailingData
        ));
        assert!(matches!(
            TransportError::from(quinn::ReadError::Reset(quinn::VarInt::from_u32(7))),
            TransportError::StreamReset(7)
        ));
        let lost = TransportError::from(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::TimedOut,
        ));
        assert!(lost.is_connection_lost() && lost.is_transient());
    }

    #[test]
    fn errors_can_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<TransportError>();
        send_sync::<RequestError>();
    }

    #[test]
    fn transient_server_errors() {
        let busy = RequestError::Server(WireError::new(ErrorCode::UNAVAILABLE, "busy"));
        assert!(busy.is_transient());
        let denied = RequestError::Server(WireError::new(ErrorCode::FORBIDDEN, "no"));
        assert!(!denied.is_transient());
        assert_eq!(
            denied.wire_error().map(|e| e.code),
            Some(ErrorCode::FORBIDDEN)
        );
    }
}
