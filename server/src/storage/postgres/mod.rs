//! The PostgreSQL engine: every node of a domain runs the services over one database.
//!
//! - Connections come from a pool (deadpool over tokio-postgres); waiting for one, connecting
//!   and each statement are bounded by `storage.timeout_ms`, and a database that is down or
//!   unreachable makes the operation fail with [`StoreError::Unavailable`] (UNAVAILABLE on the
//!   wire). The pool replaces broken connections, so a node recovers by itself when the
//!   database returns.
//! - Every write operation is one transaction, committed (durably: `synchronous_commit` is the
//!   server's, on by default) before it is acknowledged. An operation that refuses rolls back.
//!   PostgreSQL shares one WAL flush between transactions that commit together, which is the
//!   group commit the embedded engine does itself.
//! - Ordering across nodes comes from row locks taken in a fixed order (ascending client
//!   number for queues; the group row for a group), so there are no deadlocks between writers
//!   of this module.
//! - The schema is created and upgraded by numbered, forward-only migrations (`migrations/`),
//!   applied at start inside one transaction under an advisory lock, so nodes starting
//!   together do not race; a database whose schema is newer than this build is refused, and
//!   so is one that belongs to another domain or AS key.
//! - Wake-ups for the other nodes are `NOTIFY`s (see [`crate::bus`] and `listen`). Removals
//!   notify inside their transaction (delivered on commit, never lost). Queue heads are
//!   announced after the commit, in batches, by a task of their own (`announce`): PostgreSQL
//!   serialises the commits of every transaction that notifies (a database-wide lock held
//!   through the WAL flush), which capped a node at one commit per flush. A node that dies
//!   between a commit and its announcement leaves other nodes' listeners unwoken until the
//!   next wake-up of their queue or the periodic resync (`listen`), never without the message.

mod admin;
mod announce;
mod auth;
mod batch;
mod groups;
mod keypackage;
mod listen;
mod outbox;
mod push;
mod queue;
mod receipts;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::StoreError;
use crate::bus::BusSink;

/// Migrations, in order: (version, SQL). Append only; never edit a released one.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_receipts.sql")),
    (3, include_str!("migrations/0003_push.sql")),
    (4, include_str!("migrations/0004_blobs.sql")),
    (5, include_str!("migrations/0005_fanout_pending.sql")),
    (6, include_str!("migrations/0006_send_counters.sql")),
    (7, include_str!("migrations/0007_push_noted.sql")),
    (8, include_str!("migrations/0008_expiry_batches.sql")),
    (9, include_str!("migrations/0009_group_deltas.sql")),
];

/// Key of the advisory lock that serialises migrations ("roost" in ASCII).
const MIGRATION_LOCK: i64 = 0x0072_6f6f_7374;

/// What [`PgStore::connect`] needs.
pub(crate) struct Options<'a> {
    /// Connection string (may hold a password: never logged).
    pub(crate) url: &'a str,
    pub(crate) pool_size: u32,
    pub(crate) timeout: Duration,
    pub(crate) domain: &'a str,
    pub(crate) as_public_key: &'a [u8],
}

/// Handle to the PostgreSQL engine; cheap to clone.
#[derive(Clone)]
pub(crate) struct PgStore {
    pool: Pool,
    /// This node's id, random per process: names its outbox leases and its own wake-ups.
    node: Arc<str>,
    timeout: Duration,
    /// Queue heads to announce to the other nodes (see `announce`).
    announcer: tokio::sync::mpsc::UnboundedSender<Vec<(u64, u64)>>,
    /// Message fan-outs waiting for this node's fan-out workers (see `batch`).
    fan_outs: batch::Jobs,
    /// This node's listeners, woken by the entries of lazy fan-outs it queues.
    queues: crate::queue::Notifier,
    /// Tests only: leave lazy fan-outs pending (as if the node died right after the
    /// transaction that wrote them).
    #[cfg(test)]
    hold_pending: Arc<std::sync::atomic::AtomicBool>,
}

/// Closes the pool and stops the listener and the announcer at shutdown.
pub(crate) struct PgCloser {
    pool: Pool,
    listener: tokio::task::JoinHandle<()>,
    announcer: tokio::task::JoinHandle<()>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl PgCloser {
    /// Stops the listener and the announcer and closes every pooled connection.
    /// Blocking-safe.
    pub(crate) fn join(self) {
        self.listener.abort();
        self.announcer.abort();
        for worker in &self.workers {
            worker.abort();
        }
        self.pool.close();
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        // Contention between transactions is no failure of the database.
        let contention = err.code().is_some_and(|code| {
            *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        });
        let err = classify(err);
        if matches!(err, StoreError::Unavailable) && !contention {
            metrics::counter!("roost_storage_failures_total", "engine" => "postgres").increment(1);
        }
        err
    }
}

/// A failure of the database or of the way to it is [`StoreError::Unavailable`]; a refusal of
/// the statement is a plain database error.
fn classify(err: tokio_postgres::Error) -> StoreError {
    // A closed or failed connection: the database went away (or the network to it).
    if err.is_closed() || err.code().is_none() && err.as_db_error().is_none() {
        return StoreError::Unavailable;
    }
    match err.code() {
        Some(code)
            if *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::QUERY_CANCELED
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::DISK_FULL
                || *code == SqlState::OUT_OF_MEMORY
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            StoreError::Unavailable
        }
        _ => StoreError::Database(match err.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()).into(),
            None => err.to_string().into(),
        }),
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(err) => err.into(),
            _ => {
                metrics::counter!("roost_storage_failures_total", "engine" => "postgres")
                    .increment(1);
                StoreError::Unavailable
            }
        }
    }
}

