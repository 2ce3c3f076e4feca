//! A redb storage backend that fails on command, for tests of storage failures: a file
//! backend whose writes (and file growth) fail as on a full disk, or whose `sync_data` (fsync)
//! fails as on a broken disk, from a chosen point until the fault is cleared. The same
//! switches make the embedded blob store's file writes fail as on a full disk.
//!
//! Not reachable from the configuration: tests put it under a store or a running server
//! through [`crate::testing`].

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The switches of one or more [`FaultyBackend`]s; cheap to clone (clones share the switches).
#[derive(Clone, Debug, Default)]
pub struct Faults(Arc<Mutex<Switches>>);

#[derive(Debug, Default)]
struct Switches {
    /// `Some(n)`: n more writes succeed, then every write fails.
    writes_left: Option<u64>,
    /// `Some(n)`: n more syncs succeed, then every sync fails.
    syncs_left: Option<u64>,
    /// The sync fault switches itself off after failing once.
    sync_once: bool,
    /// Armed by [`Faults::fail_syncs_from_next_commit`]: the next write of the file header
    /// switches every later sync to failing.
    syncs_fail_after_header: bool,
    /// `Some(n)`: n more bytes written to blob files succeed, then every blob write fails.
    blob_bytes_left: Option<u64>,
    /// How long each write of a blob file takes beforehand (a slow disk).
    blob_write_delay: Option<std::time::Duration>,
    /// Faults injected so far.
    injected: u64,
}

impl Faults {
    /// No faults until one is switched on.
    pub fn new() -> Self {
        Self::default()
    }

    fn switches(&self) -> std::sync::MutexGuard<'_, Switches> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After `n` more successful writes, every write and every growth of the file fails with
    /// "no space left on device"; a failing write stores the first half of its data.
    pub fn fail_writes_after(&self, n: u64) {
        self.switches().writes_left = Some(n);
    }

    /// After `n` more successful syncs, every `sync_data` fails with an I/O error (the data
    /// written stays in the file, as it would in the page cache).
    pub fn fail_syncs_after(&self, n: u64) {
        let mut switches = self.switches();
        switches.syncs_left = Some(n);
        switches.sync_once = false;
    }

    /// From the next commit on, every `sync_data` fails (the data written stays in the file),
    /// until [`Faults::clear`]: syncs succeed until redb next writes the file header (offset 0,
    /// which it writes to publish a commit, and when it repairs or closes the file), and the
    /// sync that would make that header durable fails, with every later one.
    ///
    /// Unlike `fail_syncs_after(0)`, this makes the failing fsync a commit's own: redb also
    /// syncs inside a transaction, when the transaction grows the file (the new length must be
    /// durable before a header names it), before the commit has written anything, and a
    /// failure there leaves nothing of the transaction in the file. Whether a given
    /// transaction grows the file depends on how full the file is.
    pub fn fail_syncs_from_next_commit(&self) {
        let mut switches = self.switches();
        switches.syncs_left = None;
        switches.sync_once = false;
        switches.syncs_fail_after_header = true;
    }

    /// The next `sync_data` fails once (a transient fault); later ones succeed.
    pub fn fail_next_sync(&self) {
        let mut switches = self.switches();
        switches.syncs_left = Some(0);
        switches.sync_once = true;
    }

    /// After `n` more bytes written to blob files (the embedded blob store's uploads), every
    /// write of a blob file fails with "no space left on device", the one crossing the mark
    /// included.
    pub fn fail_blob_writes_after(&self, n: u64) {
        self.switches().blob_bytes_left = Some(n);
    }

    /// Every later write of a blob file takes `delay` before it starts, as on a slow disk.
    pub fn slow_blob_writes(&self, delay: std::time::Duration) {
        self.switches().blob_write_delay = Some(delay);
    }

    /// Switches every fault off (space freed, disk replaced).
    pub fn clear(&self) {
        let mut switches = self.switches();
        switches.blob_bytes_left = None;
        switches.blob_write_delay = None;
        switches.writes_left = None;
        switches.syncs_left = None;
        switches.syncs_fail_after_header = false;
    }

    /// How many operations failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.switches().injected
    }

    /// Whether a blob file write of `len` bytes fails (counting down if armed).
    /// How long a blob file write waits first ([`Faults::slow_blob_writes`]).
    pub(crate) fn blob_write_delay(&self) -> Option<std::time::Duration> {
        self.switches().blob_write_delay
    }

    pub(crate) fn blob_write_fails(&self, len: u64) -> bool {
        let mut switches = self.switches();
        match switches.blob_bytes_left {
            Some(left) if left < len => {
                switches.blob_bytes_left = Some(0);
                switches.injected += 1;
                true
            }
            Some(left) => {
                switches.blob_bytes_left = Some(left - len);
                false
            }
            None => false,
        }
    }

    /// Whether this write fails (counting it down if armed).
    fn write_fails(&self) -> bool {
        let mut switches = self.switches();
        match switches.writes_left {
            Some(0) => {
                switches.injected += 1;
                true
            }
            Some(n) => {
                switches.writes_left = Some(n - 1);
                false
            }
            None => false,
        }
    }

    /// Called before a write at `offset`: a write of the header arms the failing syncs of
    /// [`Faults::fail_syncs_from_next_commit`].
    fn note_write(&self, offset: u64) {
        let mut switches = self.switches();
        if offset == 0 && switches.syncs_fail_after_header {
            switches.syncs_fail_after_header = false;
            switches.syncs_left = Some(0);
            switches.sync_once = false;
        }
    }

    fn sync_fails(&self) -> bool {
        let mut switches = self.switches();
        match switches.syncs_left {
            Some(0) => {
                switches.injected += 1;
                if switches.sync_once {
                    switches.syncs_left = None;
                }
                true
            }
            Some(n) => {
                switches.syncs_left = Some(n - 1);
                false
            }
            None => false,
        }
    }
}

/// A [`FileBackend`] that consults [`Faults`] before every write, growth and sync.
#[derive(Debug)]
pub(crate) struct FaultyBackend {
    inner: FileBackend,
    faults: Faults,
}

impl FaultyBackend {
    /// Opens (creating if absent) the database file at `path`.
    pub(crate) fn open(path: &Path, faults: Faults) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(Self { inner, faults })
    }
}

fn disk_full() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "injected: no space left on device",
    )
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        // Shrinking frees space and succeeds on a full disk; growing does not.
        if len > self.inner.len()? && self.faults.write_fails() {
            return Err(disk_full());
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        if self.faults.sync_fails() {
            return Err(io::Error::other("injected: fsync failed"));
        }
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.faults.note_write(offset);
        if self.faults.write_fails() {
            // A full disk may take part of a write before it refuses the rest.
            let half = data.len() / 2;
            if half > 0 {
                self.inner.write(offset, &data[..half])?;
            }
            return Err(disk_full());
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
