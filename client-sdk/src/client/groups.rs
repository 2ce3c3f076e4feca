//! Group operations of [`Client`] and the commit machinery behind them.
//!
//! A commit is built on the local state, sent, and merged only once the DS accepted it. If
//! the DS answers STALE_EPOCH (someone else's commit won the epoch) or MISSING_PROPOSALS
//! (a proposal we had not seen yet), the commit is dropped, the queue is processed up to the
//! DS's epoch and the commit is rebuilt from the caller's intent on the new state, up to
//! [`ClientConfig::max_commit_attempts`](crate::ClientConfig::max_commit_attempts) times.
//!
//! Before a commit leaves, it is made durable in the profile as the group's *pending commit*
//! (the request bytes and the state writes of merging it, set aside; see
//! [`Store::stash_pending`](crate::store::Store)). If the answer is lost, the same bytes are
//! sent again: the DS answers a commit it applied with its original answer (idempotent
//! submission, PROTOCOL.md §7.4). If the app dies before the outcome is known, the next start
//! (or the next operation) sends it again and merges it once accepted, so the client never
//! falls behind its own commit and never rejoins for it.

use std::collections::BTreeSet;

use roost_protocol::messages::auth::DiscoverUserRequest;
use roost_protocol::messages::delivery::{
    CommitRequest, CreateGroupRequest, ExternalJoinRequest, FetchGroupInfoRequest,
    LeaveGroupRequest,
};
use roost_protocol::messages::keypackage::{
    ClaimClientKeyPackageRequest, ClaimUserKeyPackagesRequest, ClaimedKeyPackage,
};
use roost_protocol::{ClientId, ErrorCode, GroupId, UserId};

use super::inbox::Outcome;
use super::{Client, Inner};
use crate::error::ClientError;
use crate::event::Event;
use crate::mls::{Mls, ValidKeyPackage};
use crate::store::{Changes, GroupRecord, PendingCommit, PendingKind};
use crate::transport::RequestError;

/// How a pending commit was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The DS accepted it; it is merged.
    Merged,
    /// The DS refused it for its epoch; it is dropped.
    Refused,
}

/// What a commit is meant to achieve; re-evaluated on the current state at every attempt.
#[derive(Debug)]
pub(crate) enum Intent {
    /// Add these (verified) KeyPackages' clients, unless they are members already.
    Add(Vec<ValidKeyPackage>),
    /// Remove these clients, if they are still members.
    Remove(BTreeSet<ClientId>),
    /// Commit the pending proposals.
    Pending,
    /// A self-update (a commit with a path and whatever proposals are pending): the group's
    /// next epoch has fresh secrets, which is how a client whose state was restored from an
    /// old copy stops reusing ratchet generations (outbox.rs). Messages queued for the group
    /// are not delivered before it: they are encrypted again after it.
    Update,
    /// A self-update the app asked for ([`Client::update_keys`]): like [`Intent::Update`],
    /// but the messages queued for the group go out first, at the epoch they were encrypted
    /// for, as before any other commit.
    Rotate,
}

fn server_code(err: &RequestError) -> Option<ErrorCode> {
    err.wire_error().map(|e| e.code)
}

fn new_group_id(domain: roost_protocol::Domain) -> GroupId {
    let mut uuid: [u8; 16] = rand::random();
    // UUID version 4, RFC 4122 variant.
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    GroupId::new(uuid, domain)
}

impl Client {
    /// Creates a group on this user's homeserver with this client as its only member.
    pub async fn create_group(&self) -> Result<GroupId, ClientError> {
        let inner = &self.inner;
        let mls = inner.state.lock().await;
        let group = new_group_id(inner.profile.client.domain().clone());
        let (group_info, ratchet_tree) =
            inner.mls_op(&mls, |mls| mls.create_group(&inner.identity, &group))?;
        let request = CreateGroupRequest {
            group: group.clone(),
            group_info: group_info.into(),
            ratchet_tree: ratchet_tree.into(),
        };
        if let Err(err) = inner.conn.call(request).await {
            mls.store().discard();
            return Err(err.into());
        }
        inner.commit(
            &mls,
            Changes {
                groups: vec![(group.clone(), Some(GroupRecord::joined(0)))],
                ..Changes::default()
            },
        )?;
        Ok(group)
    }

