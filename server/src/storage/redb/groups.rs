//! redb implementation of the Delivery Service's store: hosted groups' states, and fan-outs
//! that write a group's new state, every local recipient's queue entry (payload stored once)
//! and every remote recipient's outbox entry in one transaction. Local recipients come as
//! client numbers (the DS resolved them), so a fan-out reads no client records.

use redb::ReadableTable;
use roost_protocol::MessageId;
use tls_codec::{DeserializeBytes, Serialize as _, TlsDeserializeBytes, TlsSerialize, TlsSize};

use super::delivery_tables::DeliveryTables;
use super::queue::enqueue;
use super::tables::{GROUP_DELTAS, GROUP_VERSIONS, GROUPS};
use super::{Held, Store, StoreError};
use crate::delivery::{Applying, FanOut, FanOutResult, GroupState, GroupStore, GroupWrite};
use crate::error::ServiceError;
use crate::storage::{fan_out, group_delta};

/// A hosted group as stored.
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct StoredGroup {
    epoch: u64,
    snapshot: roost_protocol::Opaque,
}

/// Stores `state` (taken: its bytes become the record's without a copy): a new base, which
/// drops the group's deltas, or one more delta (see [`GroupState::chain`]).
fn store_group(t: &mut DeliveryTables<'_>, state: GroupState) -> Result<(), StoreError> {
    t.versions
        .open(t.txn)?
        .insert(state.key.as_slice(), state.version)?;
    let key = state.key.as_slice();
    let deltas = t.deltas.open(t.txn)?;
    if state.chain.deltas > 0 {
        deltas.insert(
            (key, state.version),
            (state.epoch, state.snapshot.as_slice()),
        )?;
        return Ok(());
    }
    deltas.retain_in((key, 0)..=(key, u64::MAX), |_, _| false)?;
    let record = StoredGroup {
        epoch: state.epoch,
        snapshot: state.snapshot.into(),
    };
    let bytes = record
        .tls_serialize_detached()
        .map_err(|_| StoreError::Corrupt("group encoding"))?;
    t.groups
        .open(t.txn)?
        .insert(state.key.as_slice(), bytes.as_slice())?;
    Ok(())
}

/// A group's state from its base record and its deltas (which must lead, one version at a
/// time, to `version`).
fn assemble<T>(deltas: &T, key: &[u8], base: &[u8], version: u64) -> Result<GroupState, StoreError>
where
    T: ReadableTable<(&'static [u8], u64), (u64, &'static [u8])>,
{
    let Ok((record, [])) = StoredGroup::tls_deserialize_bytes(base) else {
        return Err(StoreError::Corrupt("groups"));
    };
    let mut epoch = record.epoch;
    let mut chain = Vec::new();
    for row in deltas.range((key, 0)..=(key, u64::MAX))? {
        let (k, v) = row?;
        let (delta_epoch, delta) = v.value();
        chain.push((k.value().1, delta.to_vec()));
        epoch = delta_epoch;
    }
    let versions = chain.iter().map(|(v, _)| *v);
    if !group_delta::leads_to(versions, version) {
        return Err(StoreError::Corrupt("group deltas"));
    }
    let (snapshot, chain) = group_delta::assemble(
        record.snapshot.into_vec(),
        chain.iter().map(|(_, d)| d.as_slice()),
    )?;
    Ok(GroupState {
        key: key.to_vec(),
        epoch,
        version,
        snapshot,
        chain,
    })
}

