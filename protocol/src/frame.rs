//! Framing: `u32` big-endian body length, then the body. A body is the protocol version
//! (`u16`) followed by one TLS-encoded message. Lengths are checked against the receiver's
//! maximum before anything is allocated, and bodies are decoded exactly: trailing bytes are
//! an error.

use tls_codec::{DeserializeBytes, Error as CodecError, Serialize, Size};

use crate::error::{ErrorCode, ErrorDetail, WireError};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length of the frame header (the `u32` body length).
pub const FRAME_HEADER_LEN: usize = 4;
/// Default maximum body length (8 MiB): room for a Welcome with the ratchet tree of a group of
/// about 20,000 members.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 8 * 1024 * 1024;

/// A frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body declares a protocol version we do not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The body ended before the message did.
    #[error("truncated message")]
    Truncated,
    /// Bytes remain after the message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// An enum discriminant this version does not know.
    #[error("unknown discriminant {0}")]
    UnknownDiscriminant(u64),
    /// Anything else: invalid id, bad length, bad optional flag, ...
    #[error("invalid message: {0}")]
    Invalid(String),
}

impl From<CodecError> for DecodeError {
    fn from(err: CodecError) -> Self {
        match err {
            CodecError::EndOfStream => DecodeError::Truncated,
            CodecError::UnknownValue(v) => DecodeError::UnknownDiscriminant(v),
            CodecError::TrailingData => DecodeError::TrailingBytes(0),
            CodecError::DecodingError(s) | CodecError::EncodingError(s) => DecodeError::Invalid(s),
            other => DecodeError::Invalid(format!("{other:?}")),
        }
    }
}

impl DecodeError {
    /// The error response a receiver sends for this decode failure.
    pub fn to_wire(&self) -> WireError {
        match self {
            DecodeError::UnsupportedVersion(_) => WireError::with_detail(
                ErrorCode::UNSUPPORTED_VERSION,
                self.to_string(),
                ErrorDetail::UnsupportedVersion {
                    min: PROTOCOL_VERSION,
                    max: PROTOCOL_VERSION,
                },
            ),
            _ => WireError::new(ErrorCode::MALFORMED, self.to_string()),
        }
    }
}

/// A frame header or frame stream is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared body length exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Declared length.
        len: u32,
        /// The receiver's maximum.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The message could not be encoded (a field exceeds 2^30 - 1 bytes).
    #[error("message cannot be encoded: {0}")]
    Encode(String),
}

impl FrameError {
    /// The error response a receiver sends for this framing failure.
    pub fn to_wire(&self) -> WireError {
        match self {
            FrameError::TooLarge { max, .. } => WireError::with_detail(
                ErrorCode::FRAME_TOO_LARGE,
                self.to_string(),
                ErrorDetail::FrameTooLarge {
                    max_frame_len: *max,
                },
            ),
            FrameError::Truncated => WireError::new(ErrorCode::MALFORMED, self.to_string()),
            FrameError::Encode(_) => WireError::new(ErrorCode::INTERNAL, "response too large"),
        }
    }
}

/// Encodes `message` as a complete frame: header, version, message.
pub fn encode_frame<T: Serialize + Size>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body_len = 2 + message.tls_serialized_len();
    let header =
        u32::try_from(body_len).map_err(|_| FrameError::Encode("body over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body_len);
    out.extend_from_slice(&header.to_be_bytes());
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    message
        .tls_serialize(&mut out)
        .map_err(|e| FrameError::Encode(format!("{e:?}")))?;
    if out.len() != FRAME_HEADER_LEN + body_len {
        return Err(FrameError::Encode("size mismatch".into()));
    }
    Ok(out)
}

/// Reads a frame header and checks the length against `max_frame_len`.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max_frame_len: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len > max_frame_len {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_len,
        });
    }
    Ok(len as usize)
}

/// Decodes a frame body (version + message) exactly.
pub fn decode_body<T: DeserializeBytes>(body: &[u8]) -> Result<T, DecodeError> {
    let (version, rest) = u16::tls_deserialize_bytes(body).map_err(|_| DecodeError::Truncated)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let (message, trailing) = T::tls_deserialize_bytes(rest)?;
    if !trailing.is_empty() {
        return Err(DecodeError::TrailingBytes(trailing.len()));
    }
    Ok(message)
}

/// Splits a byte stream into frame bodies as bytes arrive (used on listen streams, where the
/// server writes many frames). Never buffers more than one frame plus the last chunk pushed.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame_len: u32,
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder accepting bodies of at most `max_frame_len` bytes.
    pub fn new(max_frame_len: u32) -> Self {
        Self {
            max_frame_len,
            buf: Vec::new(),
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Takes the next complete frame body out of the buffer, if there is one. An oversized
    /// header is reported as soon as its four bytes are in.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(header) = self.buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let len = frame_len(*header, self.max_frame_len)?;
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
        self.buf.drain(..FRAME_HEADER_LEN + len);
        Ok(Some(body))
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::queue::QueueAckRequest;
    use crate::messages::{ClientRequest, Response};

    fn ack(seq: u64) -> ClientRequest {
        ClientRequest::QueueAck(QueueAckRequest { up_to_seq: seq })
    }

    #[test]
    fn frame_round_trip() {
        let frame = encode_frame(&ack(7)).unwrap();
        let len = frame_len(frame[..4].try_into().unwrap(), 1024).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_body::<ClientRequest>(&frame[4..]).unwrap(), ack(7));
    }

    #[test]
    fn oversized_header_is_refused_before_reading_the_body() {
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes(), DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME_LEN
            })
        );
        let mut decoder = FrameDecoder::new(16);
        decoder.push(&17u32.to_be_bytes());
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        ));
    }

    #[test]
    fn version_trailing_and_truncation() {
        let frame = encode_frame(&ack(7)).unwrap();
        let mut body = frame[4..].to_vec();
        body[1] = 9;
        assert_eq!(
            decode_body::<ClientRequest>(&body),
            Err(DecodeError::UnsupportedVersion(9))
        );
        let mut trailing = frame[4..].to_vec();
        trailing.push(0);
        assert_eq!(
            decode_body::<ClientRequest>(&trailing),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(
            decode_body::<ClientRequest>(&frame[4..frame.len() - 1]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_body::<ClientRequest>(&[]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_body::<Response>(&[0, 1, 0xff, 0xff]),
            Err(DecodeError::UnknownDiscriminant(0xffff))
        );
    }

    #[test]
    fn incremental_decoder_yields_frames_split_anywhere() {
        let mut stream = Vec::new();
        for seq in 0..5 {
            stream.extend(encode_frame(&ack(seq)).unwrap());
        }
        for chunk in [1, 2, 3, 7, 64] {
            let mut decoder = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                while let Some(body) = decoder.next_frame().unwrap() {
                    got.push(decode_body::<ClientRequest>(&body).unwrap());
                }
            }
            decoder.finish().unwrap();
            assert_eq!(got, (0..5).map(ack).collect::<Vec<_>>());
        }
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&stream[..stream.len() - 1]);
        while decoder.next_frame().unwrap().is_some() {}
        assert_eq!(decoder.finish(), Err(FrameError::Truncated));
    }
}
