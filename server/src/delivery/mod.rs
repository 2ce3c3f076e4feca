//! Delivery Service: the hub of the groups whose GroupId carries this server's domain.
//!
//! Each group's MLS public state lives in a [`DsGroup`] (openmls `PublicGroup`), cached in
//! memory and persisted in `GROUPS` as (epoch, [`DsGroup::snapshot`]).
//! Operations on one group are serialised by a per-group async lock; other groups proceed in
//! parallel. A commit is validated and applied in memory, then the new state and every
//! recipient's copy are written in one durable transaction; only then is it acknowledged. If
//! that write fails, the cached state is dropped, so the group reloads the last durable state.

mod cache;

use std::sync::Arc;

use roost_protocol::messages::delivery::*;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use roost_protocol::{ClientId, Domain, GroupId, Opaque};
use tls_codec::{DeserializeBytes, Serialize as _};

use crate::State;
use crate::error::ServiceError;
use crate::mls::{DsGroup, Member, MlsError};
use crate::storage::auth::active_client;
use crate::storage::tables::CLIENTS;

pub(crate) use cache::GroupCache;

/// A hosted group's durable state: its MLS group id (the key), epoch (for inspection) and MLS
/// state, which [`DsGroup::from_snapshot`] reloads whatever the clock says about its leaves'
/// lifetimes.
pub(crate) struct GroupState {
    pub(crate) key: Vec<u8>,
    pub(crate) epoch: u64,
    pub(crate) snapshot: Vec<u8>,
}

impl GroupState {
    fn of(group: &DsGroup) -> Result<Self, MlsError> {
        Ok(Self {
            key: group.group_id(),
            epoch: group.epoch(),
            snapshot: group.snapshot()?,
        })
    }
}

/// One payload for a set of recipients, split by where their queues are.
pub(crate) struct FanOut {
    pub(crate) local: Vec<ClientId>,
    pub(crate) remote: std::collections::BTreeMap<Domain, Vec<ClientId>>,
    pub(crate) payload: QueuePayload,
}

/// What a durable fan-out did, for waking listeners and outbox workers afterwards.
#[derive(Default)]
pub(crate) struct FanOutResult {
    /// Every new local queue entry, by client number.
    pub(crate) queues: Vec<(u64, crate::queue::Fresh)>,
    /// Domains with new outbox entries.
    pub(crate) domains: Vec<Domain>,
    /// Recipients reached, per fan-out.
    pub(crate) reached: Vec<u32>,
}

impl FanOutResult {
    fn wake(self, state: &State) -> Vec<u32> {
        state.queues.notify_fresh(&self.queues);
        state.federation.outbox.wake(self.domains);
        self.reached
    }
}

/// What the Delivery Service needs from storage (implemented for redb in `storage::groups`).
pub(crate) trait GroupStore {
    /// A hosted group's state.
    async fn load_group(&self, key: Vec<u8>) -> Result<Option<GroupState>, ServiceError>;
    /// Stores a new group (GROUP_EXISTS if the id is taken).
    async fn create_group(&self, state: GroupState) -> Result<(), ServiceError>;
    /// In one durable transaction: the group's new state (if given) and every fan-out — local
    /// queue entries (full queues skip that recipient) and outbox entries for other domains.
    async fn apply(
        &self,
        state: Option<GroupState>,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<FanOutResult, ServiceError>;
}

impl From<MlsError> for ServiceError {
    fn from(err: MlsError) -> Self {
        match err {
            MlsError::Malformed(reason) => ServiceError::InvalidMessage(reason),
            MlsError::WrongGroup => ServiceError::InvalidMessage("message of another group".into()),
            MlsError::WrongCiphersuite => {
                ServiceError::InvalidGroupInfo("unsupported ciphersuite".into())
            }
            MlsError::InvalidGroupInfo(reason) => ServiceError::InvalidGroupInfo(reason),
            MlsError::StaleEpoch { current } => ServiceError::StaleEpoch(current),
            MlsError::FutureEpoch { current } => ServiceError::FutureEpoch(current),
            MlsError::NotPublicMessage => {
                ServiceError::InvalidMessage("handshake messages must be PublicMessages".into())
            }
            MlsError::WrongContentType => ServiceError::InvalidMessage("wrong content type".into()),
            MlsError::NotMember | MlsError::SenderMismatch => ServiceError::NotMember,
            MlsError::InvalidCommit(reason) => ServiceError::InvalidCommit(reason),
            MlsError::InvalidProposal(reason) => ServiceError::InvalidMessage(reason),
            MlsError::MissingProposals => ServiceError::MissingProposals,
            MlsError::MissingWelcome => ServiceError::MissingWelcome,
            MlsError::InvalidWelcome(reason) => ServiceError::InvalidMessage(reason),
            MlsError::GroupTooLarge => ServiceError::GroupTooLarge,
            MlsError::State(reason) => ServiceError::Internal(reason),
        }
    }
}

fn identity_of(client: &ClientId) -> Result<Vec<u8>, ServiceError> {
    client
        .tls_serialize_detached()
        .map_err(|e| ServiceError::Internal(e.to_string()))
}

/// The ClientId a member's credential names, if it is one.
fn member_client(member: &Member) -> Option<ClientId> {
    match ClientId::tls_deserialize_bytes(&member.identity) {
        Ok((id, [])) => Some(id),
        _ => None,
    }
}

fn require_hosted(state: &State, group: &GroupId) -> Result<(), ServiceError> {
    if group.domain == state.settings.domain {
        Ok(())
    } else {
        Err(ServiceError::UnknownDomain(group.domain.to_string()))
    }
}

/// Accepts a credential a commit brings in only if it is an active client of this server with
/// that signature key (RFC 9420 §5.3.1, as the DS can check it). Runs on a blocking thread.
fn credential_checker(state: &State) -> impl Fn(&[u8], &[u8]) -> bool + Send + 'static {
    let store = state.store.clone();
    let domain = state.settings.domain.clone();
    move |identity, signature_key| {
        let Ok((client, [])) = ClientId::tls_deserialize_bytes(identity) else {
            return false;
        };
        if client.domain() != &domain {
            // Not checkable here: `recipients` refuses members of other domains (UNKNOWN_DOMAIN)
            // until federation relays their AS keys.
            return true;
        }
        let record = store.read_blocking(|txn| {
            let clients = txn.open_table(CLIENTS)?;
            active_client(&clients, &client)
        });
        matches!(record, Ok(Some(record)) if record.credential.signature_key.as_slice() == signature_key)
    }
}

