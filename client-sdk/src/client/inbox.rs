//! Incoming queue messages: the background listener, [`Inner::sync_locked`], and the
//! processing of each message.
//!
//! A message is processed at most once: its effect (new epoch, joined group, decrypted
//! message as an event) and its seq as the last processed one are written in one database
//! transaction, messages with a seq at or below it are skipped, and the queue is acknowledged
//! only up to it. A message that cannot be processed for good (undecryptable, invalid,
//! refused credential) is consumed with an event saying so; one that cannot be processed
//! *now* (network or disk failure while checking it) stops processing without consuming it.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use roost_protocol::GroupId;
use roost_protocol::messages::queue::{
    GroupMessage, ListenEvent, QueueAckRequest, QueueFetchRequest, QueueMessage, QueuePayload,
};

use super::Inner;
use crate::error::ClientError;
use crate::event::Event;
use crate::mls::{Incoming, Mls, MlsError};
use crate::outgoing::MessageId;
use crate::store::{Changes, GroupRecord};
use crate::transport::ListenStream;

/// Messages fetched per QueueFetch.
const FETCH_BATCH: u32 = 256;
/// Payload bytes asked for per QueueFetch.
const FETCH_BYTES: u32 = 4 * 1024 * 1024;

/// Work that processing found for later, outside the state lock.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Groups where members asked to leave (their leaf indices): the remaining member with
    /// the lowest leaf index commits their removal.
    pub(crate) leaves: BTreeMap<GroupId, Vec<u32>>,
    /// Groups this client fell behind in: rejoin by external commit.
    /// (with the epoch of the message that showed it: no rejoin if the group got there by
    /// other means meanwhile, e.g. a rejoin the outgoing queue made).
    pub(crate) rejoin: BTreeMap<GroupId, u64>,
    /// A Welcome consumed one of our KeyPackages.
    pub(crate) replenish: bool,
}

impl Outcome {
    fn is_empty(&self) -> bool {
        self.leaves.is_empty() && self.rejoin.is_empty() && !self.replenish
    }
}

/// Keeps a listen stream open while the client lives and processes what arrives.
pub(crate) async fn listen_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let retry = inner.config.listen_retry;
        let opened = inner.open_listen().await;
        drop(inner);
        let mut lived = Duration::ZERO;
        match opened {
            Ok(mut stream) => {
                let opened_at = Instant::now();
                while let Some(event) = stream.next().await {
                    let Some(inner) = weak.upgrade() else { return };
                    match event {
                        Ok(ListenEvent::Message(message)) => {
                            if let Err(err) =
                                inner.handle_incoming(vec![message], &mut stream).await
                            {
                                tracing::warn!(%err, "cannot process a queued message now");
                                break;
                            }
                        }
                        Ok(ListenEvent::Closed(err)) => {
                            tracing::debug!(%err, "the server ended the listen stream");
                            break;
                        }
                        Err(err) => {
                            tracing::debug!(%err, "listen stream failed");
                            break;
                        }
                    }
                }
                lived = opened_at.elapsed();
            }
            Err(err) => tracing::debug!(%err, "cannot listen"),
        }
        tokio::time::sleep(reopen_delay(lived, retry)).await;
    }
}

/// How long to wait before listening again after a listen stream that was open for `lived`
/// ended (zero if it never opened). A stream that served for at least `retry` is reopened at
/// once: the server went away (restart, lost connection) and the backlog is waiting. One that
/// failed sooner waits `retry`, so a server that keeps refusing or ending streams is asked
/// at most once per `retry`.
fn reopen_delay(lived: Duration, retry: Duration) -> Duration {
    if lived >= retry {
        Duration::ZERO
    } else {
        retry
    }
}

impl Inner {
    /// Connects (authenticating), tops up KeyPackages and listens after the last processed
    /// seq (the server sends the backlog first).
    async fn open_listen(&self) -> Result<ListenStream, ClientError> {
        let connection = self.conn.connection().await?;
        if let Err(err) = self.ensure_key_packages().await {
            tracing::warn!(%err, "cannot replenish KeyPackages");
        }
        let after = self.store.last_seq()?;
        let stream = connection.listen(after).await?;
        // An ack written on the previous stream may not have been applied (the server ends a
        // stream whose ack fails): the next processed message acknowledges everything again.
        self.acked.store(0, Ordering::Relaxed);
        Ok(stream)
    }

    /// Processes messages that arrived on the listen stream and acknowledges them on it.
    async fn handle_incoming(
        &self,
        messages: Vec<QueueMessage>,
        stream: &mut ListenStream,
    ) -> Result<(), ClientError> {
        let mut outcome = Outcome::default();
        {
            let mls = self.state.lock().await;
            self.process_locked(&mls, messages, &mut outcome).await?;
        }
        self.ack_on(stream).await;
        self.follow_up(outcome).await;
        Ok(())
    }

