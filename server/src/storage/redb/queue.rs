//! redb implementation of the Queuing Service's store: per-client heads, (client, seq)
//! entries, payloads stored once with a reference count, and dedup records.

use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use roost_protocol::messages::federation::{DeliverResponse, Delivery};
use roost_protocol::messages::queue::{QueueMessage, QueuePayload};
use roost_protocol::{ClientId, MessageId};
use tls_codec::{DeserializeBytes, Serialize as _};

use super::auth::{active_client, active_client_in};
use super::delivery_tables::DeliveryTables;
use super::tables::CLIENTS;
use super::tables::{
    PAYLOAD_REFS, PAYLOADS, QUEUE_DEDUP, QUEUE_ENTRIES, QUEUE_EXPIRY, QUEUE_HEADS,
};
use super::{Store, StoreError, next_counter};
use crate::error::ServiceError;
use crate::queue::{Enqueued, Fresh, QueueStore};

/// Enqueues one payload for several local recipients through `t`, storing the payload once.
/// With `dedup`, a message id already queued for a recipient is not queued again. A client
/// number without a queue (client removed) is [`Enqueued::Gone`]. Records the deepest queue
/// it appended to in `roost_queue_depth` (once per call, not per recipient).
pub(crate) fn enqueue(
    t: &mut DeliveryTables<'_>,
    max_depth: u64,
    recipients: &[u64],
    id: MessageId,
    timestamp_ms: u64,
    payload: &[u8],
    dedup: bool,
) -> Result<Vec<Enqueued>, StoreError> {
    let txn = t.txn;
    // Opening a table costs a check of its definition: the dedup records only when used.
    if dedup {
        t.dedups.open(txn)?;
    }
    let mut outcomes = Vec::with_capacity(recipients.len());
    let mut payload_id = None;
    let mut refs = 0u64;
    let mut deepest = None;
    // The (client, seq) pairs of the expiry row (see `QUEUE_EXPIRY`).
    let mut queued = Vec::new();
    for &client_num in recipients {
        let prior = if dedup {
            t.dedups
                .open(txn)?
                .get((client_num, id.0))?
                .map(|v| v.value().0)
        } else {
            None
        };
        if let Some(seq) = prior {
            outcomes.push(Enqueued::Duplicate(seq));
            continue;
        }
        // The head is read and rewritten in place (one descent of QUEUE_HEADS, no rebuild of
        // its leaf): a commit's fan-out does this for every member.
        let heads = t.heads.open(txn)?;
        let Some(mut head_row) = heads.get_mut(client_num)? else {
            // No such queue (client removed meanwhile): callers resolved recipients earlier.
            outcomes.push(Enqueued::Gone);
            continue;
        };
        let (head, count) = head_row.value();
        if count >= max_depth {
            outcomes.push(Enqueued::Full);
            continue;
        }
        let seq = head + 1;
        head_row.insert((seq, count + 1))?;
        drop(head_row);
        let pid = match payload_id {
            Some(pid) => pid,
            None => {
                let pid = t.next_counter("next_payload_id")?;
                payload_id = Some(pid);
                pid
            }
        };
        t.entries
            .open(txn)?
            .insert((client_num, seq), (pid, timestamp_ms, id.0))?;
        deepest = deepest.max(Some(count + 1));
        if dedup {
            t.dedups
                .open(txn)?
                .insert((client_num, id.0), (seq, timestamp_ms))?;
        }
        refs += 1;
        queued.extend_from_slice(&client_num.to_be_bytes());
        queued.extend_from_slice(&seq.to_be_bytes());
        outcomes.push(Enqueued::Queued(seq));
    }
    if let Some(pid) = payload_id {
        t.payloads.open(txn)?.insert(pid, payload)?;
        // No row stands for one reference (see `PAYLOAD_REFS`): a 1:1 message writes none,
        // and its acknowledgement deletes none.
        if refs > 1 {
            t.refs.open(txn)?.insert(pid, refs)?;
        }
        t.expiry
            .open(txn)?
            .insert((timestamp_ms, pid), (id.0, dedup, queued.as_slice()))?;
    }
    if let Some(depth) = deepest {
        metrics::histogram!("roost_queue_depth").record(depth as f64);
    }
    Ok(outcomes)
}