    /// Adds every current client of each of `users` that is not a member yet: claims a
    /// KeyPackage for each, checks it against the client's AS credential (refused ones are
    /// left out and reported as [`Event::CredentialRejected`]), commits the adds and has the
    /// DS deliver the Welcome. Returns the clients added.
    pub async fn invite(
        &self,
        group: &GroupId,
        users: &[UserId],
    ) -> Result<Vec<ClientId>, ClientError> {
        let inner = &self.inner;
        let mut outcome = Outcome::default();
        let added = {
            let mls = inner.state.lock().await;
            inner.check_member(&mls, group)?;
            let adds = inner.claim_key_packages(&mls, group, users).await?;
            inner
                .commit_locked(&mls, group, &Intent::Add(adds), &mut outcome)
                .await?
        };
        inner.follow_up(outcome).await;
        Ok(added)
    }

    /// Removes every client of each of `users` from the group. Returns the clients removed.
    /// To remove this client itself, use [`Client::leave_group`].
    pub async fn remove_users(
        &self,
        group: &GroupId,
        users: &[UserId],
    ) -> Result<Vec<ClientId>, ClientError> {
        let inner = &self.inner;
        let mut outcome = Outcome::default();
        let removed = {
            let mls = inner.state.lock().await;
            inner.check_member(&mls, group)?;
            let targets: BTreeSet<ClientId> = mls
                .members(group)?
                .into_iter()
                .filter_map(|leaf| leaf.client)
                .filter(|client| users.contains(&client.user))
                .collect();
            if targets.contains(&inner.profile.client) {
                return Err(ClientError::InvalidOperation(
                    "a client cannot remove itself: use leave_group".into(),
                ));
            }
            inner
                .commit_locked(&mls, group, &Intent::Remove(targets), &mut outcome)
                .await?
        };
        inner.follow_up(outcome).await;
        Ok(removed)
    }

    /// Asks to leave the group: sends a proposal removing this client, which the next commit
    /// of another member applies (the SDK of the remaining member with the lowest leaf index
    /// commits it at once). This client gets [`Event::RemovedFromGroup`] then. The last
    /// member just forgets the group.
    pub async fn leave_group(&self, group: &GroupId) -> Result<(), ClientError> {
        let inner = &self.inner;
        let mut outcome = Outcome::default();
        {
            let mls = inner.state.lock().await;
            inner.check_member(&mls, group)?;
            if mls.members(group)?.len() <= 1 {
                inner.mls_op(&mls, |mls| mls.delete_group(group))?;
                let changes = Changes {
                    groups: vec![(group.clone(), None)],
                    ..Changes::default()
                };
                return inner.commit(&mls, changes);
            }
            let mut sent = false;
            for _ in 0..inner.config.max_commit_attempts.max(1) {
                if inner.check_member(&mls, group).is_err() {
                    // Removed meanwhile: that is what we wanted.
                    sent = true;
                    break;
                }
                let proposal = inner.mls_op(&mls, |mls| mls.leave(&inner.identity, group))?;
                let request = LeaveGroupRequest {
                    group: group.clone(),
                    proposal: proposal.into(),
                };
                match inner.conn.call(request).await {
                    Ok(_) => {
                        let joined_epoch = inner.store.group(group)?.map_or(0, |r| r.joined_epoch);
                        let record = GroupRecord {
                            leaving: 1,
                            joined_epoch,
                        };
                        let changes = Changes {
                            groups: vec![(group.clone(), Some(record))],
                            ..Changes::default()
                        };
                        inner.commit(&mls, changes)?;
                        sent = true;
                        break;
                    }
                    Err(err) if server_code(&err) == Some(ErrorCode::STALE_EPOCH) => {
                        mls.store().discard();
                        inner.sync_into(&mls, &mut outcome).await?;
                    }
                    Err(err) => {
                        mls.store().discard();
                        return Err(err.into());
                    }
                }
            }
            if !sent {
                return Err(ClientError::TooManyAttempts(
                    inner.config.max_commit_attempts,
                ));
            }
        }
        inner.follow_up(outcome).await;
        Ok(())
    }

