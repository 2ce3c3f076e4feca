//! The blob service: encrypted attachments uploaded on one stream each, stored behind
//! [`BlobStore`], addressed by the SHA-256 of their bytes and read with a capability (address
//! plus a read token the server issues at upload). Upload and download stream: a blob is never
//! held in memory. A blob of another domain is fetched by the client's homeserver from the
//! owning one (proxy download) and streamed through.
//!
//! This module reads an upload through [`UploadBody`] and sees downloads as tokio writers;
//! the transport hands the streams over.

mod engine;
pub(crate) mod files;
pub(crate) mod postgres;
mod serial;
#[cfg(test)]
mod suite;

pub(crate) use engine::Blobs;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use roost_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame, frame_len};
use roost_protocol::messages::Response;
use roost_protocol::messages::blob::{
    BLOB_ADDRESS_LEN, BLOB_TOKEN_LEN, BlobDownloadRequest, BlobDownloadResponse, BlobRef,
    BlobUploadRequest, BlobUploadResponse,
};
use roost_protocol::messages::federation::FederationRequest;
use roost_protocol::{UserId, WireError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use crate::State;
use crate::auth::Authenticated;
use crate::error::ServiceError;

/// Bytes read from or written to a stream at once.
const IO_CHUNK: usize = 256 * 1024;
/// Bytes of an upload handed to the hash and the store at a time (the pieces the stream
/// received, copied together). Each chunk costs each job a thread wake-up: 256 KiB chunks,
/// two queued, hold the same bytes as 128 KiB chunks four deep with half the hand-offs
/// (docs/BENCHMARKS.md, "Upload reads and chunk size").
const UPLOAD_CHUNK: usize = 256 * 1024;
/// Chunks of an upload smaller than this are hashed at once rather than on the blocking pool.
const INLINE_HASH: usize = 16 * 1024;
/// Chunks of an upload that may wait for (or be in) the hash, and the store's writer: the
/// stream is read on while they do (each upload holds at most this many chunks besides its
/// stream window and the chunk being gathered).
pub(crate) const QUEUED_CHUNKS: usize = 2;
/// Largest response head a peer may send before the bytes of a proxied download.
const MAX_HEAD_LEN: u32 = 4096;

/// What the store keeps about a blob besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobMeta {
    /// The uploader (whose quota it counts against).
    pub(crate) owner: UserId,
    /// The read token issued at upload.
    pub(crate) token: [u8; BLOB_TOKEN_LEN],
    /// Size in bytes.
    pub(crate) size: u64,
    /// Upload time (Unix seconds).
    pub(crate) created_secs: u64,
}

/// Where blobs are kept: [`files::FileStore`] with the embedded engine, [`postgres::PgBlobStore`]
/// with PostgreSQL (every node of a domain sees the same blobs and quota); an object store
/// would be another implementation. Nothing of an upload is visible before
/// [`BlobStore::commit`] returned, and then it is durable.
pub(crate) trait BlobStore {
    /// An upload in progress; dropping it discards what was written.
    type Upload: Send;
    /// Reads a stored blob from the offset given to [`BlobStore::open`].
    type Reader: AsyncRead + Unpin + Send;
    /// Starts an upload of the blob `meta` describes (the store may write its metadata while
    /// the bytes arrive; nothing is visible before the commit).
    async fn begin(&self, meta: BlobMeta) -> Result<Self::Upload, ServiceError>;
    /// Appends `chunk`. The store may still be writing it when this returns (an error then
    /// comes from a later call); [`BlobStore::commit`] waits for every write.
    async fn write(&self, upload: &mut Self::Upload, chunk: Bytes) -> Result<(), ServiceError>;
    /// Makes the upload durable and visible under `address`, with the metadata given to
    /// [`BlobStore::begin`]. If a blob with that address is stored already, the upload is
    /// discarded and the stored blob's metadata returned. If the
    /// owner's stored bytes would pass `quota`, nothing is stored
    /// ([`ServiceError::BlobQuotaExceeded`]): this check is the authority, across every
    /// upload of the owner (on every node).
    /// No more bytes follow: the store may start making them durable while the caller
    /// finishes the address. Writing after this fails.
    fn close(&self, upload: &mut Self::Upload);
    async fn commit(
        &self,
        upload: Self::Upload,
        address: [u8; BLOB_ADDRESS_LEN],
        quota: u64,
    ) -> Result<BlobMeta, ServiceError>;
    /// The blob's metadata and a reader positioned at `offset` (when `offset <= size`).
    async fn open(
        &self,
        address: &[u8; BLOB_ADDRESS_LEN],
        offset: u64,
    ) -> Result<Option<(BlobMeta, Self::Reader)>, ServiceError>;
    /// Bytes of blobs stored for `owner`.
    async fn usage(&self, owner: &UserId) -> Result<u64, ServiceError>;
    /// Deletes blobs uploaded before `created_before_secs`; returns how many. A store may
    /// keep an expired blob a little longer (the file store: until its expiry bucket ended),
    /// so readers check the upload time themselves.
    async fn expire(&self, created_before_secs: u64) -> Result<u64, ServiceError>;
}

