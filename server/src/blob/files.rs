//! The blob store on a file system: one file per blob, named by the hex of its address, and a
//! small metadata file next to it (`<address>.meta`: owner, read token, size, creation time).
//!
//! An upload is written to `tmp/<random>` by jobs on the blocking pool ([`Serial`]) that
//! create the file with the first chunk and write the chunks queued for them as they arrive
//! (one `write` each), starting the writeback of each chunk to the disk as soon as it is
//! written (on Linux without waiting and without a journal commit; elsewhere an `fdatasync`
//! after every [`WRITEBACK_STEP`] bytes),
//! so the flush when the upload is closed only has the tail left. The metadata file is
//! written to `tmp/` and fsynced when the upload begins (everything in it is known then). At
//! commit, once the writer flushed the tail, one job on the blocking pool renames the
//! metadata file into place, then the data file, and fsyncs the directory. A blob is visible
//! only when both files exist, so a partial upload never is; a process killed at any point
//! leaves files in `tmp/` (removed at start) or a metadata file without its data (removed at
//! start).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use roost_protocol::UserId;
use roost_protocol::messages::blob::{BLOB_ADDRESS_LEN, BLOB_TOKEN_LEN};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::serial::{Serial, Work};
use super::{BlobMeta, BlobStore};
use crate::error::ServiceError;
use crate::storage::StoreError;
use crate::storage::redb::fault::Faults;

const TMP: &str = "tmp";
/// The store's directory in the data directory when `blobs.dir` is not set (and in a backup).
pub(crate) const DEFAULT_DIR: &str = "blobs";
const META_SUFFIX: &str = ".meta";
/// Where writeback cannot be started without waiting ([`ASYNC_WRITEBACK`]): bytes of an upload
/// written but not yet flushed after which the writer flushes them (while later chunks
/// queue), so that the flush at the end is short.
const WRITEBACK_STEP: u64 = 256 * 1024;

/// Blobs in a directory.
#[derive(Clone)]
pub(crate) struct FileStore {
    dir: PathBuf,
    /// Bytes of stored blobs per owner, loaded at start and kept up to date. Commits and
    /// deletions change files and this map under the same lock.
    usage: Arc<Mutex<HashMap<UserId, u64>>>,
    /// Injected write failures (tests only).
    faults: Option<Faults>,
}

#[derive(Serialize, Deserialize)]
struct MetaFile {
    owner: String,
    token: String,
    size: u64,
    created_secs: u64,
}

fn io_error(err: io::Error) -> ServiceError {
    ServiceError::Store(StoreError::Io(err.to_string().into()))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    joined(tokio::task::spawn_blocking(f)).await
}

/// The result of a job on the blocking pool (one that panicked or was cancelled: the store
/// is unavailable).
async fn joined<T>(job: JoinHandle<Result<T, ServiceError>>) -> Result<T, ServiceError> {
    job.await
        .map_err(|_| ServiceError::Store(StoreError::Unavailable))?
}

