//! The embedded redb engine: opening and schema check, reads off the async executor, and a
//! single writer thread that coalesces concurrent write operations into one durable
//! transaction (group commit), so one fsync serves every request in the batch.
//!
//! A write operation returns `Result<Result<R, E>, StoreError>`: the outer error is a storage
//! failure and aborts the whole batch (every operation in it fails, nothing is written); the
//! inner error is the operation's own refusal, and an operation that refuses must not have
//! written anything. The caller's future resolves only after the batch committed durably.
//!
//! Acknowledgements of listened queues are the exception: [`Store::ack_later`] records them
//! in memory and the writer applies them at the start of its next batch, which normally is the
//! batch of the next fan-out (or, when no write comes, a batch of their own after
//! [`ACK_DELAY`]). Nothing waits for them; docs/ARCHITECTURE.md ("Lazy acknowledgements") says
//! why that is safe.

pub(crate) mod admin;
mod auth;
mod delivery_tables;
pub(crate) mod fault;
mod groups;
mod keypackage;
mod outbox;
mod push;
mod queue;
mod receipts;
#[cfg(test)]
mod recovery_tests;
pub(crate) mod tables;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::StoreError;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::oneshot;

use delivery_tables::DeliveryTables;
use tables::*;

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(err: $t) -> Self {
                classify(err.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<redb::Error> for StoreError {
    fn from(err: redb::Error) -> Self {
        classify(err)
    }
}

/// A failure of the file (or of an earlier I/O on it, which redb latches until the database is
/// reopened) is [`StoreError::Io`]: the writer reopens the database. Anything else (a corrupt
/// page, a value too large) is a plain database error.
fn classify(err: redb::Error) -> StoreError {
    match err {
        redb::Error::Io(_)
        | redb::Error::Backend(_)
        | redb::Error::PreviousIo
        | redb::Error::DatabaseClosed
        | redb::Error::LockPoisoned(_) => StoreError::Io(err.to_string().into()),
        err => StoreError::Database(err.to_string().into()),
    }
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Job = Box<dyn FnOnce(&mut Held<'_>) -> Result<Completion, StoreError> + Send>;

/// A batch's write transaction with the tables its jobs keep open from one job to the next.
///
/// Opening a redb table costs a lookup in the table tree and a check of its definition
/// (≈ 6 k instructions); a batch of N claims that each opened their four tables paid that 4 N
/// times. A job of [`Store::write_held`] asks for a set of tables ([`Held::key_packages`],
/// [`Held::delivery`]);
/// the set stays open for the following jobs of the batch and is closed before a job that
/// opens tables itself ([`Held::txn`]), before another set opens, and before the commit.
pub(crate) struct Held<'txn> {
    txn: &'txn WriteTransaction,
    open: Open<'txn>,
}

/// Which set of tables a batch holds open.
enum Open<'txn> {
    Nothing,
    KeyPackages(Box<KeyPackageTables<'txn>>),
    Delivery(Box<DeliveryTables<'txn>>),
}

/// The tables a KeyPackage claim or upload writes.
pub(crate) struct KeyPackageTables<'txn> {
    pub(crate) clients: redb::Table<'txn, &'static str, &'static [u8]>,
    pub(crate) key_packages: redb::Table<'txn, (u64, u64), (u64, &'static [u8])>,
    pub(crate) expiry: redb::Table<'txn, (u64, u64, u64), ()>,
    pub(crate) counts: redb::Table<'txn, u64, (u64, u64, u64)>,
    pub(crate) last_resort: redb::Table<'txn, u64, (u64, &'static [u8])>,
}

impl<'txn> Held<'txn> {
    fn new(txn: &'txn WriteTransaction) -> Self {
        Self {
            txn,
            open: Open::Nothing,
        }
    }

    /// The transaction, every held table closed (so that the caller may open any table).
    pub(crate) fn txn(&mut self) -> &'txn WriteTransaction {
        self.open = Open::Nothing;
        self.txn
    }

    /// The KeyPackage tables, opened unless an earlier job of the batch left them open.
    pub(crate) fn key_packages(&mut self) -> Result<&mut KeyPackageTables<'txn>, StoreError> {
        if !matches!(self.open, Open::KeyPackages(_)) {
            // Closed before they open again: a table may be open only once.
            self.open = Open::Nothing;
            let txn = self.txn;
            self.open = Open::KeyPackages(Box::new(KeyPackageTables {
                clients: txn.open_table(CLIENTS)?,
                key_packages: txn.open_table(KEY_PACKAGES)?,
                expiry: txn.open_table(KEY_PACKAGE_EXPIRY)?,
                counts: txn.open_table(KEY_PACKAGE_COUNTS)?,
                last_resort: txn.open_table(LAST_RESORT)?,
            }));
        }
        match &mut self.open {
            Open::KeyPackages(tables) => Ok(tables),
            _ => Err(StoreError::Unavailable),
        }
    }

    /// The delivery tables (fan-outs, acknowledgements): the set an earlier job of the batch
    /// left open, or a new one (whose tables open as they are used).
    pub(crate) fn delivery(&mut self) -> Result<&mut DeliveryTables<'txn>, StoreError> {
        if !matches!(self.open, Open::Delivery(_)) {
            self.open = Open::Nothing;
            self.open = Open::Delivery(Box::new(DeliveryTables::new(self.txn)));
        }
        match &mut self.open {
            Open::Delivery(tables) => Ok(tables),
            _ => Err(StoreError::Unavailable),
        }
    }
}

/// What the handles send the writer thread.
enum Msg {
    /// A write operation.
    Job(Job),
    /// Acknowledgements wait ([`Store::ack_later`]): write them with the next batch, or in a
    /// batch of their own after [`ACK_DELAY`].
    Acks,
}

/// Longest a lazily taken acknowledgement waits for a batch to ride in before the writer runs
/// one for it alone. Under load a batch comes sooner; an idle server applies acks this late.
pub(crate) const ACK_DELAY: Duration = Duration::from_millis(50);

/// Acknowledgements taken but not yet known to be committed.
#[derive(Default)]
struct Acks {
    /// Highest acknowledged seq by client number. An entry stays until a batch that applied
    /// it committed, so reads skip what it acknowledges meanwhile.
    wanted: HashMap<u64, u64>,
    /// Some entry is newer than the last batch that applied acks.
    fresh: bool,
    /// The writer waits for a job with no acknowledgement due: the next ack must wake it
    /// (otherwise the writer finds the acks when it next looks, and no wake-up is sent).
    writer_idle: bool,
}

/// Opens the database file (again). The default opens it as a plain file; tests put a
/// fault-injecting backend under it ([`fault::FaultyBackend`]).
pub(crate) type Opener = Arc<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// The opener of the database file at `path`.
/// `cache_size` bounds the memory redb uses for its page cache and write buffer (bytes).
pub(crate) fn file_opener(path: &Path, cache_size: usize) -> Opener {
    let path = path.to_owned();
    Arc::new(move || {
        Ok(Database::builder()
            .set_cache_size(cache_size)
            .create(&path)?)
    })
}

