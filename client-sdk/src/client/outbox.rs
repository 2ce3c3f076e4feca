//! The persistent outgoing queue: `send_*` encrypts and queues (one durable transaction with
//! the ratchet generation it uses up), a background task delivers.
//!
//! Delivery happens under the state lock, one message at a time, in queue order (so in order
//! per group, and never interleaved with a commit of ours). A message is sent with the same
//! bytes until the hub answers: a repeat of an accepted message is answered from the hub's
//! receipt (PROTOCOL.md §7.4) and enqueued nowhere, so a lost answer never duplicates it.
//! Only a refusal for its epoch (STALE_EPOCH: the hub did not take it) makes the SDK catch up
//! and encrypt the plaintext again at the current epoch, in the message's place in the queue.
//!
//! Every queued message carries a send counter (the profile's next, given in the transaction
//! that queues it) and goes out as SendCounted. SEND_COUNTER_USED means the profile's state is
//! older than what it already sent — it was restored from an old copy, so its ratchet
//! generations are used up too, and the receivers would drop what it encrypts now as a
//! replay. The SDK then resynchronises the group (a self-update commit gives it an epoch with
//! fresh secrets; a rejoin if its epoch is gone), encrypts every message it has queued for the
//! group again with counters above the hub's, and sends them in their places.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use roost_protocol::content::Content;
use roost_protocol::messages::delivery::{
    FetchGroupInfoRequest, SendCountedRequest, SendMessageRequest, SendMessageResponse,
};
use roost_protocol::{ErrorCode, ErrorDetail, GroupId};