/// Checks that every member of another domain carries the signature key its own AS certifies
/// for that client (RFC 9420 §5.3.1), asking that domain's homeserver.
async fn verify_remote_credentials(state: &State, members: &[&Member]) -> Result<(), ServiceError> {
    for member in members {
        let Some(client) = member_client(member) else {
            return Err(ServiceError::InvalidCommit(
                "a credential does not name a client".into(),
            ));
        };
        if client.domain() == &state.settings.domain {
            continue; // checked by `credential_checker`
        }
        let certified = crate::federation::certified_key(state, &client).await?;
        if certified.as_deref() != Some(member.signature_key.as_slice()) {
            tracing::warn!(%client, "a commit introduces a credential its AS does not certify");
            return Err(ServiceError::InvalidCommit(format!(
                "the credential of {client} is not certified by its AS"
            )));
        }
    }
    Ok(())
}

/// Runs CPU-heavy MLS work off the executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ServiceError::Internal("MLS processing failed".into()))
}

/// Recipients of a fan-out, split by where their queues are.
struct Recipients {
    local: Vec<ClientId>,
    remote: std::collections::BTreeMap<Domain, Vec<ClientId>>,
}

impl Recipients {
    fn with(self, payload: QueuePayload) -> FanOut {
        FanOut {
            local: self.local,
            remote: self.remote,
            payload,
        }
    }
}

/// Resolves members to recipients, leaving out `except`. Members of a domain this server does
/// not federate with are refused (UNKNOWN_DOMAIN) rather than leaving half the group without
/// the message.
fn recipients(
    state: &State,
    members: &[Member],
    except: &[Vec<u8>],
) -> Result<Recipients, ServiceError> {
    let mut local = Vec::with_capacity(members.len());
    let mut remote: std::collections::BTreeMap<Domain, Vec<ClientId>> = Default::default();
    for member in members {
        if except.contains(&member.identity) {
            continue;
        }
        let Some(client) = member_client(member) else {
            // A leaf whose identity is not a ClientId: nobody to deliver to.
            continue;
        };
        if client.domain() == &state.settings.domain {
            local.push(client);
        } else if state.federation.allowed(client.domain()) {
            remote
                .entry(client.domain().clone())
                .or_default()
                .push(client);
        } else {
            return Err(ServiceError::UnknownDomain(client.domain().to_string()));
        }
    }
    Ok(Recipients { local, remote })
}

/// Loads a group's stored state and rebuilds its MLS state.
pub(crate) async fn load(state: &State, group: &GroupId) -> Result<DsGroup, ServiceError> {
    let record = state
        .store
        .load_group(group.to_mls_bytes())
        .await?
        .ok_or(ServiceError::GroupNotFound)?;
    blocking(move || DsGroup::from_snapshot(record.snapshot.as_slice()))
        .await?
        .map_err(|err| ServiceError::Internal(format!("stored group does not restore: {err}")))
}

