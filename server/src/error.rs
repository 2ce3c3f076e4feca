//! Service errors and the one place where they become wire error codes. Clients get a code
//! and a short reason; details go to the log.

use std::time::Duration;

use roost_protocol::{ErrorCode, ErrorDetail, WireError};

use crate::storage::StoreError;

/// The wait an UNAVAILABLE answer caused by storage suggests (detail `RateLimited`): about the
/// longest pause between two attempts to reopen a failed database.
pub const STORE_RETRY_AFTER_MS: u64 = 1000;

/// Why a request was refused. Every variant maps to exactly one [`ErrorCode`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    // General.
    /// The request needs an authenticated client.
    #[error("connection is not authenticated")]
    Unauthenticated,
    /// The caller may not do this.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// Too many requests.
    #[error("rate limited")]
    RateLimited(Duration),
    /// A request kind that is not valid here.
    #[error("{0}")]
    WrongStream(&'static str),
    /// A configured limit.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// An id of a domain this server does not serve or federate with.
    #[error("unknown domain {0}")]
    UnknownDomain(String),
    /// The homeserver of a domain could not be reached.
    #[error("homeserver of {0} unreachable")]
    PeerUnreachable(String),
    /// The server is shutting down.
    #[error("server unavailable")]
    Unavailable,
    /// Storage failed; nothing was written.
    #[error("storage failure")]
    Store(#[from] StoreError),
    /// A bug or impossible state; nothing was written.
    #[error("internal error: {0}")]
    Internal(String),
    /// A group's stored state moved on since this node loaded it (another node of the domain
    /// wrote it); nothing was written. The Delivery Service reloads and retries; should it
    /// still escape, the client sees UNAVAILABLE and retries.
    #[error("group state moved on; retry")]
    GroupMoved,

    // Authentication Service.
    /// The user exists.
    #[error("user exists")]
    UserExists,
    /// No such user, or no clients.
    #[error("user not found")]
    UserNotFound,
    /// The device name is taken or was used before.
    #[error("device name already used")]
    ClientExists,
    /// No such (active) client.
    #[error("client not found")]
    ClientNotFound,
    /// A signature did not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A key is not an Ed25519 public key.
    #[error("invalid public key")]
    BadKey,
    /// Registration needs a (valid, unused) token.
    #[error("a valid registration token is required")]
    RegistrationTokenRequired,
    /// The connection is authenticated as another client.
    #[error("connection already authenticated as another client")]
    AlreadyAuthenticated,

    // KeyPackage service.
    /// A KeyPackage failed validation.
    #[error("invalid KeyPackage: {0}")]
    InvalidKeyPackage(String),
    /// Nothing to hand out.
    #[error("no KeyPackage available")]
    NoKeyPackage,

    // Queuing Service.
    /// The queue is full.
    #[error("queue full")]
    QueueFull,

    // Delivery Service.
    /// The group exists.
    #[error("group exists")]
    GroupExists,
    /// No such group.
    #[error("group not found")]
    GroupNotFound,
    /// The sender is not a member.
    #[error("not a member of the group")]
    NotMember,
    /// The epoch already has its commit.
    #[error("stale epoch: the group is at epoch {0}")]
    StaleEpoch(u64),
    /// The group has not reached that epoch.
    #[error("future epoch: the group is at epoch {0}")]
    FutureEpoch(u64),
    /// A SendCounted's counter is not above the highest accepted from the sender in the
    /// group (the value).
    #[error("send counter used: the highest accepted is {0}")]
    SendCounterUsed(u64),
    /// The commit failed validation.
    #[error("invalid commit: {0}")]
    InvalidCommit(String),
    /// The GroupInfo or tree failed validation.
    #[error("invalid GroupInfo: {0}")]
    InvalidGroupInfo(String),
    /// A GroupInfo sent to the DS carries the `ratchet_tree` extension.
    #[error("the GroupInfo must not carry the ratchet_tree extension (the DS serves the tree)")]
    GroupInfoHasRatchetTree,
    /// A GroupInfo sent to the DS lacks the `external_pub` extension.
    #[error("the GroupInfo must carry the external_pub extension (members rejoin with it)")]
    GroupInfoWithoutExternalPub,
    /// Adds without a Welcome.
    #[error("the commit adds members but carries no Welcome")]
    MissingWelcome,
    /// Wrong or malformed MLS message.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// Over the group size limit.
    #[error("group too large")]
    GroupTooLarge,
    /// Pending proposals not committed.
    #[error("the commit does not include every pending proposal")]
    MissingProposals,

    // General, for streamed requests.
    #[error("the request's bytes stopped arriving")]
    RequestTimeout,
    #[error("the stream was cut")]
    StreamCut,

    // Blob service.
    #[error("no such blob")]
    BlobNotFound,
    #[error("blob larger than the server's maximum")]
    BlobTooLarge,
    #[error("blob quota exceeded")]
    BlobQuotaExceeded,
    #[error("the uploaded bytes do not match the declared size")]
    BlobSizeMismatch,
    #[error("range starts past the end of the blob ({0} bytes)")]
    BlobRangeNotSatisfiable(u64),
    // Push notifications.
    /// The push endpoint is malformed, not https, or in a forbidden address range.
    #[error("push endpoint rejected: {0}")]
    PushEndpointRejected(String),
    /// The server does not send to this provider.
    #[error("this server does not send to that push provider")]
    PushProviderDisabled,
}

impl ServiceError {
    /// The wire form. The reason is the Display text, which never carries secrets.
    pub fn to_wire(&self) -> WireError {
        use ServiceError::*;
        let code = match self {
            Unauthenticated => ErrorCode::UNAUTHENTICATED,
            Forbidden(_) => ErrorCode::FORBIDDEN,
            RateLimited(after) => {
                return WireError::with_detail(
                    ErrorCode::RATE_LIMITED,
                    self.to_string(),
                    ErrorDetail::RateLimited {
                        retry_after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1),
                    },
                );
            }
            WrongStream(_) => ErrorCode::WRONG_STREAM,
            LimitExceeded(_) => ErrorCode::LIMIT_EXCEEDED,
            UnknownDomain(_) => ErrorCode::UNKNOWN_DOMAIN,
            Store(StoreError::Unavailable | StoreError::Io(_)) => {
                // The storage is down or being reopened: a retry after the wait can succeed.
                return WireError::with_detail(
                    ErrorCode::UNAVAILABLE,
                    "storage unavailable",
                    ErrorDetail::RateLimited {
                        retry_after_ms: STORE_RETRY_AFTER_MS,
                    },
                );
            }
            Unavailable | GroupMoved => ErrorCode::UNAVAILABLE,
            PeerUnreachable(_) => ErrorCode::PEER_UNREACHABLE,
            Store(_) | Internal(_) => {
                // Details stay in the log.
                return WireError::new(ErrorCode::INTERNAL, "internal error");
            }
            UserExists => ErrorCode::USER_EXISTS,
            UserNotFound => ErrorCode::USER_NOT_FOUND,
            ClientExists => ErrorCode::CLIENT_EXISTS,
            ClientNotFound => ErrorCode::CLIENT_NOT_FOUND,
            BadSignature => ErrorCode::BAD_SIGNATURE,
            BadKey => ErrorCode::BAD_KEY,
            RegistrationTokenRequired => ErrorCode::REGISTRATION_TOKEN_REQUIRED,
            AlreadyAuthenticated => ErrorCode::ALREADY_AUTHENTICATED,
            InvalidKeyPackage(_) => ErrorCode::INVALID_KEY_PACKAGE,
            NoKeyPackage => ErrorCode::NO_KEY_PACKAGE,
            QueueFull => ErrorCode::QUEUE_FULL,
            GroupExists => ErrorCode::GROUP_EXISTS,
            GroupNotFound => ErrorCode::GROUP_NOT_FOUND,
            NotMember => ErrorCode::NOT_MEMBER,
            StaleEpoch(current) => {
                return WireError::with_detail(
                    ErrorCode::STALE_EPOCH,
                    self.to_string(),
                    ErrorDetail::StaleEpoch {
                        current_epoch: *current,
                    },
                );
            }
            FutureEpoch(_) => ErrorCode::FUTURE_EPOCH,
            SendCounterUsed(highest) => {
                return WireError::with_detail(
                    ErrorCode::SEND_COUNTER_USED,
                    self.to_string(),
                    ErrorDetail::SendCounterUsed {
                        highest_counter: *highest,
                    },
                );
            }
            InvalidCommit(_) => ErrorCode::INVALID_COMMIT,
            InvalidGroupInfo(_) => ErrorCode::INVALID_GROUP_INFO,
            GroupInfoHasRatchetTree => ErrorCode::GROUP_INFO_HAS_RATCHET_TREE,
            GroupInfoWithoutExternalPub => ErrorCode::GROUP_INFO_WITHOUT_EXTERNAL_PUB,
            MissingWelcome => ErrorCode::MISSING_WELCOME,
            InvalidMessage(_) => ErrorCode::INVALID_MESSAGE,
            GroupTooLarge => ErrorCode::GROUP_TOO_LARGE,
            MissingProposals => ErrorCode::MISSING_PROPOSALS,
            RequestTimeout => ErrorCode::REQUEST_TIMEOUT,
            StreamCut => ErrorCode::MALFORMED,
            BlobNotFound => ErrorCode::BLOB_NOT_FOUND,
            BlobTooLarge => ErrorCode::BLOB_TOO_LARGE,
            BlobQuotaExceeded => ErrorCode::BLOB_QUOTA_EXCEEDED,
            BlobSizeMismatch => ErrorCode::BLOB_SIZE_MISMATCH,
            BlobRangeNotSatisfiable(_) => ErrorCode::BLOB_RANGE_NOT_SATISFIABLE,
            PushEndpointRejected(_) => ErrorCode::PUSH_ENDPOINT_REJECTED,
            PushProviderDisabled => ErrorCode::PUSH_PROVIDER_DISABLED,
        };
        WireError::new(code, self.to_string())
    }

    /// A short label for metrics.
    pub fn code(&self) -> ErrorCode {
        self.to_wire().code
    }
}
