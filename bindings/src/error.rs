//! [`RoostError`]: the one error type the foreign side sees, and the one place that maps the
//! SDK's errors to it.

use roost_client::ClientError;
use roost_client::transport::RequestError;

/// A failed call. Foreign languages see one exception/error type with a case per variant;
/// every case has a `message` for people (logs, never shown as the only UI).
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum RoostError {
    /// The homeserver refused the request. `code` is the stable wire error code
    /// (docs/PROTOCOL.md, "Error codes"); `code_name` its name there (e.g. `USER_EXISTS`), or
    /// `UNKNOWN` for a code newer than this library.
    #[error("server error {code_name} ({code}): {message}")]
    Server {
        /// The wire error code.
        code: u16,
        /// Its name in docs/PROTOCOL.md.
        code_name: String,
        /// The server's short reason.
        message: String,
    },
    /// The homeserver could not be reached, or the connection broke. `transient`: trying
    /// again later may succeed (a refused certificate, for one, is not transient).
    #[error("network: {message}")]
    Network {
        /// What went wrong.
        message: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// An argument is malformed (a user id without `@`, an unknown group id form, an
    /// unusable address, ...). Nothing was sent.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// Which argument and why.
        message: String,
    },
    /// There is already a profile at this path (open it instead).
    #[error("a profile exists already at {path}")]
    ProfileExists {
        /// The path.
        path: String,
    },
    /// The profile at this path is open in another client, in this process or another (an
    /// app and its notification extension, say): close that one first.
    #[error("the profile at {path} is in use by another client")]
    ProfileInUse {
        /// The path.
        path: String,
    },
    /// There is no profile at this path (register or add a device first).
    #[error("no profile at {path}")]
    NoProfile {
        /// The path.
        path: String,
    },
    /// This client is not a member of the group (never joined, removed, or the group is
    /// unknown).
    #[error("not a member of {group}")]
    NotAMember {
        /// The group.
        group: String,
    },
    /// This client left the group: it sends nothing more there.
    #[error("this client left the group {group}")]
    LeftGroup {
        /// The group.
        group: String,
    },
    /// This device does not hold the user key (needed to add or remove devices).
    #[error("this device does not hold the user key")]
    NoUserKey,
    /// A member credential did not check out against its AS credential.
    #[error("credential rejected: {message}")]
    CredentialRejected {
        /// The client concerned, if known.
        client: Option<String>,
        /// Why.
        message: String,
    },
    /// The operation is not possible now (e.g. removing yourself: leave the group instead; or
    /// `next_event` while an event listener is set).
    #[error("{message}")]
    InvalidOperation {
        /// Why.
        message: String,
    },
    /// The user's domain is not the homeserver's.
    #[error("{message}")]
    WrongDomain {
        /// Which user and which homeserver.
        message: String,
    },
    /// A commit kept losing against concurrent commits; try again.
    #[error("the commit lost against concurrent commits {attempts} times")]
    TooManyAttempts {
        /// How many times it was tried.
        attempts: u32,
    },
    /// The profile database failed (disk full, file damaged, ...).
    #[error("profile storage: {message}")]
    Storage {
        /// What went wrong.
        message: String,
    },
    /// An MLS operation failed (a message or state openmls refused).
    #[error("MLS: {message}")]
    Mls {
        /// What went wrong.
        message: String,
    },
    /// A file to send could not be read, or a downloaded one could not be written.
    #[error("file: {message}")]
    File {
        /// Which file and why.
        message: String,
    },
    /// A downloaded attachment is not what its message described (its hash, size or a
    /// chunk's authentication does not match): nothing of it was kept.
    #[error("attachment rejected: {message}")]
    AttachmentCorrupt {
        /// What did not match.
        message: String,
    },
    /// The client was closed ([`RoostClient::close`](crate::RoostClient::close)).
    #[error("the client is closed")]
    Closed,
    /// Anything else: a bug in roost (please report it with the message).
    #[error("internal error: {message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}

impl From<ClientError> for RoostError {
    fn from(err: ClientError) -> Self {
        let message = err.to_string();
        match err {
            ClientError::Request(RequestError::Server(wire)) => RoostError::Server {
                code: wire.code.0,
                code_name: wire.code.name().unwrap_or("UNKNOWN").to_owned(),
                message: String::from_utf8_lossy(wire.reason.as_slice()).into_owned(),
            },
            ClientError::Request(err @ RequestError::Transport(_)) => RoostError::Network {
                transient: err.is_transient(),
                message,
            },
            ClientError::Request(_) => RoostError::Internal { message },
            ClientError::Store(_) => RoostError::Storage { message },
            ClientError::Mls(message) => RoostError::Mls { message },
            ClientError::ProfileExists(path) => RoostError::ProfileExists {
                path: path.display().to_string(),
            },
            ClientError::ProfileInUse(path) => RoostError::ProfileInUse {
                path: path.display().to_string(),
            },
            ClientError::NoProfile(path) => RoostError::NoProfile {
                path: path.display().to_string(),
            },
            ClientError::WrongDomain { .. } => RoostError::WrongDomain { message },
            ClientError::UnknownGroup(group) => RoostError::NotAMember {
                group: group.to_string(),
            },
            ClientError::NoUserKey => RoostError::NoUserKey,
            ClientError::CredentialRejected { client, reason } => RoostError::CredentialRejected {
                client: client.map(|client| client.to_string()),
                message: reason,
            },
            ClientError::InvalidOperation(message) => RoostError::InvalidOperation { message },
            ClientError::LeftGroup(group) => RoostError::LeftGroup {
                group: group.to_string(),
            },
            ClientError::TooManyAttempts(attempts) => RoostError::TooManyAttempts { attempts },
            ClientError::Io(message) => RoostError::File { message },
            ClientError::AttachmentCorrupt(message) => RoostError::AttachmentCorrupt { message },
            _ => RoostError::Internal { message },
        }
    }
}

/// Parses an id argument (user, device, group) from its text form.
pub(crate) fn parse<T>(what: &str, text: &str) -> Result<T, RoostError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|err| RoostError::InvalidArgument {
        message: format!("{what} {text:?}: {err}"),
    })
}
