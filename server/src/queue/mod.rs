//! Queuing Service: one durable, ordered queue per client. The DS and federation enqueue; only
//! the owner fetches, acks and listens.
//!
//! A payload fanned out to many recipients is stored once (`PAYLOADS`, with a reference
//! count) and each recipient's queue gets a small entry keyed by (client number, seq), so a
//! fan-out appends rows instead of copying the payload.

use std::collections::HashMap;
use std::sync::Mutex;

use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use roost_protocol::MessageId;
use roost_protocol::messages::queue::*;
use tls_codec::{DeserializeBytes, Serialize as _};
use tokio::sync::watch;

use crate::State;
use crate::auth::Authenticated;
use crate::error::ServiceError;
use crate::storage::tables::{PAYLOAD_REFS, PAYLOADS, QUEUE_DEDUP, QUEUE_ENTRIES, QUEUE_HEADS};
use crate::storage::{StoreError, next_counter};

/// What a listener is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueSignal {
    /// Highest durable seq.
    pub(crate) head: u64,
    /// The queue is gone (client removed).
    pub(crate) closed: bool,
}

/// Wakes listeners when their queue grows. Holds no message content: listeners read the
/// store, so a missed wake-up can delay but never lose a message.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    senders: Mutex<HashMap<u64, watch::Sender<QueueSignal>>>,
}

impl Notifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, watch::Sender<QueueSignal>>> {
        match self.senders.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A receiver that changes whenever the queue's head moves.
    pub(crate) fn subscribe(&self, client_num: u64) -> watch::Receiver<QueueSignal> {
        let mut senders = self.lock();
        senders
            .entry(client_num)
            .or_insert_with(|| {
                watch::channel(QueueSignal {
                    head: 0,
                    closed: false,
                })
                .0
            })
            .subscribe()
    }

    /// Tells listeners of these queues about their new heads.
    pub(crate) fn notify(&self, heads: &[(u64, u64)]) {
        let mut senders = self.lock();
        for &(client_num, head) in heads {
            if let Some(sender) = senders.get(&client_num) {
                if sender.receiver_count() == 0 {
                    senders.remove(&client_num);
                } else {
                    sender.send_modify(|s| s.head = s.head.max(head));
                }
            }
        }
    }

    /// Ends every listener of a queue.
    pub(crate) fn close_listeners(&self, client_num: u64) {
        if let Some(sender) = self.lock().remove(&client_num) {
            sender.send_modify(|s| s.closed = true);
        }
    }
}

/// The result of enqueueing one message for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// Newly queued at this seq.
    Queued(u64),
    /// Already queued earlier with the same message id.
    Duplicate(u64),
    /// The queue is at its depth limit.
    Full,
}

/// Enqueues one payload for several local recipients inside `txn`, storing the payload once.
/// With `dedup`, a message id already queued for a recipient is not queued again.
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
    let mut dedups = txn.open_table(QUEUE_DEDUP)?;
    let mut outcomes = Vec::with_capacity(recipients.len());
    let mut payload_id = None;
    let mut refs = 0u64;
    for &client_num in recipients {
        let prior = if dedup {
            dedups.get((client_num, id.0))?.map(|v| v.value().0)
        } else {
            None
        };
        if let Some(seq) = prior {
            outcomes.push(Enqueued::Duplicate(seq));
            continue;
        }
        let Some((head, count)) = heads.get(client_num)?.map(|v| v.value()) else {
            // No such queue (client removed meanwhile): callers resolved recipients earlier.
            outcomes.push(Enqueued::Full);
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
        if dedup {
            dedups.insert((client_num, id.0), (seq, timestamp_ms))?;
        }
        refs += 1;
        outcomes.push(Enqueued::Queued(seq));
    }
    if let Some(pid) = payload_id {
        txn.open_table(PAYLOADS)?.insert(pid, payload)?;
        txn.open_table(PAYLOAD_REFS)?.insert(pid, refs)?;
    }
    Ok(outcomes)
}