use super::groups::Intent;
use super::inbox::Outcome;
use super::{Client, Inner};
use crate::error::ClientError;
use crate::event::{Event, StoredOutgoingState};
use crate::mls::Mls;
use crate::outgoing::{MessageId, OutgoingMessage, OutgoingState, SendFailure};
use crate::store::{Changes, OutgoingChange, OutgoingRecord};
use crate::transport::{Connection, RequestError, TransportError};

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
            let message = inner.mls_op(&mls, |mls| {
                mls.encrypt(&inner.identity, group, id.as_u64(), bytes)
            })?;
            let record = OutgoingRecord {
                id: id.as_u64(),
                group: group.clone(),
                queued_at_ms: now_ms(),
                message: message.into(),
                plaintext: bytes.into(),
                state: StoredOutgoingState::Queued,
                // Given by the store in the transaction that queues it.
                counter: 0,
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
    /// sent or failed). Fails when a message is still queued and cannot go now: with the
    /// transport error if the homeserver cannot be reached, or with the answer that makes it
    /// wait (UNAVAILABLE, RATE_LIMITED, or STALE_EPOCH while a group of another domain waits
    /// for commits on their way, [`ClientConfig::rejoin_after`](crate::ClientConfig::rejoin_after)).
    /// Either way the messages stay queued and the background task keeps trying; a message
    /// that can never be sent is no error here: its state becomes `Failed`.
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
    ///
    /// The connection is made before the state lock is taken: while the homeserver is
    /// unreachable, connection attempts (which take seconds) never hold up `send_*` or the
    /// processing of incoming messages.
    pub(crate) async fn deliver_queued(&self) -> Result<(), ClientError> {
        let mut reconnected = false;
        loop {
            if self.store.next_queued()?.is_none() {
                return Ok(());
            }
            let connection = self.conn.connection().await?;
            let mut outcome = Outcome::default();
            let delivered = {
                let mls = self.state.lock().await;
                let Some((position, record)) = self.store.next_queued()? else {
                    return Ok(());
                };
                self.deliver_locked(&mls, &connection, position, record, &mut outcome)
                    .await
            };
            self.follow_up(outcome).await;
            match delivered? {
                Delivered::Done => {}
                // The connection failed under the message (its answer may be lost): connect
                // again, outside the lock, and send the same bytes once more.
                Delivered::Later(ClientError::Request(RequestError::Transport(_)))
                    if !reconnected =>
                {
                    reconnected = true;
                }
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
            let connection = self.conn.connection().await?;
            let delivered = self
                .deliver_locked(mls, &connection, position, record, outcome)
                .await?;
            if let Delivered::Later(err) = delivered {
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
        connection: &Connection,
        position: u64,
        mut record: OutgoingRecord,
        outcome: &mut Outcome,
    ) -> Result<Delivered, ClientError> {
        let group = record.group.clone();
        let mut resent = false;
        let mut refused_for_epoch = 0;
        let mut refused_for_counter = 0;
        loop {
            if self.check_member(mls, &group).is_err() {
                return self.settle_outgoing(
                    mls,
                    position,
                    record,
                    Some(SendFailure::RemovedFromGroup),
                );
            }
            let mut answer = send_request(connection, &record).await;
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
                    let ours = mls.epoch(&group)?;
                    if ours < current {
                        // Still behind after processing everything queued for us: the
                        // commits are still on their way (from another domain's hub), or
                        // what we missed is gone (an old profile copy, or offline past the
                        // queue's age limit). Wait for them a while; then rejoin and send at
                        // the new epoch.
                        if !self.gave_up_waiting(&group, ours) {
                            tracing::debug!(%group, ours, current, "behind the hub: waiting for the commits on their way");
                            return Ok(Delivered::Later(err.into()));
                        }
                        tracing::info!(%group, "behind the hub with nothing left to process: rejoining");
                        self.rejoin_locked(mls, &group, outcome).await?;
                    }
                    self.caught_up(&group);
                    // This message and every one queued behind it for the group, in queue
                    // order: those behind may have been encrypted at the current epoch while
                    // this one waited, and this one must not go out with a later generation
                    // of the epoch than they have (a receiver drops a generation more than a
                    // few behind the newest it read as a replay).
                    record = self.encrypt_queue_again(mls, &group, position, None)?;
                    resent = false;
                }
                Some(ErrorCode::SEND_COUNTER_USED) => {
                    // Not taken: this profile's state is older than what it already sent.
                    refused_for_counter += 1;
                    if refused_for_counter > self.config.max_commit_attempts.max(1) {
                        return self.settle_outgoing(
                            mls,
                            position,
                            record,
                            Some(SendFailure::TooManyAttempts),
                        );
                    }
                    let highest = match err.wire_error().map(|e| &e.detail) {
                        Some(ErrorDetail::SendCounterUsed { highest_counter }) => *highest_counter,
                        _ => 0,
                    };
                    tracing::warn!(%group, highest, "send counter used: this profile was restored from an old copy; resynchronising the group");
                    if !self.resync_locked(mls, &group, outcome).await? {
                        return Ok(Delivered::Later(err.into()));
                    }
                    if self.check_member(mls, &group).is_err() {
                        continue;
                    }
                    record = self.encrypt_queue_again(mls, &group, position, Some(highest))?;
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

    /// Gives `group` an epoch whose secrets this profile never used (after SEND_COUNTER_USED):
    /// catches up on what is queued for us; rejoins if the hub is still ahead (what we missed
    /// is gone, once [`Inner::gave_up_waiting`] says so), else commits a self-update. False:
    /// still waiting for commits on their way (nothing changed).
    async fn resync_locked(
        &self,
        mls: &Mls,
        group: &GroupId,
        outcome: &mut Outcome,
    ) -> Result<bool, ClientError> {
        self.sync_into(mls, outcome).await?;
        if self.check_member(mls, group).is_err() {
            return Ok(true);
        }
        let hub = self
            .conn
            .call(FetchGroupInfoRequest {
                group: group.clone(),
            })
            .await?;
        let ours = mls.epoch(group)?;
        if ours < hub.epoch {
            if !self.gave_up_waiting(group, ours) {
                return Ok(false);
            }
            tracing::info!(%group, "behind the hub with nothing left to process: rejoining");
            self.rejoin_locked(mls, group, outcome).await?;
            self.caught_up(group);
            return Ok(true);
        }
        self.caught_up(group);
        Box::pin(self.commit_locked(mls, group, &Intent::Update, outcome)).await?;
        Ok(true)
    }

    /// Whether to stop waiting for the commits that would bring `group` from epoch `ours` up
    /// to the hub's, and rejoin: at once for a group hosted on this client's homeserver (a
    /// commit is in our queue before the hub answers anyone), else once the group has stayed
    /// at `ours` for [`ClientConfig::rejoin_after`](crate::ClientConfig::rejoin_after).
    fn gave_up_waiting(&self, group: &GroupId, ours: u64) -> bool {
        if group.domain == *self.identity.client.domain() {
            return true;
        }
        let now = std::time::Instant::now();
        let mut behind = self.behind.lock().unwrap_or_else(|e| e.into_inner());
        match behind.get(group) {
            Some(&(epoch, since)) if epoch == ours => {
                now.duration_since(since) >= self.config.rejoin_after
            }
            _ => {
                behind.insert(group.clone(), (ours, now));
                self.config.rejoin_after.is_zero()
            }
        }
    }

    /// `group` is no longer behind the hub.
    fn caught_up(&self, group: &GroupId) {
        self.behind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(group);
    }

    /// Encrypts every message queued for `group` again, in queue order, at the group's current
    /// epoch, in one transaction; with `highest` (after SEND_COUNTER_USED) with fresh send
    /// counters above it (and above every counter this profile gave), else each keeps its
    /// counter. Returns the record at `position` as it is now.
    fn encrypt_queue_again(
        &self,
        mls: &Mls,
        group: &GroupId,
        position: u64,
        highest: Option<u64>,
    ) -> Result<OutgoingRecord, ClientError> {
        let mut next = match highest {
            Some(highest) => Some(self.store.next_counter()?.max(highest.saturating_add(1))),
            None => None,
        };
        let mut changes = Changes::default();
        let mut current = None;
        for (at, mut record) in self.store.outbox()? {
            if record.group != *group || !matches!(record.state, StoredOutgoingState::Queued) {
                continue;
            }
            let message = self.mls_op(mls, |mls| {
                mls.encrypt(
                    &self.identity,
                    group,
                    record.id,
                    record.plaintext.as_slice(),
                )
            })?;
            record.message = message.into();
            if let Some(counter) = next.as_mut() {
                record.counter = *counter;
                *counter = counter.saturating_add(1);
            }
            if at == position {
                current = Some(record.clone());
            }
            changes.outgoing.push(OutgoingChange::Put(at, record));
        }
        changes.next_counter = next;
        self.commit(mls, changes)?;
        current.ok_or_else(|| ClientError::InvalidOperation("queued message vanished".into()))
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

/// Sends a queued message: as SendCounted with its counter, or as SendMessage if it has none
/// (queued before counters were kept) or the hub does not know SendCounted (MALFORMED: a
/// server from before it; PROTOCOL.md §11).
async fn send_request(
    connection: &Connection,
    record: &OutgoingRecord,
) -> Result<SendMessageResponse, RequestError> {
    if record.counter != 0 {
        let counted = connection
            .call(SendCountedRequest {
                group: record.group.clone(),
                counter: record.counter,
                message: record.message.clone(),
            })
            .await;
        if server_code_is(&counted, ErrorCode::MALFORMED) {
            tracing::debug!(group = %record.group, "the hub does not know SendCounted: sending uncounted");
        } else {
            return counted;
        }
    }
    connection
        .call(SendMessageRequest {
            group: record.group.clone(),
            message: record.message.clone(),
        })
        .await
}

fn server_code_is<T>(answer: &Result<T, RequestError>, code: ErrorCode) -> bool {
    matches!(answer, Err(err) if server_code(err) == Some(code))
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