/// Writes one fan-out inside `txn`; returns the recipients reached.
fn write_fan_out(
    t: &mut DeliveryTables<'_>,
    max_depth: u64,
    fan: &FanOut,
    result: &mut FanOutResult,
) -> Result<u32, StoreError> {
    let id = MessageId(rand::random());
    let timestamp_ms = fan.timestamp_ms;
    let mut reached = 0;
    for (domain, clients) in &fan.remote {
        super::outbox::add_in(t, domain, clients, id, timestamp_ms, &fan.payload)?;
        reached += clients.len() as u32;
        result.domains.push(domain.clone());
    }
    // Ascending client numbers walk QUEUE_HEADS and QUEUE_ENTRIES in key order.
    let nums = fan_out::sorted_local(fan);
    let bytes = fan_out::encoded_payload(fan)?;
    let outcomes = enqueue(t, max_depth, &nums, id, timestamp_ms, &bytes, false)?;
    let shared = bytes::Bytes::from(bytes);
    reached += fan_out::tally(result, &nums, outcomes, (id, timestamp_ms, &shared));
    Ok(reached)
}

/// Writes the outbox entries of `fan_outs` and one pending record of their local recipients
/// (see [`GroupWrite::lazy`]) inside `txn`. Returns the recipients named and whether a record
/// was written.
fn write_lazy(
    t: &mut DeliveryTables<'_>,
    max_depth: u64,
    fan_outs: &[FanOut],
) -> Result<(FanOutResult, bool), StoreError> {
    let mut pending = Vec::with_capacity(fan_outs.len());
    for fan in fan_outs {
        let id = MessageId(rand::random());
        for (domain, clients) in &fan.remote {
            super::outbox::add_in(t, domain, clients, id, fan.timestamp_ms, &fan.payload)?;
        }
        if !fan.local.is_empty() {
            pending.push(fan_out::Pending::of(fan, id, max_depth)?);
        }
    }
    let written = !pending.is_empty();
    if written {
        let record = fan_out::Pending::encode(&pending)?;
        let key = t.next_counter("next_fanout_pending")?;
        t.pending.open(t.txn)?.insert(key, record.as_slice())?;
    }
    Ok((fan_out::planned(fan_outs), written))
}

/// Turns every pending fan-out into queue entries, oldest first, and deletes the records;
/// returns the new entries (for waking listeners). A record that does not decode is dropped
/// (logged and counted): it could never be queued, and keeping it would stop every batch.
pub(super) fn queue_pending(
    t: &mut DeliveryTables<'_>,
) -> Result<Vec<(u64, crate::queue::Fresh)>, StoreError> {
    let records: Vec<(u64, Vec<u8>)> = {
        let table = t.pending.open(t.txn)?;
        let mut records = Vec::new();
        while let Some((key, value)) = table.pop_first()? {
            records.push((key.value(), value.value().to_vec()));
        }
        records
    };
    let mut result = FanOutResult::default();
    for (key, record) in records {
        let list = match fan_out::Pending::decode(&record) {
            Ok(list) => list,
            Err(err) => {
                metrics::counter!("roost_pending_fanouts_dropped_total").increment(1);
                tracing::error!(key, %err, "pending fan-out does not decode: dropped");
                continue;
            }
        };
        for pending in list {
            let nums = pending.local();
            let payload = pending.payload.as_slice();
            let outcomes = enqueue(
                t,
                pending.max_depth,
                &nums,
                pending.id,
                pending.timestamp_ms,
                payload,
                false,
            )?;
            let shared = bytes::Bytes::copy_from_slice(payload);
            fan_out::tally(
                &mut result,
                &nums,
                outcomes,
                (pending.id, pending.timestamp_ms, &shared),
            );
        }
    }
    Ok(result.queues)
}

/// The stored version of a group (0 for groups stored before versions were kept), if the
/// group exists. Every group written since versions are kept has a version row, so the
/// group's (large) record is looked at only for older ones.
fn version_of<T, V>(groups: &T, versions: &V, key: &[u8]) -> Result<Option<u64>, StoreError>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
    V: ReadableTable<&'static [u8], u64>,
{
    if let Some(version) = versions.get(key)? {
        return Ok(Some(version.value()));
    }
    Ok(groups.get(key)?.map(|_| 0))
}

