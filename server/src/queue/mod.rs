//! Queuing Service: one durable, ordered queue per client. The DS and federation enqueue; only
//! the owner fetches, acks and listens.
//!
//! A payload fanned out to many recipients is stored once (with a reference count) and each
//! recipient's queue gets a small entry keyed by (client number, seq), so a fan-out appends
//! rows instead of copying the payload (see `storage::queue`).

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use roost_protocol::messages::federation::{DeliverResponse, Delivery};
use roost_protocol::messages::queue::*;
use roost_protocol::{ClientId, MessageId};
use tls_codec::Serialize as _;
use tokio::sync::watch;

use crate::State;
use crate::auth::Authenticated;
use crate::error::ServiceError;

/// What the Queuing Service needs from storage (implemented for redb in `storage::queue`).
pub(crate) trait QueueStore {
    /// Enqueues one payload for an active local client, idempotently by message id; returns the
    /// client number and the outcome. CLIENT_NOT_FOUND for unknown or removed clients.
    async fn enqueue(
        &self,
        recipient: &ClientId,
        id: MessageId,
        timestamp_ms: u64,
        payload: Vec<u8>,
        max_depth: u64,
    ) -> Result<(u64, Enqueued), ServiceError>;
    /// Messages with seq > `after_seq` enqueued at or after `cutoff_ms`, bounded by count and
    /// (softly, at least one) bytes; and the queue's head seq.
    async fn read_queue(
        &self,
        client_num: u64,
        after_seq: u64,
        max_messages: usize,
        max_bytes: usize,
        cutoff_ms: u64,
    ) -> Result<(Vec<QueueMessage>, u64), ServiceError>;
    /// Deletes messages with seq <= min(up_to_seq, head) of a client's queue; CLIENT_NOT_FOUND
    /// if the queue is gone (client removed).
    async fn ack(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError>;
    /// The same deletion for an `up_to_seq` the queue's head has reached (so that applying it
    /// later deletes exactly what applying it now would), which may be applied (and made
    /// durable) after this returns: reads
    /// on this node skip the acknowledged messages from the moment it returns, but a crash
    /// before the engine wrote it delivers them again (clients skip them by seq;
    /// docs/ARCHITECTURE.md, "Lazy acknowledgements"). An ack of a removed client is dropped
    /// or refused with CLIENT_NOT_FOUND.
    async fn ack_lazily(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError>;
    /// Enqueues a peer's deliveries idempotently; returns the counts and the new entries by
    /// client number.
    async fn deliver(
        &self,
        deliveries: Vec<Delivery>,
        max_depth: u64,
        now_ms: u64,
    ) -> Result<(DeliverResponse, Vec<(u64, Fresh)>), ServiceError>;
    /// Drops messages (and dedup records) older than `cutoff_ms`; returns how many messages.
    async fn expire(&self, cutoff_ms: u64) -> Result<u64, ServiceError>;
}

/// What a listener is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueSignal {
    /// Highest durable seq.
    pub(crate) head: u64,
    /// The queue is gone (client removed).
    pub(crate) closed: bool,
}

/// Messages kept per listened queue for pushing without a store read.
const RECENT: usize = 64;

/// A queue entry ready to push: its payload is the TLS encoding of the [`QueuePayload`],
/// made once and shared (not copied) by every recipient of a fan-out and every frame that
/// pushes it.
#[derive(Debug, Clone)]
pub(crate) struct Fresh {
    pub(crate) seq: u64,
    pub(crate) id: MessageId,
    pub(crate) timestamp_ms: u64,
    pub(crate) payload: Bytes,
}

impl Fresh {
    /// An entry read from the store, encoded for pushing.
    fn of(message: QueueMessage) -> Result<Self, ServiceError> {
        let payload = message
            .payload
            .tls_serialize_detached()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(Self {
            seq: message.seq,
            id: message.id,
            timestamp_ms: message.timestamp_ms,
            payload: payload.into(),
        })
    }
}

#[derive(Debug)]
struct Listened {
    sender: watch::Sender<QueueSignal>,
    /// The newest durable entries, contiguous in seq, none acknowledged.
    recent: std::collections::VecDeque<Fresh>,
    /// The window is empty because acks took every entry of a window that reached the head:
    /// a listener at the head has nothing to read. Anything that empties it otherwise (a gap,
    /// a wake-up of every listener after a reopen) clears this.
    drained: bool,
}

/// Listeners woken per hold of the [`Notifier`]'s lock. A fan-out to thousands wakes them a
/// piece at a time: the listen tasks woken first take the same lock to read their window, and
/// held for all of them it kept every worker but the waker's waiting (each client's wake-up is
/// whole under the lock; nothing orders one client's against another's).
const WAKE_CHUNK: usize = 128;

/// Wakes listeners when their queue grows, and keeps the newest entries of listened queues so
/// that a listener that is caught up pushes them without reading the store. Anything not in
/// that window is read from the store, so a missed wake-up or a trimmed window can delay but
/// never lose a message.
#[derive(Debug, Default, Clone)]
pub(crate) struct Notifier {
    queues: std::sync::Arc<Mutex<HashMap<u64, Listened>>>,
}

impl Notifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Listened>> {
        match self.queues.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A receiver that changes whenever the queue's head moves.
    pub(crate) fn subscribe(&self, client_num: u64) -> watch::Receiver<QueueSignal> {
        let mut queues = self.lock();
        queues
            .entry(client_num)
            .or_insert_with(|| Listened {
                sender: watch::channel(QueueSignal {
                    head: 0,
                    closed: false,
                })
                .0,
                recent: Default::default(),
                drained: false,
            })
            .sender
            .subscribe()
    }

