//! Files: [`Client::send_file`] encrypts a file with a fresh key (chunked AES-256-GCM,
//! PROTOCOL.md §4.5.2), uploads the ciphertext as a blob and sends an [`Attachment`] message;
//! [`Client::download`] fetches the blob (through the client's homeserver, whatever domain
//! stores it), checks the ciphertext's SHA-256 against the address, and decrypts.

use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use roost_protocol::content::{Attachment, AttachmentEncryption, Content, MAX_ATTACHMENT_TEXT};
use roost_protocol::messages::blob::BlobDownloadRequest;
use roost_protocol::{ErrorDetail, GroupId, Opaque};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Client;
use crate::MessageId;
use crate::error::ClientError;
use crate::transport::RequestError;

/// Plaintext bytes per chunk.
pub const CHUNK_LEN: usize = 64 * 1024;
/// AEAD tag bytes per chunk.
const TAG_LEN: usize = 16;
/// How often a cut download is resumed before giving up.
const RESUMES: u32 = 3;
/// Attempts of an upload whose source can be read again (a path) when the connection fails
/// or the server answers that it cannot take it now.
const UPLOAD_ATTEMPTS: u32 = 3;
/// Pause before the second attempt (doubled before the third), unless the server names one.
const UPLOAD_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);
/// A longer wait the server asks for (RATE_LIMITED) is left to the app: the error is returned.
const UPLOAD_RETRY_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// The ciphertext size of a file of `size` bytes.
pub fn ciphertext_len(size: u64) -> u64 {
    let chunks = size.div_ceil(CHUNK_LEN as u64).max(1);
    size + chunks * TAG_LEN as u64
}

fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_LEN as u64).max(1)
}

fn nonce(prefix: &[u8; 7], index: u64, last: bool) -> Result<Nonce, ClientError> {
    let index = u32::try_from(index)
        .map_err(|_| ClientError::InvalidOperation("file too large to encrypt".into()))?;
    let mut bytes = [0u8; 12];
    bytes[..7].copy_from_slice(prefix);
    bytes[7..11].copy_from_slice(&index.to_be_bytes());
    bytes[11] = u8::from(last);
    Ok(Nonce::assume_unique_for_key(bytes))
}

fn key(bytes: &[u8; 32]) -> Result<LessSafeKey, ClientError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| ClientError::InvalidOperation("bad attachment key".into()))
}

/// What [`Client::send_file`] sends: a file by path, or any reader with its length.
pub struct FileSource {
    reader: Box<dyn AsyncRead + Unpin + Send>,
    size: u64,
    name: String,
    media_type: String,
    /// Where to read it again for another attempt ([`FileSource::path`] only).
    path: Option<PathBuf>,
}

impl FileSource {
    /// The file at `path`; the name is its file name, the media type guessed from its
    /// extension (`application/octet-stream` when unknown).
    pub async fn path(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let file = tokio::fs::File::open(path).await.map_err(io_error)?;
        let size = file.metadata().await.map_err(io_error)?.len();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            reader: Box::new(file),
            size,
            media_type: guess_media_type(&name).to_owned(),
            name,
            path: Some(path.to_owned()),
        })
    }

    /// The file opened again from its start for another attempt; it must not have changed
    /// size.
    async fn reopen(&mut self) -> Result<(), ClientError> {
        let Some(path) = &self.path else {
            return Err(ClientError::InvalidOperation(
                "this file source cannot be read again".into(),
            ));
        };
        let file = tokio::fs::File::open(path).await.map_err(io_error)?;
        if file.metadata().await.map_err(io_error)?.len() != self.size {
            return Err(ClientError::InvalidOperation(format!(
                "{} changed size during the upload",
                path.display()
            )));
        }
        self.reader = Box::new(file);
        Ok(())
    }

    /// `size` bytes from `reader`, named `name`, of media type `media_type`.
    pub fn reader(
        reader: impl AsyncRead + Unpin + Send + 'static,
        size: u64,
        name: impl Into<String>,
        media_type: impl Into<String>,
    ) -> Self {
        Self {
            reader: Box::new(reader),
            size,
            name: name.into(),
            media_type: media_type.into(),
            path: None,
        }
    }
}

fn io_error(err: std::io::Error) -> ClientError {
    ClientError::Io(err.to_string())
}

/// A media type for a file name's extension (a few common ones).
pub fn guess_media_type(name: &str) -> &'static str {
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "m4a" => "audio/mp4",
        "mp3" => "audio/mpeg",
        "ogg" | "opus" => "audio/ogg",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

