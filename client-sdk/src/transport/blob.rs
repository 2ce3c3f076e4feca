//! Streamed blob transfers (PROTOCOL.md §4.7): an upload writes raw bytes after its request
//! frame on one stream; a download reads raw bytes after its response frame. Neither holds a
//! blob in memory.

use roost_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame, frame_len};
use roost_protocol::messages::Response;
use roost_protocol::messages::blob::{
    BlobDownloadRequest, BlobDownloadResponse, BlobUploadRequest, BlobUploadResponse,
};
use roost_protocol::messages::{ClientRequest, RequestKind};

use super::connection::Connection;
use super::error::{RequestError, TransportError};

/// Largest response head accepted before a download's bytes.
const MAX_HEAD_LEN: u32 = 4096;

/// An upload in progress: write exactly the declared number of bytes, then
/// [`BlobUpload::finish`].
#[derive(Debug)]
pub struct BlobUpload {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    left: u64,
    max_frame_len: u32,
    request_timeout: std::time::Duration,
}

impl BlobUpload {
    /// Bytes still to write.
    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// Writes the next bytes of the blob. Writing more than declared is refused here; if the
    /// server refused the upload (quota, size), its error is returned.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), RequestError> {
        if bytes.len() as u64 > self.left {
            return Err(
                TransportError::Stream("more bytes than the declared blob size".into()).into(),
            );
        }
        match self.send.write_all(bytes).await {
            Ok(()) => {
                self.left -= bytes.len() as u64;
                Ok(())
            }
            Err(err) => {
                // The server may have refused the rest and explained why.
                let err = TransportError::from(err);
                match tokio::time::timeout(
                    self.request_timeout,
                    read_head(&mut self.recv, self.max_frame_len),
                )
                .await
                {
                    Ok(Ok(Response::Error(wire))) => Err(RequestError::Server(wire)),
                    _ => Err(err.into()),
                }
            }
        }
    }

    /// Ends the upload and waits for the server's answer (sent once the blob is durable).
    pub async fn finish(mut self) -> Result<BlobUploadResponse, RequestError> {
        // Finishing early is allowed: the server then answers BLOB_SIZE_MISMATCH.
        let _ = self.send.finish();
        let response = tokio::time::timeout(
            self.request_timeout,
            read_head(&mut self.recv, self.max_frame_len),
        )
        .await
        .map_err(|_| TransportError::Timeout)??;
        match response {
            Response::BlobUpload(done) => Ok(done),
            Response::Error(err) => Err(RequestError::Server(err)),
            _ => Err(RequestError::UnexpectedResponse {
                expected: RequestKind::BlobUpload,
            }),
        }
    }

    /// Abandons the upload: the stream is reset and the server stores nothing.
    pub fn abort(mut self) {
        let _ = self.send.reset(quinn::VarInt::from_u32(0));
    }
}

/// A download in progress: the head, then the bytes in chunks.
#[derive(Debug)]
pub struct BlobDownload {
    /// What follows: the blob's size and the range being sent.
    pub head: BlobDownloadResponse,
    recv: quinn::RecvStream,
    left: u64,
}

impl BlobDownload {
    /// The next bytes, `None` once the range is complete. An error means the transfer was
    /// cut: ask again from the first byte not received.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, TransportError> {
        if self.left == 0 {
            return Ok(None);
        }
        let max = usize::try_from(self.left).unwrap_or(usize::MAX);
        match self.recv.read_chunk(max, true).await? {
            Some(chunk) => {
                self.left -= chunk.bytes.len() as u64;
                Ok(Some(chunk.bytes))
            }
            None => Err(roost_protocol::frame::FrameError::Truncated.into()),
        }
    }
}

async fn read_head(
    recv: &mut quinn::RecvStream,
    max_frame_len: u32,
) -> Result<Response, TransportError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let len = frame_len(header, max_frame_len.min(MAX_HEAD_LEN))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(decode_body::<Response>(&body)?)
}

impl Connection {
    /// Starts uploading a blob of exactly `size` bytes.
    pub async fn start_blob_upload(&self, size: u64) -> Result<BlobUpload, TransportError> {
        let frame = encode_frame(&ClientRequest::BlobUpload(BlobUploadRequest { size }))?;
        let (mut send, recv) = self.open_raw_stream().await?;
        send.write_all(&frame).await?;
        Ok(BlobUpload {
            send,
            recv,
            left: size,
            max_frame_len: self.max_frame_len(),
            request_timeout: self.request_timeout(),
        })
    }

    /// Asks for (a range of) a blob; the bytes are read from the returned download.
    pub async fn download_blob(
        &self,
        request: BlobDownloadRequest,
    ) -> Result<BlobDownload, RequestError> {
        let frame =
            encode_frame(&ClientRequest::BlobDownload(request)).map_err(TransportError::from)?;
        let (mut send, mut recv) = self.open_raw_stream().await?;
        let head = tokio::time::timeout(self.request_timeout(), async {
            send.write_all(&frame).await?;
            send.finish()?;
            read_head(&mut recv, self.max_frame_len()).await
        })
        .await
        .map_err(|_| TransportError::Timeout)??;
        match head {
            Response::BlobDownload(head) => Ok(BlobDownload {
                left: head.length,
                head,
                recv,
            }),
            Response::Error(err) => Err(RequestError::Server(err)),
            _ => Err(RequestError::UnexpectedResponse {
                expected: RequestKind::BlobDownload,
            }),
        }
    }
}