    /// Whether a listen stream of this client is open on this node.
    pub(crate) fn is_listened(&self, client_num: u64) -> bool {
        Self::listened(&self.lock(), client_num)
    }

    /// Those of `client_nums` with no listen stream open on this node, under one lock (a
    /// fan-out to 10,000 listeners asks about every one of them while they are being pushed).
    pub(crate) fn unlistened(&self, client_nums: Vec<u64>) -> Vec<u64> {
        let queues = self.lock();
        client_nums
            .into_iter()
            .filter(|num| !Self::listened(&queues, *num))
            .collect()
    }

    fn listened(queues: &HashMap<u64, Listened>, client_num: u64) -> bool {
        queues
            .get(&client_num)
            .is_some_and(|l| l.sender.receiver_count() > 0)
    }

    /// Tells listeners of these queues about their new heads.
    pub(crate) fn notify(&self, heads: &[(u64, u64)]) {
        for chunk in heads.chunks(WAKE_CHUNK) {
            let mut queues = self.lock();
            for &(client_num, head) in chunk {
                Self::wake(&mut queues, client_num, head, None);
            }
        }
    }

    /// Like [`Notifier::notify`], handing over the committed entries too.
    pub(crate) fn notify_fresh(&self, entries: &[(u64, Fresh)]) {
        for chunk in entries.chunks(WAKE_CHUNK) {
            let mut queues = self.lock();
            for (client_num, fresh) in chunk {
                Self::wake(&mut queues, *client_num, fresh.seq, Some(fresh));
            }
        }
    }

    fn wake(
        queues: &mut HashMap<u64, Listened>,
        client_num: u64,
        head: u64,
        fresh: Option<&Fresh>,
    ) {
        let Some(listened) = queues.get_mut(&client_num) else {
            return;
        };
        if listened.sender.receiver_count() == 0 {
            queues.remove(&client_num);
            return;
        }
        match fresh {
            // Keep the window contiguous: a gap (an entry whose content we did not get) empties it.
            Some(fresh)
                if listened
                    .recent
                    .back()
                    .is_none_or(|last| last.seq + 1 == fresh.seq) =>
            {
                listened.recent.push_back(fresh.clone());
                if listened.recent.len() > RECENT {
                    listened.recent.pop_front();
                }
            }
            // A head the window already covers (e.g. another node's wake-up for an entry this
            // node pushed) keeps it; a head beyond it is a gap.
            None if listened.recent.back().is_some_and(|last| last.seq >= head) => {}
            _ => {
                listened.recent.clear();
                listened.drained = false;
            }
        }
        listened.sender.send_modify(|s| s.head = s.head.max(head));
    }