    /// Commits a self-update in `group` (a commit with a path, and whatever proposals are
    /// pending): this client's leaf gets a fresh HPKE key and the group's next epoch secrets
    /// derived from fresh randomness. Whoever copied this device's group state before (a
    /// stolen backup, a compromised device that has since been cleaned) cannot read what is
    /// sent after it: MLS's post-compromise security, which only a commit with a path from
    /// this member gives for this member's keys. Apps call it regularly (e.g. weekly per
    /// active group) and after a device was restored or suspected compromised. Messages
    /// queued for the group are delivered before it; the signature key stays (it is the
    /// device's identity at the AS). Returns the group's new epoch.
    pub async fn update_keys(&self, group: &GroupId) -> Result<u64, ClientError> {
        let inner = &self.inner;
        let mut outcome = Outcome::default();
        let epoch = {
            let mls = inner.state.lock().await;
            inner.check_member(&mls, group)?;
            inner
                .commit_locked(&mls, group, &Intent::Rotate, &mut outcome)
                .await?;
            mls.epoch(group)?
        };
        inner.follow_up(outcome).await;
        Ok(epoch)
    }

    /// Rejoins a group by external commit, replacing this client's old leaf: for when the
    /// local state is lost or fell behind (the SDK does this by itself when it receives a
    /// message of an epoch it never reached). The client must still be in the DS's tree.
    pub async fn rejoin_group(&self, group: &GroupId) -> Result<(), ClientError> {
        let mut outcome = Outcome::default();
        self.inner.rejoin(group, &mut outcome).await?;
        self.inner.follow_up(outcome).await;
        Ok(())
    }
}

/// The bounded wait of a commit for commits on their way from another domain's hub
/// ([`ClientConfig::commit_wait`](crate::ClientConfig::commit_wait)): pauses of 50 ms doubling up
/// to 1 s.
struct CommitWait {
    left: std::time::Duration,
    next: std::time::Duration,
}

impl CommitWait {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(50);
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(1);

    fn new(limit: std::time::Duration) -> Self {
        Self {
            left: limit,
            next: Self::FIRST,
        }
    }

    /// Sleeps the next pause; false (without sleeping) once the limit is spent.
    async fn pause(&mut self) -> bool {
        if self.left.is_zero() {
            return false;
        }
        let pause = self.next.min(self.left);
        tokio::time::sleep(pause).await;
        self.left -= pause;
        self.next = (self.next * 2).min(Self::LONGEST);
        true
    }
}

impl Inner {
    /// Claims and verifies one KeyPackage for every client of `users` not in the group.
    async fn claim_key_packages(
        &self,
        mls: &Mls,
        group: &GroupId,
        users: &[UserId],
    ) -> Result<Vec<ValidKeyPackage>, ClientError> {
        let members: BTreeSet<ClientId> = mls
            .members(group)?
            .into_iter()
            .filter_map(|leaf| leaf.client)
            .collect();
        let mut claimed: Vec<ClaimedKeyPackage> = Vec::new();
        for user in users {
            if members.iter().any(|m| m.user == *user) {
                // Some devices are members already: claim only for the others.
                let found = self
                    .conn
                    .call(DiscoverUserRequest { user: user.clone() })
                    .await?;
                for credential in found.clients {
                    if members.contains(&credential.client) {
                        continue;
                    }
                    let request = ClaimClientKeyPackageRequest {
                        client: credential.client.clone(),
                    };
                    match self.conn.call(request).await {
                        Ok(response) => claimed.push(response.key_package),
                        Err(err) if server_code(&err) == Some(ErrorCode::NO_KEY_PACKAGE) => {
                            tracing::warn!(client = %credential.client, "no KeyPackage to claim");
                        }
                        Err(err) => return Err(err.into()),
                    }
                }
            } else {
                let request = ClaimUserKeyPackagesRequest { user: user.clone() };
                claimed.extend(self.conn.call(request).await?.key_packages);
            }
        }
        let mut changes = Changes::default();
        let mut adds: Vec<ValidKeyPackage> = Vec::new();
        for claim in claimed {
            let owner = claim.credential.client.clone();
            if members.contains(&owner)
                || adds.iter().any(|a| a.leaf.client.as_ref() == Some(&owner))
            {
                continue;
            }
            let rejected = |reason: String| Event::CredentialRejected {
                group: group.clone(),
                client: Some(owner.clone()),
                reason,
            };
            let key_package = match mls.validate_key_package(claim.key_package.as_slice()) {
                Ok(kp) => kp,
                Err(err) => {
                    changes.event(rejected(format!("invalid KeyPackage: {err}")));
                    continue;
                }
            };
            if key_package.leaf.client.as_ref() != Some(&owner) {
                changes.event(rejected(
                    "the KeyPackage names another client than its AS credential".into(),
                ));
                continue;
            }
            let checked = self
                .verifier
                .verify(
                    &self.conn,
                    &self.store,
                    &key_package.leaf,
                    Some(&claim.credential),
                    &mut changes,
                )
                .await?;
            match checked {
                Ok(()) => adds.push(key_package),
                Err(rejection) => changes.event(rejected(rejection.reason)),
            }
        }
        if !changes.events.is_empty() || !changes.verified.is_empty() {
            self.commit(mls, changes)?;
        }
        Ok(adds)
    }