fn release_payload(txn: &WriteTransaction, payload_id: u64) -> Result<(), StoreError> {
    let mut refs = txn.open_table(PAYLOAD_REFS)?;
    let left = refs
        .get(payload_id)?
        .map(|v| v.value())
        .unwrap_or(1)
        .saturating_sub(1);
    if left == 0 {
        refs.remove(payload_id)?;
        txn.open_table(PAYLOADS)?.remove(payload_id)?;
    } else {
        refs.insert(payload_id, left)?;
    }
    Ok(())
}

/// Deletes entries of a queue with seq in `..=up_to` (and, with `older_than_ms`, stops at the
/// first entry at least that new). Returns how many were deleted.
fn delete_front(
    txn: &WriteTransaction,
    client_num: u64,
    up_to: u64,
    older_than_ms: Option<u64>,
) -> Result<u64, StoreError> {
    let mut entries = txn.open_table(QUEUE_ENTRIES)?;
    let mut doomed = Vec::new();
    for entry in entries.range((client_num, 0)..=(client_num, up_to))? {
        let (key, value) = entry?;
        let (payload_id, timestamp_ms, _) = value.value();
        if older_than_ms.is_some_and(|cutoff| timestamp_ms >= cutoff) {
            break;
        }
        doomed.push((key.value().1, payload_id));
    }
    for &(seq, _) in &doomed {
        entries.remove((client_num, seq))?;
    }
    drop(entries);
    for &(_, payload_id) in &doomed {
        release_payload(txn, payload_id)?;
    }
    let deleted = doomed.len() as u64;
    if deleted > 0 {
        let mut heads = txn.open_table(QUEUE_HEADS)?;
        let current = heads.get(client_num)?.map(|v| v.value());
        if let Some((head, count)) = current {
            heads.insert(client_num, (head, count.saturating_sub(deleted)))?;
        }
    }
    Ok(deleted)
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
    Ok(())
}

