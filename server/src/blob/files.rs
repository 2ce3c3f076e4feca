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
//! metadata file into place, then the data file, and fsyncs the directory. A blob is visible only when both files exist, so a partial upload never is; a
//! process killed at any point leaves files in `tmp/` (removed at start) or a metadata file
//! without its data (removed by the start scan).
//!
//! **Nothing is read per stored blob on the request path or in the minute sweep.** Expiry
//! goes by buckets of upload time: `expiry/<start>+<width>/<address>` is an empty marker
//! for a blob committed (or renewed: in the new time's bucket), made by the next sweep (or the
//! shutdown) off the request path, and the sweep lists only the bucket directories, opening
//! those that ended before the cutoff; a blob is so deleted up to one bucket's width after it
//! expired (downloads refuse it from its expiry on; the width is 1/64 of
//! `blobs.expiry_secs`, at most an hour). A blob the sweep cannot delete (its metadata file
//! unreadable) keeps its marker for the next sweep and holds up no other.
//!
//! The per-owner usage the quota needs is left by a clean shutdown in `tmp/usage.json`, with
//! the stamps (inode, ctime) of the store's directory, `expiry/` and every bucket, after the
//! waiting markers were made and fsynced; the next start takes it only while every stamp is
//! as it was. Otherwise (a crash, a change by hand, a store of an older layout) a thread of
//! its own scans the metadata files while the server serves: it counts, removes metadata
//! files without data and makes the markers a crash lost (markers are not fsynced when made:
//! a start either scans or finds them fsynced by the shutdown). Only uploads, and the sweep,
//! wait for the count; a metadata file that cannot be read is retried for
//! [`SCAN_PATIENCE`], then left out of the count (logged as an error; each sweep tries it
//! again and counts it once it can be read; the next start scans again).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
/// The directory of the expiry buckets.
const EXPIRY: &str = "expiry";
/// The widest expiry bucket: how late at most a blob is deleted after it expired.
const MAX_BUCKET_SECS: u64 = 3600;
/// How long an upload waits for the start scan's count before it is answered UNAVAILABLE
/// (with a retry delay).
const COUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the start scan retries a metadata file it cannot read (an I/O error, a
/// permission) before it counts without it, so that one bad file does not hold up every
/// upload for good.
const SCAN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
/// Blobs waiting for their expiry marker ([`Usage::unmarked`]) held at most: beyond (markers
/// failing for a long time under many uploads) a blob waits for the next start's scan.
const MAX_UNMARKED: usize = 1 << 20;
/// Metadata files the start scan could not read held at most for the sweeps to try again
/// ([`Usage::unreadable`]); beyond, their blobs wait for the next start's scan.
const MAX_UNREADABLE: usize = 1 << 16;
/// The usage count a clean shutdown leaves for the next start, in `tmp/`: read before `tmp/`
/// is emptied at start (an older roost, which does not read it, empties `tmp/` too).
const USAGE_SNAPSHOT: &str = "usage.json";
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
    usage: Arc<Usage>,
    /// The width of the expiry buckets new markers go into.
    bucket_secs: u64,
    /// Injected write failures (tests only).
    faults: Option<Faults>,
}

/// Bytes of stored blobs per owner: `None` until the start scan counted them, then kept up to
/// date. Commits and deletions change files and this map under the same lock.
struct Usage {
    bytes: Mutex<Option<HashMap<UserId, u64>>>,
    counted: tokio::sync::watch::Sender<bool>,
    /// Set when a change of the files failed half-way (the count or the markers may be off
    /// until the next scan): the shutdown then leaves no snapshot.
    dirty: AtomicBool,
    /// Set by the shutdown: a start scan still running stops and publishes nothing.
    closed: AtomicBool,
    /// Blobs without their expiry marker yet, with the upload time they were last committed
    /// or renewed with: committed or renewed since the last sweep, or not markable by the
    /// start scan (a full disk). Each sweep (and the shutdown) marks them, or deletes those
    /// expired meanwhile.
    unmarked: Mutex<Unmarked>,
    /// Set once [`Usage::unmarked`] overflowed (warned once).
    overflowed: AtomicBool,
    /// Names of metadata files the start scan could not read and left out of the count:
    /// each sweep tries them again, counts those it can read and removes those of blobs
    /// that were never visible.
    unreadable: Mutex<Vec<std::ffi::OsString>>,
    /// Held by a sweep for its whole run and by the shutdown, so that the shutdown never
    /// takes its snapshot while a sweep holds blobs it has not marked yet. Taken before
    /// `bytes`.
    sweeping: Mutex<()>,
}

impl Usage {
    fn new(saved: Option<HashMap<UserId, u64>>) -> Self {
        Self {
            counted: tokio::sync::watch::Sender::new(saved.is_some()),
            bytes: Mutex::new(saved),
            dirty: Default::default(),
            closed: Default::default(),
            unmarked: Default::default(),
            overflowed: Default::default(),
            unreadable: Default::default(),
            sweeping: Mutex::new(()),
        }
    }

    fn spoil(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Remembers that `address`, committed or renewed at `created_secs`, has no marker for
    /// that time yet.
    fn unmark(&self, address: [u8; BLOB_ADDRESS_LEN], created_secs: u64) {
        let mut unmarked = lock(&self.unmarked);
        if unmarked.len() >= MAX_UNMARKED && !unmarked.contains_key(&address) {
            drop(unmarked);
            self.spoil();
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "too many blobs wait for an expiry marker: the next start marks the rest"
                );
            }
            return;
        }
        let at = unmarked.entry(address).or_insert(created_secs);
        *at = (*at).max(created_secs);
    }

    /// Puts back blobs a sweep took and could not mark (nor delete).
    fn unmark_all(&self, still: Unmarked) {
        for (address, created_secs) in still {
            self.unmark(address, created_secs);
        }
    }
}

/// Blobs without their expiry marker: address → upload time.
type Unmarked = HashMap<[u8; BLOB_ADDRESS_LEN], u64>;

/// [`USAGE_SNAPSHOT`]: bytes of stored blobs per owner, and the directories it counted as
/// they were then. A blob added or removed since (by hand, or by a roost that does not keep
/// the snapshot) changes a directory's ctime, and the snapshot is not used. (A ctime is as
/// fine as the file system keeps it; on Linux before 6.13 a clock tick, so a change by hand
/// within a few milliseconds of the shutdown's last change would go unseen.)
#[derive(Serialize, Deserialize)]
struct Snapshot {
    owners: HashMap<String, u64>,
    dirs: Stamps,
}

/// The directories a snapshot depends on, as they were when it was taken: a blob added or
/// removed changes the store's directory, a marker added or removed its bucket's, a bucket
/// added or removed `expiry/`'s.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct Stamps {
    store: DirStamp,
    expiry: DirStamp,
    /// Every bucket's, by name.
    buckets: BTreeMap<String, DirStamp>,
}