    /// Builds, sends and merges a commit for `intent`, rebuilding it after losing against a
    /// concurrent commit. Returns the clients added or removed.
    pub(crate) async fn commit_locked(
        &self,
        mls: &Mls,
        group: &GroupId,
        intent: &Intent,
        outcome: &mut Outcome,
    ) -> Result<Vec<ClientId>, ClientError> {
        self.settle_all_pending(mls).await?;
        let mut wait = CommitWait::new(self.config.commit_wait);
        // Messages queued before this commit go out before it, at the epoch they were
        // encrypted for.
        if !matches!(intent, Intent::Update) {
            loop {
                match Box::pin(self.deliver_group_locked(mls, group, outcome)).await {
                    // The group waits for commits on their way from another domain's hub.
                    Err(err)
                        if err.server_code() == Some(ErrorCode::STALE_EPOCH)
                            && group.domain != *self.identity.client.domain()
                            && wait.pause().await =>
                    {
                        self.sync_into(mls, outcome).await?;
                    }
                    result => break result?,
                }
            }
        }
        // Then process what is queued for us: the messages the hub accepts before our commit
        // are read after we merge it, so they must stay within the past epochs we keep
        // (MAX_PAST_EPOCHS in mls/mod.rs).
        self.sync_into(mls, outcome).await?;
        let attempts = self.config.max_commit_attempts.max(1);
        let mut lost = 0;
        loop {
            self.check_member(mls, group)?;
            let before = mls.epoch(group)?;
            if self.store.group(group)?.is_some_and(|r| r.leaving == 1) {
                return Err(ClientError::LeftGroup(group.clone()));
            }
            let members = mls.members(group)?;
            let is_member =
                |client: &ClientId| members.iter().any(|l| l.client.as_ref() == Some(client));
            let (adds, removes, affected) = match intent {
                Intent::Add(key_packages) => {
                    let adds: Vec<ValidKeyPackage> = key_packages
                        .iter()
                        .filter(|kp| kp.leaf.client.as_ref().is_some_and(|c| !is_member(c)))
                        .cloned()
                        .collect();
                    let affected = adds
                        .iter()
                        .filter_map(|kp| kp.leaf.client.clone())
                        .collect();
                    (adds, Vec::new(), affected)
                }
                Intent::Remove(clients) => {
                    let leaves: Vec<_> = members
                        .iter()
                        .filter(|l| l.client.as_ref().is_some_and(|c| clients.contains(c)))
                        .collect();
                    let affected = leaves.iter().filter_map(|l| l.client.clone()).collect();
                    (
                        Vec::new(),
                        leaves.iter().map(|l| l.index).collect(),
                        affected,
                    )
                }
                Intent::Pending | Intent::Update | Intent::Rotate => {
                    (Vec::new(), Vec::new(), mls.pending_removed(group)?)
                }
            };
            let update = matches!(intent, Intent::Update | Intent::Rotate);
            if !update
                && adds.is_empty()
                && removes.is_empty()
                && !mls.has_pending_proposals(group)?
            {
                return Ok(Vec::new());
            }
            let out = self.mls_op(mls, |mls| {
                mls.commit(&self.identity, group, adds, removes, update)
            })?;
            // Durable before it leaves: from here on a crash leaves it pending, not lost.
            let mut record = PendingCommit::new(
                PendingKind::Commit,
                out.commit.into(),
                out.welcome.map(Into::into),
                out.group_info.into(),
                out.context.into(),
            );
            match intent {
                Intent::Add(_) => record.added.clone_from(&affected),
                Intent::Remove(_) => record.removed.clone_from(&affected),
                Intent::Pending | Intent::Update | Intent::Rotate => {}
            }
            let pending = self.store.stash_pending(group, record)?;
            match self.settle_pending(mls, group, pending, false).await? {
                Settled::Merged => return Ok(affected),
                Settled::Refused => {}
            }
            self.sync_into(mls, outcome).await?;
            let moved = mls.epoch(group).map_or(true, |epoch| epoch != before);
            if !moved && group.domain != *self.identity.client.domain() {
                // Refused, yet nothing new for us: the commits that moved the hub on are on
                // their way from another domain's hub. Wait for them (bounded), then again.
                if !wait.pause().await {
                    return Err(ClientError::TooManyAttempts(attempts));
                }
                self.sync_into(mls, outcome).await?;
                continue;
            }
            // Lost against a commit we have now processed (on our own homeserver, a refused
            // commit's winner is in our queue before the refusal).
            lost += 1;
            if lost >= attempts {
                return Err(ClientError::TooManyAttempts(attempts));
            }
        }
    }

