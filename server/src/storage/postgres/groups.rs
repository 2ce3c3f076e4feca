//! PostgreSQL implementation of the Delivery Service's store: hosted groups' states, and
//! fan-outs that write a group's new state, every local recipient's queue entry (payload
//! stored once per fan-out) and every remote recipient's outbox entry in one transaction.
//!
//! A write first locks the group row (`FOR UPDATE` when it writes a new state, `FOR SHARE`
//! when it only fans out: fan-outs of one version may run side by side, a state write waits
//! for them and they for it) and refuses, writing nothing, unless the stored version is the
//! one the operation loaded. The group row is locked before any queue row (see `queue`).

use std::borrow::Cow;

use bytes::Bytes;
use roost_protocol::MessageId;
use tokio_postgres::types::Type;

use super::queue::{Batch, col, enqueue_in_txn, exec, refuse};
use super::{PgStore, to_i64, to_u64};
use crate::delivery::receipt::{Answer, Receipt};
use crate::delivery::{Applying, FanOut, FanOutResult, GroupState, GroupStore, GroupWrite};
use crate::error::ServiceError;
use crate::queue::Enqueued;
use crate::storage::{StoreError, fan_out, group_delta};

/// A fan-out ready to write: its message id and time, its local recipients in ascending
/// order, its payload encoded once.
pub(super) struct Prepared<'a> {
    pub(super) id: MessageId,
    pub(super) timestamp_ms: u64,
    pub(super) local: Cow<'a, [u64]>,
    pub(super) payload: Bytes,
}

pub(super) fn prepare(fan: &FanOut) -> Result<Prepared<'_>, StoreError> {
    Ok(Prepared {
        id: MessageId(rand::random()),
        timestamp_ms: fan.timestamp_ms,
        local: fan_out::sorted_local(fan),
        payload: fan_out::encoded_payload(fan)?.into(),
    })
}

async fn load_group(store: &PgStore, key: Vec<u8>) -> Result<Option<GroupState>, StoreError> {
    let client = store.client().await?;
    // One statement, so the base and its deltas are of one moment.
    let Some(row) = client
        .query_typed_opt(
            "SELECT epoch, version, snapshot,
                    ARRAY(SELECT version FROM group_deltas WHERE group_key = $1 ORDER BY version),
                    ARRAY(SELECT delta FROM group_deltas WHERE group_key = $1 ORDER BY version)
             FROM groups WHERE key = $1",
            &[(&key, Type::BYTEA)],
        )
        .await?
    else {
        return Ok(None);
    };
    let version = to_u64(col(&row, 1)?)?;
    let versions: Vec<i64> = col(&row, 3)?;
    let deltas: Vec<Vec<u8>> = col(&row, 4)?;
    let versions = versions
        .into_iter()
        .map(to_u64)
        .collect::<Result<Vec<_>, _>>()?;
    if versions.len() != deltas.len() || !group_delta::leads_to(versions, version) {
        return Err(StoreError::Corrupt("group deltas"));
    }
    let (snapshot, chain) = group_delta::assemble(col(&row, 2)?, deltas.iter().map(Vec::as_slice))?;
    Ok(Some(GroupState {
        epoch: to_u64(col(&row, 0)?)?,
        version,
        snapshot,
        chain,
        key,
    }))
}

async fn group_version(store: &PgStore, key: &[u8]) -> Result<Option<u64>, StoreError> {
    let client = store.client().await?;
    let row = client
        .query_typed_opt(
            "SELECT version FROM groups WHERE key = $1",
            &[(&key, Type::BYTEA)],
        )
        .await?;
    row.map(|row| to_u64(col(&row, 0)?)).transpose()
}

async fn create_group(
    store: &PgStore,
    state: GroupState,
) -> Result<Result<(), ServiceError>, StoreError> {
    if state.chain.deltas > 0 {
        return Ok(Err(ServiceError::Internal(
            "a new group must be stored in full".into(),
        )));
    }
    let client = store.client().await?;
    let (epoch, version) = (to_i64(state.epoch)?, to_i64(state.version)?);
    let inserted = client
        .execute_typed(
            "INSERT INTO groups (key, epoch, version, snapshot) VALUES ($1, $2, $3, $4)
             ON CONFLICT (key) DO NOTHING",
            &[
                (&state.key, Type::BYTEA),
                (&epoch, Type::INT8),
                (&version, Type::INT8),
                (&state.snapshot, Type::BYTEA),
            ],
        )
        .await?;
    Ok(if inserted == 0 {
        Err(ServiceError::GroupExists)
    } else {
        Ok(())
    })
}