/// Drops one reference to a payload, queued at `timestamp_ms`; the last one deletes it.
fn release_payload(
    t: &mut DeliveryTables<'_>,
    payload_id: u64,
    timestamp_ms: u64,
) -> Result<(), StoreError> {
    let txn = t.txn;
    let refs = t.refs.open(txn)?;
    // No row: one reference.
    let held = refs.get(payload_id)?.map(|v| v.value());
    let left = held.unwrap_or(1).saturating_sub(1);
    if left == 0 {
        if held.is_some() {
            refs.remove(payload_id)?;
        }
        t.payloads.open(txn)?.remove(payload_id)?;
        // Nothing left to expire, unless dedup records hang on the row: they stay until
        // the sweep drops them with it.
        let expiry = t.expiry.open(txn)?;
        let key = (timestamp_ms, payload_id);
        let kept = match expiry.remove(key)? {
            Some(row) => {
                let (id, dedup, queued) = row.value();
                dedup.then(|| (id, queued.to_vec()))
            }
            None => None,
        };
        if let Some((id, queued)) = kept {
            expiry.insert(key, (id, true, queued.as_slice()))?;
        }
    } else {
        refs.insert(payload_id, left)?;
    }
    Ok(())
}

/// Deletes entries of a queue with seq in `..=up_to` (and, with `older_than_ms`, stops at the
/// first entry at least that new). Returns how many were deleted.
fn delete_front_in(
    t: &mut DeliveryTables<'_>,
    client_num: u64,
    up_to: u64,
    older_than_ms: Option<u64>,
) -> Result<u64, StoreError> {
    let txn = t.txn;
    let entries = t.entries.open(txn)?;
    let mut doomed = Vec::new();
    for entry in entries.range((client_num, 0)..=(client_num, up_to))? {
        let (key, value) = entry?;
        let (payload_id, timestamp_ms, _) = value.value();
        if older_than_ms.is_some_and(|cutoff| timestamp_ms >= cutoff) {
            break;
        }
        doomed.push((key.value().1, payload_id, timestamp_ms));
    }
    for &(seq, payload_id, timestamp_ms) in &doomed {
        t.entries.open(txn)?.remove((client_num, seq))?;
        release_payload(t, payload_id, timestamp_ms)?;
    }
    let deleted = doomed.len() as u64;
    if deleted > 0 {
        let heads = t.heads.open(txn)?;
        let current = heads.get(client_num)?.map(|v| v.value());
        if let Some((head, count)) = current {
            heads.insert(client_num, (head, count.saturating_sub(deleted)))?;
        }
    }
    Ok(deleted)
}

/// Deletes a client's queue up to min(`up_to_seq`, head); false if the queue is gone.
fn ack(t: &mut DeliveryTables<'_>, client_num: u64, up_to_seq: u64) -> Result<bool, StoreError> {
    let head = t.heads.open(t.txn)?.get(client_num)?.map(|v| v.value().0);
    let Some(head) = head else {
        return Ok(false);
    };
    delete_front_in(t, client_num, up_to_seq.min(head), None)?;
    Ok(true)
}

/// [`delete_front_in`] with tables of its own.
fn delete_front(
    txn: &WriteTransaction,
    client_num: u64,
    up_to: u64,
    older_than_ms: Option<u64>,
) -> Result<u64, StoreError> {
    delete_front_in(
        &mut DeliveryTables::new(txn),
        client_num,
        up_to,
        older_than_ms,
    )
}

/// Applies acknowledgements taken lazily ([`Store::ack_later`]): (client number, up to seq),
/// each as a QueueAck would; queues that are gone (client removed) are skipped.
pub(super) fn apply_acks(
    t: &mut DeliveryTables<'_>,
    acks: &[(u64, u64)],
) -> Result<(), StoreError> {
    for &(client_num, up_to_seq) in acks {
        ack(t, client_num, up_to_seq)?;
    }
    Ok(())
}