impl Stamps {
    /// `None` when one cannot be read (the snapshot is then not written, or not used).
    fn of(dir: &Path) -> Option<Self> {
        let expiry = dir.join(EXPIRY);
        let mut buckets = BTreeMap::new();
        for entry in std::fs::read_dir(&expiry).ok()? {
            let entry = entry.ok()?;
            if entry.file_type().ok()?.is_dir() {
                let name = entry.file_name().into_string().ok()?;
                buckets.insert(name, DirStamp::of(&entry.path())?);
            }
        }
        Some(Self {
            store: DirStamp::of(dir)?,
            expiry: DirStamp::of(&expiry)?,
            buckets,
        })
    }
}

/// A directory's inode and the time its entries last changed.
#[derive(Serialize, Deserialize, PartialEq, Eq, Clone, Copy, Debug)]
struct DirStamp {
    ino: u64,
    ctime_secs: i64,
    ctime_nanos: i64,
}

impl DirStamp {
    #[cfg(unix)]
    fn of(dir: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir).ok()?;
        Some(Self {
            ino: meta.ino(),
            ctime_secs: meta.ctime(),
            ctime_nanos: meta.ctime_nsec(),
        })
    }

    /// Without a ctime the snapshot is never trusted: every start counts.
    #[cfg(not(unix))]
    fn of(_dir: &Path) -> Option<Self> {
        None
    }
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
    /// Opens (creating) the directory and removes what a killed process left in `tmp/`; a
    /// thread of its own then counts each owner's stored bytes ([`Usage`]). Blobs expire
    /// `expiry_secs` after their upload.
    pub(crate) fn open(dir: &Path, expiry_secs: u64) -> Result<Self, StoreError> {
        Self::open_with(dir, expiry_secs, SCAN_PATIENCE)
    }

    /// [`FileStore::open`] whose start scan retries unreadable metadata files for `patience`.
    fn open_with(
        dir: &Path,
        expiry_secs: u64,
        patience: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let store_err = |err: io::Error| StoreError::Io(format!("{}: {err}", dir.display()).into());
        let tmp = dir.join(TMP);
        // What a clean shutdown counted, if it did and nothing changed the directories since;
        // removed with the rest of `tmp/` (fsynced) before anything can change, so that a
        // crash from here on leads to a scan.
        let saved = std::fs::read(tmp.join(USAGE_SNAPSHOT))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Snapshot>(&bytes).ok())
            .filter(|saved| Stamps::of(dir).as_ref() == Some(&saved.dirs))
            .and_then(|saved| {
                saved
                    .owners
                    .into_iter()
                    .map(|(owner, bytes)| Some((owner.parse().ok()?, bytes)))
                    .collect::<Option<HashMap<UserId, u64>>>()
            });
        std::fs::create_dir_all(&tmp).map_err(store_err)?;
        let mut emptied = false;
        for entry in std::fs::read_dir(&tmp).map_err(store_err)? {
            let entry = entry.map_err(store_err)?;
            std::fs::remove_file(entry.path()).map_err(store_err)?;
            emptied = true;
        }
        if emptied {
            fsync_dir(&tmp).map_err(store_err)?;
        }
        std::fs::create_dir_all(dir.join(EXPIRY)).map_err(store_err)?;
        let bucket_secs = (expiry_secs / 64).clamp(1, MAX_BUCKET_SECS);
        let usage = Arc::new(Usage::new(saved));
        if !*usage.counted.borrow() {
            let (weak, scanned) = (Arc::downgrade(&usage), dir.to_owned());
            std::thread::Builder::new()
                .name("roost-blob-count".into())
                .spawn(move || count_usage(&weak, &scanned, bucket_secs, patience))
                .map_err(store_err)?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            usage,
            bucket_secs,
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

    /// Ends the store's writes and leaves the usage count for the next start, so that it
    /// need not scan: the waiting expiry markers are made, every marker and bucket fsynced,
    /// then the count written with the directories' stamps. A store still being counted stops
    /// its scan and leaves nothing, as does one whose count or markers may be off (a change
    /// of the files failed half-way). Every later commit and deletion fails (UNAVAILABLE).
    /// Blocking.
    pub(crate) fn shut(&self) -> io::Result<()> {
        self.usage.closed.store(true, Ordering::SeqCst);
        let _sweeping = lock(&self.usage.sweeping);
        // Taken under the lock every change of the files holds: none is half-way now, and
        // none starts after.
        let Some(owners) = lock(&self.usage.bytes).take() else {
            return Ok(());
        };
        let unmarked = std::mem::take(&mut *lock(&self.usage.unmarked));
        let marked = unmarked.iter().all(|(address, created_secs)| {
            mark(
                &self.dir,
                self.bucket_secs,
                &hex::encode(address),
                *created_secs,
            )
            .is_ok()
        });
        if !marked || self.usage.dirty.load(Ordering::Relaxed) {
            return Err(io::Error::other(
                "a change of the blob files or an expiry marker failed while the server ran",
            ));
        }
        let expiry = self.dir.join(EXPIRY);
        for bucket in std::fs::read_dir(&expiry)? {
            fsync_dir(&bucket?.path())?;
        }
        fsync_dir(&expiry)?;
        let Some(dirs) = Stamps::of(&self.dir) else {
            return Ok(());
        };
        let snapshot = Snapshot {
            owners: owners
                .into_iter()
                .map(|(owner, bytes)| (owner.to_string(), bytes))
                .collect(),
            dirs,
        };
        let staged = self.staging_path("");
        write_synced(
            &staged,
            &serde_json::to_vec(&snapshot).map_err(io::Error::other)?,
        )?;
        let tmp = self.dir.join(TMP);
        std::fs::rename(&staged, tmp.join(USAGE_SNAPSHOT))?;
        fsync_dir(&tmp)
    }

    /// Waits until the start scan counted every owner's bytes (a store being counted answers
    /// UNAVAILABLE after [`COUNT_WAIT`]: the client retries after the delay it is given).
    async fn counted(&self) -> Result<(), ServiceError> {
        let mut counted = self.usage.counted.subscribe();
        match tokio::time::timeout(COUNT_WAIT, counted.wait_for(|done| *done)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ServiceError::Store(StoreError::Unavailable)),
        }
    }
}

/// The name of the expiry bucket of uploads at `created_secs`.
fn bucket_name(created_secs: u64, bucket_secs: u64) -> String {
    let start = created_secs - created_secs % bucket_secs;
    format!("{start}+{bucket_secs}")
}

/// When the uploads of the bucket named `name` stop: every blob in it was uploaded before.
fn bucket_end(name: &str) -> Option<u64> {
    let (start, width) = name.split_once('+')?;
    start.parse::<u64>().ok()?.checked_add(width.parse().ok()?)
}

/// Marks the blob `hex_address` uploaded at `created_secs` in its expiry bucket (an empty
/// file; not fsynced: the start scan remakes a marker a crash lost). Blocking.
fn mark(dir: &Path, bucket_secs: u64, hex_address: &str, created_secs: u64) -> io::Result<()> {
    let bucket = dir
        .join(EXPIRY)
        .join(bucket_name(created_secs, bucket_secs));
    let marker = bucket.join(hex_address);
    let create = |path: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(drop)
    };
    match create(&marker) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&bucket)?;
            create(&marker)
        }
        done => done,
    }
}

