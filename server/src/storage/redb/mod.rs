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
mod groups;
mod keypackage;
mod outbox;
mod queue;
pub(crate) mod tables;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use super::StoreError;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::oneshot;

use tables::*;

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(err: $t) -> Self {
                StoreError::Database(err.to_string().into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Job = Box<dyn FnOnce(&WriteTransaction) -> Result<Completion, StoreError> + Send>;

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    db: Arc<Database>,
    writer: mpsc::SyncSender<Job>,
}

impl Store {
    /// Opens or creates the database at `path`, checks the schema version and that the
    /// database belongs to `domain` (recording it on first start), and starts the writer
    /// thread. `max_batch` bounds how many operations share one transaction. The returned
    /// [`WriterHandle`] waits for the writer (and so the database) to close once every `Store`
    /// clone is dropped.
    pub(crate) fn open(
        path: &Path,
        domain: &str,
        max_batch: usize,
    ) -> Result<(Self, WriterHandle), StoreError> {
        let db = Database::builder().create(path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(2) => {
                    outbox::upgrade_from_v2(&txn)?;
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                    tracing::info!("database upgraded from schema version 2");
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
            txn.open_table(PAYLOADS)?;
            txn.open_table(PAYLOAD_REFS)?;
            txn.open_table(KEY_PACKAGES)?;
            txn.open_table(KEY_PACKAGE_COUNTS)?;
            txn.open_table(LAST_RESORT)?;
            txn.open_table(TOKEN_USES)?;
            txn.open_table(GROUPS)?;
            txn.open_table(GROUP_VERSIONS)?;
            txn.open_table(OUTBOX)?;
        }
        txn.commit()?;

        let db = Arc::new(db);
        // A bounded queue: when the disk falls behind, writers wait instead of piling up.
        let (writer, jobs) = mpsc::sync_channel::<Job>(max_batch * 4);
        let writer_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("roost-store-writer".into())
            .spawn(move || write_loop(writer_db, &jobs, max_batch))
            .map_err(|_| StoreError::Unavailable)?;
        Ok((Self { db, writer }, WriterHandle(thread)))
    }

    /// Runs `op` in a write transaction shared with other concurrent operations; resolves
    /// after the transaction committed durably.
    pub(crate) async fn write<R, E, F>(&self, op: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<Result<R, E>, StoreError> + Send + 'static,
    {
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
        rx.await.map_err(|_| E::from(StoreError::Unavailable))?
    }

    /// Whether a read of META succeeds.
    pub(crate) async fn healthy(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(META)?.get("schema_version")?;
            Ok(())
        })
        .await
    }

    /// Runs `op` in a read transaction on a blocking thread.
    pub(crate) async fn read<R, E, F>(&self, op: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<R, E> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(StoreError::from)?;
            op(&txn)
        })
        .await
        .map_err(|_| E::from(StoreError::Unavailable))?
    }
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

fn write_loop(db: Arc<Database>, jobs: &mpsc::Receiver<Job>, max_batch: usize) {
    // Blocks until the first job; ends when every Store handle is gone.
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&db, batch);
    }
    // Readers hold their own clones only for the duration of a read; wait them out so the
    // file is closed when join() returns.
    let mut db = db;
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => {
                drop(db);
                return;
            }
            Err(shared) => {
                db = shared;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

fn run_batch(db: &Database, batch: Vec<Job>) {
    let txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(err) => {
            let err = StoreError::from(err);
            tracing::error!(%err, "cannot begin write transaction");
            // Jobs that never ran are dropped: their callers see Unavailable.
            return;
        }
    };
    let mut completions = Vec::with_capacity(batch.len());
    let mut failure = None;
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
    let result = match failure {
        Some(err) => {
            tracing::error!(%err, "write batch aborted");
            let _ = txn.abort();
            Err(err)
        }
        None => txn.commit().map_err(StoreError::from),
    };
    if let Err(err) = &result {
        tracing::error!(%err, "write batch failed");
    }
    for completion in completions {
        completion(result.clone());
    }
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
}
