//! The persistent outgoing queue: `send_*` encrypts and queues (one durable transaction with
//! the ratchet generation it uses up), a background task delivers.
//!
//! Delivery happens under the state lock, one message at a time, in queue order (so in order
//! per group, and never interleaved with a commit of ours). A message is sent with the same
//! bytes until the hub answers: a repeat of an accepted message is answered from the hub's
//! receipt (PROTOCOL.md §7.4) and enqueued nowhere, so a lost answer never duplicates it.
//! Only a refusal for its epoch (STALE_EPOCH: the hub did not take it) makes the SDK catch up
//! and encrypt the plaintext again at the current epoch, in the message's place in the queue.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use roost_protocol::content::Content;
use roost_protocol::messages::delivery::SendMessageRequest;
use roost_protocol::{ErrorCode, ErrorDetail, GroupId};

use super::inbox::Outcome;
use super::{Client, Inner};
use crate::error::ClientError;
use crate::event::{Event, StoredOutgoingState};
use crate::mls::Mls;
use crate::outgoing::{MessageId, OutgoingMessage, OutgoingState, SendFailure};
use crate::store::{Changes, OutgoingChange, OutgoingRecord};
use crate::transport::{RequestError, TransportError};

/// What delivering one message came to.
enum Delivered {
    /// Sent or failed for good: it left the queue of things to send.
    Done,
    /// The hub cannot be reached (or cannot answer now): try again later, same bytes.
    Later(ClientError),
}

impl Client {
    /// Queues a text message for the group: [`Client::send_content`] with [`Content::Text`].
    pub async fn send_text(&self, group: &GroupId, text: &str) -> Result<MessageId, ClientError> {
        self.send(group, &Content::text(text).encode()).await
    }

    /// Queues `content`, encoded as a `MessageContent` (PROTOCOL.md §4.5), for every other
    /// member of the group. Receivers read it with [`Event::content`](crate::Event::content).
    pub async fn send_content(
        &self,
        group: &GroupId,
        content: &Content,
    ) -> Result<MessageId, ClientError> {
        self.send(group, &content.encode()).await
    }

    /// Encrypts `bytes` for the group, as they are, and queues it for every other member.
    ///
    /// Returns as soon as the encrypted message is durably in the profile's outgoing queue (in
    /// the same transaction that uses up its ratchet generation): it works while the
    /// homeserver is unreachable. A background task delivers the queue in order per group,
    /// across reconnects and restarts; [`Event::Outgoing`] reports when the message is sent
    /// (durably accepted by the hub) or can never be sent. Fails at once only for what is
    /// known locally: not a member of the group ([`ClientError::UnknownGroup`]), left it
    /// ([`ClientError::LeftGroup`]), or the profile database failed.
    ///
    /// The plaintext of a roost application message is a `MessageContent` (PROTOCOL.md §4.5):
    /// use [`Client::send_text`] or [`Client::send_content`], which encode it. This method is
    /// for apps that encode content themselves; receivers report other bytes as unreadable.
    pub async fn send(&self, group: &GroupId, bytes: &[u8]) -> Result<MessageId, ClientError> {
        let inner = &self.inner;
        let id = MessageId::random();
        {
            let mls = inner.state.lock().await;
            inner.check_member(&mls, group)?;
            if inner.store.group(group)?.is_some_and(|r| r.leaving == 1) {
                return Err(ClientError::LeftGroup(group.clone()));
            }
            let message = inner.mls_op(&mls, |mls| mls.encrypt(&inner.identity, group, bytes))?;
            let record = OutgoingRecord {
                id: id.as_u64(),
                group: group.clone(),
                queued_at_ms: now_ms(),
                message: message.into(),
                plaintext: bytes.into(),
                state: StoredOutgoingState::Queued,
            };
            inner.commit(
                &mls,
                Changes {
                    outgoing: vec![OutgoingChange::Push(record)],
                    ..Changes::default()
                },
            )?;
        }
        inner.outbox_ready.notify_one();
        Ok(id)
    }

    /// The outgoing queue: every message not yet sent, and every failed one not yet
    /// dismissed ([`Client::dismiss`]), in the order they were queued.
    pub async fn outbox(&self) -> Result<Vec<OutgoingMessage>, ClientError> {
        Ok(self
            .inner
            .store
            .outbox()?
            .into_iter()
            .map(|(_, record)| OutgoingMessage {
                id: MessageId::from_u64(record.id),
                group: record.group,
                state: record.state.into(),
                queued_at: UNIX_EPOCH + Duration::from_millis(record.queued_at_ms),
            })
            .collect())
    }