/// The start scan, in a thread of its own: counts each owner's bytes, removes metadata files
/// without data (a process killed between a commit's two renames, or an expiry between its
/// two removals) and remakes missing expiry markers, then publishes the count. Retries after
/// an I/O error (after `patience`, metadata files that still cannot be read are left out);
/// ends early when the store was dropped or shut.
fn count_usage(
    usage: &std::sync::Weak<Usage>,
    dir: &Path,
    bucket_secs: u64,
    patience: std::time::Duration,
) {
    let mut delay = std::time::Duration::from_millis(100);
    let started = std::time::Instant::now();
    loop {
        let lenient = started.elapsed() >= patience;
        match scan(usage, dir, bucket_secs, lenient) {
            Ok(Some(scanned)) => {
                let Some(usage) = usage.upgrade() else { return };
                let mut bytes = lock(&usage.bytes);
                if usage.closed.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(first) = scanned.unreadable.first() {
                    // The next start scans again (no snapshot).
                    usage.spoil();
                    tracing::error!(
                        files = scanned.unreadable.len(),
                        first = %dir.join(first).display(),
                        "blob metadata files that cannot be read: their blobs are not served, counted toward quotas or expired until the files can be read again (each sweep tries them)"
                    );
                }
                let mut unreadable = scanned.unreadable;
                unreadable.truncate(MAX_UNREADABLE);
                *lock(&usage.unreadable) = unreadable;
                if !scanned.unmarked.is_empty() {
                    tracing::warn!(
                        blobs = scanned.unmarked.len(),
                        "stored blobs without an expiry marker (the disk is full?): each sweep looks at them"
                    );
                }
                *lock(&usage.unmarked) = scanned.unmarked;
                let (owners, elapsed) = (scanned.counted.len(), started.elapsed());
                let elapsed_ms = elapsed.as_millis() as u64;
                // Worth an operator's attention only when uploads waited for it.
                if elapsed >= std::time::Duration::from_secs(1) {
                    tracing::info!(owners, elapsed_ms, "stored blobs counted; uploads accepted");
                } else {
                    tracing::debug!(owners, elapsed_ms, "stored blobs counted");
                }
                *bytes = Some(scanned.counted);
                drop(bytes);
                usage.counted.send_replace(true);
                return;
            }
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(dir = %dir.display(), %err, "counting the stored blobs failed; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
                if stopped(usage) {
                    return;
                }
            }
        }
    }
}

/// Whether the store a start scan counts for was dropped or shut.
fn stopped(usage: &std::sync::Weak<Usage>) -> bool {
    usage
        .upgrade()
        .is_none_or(|usage| usage.closed.load(Ordering::SeqCst))
}

/// What the start scan counted.
#[derive(Default)]
struct Scanned {
    /// Bytes per owner.
    counted: HashMap<UserId, u64>,
    /// Blobs it could not mark.
    unmarked: Unmarked,
    /// Names of metadata files it could not read (or remove), left out (only when lenient).
    unreadable: Vec<std::ffi::OsString>,
}

impl Scanned {
    fn add(&mut self, part: Scanned) {
        for (owner, bytes) in part.counted {
            let counted = self.counted.entry(owner).or_default();
            *counted = counted.saturating_add(bytes);
        }
        self.unmarked.extend(part.unmarked);
        self.unreadable.extend(part.unreadable);
    }
}

/// Threads of the start scan reading metadata files. From a cold cache the scan waits for the
/// disk, one small read after another; with eight reads in flight 100,000 blobs are counted
/// 2.8 times as fast on this machine (10.2-10.7 s → 3.6-3.7 s; BENCHMARKS.md).
const SCAN_THREADS: usize = 8;
/// Metadata file names handed to a scan thread at a time (in tests a few, so that small
/// stores fill the channel).
const SCAN_BATCH: usize = if cfg!(test) { 4 } else { 256 };

/// One pass of [`count_usage`]; `None` when the store was dropped or shut meanwhile. Nothing
/// else changes the files while it runs: commits and the sweep wait for the count. This
/// thread lists the directory and hands the metadata files' names in batches to
/// [`SCAN_THREADS`] threads, which look at each ([`look_at`]); their counts are added up. A
/// metadata file that cannot be read (as opposed to one that is missing or does not decode)
/// fails the pass, which is retried: a visible blob is never taken for a leftover. A
/// `lenient` pass leaves such files as they are and out of the count instead.
fn scan(
    usage: &std::sync::Weak<Usage>,
    dir: &Path,
    bucket_secs: u64,
    lenient: bool,
) -> io::Result<Option<Scanned>> {
    let (batches, to_look_at) =
        std::sync::mpsc::sync_channel::<Vec<std::ffi::OsString>>(2 * SCAN_THREADS);
    let to_look_at = Mutex::new(to_look_at);
    // Set by a thread that failed or found the store gone: the others only drain the batches
    // (so that the listing never waits on a full channel) and the listing stops.
    let ended = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut outcome: io::Result<Option<()>> = Ok(Some(()));
        let mut threads = Vec::with_capacity(SCAN_THREADS);
        for _ in 0..SCAN_THREADS {
            let spawned = std::thread::Builder::new()
                .name("roost-blob-count".into())
                .spawn_scoped(scope, || -> io::Result<Option<Scanned>> {
                    let mut part = Scanned::default();
                    let mut looked = Ok(Some(()));
                    loop {
                        // (The lock is let go before the batch is looked at.)
                        let next = lock(&to_look_at).recv();
                        let Ok(batch) = next else { break };
                        for name in batch {
                            if ended.load(Ordering::Relaxed) {
                                break;
                            }
                            looked = if stopped(usage) {
                                Ok(None)
                            } else {
                                // A panic fails the pass (retried) rather than the count.
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    look_at(dir, bucket_secs, lenient, &name, &mut part)
                                }))
                                .unwrap_or_else(|_| {
                                    Err(io::Error::other("looking at a metadata file panicked"))
                                })
                                .map(Some)
                            };
                            if !matches!(looked, Ok(Some(()))) {
                                ended.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                    looked.map(|looked| looked.map(|()| part))
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(err) => {
                    outcome = Err(err);
                    ended.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let listed = (|| -> io::Result<()> {
            let mut batch = Vec::with_capacity(SCAN_BATCH);
            for entry in std::fs::read_dir(dir)? {
                if ended.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let name = entry?.file_name();
                if !name.to_str().is_some_and(|n| n.ends_with(META_SUFFIX)) {
                    continue;
                }
                batch.push(name);
                if batch.len() == SCAN_BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(SCAN_BATCH));
                    let _ = batches.send(full);
                }
            }
            let _ = batches.send(batch);
            Ok(())
        })();
        if let Err(err) = listed {
            ended.store(true, Ordering::Relaxed);
            if outcome.is_ok() {
                outcome = Err(err);
            }
        }
        // The threads end once they took every batch.
        drop(batches);
        let mut scanned = Scanned::default();
        for thread in threads {
            let part = thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a thread of the scan panicked")));
            match (part, &outcome) {
                (Ok(Some(part)), Ok(Some(()))) => scanned.add(part),
                (Err(err), Ok(_)) => outcome = Err(err),
                (Ok(None), Ok(Some(()))) => outcome = Ok(None),
                _ => {}
            }
        }
        outcome.map(|looked| looked.map(|()| scanned))
    })
}