fn cut(text: &str) -> Opaque {
    let mut end = text.len().min(MAX_ATTACHMENT_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Opaque::from(text.as_bytes().get(..end).unwrap_or_default())
}

/// Where [`Client::download`] writes the file.
pub enum DownloadTarget<'a> {
    /// A file at this path: written as `<path>.part`, renamed once verified.
    Path(PathBuf),
    /// A writer: bytes reach it as they are decrypted (each chunk authenticated, the whole
    /// ciphertext's hash checked at the end: on an error, discard what was written).
    Writer(&'a mut (dyn AsyncWrite + Unpin + Send)),
}

impl Client {
    /// Encrypts the file, uploads it as a blob to this client's homeserver and sends an
    /// [`Attachment`] message to the group (through [`Client::send_content`]). Returns the id
    /// of that message in the outgoing queue (its state comes as [`Event::Outgoing`]; see
    /// [`Client::flush`]) and the attachment. `progress` gets the bytes uploaded so far and
    /// the total.
    ///
    /// [`Event::Outgoing`]: crate::Event::Outgoing
    pub async fn send_file(
        &self,
        group: &GroupId,
        source: FileSource,
        progress: impl FnMut(u64, u64),
    ) -> Result<(MessageId, Attachment), ClientError> {
        let attachment = self.upload_file(source, progress).await?;
        let id = self
            .send_content(group, &Content::Attachment(attachment.clone()))
            .await?;
        Ok((id, attachment))
    }

    /// The first half of [`Client::send_file`]: encrypts and uploads, and returns the
    /// attachment without sending it.
    ///
    /// A source from [`FileSource::path`] is uploaded again from its start (up to three
    /// attempts in all, with a fresh key each time) when the connection fails or the server
    /// answers that it cannot take the blob now (UNAVAILABLE, INTERNAL, or RATE_LIMITED with a
    /// wait of at most 10 s): `progress` then starts again from 0. A reader given to
    /// [`FileSource::reader`] cannot be read again, so its first such failure is returned.
    pub async fn upload_file(
        &self,
        mut source: FileSource,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Attachment, ClientError> {
        let mut attempt = 1;
        loop {
            let err = match self.upload_once(&mut source, &mut progress).await {
                Ok(attachment) => return Ok(attachment),
                Err(err) => err,
            };
            let ClientError::Request(request) = &err else {
                return Err(err);
            };
            if attempt >= UPLOAD_ATTEMPTS || !request.is_transient() || source.path.is_none() {
                return Err(err);
            }
            let pause = match request {
                RequestError::Server(wire) => match wire.detail {
                    ErrorDetail::RateLimited { retry_after_ms } => {
                        std::time::Duration::from_millis(retry_after_ms)
                    }
                    _ => UPLOAD_RETRY_PAUSE * attempt,
                },
                RequestError::Transport(_) | RequestError::UnexpectedResponse { .. } => {
                    UPLOAD_RETRY_PAUSE * attempt
                }
            };
            if pause > UPLOAD_RETRY_WAIT_MAX {
                return Err(err);
            }
            tokio::time::sleep(pause).await;
            source.reopen().await?;
            tracing::debug!(%err, attempt, "upload failed; uploading the file again");
            attempt += 1;
        }
    }

    /// One attempt of [`Client::upload_file`], with a fresh key.
    async fn upload_once(
        &self,
        source: &mut FileSource,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<Attachment, ClientError> {
        let file_key: [u8; 32] = rand::random();
        let nonce_prefix: [u8; 7] = rand::random();
        let sealing = key(&file_key)?;
        let total = ciphertext_len(source.size);
        let conn = self.inner.conn.connection().await?;
        let mut upload = conn.start_blob_upload(total).await?;
        let chunks = chunk_count(source.size);
        let mut left = source.size;
        let mut buf = Vec::with_capacity(CHUNK_LEN + TAG_LEN);
        let mut sent = 0u64;
        for index in 0..chunks {
            let len = usize::try_from(left.min(CHUNK_LEN as u64)).unwrap_or(CHUNK_LEN);
            buf.resize(len, 0);
            source.reader.read_exact(&mut buf).await.map_err(io_error)?;
            left -= len as u64;
            let last = index + 1 == chunks;
            sealing
                .seal_in_place_append_tag(
                    nonce(&nonce_prefix, index, last)?,
                    Aad::empty(),
                    &mut buf,
                )
                .map_err(|_| ClientError::InvalidOperation("encryption failed".into()))?;
            upload.write(&buf).await?;
            sent += buf.len() as u64;
            progress(sent, total);
        }
        let stored = upload.finish().await?;
        Ok(Attachment {
            blob: stored.blob,
            encryption: AttachmentEncryption::AES256GCM_CHUNKED_64K,
            key: file_key,
            nonce_prefix,
            size: source.size,
            media_type: cut(&source.media_type),
            name: cut(&source.name),
        })
    }

    /// Downloads and decrypts an attachment into `target`, resuming a cut transfer from the
    /// first missing byte (a few times). The ciphertext's SHA-256 must be the blob's address
    /// and every chunk must authenticate; otherwise nothing is left at a target path.
    /// `progress` gets the ciphertext bytes received so far and the total. Returns the file's
    /// size.
    pub async fn download(
        &self,
        attachment: &Attachment,
        target: DownloadTarget<'_>,
        progress: impl FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        match target {
            DownloadTarget::Writer(writer) => {
                self.download_into(attachment, writer, progress).await
            }
            DownloadTarget::Path(path) => {
                let mut part = path.clone().into_os_string();
                part.push(".part");
                let part = PathBuf::from(part);
                let mut file = tokio::fs::File::create(&part).await.map_err(io_error)?;
                let result = self.download_into(attachment, &mut file, progress).await;
                let result = match result {
                    Ok(size) => async {
                        file.sync_all().await?;
                        drop(file);
                        tokio::fs::rename(&part, &path).await?;
                        Ok(size)
                    }
                    .await
                    .map_err(io_error),
                    Err(err) => Err(err),
                };
                if result.is_err() {
                    let _ = tokio::fs::remove_file(&part).await;
                }
                result
            }
        }
    }

    async fn download_into(
        &self,
        attachment: &Attachment,
        out: &mut (dyn AsyncWrite + Unpin + Send),
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        if attachment.encryption != AttachmentEncryption::AES256GCM_CHUNKED_64K {
            return Err(ClientError::InvalidOperation(format!(
                "unknown attachment encryption {}",
                attachment.encryption.0
            )));
        }
        let opening = key(&attachment.key)?;
        let total = ciphertext_len(attachment.size);
        let chunks = chunk_count(attachment.size);
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut received = 0u64;
        let mut index = 0u64;
        let mut pending: Vec<u8> = Vec::with_capacity(CHUNK_LEN + TAG_LEN);
        let mut written = 0u64;
        let mut resumes = 0;
        while received < total {
            let conn = self.inner.conn.connection().await?;
            let mut download = match conn
                .download_blob(BlobDownloadRequest {
                    blob: attachment.blob.clone(),
                    offset: received,
                    length: None,
                })
                .await
            {
                Ok(download) => download,
                Err(err) if err.is_transient() && resumes < RESUMES => {
                    resumes += 1;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            if download.head.size != total {
                return Err(ClientError::AttachmentCorrupt(
                    "the blob's size does not match the attachment".into(),
                ));
            }
            loop {
                let chunk = match download.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(err) if resumes < RESUMES => {
                        tracing::debug!(%err, received, "download cut; resuming");
                        resumes += 1;
                        break;
                    }
                    Err(err) => return Err(err.into()),
                };
                hash.update(&chunk);
                received += chunk.len() as u64;
                progress(received, total);
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let room = CHUNK_LEN + TAG_LEN - pending.len();
                    let take = room.min(rest.len());
                    pending.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    let last = index + 1 == chunks;
                    let complete = pending.len() == CHUNK_LEN + TAG_LEN
                        || (last && received == total && rest.is_empty());
                    if complete {
                        written += open_chunk(&opening, attachment, index, last, &mut pending, out)
                            .await?;
                        index += 1;
                    }
                }
            }
        }
        let mut address = [0u8; 32];
        address.copy_from_slice(hash.finish().as_ref());
        if address != attachment.blob.address || index != chunks || written != attachment.size {
            return Err(ClientError::AttachmentCorrupt(
                "the downloaded bytes do not match the attachment's address".into(),
            ));
        }
        out.flush().await.map_err(io_error)?;
        Ok(written)
    }
}

async fn open_chunk(
    opening: &LessSafeKey,
    attachment: &Attachment,
    index: u64,
    last: bool,
    pending: &mut Vec<u8>,
    out: &mut (dyn AsyncWrite + Unpin + Send),
) -> Result<u64, ClientError> {
    let plain = opening
        .open_in_place(
            nonce(&attachment.nonce_prefix, index, last)?,
            Aad::empty(),
            pending,
        )
        .map_err(|_| ClientError::AttachmentCorrupt("a chunk does not authenticate".into()))?;
    out.write_all(plain).await.map_err(io_error)?;
    let len = plain.len() as u64;
    pending.clear();
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertext_sizes_follow_the_chunking() {
        assert_eq!(ciphertext_len(0), 16);
        assert_eq!(ciphertext_len(1), 17);
        assert_eq!(ciphertext_len(65_536), 65_552);
        assert_eq!(ciphertext_len(65_537), 65_537 + 32);
        assert_eq!(guess_media_type("Photo.JPG"), "image/jpeg");
        assert_eq!(guess_media_type("noext"), "application/octet-stream");
    }
}
