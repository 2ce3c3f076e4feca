//! Server-to-server messages (ALPN `roost-fed/1`, mutual TLS). The peer's domain is the one
//! in its certificate; it may speak only for its own users and deliver only for its own groups.

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::ids::{ClientId, MessageId};
use crate::messages::ClientRequest;
use crate::messages::blob::BlobDownloadRequest;
use crate::messages::queue::QueuePayload;

/// A frame a homeserver sends to a peer on a request stream.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub enum FederationRequest {
    /// A client request forwarded by the client's homeserver.
    #[tls_codec(discriminant = 1)]
    Forward(ForwardRequest),
    /// Messages for queues of the receiving server, from a group hub.
    #[tls_codec(discriminant = 2)]
    Deliver(DeliverRequest),
    /// Download (a range of) a blob this server stores, for a client of the peer (proxy
    /// download). Answered like a client's `BlobDownload`: a response frame, then raw bytes.
    #[tls_codec(discriminant = 1010)]
    BlobDownload(BlobDownloadRequest),
}

/// A client request forwarded on behalf of `sender`.
///
/// Allowed requests: DiscoverUser, AsKeys, ClaimUserKeyPackages, ClaimClientKeyPackage (these
/// need the sender's domain only), Commit, SendMessage, LeaveGroup, FetchGroupInfo,
/// ExternalJoin (for groups the receiving server hosts). Anything else is `WRONG_STREAM`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ForwardRequest {
    /// The authenticated client on whose behalf the peer forwards; its domain must be the
    /// peer's. Absent for requests that do not act as a client (DiscoverUser, AsKeys).
    pub sender: Option<ClientId>,
    /// The request.
    pub request: ClientRequest,
}

/// A batch of queue deliveries.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct DeliverRequest {
    /// The deliveries; each recipient is a client of the receiving server and each payload's
    /// group is hosted by the sending peer.
    pub deliveries: Vec<Delivery>,
}

/// One message for one or more queues of the receiving server. The payload travels (and is
/// stored) once however many recipients of that server a group message has.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct Delivery {
    /// The recipients, in the order their queues are filled. The receiver refuses an empty
    /// list (FORBIDDEN) like a recipient of another domain.
    pub recipients: Vec<ClientId>,
    /// Idempotency key: a second delivery with the same id to the same recipient is
    /// acknowledged and ignored.
    pub id: MessageId,
    /// When the hub accepted the message (Unix milliseconds).
    pub timestamp_ms: u64,
    /// The content.
    pub payload: QueuePayload,
}

/// Result of [`DeliverRequest`]: every delivery is durably queued (or was already). The counts
/// are of (recipient, message) pairs.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct DeliverResponse {
    /// Deliveries newly queued (duplicates are not counted).
    pub accepted: u32,
    /// Deliveries dropped because their recipient does not exist (any more).
    pub unknown_recipients: u32,
    /// Deliveries refused because the recipient's queue is full; the hub does not retry them.
    pub queue_full: u32,
}
