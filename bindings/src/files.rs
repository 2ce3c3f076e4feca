//! Files: [`RoostClient::send_file`] and [`RoostClient::download`], the [`Attachment`] record
//! both sides see, and the [`ProgressListener`] that reports a transfer.
//!
//! The SDK reports progress synchronously from inside its transfer loop. Calling foreign code
//! there would hold a runtime worker (and, in Python, the GIL) for every chunk, so the SDK's
//! callback only stores the latest value in a watch channel; a separate task hands values to
//! the listener on a blocking thread, skipping values the listener was too slow to see. The
//! last value is always delivered before the call returns.

use std::path::PathBuf;
use std::sync::Arc;

use roost_client::attachment::CHUNK_LEN;
use roost_client::{ClientError, Content, DownloadTarget, FileSource, GroupId};
use tokio::sync::watch;

use crate::client::{ListenerError, RoostClient};
use crate::error::{RoostError, parse};
use crate::run;

/// A file sent to a group: what the sender gets back from
/// [`RoostClient::send_file`] and what receivers find in
/// [`MessageContent::Attachment`](crate::MessageContent::Attachment).
///
/// `name`, `media_type` and `size` are copies, for display, of what `handle` holds; only
/// `handle` counts for [`RoostClient::download`]. `handle` is the attachment's content encoding
/// (docs/PROTOCOL.md §4.5, content type 2): the blob's address and read token and the file
/// key. It is a secret, as the message is: store it as the app stores messages.
#[derive(Clone, PartialEq, Eq, uniffi::Record)]
pub struct Attachment {
    /// The file's name as the sender had it, without directories. Do not use it as a path as
    /// it is: see `safe_file_name`.
    pub name: String,
    /// The name reduced to a file name that is safe to create in a directory (no separators,
    /// no control characters; `attachment` if nothing usable remains).
    pub safe_file_name: String,
    /// Media type, e.g. `image/jpeg` (`application/octet-stream` when unknown).
    pub media_type: String,
    /// Size of the file in bytes.
    pub size: u64,
    /// What [`RoostClient::download`] needs (see above).
    pub handle: Vec<u8>,
}

// The handle holds the file key and the blob's read token: never in logs.
impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("name", &self.name)
            .field("media_type", &self.media_type)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl From<roost_client::Attachment> for Attachment {
    fn from(attachment: roost_client::Attachment) -> Self {
        Attachment {
            name: attachment.name().to_owned(),
            safe_file_name: attachment.safe_file_name(),
            media_type: attachment.media_type().to_owned(),
            size: attachment.size,
            handle: Content::Attachment(attachment).encode(),
        }
    }
}

impl Attachment {
    /// The SDK's attachment, decoded (and checked) from the handle.
    fn decode(&self) -> Result<roost_client::Attachment, RoostError> {
        match Content::decode(&self.handle) {
            Ok(Content::Attachment(attachment)) => Ok(attachment),
            _ => Err(RoostError::InvalidArgument {
                message: "attachment: the handle is not an attachment".into(),
            }),
        }
    }
}

/// Converts an SDK error, naming `path` in a file error (the SDK's says only what failed).
fn about(path: &str) -> impl FnOnce(ClientError) -> RoostError + '_ {
    move |err| match err {
        ClientError::Io(message) => RoostError::File {
            message: format!("{path}: {message}"),
        },
        other => other.into(),
    }
}

/// What [`RoostClient::send_file`] returns.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SentFile {
    /// The id of the message in the outgoing queue, as `send_text` returns it (its state
    /// comes as an `Outgoing` event).
    pub id: String,
    /// The attachment the message carries.
    pub attachment: Attachment,
}

/// Follows a transfer. Called on a thread of the SDK (not the app's main thread), in order,
/// with `done` never decreasing; values may be skipped when the listener is slower than the
/// transfer, but the last one (`done == total`) always comes before the call returns.
#[uniffi::export(with_foreign)]
pub trait ProgressListener: Send + Sync {
    /// `done` of `total` bytes of the file are transferred. An error (an exception) is
    /// logged and the transfer goes on.
    fn on_progress(&self, done: u64, total: u64) -> Result<(), ListenerError>;
}

/// AES-GCM's tag, appended to each chunk.
const TAG_LEN: u64 = 16;
/// A chunk as stored: 64 KiB of file (the last one less) and its tag.
const SEALED_CHUNK: u64 = CHUNK_LEN as u64 + TAG_LEN;

/// The file size whose ciphertext is `total` bytes (the inverse of the SDK's
/// `ciphertext_len`: one tag per 64 KiB chunk, docs/PROTOCOL.md §4.5.2).
fn file_size(total: u64) -> u64 {
    total.saturating_sub(total.div_ceil(SEALED_CHUNK).max(1) * TAG_LEN)
}

/// File bytes carried by the first `sent` bytes of a ciphertext of `total` bytes: the tags
/// do not count. Reaches the file's size exactly with the last byte.
fn file_bytes(sent: u64, total: u64) -> u64 {
    let rest = (sent % SEALED_CHUNK).min(CHUNK_LEN as u64);
    (sent / SEALED_CHUNK * CHUNK_LEN as u64 + rest).min(file_size(total))
}