/// How often a write finds its group's pending fan-outs queued by someone else in between.
const PENDING_ROUNDS: usize = 4;

async fn apply(
    store: &PgStore,
    group: GroupWrite,
    fan_outs: Vec<FanOut>,
    max_depth: u64,
) -> Result<Result<FanOutResult, ServiceError>, StoreError> {
    if group.state.is_none() {
        // Messages: written with others of this node in one transaction (see `batch`).
        return store.fan_out_batched(group, fan_outs, max_depth).await;
    }
    for _ in 0..PENDING_ROUNDS {
        match apply_state(store, &group, &fan_outs, max_depth).await? {
            Written::Done(result) => return Ok(result),
            // Queued after this group's pending fan-outs: queue those first, then again.
            Written::PendingFirst => {
                queue_pending(store, Some(&group.key)).await?;
            }
        }
    }
    Err(StoreError::Unavailable)
}

/// What one attempt of a state write came to.
enum Written {
    Done(Result<FanOutResult, ServiceError>),
    /// Nothing written: the group has pending fan-outs, which must be queued first.
    PendingFirst,
}

/// Writes a group's new state with its fan-outs: queue entries at once, or (lazy) one pending
/// record, queued by a task of this node after the commit.
async fn apply_state(
    store: &PgStore,
    group: &GroupWrite,
    fan_outs: &[FanOut],
    max_depth: u64,
) -> Result<Written, StoreError> {
    let refused =
        |result: Result<Result<FanOutResult, ServiceError>, StoreError>| result.map(Written::Done);
    let prepared: Vec<Prepared<'_>> = fan_outs.iter().map(prepare).collect::<Result<_, _>>()?;
    let mut client = store.client().await?;
    let txn = client.transaction().await?;
    let lock = if group.state.is_some() {
        "SELECT version FROM groups WHERE key = $1 FOR UPDATE"
    } else {
        "SELECT version FROM groups WHERE key = $1 FOR SHARE"
    };
    let stored = txn
        .query_typed_opt(lock, &[(&group.key, Type::BYTEA)])
        .await?
        .map(|row| to_u64(col(&row, 0)?))
        .transpose()?;
    if stored != Some(group.loaded) {
        return refused(refuse(txn, ServiceError::GroupMoved).await);
    }
    // Read after the group row is locked: a commit that wrote a record held the lock, so
    // every record of the group committed before this is seen.
    if !group.lazy
        && txn
            .query_typed_opt(
                "SELECT 1 FROM fanout_pending WHERE group_key = $1 LIMIT 1",
                &[(&group.key, Type::BYTEA)],
            )
            .await?
            .is_some()
    {
        txn.rollback().await?;
        return Ok(Written::PendingFirst);
    }
    if let Some(receipt) = &group.receipt
        && super::receipts::claim(&txn, &[receipt]).await?.is_empty()
    {
        // Applied already: the operation runs again and finds the receipt.
        return refused(refuse(txn, ServiceError::GroupMoved).await);
    }
    let new_state = match &group.state {
        Some(state) => {
            if state.version != group.loaded + 1 || state.key != group.key {
                return refused(
                    refuse(
                        txn,
                        ServiceError::Internal("group write out of step".into()),
                    )
                    .await,
                );
            }
            Some((state, to_i64(state.epoch)?, to_i64(state.version)?))
        }
        None => None,
    };
    let batches: Vec<Batch<'_>> = prepared
        .iter()
        .map(|p| Batch {
            recipients: &p.local,
            id: p.id,
            timestamp_ms: p.timestamp_ms,
            payload: &p.payload,
        })
        .collect();
    // The state, the outbox entries and the queue entries do not depend on each other: their
    // statements are pipelined.
    let ((), (), (outcomes, woken)) = tokio::try_join!(
        biased;
        async {
            let Some((state, epoch, version)) = &new_state else {
                return Ok(());
            };
            write_state(&txn, state, *epoch, *version).await
        },
        async {
            for (fan_out, prepared) in fan_outs.iter().zip(&prepared) {
                for (domain, clients) in &fan_out.remote {
                    super::outbox::add_in_txn(
                        &txn,
                        domain,
                        clients,
                        prepared.id,
                        prepared.timestamp_ms,
                        &fan_out.payload,
                    )
                    .await?;
                }
            }
            Ok(())
        },
        async {
            if group.lazy {
                write_pending(&txn, &group.key, &prepared, max_depth).await?;
                Ok((Vec::new(), Vec::new()))
            } else {
                enqueue_in_txn(&txn, max_depth, &batches, false).await
            }
        },
    )?;
    let result = if group.lazy {
        fan_out::planned(fan_outs)
    } else {
        results(fan_outs, &prepared, outcomes)
    };
    if let Some(receipt) = &group.receipt {
        let answer = receipt_answer(receipt, &result);
        super::receipts::set_answers(&txn, &[(receipt, answer)]).await?;
    }
    txn.commit().await?;
    store.announce(woken);
    if group.lazy && prepared.iter().any(|p| !p.local.is_empty()) {
        store.queue_pending_later(group.key.clone());
    }
    Ok(Written::Done(Ok(result)))
}