    /// Acknowledges the queue up to the last processed seq on the listen stream: one frame,
    /// no round trip. The server applies it durably or ends the stream; the listen that
    /// replaces it acknowledges again from scratch (see [`Inner::open_listen`]).
    async fn ack_on(&self, stream: &mut ListenStream) {
        let Ok(seq) = self.store.last_seq() else {
            return;
        };
        if seq <= self.acked.load(Ordering::Relaxed) {
            return;
        }
        match stream.ack(seq).await {
            Ok(()) => {
                self.acked.fetch_max(seq, Ordering::Relaxed);
            }
            Err(err) => tracing::debug!(%err, "queue ack on the listen stream failed"),
        }
    }

    /// Fetches and processes everything queued after the last processed seq.
    pub(crate) async fn sync_locked(&self, mls: &Mls) -> Result<Outcome, ClientError> {
        let mut outcome = Outcome::default();
        self.sync_into(mls, &mut outcome).await?;
        Ok(outcome)
    }

    pub(crate) async fn sync_into(
        &self,
        mls: &Mls,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        loop {
            let after = self.store.last_seq()?;
            let fetched = self
                .conn
                .call(QueueFetchRequest {
                    after_seq: after,
                    max_messages: FETCH_BATCH,
                    max_bytes: FETCH_BYTES,
                })
                .await?;
            if fetched.messages.is_empty() {
                return Ok(());
            }
            self.process_locked(mls, fetched.messages, outcome).await?;
        }
    }

    async fn process_locked(
        &self,
        mls: &Mls,
        messages: Vec<QueueMessage>,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        // Our own commit first: what others sent after it is of its epoch.
        if !messages.is_empty() {
            self.settle_all_pending(mls).await?;
        }
        for message in messages {
            if message.seq <= self.store.last_seq()? {
                continue;
            }
            let seq = message.seq;
            let result = match message.payload {
                QueuePayload::Welcome(welcome) => {
                    self.process_welcome(mls, seq, welcome, outcome).await
                }
                QueuePayload::GroupMessage(group_message) => {
                    self.process_group_message(mls, seq, group_message, outcome)
                        .await
                }
            };
            if let Err(err) = result {
                mls.store().discard();
                return Err(err);
            }
        }
        Ok(())
    }

    /// Drops the uncommitted MLS state and records `event` with the message's seq.
    fn consume_with(
        &self,
        mls: &Mls,
        seq: u64,
        event: Option<Event>,
        verified: Vec<(roost_protocol::ClientId, Vec<u8>, u64)>,
    ) -> Result<(), ClientError> {
        mls.store().discard();
        let mut changes = Changes {
            last_seq: Some(seq),
            verified,
            ..Changes::default()
        };
        changes.events.extend(event);
        self.commit(mls, changes)
    }

    async fn process_welcome(
        &self,
        mls: &Mls,
        seq: u64,
        welcome: GroupMessage,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        // A Welcome to a group this client is in: a copy of the one it joined with (delivered
        // twice: a redelivery, or a repeat the hub fanned out again after its receipt window).
        // Its KeyPackage is used up, and joining again would put the group back to the
        // Welcome's epoch: consumed without an event. (A removal drops the group first, so a
        // Welcome that adds this client back is processed.)
        if self.check_member(mls, &welcome.group).is_ok() {
            tracing::debug!(group = %welcome.group, "a Welcome to a group we are in: dropped");
            return self.consume_with(mls, seq, None, Vec::new());
        }
        let join = match mls.process_welcome(welcome.message.as_slice()) {
            Ok(join) if join.group == welcome.group => join,
            Ok(_) => {
                let event = Event::GroupError {
                    group: welcome.group,
                    reason: "a Welcome named another group than its queue entry".into(),
                };
                return self.consume_with(mls, seq, Some(event), Vec::new());
            }
            Err(MlsError::Storage(err)) => return Err(MlsError::Storage(err).into()),
            Err(err) => {
                let event = Event::GroupError {
                    group: welcome.group,
                    reason: format!("cannot join: {err}"),
                };
                return self.consume_with(mls, seq, Some(event), Vec::new());
            }
        };
        let mut changes = Changes {
            last_seq: Some(seq),
            ..Changes::default()
        };
        for leaf in &join.members {
            let checked = self
                .verifier
                .verify(&self.conn, &self.store, leaf, None, &mut changes)
                .await?;
            if let Err(rejection) = checked {
                let event = Event::CredentialRejected {
                    group: join.group.clone(),
                    client: rejection.client,
                    reason: format!("Welcome refused: {}", rejection.reason),
                };
                return self.consume_with(mls, seq, Some(event), Vec::new());
            }
        }
        let Some(inviter) = join.inviter.client.clone() else {
            let event = Event::GroupError {
                group: join.group.clone(),
                reason: "the Welcome's sender has no ClientId".into(),
            };
            return self.consume_with(mls, seq, Some(event), Vec::new());
        };
        let group = join.group.clone();
        let joined_epoch = match mls.finish_join(join).and_then(|()| mls.epoch(&group)) {
            Ok(epoch) => epoch,
            Err(MlsError::Storage(err)) => return Err(MlsError::Storage(err).into()),
            Err(err) => {
                let event = Event::GroupError {
                    group,
                    reason: format!("cannot join: {err}"),
                };
                return self.consume_with(mls, seq, Some(event), Vec::new());
            }
        };
        tracing::debug!(%group, seq, joined_epoch, "joined from a Welcome");
        changes
            .groups
            .push((group.clone(), Some(GroupRecord::joined(joined_epoch))));
        changes.event(Event::Joined { group, inviter });
        outcome.replenish = true;
        self.commit(mls, changes)
    }