/// Writes `bytes` to a new file at `path` and fsyncs it; removes it on failure. Blocking.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let written = (|| {
        let mut f = std::fs::File::create(path)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl FileStore {
    /// Opens (creating) the directory, removes what a killed process left behind and counts
    /// each owner's stored bytes.
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        let store_err = |err: io::Error| StoreError::Io(format!("{}: {err}", dir.display()).into());
        let tmp = dir.join(TMP);
        std::fs::create_dir_all(&tmp).map_err(store_err)?;
        for entry in std::fs::read_dir(&tmp).map_err(store_err)? {
            let entry = entry.map_err(store_err)?;
            std::fs::remove_file(entry.path()).map_err(store_err)?;
        }
        let mut usage: HashMap<UserId, u64> = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(store_err)? {
            let entry = entry.map_err(store_err)?;
            let name = entry.file_name();
            let Some(hex_address) = name.to_str().and_then(|n| n.strip_suffix(META_SUFFIX)) else {
                continue;
            };
            let data = dir.join(hex_address);
            match read_meta(&entry.path()) {
                Some(meta) if data.exists() => {
                    *usage.entry(meta.owner).or_default() += meta.size;
                }
                _ => {
                    // Killed between the two renames (or unreadable): never visible.
                    std::fs::remove_file(entry.path()).map_err(store_err)?;
                }
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            usage: Arc::new(Mutex::new(usage)),
            faults: None,
        })
    }

    /// The same store, its writes failing when `faults` says so (tests of a full disk).
    pub(crate) fn with_faults(mut self, faults: Option<Faults>) -> Self {
        self.faults = faults;
        self
    }

    fn data_path(&self, address: &[u8; BLOB_ADDRESS_LEN]) -> PathBuf {
        self.dir.join(hex::encode(address))
    }

    fn meta_path(&self, address: &[u8; BLOB_ADDRESS_LEN]) -> PathBuf {
        self.dir
            .join(format!("{}{META_SUFFIX}", hex::encode(address)))
    }
}

fn read_meta(path: &Path) -> Option<BlobMeta> {
    let bytes = std::fs::read(path).ok()?;
    let file: MetaFile = serde_json::from_slice(&bytes).ok()?;
    let mut token = [0u8; BLOB_TOKEN_LEN];
    hex::decode_to_slice(&file.token, &mut token).ok()?;
    Some(BlobMeta {
        owner: file.owner.parse().ok()?,
        token,
        size: file.size,
        created_secs: file.created_secs,
    })
}

/// An upload being written to `tmp/`. Dropped without [`BlobStore::commit`], its files are
/// removed (a write still running on the blocking pool ends in the removed file).
pub(crate) struct FileUpload {
    path: PathBuf,
    /// What the blob is committed with.
    meta: BlobMeta,
    /// Its metadata file, staged in `tmp/` from `begin` on.
    meta_path: PathBuf,
    /// Writing and fsyncing the staged metadata file (on the blocking pool).
    staging: Option<JoinHandle<Result<(), ServiceError>>>,
    writer: Option<Serial<DataFile>>,
}

/// An upload's data file, written by [`Serial`] jobs on the blocking pool: created with the
/// first chunk, each chunk written with one `write` and its writeback started as it is
/// written; when the upload is closed, the tail is flushed to the disk (while the hash
/// finishes).
struct DataFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// Bytes written so far: the next chunk's offset.
    written: u64,
    /// Bytes written since the last flush (without [`ASYNC_WRITEBACK`]).
    unflushed: u64,
    faults: Option<Faults>,
}

impl DataFile {
    fn file(&mut self) -> Result<&std::fs::File, ServiceError> {
        if self.file.is_none() {
            self.file = Some(std::fs::File::create(&self.path).map_err(io_error)?);
        }
        self.file
            .as_ref()
            .ok_or_else(|| ServiceError::Internal("the upload's file is gone".into()))
    }
}

impl Work for DataFile {
    fn chunk(&mut self, chunk: &[u8]) -> Result<(), ServiceError> {
        let len = chunk.len() as u64;
        if let Some(delay) = self.faults.as_ref().and_then(Faults::blob_write_delay) {
            std::thread::sleep(delay);
        }
        if self
            .faults
            .as_ref()
            .is_some_and(|f| f.blob_write_fails(len))
        {
            return Err(io_error(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            )));
        }
        let (offset, unflushed) = (self.written, self.unflushed);
        let file = self.file()?;
        io::Write::write_all(&mut &*file, chunk).map_err(io_error)?;
        let mut flushed = false;
        if ASYNC_WRITEBACK {
            start_writeback(file, offset, len).map_err(io_error)?;
        } else if unflushed + len >= WRITEBACK_STEP {
            // Sends what is written so far to the disk while the next chunks queue.
            file.sync_data().map_err(io_error)?;
            flushed = true;
        }
        self.written += len;
        self.unflushed = if flushed { 0 } else { unflushed + len };
        Ok(())
    }

    /// The tail (what the started writebacks have not written yet) reaches the disk.
    fn last(&mut self) -> Result<(), ServiceError> {
        self.file()?.sync_data().map_err(io_error)
    }
}

