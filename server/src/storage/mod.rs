//! Storage engines behind the services' store traits ([`crate::auth::AuthStore`],
//! [`crate::keypackage::KeyPackageStore`], [`crate::queue::QueueStore`],
//! [`crate::delivery::GroupStore`], [`crate::delivery::receipt::ReceiptStore`],
//! [`crate::federation::outbox::OutboxStore`], [`crate::push::PushStore`],
//! [`crate::admin::store::AdminStore`]).
//!
//! One module per engine: [`redb`] (embedded, the default: one process per domain) and
//! [`postgres`] (several nodes of one domain over one database). [`Backend`] is the engine the
//! configuration chose; it implements every trait by handing the call to that engine, so the
//! services never learn which one runs. The same suite (`suite.rs`) runs against each.
//!
//! Every engine gives the same guarantees: nothing is acknowledged before it is durable; an
//! operation that refuses (the inner error of a write) writes nothing; a group's new state
//! with all its queue and outbox entries is one transaction; a fanned-out payload is stored
//! once.

pub(crate) mod group_delta;
pub(crate) mod postgres;
pub(crate) use self::redb::admin::stored_domain as redb_stored_domain;
pub(crate) mod redb;

#[cfg(test)]
mod suite;
#[cfg(test)]
mod sweep_cost;

use std::sync::Arc;

use roost_protocol::messages::auth::ClientCredential;
use roost_protocol::messages::federation::{DeliverResponse, Delivery};
use roost_protocol::{ClientId, Domain, MessageId, UserId, UserName};

use crate::admin::store::{AdminStore, BackupOutcome, StoreStats, UserSummary};
use crate::auth::{AuthStore, ClientRecord};
use crate::delivery::receipt::ReceiptStore;
use crate::delivery::{Applying, FanOut, FanOutResult, GroupState, GroupStore, GroupWrite};
use crate::error::ServiceError;
use crate::federation::outbox::OutboxStore;
use crate::keypackage::KeyPackageStore;
use crate::push::{PushJob, PushStore};
use crate::queue::{Enqueued, Fresh, QueueStore};
use roost_protocol::messages::keypackage::ClaimedKeyPackage;
use roost_protocol::messages::queue::QueueMessage;

/// A storage failure. Nothing of the failed operation was written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The engine reported an error.
    #[error("database error: {0}")]
    Database(Arc<str>),
    /// The database was written by a different schema version.
    #[error(
        "database schema version {found} is not {expected}, the one this roost uses (a newer schema needs a newer roost)"
    )]
    Schema {
        /// Version in the database.
        found: u64,
        /// Version this build uses.
        expected: u64,
    },
    /// A stored record could not be decoded.
    #[error("corrupt record in {0}")]
    Corrupt(&'static str),
    /// The engine is gone (shutting down, the database unreachable, being reopened after a
    /// storage failure) or an operation panicked.
    #[error("store unavailable")]
    Unavailable,
    /// The storage under the engine failed (disk full, fsync failed); the engine reopens the
    /// database by itself. Nothing of the operation was written.
    #[error("storage I/O failed: {0}")]
    Io(Arc<str>),
    /// The database belongs to another homeserver or disagrees with the configuration.
    #[error("{0}")]
    Mismatch(String),
}

/// The storage engine chosen by `[storage] backend`; cheap to clone.
#[derive(Clone)]
pub(crate) enum Backend {
    /// The embedded redb database in the data directory.
    Redb(redb::Store),
    /// A PostgreSQL database shared by every node of the domain.
    Postgres(postgres::PgStore),
}

/// What must run until the engine is closed: redb's writer thread, PostgreSQL's listener.
pub(crate) enum Closer {
    Redb(redb::WriterHandle),
    Postgres(postgres::PgCloser),
}

impl Closer {
    /// Waits until every [`Backend`] clone is dropped and the engine closed. Blocking.
    pub(crate) fn join(self) {
        match self {
            Closer::Redb(writer) => writer.join(),
            Closer::Postgres(closer) => closer.join(),
        }
    }
}

impl Backend {
    /// Whether the engine answers a trivial read (for `/health`).
    pub(crate) async fn healthy(&self) -> Result<(), StoreError> {
        match self {
            Backend::Redb(store) => store.healthy().await,
            Backend::Postgres(store) => store.healthy().await,
        }
    }

    /// The engine's name, as the `engine` label of `roost_storage_failures_total` says it.
    pub(crate) fn engine(&self) -> &'static str {
        match self {
            Backend::Redb(_) => "redb",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// Implements a store trait for [`Backend`] by handing every call to the engine.
macro_rules! dispatch {
    ($trait:ident { $(async fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)* }) => {
        impl $trait for Backend {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match self {
                        Backend::Redb(store) => store.$name($($arg),*).await,
                        Backend::Postgres(store) => store.$name($($arg),*).await,
                    }
                }
            )*
        }
    };
}