    async fn process_group_message(
        &self,
        mls: &Mls,
        seq: u64,
        message: GroupMessage,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let group = message.group;
        let record = match self.store.group(&group)? {
            Some(record) if mls.has_group(&group)? => record,
            // A group we left or were never in (e.g. a message sent just before we left).
            _ => {
                tracing::debug!(%group, seq, "dropped a message of a group we are not in");
                return self.consume_with(mls, seq, None, Vec::new());
            }
        };
        if let Some(epoch) = crate::mls::private_message_epoch(message.message.as_slice())
            && epoch < record.joined_epoch
        {
            // Sent before we joined (a hub that fans such messages out to later members):
            // never meant for us, and unreadable.
            tracing::debug!(%group, epoch, joined = record.joined_epoch, "skipped a message from before we joined");
            return self.consume_with(mls, seq, None, Vec::new());
        }
        let error = |reason: String| Event::GroupError {
            group: group.clone(),
            reason,
        };
        let incoming = match mls.process(&group, message.message.as_slice()) {
            Ok(incoming) => incoming,
            Err(MlsError::Stale { ours, theirs }) => {
                tracing::debug!(%group, seq, ours, theirs, "dropped a handshake message of a past epoch");
                return self.consume_with(mls, seq, None, Vec::new());
            }
            Err(MlsError::Replayed) => {
                // Delivered twice (a retry the hub could not recognise, a redelivery): the
                // first copy was shown already.
                tracing::debug!(%group, seq, "dropped a copy of a message processed before");
                return self.consume_with(mls, seq, None, Vec::new());
            }
            Err(MlsError::Behind { ours, theirs }) => {
                // What we missed is gone from our queue: rejoin (one Event::Rejoined once it
                // worked, a GroupError if it cannot be done).
                tracing::info!(%group, ours, theirs, "fell behind the group: rejoining");
                let seen = outcome.rejoin.entry(group.clone()).or_default();
                *seen = (*seen).max(theirs);
                return self.consume_with(mls, seq, None, Vec::new());
            }
            Err(MlsError::Storage(err)) => return Err(MlsError::Storage(err).into()),
            Err(err) => {
                return self.consume_with(mls, seq, Some(error(err.to_string())), Vec::new());
            }
        };
        let mut changes = Changes {
            last_seq: Some(seq),
            ..Changes::default()
        };
        match incoming {
            Incoming::Application {
                sender,
                message_id,
                bytes,
            } => match sender.client {
                Some(sender) => {
                    let key = message_id.map(|id| crate::store::seen_key(&group, &sender, id));
                    match key {
                        Some(key) if self.store.seen(&key)? => {
                            // The same message encrypted again (a sender restored from an
                            // old profile copy resending what its newer copy sent): shown
                            // once already.
                            tracing::debug!(%group, %sender, seq, "dropped a message whose id was received before");
                        }
                        key => {
                            changes.seen.extend(key);
                            changes.event(Event::Message {
                                group,
                                sender,
                                id: message_id.map(MessageId::from_u64),
                                bytes,
                            });
                        }
                    }
                }
                None => changes.event(error("a message from a leaf without ClientId".into())),
            },
            Incoming::Proposal {
                sender,
                self_remove,
            } => {
                if self_remove {
                    outcome.leaves.entry(group).or_default().push(sender.index);
                }
            }
            Incoming::Commit(commit) => {
                for leaf in &commit.to_verify {
                    let checked = self
                        .verifier
                        .verify(&self.conn, &self.store, leaf, None, &mut changes)
                        .await?;
                    if let Err(rejection) = checked {
                        let event = Event::CredentialRejected {
                            group: group.clone(),
                            client: rejection.client,
                            reason: format!("commit refused: {}", rejection.reason),
                        };
                        return self.consume_with(mls, seq, Some(event), Vec::new());
                    }
                }
                let Some(by) = commit.committer.client.clone() else {
                    let event = error("a commit from a leaf without ClientId".into());
                    return self.consume_with(mls, seq, Some(event), Vec::new());
                };
                let external = commit.committer.index == u32::MAX;
                let mut added: Vec<_> = commit
                    .added
                    .iter()
                    .filter_map(|l| l.client.clone())
                    .collect();
                let removed_all: Vec<_> = commit
                    .removed
                    .iter()
                    .filter_map(|l| l.client.clone())
                    .collect();
                // A member rejoining by external commit replaces its own old leaf.
                let rejoined = external && removed_all.contains(&by);
                let left: Vec<_> = commit
                    .left
                    .iter()
                    .filter_map(|l| l.client.clone())
                    .collect();
                let removed: Vec<_> = removed_all
                    .into_iter()
                    .filter(|c| *c != by && !left.contains(c))
                    .collect();
                let we_left = left.contains(&self.identity.client);
                if external && !rejoined {
                    added.push(by.clone());
                }
                let self_removed = commit.self_removed;
                if let Err(err) = mls.merge_commit(commit) {
                    return self.consume_with(mls, seq, Some(error(err.to_string())), Vec::new());
                }
                if self_removed {
                    mls.delete_group(&group)?;
                    changes.groups.push((group.clone(), None));
                    if we_left {
                        changes.event(Event::LeftGroup { group, by });
                    } else {
                        changes.event(Event::RemovedFromGroup { group, by });
                    }
                } else {
                    if rejoined {
                        changes.event(Event::MemberRejoined {
                            group: group.clone(),
                            member: by.clone(),
                        });
                    }
                    if !added.is_empty() {
                        changes.event(Event::MembersAdded {
                            group: group.clone(),
                            by: by.clone(),
                            members: added,
                        });
                    }
                    if !left.is_empty() {
                        changes.event(Event::MembersLeft {
                            group: group.clone(),
                            by: by.clone(),
                            members: left,
                        });
                    }
                    if !removed.is_empty() {
                        changes.event(Event::MembersRemoved {
                            group,
                            by,
                            members: removed,
                        });
                    }
                }
            }
        }
        self.commit(mls, changes)
    }