/// Drops messages older than `cutoff_ms` from every queue, and dedup records as old.
pub(crate) fn expire(txn: &WriteTransaction, cutoff_ms: u64) -> Result<u64, StoreError> {
    let queues: Vec<u64> = {
        let heads = txn.open_table(QUEUE_HEADS)?;
        heads
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?
    };
    let mut expired = 0;
    for client_num in queues {
        expired += delete_front(txn, client_num, u64::MAX, Some(cutoff_ms))?;
    }
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

fn cutoff_ms(state: &State) -> u64 {
    crate::unix_millis().saturating_sub(
        state
            .settings
            .limits
            .max_message_age_secs
            .saturating_mul(1000),
    )
}

/// Enqueues one message for one local client (the internal API used by the DS and
/// federation, and by tests). Resolves once the message is durable and listeners are woken.
pub(crate) async fn enqueue(
    state: &State,
    recipient: &roost_protocol::ClientId,
    id: MessageId,
    payload: QueuePayload,
) -> Result<u64, ServiceError> {
    let recipient = recipient.clone();
    let bytes = payload
        .tls_serialize_detached()
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let max_depth = state.settings.limits.max_queue_depth;
    let (client_num, outcome) = state
        .store
        .write(move |txn| {
            let clients = txn.open_table(crate::storage::tables::CLIENTS)?;
            let Some(record) = crate::auth::active_client(&clients, &recipient)? else {
                return Ok(Err(ServiceError::ClientNotFound));
            };
            drop(clients);
            let outcome = enqueue_in_txn(
                txn,
                max_depth,
                &[record.client_num],
                id,
                crate::unix_millis(),
                &bytes,
                true,
            )?;
            Ok(Ok((record.client_num, outcome.first().copied())))
        })
        .await?;
    match outcome {
        Some(Enqueued::Queued(seq)) => {
            state.queues.notify(&[(client_num, seq)]);
            Ok(seq)
        }
        Some(Enqueued::Duplicate(seq)) => Ok(seq),
        Some(Enqueued::Full) | None => Err(ServiceError::QueueFull),
    }
}

/// QueueFetch.
pub(crate) async fn fetch(
    state: &State,
    me: &Authenticated,
    req: QueueFetchRequest,
) -> Result<QueueFetchResponse, ServiceError> {
    let limits = &state.settings.limits;
    let max_messages = req.max_messages.min(limits.max_fetch_messages) as usize;
    let max_bytes = req.max_bytes.clamp(1, limits.max_fetch_bytes) as usize;
    let client_num = me.client_num;
    let cutoff = cutoff_ms(state);
    let (messages, head_seq) = state
        .store
        .read(move |txn| {
            Ok::<_, ServiceError>(read_messages(
                txn,
                client_num,
                req.after_seq,
                max_messages,
                max_bytes,
                cutoff,
            )?)
        })
        .await?;
    Ok(QueueFetchResponse { messages, head_seq })
}

/// QueueAck.
pub(crate) async fn ack(
    state: &State,
    me: &Authenticated,
    req: QueueAckRequest,
) -> Result<QueueAckResponse, ServiceError> {
    let client_num = me.client_num;
    let client = me.client.clone();
    state
        .store
        .write(move |txn| {
            if !crate::auth::still_active(txn, &client)? {
                return Ok(Err(ServiceError::ClientNotFound));
            }
            let head = txn
                .open_table(QUEUE_HEADS)?
                .get(client_num)?
                .map(|v| v.value().0)
                .unwrap_or(0);
            delete_front(txn, client_num, req.up_to_seq.min(head), None)?;
            Ok(Ok(()))
        })
        .await?;
    Ok(QueueAckResponse {})
}

/// A page of a listener's backlog.
pub(crate) async fn listen_page(
    state: &State,
    client_num: u64,
    after_seq: u64,
) -> Result<(Vec<QueueMessage>, u64), ServiceError> {
    let cutoff = cutoff_ms(state);
    let max_bytes = state.settings.limits.max_fetch_bytes as usize;
    state
        .store
        .read(move |txn| {
            Ok::<_, ServiceError>(read_messages(
                txn, client_num, after_seq, 256, max_bytes, cutoff,
            )?)
        })
        .await
}

/// Enqueues deliveries from a peer hub (already checked: local recipients, groups the peer
/// hosts), idempotently by (recipient, message id), in one durable transaction.
pub(crate) async fn deliver_remote(
    state: &State,
    deliveries: Vec<roost_protocol::messages::federation::Delivery>,
) -> Result<roost_protocol::messages::federation::DeliverResponse, ServiceError> {
    let max_depth = state.settings.limits.max_queue_depth;
    let (response, woken) = state
        .store
        .write(move |txn| {
            let mut response = roost_protocol::messages::federation::DeliverResponse {
                accepted: 0,
                unknown_recipients: 0,
                queue_full: 0,
            };
            let mut woken = Vec::new();
            for delivery in deliveries {
                let clients = txn.open_table(crate::storage::tables::CLIENTS)?;
                let record = crate::auth::active_client(&clients, &delivery.recipient)?;
                drop(clients);
                let Some(record) = record else {
                    response.unknown_recipients += 1;
                    continue;
                };
                let bytes = delivery
                    .payload
                    .tls_serialize_detached()
                    .map_err(|_| StoreError::Corrupt("payload encoding"))?;
                let outcome = enqueue_in_txn(
                    txn,
                    max_depth,
                    &[record.client_num],
                    delivery.id,
                    crate::unix_millis(),
                    &bytes,
                    true,
                )?;
                match outcome.first() {
                    Some(Enqueued::Queued(seq)) => {
                        response.accepted += 1;
                        woken.push((record.client_num, *seq));
                    }
                    Some(Enqueued::Duplicate(_)) => {}
                    Some(Enqueued::Full) | None => response.queue_full += 1,
                }
            }
            Ok(Ok::<_, ServiceError>((response, woken)))
        })
        .await?;
    state.queues.notify(&woken);
    Ok(response)
}