/// Converts a stored BIGINT back to the services' u64 (stored values are never negative).
pub(super) fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt("negative number"))
}

/// Converts a u64 of the services to a BIGINT (they stay below 2^63).
pub(super) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt("number out of range"))
}

/// Column `idx` of a row read from `table`; a NULL or a value of another type is a corrupt
/// record (not a connection failure, which is what a bare `tokio_postgres::Error` maps to).
pub(super) fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    idx: usize,
    table: &'static str,
) -> Result<T, StoreError> {
    row.try_get(idx).map_err(|_| StoreError::Corrupt(table))
}

fn pg_config(options: &Options<'_>) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = options
        .url
        .parse()
        .map_err(|_| StoreError::Mismatch("storage.url is not a valid connection string".into()))?;
    let ms = options.timeout.as_millis();
    config
        .connect_timeout(options.timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .tcp_user_timeout(options.timeout)
        // A statement that hangs (a lock held by a stuck node, a slow disk) fails instead of
        // holding the request past its deadline.
        .options(format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={}",
            ms.saturating_mul(4)
        ));
    Ok(config)
}

impl PgStore {
    /// Connects, migrates the schema, checks that the database is this domain's and starts
    /// listening for the other nodes' wake-ups.
    pub(crate) async fn connect(
        options: Options<'_>,
        sink: BusSink,
    ) -> Result<(Self, PgCloser), StoreError> {
        let node: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
        let mut config = pg_config(&options)?;
        // Every connection of this node names it, so the others can tell when it is gone.
        config.application_name(format!("{}{node}", listen::NODE_PREFIX));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size as usize)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| StoreError::Database(err.to_string().into()))?;
        let (announcer, announcements) = tokio::sync::mpsc::unbounded_channel();
        let (fan_outs, jobs) = tokio::sync::mpsc::unbounded_channel();
        let store = Self {
            pool: pool.clone(),
            node,
            timeout: options.timeout,
            announcer,
            fan_outs,
            queues: sink.queues.clone(),
            #[cfg(test)]
            hold_pending: Arc::default(),
        };
        store.migrate().await?;
        store
            .check_identity(options.domain, options.as_public_key)
            .await?;
        // Fan-outs a node that died left pending are queued before this one serves. (Nodes
        // that run meanwhile queue a group's pending fan-outs before writing anything else
        // for it: see `groups`.)
        groups::queue_pending(&store, None).await?;
        let (ready, listening) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen::run(config.clone(), store.node.clone(), sink, ready));
        let announcer = tokio::spawn(announce::run(config, store.node.clone(), announcements));
        let workers = batch::start(&store, jobs);
        // Serve only once the other nodes' wake-ups are heard.
        if !matches!(
            tokio::time::timeout(options.timeout, listening).await,
            Ok(Ok(()))
        ) {
            listener.abort();
            announcer.abort();
            for worker in &workers {
                worker.abort();
            }
            return Err(StoreError::Database(
                "cannot LISTEN for the other nodes' wake-ups".into(),
            ));
        }
        Ok((
            store,
            PgCloser {
                pool,
                listener,
                announcer,
                workers,
            },
        ))
    }

    /// A pooled connection (UNAVAILABLE if none comes within the timeout).
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// This node's id.
    pub(super) fn node(&self) -> &str {
        &self.node
    }

    /// Announces committed queue heads (client number, seq) to the other nodes.
    pub(super) fn announce(&self, heads: Vec<(u64, u64)>) {
        if !heads.is_empty() {
            // Only fails once the announcer is gone (shutting down).
            let _ = self.announcer.send(heads);
        }
    }

    /// Wakes this node's listeners of new queue entries (the other nodes hear of them through
    /// [`PgStore::announce`]).
    pub(super) fn wake_local(&self, fresh: &[(u64, crate::queue::Fresh)]) {
        self.queues.notify_fresh(fresh);
    }

    /// Queues the pending fan-outs of group `key` from a task of its own (the commit that
    /// wrote them is answered meanwhile). A failure leaves them pending: the group's next
    /// write, or the next node to start, queues them first.
    pub(super) fn queue_pending_later(&self, key: Vec<u8>) {
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(err) = groups::queue_pending(&store, Some(&key)).await {
                tracing::warn!(%err, "pending fan-out not queued yet: the group's next write will");
            }
        });
    }

    /// Tests only: while `hold` is set, this node leaves lazy fan-outs pending.
    #[cfg(test)]
    pub(crate) fn hold_pending(&self, hold: bool) {
        self.hold_pending
            .store(hold, std::sync::atomic::Ordering::Release);
    }

    /// Whether this node leaves lazy fan-outs pending (tests only; always false otherwise).
    pub(super) fn holds_pending(&self) -> bool {
        #[cfg(test)]
        if self.hold_pending.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        false
    }

    /// The configured timeout (leases and waits are derived from it).
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the database answers.
    pub(crate) async fn healthy(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Applies the migrations this build knows that the database lacks, in one transaction
    /// under an advisory lock; refuses a database with a newer schema.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        txn.batch_execute(
            "CREATE TABLE IF NOT EXISTS roost_schema (
                 version    BIGINT PRIMARY KEY,
                 applied_ms BIGINT NOT NULL
             )",
        )
        .await?;
        let applied: Vec<i64> = txn
            .query("SELECT version FROM roost_schema", &[])
            .await?
            .iter()
            .map(|row| column(row, 0, "roost_schema"))
            .collect::<Result<_, _>>()?;
        let found = applied.iter().copied().max().unwrap_or(0);
        let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if found > known {
            return Err(StoreError::Schema {
                found: to_u64(found)?,
                expected: to_u64(known)?,
            });
        }
        // Every migration not applied yet, in order: one numbered below the newest applied
        // (4, added after 5 was released) is applied too.
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
            txn.batch_execute(sql).await?;
            txn.execute(
                "INSERT INTO roost_schema (version, applied_ms) VALUES ($1, $2)",
                &[version, &to_i64(crate::unix_millis())?],
            )
            .await?;
            tracing::info!(version, "database schema migrated");
        }
        txn.commit().await?;
        Ok(())
    }

    /// Records the domain and AS key on first start; refuses a database of another domain or
    /// AS key (every node of a domain must share its identity files).
    async fn check_identity(&self, domain: &str, as_public_key: &[u8]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let as_key = hex::encode(as_public_key);
        for (name, value, what) in [
            ("domain", domain, "domain"),
            ("as_public_key", as_key.as_str(), "AS signing key"),
        ] {
            txn.execute(
                "INSERT INTO roost_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &value],
            )
            .await?;
            let row = txn
                .query_one("SELECT value FROM roost_meta WHERE name = $1", &[&name])
                .await?;
            let stored: String = row.get(0);
            if stored != value {
                return Err(StoreError::Mismatch(if name == "domain" {
                    format!(
                        "the database belongs to domain {stored:?}, not {value:?}: check domain and storage.url"
                    )
                } else {
                    format!(
                        "the database was made with another {what}: every node of a domain must use the same identity files (identity_dir)"
                    )
                }));
            }
        }
        txn.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(url: &str) -> Options<'_> {
        Options {
            url,
            pool_size: 4,
            timeout: Duration::from_secs(10),
            domain: "example.org",
            as_public_key: &[7; 32],
        }
    }

    fn sink() -> BusSink {
        BusSink {
            queues: Default::default(),
            revoked: Default::default(),
            nodes_gone: Default::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_together_migrate_once_and_newer_schemas_are_refused() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("migrate").unwrap();
        // Four nodes start at once on an empty database: one creates the schema, the others
        // wait for it and find it done.
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { PgStore::connect(options(&url), sink()).await })
            })
            .collect();
        let mut closers = Vec::new();
        for start in starts {
            match start.await.expect("task") {
                Ok((_, closer)) => closers.push(closer),
                Err(err) => panic!("a node failed to start: {err}"),
            }
        }
        let versions = cluster
            .psql(
                "migrate",
                "SELECT version FROM roost_schema ORDER BY version",
            )
            .unwrap();
        // Every migration applied, each once.
        let known: Vec<String> = MIGRATIONS.iter().map(|(v, _)| v.to_string()).collect();
        assert_eq!(versions.trim(), known.join("\n"));
        for closer in closers {
            closer.join();
        }

        // A database of a roost that had 5 but not 4 (added later with a lower number) gets 4.
        cluster
            .psql(
                "migrate",
                "DELETE FROM roost_schema WHERE version = 4; \
                 DROP TABLE blobs, blob_chunks, blob_usage; DROP SEQUENCE blob_data_seq",
            )
            .unwrap();
        let (_, closer) = PgStore::connect(options(&url), sink()).await.unwrap();
        closer.join();
        let versions = cluster
            .psql(
                "migrate",
                "SELECT version FROM roost_schema ORDER BY version",
            )
            .unwrap();
        assert_eq!(versions.trim(), known.join("\n"));
        let tables = cluster
            .psql("migrate", "SELECT count(*) FROM blobs")
            .unwrap();
        assert_eq!(tables.trim(), "0");

        // A database migrated by a newer roost is refused.
        cluster
            .psql("migrate", "INSERT INTO roost_schema VALUES (99, 0)")
            .unwrap();
        let refused = PgStore::connect(options(&url), sink()).await;
        assert!(matches!(
            refused.err(),
            Some(StoreError::Schema {
                found: 99,
                expected: 9
            })
        ));
    }
}
