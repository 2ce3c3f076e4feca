//! [`ClientError`]: every way a [`Client`](crate::Client) operation can fail.

use std::path::PathBuf;

use roost_protocol::{ClientId, ErrorCode, GroupId, UserId};

use crate::mls::MlsError;
use crate::store::StoreError;
use crate::transport::{RequestError, TransportError};

/// A failed [`Client`](crate::Client) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The homeserver refused the request, or the request or its answer was lost.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The profile database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An MLS operation failed (the message or state was not acceptable to openmls).
    #[error("MLS: {0}")]
    Mls(String),
    /// There is already a profile at this path (use [`Client::open`](crate::Client::open)).
    #[error("a profile exists already at {}", .0.display())]
    ProfileExists(PathBuf),
    /// The profile at this path is open in another [`Client`](crate::Client), in this process
    /// or another (an app and its notification extension, say): one client at a time; close
    /// the other first.
    #[error("the profile at {} is in use by another client", .0.display())]
    ProfileInUse(PathBuf),
    /// There is no profile at this path (register or add a device first).
    #[error("no profile at {}", .0.display())]
    NoProfile(PathBuf),
    /// The user's domain is not the homeserver's.
    #[error("{user} is not a user of {server}")]
    WrongDomain {
        /// The user.
        user: UserId,
        /// The configured homeserver domain.
        server: String,
    },
    /// This client has no state for the group (never joined, removed, or left).
    #[error("not a member of {0}")]
    UnknownGroup(GroupId),
    /// This device does not hold the user key.
    #[error("this device does not hold the user key")]
    NoUserKey,
    /// A credential did not check out against the AS (RFC 9420 §5.3.1).
    #[error("credential of {} rejected: {reason}", client.as_ref().map(ToString::to_string).unwrap_or_else(|| "an unknown client".into()))]
    CredentialRejected {
        /// The client the credential claims to be, if it decoded.
        client: Option<ClientId>,
        /// Why.
        reason: String,
    },
    /// The operation is not possible in the group's current state (e.g. removing yourself:
    /// use [`Client::leave_group`](crate::Client::leave_group)).
    #[error("{0}")]
    InvalidOperation(String),
    /// This client asked to leave the group ([`Client::leave_group`](crate::Client::leave_group)):
    /// it sends nothing more there, and the group goes when a member commits the removal.
    #[error("this client left the group {0}")]
    LeftGroup(GroupId),
    /// Reading a file to send or writing a downloaded one failed.
    #[error("file: {0}")]
    Io(String),
    /// A downloaded attachment is not what the message said: its hash, size or a chunk's
    /// authentication does not match. Nothing of it should be used.
    #[error("attachment rejected: {0}")]
    AttachmentCorrupt(String),
    /// A commit kept losing against concurrent commits.
    #[error("the commit lost against concurrent commits {0} times")]
    TooManyAttempts(u32),
}

impl From<TransportError> for ClientError {
    fn from(err: TransportError) -> Self {
        ClientError::Request(RequestError::Transport(err))
    }
}

impl From<MlsError> for ClientError {
    fn from(err: MlsError) -> Self {
        match err {
            MlsError::Storage(err) => ClientError::Store(StoreError::Database(err.to_string())),
            other => ClientError::Mls(other.to_string()),
        }
    }
}

impl ClientError {
    /// The server's error code, if the server refused the request.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Request(err) => err.wire_error().map(|e| e.code),
            _ => None,
        }
    }
}