    /// Delivers the outgoing queue now and waits until it holds nothing to send (every message
    /// sent or failed). Fails with the transport error if the homeserver cannot be reached
    /// (the messages stay queued; the background task keeps trying).
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.inner.deliver_queued().await
    }

    /// Removes a failed message from the outgoing queue (the app has shown the failure).
    /// Returns whether there was such a failed message; a message still to be sent is not
    /// removed (it may be on its way already).
    pub async fn dismiss(&self, id: MessageId) -> Result<bool, ClientError> {
        let inner = &self.inner;
        let mls = inner.state.lock().await;
        let found = inner.store.outbox()?.into_iter().find(|(_, record)| {
            record.id == id.as_u64() && matches!(record.state, StoredOutgoingState::Failed(_))
        });
        let Some((position, _)) = found else {
            return Ok(false);
        };
        inner.commit(
            &mls,
            Changes {
                outgoing: vec![OutgoingChange::Remove(position)],
                ..Changes::default()
            },
        )?;
        Ok(true)
    }

    /// Test hook, for the exactly-once tests: the answers to the next `count` SendMessage
    /// requests of the outgoing queue are thrown away as if the network had lost them (the
    /// hub did get and handle each request).
    #[doc(hidden)]
    pub fn simulate_lost_answers(&self, count: u32) {
        self.inner.lose_answers.store(count, Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn server_code(err: &RequestError) -> Option<ErrorCode> {
    err.wire_error().map(|e| e.code)
}

/// Delivers the outgoing queue while the client lives: when something is queued, when the
/// connection comes back, and every `outbox_retry` while messages wait.
pub(crate) async fn outbox_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let retry = inner.config.outbox_retry;
        let waiting = match inner.deliver_queued().await {
            Ok(()) => false,
            Err(err) => {
                tracing::debug!(%err, "outgoing queue waits");
                true
            }
        };
        let ready = inner.outbox_ready_handle();
        drop(inner);
        if waiting {
            let _ = tokio::time::timeout(retry, ready.notified()).await;
        } else {
            ready.notified().await;
        }
    }
}

impl Inner {
    fn outbox_ready_handle(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.outbox_ready.clone()
    }

    /// Delivers queued messages, in order, until none is left to send.
    pub(crate) async fn deliver_queued(&self) -> Result<(), ClientError> {
        loop {
            let mut outcome = Outcome::default();
            let delivered = {
                let mls = self.state.lock().await;
                let Some((position, record)) = self.store.next_queued()? else {
                    return Ok(());
                };
                self.deliver_locked(&mls, position, record, &mut outcome)
                    .await
            };
            self.follow_up(outcome).await;
            match delivered? {
                Delivered::Done => {}
                Delivered::Later(err) => return Err(err),
            }
        }
    }

