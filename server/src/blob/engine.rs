//! [`Blobs`]: the blob store of the configured storage engine, so the blob service never
//! learns which one runs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use roost_protocol::UserId;
use roost_protocol::messages::blob::BLOB_ADDRESS_LEN;
use tokio::io::{AsyncRead, ReadBuf};

use super::files::{FileStore, FileUpload};
use super::postgres::{PgBlobStore, PgReader, PgUpload};
use super::{BlobMeta, BlobStore};
use crate::error::ServiceError;
use crate::storage::StoreError;
use crate::storage::redb::fault::Faults;

/// The blob store chosen with `[storage] backend`.
#[derive(Clone)]
pub(crate) enum Blobs {
    /// Files in `blobs.dir` (the embedded engine).
    Files(FileStore),
    /// Chunks in the domain's PostgreSQL database.
    Postgres(PgBlobStore),
}

/// How long the shutdown waits for the file store to leave its usage count.
const SHUT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Blobs {
    /// Opens the store that goes with the configured storage engine (the file store's writes
    /// fail when `faults` says so: tests only).
    pub(crate) fn open(
        settings: &crate::config::Settings,
        faults: Option<Faults>,
    ) -> Result<Self, StoreError> {
        match &settings.storage {
            crate::config::StorageSettings::Redb => Ok(Self::Files(
                FileStore::open(&file_dir(settings), settings.blobs.expiry_secs)?
                    .with_faults(faults),
            )),
            crate::config::StorageSettings::Postgres {
                url,
                pool_size,
                timeout,
            } => Ok(Self::Postgres(PgBlobStore::new(url, *pool_size, *timeout)?)),
        }
    }

    /// Ends the store's writes at shutdown, after the requests (the file store leaves its
    /// usage count for the next start; PostgreSQL keeps nothing of its own). Waits at most
    /// [`SHUT_WAIT`] (a sweep deleting a large backlog holds the store): a shutdown that leaves
    /// no count only makes the next start count.
    pub(crate) async fn shut(&self) {
        if let Self::Files(store) = self {
            let store = store.clone();
            let shut = tokio::task::spawn_blocking(move || store.shut());
            match tokio::time::timeout(SHUT_WAIT, shut).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => {
                    tracing::warn!(%err, "blob usage not saved; the next start counts it")
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!("blob usage not saved; the next start counts it")
                }
            }
        }
    }

    /// The directory of the blob files a backup copies (`None`: the blobs are in the
    /// database, and its own backup holds them).
    pub(crate) fn backup_dir(settings: &crate::config::Settings) -> Option<std::path::PathBuf> {
        match &settings.storage {
            crate::config::StorageSettings::Redb => Some(file_dir(settings)),
            crate::config::StorageSettings::Postgres { .. } => None,
        }
    }
}

/// `blobs.dir`, or `blobs` in the data directory.
fn file_dir(settings: &crate::config::Settings) -> std::path::PathBuf {
    settings
        .blobs
        .dir
        .clone()
        .unwrap_or_else(|| settings.data_dir.join(super::files::DEFAULT_DIR))
}

/// An upload in progress of either store.
pub(crate) enum Upload {
    Files(FileUpload),
    Postgres(PgUpload),
}

/// A stored blob's bytes from either store.
pub(crate) enum Reader {
    Files(tokio::fs::File),
    Postgres(PgReader),
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Reader::Files(file) => Pin::new(file).poll_read(cx, buf),
            Reader::Postgres(reader) => Pin::new(reader).poll_read(cx, buf),
        }
    }
}

fn mixed() -> ServiceError {
    ServiceError::Internal("an upload of one blob store given to another".into())
}

impl BlobStore for Blobs {
    type Upload = Upload;
    type Reader = Reader;

    async fn begin(&self, meta: BlobMeta) -> Result<Upload, ServiceError> {
        match self {
            Blobs::Files(store) => store.begin(meta).await.map(Upload::Files),
            Blobs::Postgres(store) => store.begin(meta).await.map(Upload::Postgres),
        }
    }

    async fn write(&self, upload: &mut Upload, chunk: Bytes) -> Result<(), ServiceError> {
        match (self, upload) {
            (Blobs::Files(store), Upload::Files(upload)) => store.write(upload, chunk).await,
            (Blobs::Postgres(store), Upload::Postgres(upload)) => store.write(upload, chunk).await,
            _ => Err(mixed()),
        }
    }

    fn close(&self, upload: &mut Upload) {
        match (self, upload) {
            (Blobs::Files(store), Upload::Files(upload)) => store.close(upload),
            (Blobs::Postgres(store), Upload::Postgres(upload)) => store.close(upload),
            _ => {}
        }
    }

    async fn commit(
        &self,
        upload: Upload,
        address: [u8; BLOB_ADDRESS_LEN],
        quota: u64,
    ) -> Result<BlobMeta, ServiceError> {
        match (self, upload) {
            (Blobs::Files(store), Upload::Files(upload)) => {
                store.commit(upload, address, quota).await
            }
            (Blobs::Postgres(store), Upload::Postgres(upload)) => {
                store.commit(upload, address, quota).await
            }
            _ => Err(mixed()),
        }
    }

    async fn open(
        &self,
        address: &[u8; BLOB_ADDRESS_LEN],
        offset: u64,
    ) -> Result<Option<(BlobMeta, Reader)>, ServiceError> {
        Ok(match self {
            Blobs::Files(store) => store
                .open(address, offset)
                .await?
                .map(|(meta, file)| (meta, Reader::Files(file))),
            Blobs::Postgres(store) => store
                .open(address, offset)
                .await?
                .map(|(meta, reader)| (meta, Reader::Postgres(reader))),
        })
    }

    async fn usage(&self, owner: &UserId) -> Result<u64, ServiceError> {
        match self {
            Blobs::Files(store) => store.usage(owner).await,
            Blobs::Postgres(store) => store.usage(owner).await,
        }
    }

    async fn expire(&self, created_before_secs: u64) -> Result<u64, ServiceError> {
        match self {
            Blobs::Files(store) => store.expire(created_before_secs).await,
            Blobs::Postgres(store) => store.expire(created_before_secs).await,
        }
    }
}