impl GroupStore for Store {
    async fn load_group(&self, key: Vec<u8>) -> Result<Option<GroupState>, ServiceError> {
        self.read(move |txn| {
            let groups = txn.open_table(GROUPS)?;
            let Some(raw) = groups.get(key.as_slice())? else {
                return Ok(None);
            };
            let version = txn
                .open_table(GROUP_VERSIONS)?
                .get(key.as_slice())?
                .map(|v| v.value())
                .unwrap_or(0);
            let deltas = txn.open_table(GROUP_DELTAS)?;
            assemble(&deltas, &key, raw.value(), version).map(Some)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn group_version(&self, key: Vec<u8>) -> Result<Option<u64>, ServiceError> {
        self.read(move |txn| {
            let groups = txn.open_table(GROUPS)?;
            let versions = txn.open_table(GROUP_VERSIONS)?;
            version_of(&groups, &versions, &key)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn create_group(&self, state: GroupState) -> Result<(), ServiceError> {
        if state.chain.deltas > 0 {
            return Err(ServiceError::Internal(
                "a new group must be stored in full".into(),
            ));
        }
        self.write_held(move |held| {
            let t = held.delivery()?;
            if t.groups.open(t.txn)?.get(state.key.as_slice())?.is_some() {
                return Ok(Err(ServiceError::GroupExists));
            }
            store_group(t, state)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn apply(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<FanOutResult, ServiceError> {
        let store = self.clone();
        self.write_held(move |held| apply_in(&store, held, group, &fan_outs, max_depth))
            .await
    }

    async fn submit(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<Applying, ServiceError> {
        let store = self.clone();
        let done = self
            .submit_job(move |held| apply_in(&store, held, group, &fan_outs, max_depth))
            .await?;
        Ok(Applying::new(async move {
            done.await
                .map_err(|_| ServiceError::from(StoreError::Unavailable))?
        }))
    }
}

/// [`GroupStore::apply`] on the batch's delivery tables.
fn apply_in(
    store: &Store,
    held: &mut Held<'_>,
    group: GroupWrite,
    fan_outs: &[FanOut],
    max_depth: u64,
) -> Result<Result<FanOutResult, ServiceError>, StoreError> {
    let t = held.delivery()?;
    // GROUPS is read only for a group stored before versions were kept (see `version_of`).
    let version = t
        .versions
        .open(t.txn)?
        .get(group.key.as_slice())?
        .map(|v| v.value());
    let stored = match version {
        Some(version) => Some(version),
        None => t.groups.open(t.txn)?.get(group.key.as_slice())?.map(|_| 0),
    };
    if stored != Some(group.loaded) {
        return Ok(Err(ServiceError::GroupMoved));
    }
    if let Some(receipt) = &group.receipt
        && super::receipts::is_fresh(t, receipt)?
    {
        // Applied already: the operation runs again and finds the receipt.
        return Ok(Err(ServiceError::GroupMoved));
    }
    if let Some(state) = group.state {
        if state.version != group.loaded + 1 || state.key != group.key {
            return Ok(Err(ServiceError::Internal(
                "group write out of step".into(),
            )));
        }
        store_group(t, state)?;
    }
    let result = if group.lazy {
        let (result, written) = write_lazy(t, max_depth, fan_outs)?;
        if written {
            store.mark_pending();
        }
        result
    } else {
        let mut result = FanOutResult::default();
        for fan in fan_outs {
            let reached = write_fan_out(t, max_depth, fan, &mut result)?;
            result.reached.push(reached);
        }
        result
    };
    if let Some(receipt) = &group.receipt {
        super::receipts::insert_in(t, receipt, &result)?;
    }
    Ok(Ok(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group stored before versions were kept (no version row) is at version 0, and a
    /// write against version 0 goes through and records version 1.
    #[tokio::test]
    async fn groups_stored_before_versions_are_at_version_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer) = Store::open(&dir.path().join("db.redb"), "example.org", 8).unwrap();
        let old = StoredGroup {
            epoch: 4,
            snapshot: vec![1, 2, 3].into(),
        }
        .tls_serialize_detached()
        .unwrap();
        store
            .write(move |txn| {
                txn.open_table(GROUPS)?
                    .insert([9u8, 9].as_slice(), old.as_slice())?;
                Ok(Ok::<_, ServiceError>(()))
            })
            .await
            .unwrap();
        assert_eq!(store.group_version(vec![9, 9]).await.unwrap(), Some(0));
        assert_eq!(
            store.load_group(vec![9, 9]).await.unwrap().unwrap().version,
            0
        );
        let write = GroupWrite {
            key: vec![9, 9],
            loaded: 0,
            state: Some(GroupState {
                key: vec![9, 9],
                epoch: 5,
                version: 1,
                snapshot: vec![4],
                chain: group_delta::Chain::default(),
            }),
            receipt: None,
            lazy: false,
        };
        store.apply(write, Vec::new(), 10).await.unwrap();
        assert_eq!(store.group_version(vec![9, 9]).await.unwrap(), Some(1));
    }

    /// A version 4 database (no deltas table: every group is its full snapshot) is upgraded
    /// when opened: its group loads as it was stored and takes deltas from then on.
    #[tokio::test]
    async fn a_version_4_database_keeps_its_groups_and_takes_deltas() {
        use crate::storage::group_delta::{self, Chain};
        use crate::storage::suite::{next_snapshot, noise};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer) = Store::open(&path, "example.org", 8).unwrap();
        let key = vec![3u8, 1, 4];
        let base = noise(9, 30_000);
        let state = |version, snapshot: &[u8], chain| GroupState {
            key: key.clone(),
            epoch: version + 10,
            version,
            snapshot: snapshot.to_vec(),
            chain,
        };
        store
            .create_group(state(0, &base, Chain::default()))
            .await
            .unwrap();
        let write = |loaded: u64, state| GroupWrite {
            key: key.clone(),
            loaded,
            state: Some(state),
            receipt: None,
            lazy: false,
        };
        let second = next_snapshot(&base, 1);
        store
            .apply(
                write(0, state(1, &second, Chain::default())),
                Vec::new(),
                10,
            )
            .await
            .unwrap();
        // As version 4 left it: no deltas table, KeyPackage counters without claim cursors.
        store
            .write(|txn| {
                super::super::keypackage::as_version_4(txn)?;
                txn.delete_table(GROUP_DELTAS)?;
                txn.open_table(super::super::tables::META)?
                    .insert("schema_version", 4)?;
                Ok(Ok::<_, StoreError>(()))
            })
            .await
            .unwrap();
        drop(store);
        writer.join();

        let (store, writer) = Store::open(&path, "example.org", 8).unwrap();
        let schema = store
            .read(|txn| {
                let meta = txn.open_table(super::super::tables::META)?;
                Ok::<_, StoreError>(meta.get("schema_version")?.map(|v| v.value()))
            })
            .await
            .unwrap();
        assert_eq!(schema, Some(super::super::tables::SCHEMA_VERSION));
        let loaded = store.load_group(key.clone()).await.unwrap().unwrap();
        assert_eq!((loaded.version, loaded.epoch), (1, 11));
        assert_eq!(loaded.chain, Chain::default());
        assert!(loaded.snapshot == second);
        // The next write is a delta on it, and the group loads as that state.
        let third = next_snapshot(&second, 2);
        let (stored, chain) = group_delta::next(&second, &third, loaded.chain);
        assert_eq!(chain.deltas, 1);
        store
            .apply(
                write(1, state(2, &stored.into_bytes(), chain)),
                Vec::new(),
                10,
            )
            .await
            .unwrap();
        drop(store);
        writer.join();
        let (store, _writer) = Store::open(&path, "example.org", 8).unwrap();
        let loaded = store.load_group(key.clone()).await.unwrap().unwrap();
        assert_eq!((loaded.version, loaded.epoch, loaded.chain), (2, 12, chain));
        assert!(loaded.snapshot == third);
    }
}