    /// Delivers the queued messages of `group` (with the state lock held): before a commit of
    /// ours in the group, so the messages keep their place before it.
    pub(crate) async fn deliver_group_locked(
        &self,
        mls: &Mls,
        group: &GroupId,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let queued: Vec<_> = self
            .store
            .outbox()?
            .into_iter()
            .filter(|(_, r)| r.group == *group && matches!(r.state, StoredOutgoingState::Queued))
            .collect();
        for (position, record) in queued {
            if let Delivered::Later(err) =
                self.deliver_locked(mls, position, record, outcome).await?
            {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Sends one queued message until the hub accepts it (→ `Sent`), refuses it for good
    /// (→ `Failed`), or cannot be asked now (→ [`Delivered::Later`]).
    async fn deliver_locked(
        &self,
        mls: &Mls,
        position: u64,
        mut record: OutgoingRecord,
        outcome: &mut Outcome,
    ) -> Result<Delivered, ClientError> {
        let group = record.group.clone();
        let mut resent = false;
        let mut refused_for_epoch = 0;
        loop {
            if self.check_member(mls, &group).is_err() {
                return self.settle_outgoing(
                    mls,
                    position,
                    record,
                    Some(SendFailure::RemovedFromGroup),
                );
            }
            let request = SendMessageRequest {
                group: group.clone(),
                message: record.message.clone(),
            };
            let mut answer = self.conn.call(request).await;
            if answer.is_ok()
                && self
                    .lose_answers
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                answer = Err(RequestError::Transport(TransportError::Timeout));
            }
            let err = match answer {
                Ok(_) => return self.settle_outgoing(mls, position, record, None),
                Err(err) => err,
            };
            match server_code(&err) {
                None if !resent => {
                    // The answer (or the request) was lost: the same bytes again. A repeat
                    // of an accepted message is answered from its receipt.
                    tracing::debug!(%group, %err, "message outcome unknown: sending it again");
                    resent = true;
                }
                None => return Ok(Delivered::Later(err.into())),
                Some(
                    ErrorCode::PEER_UNREACHABLE
                    | ErrorCode::UNAVAILABLE
                    | ErrorCode::RATE_LIMITED
                    | ErrorCode::INTERNAL
                    | ErrorCode::REQUEST_TIMEOUT,
                ) => {
                    return Ok(Delivered::Later(err.into()));
                }
                Some(ErrorCode::STALE_EPOCH) => {
                    // Not taken: its epoch is too old for the hub. Catch up, then encrypt the
                    // same plaintext again at the current epoch, in the same place.
                    refused_for_epoch += 1;
                    if refused_for_epoch > self.config.max_commit_attempts.max(1) {
                        return self.settle_outgoing(
                            mls,
                            position,
                            record,
                            Some(SendFailure::TooManyAttempts),
                        );
                    }
                    let current = match err.wire_error().map(|e| &e.detail) {
                        Some(ErrorDetail::StaleEpoch { current_epoch }) => *current_epoch,
                        _ => 0,
                    };
                    self.sync_into(mls, outcome).await?;
                    if self.check_member(mls, &group).is_err() {
                        continue;
                    }
                    if mls.epoch(&group)? < current {
                        // Still behind after processing everything queued for us: what we
                        // missed is gone (an old profile copy, or offline past the queue's
                        // age limit). Rejoin, then send at the new epoch.
                        tracing::info!(%group, "behind the hub with nothing left to process: rejoining");
                        self.rejoin_locked(mls, &group, outcome).await?;
                    }
                    let message = self.mls_op(mls, |mls| {
                        mls.encrypt(&self.identity, &group, record.plaintext.as_slice())
                    })?;
                    record.message = message.into();
                    self.commit(
                        mls,
                        Changes {
                            outgoing: vec![OutgoingChange::Put(position, record.clone())],
                            ..Changes::default()
                        },
                    )?;
                    resent = false;
                }
                Some(ErrorCode::NOT_MEMBER) => {
                    // Removed by a commit we may not have processed yet.
                    self.sync_into(mls, outcome).await?;
                    let failure = if self.check_member(mls, &group).is_err() {
                        SendFailure::RemovedFromGroup
                    } else {
                        refused(&err)
                    };
                    return self.settle_outgoing(mls, position, record, Some(failure));
                }
                Some(ErrorCode::GROUP_NOT_FOUND) => {
                    return self.settle_outgoing(
                        mls,
                        position,
                        record,
                        Some(SendFailure::NoSuchGroup),
                    );
                }
                Some(_) => return self.settle_outgoing(mls, position, record, Some(refused(&err))),
            }
        }
    }

    /// Records a message's outcome: sent (`None`: deleted from the queue) or failed (kept,
    /// marked), with its [`Event::Outgoing`], in one transaction.
    fn settle_outgoing(
        &self,
        mls: &Mls,
        position: u64,
        mut record: OutgoingRecord,
        failure: Option<SendFailure>,
    ) -> Result<Delivered, ClientError> {
        let id = MessageId::from_u64(record.id);
        let group = record.group.clone();
        let mut changes = Changes::default();
        let state = match failure {
            None => {
                changes.outgoing.push(OutgoingChange::Remove(position));
                OutgoingState::Sent
            }
            Some(failure) => {
                tracing::info!(%group, %id, %failure, "queued message cannot be sent");
                record.state = StoredOutgoingState::Failed((&failure).into());
                record.plaintext = Vec::new().into();
                changes.outgoing.push(OutgoingChange::Put(position, record));
                OutgoingState::Failed(failure)
            }
        };
        changes.event(Event::Outgoing { group, id, state });
        self.commit(mls, changes)?;
        Ok(Delivered::Done)
    }
}

fn refused(err: &RequestError) -> SendFailure {
    match err.wire_error() {
        Some(wire) => SendFailure::Refused {
            code: wire.code,
            reason: String::from_utf8_lossy(wire.reason.as_slice()).into_owned(),
        },
        None => SendFailure::Refused {
            code: ErrorCode::INTERNAL,
            reason: err.to_string(),
        },
    }
}
