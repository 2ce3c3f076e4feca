//! The plaintext of an application message (PROTOCOL.md §4.5): what the MLS PrivateMessage of a
//! SendMessage carries once decrypted. The DS never sees it; only clients encode and decode it.
//!
//! ```text
//! uint16 ContentType;            /* 0 reserved, 1 text */
//! struct {
//!     ContentType content_type;
//!     opaque      body<V>;
//! } MessageContent;
//! ```
//!
//! New kinds of content (attachments, reactions, ...) are new content types. A receiver that
//! does not know a type gets [`Content::Unknown`] and shows it as an unsupported message: it
//! is never an error, and the conversation goes on.

use tls_codec::{DeserializeBytes, Serialize, Size, TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::opaque::Opaque;

/// The content type of a [`MessageContent`]. Values are never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ContentType(pub u16);

impl ContentType {
    /// UTF-8 text (RFC 3629): the body is the text, nothing else.
    pub const TEXT: ContentType = ContentType(1);
}

/// The encoded plaintext of an application message.
#[derive(Clone, PartialEq, Eq, Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct MessageContent {
    /// What `body` holds.
    pub content_type: ContentType,
    /// The content, in the format of its type.
    pub body: Opaque,
}

/// A decoded application message.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Content {
    /// Text (content type 1).
    Text(String),
    /// A content type this version does not know: shown as an unsupported message, never an
    /// error. The body is kept so that a newer app version could still read it.
    Unknown {
        /// Its content type.
        content_type: ContentType,
        /// Its body, undecoded.
        body: Vec<u8>,
    },
}

/// Why a plaintext is not a valid [`MessageContent`]. The message was still delivered by MLS;
/// a receiver shows it as unreadable and goes on.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// The bytes do not decode exactly as a `MessageContent` (truncated, trailing bytes, bad
    /// length).
    #[error("the plaintext is not a MessageContent")]
    Malformed,
    /// Content type 0 is reserved.
    #[error("content type 0 is reserved")]
    ReservedType,
    /// A text body that is not UTF-8.
    #[error("a text message that is not UTF-8")]
    InvalidText,
}

impl Content {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Content {
        Content::Text(text.into())
    }

    /// The bytes to encrypt: the TLS encoding of the [`MessageContent`].
    pub fn encode(&self) -> Vec<u8> {
        let (content_type, body) = match self {
            Content::Text(text) => (ContentType::TEXT, text.as_bytes()),
            Content::Unknown { content_type, body } => (*content_type, body.as_slice()),
        };
        let message = MessageContent {
            content_type,
            body: Opaque::from(body),
        };
        let mut out = Vec::with_capacity(message.tls_serialized_len());
        // Serializing into a Vec cannot fail for a body that fits the variable-length encoding,
        // and every body that fits in memory does (30-bit lengths cover the frame limit).
        let _ = message.tls_serialize(&mut out);
        out
    }

    /// Decodes a decrypted plaintext. Unknown content types are [`Content::Unknown`], not
    /// errors.
    pub fn decode(plaintext: &[u8]) -> Result<Content, ContentError> {
        let message = match MessageContent::tls_deserialize_bytes(plaintext) {
            Ok((message, [])) => message,
            _ => return Err(ContentError::Malformed),
        };
        match message.content_type {
            ContentType(0) => Err(ContentError::ReservedType),
            ContentType::TEXT => String::from_utf8(message.body.into_vec())
                .map(Content::Text)
                .map_err(|_| ContentError::InvalidText),
            content_type => Ok(Content::Unknown {
                content_type,
                body: message.body.into_vec(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_has_the_documented_bytes() {
        let encoded = Content::text("hi").encode();
        assert_eq!(encoded, [0x00, 0x01, 0x02, b'h', b'i']);
        assert_eq!(Content::decode(&encoded), Ok(Content::text("hi")));
        assert_eq!(Content::decode(&[0, 1, 0]), Ok(Content::text("")));
    }

    #[test]
    fn unknown_types_decode_and_bad_bytes_are_typed_errors() {
        assert_eq!(
            Content::decode(&[0x01, 0x00, 0x01, 0x07]),
            Ok(Content::Unknown {
                content_type: ContentType(256),
                body: vec![7]
            })
        );
        // Raw text (what clients sent before this envelope) is not a MessageContent.
        assert_eq!(Content::decode(b"hello"), Err(ContentError::Malformed));
        assert_eq!(Content::decode(&[]), Err(ContentError::Malformed));
        assert_eq!(
            Content::decode(&[0, 1, 1, b'a', 0]),
            Err(ContentError::Malformed)
        );
        assert_eq!(Content::decode(&[0, 0, 0]), Err(ContentError::ReservedType));
        assert_eq!(
            Content::decode(&[0, 1, 1, 0xff]),
            Err(ContentError::InvalidText)
        );
    }
}
