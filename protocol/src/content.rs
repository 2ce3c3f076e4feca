//! The plaintext of an application message (PROTOCOL.md §4.5): what the MLS PrivateMessage of a
//! SendMessage carries once decrypted. The DS never sees it; only clients encode and decode it.
//!
//! ```text
//! uint16 ContentType;            /* 0 reserved, 1 text, 2 attachment */
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

use crate::messages::blob::BlobRef;
use crate::opaque::Opaque;

/// The content type of a [`MessageContent`]. Values are never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ContentType(pub u16);

impl ContentType {
    /// UTF-8 text (RFC 3629): the body is the text, nothing else.
    pub const TEXT: ContentType = ContentType(1);
    /// A file stored encrypted in a blob: the body is an [`Attachment`].
    pub const ATTACHMENT: ContentType = ContentType(2);
}

/// The encryption of an attachment's blob. Values are never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AttachmentEncryption(pub u16);

impl AttachmentEncryption {
    /// AES-256-GCM over 64 KiB chunks (PROTOCOL.md §4.5.2): chunk `i` (from 0) of the
    /// plaintext is sealed with the nonce `nonce_prefix || uint32(i) || last`, `last` being 1
    /// for the final chunk and 0 otherwise, and no associated data; the blob is the sealed
    /// chunks in order. Every chunk but the last holds 65536 plaintext bytes; the last holds
    /// 0 to 65536 (an empty file is one empty chunk).
    pub const AES256GCM_CHUNKED_64K: AttachmentEncryption = AttachmentEncryption(1);
}

/// A file sent as an encrypted blob: where the blob is and how to read it, the key that opens
/// it, and what the file is. Debug output never shows the key or the read token.
#[derive(Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct Attachment {
    /// The blob: owning domain, SHA-256 of the ciphertext (checked after download), read
    /// token.
    pub blob: BlobRef,
    /// How the blob is encrypted.
    pub encryption: AttachmentEncryption,
    /// The file key (fresh for each file).
    pub key: [u8; 32],
    /// The nonce prefix (fresh for each file).
    pub nonce_prefix: [u8; 7],
    /// Size of the file (the plaintext), in bytes.
    pub size: u64,
    /// Media type (RFC 6838), e.g. `image/jpeg`; UTF-8, at most 255 bytes.
    pub media_type: Opaque,
    /// The file's name as the sender had it, without directories; UTF-8, at most 255 bytes.
    /// A receiver must not trust it as a path.
    pub name: Opaque,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("blob", &self.blob)
            .field("encryption", &self.encryption)
            .field("size", &self.size)
            .field("media_type", &self.media_type())
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

/// Longest media type or name of an [`Attachment`].
pub const MAX_ATTACHMENT_TEXT: usize = 255;

impl Attachment {
    /// The media type as text.
    pub fn media_type(&self) -> &str {
        std::str::from_utf8(self.media_type.as_slice()).unwrap_or_default()
    }

    /// The name as the sender gave it (check it before using it as a file name:
    /// [`Attachment::safe_file_name`]).
    pub fn name(&self) -> &str {
        std::str::from_utf8(self.name.as_slice()).unwrap_or_default()
    }

    /// A file name safe to create in a directory: the name's last path component, with
    /// control characters and separators replaced; `attachment` if nothing usable remains.
    pub fn safe_file_name(&self) -> String {
        let last = self.name().rsplit(['/', '\\']).next().unwrap_or_default();
        let cleaned: String = last
            .chars()
            .map(|c| if c.is_control() || c == ':' { '_' } else { c })
            .collect();
        let trimmed = cleaned.trim_matches(|c: char| c == '.' || c.is_whitespace());
        if trimmed.is_empty() {
            "attachment".to_owned()
        } else {
            trimmed.to_owned()
        }
    }

    fn check(&self) -> Result<(), ContentError> {
        for text in [&self.media_type, &self.name] {
            if text.len() > MAX_ATTACHMENT_TEXT || std::str::from_utf8(text.as_slice()).is_err() {
                return Err(ContentError::InvalidText);
            }
        }
        Ok(())
    }
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
    /// A file (content type 2).
    Attachment(Attachment),
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
    /// A text body (or an attachment's name or media type) that is not UTF-8 or too long.
    #[error("text that is not UTF-8, or too long")]
    InvalidText,
}

impl Content {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Content {
        Content::Text(text.into())
    }

    /// The bytes to encrypt: the TLS encoding of the [`MessageContent`].
    pub fn encode(&self) -> Vec<u8> {
        let attachment;
        let (content_type, body) = match self {
            Content::Text(text) => (ContentType::TEXT, text.as_bytes()),
            Content::Attachment(a) => {
                attachment = a.tls_serialize_detached().unwrap_or_default();
                (ContentType::ATTACHMENT, attachment.as_slice())
            }
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
            ContentType::ATTACHMENT => {
                let attachment = match Attachment::tls_deserialize_bytes(message.body.as_slice()) {
                    Ok((attachment, [])) => attachment,
                    _ => return Err(ContentError::Malformed),
                };
                attachment.check()?;
                Ok(Content::Attachment(attachment))
            }
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

    fn attachment(name: &str) -> Attachment {
        Attachment {
            blob: BlobRef {
                domain: "example.org".parse().unwrap(),
                address: [1; 32],
                token: [2; 32],
            },
            encryption: AttachmentEncryption::AES256GCM_CHUNKED_64K,
            key: [3; 32],
            nonce_prefix: [4; 7],
            size: 5,
            media_type: Opaque::from(&b"text/plain"[..]),
            name: Opaque::from(name.as_bytes()),
        }
    }

    #[test]
    fn attachments_round_trip_and_hostile_ones_are_typed_errors() {
        let a = attachment("notes.txt");
        let encoded = Content::Attachment(a.clone()).encode();
        assert_eq!(encoded[..2], [0x00, 0x02]);
        assert_eq!(Content::decode(&encoded), Ok(Content::Attachment(a)));
        // The key and token never show in logs.
        let shown = format!("{:?}", attachment("x"));
        assert!(!shown.contains("3, 3") && !shown.contains("0303") && !shown.contains("token"));
        // Truncated, or a name that is not UTF-8.
        assert_eq!(
            Content::decode(&encoded[..encoded.len() - 1]),
            Err(ContentError::Malformed)
        );
        let mut bad = attachment("x");
        bad.name = Opaque::from(&[0xffu8][..]);
        assert_eq!(
            Content::decode(&Content::Attachment(bad).encode()),
            Err(ContentError::InvalidText)
        );
    }

    #[test]
    fn attachment_names_become_safe_file_names() {
        assert_eq!(attachment("photo.jpg").safe_file_name(), "photo.jpg");
        assert_eq!(attachment("../../etc/passwd").safe_file_name(), "passwd");
        assert_eq!(attachment("C:\\x\\evil.exe").safe_file_name(), "evil.exe");
        assert_eq!(attachment("..").safe_file_name(), "attachment");
        assert_eq!(attachment("a\nb").safe_file_name(), "a_b");
        assert_eq!(attachment("").safe_file_name(), "attachment");
    }

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