/// The opener of the database file at `path` through a [`fault::FaultyBackend`].
pub(crate) fn faulty_opener(path: &Path, faults: fault::Faults, cache_size: usize) -> Opener {
    let path = path.to_owned();
    Arc::new(move || {
        let backend = fault::FaultyBackend::open(&path, faults.clone())
            .map_err(|err| StoreError::Io(err.to_string().into()))?;
        Ok(Database::builder()
            .set_cache_size(cache_size)
            .create_with_backend(backend)?)
    })
}

/// First wait before reopening a database whose storage failed; doubled after every failed
/// attempt up to [`REOPEN_MAX_BACKOFF`].
const REOPEN_FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// Longest wait between two attempts to reopen the database.
const REOPEN_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Called with the queue entries (client number, entry) a batch wrote.
pub(crate) type OnFresh = Box<dyn Fn(Vec<(u64, crate::queue::Fresh)>) + Send + Sync>;

/// What the engine calls back into the server.
#[derive(Default)]
pub(crate) struct Hooks {
    /// Called after every reopen after a storage failure (the queue listeners read the store
    /// again).
    pub(crate) on_reopen: Option<Box<dyn Fn() + Send + Sync>>,
    /// Called with the queue entries a batch wrote from pending (lazy) fan-outs, after the
    /// batch committed (the listeners of those queues are woken).
    pub(crate) on_fresh: Option<OnFresh>,
}

/// What the handles and the writer share.
struct Shared {
    /// The open database; `None` while the writer reopens it after a storage failure (every
    /// operation fails with [`StoreError::Unavailable`] meanwhile).
    db: RwLock<Option<Arc<Database>>>,
    opener: Opener,
    domain: String,
    hooks: Hooks,
    /// Set by a job of the running batch that wrote a pending fan-out.
    batch_wrote_pending: AtomicBool,
    /// Set when a job wrote a pending fan-out: the writer's next batch, which starts at once
    /// even if no job waits, queues it first.
    pending: AtomicBool,
    /// The number of the last committed batch that wrote a pending fan-out, and of the last
    /// committed batch that queued every pending one: while the first is the larger, a read
    /// of a queue may miss an acknowledged commit and waits for the next batch first.
    pending_written: AtomicU64,
    pending_queued: AtomicU64,
    /// Acknowledgements the next batch applies.
    acks: Mutex<Acks>,
    /// Tests only: leave pending fan-outs alone (as if the process died right after the
    /// transaction that wrote them).
    #[cfg(test)]
    hold_pending: AtomicBool,
    /// Tests only: leave lazily taken acknowledgements unwritten (as if the process died
    /// before a batch applied them).
    #[cfg(test)]
    hold_acks: AtomicBool,
}