/// Runs a transfer with its progress going to `listener` (if any), as the module describes.
/// `transfer` gets the callback to hand to the SDK, which reports ciphertext bytes.
async fn with_progress<T, F, Fut>(listener: Option<Arc<dyn ProgressListener>>, transfer: F) -> T
where
    F: FnOnce(Box<dyn FnMut(u64, u64) + Send>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let (sender, receiver) = watch::channel(None);
    let reporter = listener.map(|listener| tokio::spawn(report(receiver, listener)));
    let callback = Box::new(move |sent: u64, total: u64| {
        sender.send_replace(Some((file_bytes(sent, total), file_size(total))));
    });
    // The transfer owns the callback and drops it, and with it the sender, when it ends: the
    // reporter then delivers the value it has not seen yet, if any, and stops.
    let result = transfer(callback).await;
    if let Some(reporter) = reporter {
        let _ = reporter.await;
    }
    result
}

/// Hands each new value of `progress` to `listener`, until the sender is gone.
async fn report(
    mut progress: watch::Receiver<Option<(u64, u64)>>,
    listener: Arc<dyn ProgressListener>,
) {
    let mut last = None;
    while progress.changed().await.is_ok() {
        let value = *progress.borrow_and_update();
        let Some((done, total)) = value else {
            continue;
        };
        if last == value {
            continue;
        }
        last = value;
        let listener = listener.clone();
        match tokio::task::spawn_blocking(move || listener.on_progress(done, total)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(%err, "the progress listener failed"),
            Err(_) => tracing::warn!("the progress listener panicked"),
        }
    }
}

#[uniffi::export]
impl RoostClient {
    /// Sends the file at `path` to the group: encrypts it with a fresh key, uploads it to the
    /// homeserver (`progress` follows the upload) and queues a message carrying the
    /// attachment, like `send_text`. The name is the path's file name, the media type guessed
    /// from its extension. Fails with `File` if the file cannot be read, `Server` if the
    /// homeserver refuses the upload (`BLOB_TOO_LARGE`, `BLOB_QUOTA_EXCEEDED`), `NotAMember`
    /// or `LeftGroup`. The file is read on the SDK's threads.
    #[uniffi::method(default(progress = None))]
    pub async fn send_file(
        &self,
        group: String,
        path: String,
        progress: Option<Arc<dyn ProgressListener>>,
    ) -> Result<SentFile, RoostError> {
        let client = self.client()?;
        run(async move {
            let group: GroupId = parse("group", &group)?;
            let source = FileSource::path(&path).await.map_err(about(&path))?;
            let (id, attachment) = with_progress(progress, |callback| {
                client.send_file(&group, source, callback)
            })
            .await
            .map_err(about(&path))?;
            Ok(SentFile {
                id: id.to_string(),
                attachment: attachment.into(),
            })
        })
        .await
    }

    /// Downloads the attachment and decrypts it to `destination` (replacing a file there),
    /// with `progress` following it. The file appears at `destination` only once every byte
    /// is checked (the blob's SHA-256 against its address, each chunk's authentication);
    /// until then it is written to `destination` + `.part`, removed on failure. A cut
    /// transfer is resumed a few times. Returns the file's size. Fails with `Server`
    /// (`BLOB_NOT_FOUND`: expired or never uploaded, or a wrong read token), `AttachmentCorrupt`
    /// (the bytes are not what the attachment describes), `File` (the destination cannot be
    /// written) or `InvalidArgument` (the handle is no attachment).
    #[uniffi::method(default(progress = None))]
    pub async fn download(
        &self,
        attachment: Attachment,
        destination: String,
        progress: Option<Arc<dyn ProgressListener>>,
    ) -> Result<u64, RoostError> {
        let client = self.client()?;
        run(async move {
            let attachment = attachment.decode()?;
            let target = DownloadTarget::Path(PathBuf::from(&destination));
            let size = with_progress(progress, |callback| {
                client.download(&attachment, target, callback)
            })
            .await
            .map_err(about(&destination))?;
            Ok(size)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_client::attachment::ciphertext_len;

    #[test]
    fn progress_counts_file_bytes_and_ends_at_the_size() {
        let chunk = CHUNK_LEN as u64;
        for size in [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5] {
            let total = ciphertext_len(size);
            assert_eq!(file_size(total), size, "size {size}");
            assert_eq!(file_bytes(total, total), size, "size {size}");
            let mut before = 0;
            for sent in (0..=total).step_by(997).chain([total]) {
                let done = file_bytes(sent, total);
                assert!(done >= before && done <= size, "size {size}, sent {sent}");
                before = done;
            }
        }
        let total = ciphertext_len(2 * chunk);
        assert_eq!(file_bytes(SEALED_CHUNK, total), chunk);
        assert_eq!(file_bytes(SEALED_CHUNK - 1, total), chunk);
        assert_eq!(file_bytes(SEALED_CHUNK + 10, total), chunk + 10);
    }
}
