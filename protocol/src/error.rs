//! Error codes and the error response. One list, append-only: a code is never reused or
//! renumbered. Codes are grouped by the service that returns them.

use std::fmt;

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::opaque::Opaque;

/// Maximum length of the public reason string of an error, in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// A stable numeric error code. Unknown codes (from a newer server) decode fine and are shown
/// by number.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, TlsSize, TlsSerialize, TlsDeserializeBytes,
)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($value);)*

            /// Every code this version defines, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code's name as written in docs/PROTOCOL.md, if this version knows it.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    // General (1-99).
    /// The frame body could not be decoded, or an id in it is invalid.
    MALFORMED = 1,
    /// The protocol version in the frame is not supported. Detail: `UnsupportedVersion`.
    UNSUPPORTED_VERSION = 2,
    /// The frame's length prefix exceeds the server's maximum. Detail: `FrameTooLarge`.
    FRAME_TOO_LARGE = 3,
    /// The request did not arrive completely within the per-request read deadline.
    REQUEST_TIMEOUT = 4,
    /// The request needs an authenticated client and the connection has not authenticated.
    UNAUTHENTICATED = 5,
    /// The authenticated party may not do this (someone else's queue, a peer speaking for
    /// another domain's user, ...).
    FORBIDDEN = 6,
    /// Too many requests of this kind. Detail: `RateLimited`.
    RATE_LIMITED = 7,
    /// The request is not valid on this kind of stream or connection.
    WRONG_STREAM = 8,
    /// The server failed; nothing was changed. Safe to retry.
    INTERNAL = 9,
    /// The server is shutting down or overloaded. Safe to retry.
    UNAVAILABLE = 10,
    /// A limit of the server (size, count) was exceeded. The reason names the limit.
    LIMIT_EXCEEDED = 11,
    /// An id names a domain this server neither is nor federates with.
    UNKNOWN_DOMAIN = 12,

    // Authentication Service (100-199).
    /// The user already exists.
    USER_EXISTS = 100,
    /// No such user (or the user has no clients).
    USER_NOT_FOUND = 101,
    /// The device name is taken or was used before by this user.
    CLIENT_EXISTS = 102,
    /// No such client.
    CLIENT_NOT_FOUND = 103,
    /// A signature did not verify.
    BAD_SIGNATURE = 104,
    /// Registration needs a valid registration token.
    REGISTRATION_TOKEN_REQUIRED = 105,
    /// A public key is not a valid Ed25519 key.
    BAD_KEY = 106,
    /// The connection is already authenticated as another client.
    ALREADY_AUTHENTICATED = 107,

    // KeyPackage service (200-299).
    /// A KeyPackage failed validation (signature, ciphersuite, lifetime, credential).
    INVALID_KEY_PACKAGE = 200,
    /// The target has no KeyPackage left and no last-resort one.
    NO_KEY_PACKAGE = 201,

    // Queuing Service (300-399).
    /// The recipient's queue is at its depth limit.
    QUEUE_FULL = 300,

    // Delivery Service (400-499).
    /// A group with this id exists already.
    GROUP_EXISTS = 400,
    /// No such group.
    GROUP_NOT_FOUND = 401,
    /// The sender is not a current member of the group.
    NOT_MEMBER = 402,
    /// The commit is for an epoch that already has a commit. Detail: `StaleEpoch`.
    STALE_EPOCH = 403,
    /// The message is for an epoch the group has not reached.
    FUTURE_EPOCH = 404,
    /// The commit failed validation (signature, proposals, tree).
    INVALID_COMMIT = 405,
    /// The GroupInfo or ratchet tree failed validation.
    INVALID_GROUP_INFO = 406,
    /// The commit adds members but carries no Welcome.
    MISSING_WELCOME = 407,
    /// The MLS message is malformed or of the wrong kind for this request.
    INVALID_MESSAGE = 408,
    /// The commit would make the group larger than the server's limit.
    GROUP_TOO_LARGE = 409,
    /// The commit does not include all pending proposals of its epoch.
    MISSING_PROPOSALS = 410,
    /// A GroupInfo sent to the DS carries the `ratchet_tree` extension (the DS serves the tree).
    GROUP_INFO_HAS_RATCHET_TREE = 411,
    /// A GroupInfo sent to the DS lacks the `external_pub` extension (members could not rejoin).
    GROUP_INFO_WITHOUT_EXTERNAL_PUB = 412,
    /// A SendCounted whose counter is not above the highest the hub accepted from this sender
    /// in this group: the sender's state is older than what it sent before (a restored copy).
    /// Detail: `SendCounterUsed`.
    SEND_COUNTER_USED = 413,

    // Federation (500-599).
    /// The homeserver of that domain could not be reached. Safe to retry.
    PEER_UNREACHABLE = 500,
    /// The peer's certificate does not match the domain it speaks for.
    DOMAIN_MISMATCH = 501,

    // Blob service (600-619).
    /// No blob with this address and read token (unknown, expired, or a wrong token: the two
    /// are not told apart).
    BLOB_NOT_FOUND = 600,
    /// The declared size exceeds the server's per-blob maximum.
    BLOB_TOO_LARGE = 601,
    /// The upload would take the user's stored blobs over their quota.
    BLOB_QUOTA_EXCEEDED = 602,
    /// The uploaded bytes are more or fewer than the declared size; nothing was stored.
    BLOB_SIZE_MISMATCH = 603,
    /// The requested range starts past the end of the blob.
    BLOB_RANGE_NOT_SATISFIABLE = 604,
    // Push notifications (620-639).
    /// The push endpoint is malformed, not `https`, or resolves to an address range the server
    /// refuses to connect to. Nothing was stored.
    PUSH_ENDPOINT_REJECTED = 620,
    /// The server does not send to this push provider.
    PUSH_PROVIDER_DISABLED = 621,
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "ErrorCode({})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Typed detail a client acts on.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub enum ErrorDetail {
    /// No detail.
    #[tls_codec(discriminant = 0)]
    None,
    /// The group's current epoch: process the messages up to it, then retry.
    #[tls_codec(discriminant = 1)]
    StaleEpoch {
        /// The DS's current epoch of the group.
        current_epoch: u64,
    },
    /// Retry after this many milliseconds.
    #[tls_codec(discriminant = 2)]
    RateLimited {
        /// Suggested wait.
        retry_after_ms: u64,
    },
    /// The server's maximum frame length.
    #[tls_codec(discriminant = 3)]
    FrameTooLarge {
        /// Largest accepted frame body, in bytes.
        max_frame_len: u32,
    },
    /// The versions the server speaks.
    #[tls_codec(discriminant = 4)]
    UnsupportedVersion {
        /// Lowest supported version.
        min: u16,
        /// Highest supported version.
        max: u16,
    },
    /// The highest send counter the hub accepted from this sender in this group. Sent only in
    /// answer to SendCounted (a client that sends it knows this variant).
    #[tls_codec(discriminant = 5)]
    SendCounterUsed {
        /// Use a counter above it.
        highest_counter: u64,
    },
}