/// Whether [`start_writeback`] sends written bytes to the disk without waiting for them.
const ASYNC_WRITEBACK: bool = cfg!(target_os = "linux");

/// Starts writing `len` bytes of `file` from `offset` back to the disk and returns without
/// waiting (Linux: `posix_fadvise(DONTNEED)` starts the writeback of dirty pages; pages
/// still being written stay cached, so a download right after the upload reads memory). No
/// journal commit: the flush at commit only waits for what has not reached the disk yet.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{Advice, fadvise};
    fadvise(
        file,
        offset,
        std::num::NonZeroU64::new(len),
        Advice::DontNeed,
    )
    .map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

impl FileStore {
    fn staging_path(&self, suffix: &str) -> PathBuf {
        let name = hex::encode(rand::random::<[u8; 16]>());
        self.dir.join(TMP).join(format!("{name}{suffix}"))
    }

    /// Writes a blob's metadata file in place atomically: a file in `tmp/`, fsynced, renamed
    /// over `path`. The caller fsyncs the directory. Blocking.
    fn write_meta(&self, path: &Path, meta: &BlobMeta) -> io::Result<()> {
        let tmp = self.staging_path(META_SUFFIX);
        write_synced(&tmp, &meta_bytes(meta)?)?;
        let renamed = std::fs::rename(&tmp, path);
        if renamed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        renamed
    }
}

fn meta_bytes(meta: &BlobMeta) -> io::Result<Vec<u8>> {
    let record = MetaFile {
        owner: meta.owner.to_string(),
        token: hex::encode(meta.token),
        size: meta.size,
        created_secs: meta.created_secs,
    };
    serde_json::to_vec(&record).map_err(io::Error::other)
}

impl Drop for FileUpload {
    fn drop(&mut self) {
        // Best effort; whatever stays is removed at the next start.
        let writing = self.writer.as_mut().and_then(Serial::take_job);
        let staging = self.staging.take();
        let paths = [self.path.clone(), self.meta_path.clone()];
        let remove = move || {
            for path in paths {
                let _ = std::fs::remove_file(path);
            }
        };
        match tokio::runtime::Handle::try_current() {
            // Files still being written are removed once their jobs ended.
            Ok(runtime) if writing.is_some() || staging.is_some() => {
                runtime.spawn(async move {
                    if let Some(writing) = writing {
                        let _ = writing.await;
                    }
                    if let Some(staging) = staging {
                        let _ = staging.await;
                    }
                    let _ = tokio::task::spawn_blocking(remove).await;
                });
            }
            _ => remove(),
        }
    }
}

impl BlobStore for FileStore {
    type Upload = FileUpload;
    type Reader = tokio::fs::File;

    async fn begin(&self, meta: BlobMeta) -> Result<FileUpload, ServiceError> {
        // The data file is created, and the metadata file written and fsynced, on the
        // blocking pool while the first bytes arrive.
        let path = self.staging_path("");
        let meta_path = self.staging_path(META_SUFFIX);
        let staging = {
            let (path, meta) = (meta_path.clone(), meta.clone());
            tokio::task::spawn_blocking(move || {
                meta_bytes(&meta)
                    .and_then(|bytes| write_synced(&path, &bytes))
                    .map_err(io_error)
            })
        };
        Ok(FileUpload {
            writer: Some(Serial::new(DataFile {
                path: path.clone(),
                file: None,
                written: 0,
                unflushed: 0,
                faults: self.faults.clone(),
            })),
            path,
            meta,
            meta_path,
            staging: Some(staging),
        })
    }

    async fn write(&self, upload: &mut FileUpload, chunk: Bytes) -> Result<(), ServiceError> {
        match upload.writer.as_mut() {
            Some(writer) => writer.push(chunk).await,
            None => Err(ServiceError::Internal("write after close".into())),
        }
    }