/// Writes a group's new state (the group row is locked): a new base, which drops the
/// group's deltas, or one more delta (see [`GroupState::chain`]).
async fn write_state(
    txn: &deadpool_postgres::Transaction<'_>,
    state: &GroupState,
    epoch: i64,
    version: i64,
) -> Result<(), StoreError> {
    let key = || -> super::queue::Param<'_> { (&state.key, Type::BYTEA) };
    if state.chain.deltas > 0 {
        exec(
            txn,
            "UPDATE groups SET epoch = $2, version = $3 WHERE key = $1",
            [key(), (&epoch, Type::INT8), (&version, Type::INT8)],
        )
        .await?;
        exec(
            txn,
            "INSERT INTO group_deltas (group_key, version, delta) VALUES ($1, $2, $3)",
            [
                key(),
                (&version, Type::INT8),
                (&state.snapshot, Type::BYTEA),
            ],
        )
        .await?;
        return Ok(());
    }
    exec(
        txn,
        "UPDATE groups SET epoch = $2, version = $3, snapshot = $4 WHERE key = $1",
        [
            key(),
            (&epoch, Type::INT8),
            (&version, Type::INT8),
            (&state.snapshot, Type::BYTEA),
        ],
    )
    .await?;
    exec(
        txn,
        "DELETE FROM group_deltas WHERE group_key = $1",
        [key()],
    )
    .await?;
    Ok(())
}