dispatch!(AuthStore {
    async fn create_user(&self, name: &UserName, user_key: Vec<u8>, token: Option<(String, u64)>) -> Result<(), ServiceError>;
    async fn user_key(&self, name: &UserName) -> Result<Option<Vec<u8>>, ServiceError>;
    async fn add_client(&self, credential: ClientCredential) -> Result<u64, ServiceError>;
    async fn remove_client(&self, client: &ClientId) -> Result<u64, ServiceError>;
    async fn active_client(&self, client: &ClientId) -> Result<Option<ClientRecord>, ServiceError>;
    async fn active_clients_of(&self, user: &UserId) -> Result<Vec<ClientRecord>, ServiceError>;
    async fn client_nums(&self, clients: Vec<ClientId>) -> Result<Vec<Option<u64>>, ServiceError>;
    async fn replace_credential(&self, credential: ClientCredential) -> Result<(), ServiceError>;
});

dispatch!(KeyPackageStore {
    async fn add(&self, client_num: u64, ordinary: Vec<(u64, Vec<u8>)>, last_resort: Option<(u64, Vec<u8>)>, max_held: u64, receipt: Option<crate::delivery::receipt::Receipt>) -> Result<u64, ServiceError>;
    async fn claim_one(&self, target: &ClientId, now: u64) -> Result<ClaimedKeyPackage, ServiceError>;
    async fn claim_for_user(&self, user: &UserId, now: u64) -> Result<Vec<ClaimedKeyPackage>, ServiceError>;
    async fn count(&self, client_num: u64, now: u64) -> Result<(u32, bool), ServiceError>;
    async fn purge_expired(&self, now: u64) -> Result<u64, ServiceError>;
});