    /// The entries after `after_seq`, if the window holds all of them up to the head. Their
    /// payloads are shared, not copied.
    pub(crate) fn recent_after(&self, client_num: u64, after_seq: u64) -> Option<Vec<Fresh>> {
        let queues = self.lock();
        let listened = queues.get(&client_num)?;
        let head = listened.sender.borrow().head;
        let recent = &listened.recent;
        let (Some(first), Some(last)) = (recent.front(), recent.back()) else {
            // Every entry up to the head acknowledged: a listener at the head has nothing to
            // read; one behind it, or any listener of a window emptied otherwise, reads the
            // store. (Reading the store after every ack cost a blocking-pool read per message:
            // docs/BENCHMARKS.md.)
            return (listened.drained && after_seq >= head).then(Vec::new);
        };
        // Notifications of one batch can arrive out of order: a later entry that emptied the
        // window and an earlier one that refilled it leave the head beyond the window.
        if first.seq > after_seq.saturating_add(1) || last.seq < head {
            return None;
        }
        Some(
            recent
                .iter()
                .filter(|f| f.seq > after_seq)
                .cloned()
                .collect(),
        )
    }

    /// Forgets acknowledged entries (they must not be pushed any more).
    pub(crate) fn acked(&self, client_num: u64, up_to_seq: u64) {
        if let Some(listened) = self.lock().get_mut(&client_num) {
            let head = listened.sender.borrow().head;
            let reached = listened.recent.back().is_some_and(|last| last.seq >= head);
            listened.recent.retain(|f| f.seq > up_to_seq);
            if reached && listened.recent.is_empty() {
                listened.drained = true;
            }
        }
    }

    /// Wakes every listener of this node, so each reads from its cursor in the store (after a
    /// bus may have missed wake-ups, or a reopened database may hold entries nobody was told
    /// about). The windows are emptied: a window that seems to cover the head would otherwise
    /// answer instead of the store.
    pub(crate) fn wake_all(&self) {
        let mut queues = self.lock();
        for listened in queues.values_mut() {
            listened.recent.clear();
            listened.drained = false;
            listened.sender.send_modify(|_| {});
        }
    }