/// Bytes of uploads in progress per user on this node, so that concurrent uploads are refused
/// before their bytes are sent when together they would pass the quota. (Uploads on other
/// nodes are not seen here; [`BlobStore::commit`] enforces the quota for all of them.)
#[derive(Default)]
pub(crate) struct Reservations(Mutex<HashMap<UserId, u64>>);

struct Reserved<'a> {
    reservations: &'a Reservations,
    user: UserId,
    size: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut map = match self.reservations.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(held) = map.get_mut(&self.user) {
            *held = held.saturating_sub(self.size);
            if *held == 0 {
                map.remove(&self.user);
            }
        }
    }
}

impl Reservations {
    fn reserve(&self, user: &UserId, stored: u64, size: u64, quota: u64) -> Option<Reserved<'_>> {
        let mut map = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let held = map.entry(user.clone()).or_default();
        if stored.saturating_add(*held).saturating_add(size) > quota {
            return None;
        }
        *held += size;
        Some(Reserved {
            reservations: self,
            user: user.clone(),
            size,
        })
    }
}

fn tokens_equal(a: &[u8; BLOB_TOKEN_LEN], b: &[u8; BLOB_TOKEN_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bytes of an upload that follow its request frame, as the transport received them.
pub(crate) trait UploadBody {
    /// Waits for bytes and appends what has arrived, at most `max` bytes, to `buf`; returns
    /// how many (0 at the end of the stream).
    async fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> std::io::Result<usize>;
}

/// Everything quinn holds of the stream is copied at once (one lock of the connection for all
/// its pieces); nothing of quinn's packet buffers is kept.
impl UploadBody for quinn::RecvStream {
    async fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> std::io::Result<usize> {
        let mut room = bytes::BufMut::limit(&mut *buf, max);
        self.read_buf(&mut room).await
    }
}

/// The body of an upload whose stream ended with its request frame.
pub(crate) struct NoBody;

impl UploadBody for NoBody {
    async fn read_into(&mut self, _buf: &mut BytesMut, _max: usize) -> std::io::Result<usize> {
        Ok(0)
    }
}

/// Trips when an upload's stream brought no byte for `limit`. One timer for the whole upload,
/// moved on only when it fires after bytes came: a timeout around every read would insert
/// into and remove from the runtime's timer wheel once per packet.
struct StallTimer {
    limit: Duration,
    progress: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl StallTimer {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            progress: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// Bytes came (or the server stops waiting on itself and reads again).
    fn progressed(&mut self) {
        self.progress = Instant::now();
    }

    /// Resolves once `limit` passed since the last progress.
    async fn stalled(&mut self) {
        loop {
            self.sleep.as_mut().await;
            let deadline = self.progress + self.limit;
            if deadline <= Instant::now() {
                return;
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

/// Reads the bytes of an upload that follow its request frame, stores them and answers with
/// the blob's reference once it is durable. On any failure nothing is stored.
pub(crate) async fn upload<B: UploadBody>(
    state: &State,
    me: &Authenticated,
    request: BlobUploadRequest,
    body: &mut B,
) -> Result<BlobUploadResponse, ServiceError> {
    let config = &state.settings.blobs;
    let user = &me.client.user;
    state
        .blob_upload_limiter
        .check(user.clone())
        .map_err(ServiceError::RateLimited)?;
    if request.size > config.max_blob_size {
        return Err(ServiceError::BlobTooLarge);
    }
    let stored = state.blobs.usage(user).await?;
    let _reserved = state
        .blob_reservations
        .reserve(user, stored, request.size, config.quota_per_user)
        .ok_or(ServiceError::BlobQuotaExceeded)?;
    let meta = BlobMeta {
        owner: user.clone(),
        token: rand::random(),
        size: request.size,
        created_secs: state.clock.unix_secs(),
    };
    let mut upload = state.blobs.begin(meta).await?;
    let mut hash = Sha256::new();
    let mut received: u64 = 0;
    let mut ended = false;
    let mut stall = StallTimer::new(config.stall_timeout());
    while !ended {
        // A chunk of our own, handed to the hash and to the store, which work on it while the
        // next one is received. The stream's bytes are copied into it: holding quinn's pieces
        // instead would pin the packet buffers they point into, beyond quinn's accounting (a
        // peer sending a byte per padded packet would make each held byte pin a whole packet).
        let mut chunk = BytesMut::with_capacity(UPLOAD_CHUNK);
        while chunk.len() < UPLOAD_CHUNK {
            let room = UPLOAD_CHUNK - chunk.len();
            let read = tokio::select! {
                read = body.read_into(&mut chunk, room) => read,
                () = stall.stalled() => return Err(ServiceError::RequestTimeout),
            };
            let n = read.map_err(|_| ServiceError::StreamCut)?;
            if n == 0 {
                ended = true;
                break;
            }
            stall.progressed();
            received = received.saturating_add(n as u64);
            if received > request.size {
                return Err(ServiceError::BlobSizeMismatch);
            }
        }
        if !chunk.is_empty() {
            let chunk = chunk.freeze();
            hash.update(chunk.clone()).await?;
            state.blobs.write(&mut upload, chunk).await?;
            // Time spent waiting for our own hash and writes is not the client's stall.
            stall.progressed();
        }
    }
    if received != request.size {
        return Err(ServiceError::BlobSizeMismatch);
    }
    // The store flushes the tail while the hash finishes.
    state.blobs.close(&mut upload);
    let address = hash.finish().await?;
    let meta = state
        .blobs
        .commit(upload, address, config.quota_per_user)
        .await?;
    metrics::counter!("roost_blob_uploaded_bytes_total").increment(meta.size);
    Ok(BlobUploadResponse {
        blob: BlobRef {
            domain: state.settings.domain.clone(),
            address,
            token: meta.token,
        },
        size: meta.size,
        expires_at: meta.created_secs.saturating_add(config.expiry_secs),
    })
}

/// The SHA-256 of an upload, computed on the blocking pool as the chunks arrive
/// ([`serial::Serial`]: the stream is read on while they are hashed). An upload whose bytes
/// are all in one small chunk is hashed at once.
struct Sha256 {
    inline: Option<ring::digest::Context>,
    job: Option<serial::Serial<Hashing>>,
}

struct Hashing(ring::digest::Context);

impl serial::Work for Hashing {
    fn chunk(&mut self, chunk: &[u8]) -> Result<(), ServiceError> {
        self.0.update(chunk);
        Ok(())
    }

    fn last(&mut self) -> Result<(), ServiceError> {
        Ok(())
    }
}

impl Sha256 {
    fn new() -> Self {
        Self {
            inline: Some(ring::digest::Context::new(&ring::digest::SHA256)),
            job: None,
        }
    }

    /// Hashes `chunk` after the bytes before it.
    async fn update(&mut self, chunk: Bytes) -> Result<(), ServiceError> {
        let gone = || ServiceError::Internal("the upload's hash is gone".into());
        if self.job.is_none() {
            let mut context = self.inline.take().ok_or_else(gone)?;
            if chunk.len() < INLINE_HASH {
                context.update(&chunk);
                self.inline = Some(context);
                return Ok(());
            }
            self.job = Some(serial::Serial::new(Hashing(context)));
        }
        self.job.as_mut().ok_or_else(gone)?.push(chunk).await
    }

    async fn finish(self) -> Result<[u8; BLOB_ADDRESS_LEN], ServiceError> {
        let context = match (self.job, self.inline) {
            (Some(job), _) => job.end().await?.0,
            (None, Some(context)) => context,
            (None, None) => return Err(ServiceError::Internal("the upload's hash is gone".into())),
        };
        let mut address = [0u8; BLOB_ADDRESS_LEN];
        address.copy_from_slice(context.finish().as_ref());
        Ok(address)
    }
}

/// Who asks for a download: a client of this server, or a peer homeserver for one of its
/// clients.
pub(crate) enum Downloader<'a> {
    Client(&'a Authenticated),
    Peer(&'a [u8]),
}

/// Answers a download: the response head, then the bytes; or an error frame. A blob of
/// another domain is fetched through its homeserver. Returns whether every byte was written
/// (false: the stream must be reset, the client resumes with a range).
pub(crate) async fn download<W: AsyncWrite + Unpin>(
    state: &State,
    who: Downloader<'_>,
    request: BlobDownloadRequest,
    out: &mut W,
) -> bool {
    let limited = match &who {
        Downloader::Client(me) => state
            .blob_download_limiter
            .check(me.client.to_string().into_bytes()),
        Downloader::Peer(key) => state.blob_download_limiter.check(key.to_vec()),
    };
    if let Err(wait) = limited {
        return write_error(out, ServiceError::RateLimited(wait)).await;
    }
    if request.blob.domain != state.settings.domain {
        return match who {
            Downloader::Client(_) => proxy(state, request, out).await,
            // One hop only: a peer asks for blobs this server stores.
            Downloader::Peer(_) => write_error(out, ServiceError::BlobNotFound).await,
        };
    }
    let opened = match state
        .blobs
        .open(&request.blob.address, request.offset)
        .await
    {
        Ok(opened) => opened,
        Err(err) => return write_error(out, err).await,
    };
    let expiry = state.settings.blobs.expiry_secs;
    let now = state.clock.unix_secs();
    let Some((meta, mut reader)) = opened.filter(|(meta, _)| {
        tokens_equal(&meta.token, &request.blob.token)
            && meta.created_secs.saturating_add(expiry) > now
    }) else {
        return write_error(out, ServiceError::BlobNotFound).await;
    };
    if request.offset > meta.size {
        return write_error(out, ServiceError::BlobRangeNotSatisfiable(meta.size)).await;
    }
    let remaining = meta.size - request.offset;
    let length = request.length.map_or(remaining, |l| l.min(remaining));
    let head = Response::BlobDownload(BlobDownloadResponse {
        size: meta.size,
        offset: request.offset,
        length,
    });
    if !write_response(out, &head).await {
        return false;
    }
    let copied = copy_exact(&mut reader, out, length).await;
    if copied {
        metrics::counter!("roost_blob_downloaded_bytes_total").increment(length);
    }
    copied
}

/// Copies exactly `length` bytes; false if either side failed or the reader ended early.
async fn copy_exact<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut R,
    out: &mut W,
    length: u64,
) -> bool {
    let mut buf = vec![0u8; IO_CHUNK];
    let mut left = length;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let Some(slot) = buf.get_mut(..want) else {
            return false;
        };
        let read = match reader.read(slot).await {
            Ok(0) | Err(_) => return false,
            Ok(read) => read,
        };
        let Some(bytes) = buf.get(..read) else {
            return false;
        };
        if out.write_all(bytes).await.is_err() {
            return false;
        }
        left -= read as u64;
    }
    true
}

async fn write_response<W: AsyncWrite + Unpin>(out: &mut W, response: &Response) -> bool {
    match encode_frame(response) {
        Ok(frame) => out.write_all(&frame).await.is_ok(),
        Err(err) => {
            tracing::error!(%err, "blob response cannot be encoded");
            false
        }
    }
}

async fn write_error<W: AsyncWrite + Unpin>(out: &mut W, err: ServiceError) -> bool {
    match &err {
        ServiceError::Store(_) | ServiceError::Internal(_) => {
            tracing::error!(%err, "blob download failed")
        }
        _ => tracing::debug!(%err, "blob download refused"),
    }
    write_response(out, &Response::Error(err.to_wire())).await
}

/// Fetches the blob from its homeserver and streams the answer through, head and bytes.
async fn proxy<W: AsyncWrite + Unpin>(
    state: &State,
    request: BlobDownloadRequest,
    out: &mut W,
) -> bool {
    let domain = request.blob.domain.clone();
    let (offset, wanted) = (request.offset, request.length);
    let frame = match encode_frame(&FederationRequest::BlobDownload(request)) {
        Ok(frame) => frame,
        Err(err) => return write_response(out, &Response::Error(err.to_wire())).await,
    };
    let (mut send, mut recv) = match state.federation.open_stream(&domain).await {
        Ok(streams) => streams,
        Err(err) => return write_error(out, err).await,
    };
    let unreachable = || ServiceError::PeerUnreachable(domain.to_string());
    if send.write_all(&frame).await.is_err() || send.finish().is_err() {
        return write_error(out, unreachable()).await;
    }
    let head = match read_head(&mut recv, state).await {
        Ok(head) => head,
        Err(err) => return write_response(out, &Response::Error(err)).await,
    };
    let length = match &head {
        Response::BlobDownload(head) if answers(head, offset, wanted) => head.length,
        Response::Error(_) => 0,
        // Another kind of answer, or a head for a range other than the one asked for (a
        // peer that lies about what follows): the client gets an error, not its bytes.
        _ => return write_error(out, unreachable()).await,
    };
    metrics::counter!("roost_blob_proxied_total").increment(1);
    write_response(out, &head).await && copy_exact(&mut recv, out, length).await
}

/// Whether a peer's download head answers a request for `wanted` bytes (all that remain when
/// `None`) from `offset`: the same offset, inside the blob it names, no more than asked for.
fn answers(head: &BlobDownloadResponse, offset: u64, wanted: Option<u64>) -> bool {
    head.offset == offset
        && head.offset <= head.size
        && head.length <= head.size - head.offset
        && wanted.is_none_or(|wanted| head.length <= wanted)
}

async fn read_head<R: AsyncRead + Unpin>(
    recv: &mut R,
    state: &State,
) -> Result<Response, WireError> {
    let timeout = state.settings.limits.request_read_timeout();
    let read = async {
        let mut header = [0u8; FRAME_HEADER_LEN];
        recv.read_exact(&mut header).await.ok()?;
        let len = frame_len(header, MAX_HEAD_LEN).ok()?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.ok()?;
        decode_body::<Response>(&body).ok()
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Some(head)) => Ok(head),
        _ => Err(ServiceError::PeerUnreachable("the blob's homeserver".into()).to_wire()),
    }
}

/// Deletes expired blobs (the sweeper calls this).
pub(crate) async fn expire(state: &State) -> Result<u64, ServiceError> {
    let cutoff = state
        .clock
        .unix_secs()
        .saturating_sub(state.settings.blobs.expiry_secs);
    state.blobs.expire(cutoff).await
}

#[cfg(test)]
mod head_tests {
    use super::*;

    fn head(size: u64, offset: u64, length: u64) -> BlobDownloadResponse {
        BlobDownloadResponse {
            size,
            offset,
            length,
        }
    }

    #[test]
    fn a_proxied_head_must_answer_the_range_asked_for() {
        // Honest answers: the whole blob, a tail, a bounded range, an empty range at the end.
        assert!(answers(&head(100, 0, 100), 0, None));
        assert!(answers(&head(100, 40, 60), 40, None));
        assert!(answers(&head(100, 40, 10), 40, Some(10)));
        assert!(answers(&head(100, 100, 0), 100, None));
        assert!(answers(&head(0, 0, 0), 0, Some(5)));
        // Lies: another offset, past the end of the blob it names, more than asked for, an
        // offset beyond the size (no underflow).
        assert!(!answers(&head(100, 0, 100), 40, None));
        assert!(!answers(&head(100, 40, 61), 40, None));
        assert!(!answers(&head(100, 40, 11), 40, Some(10)));
        assert!(!answers(&head(100, 200, 0), 200, None));
        assert!(!answers(&head(10, 0, u64::MAX), 0, None));
    }
}

#[cfg(test)]
mod stall_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_stall_timer_trips_only_after_the_limit_without_progress() {
        let limit = Duration::from_secs(10);
        let mut stall = StallTimer::new(limit);
        // Bytes every 6 s for a minute: never a stall, though the first deadline passes.
        for _ in 0..10 {
            tokio::select! {
                () = stall.stalled() => panic!("tripped while bytes came"),
                () = tokio::time::sleep(Duration::from_secs(6)) => {}
            }
            stall.progressed();
        }
        // Then nothing: it trips exactly `limit` after the last bytes.
        let quiet = Instant::now();
        stall.stalled().await;
        assert_eq!(quiet.elapsed(), limit);
    }
}
