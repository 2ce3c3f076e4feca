//! Queuing Service messages: fetch, ack, listen, and what a queue holds.

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::error::WireError;
use crate::ids::{GroupId, MessageId};
use crate::opaque::Opaque;

/// What a queue entry carries.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub enum QueuePayload {
    /// An `MLSMessage` of a group: a commit or proposal (PublicMessage) or an application
    /// message (PrivateMessage).
    #[tls_codec(discriminant = 1)]
    GroupMessage(GroupMessage),
    /// An `MLSMessage` carrying a Welcome to a group.
    #[tls_codec(discriminant = 2)]
    Welcome(GroupMessage),
}

impl QueuePayload {
    /// The group the payload belongs to.
    pub fn group(&self) -> &GroupId {
        match self {
            QueuePayload::GroupMessage(m) | QueuePayload::Welcome(m) => &m.group,
        }
    }
}

/// A message of a group.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct GroupMessage {
    /// The group.
    pub group: GroupId,
    /// The `MLSMessage`.
    pub message: Opaque,
}

/// One queue entry.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct QueueMessage {
    /// Position in the queue: strictly increasing, starting at 1, never reused.
    pub seq: u64,
    /// Id given by the hub that enqueued it.
    pub id: MessageId,
    /// When the hub accepted it (Unix milliseconds).
    pub timestamp_ms: u64,
    /// The content.
    pub payload: QueuePayload,
}

/// Fetch messages of the authenticated client's queue.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct QueueFetchRequest {
    /// Return messages with `seq > after_seq`.
    pub after_seq: u64,
    /// At most this many (the server may cap it lower).
    pub max_messages: u32,
    /// At most about this many payload bytes; at least one message is returned if any.
    pub max_bytes: u32,
}

/// Result of [`QueueFetchRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct QueueFetchResponse {
    /// In increasing `seq` order. A gap means messages expired.
    pub messages: Vec<QueueMessage>,
    /// The highest `seq` assigned in this queue so far (0 if none).
    pub head_seq: u64,
}

/// Delete the authenticated client's messages with `seq <= up_to_seq`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct QueueAckRequest {
    /// Acknowledge up to and including this seq.
    pub up_to_seq: u64,
}

/// Result of [`QueueAckRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct QueueAckResponse {}

/// Open a listen stream: after the response the server keeps the stream open and writes one
/// [`ListenEvent`] frame for every message with `seq > after_seq`, old ones first, then each
/// new one once it is durable.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct QueueListenRequest {
    /// Start after this seq.
    pub after_seq: u64,
}

/// Result of [`QueueListenRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct QueueListenResponse {
    /// The queue's head seq when listening began.
    pub head_seq: u64,
}

/// A frame pushed on a listen stream.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub enum ListenEvent {
    /// A queue entry.
    #[tls_codec(discriminant = 1)]
    Message(QueueMessage),
    /// The server ends the stream (shutdown, client removed).
    /// Last frame on the stream.
    #[tls_codec(discriminant = 2)]
    Closed(WireError),
}