dispatch!(QueueStore {
    async fn enqueue(&self, recipient: &ClientId, id: MessageId, timestamp_ms: u64, payload: Vec<u8>, max_depth: u64) -> Result<(u64, Enqueued), ServiceError>;
    async fn read_queue(&self, client_num: u64, after_seq: u64, max_messages: usize, max_bytes: usize, cutoff_ms: u64) -> Result<(Vec<QueueMessage>, u64), ServiceError>;
    async fn ack(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError>;
    async fn ack_lazily(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError>;
    async fn deliver(&self, deliveries: Vec<Delivery>, max_depth: u64, now_ms: u64) -> Result<(DeliverResponse, Vec<(u64, Fresh)>), ServiceError>;
    async fn expire(&self, cutoff_ms: u64) -> Result<u64, ServiceError>;
});

dispatch!(GroupStore {
    async fn load_group(&self, key: Vec<u8>) -> Result<Option<GroupState>, ServiceError>;
    async fn group_version(&self, key: Vec<u8>) -> Result<Option<u64>, ServiceError>;
    async fn create_group(&self, state: GroupState) -> Result<(), ServiceError>;
    async fn apply(&self, group: GroupWrite, fan_outs: Vec<FanOut>, max_depth: u64) -> Result<FanOutResult, ServiceError>;
    async fn submit(&self, group: GroupWrite, fan_outs: Vec<FanOut>, max_depth: u64) -> Result<Applying, ServiceError>;
});

dispatch!(ReceiptStore {
    async fn receipt(&self, key: [u8; 32], fresh_after_ms: u64) -> Result<Option<u64>, ServiceError>;
    async fn prune_receipts(&self, before_ms: u64, max_kept: u64) -> Result<u64, ServiceError>;
    async fn send_counter(&self, member: [u8; 32]) -> Result<Option<crate::delivery::receipt::CounterRow>, ServiceError>;
});

dispatch!(OutboxStore {
    async fn pending_domains(&self) -> Result<Vec<Domain>, ServiceError>;
    async fn outbox_batch(&self, domain: &Domain, max: usize, max_bytes: usize) -> Result<Vec<(u64, Delivery)>, ServiceError>;
    async fn outbox_remove(&self, domain: &Domain, seqs: Vec<u64>) -> Result<(), ServiceError>;
});

dispatch!(PushStore {
    async fn put_push(&self, client_num: u64, sealed: Vec<u8>) -> Result<(), ServiceError>;
    async fn delete_push(&self, client_num: u64) -> Result<bool, ServiceError>;
    async fn schedule_push(&self, client_nums: Vec<u64>, due_ms: u64, coalesce_ms: u64) -> Result<u64, ServiceError>;
    async fn recover_push(&self, cutoff_ms: u64, due_ms: u64, coalesce_ms: u64) -> Result<u64, ServiceError>;
    async fn claim_push(&self, now_ms: u64, lease_until_ms: u64, limit: u32) -> Result<Vec<PushJob>, ServiceError>;
    async fn finish_push(&self, client_num: u64, sent_ms: Option<u64>, again_ms: u64) -> Result<(), ServiceError>;
    async fn retry_push(&self, client_num: u64, due_ms: u64, attempts: u32) -> Result<(), ServiceError>;
    async fn next_push_due(&self) -> Result<Option<u64>, ServiceError>;
});

dispatch!(AdminStore {
    async fn users(&self) -> Result<Vec<UserSummary>, ServiceError>;
    async fn user(&self, name: &UserName) -> Result<Option<UserSummary>, ServiceError>;
    async fn deactivate_user(&self, name: &UserName) -> Result<Vec<u64>, ServiceError>;
    async fn token_uses(&self) -> Result<Vec<(String, u64)>, ServiceError>;
    async fn stats(&self) -> Result<StoreStats, ServiceError>;
    async fn backup(&self, dest: std::path::PathBuf) -> Result<BackupOutcome, ServiceError>;
});

/// Opens the configured engine: redb at `redb_path`, or PostgreSQL (migrating its schema and
/// checking that it belongs to this domain and AS key). `sink` hears the other nodes. Tests
/// may put the redb file under a fault-injecting backend (`redb_faults`).
pub(crate) async fn open(
    settings: &crate::config::Settings,
    redb_path: &std::path::Path,
    as_public_key: &[u8],
    sink: crate::bus::BusSink,
    redb_faults: Option<redb::fault::Faults>,
) -> Result<(Backend, Closer), StoreError> {
    match &settings.storage {
        crate::config::StorageSettings::Redb => {
            let max_batch = settings.limits.max_write_batch as usize;
            let opener = match redb_faults {
                Some(faults) => redb::faulty_opener(redb_path, faults, settings.redb_cache_size),
                None => redb::file_opener(redb_path, settings.redb_cache_size),
            };
            // After a reopen every listener reads its queue from the store again.
            let queues = sink.queues.clone();
            let on_reopen: Box<dyn Fn() + Send + Sync> = Box::new(move || queues.wake_all());
            // Entries of lazy fan-outs wake their listeners from a task, not the writer thread.
            let (queues, runtime) = (sink.queues.clone(), tokio::runtime::Handle::current());
            let on_fresh: redb::OnFresh = Box::new(move |fresh| {
                let queues = queues.clone();
                runtime.spawn(async move { queues.notify_fresh(&fresh) });
            });
            let hooks = redb::Hooks {
                on_reopen: Some(on_reopen),
                on_fresh: Some(on_fresh),
            };
            let (store, writer) =
                redb::Store::open_with(opener, settings.domain.as_str(), max_batch, hooks)?;
            Ok((Backend::Redb(store), Closer::Redb(writer)))
        }
        crate::config::StorageSettings::Postgres {
            url,
            pool_size,
            timeout,
        } => {
            let options = postgres::Options {
                url,
                pool_size: *pool_size,
                timeout: *timeout,
                domain: settings.domain.as_str(),
                as_public_key,
            };
            let (store, closer) = postgres::PgStore::connect(options, sink).await?;
            Ok((Backend::Postgres(store), Closer::Postgres(closer)))
        }
    }
}

/// What every engine does around a fan-out's queue writes, so both count and skip alike.
pub(crate) mod fan_out {
    use std::borrow::Cow;

    use bytes::Bytes;
    use roost_protocol::{MessageId, Opaque};
    use tls_codec::{DeserializeBytes as _, Serialize as _};
    use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

    use super::StoreError;
    use crate::delivery::{FanOut, FanOutResult};
    use crate::queue::{Enqueued, Fresh};

    /// The local recipients in ascending order: the order every engine locks and walks queues
    /// in. The DS hands them over sorted; sorting again is cheap insurance for other callers.
    pub(crate) fn sorted_local(fan_out: &FanOut) -> Cow<'_, [u64]> {
        if fan_out.local.is_sorted() {
            fan_out.local.as_slice().into()
        } else {
            let mut sorted = fan_out.local.clone();
            sorted.sort_unstable();
            sorted.into()
        }
    }

    /// The payload encoded once, for every recipient's entry.
    pub(crate) fn encoded_payload(fan_out: &FanOut) -> Result<Vec<u8>, StoreError> {
        fan_out
            .payload
            .tls_serialize_detached()
            .map_err(|_| StoreError::Corrupt("payload encoding"))
    }

    /// Local recipients and the payload of one fan-out whose queue entries are written after
    /// the answer ([`crate::delivery::GroupWrite::lazy`]): stored durably in the operation's
    /// transaction, turned into queue entries by a later one, which deletes it. The message id
    /// is chosen when the record is written, so a replay after a crash queues the same message.
    #[derive(Debug, Clone, PartialEq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
    pub(crate) struct Pending {
        pub(crate) id: MessageId,
        pub(crate) timestamp_ms: u64,
        pub(crate) max_depth: u64,
        /// Ascending client numbers, 8 bytes big-endian each.
        local: Opaque,
        /// The TLS-encoded `QueuePayload`.
        pub(crate) payload: Opaque,
    }

    impl Pending {
        /// The pending part of `fan` under message id `id`.
        pub(crate) fn of(fan: &FanOut, id: MessageId, max_depth: u64) -> Result<Self, StoreError> {
            let payload = encoded_payload(fan)?.into();
            Ok(Self::new(
                id,
                fan.timestamp_ms,
                max_depth,
                &sorted_local(fan),
                payload,
            ))
        }

        /// A pending fan-out of `payload` (encoded) to `local` (ascending).
        pub(crate) fn new(
            id: MessageId,
            timestamp_ms: u64,
            max_depth: u64,
            local: &[u64],
            payload: Opaque,
        ) -> Self {
            let local: Vec<u8> = local.iter().flat_map(|num| num.to_be_bytes()).collect();
            Self {
                id,
                timestamp_ms,
                max_depth,
                local: local.into(),
                payload,
            }
        }

        /// The local recipients, ascending.
        pub(crate) fn local(&self) -> Vec<u64> {
            self.local
                .as_slice()
                .chunks_exact(8)
                .filter_map(|chunk| chunk.try_into().ok().map(u64::from_be_bytes))
                .collect()
        }

        /// One operation's pending fan-outs as one record (they are queued together, in order).
        pub(crate) fn encode(list: &[Pending]) -> Result<Vec<u8>, StoreError> {
            PendingList(list.to_vec())
                .tls_serialize_detached()
                .map_err(|_| StoreError::Corrupt("pending fan-out encoding"))
        }

        /// The fan-outs of a record made by [`Pending::encode`].
        pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<Pending>, StoreError> {
            match PendingList::tls_deserialize_bytes(bytes) {
                Ok((list, [])) => Ok(list.0),
                _ => Err(StoreError::Corrupt("pending fan-out")),
            }
        }
    }

    #[derive(TlsSize, TlsSerialize, TlsDeserializeBytes)]
    struct PendingList(Vec<Pending>);

    /// What `apply` answers for fan-outs written lazily: every named recipient counts as
    /// reached (whether a queue is full or gone is found out when the entries are written).
    pub(crate) fn planned(fan_outs: &[FanOut]) -> FanOutResult {
        let mut result = FanOutResult::default();
        for fan in fan_outs {
            let mut reached = u32::try_from(fan.local.len()).unwrap_or(u32::MAX);
            for (domain, clients) in &fan.remote {
                reached = reached.saturating_add(u32::try_from(clients.len()).unwrap_or(u32::MAX));
                result.domains.push(domain.clone());
            }
            result.reached.push(reached);
        }
        result
    }

    /// Adds the queue outcomes of one fan-out (`nums[i]` got `outcomes[i]`) to `result`;
    /// returns how many local recipients it reached. A full queue skips that recipient
    /// (counted and logged); a queue that is gone (client removed since the DS resolved it)
    /// is skipped silently.
    pub(crate) fn tally(
        result: &mut FanOutResult,
        nums: &[u64],
        outcomes: impl IntoIterator<Item = Enqueued>,
        (id, timestamp_ms, payload): (MessageId, u64, &Bytes),
    ) -> u32 {
        let mut reached = 0u32;
        for (num, outcome) in nums.iter().zip(outcomes) {
            match outcome {
                Enqueued::Queued(seq) => {
                    let fresh = Fresh {
                        seq,
                        id,
                        timestamp_ms,
                        payload: payload.clone(),
                    };
                    result.queues.push((*num, fresh));
                    reached = reached.saturating_add(1);
                }
                Enqueued::Duplicate(_) => reached = reached.saturating_add(1),
                Enqueued::Gone => {}
                Enqueued::Full => {
                    metrics::counter!("roost_queue_full_drops_total").increment(1);
                    tracing::warn!(
                        client_num = num,
                        "queue full: message dropped for this recipient"
                    );
                }
            }
        }
        reached
    }
}
