//! redb implementation of the Queuing Service's store: per-client heads, (client, seq)
//! entries, payloads stored once with a reference count, and dedup records.

use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use roost_protocol::messages::federation::{DeliverResponse, Delivery};
use roost_protocol::messages::queue::{QueueMessage, QueuePayload};
use roost_protocol::{ClientId, MessageId};
use tls_codec::{DeserializeBytes, Serialize as _};

use super::auth::active_client_in;
use super::tables::{PAYLOAD_REFS, PAYLOADS, QUEUE_DEDUP, QUEUE_ENTRIES, QUEUE_HEADS};
use super::{Store, StoreError, next_counter};
use crate::error::ServiceError;
use crate::queue::{Enqueued, Fresh, QueueStore};

/// Enqueues one payload for several local recipients inside `txn`, storing the payload once.
/// With `dedup`, a message id already queued for a recipient is not queued again. A client
/// number without a queue (client removed) is [`Enqueued::Gone`]. Records the deepest queue
/// it appended to in `roost_queue_depth` (once per call, not per recipient).
pub(crate) fn enqueue_in_txn(
    txn: &WriteTransaction,
    max_depth: u64,
    recipients: &[u64],
    id: MessageId,
    timestamp_ms: u64,
    payload: &[u8],
    dedup: bool,
) -> Result<Vec<Enqueued>, StoreError> {
    let mut heads = txn.open_table(QUEUE_HEADS)?;
    let mut entries = txn.open_table(QUEUE_ENTRIES)?;
    // Opening a table costs a check of its definition: only when it is used.
    let mut dedups = if dedup {
        Some(txn.open_table(QUEUE_DEDUP)?)
    } else {
        None
    };
    let mut outcomes = Vec::with_capacity(recipients.len());
    let mut payload_id = None;
    let mut refs = 0u64;
    let mut deepest = None;
    for &client_num in recipients {
        let prior = match &dedups {
            Some(dedups) => dedups.get((client_num, id.0))?.map(|v| v.value().0),
            None => None,
        };
        if let Some(seq) = prior {
            outcomes.push(Enqueued::Duplicate(seq));
            continue;
        }
        let Some((head, count)) = heads.get(client_num)?.map(|v| v.value()) else {
            // No such queue (client removed meanwhile): callers resolved recipients earlier.
            outcomes.push(Enqueued::Gone);
            continue;
        };
        if count >= max_depth {
            outcomes.push(Enqueued::Full);
            continue;
        }
        let pid = match payload_id {
            Some(pid) => pid,
            None => {
                let pid = next_counter(txn, "next_payload_id")?;
                payload_id = Some(pid);
                pid
            }
        };
        let seq = head + 1;
        entries.insert((client_num, seq), (pid, timestamp_ms, id.0))?;
        heads.insert(client_num, (seq, count + 1))?;
        deepest = deepest.max(Some(count + 1));
        if let Some(dedups) = &mut dedups {
            dedups.insert((client_num, id.0), (seq, timestamp_ms))?;
        }
        refs += 1;
        outcomes.push(Enqueued::Queued(seq));
    }
    if let Some(pid) = payload_id {
        txn.open_table(PAYLOADS)?.insert(pid, payload)?;
        txn.open_table(PAYLOAD_REFS)?.insert(pid, refs)?;
    }
    if let Some(depth) = deepest {
        metrics::histogram!("roost_queue_depth").record(depth as f64);
    }
    Ok(outcomes)
}

/// The tables an acknowledgement writes, opened once for every queue it deletes from (a redb
/// table open checks the table's definition, which costs more than a small delete).
struct FrontTables<'t> {
    heads: redb::Table<'t, u64, (u64, u64)>,
    entries: redb::Table<'t, (u64, u64), (u64, u64, [u8; 16])>,
    payloads: redb::Table<'t, u64, &'static [u8]>,
    refs: redb::Table<'t, u64, u64>,
}