/// The error response: a code, a short public reason (UTF-8, at most
/// [`MAX_REASON_LEN`] bytes) and typed detail.
#[derive(Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct WireError {
    /// The stable code.
    pub code: ErrorCode,
    /// Short human-readable reason. Never contains secrets.
    pub reason: Opaque,
    /// Typed detail.
    pub detail: ErrorDetail,
}

impl WireError {
    /// An error without detail. The reason is cut to [`MAX_REASON_LEN`] bytes.
    pub fn new(code: ErrorCode, reason: impl AsRef<str>) -> Self {
        Self::with_detail(code, reason, ErrorDetail::None)
    }

    /// An error with detail.
    pub fn with_detail(code: ErrorCode, reason: impl AsRef<str>, detail: ErrorDetail) -> Self {
        let mut reason = reason.as_ref();
        if reason.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason = &reason[..end];
        }
        Self {
            code,
            reason: Opaque::from(reason.as_bytes()),
            detail,
        }
    }

    /// The reason as text (lossy if a peer sent invalid UTF-8).
    pub fn reason(&self) -> String {
        String::from_utf8_lossy(self.reason.as_slice()).into_owned()
    }
}

impl fmt::Debug for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireError")
            .field("code", &self.code)
            .field("reason", &self.reason())
            .field("detail", &self.detail)
            .finish()
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.reason())
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_sorted() {
        for pair in ErrorCode::ALL.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{:?} !< {:?}", pair[0], pair[1]);
        }
        assert_eq!(ErrorCode::STALE_EPOCH.name(), Some("STALE_EPOCH"));
        assert_eq!(ErrorCode(9999).name(), None);
    }

    #[test]
    fn reason_is_truncated_on_a_char_boundary() {
        let err = WireError::new(ErrorCode::INTERNAL, "é".repeat(200));
        assert!(err.reason.len() <= MAX_REASON_LEN);
        assert!(std::str::from_utf8(err.reason.as_slice()).is_ok());
    }
}
