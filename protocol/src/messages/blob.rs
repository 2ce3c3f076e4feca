//! Blob service messages (PROTOCOL.md §4.7): encrypted attachments stored by a homeserver and
//! addressed by the SHA-256 of their bytes.
//!
//! Both operations stream raw bytes next to their frames. An upload is the `BlobUpload`
//! request frame followed on the same stream by exactly `size` raw bytes, then the end of the
//! client's send side; the server answers with one frame once the blob is durable. A download
//! is a `BlobDownload` request frame; a successful answer is the `BlobDownload` response frame
//! followed by exactly `length` raw bytes, then the end of the stream. An error answer is an
//! error frame alone.

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::ids::Domain;

/// Length of a blob address (SHA-256).
pub const BLOB_ADDRESS_LEN: usize = 32;
/// Length of a blob read token.
pub const BLOB_TOKEN_LEN: usize = 32;

/// Where a blob lives and what proves the right to read it: the owning homeserver's domain,
/// the SHA-256 of the blob's bytes, and the read token the owning server issued at upload.
/// Whoever holds all three may read the blob (a capability); the token is never derived from
/// the bytes, so knowing the address alone gives nothing.
#[derive(Clone, PartialEq, Eq, Hash, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct BlobRef {
    /// The homeserver that stores the blob.
    pub domain: Domain,
    /// SHA-256 of the blob's bytes.
    pub address: [u8; BLOB_ADDRESS_LEN],
    /// The read token.
    pub token: [u8; BLOB_TOKEN_LEN],
}

impl std::fmt::Debug for BlobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never printed.
        f.write_str("BlobRef(")?;
        f.write_str(self.domain.as_str())?;
        f.write_str("/")?;
        for b in &self.address[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..)")
    }
}

/// Upload a blob to the client's own homeserver. `size` raw bytes follow the frame.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct BlobUploadRequest {
    /// The exact number of bytes that follow. Checked against the per-blob maximum and the
    /// uploader's quota before any byte is read.
    pub size: u64,
}

/// Result of [`BlobUploadRequest`]: the blob is durable.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct BlobUploadResponse {
    /// Where the blob is and how to read it. Uploading bytes that are stored already returns
    /// the existing blob's reference.
    pub blob: BlobRef,
    /// The blob's size.
    pub size: u64,
    /// When the server deletes it (Unix seconds).
    pub expires_at: u64,
}

/// Download bytes `[offset, offset + length)` of a blob (all that remain after `offset` when
/// `length` is absent). A blob of another domain is fetched through the client's homeserver.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct BlobDownloadRequest {
    /// The blob.
    pub blob: BlobRef,
    /// First byte to send. `offset == size` is a valid empty range.
    pub offset: u64,
    /// How many bytes at most; absent for all that remain.
    pub length: Option<u64>,
}

/// The head of a download answer: `length` raw bytes follow.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct BlobDownloadResponse {
    /// The blob's total size.
    pub size: u64,
    /// The first byte that follows (the request's offset).
    pub offset: u64,
    /// How many bytes follow.
    pub length: u64,
}