    /// Acknowledges the queue up to the last processed seq (best effort: a failed ack is
    /// repeated next time, and re-delivered messages are skipped by seq).
    pub(crate) async fn ack(&self) {
        let Ok(seq) = self.store.last_seq() else {
            return;
        };
        if seq <= self.acked.load(Ordering::Relaxed) {
            return;
        }
        match self.conn.call(QueueAckRequest { up_to_seq: seq }).await {
            Ok(_) => {
                self.acked.fetch_max(seq, Ordering::Relaxed);
            }
            Err(err) => tracing::debug!(%err, "queue ack failed"),
        }
    }

    /// Does what processing asked for: commit pending leaves, rejoin groups we fell behind
    /// in, replenish KeyPackages. Failures are logged (and surface as events where they
    /// concern a group).
    pub(crate) async fn follow_up(&self, outcome: Outcome) {
        let mut pending = outcome;
        for _ in 0..4 {
            if pending.is_empty() {
                return;
            }
            let mut next = Outcome::default();
            for (group, leavers) in std::mem::take(&mut pending.leaves) {
                if let Err(err) = self.commit_leaves(&group, &leavers, &mut next).await {
                    tracing::warn!(%err, %group, "cannot commit a pending leave");
                }
            }
            for (group, epoch) in std::mem::take(&mut pending.rejoin) {
                if let Err(err) = self.rejoin_if_behind(&group, epoch, &mut next).await {
                    tracing::warn!(%err, %group, "cannot rejoin");
                    let transient = matches!(&err, ClientError::Request(e) if e.is_transient());
                    if !transient {
                        let mut changes = Changes::default();
                        changes.event(Event::GroupError {
                            group: group.clone(),
                            reason: format!("fell behind the group and cannot rejoin: {err}"),
                        });
                        let mls = self.state.lock().await;
                        if let Err(err) = self.commit(&mls, changes) {
                            tracing::warn!(%err, "cannot record an event");
                        }
                    }
                }
            }
            if pending.replenish
                && let Err(err) = self.ensure_key_packages().await
            {
                tracing::warn!(%err, "cannot replenish KeyPackages");
            }
            self.ack().await;
            pending = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_lived_stream_is_reopened_at_once_a_failing_one_after_the_retry_delay() {
        let retry = Duration::from_secs(1);
        assert_eq!(reopen_delay(Duration::from_secs(60), retry), Duration::ZERO);
        assert_eq!(reopen_delay(retry, retry), Duration::ZERO);
        assert_eq!(reopen_delay(Duration::from_millis(20), retry), retry);
        // Never opened.
        assert_eq!(reopen_delay(Duration::ZERO, retry), retry);
        assert_eq!(reopen_delay(Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }
}