impl<'t> FrontTables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            heads: txn.open_table(QUEUE_HEADS)?,
            entries: txn.open_table(QUEUE_ENTRIES)?,
            payloads: txn.open_table(PAYLOADS)?,
            refs: txn.open_table(PAYLOAD_REFS)?,
        })
    }

    fn release_payload(&mut self, payload_id: u64) -> Result<(), StoreError> {
        let left = self
            .refs
            .get(payload_id)?
            .map(|v| v.value())
            .unwrap_or(1)
            .saturating_sub(1);
        if left == 0 {
            self.refs.remove(payload_id)?;
            self.payloads.remove(payload_id)?;
        } else {
            self.refs.insert(payload_id, left)?;
        }
        Ok(())
    }

    /// See [`delete_front`].
    fn delete_front(
        &mut self,
        client_num: u64,
        up_to: u64,
        older_than_ms: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut doomed = Vec::new();
        for entry in self.entries.range((client_num, 0)..=(client_num, up_to))? {
            let (key, value) = entry?;
            let (payload_id, timestamp_ms, _) = value.value();
            if older_than_ms.is_some_and(|cutoff| timestamp_ms >= cutoff) {
                break;
            }
            doomed.push((key.value().1, payload_id));
        }
        for &(seq, payload_id) in &doomed {
            self.entries.remove((client_num, seq))?;
            self.release_payload(payload_id)?;
        }
        let deleted = doomed.len() as u64;
        if deleted > 0 {
            let current = self.heads.get(client_num)?.map(|v| v.value());
            if let Some((head, count)) = current {
                self.heads
                    .insert(client_num, (head, count.saturating_sub(deleted)))?;
            }
        }
        Ok(deleted)
    }

    /// Deletes a client's queue up to min(`up_to_seq`, head); false if the queue is gone.
    fn ack(&mut self, client_num: u64, up_to_seq: u64) -> Result<bool, StoreError> {
        let head = self.heads.get(client_num)?.map(|v| v.value().0);
        let Some(head) = head else {
            return Ok(false);
        };
        self.delete_front(client_num, up_to_seq.min(head), None)?;
        Ok(true)
    }
}

/// Deletes entries of a queue with seq in `..=up_to` (and, with `older_than_ms`, stops at the
/// first entry at least that new). Returns how many were deleted.
fn delete_front(
    txn: &WriteTransaction,
    client_num: u64,
    up_to: u64,
    older_than_ms: Option<u64>,
) -> Result<u64, StoreError> {
    FrontTables::open(txn)?.delete_front(client_num, up_to, older_than_ms)
}

/// Applies acknowledgements taken lazily ([`Store::ack_later`]): (client number, up to seq),
/// each as a QueueAck would; queues that are gone (client removed) are skipped.
pub(super) fn apply_acks(txn: &WriteTransaction, acks: &[(u64, u64)]) -> Result<(), StoreError> {
    let mut tables = FrontTables::open(txn)?;
    for &(client_num, up_to_seq) in acks {
        tables.ack(client_num, up_to_seq)?;
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

/// Drops messages older than `cutoff_ms` from every queue, and dedup records as old.
fn expire(txn: &WriteTransaction, cutoff_ms: u64) -> Result<u64, StoreError> {
    let queues: Vec<u64> = {
        let heads = txn.open_table(QUEUE_HEADS)?;
        heads
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?
    };
    let mut expired = 0;
    let mut tables = FrontTables::open(txn)?;
    for client_num in queues {
        expired += tables.delete_front(client_num, u64::MAX, Some(cutoff_ms))?;
    }
    drop(tables);
    let mut dedups = txn.open_table(QUEUE_DEDUP)?;
    dedups.retain(|_, (_, timestamp_ms)| timestamp_ms >= cutoff_ms)?;
    Ok(expired)
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
            let outcome = enqueue_in_txn(
                txn,
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
            if FrontTables::open(txn)?.ack(client_num, up_to_seq)? {
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
            for delivery in deliveries {
                let mut nums = Vec::with_capacity(delivery.recipients.len());
                for recipient in &delivery.recipients {
                    match active_client_in(txn, recipient)? {
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
                let outcomes =
                    enqueue_in_txn(txn, max_depth, &nums, delivery.id, now_ms, &bytes, true)?;
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
        self.write(move |txn| Ok(Ok(expire(txn, cutoff_ms)?))).await
    }
}