    /// Ends every listener of a queue.
    pub(crate) fn close_listeners(&self, client_num: u64) {
        if let Some(listened) = self.lock().remove(&client_num) {
            listened.sender.send_modify(|s| s.closed = true);
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
    /// There is no such queue (the client was removed).
    Gone,
}

/// The oldest enqueue time still served.
pub(crate) fn cutoff_ms(state: &State) -> u64 {
    state.clock.unix_millis().saturating_sub(
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
    recipient: &ClientId,
    id: MessageId,
    payload: QueuePayload,
) -> Result<u64, ServiceError> {
    let bytes = payload
        .tls_serialize_detached()
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let max_depth = state.settings.limits.max_queue_depth;
    let (client_num, outcome) = state
        .store
        .enqueue(recipient, id, state.clock.unix_millis(), bytes, max_depth)
        .await?;
    match outcome {
        Enqueued::Queued(seq) => {
            state.queues.notify(&[(client_num, seq)]);
            state.push.woken([client_num]);
            Ok(seq)
        }
        Enqueued::Duplicate(seq) => Ok(seq),
        Enqueued::Full => Err(ServiceError::QueueFull),
        Enqueued::Gone => Err(ServiceError::ClientNotFound),
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
    let (messages, head_seq) = state
        .store
        .read_queue(
            me.client_num,
            req.after_seq,
            max_messages,
            max_bytes,
            cutoff_ms(state),
        )
        .await?;
    Ok(QueueFetchResponse { messages, head_seq })
}

/// QueueAck.
pub(crate) async fn ack(
    state: &State,
    me: &Authenticated,
    req: QueueAckRequest,
) -> Result<QueueAckResponse, ServiceError> {
    state.store.ack(me.client_num, req.up_to_seq).await?;
    state.queues.acked(me.client_num, req.up_to_seq);
    Ok(QueueAckResponse {})
}

/// An Ack frame on a listen stream. `reached` is a seq the queue's head is known to have
/// reached (the listener read or pushed it). An ack up to it is applied lazily: nothing is
/// answered, so nothing waits for it to be durable (see [`QueueStore::ack_lazily`]). An ack
/// beyond it (above the head, or of messages this listener has not seen) is applied at once,
/// so that it deletes up to the head as it is now, never what is queued after it.
pub(crate) async fn ack_listened(
    state: &State,
    me: &Authenticated,
    up_to_seq: u64,
    reached: u64,
) -> Result<(), ServiceError> {
    if up_to_seq <= reached {
        state.store.ack_lazily(me.client_num, up_to_seq).await?;
    } else {
        state.store.ack(me.client_num, up_to_seq).await?;
    }
    state.queues.acked(me.client_num, up_to_seq);
    Ok(())
}

/// A page of a listener's backlog, and the queue's head seq.
pub(crate) async fn listen_page(
    state: &State,
    client_num: u64,
    after_seq: u64,
) -> Result<(Vec<Fresh>, u64), ServiceError> {
    let max_bytes = state.settings.limits.max_fetch_bytes as usize;
    let (messages, head) = state
        .store
        .read_queue(client_num, after_seq, 256, max_bytes, cutoff_ms(state))
        .await?;
    let page = messages
        .into_iter()
        .map(Fresh::of)
        .collect::<Result<_, _>>()?;
    Ok((page, head))
}

/// Enqueues deliveries from a peer hub (already checked: local recipients, groups the peer
/// hosts), idempotently by (recipient, message id), in one durable transaction.
pub(crate) async fn deliver_remote(
    state: &State,
    deliveries: Vec<Delivery>,
) -> Result<DeliverResponse, ServiceError> {
    let max_depth = state.settings.limits.max_queue_depth;
    let mut total = DeliverResponse {
        accepted: 0,
        unknown_recipients: 0,
        queue_full: 0,
    };
    // A peer's request may name up to `outbox_batch` deliveries of 1,024 recipients each: one
    // transaction for all of them would hold the store's writer for ~260k lookups. Each chunk
    // is its own transaction, so other writes go in between. A chunk that fails leaves the
    // earlier ones stored; the peer retries the whole request and the enqueue is idempotent
    // by message id, so nothing is queued twice.
    for chunk in transaction_chunks(deliveries, MAX_RECIPIENTS_PER_TRANSACTION) {
        let (response, woken) = state
            .store
            .deliver(chunk, max_depth, state.clock.unix_millis())
            .await?;
        state.queues.notify_fresh(&woken);
        state.push.woken(woken.iter().map(|(num, _)| *num));
        total.accepted += response.accepted;
        total.unknown_recipients += response.unknown_recipients;
        total.queue_full += response.queue_full;
    }
    Ok(total)
}

/// Recipients looked up and enqueued in one store transaction for a peer's deliveries.
const MAX_RECIPIENTS_PER_TRANSACTION: usize = 4096;

/// Splits deliveries, in order, into runs of at most `max_recipients` recipients in all (a
/// delivery larger than that goes alone; the caller bounds each delivery at 1,024).
fn transaction_chunks(deliveries: Vec<Delivery>, max_recipients: usize) -> Vec<Vec<Delivery>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut recipients = 0;
    for delivery in deliveries {
        let n = delivery.recipients.len();
        if !current.is_empty() && recipients + n > max_recipients {
            chunks.push(std::mem::take(&mut current));
            recipients = 0;
        }
        recipients += n;
        current.push(delivery);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_protocol::messages::queue::GroupMessage;

    fn fresh(seq: u64) -> Fresh {
        let group = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
            .parse()
            .unwrap();
        Fresh::of(QueueMessage {
            seq,
            id: MessageId([seq as u8; 16]),
            timestamp_ms: seq,
            payload: QueuePayload::GroupMessage(GroupMessage {
                group,
                message: vec![seq as u8].into(),
            }),
        })
        .unwrap()
    }

    fn seqs(page: Option<Vec<Fresh>>) -> Option<Vec<u64>> {
        page.map(|p| p.iter().map(|m| m.seq).collect())
    }

    #[test]
    fn the_window_serves_caught_up_listeners_and_nothing_else() {
        let notifier = Notifier::default();
        // Unlistened queues keep nothing.
        notifier.notify_fresh(&[(1, fresh(1))]);
        assert_eq!(seqs(notifier.recent_after(1, 0)), None);

        let _rx = notifier.subscribe(1);
        notifier.notify_fresh(&[(1, fresh(5)), (1, fresh(6))]);
        // A listener behind the window must read the store.
        assert_eq!(seqs(notifier.recent_after(1, 3)), None);
        assert_eq!(seqs(notifier.recent_after(1, 4)), Some(vec![5, 6]));
        assert_eq!(seqs(notifier.recent_after(1, 6)), Some(vec![]));
        // A gap (an entry whose content was not handed over) empties the window.
        notifier.notify_fresh(&[(1, fresh(8))]);
        assert_eq!(seqs(notifier.recent_after(1, 6)), None);
        notifier.notify(&[(1, 9)]);
        assert_eq!(seqs(notifier.recent_after(1, 8)), None);
        // Acknowledged entries are never pushed from memory.
        notifier.notify_fresh(&[(1, fresh(10)), (1, fresh(11)), (1, fresh(12))]);
        notifier.acked(1, 11);
        assert_eq!(seqs(notifier.recent_after(1, 11)), Some(vec![12]));
        assert_eq!(seqs(notifier.recent_after(1, 9)), None);
        // A window the acks emptied still says that a listener at the head has nothing new
        // (no store read), and that one behind it must read the store.
        notifier.acked(1, 12);
        assert_eq!(seqs(notifier.recent_after(1, 12)), Some(vec![]));
        assert_eq!(seqs(notifier.recent_after(1, 11)), None);
        // A head notified without its entry is beyond an empty window: read the store.
        notifier.notify(&[(1, 13)]);
        assert_eq!(seqs(notifier.recent_after(1, 12)), None);
        notifier.notify_fresh(&[(1, fresh(14))]);
        assert_eq!(seqs(notifier.recent_after(1, 13)), Some(vec![14]));
        // After every listener is sent back to the store (a reopen may have landed entries
        // nobody was told about), an emptied window no longer answers for it.
        notifier.acked(1, 14);
        assert_eq!(seqs(notifier.recent_after(1, 14)), Some(vec![]));
        notifier.wake_all();
        assert_eq!(seqs(notifier.recent_after(1, 14)), None);
        // Bounded.
        for seq in 13..13 + 2 * RECENT as u64 {
            notifier.notify_fresh(&[(1, fresh(seq))]);
        }
        assert_eq!(
            notifier.lock().get(&1).map(|l| l.recent.len()),
            Some(RECENT)
        );
    }

    #[test]
    fn a_fan_out_to_more_listeners_than_one_lock_hold_wakes_each_with_its_entries() {
        let notifier = Notifier::default();
        let clients = 2 * WAKE_CHUNK as u64 + 3;
        let mut receivers: Vec<_> = (1..=clients).map(|c| notifier.subscribe(c)).collect();
        // An entry per client, and a second for the client whose first one ends a lock hold
        // (its pair split across two holds).
        let mut entries: Vec<(u64, Fresh)> = (1..=clients).map(|c| (c, fresh(1))).collect();
        entries.insert(WAKE_CHUNK, (WAKE_CHUNK as u64, fresh(2)));
        notifier.notify_fresh(&entries);
        for (i, rx) in receivers.iter_mut().enumerate() {
            let client = i as u64 + 1;
            assert!(rx.has_changed().unwrap(), "client {client} not woken");
            assert_eq!(
                rx.borrow_and_update().head,
                if client == WAKE_CHUNK as u64 { 2 } else { 1 }
            );
        }
        assert_eq!(seqs(notifier.recent_after(clients, 0)), Some(vec![1]));
        assert_eq!(
            seqs(notifier.recent_after(WAKE_CHUNK as u64, 0)),
            Some(vec![1, 2])
        );
        notifier.notify(&(1..=clients).map(|c| (c, 3)).collect::<Vec<_>>());
        assert!(receivers.iter_mut().all(|rx| rx.has_changed().unwrap()));
    }

    #[test]
    fn entries_notified_out_of_order_are_not_skipped() {
        let notifier = Notifier::default();
        let _rx = notifier.subscribe(1);
        notifier.notify_fresh(&[(1, fresh(5))]);
        // Two requests of the same write batch wake in either order: 7 first empties the
        // window, 6 then starts a new one, and the head is 7.
        notifier.notify_fresh(&[(1, fresh(7))]);
        notifier.notify_fresh(&[(1, fresh(6))]);
        // A listener at 5 must not be served [6] from memory and then wait forever for 7.
        assert_eq!(seqs(notifier.recent_after(1, 5)), None);
        assert_eq!(seqs(notifier.recent_after(1, 6)), None);
        // Once the window reaches the head again, it serves.
        notifier.notify_fresh(&[(1, fresh(7))]);
        assert_eq!(seqs(notifier.recent_after(1, 5)), Some(vec![6, 7]));
    }

    #[test]
    fn only_clients_without_an_open_listen_stream_are_unlistened() {
        let notifier = Notifier::default();
        let listening = notifier.subscribe(2);
        drop(notifier.subscribe(3));
        assert_eq!(notifier.unlistened(vec![1, 2, 3]), vec![1, 3]);
        assert!(notifier.is_listened(2));
        drop(listening);
        assert_eq!(notifier.unlistened(vec![1, 2, 3]), vec![1, 2, 3]);
    }

    #[test]
    fn listeners_share_a_fanned_out_payload() {
        let notifier = Notifier::default();
        let (_a, _b) = (notifier.subscribe(1), notifier.subscribe(2));
        let entry = fresh(1);
        notifier.notify_fresh(&[(1, entry.clone()), (2, entry.clone())]);
        for client_num in [1, 2] {
            let page = notifier.recent_after(client_num, 0).unwrap();
            // The same bytes, not a copy.
            assert_eq!(page[0].payload.as_ptr(), entry.payload.as_ptr());
        }
    }

    fn delivery(tag: u8, recipients: usize) -> Delivery {
        let group = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
            .parse()
            .unwrap();
        Delivery {
            recipients: (0..recipients)
                .map(|i| format!("u{i}@example.org/phone").parse().unwrap())
                .collect(),
            id: MessageId([tag; 16]),
            timestamp_ms: 0,
            payload: QueuePayload::GroupMessage(GroupMessage {
                group,
                message: vec![tag].into(),
            }),
        }
    }

    #[test]
    fn a_peers_deliveries_are_stored_in_bounded_transactions_in_order() {
        // What a peer may send in one request: outbox_batch (256) deliveries of 1,024.
        let deliveries: Vec<_> = (0..=255u8).map(|tag| delivery(tag, 1024)).collect();
        let chunks = transaction_chunks(deliveries, MAX_RECIPIENTS_PER_TRANSACTION);
        assert_eq!(chunks.len(), 64);
        for chunk in &chunks {
            let recipients: usize = chunk.iter().map(|d| d.recipients.len()).sum();
            assert!(recipients <= MAX_RECIPIENTS_PER_TRANSACTION, "{recipients}");
        }
        let order: Vec<u8> = chunks.iter().flatten().map(|d| d.id.0[0]).collect();
        assert_eq!(order, (0..=255u8).collect::<Vec<_>>());

        // Small deliveries share a transaction; one larger than the bound goes alone.
        let mixed = vec![
            delivery(1, 3),
            delivery(2, 2),
            delivery(3, 9),
            delivery(4, 1),
        ];
        let sizes: Vec<Vec<usize>> = transaction_chunks(mixed, 5)
            .iter()
            .map(|c| c.iter().map(|d| d.recipients.len()).collect())
            .collect();
        assert_eq!(sizes, vec![vec![3, 2], vec![9], vec![1]]);
    }
}
