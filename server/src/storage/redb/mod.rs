//! The embedded redb engine: opening and schema check, reads off the async executor, and a
//! single writer thread that coalesces concurrent write operations into one durable
//! transaction (group commit), so one fsync serves every request in the batch.
//!
//! A write operation returns `Result<Result<R, E>, StoreError>`: the outer error is a storage
//! failure and aborts the whole batch (every operation in it fails, nothing is written); the
//! inner error is the operation's own refusal, and an operation that refuses must not have
//! written anything. The caller's future resolves only after the batch committed durably.

pub(crate) mod admin;
mod auth;
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

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::StoreError;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::oneshot;

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
type Job = Box<dyn FnOnce(&WriteTransaction) -> Result<Completion, StoreError> + Send>;

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
    /// Tests only: leave pending fan-outs alone (as if the process died right after the
    /// transaction that wrote them).
    #[cfg(test)]
    hold_pending: AtomicBool,
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
    writer: mpsc::SyncSender<Job>,
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
            #[cfg(test)]
            hold_pending: AtomicBool::new(false),
        });
        // A bounded queue: when the disk falls behind, writers wait instead of piling up.
        let (writer, jobs) = mpsc::sync_channel::<Job>(max_batch * 4);
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
        if self.shared.current().is_none() {
            // Reopening after a storage failure: refuse at once rather than queue.
            return Err(E::from(StoreError::Unavailable));
        }
        let (tx, rx) = oneshot::channel::<Result<R, E>>();
        let job: Job = Box::new(move |txn| {
            let outcome = op(txn)?;
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
        match self.writer.try_send(job) {
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
            let _ = self.writer.try_send(job);
        }
        read
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
            Some(found @ (2 | 3)) => {
                if found == 2 {
                    outbox::upgrade_from_v2(&txn)?;
                }
                queue::upgrade_from_v3(&txn)?;
                keypackage::upgrade_from_v3(&txn)?;
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
        txn.open_table(OUTBOX)?;
        txn.open_table(RECEIPTS)?;
        txn.open_table(RECEIPT_TIMES)?;
        txn.open_table(SEND_COUNTERS)?;
        txn.open_table(FANOUT_PENDING)?;
        txn.open_table(PUSH_REGISTRATIONS)?;
        txn.open_table(PUSH_JOBS)?;
        txn.open_table(PUSH_DUE)?;
    }
    // Fan-outs a crash (or a storage failure) left pending are queued before any job runs,
    // so nothing later overtakes them in a recipient's queue. Nobody listens yet at a start;
    // after a reopen every listener reads its queue again.
    let queued = groups::queue_pending(&txn)?;
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

fn write_loop(shared: &Shared, jobs: &mpsc::Receiver<Job>, max_batch: usize) {
    // Blocks until the first job (unless a pending fan-out waits: then the batch starts at
    // once); ends when every Store handle is gone.
    loop {
        let mut batch = Vec::new();
        if shared.has_pending() {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(mpsc::TryRecvError::Empty) => {}
                // Shutting down: queue what is pending, then close.
                Err(mpsc::TryRecvError::Disconnected) => {
                    if let Some(db) = shared.current() {
                        run_batch(shared, &db, batch);
                    }
                    break;
                }
            }
        } else {
            match jobs.recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(db) = shared.current() else {
            // Not reached: only this thread takes the database out, and it puts one back
            // before it takes jobs again. Dropping the batch answers Unavailable.
            break;
        };
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
    // Every batch bumps a counter, so that after a failed commit a reopened database tells
    // whether the batch reached the file.
    let number = match next_counter(&txn, "write_batch") {
        Ok(number) => number,
        Err(err) => {
            tracing::error!(%err, "write batch aborted");
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
        match groups::queue_pending(&txn) {
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
    let mut completions = Vec::with_capacity(batch.len());
    for job in batch {
        if failure.is_some() {
            // Dropping the job drops its reply sender: the caller gets Unavailable.
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| job(&txn))) {
            Ok(Ok(completion)) => completions.push(completion),
            Ok(Err(err)) => failure = Some(err),
            Err(_) => failure = Some(StoreError::Unavailable),
        }
    }
    if let Some(err) = failure {
        tracing::error!(%err, "write batch aborted");
        let _ = txn.abort();
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
            Batch::StorageFailed(Some(Unsure {
                number,
                completions,
            }))
        }
        Err(err) => {
            tracing::error!(%err, "write batch failed");
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
fn reopen(shared: &Shared, jobs: &mpsc::Receiver<Job>, mut unsure: Option<Unsure>) -> bool {
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
                // Refused: its caller sees Unavailable.
                Ok(job) => drop(job),
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
    let mut meta = txn.open_table(META)?;
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

    /// A database of schema version 3 (no expiry indexes) is upgraded when opened: its
    /// queued messages, dedup records (also those of acked messages) and KeyPackages expire
    /// as they would have, exactly.
    #[tokio::test]
    async fn a_version_3_database_gets_its_expiry_indexes() {
        use crate::auth::AuthStore;
        use crate::keypackage::KeyPackageStore;
        use crate::queue::{Enqueued, QueueStore};
        use crate::storage::suite::{credential, payload};
        use roost_protocol::MessageId;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer) = Store::open(&path, "example.org", 8).unwrap();
        let client: roost_protocol::ClientId = "u@example.org/phone".parse().unwrap();
        let num = store
            .add_client(credential("u@example.org/phone"))
            .await
            .unwrap();
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
        store
            .write(|txn| {
                txn.open_table(QUEUE_EXPIRY)?.retain(|_, _| false)?;
                txn.open_table(KEY_PACKAGE_EXPIRY)?.retain(|_, _| false)?;
                txn.open_table(META)?.insert("schema_version", 3)?;
                Ok(Ok::<_, StoreError>(()))
            })
            .await
            .unwrap();
        drop(store);
        writer.join();

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
}