    fn close(&self, upload: &mut FileUpload) {
        if let Some(writer) = upload.writer.as_mut() {
            writer.close();
        }
    }

    async fn commit(
        &self,
        mut upload: FileUpload,
        address: [u8; BLOB_ADDRESS_LEN],
        quota: u64,
    ) -> Result<BlobMeta, ServiceError> {
        let Some(writer) = upload.writer.take() else {
            return Err(ServiceError::Internal("commit after close".into()));
        };
        // Every chunk written and the file flushed (by `last`).
        let written = writer.end().await?;
        drop(written);
        if let Some(staging) = upload.staging.take() {
            joined(staging).await?;
        }
        let staged_meta = upload.meta_path.clone();
        let meta = upload.meta.clone();
        let store = self.clone();
        let tmp = upload.path.clone();
        let committed = blocking(move || {
            // The bytes are on the disk; now the names.
            let data = store.data_path(&address);
            let meta_path = store.meta_path(&address);
            let mut usage = lock(&store.usage);
            if data.exists()
                && let Some(existing) = read_meta(&meta_path)
            {
                // The same bytes are stored already: whoever holds them may read them. The
                // upload renews the blob's life (the uploader is told it lives `expiry_secs`
                // from now); the first uploader keeps owning its quota.
                if existing.created_secs >= meta.created_secs {
                    return Ok(existing);
                }
                let renewed = BlobMeta {
                    created_secs: meta.created_secs,
                    ..existing
                };
                store
                    .write_meta(&meta_path, &renewed)
                    .and_then(|()| fsync_dir(&store.dir))
                    .map_err(io_error)?;
                return Ok(renewed);
            }
            let used = usage.get(&meta.owner).copied().unwrap_or(0);
            if used.saturating_add(meta.size) > quota {
                return Err(ServiceError::BlobQuotaExceeded);
            }
            let written = (|| {
                std::fs::rename(&staged_meta, &meta_path)?;
                std::fs::rename(&tmp, &data)?;
                fsync_dir(&store.dir)
            })();
            if let Err(err) = written {
                if !data.exists() {
                    let _ = std::fs::remove_file(&meta_path);
                }
                return Err(io_error(err));
            }
            *usage.entry(meta.owner.clone()).or_default() += meta.size;
            Ok(meta)
        })
        .await?;
        Ok(committed)
    }

    async fn open(
        &self,
        address: &[u8; BLOB_ADDRESS_LEN],
        offset: u64,
    ) -> Result<Option<(BlobMeta, tokio::fs::File)>, ServiceError> {
        let Some(meta) = read_meta(&self.meta_path(address)) else {
            return Ok(None);
        };
        let mut file = match tokio::fs::File::open(self.data_path(address)).await {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_error(err)),
        };
        if offset > 0 && offset <= meta.size {
            use tokio::io::AsyncSeekExt;
            file.seek(io::SeekFrom::Start(offset))
                .await
                .map_err(io_error)?;
        }
        Ok(Some((meta, file)))
    }

    async fn usage(&self, owner: &UserId) -> Result<u64, ServiceError> {
        Ok(lock(&self.usage).get(owner).copied().unwrap_or(0))
    }

    async fn expire(&self, created_before_secs: u64) -> Result<u64, ServiceError> {
        let store = self.clone();
        blocking(move || {
            let mut removed = 0;
            for entry in std::fs::read_dir(&store.dir).map_err(io_error)? {
                let entry = entry.map_err(io_error)?;
                let name = entry.file_name();
                let Some(hex_address) = name.to_str().and_then(|n| n.strip_suffix(META_SUFFIX))
                else {
                    continue;
                };
                let Some(meta) = read_meta(&entry.path()) else {
                    continue;
                };
                if meta.created_secs >= created_before_secs {
                    continue;
                }
                let mut usage = lock(&store.usage);
                // A re-upload may have renewed it since it was read (under this lock).
                match read_meta(&entry.path()) {
                    Some(meta) if meta.created_secs < created_before_secs => {}
                    _ => continue,
                }
                // Data first: without it the blob is invisible, and a leftover metadata
                // file is removed at the next start.
                match std::fs::remove_file(store.dir.join(hex_address)) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(io_error(err)),
                }
                std::fs::remove_file(entry.path()).map_err(io_error)?;
                if let Some(used) = usage.get_mut(&meta.owner) {
                    *used = used.saturating_sub(meta.size);
                }
                removed += 1;
            }
            Ok(removed)
        })
        .await
    }
}

