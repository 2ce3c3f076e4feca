//! Queuing Service messages: fetch, ack, listen, and what a queue holds.

use tls_codec::{Serialize, Size, TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::error::WireError;
use crate::frame::{FRAME_HEADER_LEN, FrameError, PROTOCOL_VERSION};
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

/// A frame a client writes on the send side of its listen stream after the
/// [`QueueListenRequest`] (optional: a client may instead finish its send side right after the
/// request). The server writes no response to it.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub enum ListenControl {
    /// Delete the client's messages with `seq <= min(up_to_seq, head_seq)`, exactly as a
    /// [`QueueAckRequest`] does: cumulative and idempotent.
    #[tls_codec(discriminant = 1)]
    Ack(ListenAck),
}

/// Content of [`ListenControl::Ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ListenAck {
    /// Acknowledge up to and including this seq.
    pub up_to_seq: u64,
}

/// The longest [`ListenControl`] frame body a server accepts; longer ones are refused from
/// their header, before anything is buffered. Every variant fits (an Ack body is 12 bytes).
pub const MAX_LISTEN_CONTROL_LEN: u32 = 64;

/// Discriminant of [`ListenEvent::Message`].
const LISTEN_MESSAGE: u16 = 1;

/// The bytes of a [`ListenEvent::Message`] frame before its payload: frame header, version,
/// event, `seq`, `id` and `timestamp_ms`. Followed by the TLS encoding of the
/// [`QueuePayload`] (`encoded_payload_len` bytes long), they are byte for byte
/// `encode_frame(&ListenEvent::Message(..))`; a payload pushed to many listeners can thus be
/// encoded once and its bytes shared by every frame.
pub fn listen_message_head(
    seq: u64,
    id: &MessageId,
    timestamp_ms: u64,
    encoded_payload_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let fields_len = PROTOCOL_VERSION.tls_serialized_len()
        + LISTEN_MESSAGE.tls_serialized_len()
        + seq.tls_serialized_len()
        + id.tls_serialized_len()
        + timestamp_ms.tls_serialized_len();
    let body_len = u32::try_from(fields_len + encoded_payload_len)
        .map_err(|_| FrameError::Encode("body over 4 GiB".into()))?;
    let mut head = Vec::with_capacity(FRAME_HEADER_LEN + fields_len);
    head.extend_from_slice(&body_len.to_be_bytes());
    let encoded = (|| {
        PROTOCOL_VERSION.tls_serialize(&mut head)?;
        LISTEN_MESSAGE.tls_serialize(&mut head)?;
        seq.tls_serialize(&mut head)?;
        id.tls_serialize(&mut head)?;
        timestamp_ms.tls_serialize(&mut head)
    })();
    encoded.map_err(|e| FrameError::Encode(format!("{e:?}")))?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;

    fn message(seq: u64, payload: QueuePayload) -> QueueMessage {
        QueueMessage {
            seq,
            id: MessageId([seq as u8 ^ 0x5a; 16]),
            timestamp_ms: seq.wrapping_add(1_700_000_000_000),
            payload,
        }
    }

    #[test]
    fn split_listen_frames_equal_whole_ones() {
        let group: GroupId = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
            .parse()
            .unwrap();
        // Message lengths around each varint size boundary, and a large Welcome.
        let mut payloads = Vec::new();
        for len in [0usize, 1, 63, 64, 16383, 16384, 330_000] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            payloads.push(QueuePayload::GroupMessage(GroupMessage {
                group: group.clone(),
                message: bytes.clone().into(),
            }));
            payloads.push(QueuePayload::Welcome(GroupMessage {
                group: group.clone(),
                message: bytes.into(),
            }));
        }
        for (seq, payload) in [0, 1, u64::MAX].into_iter().cycle().zip(payloads) {
            let message = message(seq, payload);
            let encoded = message.payload.tls_serialize_detached().unwrap();
            let mut split = listen_message_head(
                message.seq,
                &message.id,
                message.timestamp_ms,
                encoded.len(),
            )
            .unwrap();
            split.extend_from_slice(&encoded);
            assert_eq!(
                split,
                encode_frame(&ListenEvent::Message(message)).unwrap(),
                "payload of {} bytes",
                encoded.len()
            );
        }
    }

    #[test]
    fn listen_control_fits_its_maximum() {
        let frame = encode_frame(&ListenControl::Ack(ListenAck {
            up_to_seq: u64::MAX,
        }))
        .unwrap();
        assert_eq!(frame.len() - FRAME_HEADER_LEN, 12);
        assert!(frame.len() - FRAME_HEADER_LEN <= MAX_LISTEN_CONTROL_LEN as usize);
    }
}