impl Shared {
    fn current(&self) -> Option<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, db: Option<Arc<Database>>) {
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = db;
    }

    /// Whether the next batch must queue pending fan-outs first (clears the mark).
    fn take_pending(&self) -> bool {
        #[cfg(test)]
        if self.hold_pending.load(Ordering::Acquire) {
            return false;
        }
        self.pending.swap(false, Ordering::AcqRel)
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, Acks> {
        self.acks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the writer before it blocks for a job: false if acknowledgements wait (it
    /// must not block), else it is marked idle so that the next ack wakes it.
    fn park_for_jobs(&self) -> bool {
        #[cfg(test)]
        let held = self.hold_acks.load(Ordering::Acquire);
        #[cfg(not(test))]
        let held = false;
        // One lock: an ack taken between a check and the mark would wake nobody.
        let mut acks = self.acks();
        if acks.fresh && !held {
            return false;
        }
        acks.writer_idle = true;
        true
    }

    /// Called by the writer when it got a job.
    fn unpark(&self) {
        self.acks().writer_idle = false;
    }

    /// Whether acknowledgements wait for a batch.
    fn acks_waiting(&self) -> bool {
        #[cfg(test)]
        if self.hold_acks.load(Ordering::Acquire) {
            return false;
        }
        self.acks().fresh
    }

    /// The acknowledgements a batch applies now (every one not known to be committed).
    fn take_acks(&self) -> Vec<(u64, u64)> {
        #[cfg(test)]
        if self.hold_acks.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut acks = self.acks();
        if !acks.fresh {
            return Vec::new();
        }
        acks.fresh = false;
        let mut taken: Vec<(u64, u64)> = acks.wanted.iter().map(|(&c, &s)| (c, s)).collect();
        // Ascending client numbers walk the queue tables in key order.
        taken.sort_unstable();
        taken
    }

    /// After the batch that applied `taken` committed: forgets the entries no later ack moved.
    fn acks_committed(&self, taken: &[(u64, u64)]) {
        if taken.is_empty() {
            return;
        }
        let mut acks = self.acks();
        for (client_num, seq) in taken {
            if acks.wanted.get(client_num) == Some(seq) {
                acks.wanted.remove(client_num);
            }
        }
    }

    /// After the batch that applied `taken` failed: the next batch applies them again.
    fn acks_failed(&self, taken: &[(u64, u64)]) {
        if !taken.is_empty() {
            self.acks().fresh = true;
        }
    }

    fn has_pending(&self) -> bool {
        #[cfg(test)]
        if self.hold_pending.load(Ordering::Acquire) {
            return false;
        }
        self.pending.load(Ordering::Acquire)
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    shared: Arc<Shared>,
    writer: mpsc::SyncSender<Msg>,
}

impl Store {
    /// Opens or creates the database at `path`, checks the schema version and that the
    /// database belongs to `domain` (recording it on first start), and starts the writer
    /// thread. `max_batch` bounds how many operations share one transaction. The returned
    /// [`WriterHandle`] waits for the writer (and so the database) to close once every `Store`
    /// clone is dropped.
    #[cfg(test)]
    pub(crate) fn open(
        path: &Path,
        domain: &str,
        max_batch: usize,
    ) -> Result<(Self, WriterHandle), StoreError> {
        Self::open_with(
            file_opener(path, 16 << 20),
            domain,
            max_batch,
            Hooks::default(),
        )
    }

    /// Tests only: while `hold` is set, pending fan-outs stay pending (the state a crash right
    /// after their transaction leaves); clearing it lets the next batch queue them.
    #[cfg(test)]
    pub(crate) fn hold_pending(&self, hold: bool) {
        self.shared.hold_pending.store(hold, Ordering::Release);
        if !hold {
            self.shared.pending.store(true, Ordering::Release);
        }
    }

    /// Tests only: while `hold` is set, acknowledgements taken lazily are never written (the
    /// state a crash before the batch that would have applied them leaves).
    #[cfg(test)]
    pub(crate) fn hold_acks(&self, hold: bool) {
        self.shared.hold_acks.store(hold, Ordering::Release);
    }

    /// Marks that the current batch wrote a pending fan-out (called from inside a job).
    pub(crate) fn mark_pending(&self) {
        self.shared.pending.store(true, Ordering::Release);
        self.shared
            .batch_wrote_pending
            .store(true, Ordering::Release);
    }

    /// Waits, if a committed fan-out may still be pending, until the writer's next batch
    /// (which queues it) committed: a read after this sees every entry of every commit
    /// acknowledged before it was called.
    pub(crate) async fn pending_queued(&self) -> Result<(), StoreError> {
        let written = self.shared.pending_written.load(Ordering::SeqCst);
        if self.shared.pending_queued.load(Ordering::SeqCst) >= written {
            return Ok(());
        }
        self.write(|_| Ok(Ok::<(), StoreError>(()))).await
    }

    /// [`Store::open`] through `opener`, which the writer also uses to reopen the database
    /// after a storage failure.
    /// `hooks` are called after reopens and lazy fan-outs.
    pub(crate) fn open_with(
        opener: Opener,
        domain: &str,
        max_batch: usize,
        hooks: Hooks,
    ) -> Result<(Self, WriterHandle), StoreError> {
        let db = open_checked(&opener, domain)?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            opener,
            domain: domain.to_owned(),
            hooks,
            batch_wrote_pending: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            pending_written: AtomicU64::new(0),
            pending_queued: AtomicU64::new(0),
            acks: Mutex::default(),
            #[cfg(test)]
            hold_pending: AtomicBool::new(false),
            #[cfg(test)]
            hold_acks: AtomicBool::new(false),
        });
        // A bounded queue: when the disk falls behind, writers wait instead of piling up.
        let (writer, jobs) = mpsc::sync_channel::<Msg>(max_batch * 4);
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("roost-store-writer".into())
            .spawn(move || write_loop(&writer_shared, &jobs, max_batch))
            .map_err(|_| StoreError::Unavailable)?;
        Ok((Self { shared, writer }, WriterHandle(thread)))
    }

    /// Runs `op` in a write transaction shared with other concurrent operations; resolves
    /// after the transaction committed durably.
    pub(crate) async fn write<R, E, F>(&self, op: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<Result<R, E>, StoreError> + Send + 'static,
    {
        let done = self.submit_write(op).await?;
        done.await.map_err(|_| E::from(StoreError::Unavailable))?
    }

    /// [`Store::write`] for an operation that works on tables the batch holds open
    /// ([`Held`]): consecutive such operations of a batch open their tables once.
    pub(crate) async fn write_held<R, E, F>(&self, op: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Held<'_>) -> Result<Result<R, E>, StoreError> + Send + 'static,
    {
        let done = self.submit_job(op).await?;
        done.await.map_err(|_| E::from(StoreError::Unavailable))?
    }

    /// [`Store::write`] in two steps: resolves once `op` is handed to the writer (which runs
    /// jobs in the order they were handed over: a job handed over later runs after it, in
    /// the same batch or a later one); the receiver then gets its outcome once the batch
    /// committed durably.
    pub(crate) async fn submit_write<R, E, F>(
        &self,
        op: F,
    ) -> Result<oneshot::Receiver<Result<R, E>>, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<Result<R, E>, StoreError> + Send + 'static,
    {
        self.submit_job(move |held: &mut Held<'_>| op(held.txn()))
            .await
    }

    /// [`Store::submit_write`] of an operation on [`Held`] tables.
    pub(crate) async fn submit_job<R, E, F>(
        &self,
        op: F,
    ) -> Result<oneshot::Receiver<Result<R, E>>, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Held<'_>) -> Result<Result<R, E>, StoreError> + Send + 'static,
    {
        if self.shared.current().is_none() {
            // Reopening after a storage failure: refuse at once rather than queue.
            return Err(E::from(StoreError::Unavailable));
        }
        let (tx, rx) = oneshot::channel::<Result<R, E>>();
        let job: Job = Box::new(move |held| {
            let outcome = op(held)?;
            Ok(Box::new(move |committed: Result<(), StoreError>| {
                let result = match committed {
                    Ok(()) => outcome,
                    Err(err) => Err(E::from(err)),
                };
                let _ = tx.send(result);
            }))
        });
        // Normally the queue has room and the job is handed over right here: a blocking-pool
        // thread per write costs thread switches that dominated the server's profile under
        // load (docs/BENCHMARKS.md).
        match self.writer.try_send(Msg::Job(job)) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(job)) => {
                let writer = self.writer.clone();
                // The disk falls behind: wait for room off the executor.
                tokio::task::spawn_blocking(move || writer.send(job))
                    .await
                    .map_err(|_| E::from(StoreError::Unavailable))?
                    .map_err(|_| E::from(StoreError::Unavailable))?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                return Err(E::from(StoreError::Unavailable));
            }
        }
        Ok(rx)
    }

    /// Whether the database is open and a read of META succeeds. A read that meets a failed
    /// file makes the writer reopen the database even when no write comes.
    pub(crate) async fn healthy(&self) -> Result<(), StoreError> {
        let read = self
            .read(|txn| {
                txn.open_table(META)?.get("schema_version")?;
                Ok(())
            })
            .await;
        if let Err(StoreError::Io(_)) = &read {
            // An empty write: its commit fails on the latched error and starts the reopen.
            let job: Job = Box::new(|_| Ok(Box::new(|_| {})));
            let _ = self.writer.try_send(Msg::Job(job));
        }
        read
    }

    /// Records that a client processed its queue up to `up_to_seq`, to be deleted by the
    /// writer's next batch (at the latest [`ACK_DELAY`] from now). Returns at once: nothing
    /// waits for an acknowledgement to be durable (a lost one only delivers again what the
    /// client skips by seq). Reads skip what it acknowledges from now on. An ack of a removed
    /// client is dropped when applied.
    pub(crate) fn ack_later(&self, client_num: u64, up_to_seq: u64) {
        let wake = {
            let mut acks = self.shared.acks();
            let wanted = acks.wanted.entry(client_num).or_insert(0);
            *wanted = (*wanted).max(up_to_seq);
            acks.fresh = true;
            // A busy writer looks for acks before it blocks again: wake only an idle one, once.
            std::mem::replace(&mut acks.writer_idle, false)
        };
        if wake {
            // A full queue means the writer is busy: its next batch applies the ack anyway.
            let _ = self.writer.try_send(Msg::Acks);
        }
    }

    /// The highest seq of `client_num`'s queue acknowledged lazily and not yet known to be
    /// deleted (0 if none).
    pub(crate) fn acked_through(&self, client_num: u64) -> u64 {
        self.shared
            .acks()
            .wanted
            .get(&client_num)
            .copied()
            .unwrap_or(0)
    }

    /// Runs `op` in a read transaction on a blocking thread.
    pub(crate) async fn read<R, E, F>(&self, op: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<R, E> + Send + 'static,
    {
        let Some(db) = self.shared.current() else {
            return Err(E::from(StoreError::Unavailable));
        };
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(StoreError::from)?;
            op(&txn)
        })
        .await
        .map_err(|_| E::from(StoreError::Unavailable))?
    }
}

/// Opens the database through `opener`, checks (or records) the schema version and domain,
/// and makes sure every table exists, in one durable write transaction.
fn open_checked(opener: &Opener, domain: &str) -> Result<Database, StoreError> {
    let db = opener()?;
    let txn = db.begin_write()?;
    {
        let found = txn
            .open_table(META)?
            .get("schema_version")?
            .map(|v| v.value());
        let record = || -> Result<(), StoreError> {
            txn.open_table(META)?
                .insert("schema_version", SCHEMA_VERSION)?;
            Ok(())
        };
        match found {
            None => record()?,
            Some(found @ (2..=4)) => {
                if found == 2 {
                    outbox::upgrade_from_v2(&txn)?;
                }
                if found <= 3 {
                    queue::upgrade_from_v3(&txn)?;
                    keypackage::upgrade_from_v3(&txn)?;
                }
                keypackage::upgrade_from_v4(&txn)?;
                // Version 4 lacked GROUP_DELTAS, created below: its groups have no deltas.
                record()?;
                tracing::info!(from = found, "database upgraded");
            }
            Some(found) if found != SCHEMA_VERSION => {
                return Err(StoreError::Schema {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
            Some(_) => {}
        }
        check_domain(&txn, domain)?;
        // Create every table so readers never meet a missing one.
        txn.open_table(USERS)?;
        txn.open_table(CLIENTS)?;
        txn.open_table(QUEUE_HEADS)?;
        txn.open_table(QUEUE_ENTRIES)?;
        txn.open_table(QUEUE_DEDUP)?;
        txn.open_table(QUEUE_EXPIRY)?;
        txn.open_table(PAYLOADS)?;
        txn.open_table(PAYLOAD_REFS)?;
        txn.open_table(KEY_PACKAGES)?;
        txn.open_table(KEY_PACKAGE_COUNTS)?;
        txn.open_table(KEY_PACKAGE_EXPIRY)?;
        txn.open_table(LAST_RESORT)?;
        txn.open_table(TOKEN_USES)?;
        txn.open_table(GROUPS)?;
        txn.open_table(GROUP_VERSIONS)?;
        txn.open_table(GROUP_DELTAS)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(RECEIPTS)?;
        txn.open_table(RECEIPT_TIMES)?;
        txn.open_table(SEND_COUNTERS)?;
        txn.open_table(FANOUT_PENDING)?;
        txn.open_table(PUSH_REGISTRATIONS)?;
        txn.open_table(PUSH_JOBS)?;
        txn.open_table(PUSH_DUE)?;
        txn.open_table(PUSH_NOTED)?;
    }
    // Fan-outs a crash (or a storage failure) left pending are queued before any job runs,
    // so nothing later overtakes them in a recipient's queue. Nobody listens yet at a start;
    // after a reopen every listener reads its queue again.
    let queued = groups::queue_pending(&mut DeliveryTables::new(&txn))?;
    if !queued.is_empty() {
        tracing::info!(
            entries = queued.len(),
            "queued fan-outs left pending by an earlier run"
        );
    }
    txn.commit()?;
    Ok(db)
}

/// The writer thread; see [`Store::open`].
pub(crate) struct WriterHandle(std::thread::JoinHandle<()>);

impl WriterHandle {
    /// Waits until every `Store` clone is dropped, the last batch committed and the database
    /// file is closed.
    pub(crate) fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("store writer thread panicked");
        }
    }
}

fn write_loop(shared: &Shared, jobs: &mpsc::Receiver<Msg>, max_batch: usize) {
    // Blocks until the first job (unless a pending fan-out waits: then the batch starts at
    // once; or acknowledgements wait: then at most until they are due); ends when every Store
    // handle is gone, after a last batch for whatever is pending or waiting.
    let mut acks_due: Option<Instant> = None;
    loop {
        if acks_due.is_none() && shared.acks_waiting() {
            acks_due = Some(Instant::now() + ACK_DELAY);
        }
        let mut batch = Vec::new();
        let first = if shared.has_pending() {
            match jobs.try_recv() {
                Ok(msg) => Some(msg),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        } else if let Some(due) = acks_due {
            match jobs.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(msg) => Some(msg),
                // Due: a batch for the acknowledgements alone.
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else if shared.park_for_jobs() {
            let msg = jobs.recv();
            shared.unpark();
            match msg {
                Ok(msg) => Some(msg),
                Err(_) => break,
            }
        } else {
            // An ack came after the check at the top of the loop.
            continue;
        };
        match first {
            Some(Msg::Job(job)) => batch.push(job),
            // Counted at the top of the loop.
            Some(Msg::Acks) => continue,
            None => {}
        }
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Acks) => {}
                Err(_) => break,
            }
        }
        let Some(db) = shared.current() else {
            // Not reached: only this thread takes the database out, and it puts one back
            // before it takes jobs again. Dropping the batch answers Unavailable.
            break;
        };
        acks_due = None;
        match run_batch(shared, &db, batch) {
            Batch::Done => {}
            Batch::StorageFailed(unsure) => {
                drop(db);
                if !reopen(shared, jobs, unsure) {
                    break;
                }
            }
        }
    }
    // Shutting down: queue what is pending and apply the acknowledgements, then close.
    if (shared.has_pending() || shared.acks_waiting())
        && let Some(db) = shared.current()
    {
        run_batch(shared, &db, Vec::new());
    }
    // Readers hold their own clones only for the duration of a read; wait them out so the
    // file is closed when join() returns.
    close(shared);
}

/// Takes the database out of `shared` and drops it once the reads in progress are done, so
/// its file is closed (and its lock released) on return.
fn close(shared: &Shared) {
    let Some(mut db) = shared
        .db
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    else {
        return;
    };
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => {
                drop(db);
                return;
            }
            Err(still_shared) => {
                db = still_shared;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// A batch whose commit failed in the storage: the batch's number and the callers waiting for
/// it. Whether it reached the file is unknown until the database is reopened.
struct Unsure {
    number: u64,
    completions: Vec<Completion>,
}

enum Batch {
    /// Committed, or aborted without a storage failure (its callers have their answers).
    Done,
    /// The storage failed: the database must be reopened. With `Some`, the commit itself
    /// failed and its callers wait for the reopen to tell whether it took effect.
    StorageFailed(Option<Unsure>),
}

/// Counts a storage failure of this engine (`roost_storage_failures_total`).
fn count_failure() {
    metrics::counter!("roost_storage_failures_total", "engine" => "redb").increment(1);
}

fn run_batch(shared: &Shared, db: &Database, batch: Vec<Job>) -> Batch {
    let txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(err) => {
            let err = StoreError::from(err);
            tracing::error!(%err, "cannot begin write transaction");
            // Jobs that never ran are dropped: their callers see Unavailable.
            return match err {
                StoreError::Io(_) => Batch::StorageFailed(None),
                _ => Batch::Done,
            };
        }
    };
    // The batch's own writes go through the delivery tables, which its delivery jobs (the
    // usual ones) then find open.
    let mut held = Held::new(&txn);
    // Every batch bumps a counter, so that after a failed commit a reopened database tells
    // whether the batch reached the file.
    let number = match held
        .delivery()
        .and_then(|tables| tables.next_counter("write_batch"))
    {
        Ok(number) => number,
        Err(err) => {
            tracing::error!(%err, "write batch aborted");
            drop(held);
            let _ = txn.abort();
            return match err {
                StoreError::Io(_) => Batch::StorageFailed(None),
                _ => Batch::Done,
            };
        }
    };
    // Pending fan-outs first: their entries come before anything this batch queues.
    let mut fresh = Vec::new();
    let mut failure = None;
    let mut queued_pending = false;
    shared.batch_wrote_pending.store(false, Ordering::Release);
    if shared.take_pending() {
        match held.delivery().and_then(groups::queue_pending) {
            Ok(queued) => {
                fresh = queued;
                queued_pending = true;
            }
            Err(err) => {
                shared.pending.store(true, Ordering::Release);
                failure = Some(err);
            }
        }
    }
    // Then the acknowledgements taken since the last batch: before the jobs, so an enqueue
    // in this batch counts the queue's depth without what was acknowledged.
    let acks = shared.take_acks();
    if failure.is_none()
        && !acks.is_empty()
        && let Err(err) = held
            .delivery()
            .and_then(|tables| queue::apply_acks(tables, &acks))
    {
        failure = Some(err);
    }
    let mut completions = Vec::with_capacity(batch.len());
    for job in batch {
        if failure.is_some() {
            // Dropping the job drops its reply sender: the caller gets Unavailable.
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut held))) {
            Ok(Ok(completion)) => completions.push(completion),
            Ok(Err(err)) => failure = Some(err),
            Err(_) => failure = Some(StoreError::Unavailable),
        }
    }
    // Every table closed before the commit (or the abort).
    drop(held);
    if let Some(err) = failure {
        tracing::error!(%err, "write batch aborted");
        let _ = txn.abort();
        shared.acks_failed(&acks);
        if !fresh.is_empty() {
            // Rolled back with the batch: still pending.
            shared.pending.store(true, Ordering::Release);
        }
        let io = matches!(err, StoreError::Io(_));
        for completion in completions {
            completion(Err(err.clone()));
        }
        return if io {
            Batch::StorageFailed(None)
        } else {
            Batch::Done
        };
    }
    match txn.commit().map_err(StoreError::from) {
        Ok(()) => {
            // Before any answer: whoever hears of a commit must find its fan-out pending.
            if shared.batch_wrote_pending.swap(false, Ordering::AcqRel) {
                shared.pending_written.store(number, Ordering::SeqCst);
            }
            if queued_pending {
                // Every record committed before this batch is queued now (records this batch
                // wrote itself, after the queueing, are newer: `pending_written` says so).
                shared
                    .pending_queued
                    .fetch_max(number.saturating_sub(1), Ordering::SeqCst);
            }
            shared.acks_committed(&acks);
            for completion in completions {
                completion(Ok(()));
            }
            if !fresh.is_empty()
                && let Some(on_fresh) = &shared.hooks.on_fresh
            {
                on_fresh(fresh);
            }
            Batch::Done
        }
        Err(StoreError::Io(err)) => {
            tracing::error!(%err, "write batch failed in the storage; reopening the database");
            // Whether they landed or not, applying them again is harmless.
            shared.acks_failed(&acks);
            Batch::StorageFailed(Some(Unsure {
                number,
                completions,
            }))
        }
        Err(err) => {
            tracing::error!(%err, "write batch failed");
            shared.acks_failed(&acks);
            if !fresh.is_empty() {
                shared.pending.store(true, Ordering::Release);
            }
            for completion in completions {
                completion(Err(err.clone()));
            }
            Batch::Done
        }
    }
}