    /// Sends `group`'s pending commit (again: the same bytes) and settles it by the DS's
    /// answer: accepted (first time or as a repeat) → merged; refused for the epoch
    /// (STALE_EPOCH, MISSING_PROPOSALS: someone else's commit won) → dropped, unless the DS's
    /// GroupInfo shows it is ours after all (a server without receipts, or the receipt window
    /// passed); refused otherwise → dropped and the error returned. When the outcome stays
    /// unknown (the connection failed twice, or PEER_UNREACHABLE / UNAVAILABLE /
    /// RATE_LIMITED) the commit stays pending and the error is returned: the next operation
    /// settles it.
    pub(crate) async fn settle_pending(
        &self,
        mls: &Mls,
        group: &GroupId,
        pending: PendingCommit,
        announce: bool,
    ) -> Result<Settled, ClientError> {
        let kind = pending.kind();
        // A commit made from an epoch the group has left since (we rejoined, or processed a
        // commit that won) can never be merged: merging it would put the group back.
        if kind == PendingKind::Commit {
            let (new_epoch, _) = crate::mls::group_info_context(pending.group_info.as_slice())?;
            let current = match mls.epoch(group) {
                Ok(epoch) => Some(epoch),
                Err(crate::mls::MlsError::NoGroup) => None,
                Err(err) => return Err(err.into()),
            };
            if current != Some(new_epoch.saturating_sub(1)) {
                tracing::info!(%group, ?current, new_epoch, "dropped a pending commit of an epoch we left");
                self.store.drop_pending(group)?;
                return Ok(Settled::Refused);
            }
        }
        if self
            .crash_before_send
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(ClientError::InvalidOperation(
                "simulated crash before the commit was sent".into(),
            ));
        }
        let mut answer = self.send_pending(group, &pending).await;
        if let Err(RequestError::Transport(err)) = &answer {
            tracing::debug!(%group, %err, "commit outcome unknown: sending it again");
            answer = self.send_pending(group, &pending).await;
        }
        if answer.is_ok()
            && self
                .crash_after_commit
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(ClientError::InvalidOperation(
                "simulated crash after the commit was sent".into(),
            ));
        }
        let applied = match answer {
            Ok(epoch) => Some(epoch),
            Err(err)
                if matches!(
                    server_code(&err),
                    Some(ErrorCode::STALE_EPOCH | ErrorCode::MISSING_PROPOSALS)
                ) =>
            {
                tracing::debug!(%group, %err, "commit lost, catching up");
                self.was_applied(group, pending.context.as_slice()).await?
            }
            Err(RequestError::Transport(err)) => return Err(RequestError::Transport(err).into()),
            // Not known to be refused: a forwarding homeserver that lost the hub's answer
            // (PEER_UNREACHABLE from our homeserver for a group hosted elsewhere, PROTOCOL.md
            // §8.2: may or may not have been applied), or a server that could not tell whether
            // its write went through (UNAVAILABLE). The commit stays pending: sending the same
            // bytes again is answered from its receipt if it was applied, judged afresh if
            // not. PEER_UNREACHABLE from the hub itself (its credential check could not reach
            // a peer, §7.4) and RATE_LIMITED change nothing: refusals, handled below.
            Err(err)
                if server_code(&err) == Some(ErrorCode::UNAVAILABLE)
                    || (server_code(&err) == Some(ErrorCode::PEER_UNREACHABLE)
                        && group.domain != *self.identity.client.domain()) =>
            {
                tracing::debug!(%group, %err, "commit outcome unknown: kept pending");
                return Err(err.into());
            }
            Err(err) => {
                self.store.drop_pending(group)?;
                return Err(err.into());
            }
        };
        let Some(epoch) = applied else {
            self.store.drop_pending(group)?;
            return Ok(Settled::Refused);
        };
        let mut changes = Changes::default();
        match kind {
            PendingKind::ExternalJoin => {
                changes
                    .groups
                    .push((group.clone(), Some(GroupRecord::joined(epoch))));
                changes.event(Event::Rejoined {
                    group: group.clone(),
                });
            }
            PendingKind::Commit if announce => changes.event(Event::CommitSettled {
                group: group.clone(),
                added: pending.added.clone(),
                removed: pending.removed.clone(),
            }),
            PendingKind::Commit => {}
        }
        self.store.apply_pending(group, pending, changes)?;
        self.events_ready.notify_waiters();
        Ok(Settled::Merged)
    }

    /// Sends a pending commit as what it is (Commit or ExternalJoin); returns the epoch the
    /// DS answered with.
    async fn send_pending(
        &self,
        group: &GroupId,
        pending: &PendingCommit,
    ) -> Result<u64, RequestError> {
        match pending.kind() {
            PendingKind::Commit => self
                .conn
                .call(CommitRequest {
                    group: group.clone(),
                    commit: pending.commit.clone(),
                    welcome: pending.welcome.clone(),
                    group_info: pending.group_info.clone(),
                })
                .await
                .map(|answer| answer.epoch),
            PendingKind::ExternalJoin => self
                .conn
                .call(ExternalJoinRequest {
                    group: group.clone(),
                    commit: pending.commit.clone(),
                    group_info: pending.group_info.clone(),
                })
                .await
                .map(|answer| answer.epoch),
        }
    }

    /// Settles every pending commit (see [`Inner::settle_pending`]); for the start of an
    /// operation, with the state lock held. A commit whose outcome stays unknown fails the
    /// operation: the group cannot go on before it is known (merging it later over state that
    /// moved on meanwhile would undo what was processed in between). A refused one is dropped
    /// and the operation goes on.
    pub(crate) async fn settle_all_pending(&self, mls: &Mls) -> Result<(), ClientError> {
        for (group, pending) in self.store.pending_commits()? {
            // Settled here, not by the call that made it (which failed): the app learns it
            // from an event.
            match self.settle_pending(mls, &group, pending, true).await {
                Ok(Settled::Merged) => {
                    tracing::info!(%group, "merged our commit that the DS had accepted");
                }
                Ok(Settled::Refused) => {
                    tracing::info!(%group, "our pending commit was refused: dropped");
                }
                Err(err) if self.store.pending_commit(&group)?.is_some() => return Err(err),
                Err(err) => tracing::warn!(%group, %err, "our pending commit was refused"),
            }
        }
        Ok(())
    }

    /// Whether the DS's current state is the one our commit leads to (`context`: the new
    /// epoch's group context, which covers the commit through the transcript hash).
    /// Returns that epoch if so.
    async fn was_applied(
        &self,
        group: &GroupId,
        context: &[u8],
    ) -> Result<Option<u64>, ClientError> {
        let info = self
            .conn
            .call(FetchGroupInfoRequest {
                group: group.clone(),
            })
            .await?;
        let (epoch, current) = crate::mls::group_info_context(info.group_info.as_slice())?;
        Ok((current == context).then_some(epoch))
    }

    /// Commits pending leave proposals if this client is the remaining member with the
    /// lowest leaf index.
    pub(crate) async fn commit_leaves(
        &self,
        group: &GroupId,
        leavers: &[u32],
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let mls = self.state.lock().await;
        if self.check_member(&mls, group).is_err() || !mls.has_pending_proposals(group)? {
            return Ok(());
        }
        let own = mls.own_index(group)?;
        let first = mls
            .members(group)?
            .iter()
            .map(|l| l.index)
            .filter(|i| !leavers.contains(i))
            .min();
        if first != Some(own) {
            return Ok(());
        }
        let left = self
            .commit_locked(&mls, group, &Intent::Pending, outcome)
            .await?;
        // Our own commits give no event of the group's other changes; this one's are leaves.
        if !left.is_empty() {
            let mut changes = Changes::default();
            changes.event(Event::MembersLeft {
                group: group.clone(),
                by: self.identity.client.clone(),
                members: left,
            });
            self.commit(&mls, changes)?;
        }
        Ok(())
    }

    /// Joins `group` by external commit (see [`Client::rejoin_group`]).
    pub(crate) async fn rejoin(
        &self,
        group: &GroupId,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let mls = self.state.lock().await;
        self.rejoin_locked(&mls, group, outcome).await
    }

    /// Rejoins `group` unless this client's state of it has reached `epoch` meanwhile (the
    /// epoch of a message that showed it had fallen behind).
    pub(crate) async fn rejoin_if_behind(
        &self,
        group: &GroupId,
        epoch: u64,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let mls = self.state.lock().await;
        if self.check_member(&mls, group).is_ok() && mls.epoch(group)? >= epoch {
            tracing::debug!(%group, epoch, "caught up meanwhile: no rejoin");
            return Ok(());
        }
        self.rejoin_locked(&mls, group, outcome).await
    }

    /// [`Inner::rejoin`] with the state lock held. Reports [`Event::Rejoined`] with the new
    /// state.
    pub(crate) async fn rejoin_locked(
        &self,
        mls: &Mls,
        group: &GroupId,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let attempts = self.config.max_commit_attempts.max(1);
        for _ in 0..attempts {
            let info = self
                .conn
                .call(FetchGroupInfoRequest {
                    group: group.clone(),
                })
                .await?;
            let (out, members) = self.mls_op(mls, |mls| {
                mls.external_join(
                    &self.identity,
                    group,
                    info.group_info.as_slice(),
                    info.ratchet_tree.as_slice(),
                )
            })?;
            let mut changes = Changes::default();
            for leaf in &members {
                let checked = self
                    .verifier
                    .verify(&self.conn, &self.store, leaf, None, &mut changes)
                    .await;
                match checked {
                    Ok(Ok(())) => {}
                    Ok(Err(rejection)) => {
                        mls.store().discard();
                        let mut changes = Changes::default();
                        changes.event(Event::CredentialRejected {
                            group: group.clone(),
                            client: rejection.client.clone(),
                            reason: format!("rejoin refused: {}", rejection.reason),
                        });
                        self.commit(mls, changes)?;
                        return Err(rejection.into());
                    }
                    Err(err) => {
                        mls.store().discard();
                        return Err(err);
                    }
                }
            }
            // Durable before it leaves, like a Commit: an answer lost or an app killed before
            // it came leaves it pending, and the same bytes are sent again later.
            let record = PendingCommit::new(
                PendingKind::ExternalJoin,
                out.commit.into(),
                None,
                out.group_info.into(),
                out.context.into(),
            );
            let pending = self.store.stash_pending(group, record)?;
            if !changes.verified.is_empty() {
                self.commit(mls, changes)?;
            }
            match self.settle_pending(mls, group, pending, false).await? {
                Settled::Merged => return Ok(()),
                Settled::Refused => {}
            }
        }
        let _ = outcome;
        Err(ClientError::TooManyAttempts(attempts))
    }
}