/// CreateGroup.
pub(crate) async fn create(
    state: &State,
    me: &ClientId,
    req: CreateGroupRequest,
) -> Result<CreateGroupResponse, ServiceError> {
    if req.group.domain != state.settings.domain {
        return Err(ServiceError::Forbidden(
            "groups are created on the creator's own homeserver",
        ));
    }
    let entry = state.groups.entry(&req.group);
    let mut slot = entry.lock().await;
    let group_id = req.group.to_mls_bytes();
    let identity = identity_of(me)?;
    let max = state.settings.limits.max_group_size as usize;
    let key = group_id.clone();
    let check = credential_checker(state);
    let group = blocking(move || {
        let group = DsGroup::create(
            &key,
            &identity,
            req.group_info.as_slice(),
            req.ratchet_tree.as_slice(),
            max,
        )?;
        // The creator's leaf must carry its AS-registered key.
        match group.member_by_identity(&identity) {
            Some(creator) if check(&creator.identity, &creator.signature_key) => Ok(group),
            _ => Err(MlsError::InvalidGroupInfo(
                "the creator's leaf does not match its credential".into(),
            )),
        }
    })
    .await??;
    state.store.create_group(GroupState::of(&group)?).await?;
    let epoch = group.epoch();
    *slot = Some(group);
    tracing::info!(group = %req.group, "group created");
    Ok(CreateGroupResponse { epoch })
}

/// Takes the group's lock and makes sure its state is loaded.
macro_rules! locked_group {
    ($state:expr, $group:expr, $slot:ident) => {
        require_hosted($state, $group)?;
        let entry = $state.groups.entry($group);
        let mut $slot = entry.lock().await;
        if $slot.is_none() {
            *$slot = Some(load($state, $group).await?);
        }
    };
}

/// Applies a commit (member or external) and fans it out.
async fn commit_common(
    state: &State,
    me: &ClientId,
    group_id: &GroupId,
    external: bool,
    commit: Opaque,
    welcome: Option<Opaque>,
    group_info: Opaque,
) -> Result<CommitResponse, ServiceError> {
    locked_group!(state, group_id, slot);
    let Some(mut group) = slot.take() else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    let identity = identity_of(me)?;
    let max = state.settings.limits.max_group_size as usize;
    let commit_bytes = commit.clone();
    let welcome_bytes = welcome.clone();
    let check = credential_checker(state);
    let (group, result) = blocking(move || {
        let result = if external {
            group.process_external_commit_checked(
                &identity,
                commit_bytes.as_slice(),
                group_info.as_slice(),
                max,
                &check,
            )
        } else {
            group.process_commit_checked(
                &identity,
                commit_bytes.as_slice(),
                welcome_bytes.as_ref().map(Opaque::as_slice),
                group_info.as_slice(),
                max,
                &check,
            )
        };
        (group, result)
    })
    .await?;
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(err) => {
            // A refused commit leaves the state as it was.
            *slot = Some(group);
            return Err(err.into());
        }
    };
    // From here on the in-memory state is ahead of the store: on any failure, drop it.
    let me_identity = identity_of(me)?;
    let prepared = (|| {
        let commit_to = recipients(
            state,
            &outcome.members_before,
            std::slice::from_ref(&me_identity),
        )?;
        let welcome_to = recipients(state, &outcome.added, &[])?;
        // Every later recipient must be reachable too, or the group would split.
        recipients(state, &outcome.members_after, &[])?;
        Ok::<_, ServiceError>((commit_to, welcome_to))
    })();
    let (commit_to, welcome_to) = prepared?;
    // Credentials of other domains, checked against their own AS before anything is stored.
    let mut introduced: Vec<&Member> = outcome.added.iter().collect();
    introduced.extend(outcome.committer.iter());
    verify_remote_credentials(state, &introduced).await?;
    let new_state = GroupState::of(&group)?;
    let mut fan_outs = vec![commit_to.with(QueuePayload::GroupMessage(GroupMessage {
        group: group_id.clone(),
        message: commit,
    }))];
    if let Some(welcome) = welcome {
        fan_outs.push(welcome_to.with(QueuePayload::Welcome(GroupMessage {
            group: group_id.clone(),
            message: welcome,
        })));
    }
    let max_depth = state.settings.limits.max_queue_depth;
    let result = state
        .store
        .apply(Some(new_state), fan_outs, max_depth)
        .await?;
    let epoch = group.epoch();
    *slot = Some(group);
    drop(slot);
    let reached = result.wake(state);
    let (commits, welcomes) = (
        reached.first().copied().unwrap_or(0),
        reached.get(1).copied().unwrap_or(0),
    );
    metrics::histogram!("roost_fanout_recipients").record(f64::from(commits + welcomes));
    tracing::debug!(group = %group_id, epoch, commits, welcomes, "commit accepted");
    Ok(CommitResponse { epoch })
}