/// Writes the local part of lazy fan-outs as one pending record of the group.
async fn write_pending(
    txn: &deadpool_postgres::Transaction<'_>,
    key: &[u8],
    prepared: &[Prepared<'_>],
    max_depth: u64,
) -> Result<(), StoreError> {
    let pending: Vec<fan_out::Pending> = prepared
        .iter()
        .filter(|p| !p.local.is_empty())
        .map(|p| {
            fan_out::Pending::new(
                p.id,
                p.timestamp_ms,
                max_depth,
                &p.local,
                p.payload.clone().into(),
            )
        })
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let record = fan_out::Pending::encode(&pending)?;
    exec(
        txn,
        "INSERT INTO fanout_pending (group_key, record) VALUES ($1, $2)",
        [(&key, Type::BYTEA), (&record, Type::BYTEA)],
    )
    .await?;
    Ok(())
}

/// Turns the pending fan-outs of group `key` (of every group with `None`) into queue entries,
/// oldest first, in one transaction that deletes their records, and wakes the listeners.
/// Records another node is queueing are waited for and then found gone, so each is queued
/// once; a record that does not decode is dropped (logged and counted). Returns the entries
/// written.
pub(super) async fn queue_pending(
    store: &PgStore,
    key: Option<&[u8]>,
) -> Result<usize, StoreError> {
    if store.holds_pending() {
        return Ok(0);
    }
    let mut client = store.client().await?;
    let txn = client.transaction().await?;
    let rows = match key {
        Some(key) => {
            txn.query_typed(
                "SELECT id, record FROM fanout_pending WHERE group_key = $1 ORDER BY id
                 FOR UPDATE",
                &[(&key, Type::BYTEA)],
            )
            .await?
        }
        None => {
            txn.query_typed(
                "SELECT id, record FROM fanout_pending ORDER BY id FOR UPDATE",
                &[],
            )
            .await?
        }
    };
    if rows.is_empty() {
        txn.rollback().await?;
        return Ok(0);
    }
    let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
    let mut pending = Vec::new();
    for row in &rows {
        let id: i64 = col(row, 0)?;
        ids.push(id);
        let record: Vec<u8> = col(row, 1)?;
        match fan_out::Pending::decode(&record) {
            Ok(list) => pending.extend(list),
            Err(err) => {
                metrics::counter!("roost_pending_fanouts_dropped_total").increment(1);
                tracing::error!(id, %err, "pending fan-out does not decode: dropped");
            }
        }
    }
    let locals: Vec<Vec<u64>> = pending.iter().map(fan_out::Pending::local).collect();
    let batches: Vec<Batch<'_>> = pending
        .iter()
        .zip(&locals)
        .map(|(p, local)| Batch {
            recipients: local,
            id: p.id,
            timestamp_ms: p.timestamp_ms,
            payload: p.payload.as_slice(),
        })
        .collect();
    // Every record of one node carries the node's configured depth; the smallest holds.
    let max_depth = pending
        .iter()
        .map(|p| p.max_depth)
        .min()
        .unwrap_or(u64::MAX);
    let (outcomes, woken) = enqueue_in_txn(&txn, max_depth, &batches, false).await?;
    exec(
        &txn,
        "DELETE FROM fanout_pending WHERE id = ANY($1)",
        [(&ids, Type::INT8_ARRAY)],
    )
    .await?;
    txn.commit().await?;
    store.announce(woken);
    let mut result = FanOutResult::default();
    for ((p, local), outcomes) in pending.iter().zip(&locals).zip(outcomes) {
        let payload = Bytes::copy_from_slice(p.payload.as_slice());
        fan_out::tally(
            &mut result,
            local,
            outcomes,
            (p.id, p.timestamp_ms, &payload),
        );
    }
    store.wake_local(&result.queues);
    Ok(result.queues.len())
}

/// The answer a receipt records for a written fan-out.
pub(super) fn receipt_answer(receipt: &Receipt, result: &FanOutResult) -> u64 {
    match receipt.answer {
        Answer::Value(value) => value,
        Answer::Reached => u64::from(result.reached.first().copied().unwrap_or(0)),
    }
}

/// What written fan-outs did, from their queue outcomes (one list per fan-out, in order).
pub(super) fn results(
    fan_outs: &[FanOut],
    prepared: &[Prepared<'_>],
    outcomes: impl IntoIterator<Item = Vec<Enqueued>>,
) -> FanOutResult {
    let mut result = FanOutResult::default();
    for ((fan, prepared), outcomes) in fan_outs.iter().zip(prepared).zip(outcomes) {
        let mut reached = 0u32;
        for (domain, clients) in &fan.remote {
            reached = reached.saturating_add(u32::try_from(clients.len()).unwrap_or(u32::MAX));
            result.domains.push(domain.clone());
        }
        let sent = (prepared.id, prepared.timestamp_ms, &prepared.payload);
        reached =
            reached.saturating_add(fan_out::tally(&mut result, &prepared.local, outcomes, sent));
        result.reached.push(reached);
    }
    result
}

impl GroupStore for PgStore {
    async fn load_group(&self, key: Vec<u8>) -> Result<Option<GroupState>, ServiceError> {
        Ok(load_group(self, key).await?)
    }

    async fn group_version(&self, key: Vec<u8>) -> Result<Option<u64>, ServiceError> {
        Ok(group_version(self, &key).await?)
    }

    async fn create_group(&self, state: GroupState) -> Result<(), ServiceError> {
        create_group(self, state).await?
    }

    async fn apply(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<FanOutResult, ServiceError> {
        apply(self, group, fan_outs, max_depth).await?
    }

    async fn submit(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<Applying, ServiceError> {
        if group.state.is_some() || group.lazy {
            let result = apply(self, group, fan_outs, max_depth).await?;
            return Ok(Applying::new(async move { result }));
        }
        // This node's batch worker takes jobs in the order they were handed over, one batch
        // transaction after the other; another node's batch touching the same queues locks
        // the same head rows and commits wholly before or after this one.
        let answer = self.fan_out_submit(group, fan_outs, max_depth)?;
        Ok(Applying::new(async move {
            match answer.await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(err)) => Err(ServiceError::from(err)),
                Err(_) => Err(ServiceError::from(StoreError::Unavailable)),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use roost_protocol::messages::queue::QueuePayload;

    use super::*;
    use crate::queue::QueueStore;
    use crate::storage::postgres::queue::tests::{add_queue, count, database, message, node};

    const KEY: [u8; 3] = [1, 2, 3];

    fn state(version: u64, tag: u8) -> GroupState {
        GroupState {
            key: KEY.to_vec(),
            epoch: version,
            version,
            snapshot: vec![tag; 10],
            chain: group_delta::Chain::default(),
        }
    }

    fn fan_out(local: &[u64], payload: QueuePayload) -> FanOut {
        FanOut {
            local: local.to_vec(),
            remote: Default::default(),
            payload,
            timestamp_ms: crate::unix_millis(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_fanning_out_to_the_same_queues_leave_no_gap() {
        let (_cluster, url) = database();
        let (a, closer_a, _) = node(&url).await;
        let (b, closer_b, _) = node(&url).await;
        let mut nums = Vec::new();
        for i in 0..50 {
            nums.push(add_queue(&a, &format!("u{i}")).await.1);
        }
        a.create_group(state(0, 0)).await.unwrap();
        // Each node sends 20 messages from 4 concurrent senders of 5 each; node B names the
        // recipients in descending order (the store sorts them).
        let mut senders = Vec::new();
        for (store, tag) in [(&a, 1u8), (&b, 2u8)] {
            for sender in 0..4u8 {
                let (store, nums) = (store.clone(), nums.clone());
                senders.push(tokio::spawn(async move {
                    let mut local = nums;
                    if tag == 2 {
                        local.reverse();
                    }
                    for n in 0..5u8 {
                        let write = GroupWrite {
                            key: KEY.to_vec(),
                            loaded: 0,
                            state: None,
                            receipt: None,
                            lazy: false,
                        };
                        let fan = fan_out(&local, message(tag, sender * 5 + n));
                        let result = store.apply(write, vec![fan], 100).await.unwrap();
                        assert_eq!(result.reached, [50]);
                        assert_eq!(result.queues.len(), 50);
                    }
                }));
            }
        }
        for sender in senders {
            sender.await.unwrap();
        }
        for &num in &nums {
            let (messages, head) = a.read_queue(num, 0, 100, usize::MAX, 0).await.unwrap();
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "queue {num}");
            assert_eq!(head, 40);
            // Every message once, and each sender's in the order it sent them.
            for tag in [1u8, 2] {
                for sender in 0..4u8 {
                    let sent: Vec<QueuePayload> = messages
                        .iter()
                        .map(|m| m.payload.clone())
                        .filter(|p| {
                            matches!(p, QueuePayload::GroupMessage(g)
                                if g.message.as_slice().first() == Some(&tag)
                                    && g.message.as_slice().get(1).is_some_and(|n| n / 5 == sender))
                        })
                        .collect();
                    let expected: Vec<QueuePayload> =
                        (0..5).map(|n| message(tag, sender * 5 + n)).collect();
                    assert_eq!(sent, expected, "queue {num}, node {tag}, sender {sender}");
                }
            }
        }
        // Each payload stored once, named by all 50 entries.
        assert_eq!(
            count(&a, "SELECT count(*) FROM payloads WHERE refs = 50").await,
            40
        );
        assert_eq!(count(&a, "SELECT count(*) FROM payloads").await, 40);
        drop((a, b));
        closer_a.join();
        closer_b.join();
    }

    /// Rounds of a lazy commit on one node followed at once by messages from both nodes:
    /// the committing node's task and the other node's writes race to queue the commit's
    /// pending fan-out. Every queue holds each commit once, before the messages of its epoch
    /// and after those of the one before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lazy_commits_and_messages_on_two_nodes_keep_order_and_are_queued_once() {
        let (_cluster, url) = database();
        let (a, closer_a, _) = node(&url).await;
        let (b, closer_b, _) = node(&url).await;
        let mut nums = Vec::new();
        for i in 0..20 {
            nums.push(add_queue(&a, &format!("m{i}")).await.1);
        }
        a.create_group(state(0, 0)).await.unwrap();
        const ROUNDS: u8 = 8;
        for round in 0..ROUNDS {
            let committer = if round % 2 == 0 { &a } else { &b };
            let loaded = u64::from(round);
            let commit = GroupWrite {
                key: KEY.to_vec(),
                loaded,
                state: Some(state(loaded + 1, round)),
                receipt: None,
                lazy: true,
            };
            let result = committer
                .apply(commit, vec![fan_out(&nums, message(0, round))], 100)
                .await
                .unwrap();
            assert_eq!(result.reached, [20]);
            let mut senders = Vec::new();
            for (store, tag) in [(&a, 1u8), (&b, 2u8)] {
                let (store, nums) = (store.clone(), nums.clone());
                senders.push(tokio::spawn(async move {
                    let write = GroupWrite {
                        key: KEY.to_vec(),
                        loaded: loaded + 1,
                        state: None,
                        receipt: None,
                        lazy: false,
                    };
                    let fan = fan_out(&nums, message(tag, round));
                    store.apply(write, vec![fan], 100).await.unwrap();
                }));
            }
            for sender in senders {
                sender.await.unwrap();
            }
        }
        for &num in &nums {
            let (messages, head) = a.read_queue(num, 0, 100, usize::MAX, 0).await.unwrap();
            assert_eq!(head, u64::from(ROUNDS) * 3, "queue {num}: every entry once");
            let tags: Vec<(u8, u8)> = messages
                .iter()
                .map(|m| match &m.payload {
                    QueuePayload::GroupMessage(g) => {
                        (g.message.as_slice()[0], g.message.as_slice()[1])
                    }
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            for (round, three) in tags.chunks(3).enumerate() {
                let round = round as u8;
                assert_eq!(three[0], (0, round), "queue {num}: the commit first");
                let mut rest = [three[1], three[2]];
                rest.sort();
                assert_eq!(rest, [(1, round), (2, round)], "queue {num}");
            }
        }
        assert_eq!(count(&a, "SELECT count(*) FROM fanout_pending").await, 0);
        drop((a, b));
        closer_a.join();
        closer_b.join();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_two_nodes_writing_one_version_one_wins_and_the_other_writes_nothing() {
        let (_cluster, url) = database();
        let (a, closer_a, _) = node(&url).await;
        let (b, closer_b, _) = node(&url).await;
        let (_, num) = add_queue(&a, "member").await;
        a.create_group(state(0, 0)).await.unwrap();
        let mut winners = Vec::new();
        for round in 0..10u8 {
            let loaded = u64::from(round);
            let attempt = |store: &PgStore, tag: u8| {
                let store = store.clone();
                tokio::spawn(async move {
                    let write = GroupWrite {
                        key: KEY.to_vec(),
                        loaded,
                        state: Some(state(loaded + 1, tag)),
                        receipt: None,
                        lazy: false,
                    };
                    store
                        .apply(write, vec![fan_out(&[num], message(tag, round))], 100)
                        .await
                })
            };
            let (on_a, on_b) = tokio::join!(attempt(&a, 1), attempt(&b, 2));
            let winner = match (on_a.unwrap(), on_b.unwrap()) {
                (Ok(result), Err(ServiceError::GroupMoved)) => {
                    assert_eq!(result.queues.len(), 1);
                    1
                }
                (Err(ServiceError::GroupMoved), Ok(result)) => {
                    assert_eq!(result.queues.len(), 1);
                    2
                }
                (a, b) => panic!(
                    "round {round}: expected one success and one GroupMoved, got {:?} and {:?}",
                    a.err(),
                    b.err()
                ),
            };
            winners.push(winner);
            let stored = a.load_group(KEY.to_vec()).await.unwrap().unwrap();
            assert_eq!(
                (stored.version, stored.snapshot),
                (loaded + 1, vec![winner; 10])
            );
        }
        // Only the winners' messages were queued, one per round, and only their payloads
        // stored.
        let (messages, head) = a.read_queue(num, 0, 100, usize::MAX, 0).await.unwrap();
        let got: Vec<(u64, QueuePayload)> =
            messages.into_iter().map(|m| (m.seq, m.payload)).collect();
        let expected: Vec<(u64, QueuePayload)> = winners
            .iter()
            .zip(0u8..)
            .map(|(&tag, round)| (u64::from(round) + 1, message(tag, round)))
            .collect();
        assert_eq!((got, head), (expected, 10));
        assert_eq!(count(&a, "SELECT count(*) FROM payloads").await, 10);
        drop((a, b));
        closer_a.join();
        closer_b.join();
    }
}