/// Reopens the database after a storage failure, refusing (dropping) every job that arrives
/// meanwhile, with a growing wait between attempts. Answers the callers of an unsure batch:
/// success if the reopened database holds it, [`StoreError::Unavailable`] if it does not or
/// the first attempt failed. Returns false when every handle is gone (shutting down).
fn reopen(shared: &Shared, jobs: &mpsc::Receiver<Msg>, mut unsure: Option<Unsure>) -> bool {
    count_failure();
    close(shared);
    let mut backoff = REOPEN_FIRST_BACKOFF;
    loop {
        match open_checked(&shared.opener, &shared.domain) {
            Ok(db) => {
                if let Some(Unsure {
                    number,
                    completions,
                }) = unsure.take()
                {
                    let outcome = match batch_landed(&db, number) {
                        Ok(true) => Ok(()),
                        Ok(false) => Err(StoreError::Unavailable),
                        Err(err) => Err(err),
                    };
                    tracing::warn!(
                        landed = outcome.is_ok(),
                        "write batch whose commit failed, checked after reopening"
                    );
                    for completion in completions {
                        completion(outcome.clone());
                    }
                }
                // The reopen queued every pending fan-out.
                let written = shared.pending_written.load(Ordering::SeqCst);
                shared.pending_queued.fetch_max(written, Ordering::SeqCst);
                shared.set(Some(Arc::new(db)));
                tracing::info!("database reopened after a storage failure");
                if let Some(on_reopen) = &shared.hooks.on_reopen {
                    // A batch whose callers were told it failed may be in the file after all.
                    on_reopen();
                }
                return true;
            }
            Err(err) => {
                count_failure();
                tracing::error!(%err, ?backoff, "cannot reopen the database; retrying");
                if let Some(unsure) = unsure.take() {
                    // Unknown whether it landed: the callers retry (PROTOCOL.md §9.2).
                    for completion in unsure.completions {
                        completion(Err(StoreError::Unavailable));
                    }
                }
            }
        }
        let until = Instant::now() + backoff;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match jobs.recv_timeout(left) {
                // Refused: its caller sees Unavailable. Acknowledgements stay for later.
                Ok(msg) => drop(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        backoff = (backoff * 2).min(REOPEN_MAX_BACKOFF);
    }
}

/// Whether batch `number` is in `db` (its counter moved past it).
fn batch_landed(db: &Database, number: u64) -> Result<bool, StoreError> {
    let txn = db.begin_read()?;
    let next = txn
        .open_table(META)?
        .get("write_batch")?
        .map_or(1, |v| v.value());
    Ok(next > number)
}

/// Refuses a database recorded for another domain; records `domain` in one that has none
/// (new, or made before the domain was kept). On refusal nothing is committed.
fn check_domain(txn: &WriteTransaction, domain: &str) -> Result<(), StoreError> {
    let mut settings = txn.open_table(SETTINGS)?;
    let stored = settings.get("domain")?.map(|v| v.value().to_owned());
    match stored {
        None => {
            settings.insert("domain", domain)?;
            Ok(())
        }
        Some(stored) if stored == domain => Ok(()),
        Some(stored) => Err(StoreError::Mismatch(format!(
            "the data directory belongs to domain {stored:?}, not {domain:?}: check domain and \
             data_dir (a data directory serves one domain)"
        ))),
    }
}

/// Reads a counter from META, returns it, and stores it incremented.
pub(crate) fn next_counter(txn: &WriteTransaction, name: &str) -> Result<u64, StoreError> {
    counter_in(&mut txn.open_table(META)?, name)
}

/// [`next_counter`] in an open [`META`] table.
pub(crate) fn counter_in(
    meta: &mut redb::Table<'_, &'static str, u64>,
    name: &str,
) -> Result<u64, StoreError> {
    let value = meta.get(name)?.map(|v| v.value()).unwrap_or(1);
    meta.insert(name, value + 1)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum TestError {
        Store,
        Refused,
    }

    impl From<StoreError> for TestError {
        fn from(_: StoreError) -> Self {
            TestError::Store
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_durable_and_refusals_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer) = Store::open(&path, "example.org", 64).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .write(move |txn| {
                        if i % 10 == 0 {
                            return Ok(Err(TestError::Refused));
                        }
                        let mut meta = txn.open_table(META)?;
                        meta.insert(format!("k{i}").as_str(), i)?;
                        Ok(Ok(i))
                    })
                    .await
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let result = task.await.unwrap();
            if i % 10 == 0 {
                assert_eq!(result, Err(TestError::Refused));
            } else {
                assert_eq!(result, Ok(i as u64));
            }
        }
        drop(store);
        writer.join();
        // Reopen: everything acknowledged is there, nothing refused is.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        for i in 0..200u64 {
            let got = meta
                .get(format!("k{i}").as_str())
                .unwrap()
                .map(|v| v.value());
            assert_eq!(got, if i % 10 == 0 { None } else { Some(i) });
        }
    }

    #[tokio::test]
    async fn a_storage_failure_aborts_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer) = Store::open(&dir.path().join("db.redb"), "example.org", 8).unwrap();
        let failed: Result<(), TestError> = store
            .write(|txn| {
                txn.open_table(META)?.insert("partial", 1)?;
                Err(StoreError::Corrupt("test"))
            })
            .await;
        assert_eq!(failed, Err(TestError::Store));
        let value: Option<u64> = store
            .read(|txn| {
                let meta = txn.open_table(META).map_err(StoreError::from)?;
                Ok::<_, TestError>(
                    meta.get("partial")
                        .map_err(StoreError::from)?
                        .map(|v| v.value()),
                )
            })
            .await
            .unwrap();
        assert_eq!(value, None);
    }

    /// A client with messages 1..=n in its queue; returns the store's client number.
    async fn queue_of(store: &Store, client: &str, n: u8) -> u64 {
        use crate::auth::AuthStore as _;
        use crate::queue::QueueStore as _;
        let num = store
            .add_client(crate::storage::suite::credential(client))
            .await
            .unwrap();
        for i in 1..=n {
            use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
            use tls_codec::Serialize as _;
            let payload = QueuePayload::GroupMessage(GroupMessage {
                group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                    .parse()
                    .unwrap(),
                message: vec![i].into(),
            })
            .tls_serialize_detached()
            .unwrap();
            store
                .enqueue(
                    &client.parse().unwrap(),
                    roost_protocol::MessageId([i; 16]),
                    u64::from(i),
                    payload,
                    100,
                )
                .await
                .unwrap();
        }
        num
    }

    /// What the file holds for a queue: its entries' seqs and the head's count, read past
    /// the store's skipping of lazily acknowledged messages.
    async fn stored(store: &Store, num: u64) -> (Vec<u64>, u64) {
        store
            .read(move |txn| {
                let entries = txn.open_table(QUEUE_ENTRIES)?;
                let seqs = entries
                    .range((num, 0)..=(num, u64::MAX))?
                    .map(|e| e.map(|(k, _)| k.value().1))
                    .collect::<Result<Vec<_>, _>>()?;
                let count = txn
                    .open_table(QUEUE_HEADS)?
                    .get(num)?
                    .map_or(0, |v| v.value().1);
                Ok::<_, StoreError>((seqs, count))
            })
            .await
            .unwrap()
    }

    async fn fetched(store: &Store, num: u64) -> Vec<u64> {
        use crate::queue::QueueStore as _;
        let (messages, _) = store.read_queue(num, 0, 100, 1 << 20, 0).await.unwrap();
        messages.iter().map(|m| m.seq).collect()
    }

    #[tokio::test]
    async fn a_lazy_ack_hides_its_messages_at_once_and_rides_in_the_next_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer) = Store::open(&dir.path().join("db.redb"), "example.org", 64).unwrap();
        let num = queue_of(&store, "a@example.org/d", 4).await;
        let other = queue_of(&store, "b@example.org/d", 1).await;
        store.ack_later(num, 2);
        // Nothing waited for it: reads skip the acknowledged messages from now on.
        assert_eq!(fetched(&store, num).await, vec![3, 4]);
        // The next write's batch (another client's enqueue, answered once durable) deleted
        // them, well before the ack would have had a batch of its own.
        use crate::queue::QueueStore as _;
        store
            .enqueue(
                &"b@example.org/d".parse().unwrap(),
                roost_protocol::MessageId([9; 16]),
                9,
                vec![9],
                100,
            )
            .await
            .unwrap();
        assert_eq!(stored(&store, num).await, (vec![3, 4], 2));
        assert_eq!(store.acked_through(num), 0, "forgotten once committed");
        assert_eq!(stored(&store, other).await, (vec![1, 2], 2));
    }

    #[tokio::test]
    async fn a_lazy_ack_alone_is_written_after_the_delay_and_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer) = Store::open(&path, "example.org", 64).unwrap();
        let num = queue_of(&store, "a@example.org/d", 3).await;
        // No other write comes: the writer runs a batch for the ack by itself.
        store.ack_later(num, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored(&store, num).await.0 != vec![2, 3] {
            assert!(Instant::now() < deadline, "the ack was never written");
            tokio::time::sleep(ACK_DELAY / 5).await;
        }
        // An ack still waiting when the server stops is written before the file closes.
        store.ack_later(num, 2);
        drop(store);
        writer.join();
        let (store, _writer) = Store::open(&path, "example.org", 64).unwrap();
        assert_eq!(stored(&store, num).await, (vec![3], 1));
    }

    /// A crash before any batch applied an ack loses the ack and nothing else: the messages
    /// are there again, with their seqs, for the client to skip.
    #[tokio::test]
    async fn a_lazy_ack_lost_in_a_crash_only_delivers_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer) = Store::open(&path, "example.org", 64).unwrap();
        let num = queue_of(&store, "a@example.org/d", 3).await;
        store.hold_acks(true);
        store.ack_later(num, 2);
        assert_eq!(fetched(&store, num).await, vec![3]);
        drop(store);
        writer.join();
        let (store, _writer) = Store::open(&path, "example.org", 64).unwrap();
        assert_eq!(fetched(&store, num).await, vec![1, 2, 3]);
        // Acknowledged again, they go.
        store.ack_later(num, 2);
        assert_eq!(fetched(&store, num).await, vec![3]);
    }

    /// A store in `dir` with two queues, a (holding `queued` messages) and b (empty), and the
    /// group of [`hosted_group`].
    async fn two_queues_and_a_group(dir: &Path, queued: u8) -> (Store, WriterHandle, u64, u64) {
        let (store, writer) = Store::open(&dir.join("db.redb"), "example.org", 64).unwrap();
        let a = queue_of(&store, "a@example.org/d", queued).await;
        let b = queue_of(&store, "b@example.org/d", 0).await;
        hosted_group(&store).await;
        (store, writer, a, b)
    }

    /// The group [`send_to`] sends to (key 7), stored at version 0.
    async fn hosted_group(store: &Store) {
        use crate::delivery::GroupStore as _;
        store
            .create_group(crate::delivery::GroupState {
                key: vec![7],
                epoch: 1,
                version: 0,
                snapshot: vec![1],
                chain: Default::default(),
            })
            .await
            .unwrap();
    }

    /// A send to `recipients` in the group of [`hosted_group`], with a receipt for `key`.
    fn send_to(
        recipients: &[u64],
        key: u8,
    ) -> (crate::delivery::GroupWrite, Vec<crate::delivery::FanOut>) {
        use crate::delivery::receipt::{Answer, Receipt};
        use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
        let payload = QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![key].into(),
        });
        let write = crate::delivery::GroupWrite {
            key: vec![7],
            loaded: 0,
            state: None,
            receipt: Some(Receipt {
                key: [key; 32],
                answer: Answer::Reached,
                accepted_ms: 1_000,
                fresh_after_ms: 0,
                counter: None,
            }),
            lazy: false,
        };
        let fan = crate::delivery::FanOut {
            local: recipients.to_vec(),
            remote: Default::default(),
            payload,
            timestamp_ms: 1_000,
        };
        (write, vec![fan])
    }

    /// Sends queued in one batch share its open tables with the batch's acknowledgements and
    /// with jobs that open tables themselves between them: every job sees what the jobs
    /// before it wrote, a refused one writes nothing, and each queue keeps the order of the
    /// sends.
    #[tokio::test]
    async fn the_sends_of_one_batch_share_its_tables_in_order() {
        use crate::delivery::GroupStore as _;
        use crate::delivery::receipt::ReceiptStore as _;
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer, a, b) = two_queues_and_a_group(dir.path(), 2).await;
        // The writer waits inside a job while the rest queue up behind it: they make one batch,
        // which starts with the acknowledgement taken meanwhile.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let blocker = store
            .submit_write(move |_| {
                let _ = wait.recv();
                Ok(Ok::<_, StoreError>(()))
            })
            .await
            .unwrap();
        store.ack_later(a, 1);
        let (write, fans) = send_to(&[a], 1);
        let first = store.submit(write, fans, 100).await.unwrap();
        // A job of its own tables between two sends.
        let head_of_a = store
            .submit_write(move |txn| {
                let head = txn.open_table(QUEUE_HEADS)?.get(a)?.map(|v| v.value());
                Ok(Ok::<_, StoreError>(head))
            })
            .await
            .unwrap();
        let (write, fans) = send_to(&[a], 1);
        let repeated = store.submit(write, fans, 100).await.unwrap();
        let (write, fans) = send_to(&[a, b], 2);
        let second = store.submit(write, fans, 100).await.unwrap();
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        assert_eq!(first.durable().await.unwrap().reached, vec![1]);
        // The ack deleted message 1; the first send appended message 3.
        assert_eq!(head_of_a.await.unwrap().unwrap(), Some((3, 2)));
        assert!(matches!(
            repeated.durable().await,
            Err(crate::error::ServiceError::GroupMoved)
        ));
        assert_eq!(second.durable().await.unwrap().reached, vec![2]);
        assert_eq!(stored(&store, a).await, (vec![2, 3, 4], 3));
        assert_eq!(stored(&store, b).await, (vec![1], 1));
        assert_eq!(fetched(&store, a).await, vec![2, 3, 4]);
        assert_eq!(store.receipt([1; 32], 0).await.unwrap(), Some(1));
        assert_eq!(store.receipt([2; 32], 0).await.unwrap(), Some(2));
    }

    /// The payloads and reference rows the file holds: (payload ids, (payload id, refs) rows).
    async fn payloads(store: &Store) -> (Vec<u64>, Vec<(u64, u64)>) {
        store
            .read(|txn| {
                let ids = txn
                    .open_table(PAYLOADS)?
                    .iter()?
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<Vec<_>, _>>()?;
                let refs = txn
                    .open_table(PAYLOAD_REFS)?
                    .iter()?
                    .map(|e| e.map(|(k, v)| (k.value(), v.value())))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StoreError>((ids, refs))
            })
            .await
            .unwrap()
    }

    /// A payload queued for one recipient has no reference row (none to write with the send,
    /// none to delete with the ack); one queued for several counts them, and the payload goes
    /// with the last acknowledgement, whichever way it was stored.
    #[tokio::test]
    async fn a_payload_counts_its_references_only_when_shared() {
        use crate::delivery::GroupStore as _;
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer, a, b) = two_queues_and_a_group(dir.path(), 0).await;
        let (write, fans) = send_to(&[a], 1);
        store.apply(write, fans, 100).await.unwrap();
        let (write, fans) = send_to(&[a, b], 2);
        store.apply(write, fans, 100).await.unwrap();
        let (ids, refs) = payloads(&store).await;
        assert_eq!(ids.len(), 2);
        assert_eq!(refs, vec![(ids[1], 2)]);
        // Message 1 of a (the 1:1 one) is acknowledged: its payload goes.
        store.ack_later(a, 1);
        store.write(|_| Ok(Ok::<_, StoreError>(()))).await.unwrap();
        assert_eq!(payloads(&store).await, (vec![ids[1]], vec![(ids[1], 2)]));
        store.ack_later(a, 2);
        store.write(|_| Ok(Ok::<_, StoreError>(()))).await.unwrap();
        assert_eq!(payloads(&store).await, (vec![ids[1]], vec![(ids[1], 1)]));
        store.ack_later(b, 1);
        store.write(|_| Ok(Ok::<_, StoreError>(()))).await.unwrap();
        assert_eq!(payloads(&store).await, (vec![], vec![]));
        assert_eq!(stored(&store, a).await, (vec![], 0));
        assert_eq!(stored(&store, b).await, (vec![], 0));
    }

    #[test]
    fn a_database_without_a_domain_records_it_then_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        // As made before the domain was kept: the schema version and no SETTINGS table.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", SCHEMA_VERSION)
                .unwrap();
            txn.commit().unwrap();
        }
        let (store, writer) = Store::open(&path, "example.org", 8).unwrap();
        drop(store);
        writer.join();
        let refused = Store::open(&path, "other.test", 8).err().unwrap();
        assert!(matches!(refused, StoreError::Mismatch(_)), "{refused}");
        let (store, writer) = Store::open(&path, "example.org", 8).unwrap();
        drop(store);
        writer.join();
    }

    /// A new store at `path` with one client, u@example.org/phone: (store, writer, the client,
    /// its number).
    async fn with_one_client(path: &Path) -> (Store, WriterHandle, roost_protocol::ClientId, u64) {
        use crate::auth::AuthStore;
        let (store, writer) = Store::open(path, "example.org", 8).unwrap();
        let client: roost_protocol::ClientId = "u@example.org/phone".parse().unwrap();
        let num = store
            .add_client(crate::storage::suite::credential("u@example.org/phone"))
            .await
            .unwrap();
        (store, writer, client, num)
    }

    /// Rewrites the store's tables with `downgrade` and records schema `version`, as that
    /// version would have left them, then closes the store.
    async fn leave_as_version(
        store: Store,
        writer: WriterHandle,
        version: u64,
        downgrade: fn(&WriteTransaction) -> Result<(), StoreError>,
    ) {
        store
            .write(move |txn| {
                downgrade(txn)?;
                txn.open_table(META)?.insert("schema_version", version)?;
                Ok(Ok::<_, StoreError>(()))
            })
            .await
            .unwrap();
        drop(store);
        writer.join();
    }

    /// A database of schema version 3 (no expiry indexes) is upgraded when opened: its
    /// queued messages, dedup records (also those of acked messages) and KeyPackages expire
    /// as they would have, exactly.
    #[tokio::test]
    async fn a_version_3_database_gets_its_expiry_indexes() {
        use crate::keypackage::KeyPackageStore;
        use crate::queue::{Enqueued, QueueStore};
        use crate::storage::suite::payload;
        use roost_protocol::MessageId;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer, client, num) = with_one_client(&path).await;
        for (n, at) in [(1u8, 100), (2, 100), (3, 10_000)] {
            let got = store
                .enqueue(&client, MessageId([n; 16]), at, payload(n), 10)
                .await
                .unwrap();
            assert_eq!(got.1, Enqueued::Queued(u64::from(n)));
        }
        // The first is acked: only its dedup record is left of it.
        store.ack(num, 1).await.unwrap();
        store
            .add(
                num,
                vec![(50, vec![1]), (500, vec![2])],
                Some((60, vec![3])),
                10,
                None,
            )
            .await
            .unwrap();
        // As version 3 left it: no index rows.
        leave_as_version(store, writer, 3, |txn| {
            txn.open_table(QUEUE_EXPIRY)?.retain(|_, _| false)?;
            txn.open_table(KEY_PACKAGE_EXPIRY)?.retain(|_, _| false)?;
            keypackage::as_version_4(txn)
        })
        .await;

        let (store, _writer) = Store::open(&path, "example.org", 8).unwrap();
        assert_eq!(store.expire(5_000).await.unwrap(), 1);
        let (left, _) = store.read_queue(num, 0, 10, 1 << 20, 0).await.unwrap();
        assert_eq!(left.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
        // Both old dedup records went (the acked message's too); the new one holds.
        for (n, expected) in [
            (1u8, Enqueued::Queued(4)),
            (2, Enqueued::Queued(5)),
            (3, Enqueued::Duplicate(3)),
        ] {
            let got = store
                .enqueue(&client, MessageId([n; 16]), 10_001, payload(n), 10)
                .await
                .unwrap();
            assert_eq!(got.1, expected, "message {n}");
        }
        assert_eq!(store.purge_expired(100).await.unwrap(), 1);
        assert_eq!(store.count(num, 100).await.unwrap(), (1, false));
    }

    /// A database of schema version 4 (no claim cursors: a claim deleted the KeyPackage) is
    /// upgraded when opened: what was handed out stays handed out, what was held is handed
    /// out in upload order, once, and the upload limit counts what is held.
    #[tokio::test]
    async fn a_version_4_database_gets_claim_cursors() {
        use crate::keypackage::KeyPackageStore;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer, client, num) = with_one_client(&path).await;
        let kps: Vec<(u64, Vec<u8>)> = (1..=20u8).map(|i| (1_000, vec![i])).collect();
        store
            .add(num, kps, Some((1_000, vec![99])), 25, None)
            .await
            .unwrap();
        for i in 1..=5u8 {
            let claimed = store.claim_one(&client, 10).await.unwrap();
            assert_eq!(claimed.key_package.as_slice(), [i]);
        }
        // As version 4 left the same claims.
        leave_as_version(store, writer, 4, |txn| {
            keypackage::as_version_4(txn)?;
            txn.delete_table(GROUP_DELTAS)?;
            Ok(())
        })
        .await;

        let (store, _writer) = Store::open(&path, "example.org", 8).unwrap();
        assert_eq!(store.count(num, 10).await.unwrap(), (15, true));
        // 15 held: 11 more would pass the limit of 25, 10 fit.
        let more = |n: u8| (0..n).map(|i| (1_000, vec![100 + i])).collect::<Vec<_>>();
        assert!(store.add(num, more(11), None, 25, None).await.is_err());
        assert_eq!(store.add(num, more(10), None, 25, None).await.unwrap(), 25);
        let mut handed = Vec::new();
        for _ in 0..25 {
            let claimed = store.claim_one(&client, 10).await.unwrap();
            assert_eq!(
                claimed.kind,
                roost_protocol::messages::keypackage::KeyPackageKind::Ordinary
            );
            handed.push(claimed.key_package.into_vec());
        }
        let expected: Vec<Vec<u8>> = (6..=20u8).chain(100..110).map(|i| vec![i]).collect();
        assert_eq!(handed, expected);
        let last = store.claim_one(&client, 10).await.unwrap();
        assert_eq!(last.key_package.as_slice(), [99]);
        assert_eq!(store.count(num, 10).await.unwrap(), (0, true));
    }
}