/// Looks at the metadata file `name` for [`scan`]: counts its blob and makes its marker if
/// missing, or removes it if its blob was never visible (no data, or it does not decode).
fn look_at(
    dir: &Path,
    bucket_secs: u64,
    lenient: bool,
    name: &std::ffi::OsStr,
    scanned: &mut Scanned,
) -> io::Result<()> {
    let path = dir.join(name);
    let Some(hex_address) = name.to_str().and_then(|n| n.strip_suffix(META_SUFFIX)) else {
        return Ok(());
    };
    let looked = (|| -> io::Result<Option<([u8; BLOB_ADDRESS_LEN], BlobMeta)>> {
        let mut address = [0u8; BLOB_ADDRESS_LEN];
        let meta = match read_meta(&path)? {
            Some(meta) if hex::decode_to_slice(hex_address, &mut address).is_ok() => meta,
            // Never visible: it does not decode, or names no blob.
            _ => return Ok(None),
        };
        if !dir.join(hex_address).try_exists()? {
            // Never visible: its data is missing.
            return Ok(None);
        }
        Ok(Some((address, meta)))
    })();
    match looked {
        Ok(Some((address, meta))) => {
            let marker = dir
                .join(EXPIRY)
                .join(bucket_name(meta.created_secs, bucket_secs))
                .join(hex_address);
            // A marker that cannot be looked at is made again, or remembered.
            if !marker.try_exists().unwrap_or(false)
                && mark(dir, bucket_secs, hex_address, meta.created_secs).is_err()
            {
                scanned.unmarked.insert(address, meta.created_secs);
            }
            let counted = scanned.counted.entry(meta.owner).or_default();
            *counted = counted.saturating_add(meta.size);
            Ok(())
        }
        Ok(None) => match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(_) if lenient => {
                scanned.unreadable.push(name.to_owned());
                Ok(())
            }
            Err(err) => Err(err),
        },
        Err(_) if lenient => {
            scanned.unreadable.push(name.to_owned());
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// A blob's metadata: `None` if the file is missing or does not decode (never visible).
fn read_meta(path: &Path) -> io::Result<Option<BlobMeta>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    Ok(decode_meta(&bytes))
}

fn decode_meta(bytes: &[u8]) -> Option<BlobMeta> {
    let file: MetaFile = serde_json::from_slice(bytes).ok()?;
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
        self.counted().await?;
        let staged_meta = upload.meta_path.clone();
        let meta = upload.meta.clone();
        let store = self.clone();
        let tmp = upload.path.clone();
        let committed = blocking(move || {
            // The bytes are on the disk; now the names.
            let data = store.data_path(&address);
            let meta_path = store.meta_path(&address);
            let mut guard = lock(&store.usage.bytes);
            let usage = guard
                .as_mut()
                .ok_or(ServiceError::Store(StoreError::Unavailable))?;
            let existing = match data.try_exists().map_err(io_error)? {
                true => read_meta(&meta_path).map_err(io_error)?,
                false => None,
            };
            if let Some(existing) = existing {
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
                    .map_err(|err| {
                        // Whether the new time is in place is not known: the next start
                        // scans, and until then the blob is marked for both times.
                        store.usage.spoil();
                        store.usage.unmark(address, renewed.created_secs);
                        io_error(err)
                    })?;
                // Marked in the new time's bucket by the next sweep; the old bucket's sweep
                // finds the blob renewed and leaves it.
                store.usage.unmark(address, renewed.created_secs);
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
                // The count follows what readers see: a blob whose data is in place is
                // visible (the failed flush notwithstanding) and counts; the next start
                // scans again rather than trust this run's count.
                store.usage.spoil();
                if data.try_exists().unwrap_or(true) {
                    *usage.entry(meta.owner.clone()).or_default() += meta.size;
                    store.usage.unmark(address, meta.created_secs);
                } else {
                    let _ = std::fs::remove_file(&meta_path);
                }
                return Err(io_error(err));
            }
            *usage.entry(meta.owner.clone()).or_default() += meta.size;
            // Its marker is made by the next sweep, off the request path.
            store.usage.unmark(address, meta.created_secs);
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
        let meta_path = self.meta_path(address);
        let Some(meta) = blocking(move || read_meta(&meta_path).map_err(io_error)).await? else {
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
        self.counted().await?;
        let guard = lock(&self.usage.bytes);
        let usage = guard
            .as_ref()
            .ok_or(ServiceError::Store(StoreError::Unavailable))?;
        Ok(usage.get(owner).copied().unwrap_or(0))
    }

    /// Deletes the blobs of every expiry bucket that ended by `created_before_secs` (unless
    /// renewed since); what the sweep reads is the bucket directories' names and the blobs it
    /// deletes. Before the start scan counted the usage, nothing (the next sweep does it). A
    /// blob it cannot delete keeps its marker (or its place among the unmarked) for the next
    /// sweep, and the sweep goes on with the others.
    async fn expire(&self, created_before_secs: u64) -> Result<u64, ServiceError> {
        if !*self.usage.counted.borrow() {
            return Ok(0);
        }
        let store = self.clone();
        blocking(move || {
            let _sweeping = lock(&store.usage.sweeping);
            if store.usage.closed.load(Ordering::SeqCst) {
                return Err(ServiceError::Store(StoreError::Unavailable));
            }
            let mut failed = Failed::default();
            store.recount_unreadable(&mut failed);
            let mut removed = store.mark_waiting(created_before_secs, &mut failed);
            let buckets = store.dir.join(EXPIRY);
            for bucket in std::fs::read_dir(&buckets).map_err(io_error)? {
                // A shutdown waits for the sweep: what is left goes with the next one.
                if store.usage.closed.load(Ordering::SeqCst) {
                    break;
                }
                let bucket = bucket.map_err(io_error)?;
                let ended = bucket.file_name().to_str().and_then(bucket_end);
                // Only directories with a bucket's name are ours.
                let ours = bucket.file_type().is_ok_and(|kind| kind.is_dir());
                if !ours || ended.is_none_or(|end| end > created_before_secs) {
                    continue;
                }
                let markers = match std::fs::read_dir(bucket.path()) {
                    Ok(markers) => markers,
                    Err(err) => {
                        failed.note(io_error(err));
                        continue;
                    }
                };
                for marker in markers {
                    let marker = match marker {
                        Ok(marker) => marker,
                        Err(err) => {
                            failed.note(io_error(err));
                            break;
                        }
                    };
                    let mut address = [0u8; BLOB_ADDRESS_LEN];
                    let named = marker
                        .file_name()
                        .to_str()
                        .is_some_and(|name| hex::decode_to_slice(name, &mut address).is_ok());
                    if named {
                        match store.remove_expired(&address, created_before_secs) {
                            Ok(gone) => removed += u64::from(gone),
                            Err(err) => {
                                // Its marker stays: the next sweep tries again.
                                failed.note(err);
                                continue;
                            }
                        }
                    }
                    match std::fs::remove_file(marker.path()) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        // Not ours (a directory put there by hand): left alone.
                        Err(_) if !named => {}
                        Err(err) => failed.note(io_error(err)),
                    }
                }
                // Removed once empty: commits mark only buckets that have not ended.
                let _ = std::fs::remove_dir(bucket.path());
            }
            if let Some(first) = failed.first {
                tracing::warn!(
                    blobs = failed.count,
                    err = %first,
                    "expired blobs the sweep could not delete; the next sweep tries again"
                );
            }
            Ok(removed)
        })
        .await
    }
}

/// What a sweep could not do: how many times, and the first error.
#[derive(Default)]
struct Failed {
    count: u64,
    first: Option<ServiceError>,
}

impl Failed {
    fn note(&mut self, err: ServiceError) {
        self.count += 1;
        self.first.get_or_insert(err);
    }
}

impl FileStore {
    /// Deletes the blob at `address` if it was uploaded (or last renewed) before
    /// `created_before_secs`, giving its bytes back to its owner's quota. Blocking.
    fn remove_expired(
        &self,
        address: &[u8; BLOB_ADDRESS_LEN],
        created_before_secs: u64,
    ) -> Result<bool, ServiceError> {
        let mut guard = lock(&self.usage.bytes);
        let meta_path = self.meta_path(address);
        // Read under the lock: a renewal rewrites it under the same lock. A read that fails
        // (rather than finding nothing) keeps the blob, and its marker, for the next sweep.
        let Some(meta) = read_meta(&meta_path).map_err(io_error)? else {
            return Ok(false);
        };
        if meta.created_secs >= created_before_secs {
            return Ok(false);
        }
        let Some(usage) = guard.as_mut() else {
            return Err(ServiceError::Store(StoreError::Unavailable));
        };
        // Data first: without it the blob is invisible, and no longer counts. Only a blob
        // whose data was there was counted (a metadata file left by a failed commit never
        // was).
        let visible = match std::fs::remove_file(self.data_path(address)) {
            Ok(()) => true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            Err(err) => return Err(io_error(err)),
        };
        if visible && let Some(used) = usage.get_mut(&meta.owner) {
            *used = used.saturating_sub(meta.size);
        }
        if let Err(err) = std::fs::remove_file(&meta_path) {
            // A metadata file without data: never visible; the next start's scan removes it.
            self.usage.spoil();
            return Err(io_error(err));
        }
        Ok(visible)
    }

    /// The metadata files the start scan could not read ([`Usage::unreadable`]), tried again:
    /// the blob of one now readable is counted and waits for its marker (the marking deletes
    /// it if it expired meanwhile); one whose blob was never visible (no data, or it does not
    /// decode) is removed, as the scan would have. Blocking.
    fn recount_unreadable(&self, failed: &mut Failed) {
        let waiting = std::mem::take(&mut *lock(&self.usage.unreadable));
        let mut still = Vec::new();
        for name in waiting {
            if let Err(err) = self.recount(&name) {
                failed.note(err);
                still.push(name);
            }
        }
        lock(&self.usage.unreadable).extend(still);
    }

    /// [`FileStore::recount_unreadable`] of one metadata file.
    fn recount(&self, name: &std::ffi::OsStr) -> Result<(), ServiceError> {
        let path = self.dir.join(name);
        let mut guard = lock(&self.usage.bytes);
        let Some(usage) = guard.as_mut() else {
            return Err(ServiceError::Store(StoreError::Unavailable));
        };
        let mut address = [0u8; BLOB_ADDRESS_LEN];
        let named = name
            .to_str()
            .and_then(|n| n.strip_suffix(META_SUFFIX))
            .is_some_and(|hex_address| hex::decode_to_slice(hex_address, &mut address).is_ok());
        let meta = read_meta(&path).map_err(io_error)?.filter(|_| named);
        match meta {
            Some(meta) if self.data_path(&address).try_exists().map_err(io_error)? => {
                let used = usage.entry(meta.owner).or_default();
                *used = used.saturating_add(meta.size);
                self.usage.unmark(address, meta.created_secs);
                Ok(())
            }
            _ => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(io_error(err)),
            },
        }
    }

    /// The blobs without their marker ([`Usage::unmarked`]): each expired one is deleted,
    /// each other one marked; what cannot be deleted or marked now (a full disk) waits for
    /// the next sweep. Returns how many were deleted. Blocking.
    fn mark_waiting(&self, created_before_secs: u64, failed: &mut Failed) -> u64 {
        let waiting = std::mem::take(&mut *lock(&self.usage.unmarked));
        let (mut removed, mut still) = (0, Unmarked::new());
        for (address, created_secs) in waiting {
            if created_secs < created_before_secs {
                match self.remove_expired(&address, created_before_secs) {
                    Ok(gone) => removed += u64::from(gone),
                    Err(err) => {
                        failed.note(err);
                        still.insert(address, created_secs);
                    }
                }
            } else if mark(
                &self.dir,
                self.bucket_secs,
                &hex::encode(address),
                created_secs,
            )
            .is_err()
            {
                still.insert(address, created_secs);
            }
        }
        self.usage.unmark_all(still);
        removed
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
        let store = FileStore::open(dir.path(), 64).unwrap();
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

        let store = FileStore::open(dir.path(), 64).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(TMP)).unwrap().count(), 0);
        // The start scan (usage waits for it) removed the orphan.
        let alice = "alice@example.org".parse().unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 5);
        assert!(!orphan.exists());
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
        let store = FileStore::open(dir.path(), 64).unwrap();
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
        let store = FileStore::open(dir.path(), 64).unwrap();
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

    fn markers(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for bucket in std::fs::read_dir(dir.join(EXPIRY)).unwrap() {
            let bucket = bucket.unwrap();
            if !bucket.file_type().unwrap().is_dir() {
                continue;
            }
            for marker in std::fs::read_dir(bucket.path()).unwrap() {
                let name = marker.unwrap().file_name().into_string().unwrap();
                found.push(format!(
                    "{}/{}",
                    bucket.file_name().into_string().unwrap(),
                    &name[..4]
                ));
            }
        }
        found.sort();
        found
    }

    fn created(owner: &str, size: u64, created_secs: u64) -> BlobMeta {
        BlobMeta {
            created_secs,
            ..meta(owner, size)
        }
    }

    #[tokio::test]
    async fn expiry_deletes_a_bucket_once_it_ended_and_leaves_renewed_blobs() {
        let dir = tempfile::tempdir().unwrap();
        // Buckets of 60 s.
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        let (a, b, c) = ([0xaa; 32], [0xbb; 32], [0xcc; 32]);
        let up = upload(&store, b"aaaa", created("alice@example.org", 4, 100)).await;
        store.commit(up, a, 100).await.unwrap();
        let up = upload(&store, b"bbbbbb", created("alice@example.org", 6, 110)).await;
        store.commit(up, b, 100).await.unwrap();
        let up = upload(&store, b"cc", created("alice@example.org", 2, 130)).await;
        store.commit(up, c, 100).await.unwrap();
        // Markers are made by the next sweep, not by the commits.
        assert!(markers(dir.path()).is_empty());
        assert_eq!(store.expire(0).await.unwrap(), 0);
        assert_eq!(
            markers(dir.path()),
            ["120+60/cccc", "60+60/aaaa", "60+60/bbbb"]
        );
        // b uploaded again at 124 and 125: renewed, waiting once for a marker in the later
        // bucket.
        for at in [124, 125] {
            let up = upload(&store, b"bbbbbb", created("bob@example.org", 6, at)).await;
            assert_eq!(store.commit(up, b, 100).await.unwrap().created_secs, at);
        }
        assert_eq!(*lock(&store.usage.unmarked), HashMap::from([(b, 125)]));
        assert_eq!(store.usage(&alice).await.unwrap(), 12);

        // The first bucket has not ended at 119: nothing goes, although a expired at 101.
        assert_eq!(store.expire(119).await.unwrap(), 0);
        assert!(store.open(&a, 0).await.unwrap().is_some());
        // At 120 it has: a goes, b stays (renewed), the bucket is gone.
        assert_eq!(store.expire(120).await.unwrap(), 1);
        assert!(store.open(&a, 0).await.unwrap().is_none());
        assert!(store.open(&b, 0).await.unwrap().is_some());
        assert_eq!(store.usage(&alice).await.unwrap(), 8);
        assert_eq!(markers(dir.path()), ["120+60/bbbb", "120+60/cccc"]);
        // The second bucket ends at 180: b (renewed at 125) and c go then, not at 179.
        assert_eq!(store.expire(179).await.unwrap(), 0);
        assert_eq!(store.expire(180).await.unwrap(), 2);
        assert_eq!(store.usage(&alice).await.unwrap(), 0);
        assert!(markers(dir.path()).is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join(EXPIRY)).unwrap().count(),
            0
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 2, "only tmp/ and expiry/ are left: {left:?}");
    }

    #[tokio::test]
    async fn markers_a_crash_lost_or_an_older_layout_lacks_are_made_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        let (a, b) = ([0xaa; 32], [0xbb; 32]);
        let up = upload(&store, b"aaaa", created("alice@example.org", 4, 100)).await;
        store.commit(up, a, 100).await.unwrap();
        let up = upload(&store, b"bb", created("bob@example.org", 2, 200)).await;
        store.commit(up, b, 100).await.unwrap();
        drop(store);
        // A store of the layout before expiry buckets: no expiry/ at all.
        std::fs::remove_dir_all(dir.path().join(EXPIRY)).unwrap();

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        let bob: UserId = "bob@example.org".parse().unwrap();
        assert_eq!(store.usage(&bob).await.unwrap(), 2);
        assert_eq!(markers(dir.path()), ["180+60/bbbb", "60+60/aaaa"]);
        assert_eq!(store.expire(240).await.unwrap(), 2);
        assert!(store.open(&a, 0).await.unwrap().is_none());
        assert!(store.open(&b, 0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_clean_shutdown_leaves_the_count_and_the_next_start_needs_no_scan() {
        let dir = tempfile::tempdir().unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        let up = upload(&store, b"aaaa", created("alice@example.org", 4, 100)).await;
        store.commit(up, [0xaa; 32], 100).await.unwrap();
        // An upload still running at shutdown: its commit afterwards fails and shows nothing.
        let late = upload(&store, b"late", created("alice@example.org", 4, 100)).await;
        store.shut().unwrap();
        let err = store.commit(late, [0xbb; 32], 100).await.unwrap_err();
        assert!(
            matches!(err, ServiceError::Store(StoreError::Unavailable)),
            "{err}"
        );
        assert!(store.open(&[0xbb; 32], 0).await.unwrap().is_none());
        drop(store);
        assert!(dir.path().join(TMP).join(USAGE_SNAPSHOT).exists());
        // A figure a scan would not find: the start below takes the snapshot's.
        forge_snapshot(dir.path(), 40);

        // Counted from the start, and the snapshot is gone: a crash from here on scans.
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert!(!dir.path().join(TMP).join(USAGE_SNAPSHOT).exists());
        assert_eq!(store.usage(&alice).await.unwrap(), 40);
        let up = upload(&store, b"cc", created("alice@example.org", 2, 130)).await;
        store.commit(up, [0xcc; 32], 100).await.unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 42);
        drop(store); // killed: no shutdown

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 6);
        assert_eq!(markers(dir.path()), ["120+60/cccc", "60+60/aaaa"]);
        assert_eq!(store.expire(180).await.unwrap(), 2);
        assert_eq!(store.usage(&alice).await.unwrap(), 0);
    }

    /// Rewrites the snapshot a clean shutdown left with `bytes` for alice (its directory
    /// stamps unchanged).
    fn forge_snapshot(dir: &Path, bytes: u64) {
        let path = dir.join(TMP).join(USAGE_SNAPSHOT);
        let mut snapshot: Snapshot =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        snapshot.owners.insert("alice@example.org".into(), bytes);
        std::fs::write(&path, serde_json::to_vec(&snapshot).unwrap()).unwrap();
    }

    #[tokio::test]
    async fn the_snapshot_is_used_only_while_the_directories_are_as_it_left_them() {
        let dir = tempfile::tempdir().unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        let store = two_blobs(dir.path()).await;
        store.shut().unwrap();
        drop(store);

        // Unchanged directories: the snapshot's figure is taken as it is (a scan would count 8).
        forge_snapshot(dir.path(), 1000);
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 1000);
        drop(store); // killed: no snapshot

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 8);
        store.shut().unwrap();
        drop(store);

        // A blob removed by hand while the server was stopped: counted again.
        forge_snapshot(dir.path(), 1000);
        std::fs::remove_file(dir.path().join(hex::encode([0xaa; 32]))).unwrap();
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 4);
        store.shut().unwrap();
        drop(store);

        // An expiry bucket removed by hand: counted again, and its markers made anew.
        forge_snapshot(dir.path(), 1000);
        std::fs::remove_dir_all(dir.path().join(EXPIRY).join("120+60")).unwrap();
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 4);
        assert_eq!(markers(dir.path()), ["120+60/bbbb", "60+60/aaaa"]);
        store.shut().unwrap();
        drop(store);

        // A marker removed by hand (its bucket stays): counted again, and the marker made
        // anew, so that the blob still expires.
        forge_snapshot(dir.path(), 1000);
        let bucket = dir.path().join(EXPIRY).join("120+60");
        std::fs::remove_file(bucket.join(hex::encode([0xbb; 32]))).unwrap();
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 4);
        assert_eq!(markers(dir.path()), ["120+60/bbbb", "60+60/aaaa"]);
        assert_eq!(store.expire(180).await.unwrap(), 1);
    }

    fn created_meta(created_secs: u64) -> BlobMeta {
        created("alice@example.org", 4, created_secs)
    }

    /// A store (buckets of 60 s) holding alice's blob 0xaa… of four bytes, uploaded at 100.
    async fn one_blob(dir: &Path) -> FileStore {
        let store = FileStore::open(dir, 64 * 60).unwrap();
        let up = upload(&store, b"four", created_meta(100)).await;
        store.commit(up, [0xaa; 32], 100).await.unwrap();
        store
    }

    /// A store (buckets of 60 s) holding alice's blobs 0xaa… uploaded at 100 and 0xbb… at
    /// 130, four bytes each.
    async fn two_blobs(dir: &Path) -> FileStore {
        let store = FileStore::open(dir, 64 * 60).unwrap();
        for (address, created) in [([0xaa; 32], 100), ([0xbb; 32], 130)] {
            let up = upload(&store, b"four", created_meta(created)).await;
            store.commit(up, address, 100).await.unwrap();
        }
        store
    }

    #[tokio::test]
    async fn blobs_the_scan_cannot_mark_are_swept_and_marked_by_each_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_blobs(dir.path()).await;
        let (a, b) = ([0xaa; 32], [0xbb; 32]);
        drop(store); // killed
        // The markers lost, and their buckets cannot be made (files in their place: what a
        // full disk does to creating a directory).
        let expiry = dir.path().join(EXPIRY);
        std::fs::remove_dir_all(&expiry).unwrap();
        std::fs::create_dir(&expiry).unwrap();
        for bucket in ["60+60", "120+60"] {
            std::fs::write(expiry.join(bucket), b"in the way").unwrap();
        }

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 8);
        assert_eq!(
            *lock(&store.usage.unmarked),
            HashMap::from([(a, 100), (b, 130)])
        );
        // Still unmarked: no snapshot, so that the next start scans again.
        assert!(store.shut().is_err());
        assert!(!dir.path().join(TMP).join(USAGE_SNAPSHOT).exists());
        drop(store);

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert_eq!(store.usage(&alice).await.unwrap(), 8);
        // a expired: deleted although it has no marker; b cannot be marked yet.
        assert_eq!(store.expire(120).await.unwrap(), 1);
        assert!(store.open(&a, 0).await.unwrap().is_none());
        assert_eq!(*lock(&store.usage.unmarked), HashMap::from([(b, 130)]));
        // Room again: the next sweep marks b, and its bucket's sweep deletes it.
        std::fs::remove_file(expiry.join("120+60")).unwrap();
        assert_eq!(store.expire(121).await.unwrap(), 0);
        assert!(lock(&store.usage.unmarked).is_empty());
        assert_eq!(markers(dir.path()), ["120+60/bbbb"]);
        assert_eq!(store.expire(180).await.unwrap(), 1);
        assert_eq!(store.usage(&alice).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_shutdown_makes_the_waiting_markers_the_next_start_relies_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = one_blob(dir.path()).await;
        // Committed after the last sweep: no marker yet.
        assert!(markers(dir.path()).is_empty());
        store.shut().unwrap();
        drop(store);
        forge_snapshot(dir.path(), 40);

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        assert_eq!(
            store.usage(&alice).await.unwrap(),
            40,
            "the snapshot was not used"
        );
        assert_eq!(markers(dir.path()), ["60+60/aaaa"]);
        assert_eq!(store.expire(120).await.unwrap(), 1);
        assert!(store.open(&[0xaa; 32], 0).await.unwrap().is_none());
    }

    /// Whether the start scan of `store` finished within `limit` of real time (the scan runs
    /// in a thread of its own, whatever the test's clock).
    fn counted_within(store: &FileStore, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while !*store.usage.counted.borrow() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_scan_cannot_finish_uploads_are_told_to_retry_and_the_sweep_waits() {
        let dir = tempfile::tempdir().unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        let store = FileStore::open(dir.path(), 64).unwrap();
        // Counted (an empty store) before the paused clock could end the commit's wait.
        assert!(counted_within(&store, std::time::Duration::from_secs(10)));
        let up = upload(&store, b"four", created_meta(100)).await;
        store.commit(up, [0xaa; 32], 100).await.unwrap();
        drop(store); // killed
        // A metadata file that cannot be read (a directory in its place: EISDIR), as an I/O
        // error would: the scan must neither take it for a leftover nor finish without it.
        let unreadable = dir
            .path()
            .join(format!("{}{META_SUFFIX}", hex::encode([0xbb; 32])));
        std::fs::create_dir(&unreadable).unwrap();

        let store = FileStore::open(dir.path(), 64).unwrap();
        // The wait for the count ends (paused clock: at once) in UNAVAILABLE, a retry.
        let err = store.usage(&alice).await.unwrap_err();
        assert!(
            matches!(err, ServiceError::Store(StoreError::Unavailable)),
            "{err}"
        );
        // The sweep deletes nothing before the count (blob a expired at 101).
        assert_eq!(store.expire(1_000).await.unwrap(), 0);
        assert!(store.open(&[0xaa; 32], 0).await.unwrap().is_some());
        assert!(unreadable.exists());

        // Readable again: the scan's next try (its own thread, real time) counts.
        std::fs::remove_dir(&unreadable).unwrap();
        assert!(counted_within(&store, std::time::Duration::from_secs(10)));
        assert_eq!(store.usage(&alice).await.unwrap(), 4);
        assert_eq!(store.expire(1_000).await.unwrap(), 1);
    }

    /// Puts a directory in the place of the metadata file of `address` (reading it fails
    /// with EISDIR, as an I/O error would); returns its path.
    fn make_unreadable(dir: &Path, address: [u8; BLOB_ADDRESS_LEN]) -> PathBuf {
        let path = dir.join(format!("{}{META_SUFFIX}", hex::encode(address)));
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        path
    }

    #[tokio::test]
    async fn a_blob_the_sweep_cannot_delete_holds_up_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        let blobs = [[0xaa; 32], [0xbb; 32], [0xcc; 32], [0xdd; 32]];
        for (address, created) in blobs.iter().zip([100, 105, 110, 115]) {
            let up = upload(&store, b"four", created_meta(created)).await;
            store.commit(up, *address, 100).await.unwrap();
            if created == 110 {
                // a, b and c marked; d waits among the unmarked.
                assert_eq!(store.expire(0).await.unwrap(), 0);
            }
        }
        // a (marked) and d (unmarked) cannot be read.
        let bad_a = make_unreadable(dir.path(), blobs[0]);
        let bad_d = make_unreadable(dir.path(), blobs[3]);

        // b and c are deleted all the same; a keeps its marker, d its place.
        assert_eq!(store.expire(120).await.unwrap(), 2);
        assert!(store.open(&blobs[1], 0).await.unwrap().is_none());
        assert!(store.open(&blobs[2], 0).await.unwrap().is_none());
        assert_eq!(markers(dir.path()), ["60+60/aaaa"]);
        assert_eq!(
            *lock(&store.usage.unmarked),
            HashMap::from([(blobs[3], 115)])
        );
        assert_eq!(store.usage(&alice).await.unwrap(), 8);

        // Readable again: the next sweep deletes both.
        for (bad, address) in [(bad_a, blobs[0]), (bad_d, blobs[3])] {
            std::fs::remove_dir(&bad).unwrap();
            write_synced(&bad, &meta_bytes(&created_meta(100)).unwrap()).unwrap();
            assert!(store.open(&address, 0).await.unwrap().is_some());
        }
        assert_eq!(store.expire(120).await.unwrap(), 2);
        assert!(markers(dir.path()).is_empty());
        assert!(lock(&store.usage.unmarked).is_empty());
        assert_eq!(store.usage(&alice).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_metadata_file_that_stays_unreadable_is_left_out_of_the_count_in_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let alice: UserId = "alice@example.org".parse().unwrap();
        let store = two_blobs(dir.path()).await;
        drop(store); // killed
        let unreadable = make_unreadable(dir.path(), [0xaa; 32]);

        // Retried for the patience (here 300 ms), then counted without it.
        let store =
            FileStore::open_with(dir.path(), 64 * 60, std::time::Duration::from_millis(300))
                .unwrap();
        assert!(counted_within(&store, std::time::Duration::from_secs(20)));
        assert_eq!(store.usage(&alice).await.unwrap(), 4);
        let up = upload(&store, b"cc", created_meta(140)).await;
        store.commit(up, [0xcc; 32], 100).await.unwrap();
        // Left as it was, and not served.
        assert!(unreadable.is_dir());
        assert!(store.open(&[0xaa; 32], 0).await.is_err());
        assert_eq!(store.usage(&alice).await.unwrap(), 8);
        // Still unreadable at the next sweep: kept for the one after.
        assert_eq!(store.expire(0).await.unwrap(), 0);
        assert_eq!(store.usage(&alice).await.unwrap(), 8);

        // Readable again: the next sweep counts it and marks it (a leftover without data in
        // the same state would be removed).
        std::fs::remove_dir(&unreadable).unwrap();
        write_synced(&unreadable, &meta_bytes(&created_meta(100)).unwrap()).unwrap();
        assert_eq!(store.expire(0).await.unwrap(), 0);
        assert_eq!(store.usage(&alice).await.unwrap(), 12);
        assert!(store.open(&[0xaa; 32], 0).await.unwrap().is_some());
        assert_eq!(
            markers(dir.path()),
            ["120+60/bbbb", "120+60/cccc", "60+60/aaaa"]
        );
        // The count may still be off (the scan left the file out): no snapshot, the next
        // start scans again.
        assert!(store.shut().is_err());
        assert!(!dir.path().join(TMP).join(USAGE_SNAPSHOT).exists());
    }

    #[tokio::test]
    async fn the_shutdown_stops_a_scan_that_has_not_finished() {
        let dir = tempfile::tempdir().unwrap();
        let store = one_blob(dir.path()).await;
        drop(store); // killed
        let unreadable = make_unreadable(dir.path(), [0xaa; 32]);

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert!(!counted_within(
            &store,
            std::time::Duration::from_millis(50)
        ));
        store.shut().unwrap();
        // Readable again, and a leftover metadata file (no data) a scan would remove: the
        // scan's next tries (after 0.1, 0.3, 0.7 s) would count, but the store is shut:
        // nothing is published, nothing removed.
        std::fs::remove_dir(&unreadable).unwrap();
        let leftover = dir
            .path()
            .join(format!("{}{META_SUFFIX}", hex::encode([0xbb; 32])));
        write_synced(&leftover, &meta_bytes(&created_meta(100)).unwrap()).unwrap();
        assert!(!counted_within(
            &store,
            std::time::Duration::from_millis(1500)
        ));
        assert!(lock(&store.usage.bytes).is_none());
        assert!(leftover.exists());
        assert!(!dir.path().join(TMP).join(USAGE_SNAPSHOT).exists());
    }

    /// The address of blob `i` of [`write_blobs`].
    fn nth_address(i: u64) -> [u8; BLOB_ADDRESS_LEN] {
        [i.to_be_bytes(), [1; 8], [2; 8], [3; 8]]
            .concat()
            .try_into()
            .unwrap()
    }

    /// The owner of blob `i` of [`write_blobs`].
    fn nth_owner(i: u64) -> String {
        format!("owner{}@example.org", i % 7)
    }

    /// Writes `n` blobs into `dir` as the store lays them out (many batches for every scan
    /// thread): blob `i` of owner `i % 7`, `i + 1` bytes. Returns the bytes per owner.
    fn write_blobs(dir: &Path, n: u64) -> HashMap<String, u64> {
        std::fs::create_dir_all(dir.join(TMP)).unwrap();
        let mut expected: HashMap<String, u64> = HashMap::new();
        for i in 0..n {
            let address = hex::encode(nth_address(i));
            let meta = created(&nth_owner(i), i + 1, 100 + i % 200);
            std::fs::write(dir.join(&address), vec![0; (i + 1) as usize]).unwrap();
            std::fs::write(
                dir.join(format!("{address}{META_SUFFIX}")),
                meta_bytes(&meta).unwrap(),
            )
            .unwrap();
            *expected.entry(nth_owner(i)).or_default() += i + 1;
        }
        expected
    }

    async fn assert_usage(store: &FileStore, expected: &HashMap<String, u64>) {
        for (owner, bytes) in expected {
            let user: UserId = owner.parse().unwrap();
            assert_eq!(store.usage(&user).await.unwrap(), *bytes, "{owner}");
        }
    }

    #[tokio::test]
    async fn the_scan_counts_every_owner_across_its_threads_and_removes_every_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let expected = write_blobs(dir.path(), 3_000);
        let owner = nth_owner;
        // Metadata files without data, and undecodable ones.
        for i in 0..60u64 {
            let address = hex::encode([i.to_be_bytes(), [9; 8], [9; 8], [9; 8]].concat());
            let contents = match i % 2 {
                0 => meta_bytes(&created(&owner(i), 5, 100)).unwrap(),
                _ => b"{not json".to_vec(),
            };
            std::fs::write(dir.path().join(format!("{address}{META_SUFFIX}")), contents).unwrap();
        }

        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert!(counted_within(&store, std::time::Duration::from_secs(30)));
        assert_usage(&store, &expected).await;
        let metas = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_str().unwrap().ends_with(META_SUFFIX)
            })
            .count();
        assert_eq!(metas, 3_000);
        assert_eq!(markers(dir.path()).len(), 3_000);
    }

    #[tokio::test]
    async fn a_pass_that_fails_amid_the_batches_is_retried_whole() {
        let dir = tempfile::tempdir().unwrap();
        let expected = write_blobs(dir.path(), 3_000);
        // Every hundredth metadata file unreadable: the passes fail while the listing still
        // has batches to hand out (the threads drain them; nothing of a failed pass counts).
        let unreadable: Vec<u64> = (0..3_000).step_by(100).collect();
        for &i in &unreadable {
            make_unreadable(dir.path(), nth_address(i));
        }
        let store = FileStore::open(dir.path(), 64 * 60).unwrap();
        assert!(!counted_within(
            &store,
            std::time::Duration::from_millis(500)
        ));

        for &i in &unreadable {
            let path = dir
                .path()
                .join(format!("{}{META_SUFFIX}", hex::encode(nth_address(i))));
            std::fs::remove_dir(&path).unwrap();
            let meta = created(&nth_owner(i), i + 1, 100 + i % 200);
            std::fs::write(&path, meta_bytes(&meta).unwrap()).unwrap();
        }
        assert!(counted_within(&store, std::time::Duration::from_secs(30)));
        assert_usage(&store, &expected).await;
        assert_eq!(markers(dir.path()).len(), 3_000);
    }
}