/// Deletes a whole queue (client removed).
pub(crate) fn delete_queue(txn: &WriteTransaction, client_num: u64) -> Result<(), StoreError> {
    delete_front(txn, client_num, u64::MAX, None)?;
    txn.open_table(QUEUE_HEADS)?.remove(client_num)?;
    let mut dedups = txn.open_table(QUEUE_DEDUP)?;
    let keys: Vec<[u8; 16]> = dedups
        .range((client_num, [0u8; 16])..=(client_num, [0xff; 16]))?
        .map(|e| e.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()?;
    for id in keys {
        dedups.remove((client_num, id))?;
    }
    drop(dedups);
    super::push::delete(txn, client_num)?;
    Ok(())
}

/// Most expiry rows (enqueued payloads) one sweep transaction handles: a large backlog expires
/// over several transactions, so other writers are never held up for long.
const EXPIRE_BATCH_ROWS: usize = 1_000;
/// Most queue entries one sweep transaction looks at (a row of a large fan-out names many).
const EXPIRE_BATCH_ENTRIES: usize = 20_000;

/// The (client number, seq) pairs of an expiry row.
fn queued_pairs(raw: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    raw.chunks_exact(16).map(|pair| {
        let (client, seq) = pair.split_at(8);
        let word = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
        (word(client), word(seq))
    })
}

/// Drops the messages (and dedup records) enqueued before `cutoff_ms`, from the front of
/// `QUEUE_EXPIRY`, at most one batch of it. Returns (entries dropped, whether rows older than
/// the cutoff are left for another batch). Looks only at the rows that expire: what the
/// database holds besides costs nothing.
fn expire_batch(txn: &WriteTransaction, cutoff_ms: u64) -> Result<(u64, bool), StoreError> {
    type Row = (u64, [u8; 16], bool, Vec<u8>);
    let mut rows: Vec<Row> = Vec::new();
    let mut more = false;
    {
        let mut expiry = txn.open_table(QUEUE_EXPIRY)?;
        let mut entries_seen = 0;
        let mut doomed = Vec::new();
        for row in expiry.range((0, 0)..(cutoff_ms, 0))? {
            if rows.len() >= EXPIRE_BATCH_ROWS || entries_seen >= EXPIRE_BATCH_ENTRIES {
                more = true;
                break;
            }
            let (key, row) = row?;
            let (id, dedup, queued) = row.value();
            entries_seen += queued.len() / 16;
            doomed.push(key.value());
            rows.push((key.value().1, id, dedup, queued.to_vec()));
        }
        for key in doomed {
            expiry.remove(key)?;
        }
    }
    let mut entries = txn.open_table(QUEUE_ENTRIES)?;
    let mut dedups = txn.open_table(QUEUE_DEDUP)?;
    let mut emptied: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut released: Vec<(u64, u64)> = Vec::new();
    let mut expired = 0;
    for (pid, id, dedup, queued) in &rows {
        let mut gone = 0;
        for (client_num, seq) in queued_pairs(queued) {
            if entries.remove((client_num, seq))?.is_some() {
                gone += 1;
                *emptied.entry(client_num).or_default() += 1;
            }
            if *dedup {
                let stale = dedups
                    .get((client_num, *id))?
                    .is_some_and(|v| v.value().1 < cutoff_ms);
                if stale {
                    dedups.remove((client_num, *id))?;
                }
            }
        }
        if gone > 0 {
            released.push((*pid, gone));
            expired += gone;
        }
    }
    drop((entries, dedups));
    {
        let mut heads = txn.open_table(QUEUE_HEADS)?;
        for (client_num, gone) in emptied {
            let current = heads.get(client_num)?.map(|v| v.value());
            if let Some((head, count)) = current {
                heads.insert(client_num, (head, count.saturating_sub(gone)))?;
            }
        }
    }
    let mut refs = txn.open_table(PAYLOAD_REFS)?;
    let mut payloads = txn.open_table(PAYLOADS)?;
    for (pid, gone) in released {
        // No row: one reference, and at least one entry of it is gone.
        let left = refs
            .get(pid)?
            .map(|v| v.value())
            .unwrap_or(gone)
            .saturating_sub(gone);
        if left == 0 {
            refs.remove(pid)?;
            payloads.remove(pid)?;
        } else {
            refs.insert(pid, left)?;
        }
    }
    Ok((expired, more))
}

/// Builds `QUEUE_EXPIRY` for a database of schema version 3, which had no such index: one row
/// per payload its queues hold, and one per message id whose dedup records outlived their
/// entries. Runs once, in the upgrading transaction.
pub(super) fn upgrade_from_v3(txn: &WriteTransaction) -> Result<(), StoreError> {
    use std::collections::{BTreeMap, HashSet};
    type Built = BTreeMap<u64, (u64, [u8; 16], Vec<u8>)>;
    let mut rows: Built = BTreeMap::new();
    let mut live: HashSet<(u64, u64)> = HashSet::new();
    for entry in txn.open_table(QUEUE_ENTRIES)?.iter()? {
        let (key, value) = entry?;
        let (client_num, seq) = key.value();
        let (pid, timestamp_ms, id) = value.value();
        let row = rows.entry(pid).or_insert((timestamp_ms, id, Vec::new()));
        row.0 = row.0.min(timestamp_ms);
        row.2.extend_from_slice(&client_num.to_be_bytes());
        row.2.extend_from_slice(&seq.to_be_bytes());
        live.insert((client_num, seq));
    }
    let mut orphans: BTreeMap<[u8; 16], (u64, Vec<u8>)> = BTreeMap::new();
    for entry in txn.open_table(QUEUE_DEDUP)?.iter()? {
        let (key, value) = entry?;
        let (client_num, id) = key.value();
        let (seq, timestamp_ms) = value.value();
        if live.contains(&(client_num, seq)) {
            continue;
        }
        let row = orphans.entry(id).or_insert((timestamp_ms, Vec::new()));
        row.0 = row.0.min(timestamp_ms);
        row.1.extend_from_slice(&client_num.to_be_bytes());
        row.1.extend_from_slice(&seq.to_be_bytes());
    }
    let mut expiry = txn.open_table(QUEUE_EXPIRY)?;
    // Every migrated row may name dedup records: they are kept until they expire.
    for (pid, (timestamp_ms, id, queued)) in rows {
        expiry.insert((timestamp_ms, pid), (id, true, queued.as_slice()))?;
    }
    for (id, (timestamp_ms, queued)) in orphans {
        // A fresh id that no payload will ever take: nothing is queued under it.
        let key = next_counter(txn, "next_payload_id")?;
        expiry.insert((timestamp_ms, key), (id, true, queued.as_slice()))?;
    }
    Ok(())
}

/// Reads messages of a queue after `after_seq`, skipping expired ones.
fn read_messages(
    txn: &ReadTransaction,
    client_num: u64,
    after_seq: u64,
    max_messages: usize,
    max_bytes: usize,
    cutoff_ms: u64,
) -> Result<(Vec<QueueMessage>, u64), StoreError> {
    let heads = txn.open_table(QUEUE_HEADS)?;
    let head = heads.get(client_num)?.map(|v| v.value().0).unwrap_or(0);
    let entries = txn.open_table(QUEUE_ENTRIES)?;
    let payloads = txn.open_table(PAYLOADS)?;
    let mut out = Vec::new();
    if max_messages == 0 {
        return Ok((out, head));
    }
    let mut bytes = 0usize;
    let start = after_seq.saturating_add(1);
    for entry in entries.range((client_num, start)..=(client_num, u64::MAX))? {
        let (key, value) = entry?;
        let (payload_id, timestamp_ms, id) = value.value();
        if timestamp_ms < cutoff_ms {
            continue;
        }
        let Some(raw) = payloads.get(payload_id)? else {
            return Err(StoreError::Corrupt("payloads"));
        };
        let raw = raw.value();
        if !out.is_empty() && bytes + raw.len() > max_bytes {
            break;
        }
        let payload = match QueuePayload::tls_deserialize_bytes(raw) {
            Ok((payload, [])) => payload,
            _ => return Err(StoreError::Corrupt("payloads")),
        };
        bytes += raw.len();
        out.push(QueueMessage {
            seq: key.value().1,
            id: MessageId(id),
            timestamp_ms,
            payload,
        });
        if out.len() >= max_messages {
            break;
        }
    }
    Ok((out, head))
}

impl QueueStore for Store {
    async fn enqueue(
        &self,
        recipient: &ClientId,
        id: MessageId,
        timestamp_ms: u64,
        payload: Vec<u8>,
        max_depth: u64,
    ) -> Result<(u64, Enqueued), ServiceError> {
        let recipient = recipient.clone();
        self.write(move |txn| {
            let Some(record) = active_client_in(txn, &recipient)? else {
                return Ok(Err(ServiceError::ClientNotFound));
            };
            let outcome = enqueue(
                &mut DeliveryTables::new(txn),
                max_depth,
                &[record.client_num],
                id,
                timestamp_ms,
                &payload,
                true,
            )?;
            Ok(Ok((
                record.client_num,
                outcome.first().copied().unwrap_or(Enqueued::Gone),
            )))
        })
        .await
    }

    async fn read_queue(
        &self,
        client_num: u64,
        after_seq: u64,
        max_messages: usize,
        max_bytes: usize,
        cutoff_ms: u64,
    ) -> Result<(Vec<QueueMessage>, u64), ServiceError> {
        // A commit acknowledged before this read is in the queue (its fan-out may still be
        // pending: see `groups`).
        self.pending_queued().await?;
        // What was acknowledged is not served again, even before the writer deleted it.
        let after_seq = after_seq.max(self.acked_through(client_num));
        // Off the executor: a page can be up to the fetch byte limit and cold pages hit the disk.
        Store::read(self, move |txn| {
            read_messages(
                txn,
                client_num,
                after_seq,
                max_messages,
                max_bytes,
                cutoff_ms,
            )
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn ack(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError> {
        // The queue's head row is the check: it exists exactly while the client is active
        // (created with the client, deleted when it is removed), so no client record is read.
        self.write(move |txn| {
            if ack(&mut DeliveryTables::new(txn), client_num, up_to_seq)? {
                Ok(Ok(()))
            } else {
                Ok(Err(ServiceError::ClientNotFound))
            }
        })
        .await
    }

    async fn ack_lazily(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError> {
        Store::ack_later(self, client_num, up_to_seq);
        Ok(())
    }

    async fn deliver(
        &self,
        deliveries: Vec<Delivery>,
        max_depth: u64,
        now_ms: u64,
    ) -> Result<(DeliverResponse, Vec<(u64, Fresh)>), ServiceError> {
        self.write(move |txn| {
            let mut response = DeliverResponse {
                accepted: 0,
                unknown_recipients: 0,
                queue_full: 0,
            };
            let mut woken = Vec::new();
            // Every table opened once for the whole request, not once per delivery.
            let clients = txn.open_table(CLIENTS)?;
            let mut tables = DeliveryTables::new(txn);
            for delivery in deliveries {
                let mut nums = Vec::with_capacity(delivery.recipients.len());
                for recipient in &delivery.recipients {
                    match active_client(&clients, recipient)? {
                        Some(record) => nums.push(record.client_num),
                        None => response.unknown_recipients += 1,
                    }
                }
                if nums.is_empty() {
                    continue;
                }
                // The payload is encoded and stored once for all its recipients here.
                let bytes = delivery
                    .payload
                    .tls_serialize_detached()
                    .map_err(|_| StoreError::Corrupt("payload encoding"))?;
                let outcomes = enqueue(
                    &mut tables,
                    max_depth,
                    &nums,
                    delivery.id,
                    now_ms,
                    &bytes,
                    true,
                )?;
                let shared = bytes::Bytes::from(bytes);
                for (num, outcome) in nums.iter().zip(outcomes) {
                    match outcome {
                        Enqueued::Queued(seq) => {
                            response.accepted += 1;
                            let fresh = Fresh {
                                seq,
                                id: delivery.id,
                                timestamp_ms: now_ms,
                                payload: shared.clone(),
                            };
                            woken.push((*num, fresh));
                        }
                        Enqueued::Duplicate(_) => {}
                        Enqueued::Full => response.queue_full += 1,
                        // Removed meanwhile (not possible in this transaction; kept total).
                        Enqueued::Gone => response.unknown_recipients += 1,
                    }
                }
            }
            Ok(Ok((response, woken)))
        })
        .await
    }

    async fn expire(&self, cutoff_ms: u64) -> Result<u64, ServiceError> {
        let mut total = 0;
        loop {
            let (expired, more) = self
                .write(move |txn| Ok(Ok::<_, ServiceError>(expire_batch(txn, cutoff_ms)?)))
                .await?;
            total += expired;
            if !more {
                return Ok(total);
            }
        }
    }
}