/// Commit.
pub(crate) async fn commit(
    state: &State,
    me: &ClientId,
    req: CommitRequest,
) -> Result<CommitResponse, ServiceError> {
    check_send_rate(state, me)?;
    commit_common(
        state,
        me,
        &req.group,
        false,
        req.commit,
        req.welcome,
        req.group_info,
    )
    .await
}

/// ExternalJoin.
pub(crate) async fn external_join(
    state: &State,
    me: &ClientId,
    req: ExternalJoinRequest,
) -> Result<CommitResponse, ServiceError> {
    check_send_rate(state, me)?;
    commit_common(
        state,
        me,
        &req.group,
        true,
        req.commit,
        None,
        req.group_info,
    )
    .await
}

fn check_send_rate(state: &State, me: &ClientId) -> Result<(), ServiceError> {
    state
        .send_limiter
        .check(me.clone())
        .map_err(ServiceError::RateLimited)
}

/// SendMessage.
pub(crate) async fn send_message(
    state: &State,
    me: &ClientId,
    req: SendMessageRequest,
) -> Result<SendMessageResponse, ServiceError> {
    check_send_rate(state, me)?;
    locked_group!(state, &req.group, slot);
    let Some(group) = slot.as_ref() else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    let identity = identity_of(me)?;
    if group.member_by_identity(&identity).is_none() {
        return Err(ServiceError::NotMember);
    }
    group.check_application_message(
        req.message.as_slice(),
        u64::from(state.settings.limits.past_epochs),
    )?;
    let to = recipients(state, &group.members(), std::slice::from_ref(&identity))?;
    let payload = QueuePayload::GroupMessage(GroupMessage {
        group: req.group.clone(),
        message: req.message,
    });
    let max_depth = state.settings.limits.max_queue_depth;
    let result = state
        .store
        .apply(None, vec![to.with(payload)], max_depth)
        .await?;
    drop(slot);
    let reached = result.wake(state).first().copied().unwrap_or(0);
    metrics::histogram!("roost_fanout_recipients").record(f64::from(reached));
    Ok(SendMessageResponse {
        recipients: reached,
    })
}

/// LeaveGroup: stores the self-remove proposal and fans it out.
pub(crate) async fn leave(
    state: &State,
    me: &ClientId,
    req: LeaveGroupRequest,
) -> Result<LeaveGroupResponse, ServiceError> {
    check_send_rate(state, me)?;
    locked_group!(state, &req.group, slot);
    let Some(mut group) = slot.take() else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    let identity = identity_of(me)?;
    let proposal = req.proposal.clone();
    let id = identity.clone();
    let (group, result) = blocking(move || {
        let result = group.add_leave_proposal(&id, proposal.as_slice());
        (group, result)
    })
    .await?;
    let members = match result {
        Ok(members) => members,
        Err(err) => {
            *slot = Some(group);
            return Err(err.into());
        }
    };
    let to = recipients(state, &members, std::slice::from_ref(&identity))?;
    let new_state = GroupState::of(&group)?;
    let payload = QueuePayload::GroupMessage(GroupMessage {
        group: req.group.clone(),
        message: req.proposal,
    });
    let max_depth = state.settings.limits.max_queue_depth;
    let result = state
        .store
        .apply(Some(new_state), vec![to.with(payload)], max_depth)
        .await?;
    *slot = Some(group);
    drop(slot);
    result.wake(state);
    Ok(LeaveGroupResponse {})
}

/// FetchGroupInfo: for clients whose id is in the tree (members, and members that lost their
/// state and want to rejoin by external commit).
pub(crate) async fn fetch_group_info(
    state: &State,
    me: &ClientId,
    req: FetchGroupInfoRequest,
) -> Result<FetchGroupInfoResponse, ServiceError> {
    locked_group!(state, &req.group, slot);
    let Some(group) = slot.as_ref() else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    if group.member_by_identity(&identity_of(me)?).is_none() {
        return Err(ServiceError::NotMember);
    }
    Ok(FetchGroupInfoResponse {
        epoch: group.epoch(),
        group_info: group.group_info().into(),
        ratchet_tree: group.export_ratchet_tree().into(),
    })
}

/// Shared type of the per-group slot, for the cache.
pub(crate) type GroupSlot = Arc<tokio::sync::Mutex<Option<DsGroup>>>;
