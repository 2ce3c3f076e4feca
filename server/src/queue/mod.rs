//! Queuing Service: one durable, ordered queue per client. The DS and federation enqueue; only
//! the owner fetches, acks and listens.
//!
//! A payload fanned out to many recipients is stored once (with a reference count) and each
//! recipient's queue gets a small entry keyed by (client number, seq), so a fan-out appends
//! rows instead of copying the payload (see `storage::queue`).

use std::collections::HashMap;
use std::sync::Mutex;

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
    /// Deletes messages with seq <= min(up_to_seq, head) of an active client.
    async fn ack(
        &self,
        client: &ClientId,
        client_num: u64,
        up_to_seq: u64,
    ) -> Result<(), ServiceError>;
    /// Enqueues a peer's deliveries idempotently; returns the counts and the new (client, seq).
    async fn deliver(
        &self,
        deliveries: Vec<Delivery>,
        max_depth: u64,
        now_ms: u64,
    ) -> Result<(DeliverResponse, Vec<(u64, u64)>), ServiceError>;
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

/// The oldest enqueue time still served.
pub(crate) fn cutoff_ms(state: &State) -> u64 {
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
        .enqueue(recipient, id, crate::unix_millis(), bytes, max_depth)
        .await?;
    match outcome {
        Enqueued::Queued(seq) => {
            state.queues.notify(&[(client_num, seq)]);
            Ok(seq)
        }
        Enqueued::Duplicate(seq) => Ok(seq),
        Enqueued::Full => Err(ServiceError::QueueFull),
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
    state
        .store
        .ack(&me.client, me.client_num, req.up_to_seq)
        .await?;
    Ok(QueueAckResponse {})
}

/// A page of a listener's backlog.
pub(crate) async fn listen_page(
    state: &State,
    client_num: u64,
    after_seq: u64,
) -> Result<(Vec<QueueMessage>, u64), ServiceError> {
    let max_bytes = state.settings.limits.max_fetch_bytes as usize;
    state
        .store
        .read_queue(client_num, after_seq, 256, max_bytes, cutoff_ms(state))
        .await
}

/// Enqueues deliveries from a peer hub (already checked: local recipients, groups the peer
/// hosts), idempotently by (recipient, message id), in one durable transaction.
pub(crate) async fn deliver_remote(
    state: &State,
    deliveries: Vec<Delivery>,
) -> Result<DeliverResponse, ServiceError> {
    let max_depth = state.settings.limits.max_queue_depth;
    let (response, woken) = state
        .store
        .deliver(deliveries, max_depth, crate::unix_millis())
        .await?;
    state.queues.notify(&woken);
    Ok(response)
}
