//! Every request and response, one enum each, with the discriminants of docs/PROTOCOL.md.

pub mod auth;
pub mod blob;
pub mod delivery;
pub mod federation;
pub mod keypackage;
pub mod push;
pub mod queue;

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::error::WireError;
use auth::*;
use blob::*;
use delivery::*;
use federation::*;
use keypackage::*;
use push::*;
use queue::*;

/// Defines the request enum, the response enum, and the mapping between their kinds, from one
/// table so a request and its response always share a discriminant.
macro_rules! operations {
    ($($(#[$doc:meta])* $name:ident = $disc:literal : $req:ty => $resp:ty,)*) => {
        /// A request from a client to its homeserver (ALPN `roost/1`), or forwarded by a peer.
        #[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
        #[repr(u16)]
        pub enum ClientRequest {
            $($(#[$doc])* #[tls_codec(discriminant = $disc)] $name($req),)*
        }

        /// The response to a request: the operation's result, or an error.
        #[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
        #[repr(u16)]
        pub enum Response {
            /// The request failed; nothing was changed unless the code says otherwise.
            #[tls_codec(discriminant = 0)]
            Error(WireError),
            $($(#[$doc])* #[tls_codec(discriminant = $disc)] $name($resp),)*
            /// Result of a federation [`DeliverRequest`].
            #[tls_codec(discriminant = 1000)]
            Deliver(DeliverResponse),
        }

        /// The kind of a request, without its content (for logs, metrics and routing).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum RequestKind {
            $($(#[$doc])* $name = $disc,)*
        }

        impl RequestKind {
            /// Every kind, in discriminant order.
            pub const ALL: &'static [RequestKind] = &[$(RequestKind::$name,)*];

            /// The name used in docs/PROTOCOL.md, logs and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(RequestKind::$name => stringify!($name),)*
                }
            }
        }

        $(
            impl Operation for $req {
                type Response = $resp;
                const KIND: RequestKind = RequestKind::$name;

                fn into_request(self) -> ClientRequest {
                    ClientRequest::$name(self)
                }

                #[allow(clippy::result_large_err)]
                fn from_response(response: Response) -> Result<$resp, Response> {
                    match response {
                        Response::$name(r) => Ok(r),
                        other => Err(other),
                    }
                }
            }
        )*

        impl ClientRequest {
            /// The request's kind.
            pub fn kind(&self) -> RequestKind {
                match self {
                    $(ClientRequest::$name(_) => RequestKind::$name,)*
                }
            }
        }
    };
}

operations! {
    // Authentication Service.
    /// Register a user.
    RegisterUser = 1: RegisterUserRequest => RegisterUserResponse,
    /// Add a client to a user.
    AddClient = 2: AddClientRequest => AddClientResponse,
    /// Remove a client.
    RemoveClient = 3: RemoveClientRequest => RemoveClientResponse,
    /// User discovery.
    DiscoverUser = 4: DiscoverUserRequest => DiscoverUserResponse,
    /// AS verifying keys of a domain.
    AsKeys = 5: AsKeysRequest => AsKeysResponse,
    /// Authenticate the connection as a client.
    Authenticate = 6: AuthenticateRequest => AuthenticateResponse,
    // KeyPackage service.
    /// Upload KeyPackages.
    UploadKeyPackages = 20: UploadKeyPackagesRequest => UploadKeyPackagesResponse,
    /// Claim a KeyPackage for each client of a user.
    ClaimUserKeyPackages = 21: ClaimUserKeyPackagesRequest => ClaimUserKeyPackagesResponse,
    /// Claim a KeyPackage of one client.
    ClaimClientKeyPackage = 22: ClaimClientKeyPackageRequest => ClaimClientKeyPackageResponse,
    /// Count the caller's remaining KeyPackages.
    KeyPackageCount = 23: KeyPackageCountRequest => KeyPackageCountResponse,
    // Queuing Service.
    /// Fetch queued messages.
    QueueFetch = 40: QueueFetchRequest => QueueFetchResponse,
    /// Acknowledge (delete) queued messages.
    QueueAck = 41: QueueAckRequest => QueueAckResponse,
    /// Open a listen stream.
    QueueListen = 42: QueueListenRequest => QueueListenResponse,
    // Delivery Service.
    /// Create a group.
    CreateGroup = 60: CreateGroupRequest => CreateGroupResponse,
    /// Send a commit bundle.
    Commit = 61: CommitRequest => CommitResponse,
    /// Send an application message.
    SendMessage = 62: SendMessageRequest => SendMessageResponse,
    /// Leave a group.
    LeaveGroup = 63: LeaveGroupRequest => LeaveGroupResponse,
    /// Fetch GroupInfo and ratchet tree.
    FetchGroupInfo = 64: FetchGroupInfoRequest => FetchGroupInfoResponse,
    /// Join by external commit.
    ExternalJoin = 65: ExternalJoinRequest => CommitResponse,
    /// Send an application message with the sender's send counter.
    SendCounted = 66: SendCountedRequest => SendMessageResponse,
    // Blob service.
    /// Upload a blob (raw bytes follow the frame).
    BlobUpload = 80: BlobUploadRequest => BlobUploadResponse,
    /// Download (a range of) a blob (raw bytes follow the response frame).
    BlobDownload = 81: BlobDownloadRequest => BlobDownloadResponse,
    // Push notifications.
    /// Register the caller's push endpoint.
    RegisterPush = 90: RegisterPushRequest => RegisterPushResponse,
    /// Delete the caller's push endpoint.
    UnregisterPush = 91: UnregisterPushRequest => UnregisterPushResponse,
    /// The server's push providers and VAPID key.
    PushInfo = 92: PushInfoRequest => PushInfoResponse,
}

/// Ties a request type to its response type, for typed calls.
pub trait Operation: Sized {
    /// The successful response.
    type Response;
    /// The request kind.
    const KIND: RequestKind;
    /// Wraps the request into the request enum.
    fn into_request(self) -> ClientRequest;
    /// Extracts this operation's response; any other response (an error, or a response of
    /// another kind) is handed back.
    #[allow(clippy::result_large_err)]
    fn from_response(response: Response) -> Result<Self::Response, Response>;
}

impl Response {
    /// Turns an error response into `Err`.
    pub fn into_result(self) -> Result<Response, WireError> {
        match self {
            Response::Error(err) => Err(err),
            other => Ok(other),
        }
    }
}

impl From<WireError> for Response {
    fn from(err: WireError) -> Self {
        Response::Error(err)
    }
}