/// Copies every visible blob of the store in `src` into `dest` (created if missing) with the
/// store's own visibility rule: the metadata file into place first, the data through `tmp/`,
/// fsynced, then renamed; a copy cut short leaves what [`FileStore::open`] removes. A blob
/// that expires meanwhile is skipped. Blobs are never changed once visible, so each copy is
/// exact. Returns how many blobs and bytes were copied. Blocking.
pub(crate) fn copy_all(src: &Path, dest: &Path) -> io::Result<(u64, u64)> {
    let (mut blobs, mut bytes) = (0, 0);
    let tmp = dest.join(TMP);
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(hex_address) = name.to_str().and_then(|n| n.strip_suffix(META_SUFFIX)) else {
            continue;
        };
        let Ok(meta) = std::fs::read(entry.path()) else {
            continue;
        };
        if blobs == 0 {
            std::fs::create_dir_all(&tmp)?;
        }
        let meta_copy = dest.join(&name);
        let mut file = std::fs::File::create(&meta_copy)?;
        io::Write::write_all(&mut file, &meta)?;
        file.sync_all()?;
        let staged = tmp.join(hex_address);
        match std::fs::copy(src.join(hex_address), &staged) {
            Ok(copied) => bytes += copied,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // Expired while we copied: not in the backup.
                std::fs::remove_file(&meta_copy)?;
                continue;
            }
            Err(err) => return Err(err),
        }
        std::fs::File::open(&staged)?.sync_all()?;
        std::fs::rename(&staged, dest.join(hex_address))?;
        blobs += 1;
    }
    if blobs > 0 {
        std::fs::remove_dir(&tmp)?;
        fsync_dir(dest)?;
    }
    Ok((blobs, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(owner: &str, size: u64) -> BlobMeta {
        BlobMeta {
            owner: owner.parse().unwrap(),
            token: [9; BLOB_TOKEN_LEN],
            size,
            created_secs: 100,
        }
    }

    #[tokio::test]
    async fn what_a_killed_process_leaves_is_removed_at_start_and_usage_is_recounted() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut upload = store.begin(meta("alice@example.org", 5)).await.unwrap();
        store
            .write(&mut upload, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let address = [1u8; BLOB_ADDRESS_LEN];
        store.commit(upload, address, 5).await.unwrap();
        // A temporary file (killed mid-upload) and a metadata file without data (killed
        // between the two renames).
        std::fs::write(dir.path().join(TMP).join("partial"), b"half").unwrap();
        // A metadata file staged by a commit killed before its renames.
        std::fs::copy(
            store.meta_path(&address),
            dir.path().join(TMP).join(format!("staged{META_SUFFIX}")),
        )
        .unwrap();
        let orphan = store.meta_path(&[2u8; BLOB_ADDRESS_LEN]);
        std::fs::copy(store.meta_path(&address), &orphan).unwrap();
        drop(store);

        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(TMP)).unwrap().count(), 0);
        assert!(!orphan.exists());
        let alice = "alice@example.org".parse().unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 5);
        assert!(store.open(&[2u8; 32], 0).await.unwrap().is_none());
        let (found, _) = store.open(&address, 0).await.unwrap().unwrap();
        assert_eq!(found, meta("alice@example.org", 5));

        // An upload dropped before its commit leaves nothing.
        let mut dropped = store.begin(meta("alice@example.org", 5)).await.unwrap();
        store
            .write(&mut dropped, Bytes::from_static(b"never"))
            .await
            .unwrap();
        drop(dropped);
        assert!(nothing_staged_soon(dir.path()).await);

        // Expiry removes both files and gives the quota back.
        assert_eq!(store.expire(101).await.unwrap(), 1);
        assert_eq!(store.usage(&alice).await.unwrap(), 0);
        assert!(store.open(&address, 0).await.unwrap().is_none());
    }

    fn staged(dir: &Path) -> usize {
        std::fs::read_dir(dir.join(TMP)).unwrap().count()
    }

    /// Whether `tmp/` is empty within 5 s (a dropped upload's files are removed on the
    /// blocking pool, once the jobs making them ended).
    async fn nothing_staged_soon(dir: &Path) -> bool {
        for _ in 0..500 {
            if staged(dir) == 0 {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        staged(dir) == 0
    }

    async fn upload(store: &FileStore, data: &[u8], meta: BlobMeta) -> FileUpload {
        let mut upload = store.begin(meta).await.unwrap();
        // Uneven chunks, so flushes start while writes are still running.
        for chunk in data.chunks(200_003) {
            store
                .write(&mut upload, Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
        }
        upload
    }

    #[tokio::test]
    async fn uploads_dropped_while_their_files_are_created_leave_nothing_staged() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        // Dropped at once (a stream cut right after its request): the files are still being
        // created on the blocking pool, and are removed once they exist.
        for _ in 0..32 {
            drop(store.begin(meta("alice@example.org", 5)).await.unwrap());
        }
        assert!(
            nothing_staged_soon(dir.path()).await,
            "{} files left in tmp/",
            staged(dir.path())
        );
    }

    #[tokio::test]
    async fn a_large_upload_is_stored_exactly_and_every_commit_leaves_nothing_staged() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        // Many times the writeback step: flushes run while the upload goes on.
        let data: Vec<u8> = (0..5 * 1024 * 1024 + 7)
            .map(|i: usize| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        let size = data.len() as u64;
        let address = [3u8; BLOB_ADDRESS_LEN];

        // Refused for the quota: nothing visible, nothing counted, nothing left in tmp/.
        let refused = upload(&store, &data, meta("alice@example.org", size)).await;
        let err = store.commit(refused, address, size - 1).await.unwrap_err();
        assert!(matches!(err, ServiceError::BlobQuotaExceeded), "{err}");
        assert!(store.open(&address, 0).await.unwrap().is_none());
        assert_eq!(store.usage(&alice).await.unwrap(), 0);
        assert_eq!(staged(dir.path()), 0);

        // Stored: every byte, from the start and from an offset.
        let stored = upload(&store, &data, meta("alice@example.org", size)).await;
        store.commit(stored, address, size).await.unwrap();
        assert_eq!(staged(dir.path()), 0);
        assert_eq!(std::fs::read(store.data_path(&address)).unwrap(), data);
        let (found, mut reader) = store.open(&address, 1_000_000).await.unwrap().unwrap();
        assert_eq!(found, meta("alice@example.org", size));
        let mut tail = Vec::new();
        reader.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, data[1_000_000..]);
        assert_eq!(store.usage(&alice).await.unwrap(), size);

        // The same bytes again (by bob): the stored blob answers, its owner and quota
        // unchanged, and the second upload's files are gone.
        let again = upload(&store, &data, meta("bob@example.org", size)).await;
        let answered = store.commit(again, address, size).await.unwrap();
        assert_eq!(answered, meta("alice@example.org", size));
        assert_eq!(staged(dir.path()), 0);
        let bob: UserId = "bob@example.org".parse().unwrap();
        assert_eq!(store.usage(&bob).await.unwrap(), 0);
        assert_eq!(std::fs::read(store.data_path(&address)).unwrap(), data);
    }
}
