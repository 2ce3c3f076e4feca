//! Delivery Service: the hub of the groups whose GroupId carries this server's domain.
//!
//! Each group's MLS public state lives in a [`DsGroup`] (openmls `PublicGroup`), cached in
//! memory and persisted as (epoch, [`DsGroup::snapshot`]): a base and deltas on it (see
//! [`crate::storage::group_delta`]).
//! Operations on one group are serialised by a per-group async lock; other groups proceed in
//! parallel. A commit is validated and applied in memory, then the new state and every
//! recipient's copy are written in one durable transaction; only then is it acknowledged. If
//! that write fails, the cached state is dropped, so the group reloads the last durable state.
//! A message is validated and handed to the store under the lock, which is released before
//! the message is durable (its sender is answered after): the group's next messages share the
//! store's write batch, in the order the lock gave them ([`GroupStore::submit`]).
//!
//! Several nodes of one domain may host the same group (one database). The stored state
//! carries a version, bumped by every write of the state; every write a DS operation makes
//! (even a message fan-out that leaves the state alone) is checked against the version the
//! cached state was loaded at, in the same transaction. If another node moved the group on,
//! the write is refused ([`ServiceError::GroupMoved`]), the cache is dropped and the operation
//! runs again on the reloaded state, so a commit for an epoch another node already closed
//! gets STALE_EPOCH with the current epoch, and a message never goes to an old roster.
//! Next to the MLS state the cache keeps the epoch's [`Roster`]: every member resolved to a
//! queue (client number) or a remote domain, so a message is fanned out without decoding the
//! tree or looking clients up.

mod cache;
pub(crate) mod receipt;
mod roster;

use std::collections::HashMap;
use std::sync::Arc;

use roost_protocol::messages::delivery::*;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use roost_protocol::{ClientId, Domain, GroupId, Opaque};
use tls_codec::{DeserializeBytes, Serialize as _};

use crate::State;
use crate::auth::AuthStore;
use crate::error::ServiceError;
use crate::mls::{CommitOutcome, DsGroup, Member, MlsError};
use crate::storage::Backend;
use crate::storage::group_delta::{self, Chain};

pub(crate) use cache::GroupCache;
use receipt::{Answer, Kind, Receipt, ReceiptStore as _, SendCounter, Submission};
use roster::{Recipients, Roster};

/// A hosted group's durable state: its MLS group id (the key), epoch (for inspection), the
/// version of the stored state (bumped by every write of it; see the module docs) and MLS
/// state, which [`DsGroup::from_snapshot`] reloads whatever the clock says about its leaves'
/// lifetimes.
///
/// The state is stored as a base and a chain of deltas ([`crate::storage::group_delta`]): a
/// write either replaces the base (and drops the chain) or adds a delta on the state of the
/// previous version.
pub(crate) struct GroupState {
    pub(crate) key: Vec<u8>,
    pub(crate) epoch: u64,
    pub(crate) version: u64,
    /// Loaded: the full snapshot. Written: the new base if `chain` is empty, else the delta
    /// that turns the state of `version - 1` into this one.
    pub(crate) snapshot: Vec<u8>,
    /// The deltas stored on the base, as loaded or after this write.
    pub(crate) chain: Chain,
}

impl GroupState {
    /// The state of `group` at `version`, in full (a new group).
    fn of(group: &DsGroup, version: u64) -> Result<(Self, Persisted), MlsError> {
        let snapshot = group.snapshot()?;
        let persisted = Persisted {
            snapshot: snapshot.clone(),
            chain: Chain::default(),
        };
        let state = Self {
            key: group.group_id(),
            epoch: group.epoch(),
            version,
            snapshot,
            chain: Chain::default(),
        };
        Ok((state, persisted))
    }

    /// The state of `group` at `version`, stored as a delta on `previous` (the stored state of
    /// `version - 1`) while the chain allows, else in full; and what is then stored.
    fn after(
        group: &DsGroup,
        version: u64,
        previous: &Persisted,
    ) -> Result<(Self, Persisted), MlsError> {
        let snapshot = group.snapshot()?;
        let (stored, chain) = group_delta::next(&previous.snapshot, &snapshot, previous.chain);
        let state = Self {
            key: group.group_id(),
            epoch: group.epoch(),
            version,
            snapshot: stored.into_bytes(),
            chain,
        };
        Ok((state, Persisted { snapshot, chain }))
    }
}

/// Counts a durable write of a group's state (its form and size, taken before the write).
fn count_state_write((delta, bytes): (bool, usize)) {
    let form = if delta { "delta" } else { "full" };
    metrics::counter!("roost_group_state_writes_total", "form" => form).increment(1);
    metrics::counter!("roost_group_state_bytes_total", "form" => form).increment(bytes as u64);
}

impl GroupState {
    /// What [`count_state_write`] counts of this state.
    fn written(&self) -> (bool, usize) {
        (self.chain.deltas > 0, self.snapshot.len())
    }
}

/// What the store holds of a cached group's state: its snapshot (what the next write's delta
/// is taken against) and the deltas on its base.
pub(crate) struct Persisted {
    snapshot: Vec<u8>,
    chain: Chain,
}

/// The group part of a DS write: refused with [`ServiceError::GroupMoved`] (writing nothing)
/// unless the stored version is still `loaded`.
pub(crate) struct GroupWrite {
    /// The group's MLS group id.
    pub(crate) key: Vec<u8>,
    /// The version the operation's state was loaded (or last written) at.
    pub(crate) loaded: u64,
    /// The new state, whose version must be `loaded + 1`; `None` when only fan-outs are
    /// written (the version is still checked and cannot change before the transaction ends).
    pub(crate) state: Option<GroupState>,
    /// The request's receipt, written in the same transaction (see [`receipt`]); a fresh
    /// receipt already stored for its key refuses the write (GROUP_MOVED, writing nothing).
    pub(crate) receipt: Option<Receipt>,
    /// Whether the local queue entries of the fan-outs may be written after the answer: the
    /// transaction then holds a durable pending record of them instead, and the engine turns
    /// it into queue entries in its next write, before anything else is queued for those
    /// recipients (replayed from the record after a crash). Outbox entries are always written
    /// in the transaction. Commits use it: a commit to N members then waits for one small
    /// write instead of N queue entries (docs/ARCHITECTURE.md, "Lazy fan-out").
    pub(crate) lazy: bool,
}

/// One payload for a set of recipients, split by where their queues are.
pub(crate) struct FanOut {
    /// Local recipients' client numbers, ascending (numbers without a queue are skipped).
    pub(crate) local: Vec<u64>,
    pub(crate) remote: std::collections::BTreeMap<Domain, Vec<ClientId>>,
    pub(crate) payload: QueuePayload,
    /// Enqueue time (Unix milliseconds, by the server's clock): what the message age limit
    /// and the outbox's expiry compare against.
    pub(crate) timestamp_ms: u64,
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
        state.push.woken(self.queues.iter().map(|(num, _)| *num));
        if self.queues.len() > SPAWNED_WAKE_ABOVE {
            let (notifier, queues) = (state.queues.clone(), self.queues);
            tokio::spawn(async move { notifier.notify_fresh(&queues) });
        } else {
            state.queues.notify_fresh(&self.queues);
        }
        state.federation.outbox.wake(self.domains);
        self.reached
    }
}

/// Fan-outs to more local queues than this wake their listeners from a task of their own, so
/// the sender's answer goes out before the listeners' pushes compete with it.
const SPAWNED_WAKE_ABOVE: usize = 64;

/// What the Delivery Service needs from storage (implemented by every engine in `storage`).
pub(crate) trait GroupStore {
    /// A hosted group's state.
    async fn load_group(&self, key: Vec<u8>) -> Result<Option<GroupState>, ServiceError>;
    /// The version of a hosted group's stored state, if the group exists.
    async fn group_version(&self, key: Vec<u8>) -> Result<Option<u64>, ServiceError>;
    /// Stores a new group (GROUP_EXISTS if the id is taken).
    async fn create_group(&self, state: GroupState) -> Result<(), ServiceError>;
    /// In one durable transaction, if the group's stored version is still `group.loaded`
    /// (GROUP_MOVED otherwise, writing nothing): the group's new state (if given) and every
    /// fan-out — local queue entries (full queues skip that recipient) and outbox entries for
    /// other domains.
    async fn apply(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<FanOutResult, ServiceError>;
    /// [`GroupStore::apply`] in two steps, for a write that leaves the group's state alone
    /// (`group.state` is `None`; a message): when this resolves, the write has its place in
    /// the engine's order of writes — every write submitted after it is applied after it, so
    /// in every queue they share its entries come first — and the returned [`Applying`]
    /// resolves once it is durable (or refused, writing nothing). The DS submits under the
    /// group's lock and waits after releasing it: one group's messages then share the
    /// engine's write batches instead of going one durable batch at a time, in the order the
    /// lock gave them. An engine may also apply a write whole before this resolves.
    async fn submit(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<Applying, ServiceError>;
}

/// A DS write that has its place in the engine's order (see [`GroupStore::submit`]).
pub(crate) struct Applying(
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<FanOutResult, ServiceError>> + Send>>,
);

impl Applying {
    /// A write whose outcome `durable` resolves to once it is durable (or refused).
    pub(crate) fn new(
        durable: impl std::future::Future<Output = Result<FanOutResult, ServiceError>> + Send + 'static,
    ) -> Self {
        Self(Box::pin(durable))
    }

    /// Waits until the write is durable; its outcome.
    pub(crate) async fn durable(self) -> Result<FanOutResult, ServiceError> {
        self.0.await
    }
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
            MlsError::GroupInfoHasRatchetTree => ServiceError::GroupInfoHasRatchetTree,
            MlsError::GroupInfoWithoutExternalPub => ServiceError::GroupInfoWithoutExternalPub,
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
            MlsError::CredentialsUnverified => {
                ServiceError::Internal("credentials not verified".into())
            }
        }
    }
}

fn identity_of(client: &ClientId) -> Result<Vec<u8>, ServiceError> {
    client
        .tls_serialize_detached()
        .map_err(|e| ServiceError::Internal(e.to_string()))
}

fn require_hosted(state: &State, group: &GroupId) -> Result<(), ServiceError> {
    if group.domain == state.settings.domain {
        Ok(())
    } else {
        Err(ServiceError::UnknownDomain(group.domain.to_string()))
    }
}

/// What the ASes of other domains answered for one commit: the key each certifies for a
/// client (`None`: not certified). Asked outside the group's lock.
type Certified = HashMap<ClientId, Option<Vec<u8>>>;

/// Accepts a credential a commit brings in only if its AS certifies that signature key for
/// that client (RFC 9420 §5.3.1, as the DS can check it): for a client of this server, it is
/// an active client with that key (asked from the store; runs on a blocking thread, it waits
/// for the store there); for a client of another domain, `certified` (what its AS answered
/// for this commit) or else the certified-key cache says so. Another domain's client that
/// neither knows is undecided (`None`) and noted in the returned list, to be asked outside the
/// lock. A storage failure refuses the credential and is kept in the returned
/// [`StoreFailure`], so that the caller reports it instead of an invalid commit.
fn credential_checker(
    state: &State,
    certified: Arc<Certified>,
) -> Checker<impl Fn(&[u8], &[u8]) -> Option<bool> + Send + 'static> {
    let store = state.store.clone();
    let domain = state.settings.domain.clone();
    let cache = state.federation.certified.clone();
    let runtime = tokio::runtime::Handle::current();
    let failure = StoreFailure::default();
    let failed = failure.clone();
    let undecided = Undecided::default();
    let unknown = undecided.clone();
    let check = move |identity: &[u8], signature_key: &[u8]| {
        let Ok((client, [])) = ClientId::tls_deserialize_bytes(identity) else {
            return Some(false);
        };
        if client.domain() != &domain {
            if let Some(answer) = certified.get(&client) {
                return Some(answer.as_deref() == Some(signature_key));
            }
            if cache.get(&client).as_deref() == Some(signature_key) {
                return Some(true);
            }
            unknown.add(client);
            return None;
        }
        match runtime.block_on(store.active_client(&client)) {
            Ok(Some(record)) => Some(record.credential.signature_key.as_slice() == signature_key),
            Ok(None) => Some(false),
            Err(err) => {
                failed.set(err);
                Some(false)
            }
        }
    };
    Checker {
        check,
        failure,
        undecided,
    }
}

/// A credential check (see [`credential_checker`]) and what it met besides its answers.
struct Checker<F> {
    check: F,
    failure: StoreFailure,
    undecided: Undecided,
}

/// Clients of other domains whose credentials a commit brings in and nobody vouched for yet.
#[derive(Clone, Default)]
struct Undecided(Arc<std::sync::Mutex<Vec<ClientId>>>);

impl Undecided {
    fn add(&self, client: ClientId) {
        let mut clients = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !clients.contains(&client) {
            clients.push(client);
        }
    }

    fn take(&self) -> Vec<ClientId> {
        let mut clients = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::take(&mut *clients)
    }
}

/// A storage failure met inside synchronous MLS processing, reported after it.
#[derive(Clone, Default)]
struct StoreFailure(Arc<std::sync::Mutex<Option<ServiceError>>>);

impl StoreFailure {
    fn set(&self, err: ServiceError) {
        let mut slot = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        slot.get_or_insert(err);
    }

    /// The storage failure if there was one, else `err`.
    fn or(&self, err: ServiceError) -> ServiceError {
        let mut slot = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        slot.take().unwrap_or(err)
    }
}

/// Asks the AS of each of `clients` (of other domains) which signature key it certifies for
/// it, into `certified`. Never called with a group's lock held: a slow or absent peer delays
/// only the commit that needs it, for at most `federation.credential_timeout_ms`.
async fn ask_remote_ases(
    state: &State,
    clients: Vec<ClientId>,
    certified: &mut Certified,
) -> Result<(), ServiceError> {
    let limit = std::time::Duration::from_millis(state.federation.config.credential_timeout_ms);
    let deadline = tokio::time::Instant::now() + limit;
    for client in clients {
        if certified.contains_key(&client) {
            continue;
        }
        let asked = crate::federation::certified_key(state, &client);
        let key = match tokio::time::timeout_at(deadline, asked).await {
            Ok(answer) => answer?,
            Err(_) => {
                metrics::counter!("roost_credential_check_timeouts_total").increment(1);
                tracing::info!(%client, "the AS of a credential a commit adds did not answer in time");
                return Err(ServiceError::PeerUnreachable(client.domain().to_string()));
            }
        };
        if key.is_none() {
            tracing::warn!(%client, "a commit introduces a credential its AS does not certify");
        }
        certified.insert(client, key);
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

impl Recipients {
    fn with(self, payload: QueuePayload, timestamp_ms: u64) -> FanOut {
        FanOut {
            local: self.local,
            remote: self.remote,
            payload,
            timestamp_ms,
        }
    }
}

/// A hosted group in the cache: its MLS state, the recipients of its current epoch and the
/// stored version they are of.
pub(crate) struct Hosted {
    group: DsGroup,
    roster: Roster,
    version: u64,
    persisted: Persisted,
}

/// Resolves `members` of `epoch` to recipients (see [`Roster::build`]), asking the store (in
/// one call) for the local members `previous` does not know. Runs on a blocking thread: it
/// waits for the store there.
fn resolve(
    store: &Backend,
    domain: &Domain,
    epoch: u64,
    members: &[Member],
    previous: Option<Roster>,
) -> Result<Roster, ServiceError> {
    let unknown = Roster::unresolved(members, domain, previous.as_ref());
    let nums = if unknown.is_empty() {
        Vec::new()
    } else {
        tokio::runtime::Handle::current().block_on(store.client_nums(unknown.clone()))?
    };
    let found: std::collections::HashMap<ClientId, Option<u64>> =
        unknown.into_iter().zip(nums).collect();
    Roster::build(epoch, members, domain, previous, |client| {
        Ok(found.get(client).copied().flatten())
    })
}

/// Members of a domain this server does not federate with are refused (UNKNOWN_DOMAIN) rather
/// than leaving half the group without the message.
fn allowed(state: &State) -> impl Fn(&Domain) -> bool + '_ {
    move |domain| state.federation.allowed(domain)
}

fn unknown_domain(domain: Domain) -> ServiceError {
    ServiceError::UnknownDomain(domain.to_string())
}

/// Loads a group's stored state, rebuilds its MLS state and resolves its members.
async fn load(state: &State, group: &GroupId) -> Result<Hosted, ServiceError> {
    let record = state
        .store
        .load_group(group.to_mls_bytes())
        .await?
        .ok_or(ServiceError::GroupNotFound)?;
    let (store, domain) = (state.store.clone(), state.settings.domain.clone());
    let version = record.version;
    blocking(move || {
        let group = DsGroup::from_snapshot(record.snapshot.as_slice()).map_err(|err| {
            ServiceError::Internal(format!("stored group does not restore: {err}"))
        })?;
        let roster = resolve(&store, &domain, group.epoch(), &group.members(), None)?;
        Ok(Hosted {
            group,
            roster,
            version,
            persisted: Persisted {
                snapshot: record.snapshot,
                chain: record.chain,
            },
        })
    })
    .await?
}

/// A refusal decided on the cached state stands only if that state is still the stored one:
/// a node that cached epoch 5 would otherwise refuse a commit for epoch 6 (which another node
/// reached) as FUTURE_EPOCH, or a member added there as NOT_MEMBER. Otherwise the operation
/// runs again on the reloaded state (GROUP_MOVED). Costs a version read on refusals only.
async fn confirm_refusal(
    state: &State,
    group: &GroupId,
    loaded: u64,
    err: ServiceError,
) -> ServiceError {
    if matches!(err, ServiceError::Store(_) | ServiceError::Internal(_)) {
        return err;
    }
    match state.store.group_version(group.to_mls_bytes()).await {
        Ok(Some(stored)) if stored == loaded => err,
        Ok(_) => ServiceError::GroupMoved,
        Err(store_err) => store_err,
    }
}

/// How often an operation runs again after another node moved its group on.
const MOVED_RETRIES: usize = 4;

/// Runs a DS operation, again on the reloaded state while another node moved its group on
/// under it (see the module docs).
async fn on_current_state<T, F>(mut op: impl FnMut() -> F) -> Result<T, ServiceError>
where
    F: std::future::Future<Output = Result<T, ServiceError>>,
{
    for _ in 1..MOVED_RETRIES {
        match op().await {
            Err(ServiceError::GroupMoved) => {
                metrics::counter!("roost_group_moved_retries_total").increment(1);
            }
            other => return other,
        }
    }
    op().await
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
    let Checker { check, failure, .. } = credential_checker(state, Arc::default());
    let (store, domain) = (state.store.clone(), state.settings.domain.clone());
    let hosted = blocking(move || {
        let group = DsGroup::create(
            &key,
            &identity,
            req.group_info.as_slice(),
            req.ratchet_tree.as_slice(),
            max,
        )?;
        // The creator's leaf must carry its AS-registered key.
        match group.member_by_identity(&identity) {
            Some(creator) if check(&creator.identity, &creator.signature_key) == Some(true) => {}
            _ => {
                return Err(failure.or(ServiceError::from(MlsError::InvalidGroupInfo(
                    "the creator's leaf does not match its credential".into(),
                ))));
            }
        }
        let roster = resolve(&store, &domain, group.epoch(), &group.members(), None)?;
        let (stored, persisted) = GroupState::of(&group, 0)?;
        Ok((
            Hosted {
                group,
                roster,
                version: 0,
                persisted,
            },
            stored,
        ))
    })
    .await??;
    let (hosted, stored) = hosted;
    let written = stored.written();
    state.store.create_group(stored).await?;
    count_state_write(written);
    let epoch = hosted.group.epoch();
    *slot = Some(hosted);
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
            match load($state, $group).await {
                Ok(hosted) => *$slot = Some(hosted),
                Err(err) => {
                    drop($slot);
                    drop(entry);
                    $state.groups.forget_empty($group);
                    return Err(err);
                }
            }
        }
    };
}

/// How many times a commit is processed: once more after asking other domains' ASes about
/// the credentials it brings in (the same commit bytes bring in the same credentials, so a
/// third pass is only a safety margin).
const CREDENTIAL_ROUNDS: usize = 3;

/// What one pass over a commit under the group's lock came to.
enum Attempt {
    Done(CommitResponse),
    /// Valid as far as checked, but these clients' ASes must be asked first; nothing changed.
    Ask(Vec<ClientId>),
}

/// Applies a commit (member or external) and fans it out. Credentials of other domains that
/// the certified-key cache does not vouch for are asked from their AS between two passes
/// under the group's lock, never while holding it: the second pass re-validates the commit
/// against whatever state the group has by then.
async fn commit_common(
    state: &State,
    me: &ClientId,
    group_id: &GroupId,
    external: bool,
    bundle: (&Opaque, Option<&Opaque>, &Opaque),
) -> Result<CommitResponse, ServiceError> {
    let mut certified = Certified::new();
    for _ in 0..CREDENTIAL_ROUNDS {
        let known = Arc::new(certified.clone());
        match commit_attempt(state, me, group_id, external, bundle, known).await? {
            Attempt::Done(response) => return Ok(response),
            Attempt::Ask(clients) => ask_remote_ases(state, clients, &mut certified).await?,
        }
    }
    Err(ServiceError::Internal(
        "the credentials of a commit could not be settled".into(),
    ))
}

/// One pass over a commit under the group's lock (see [`commit_common`]).
async fn commit_attempt(
    state: &State,
    me: &ClientId,
    group_id: &GroupId,
    external: bool,
    (commit, welcome, group_info): (&Opaque, Option<&Opaque>, &Opaque),
    certified: Arc<Certified>,
) -> Result<Attempt, ServiceError> {
    let (commit, welcome, group_info) = (commit.clone(), welcome.cloned(), group_info.clone());
    locked_group!(state, group_id, slot);
    let kind = if external {
        Kind::ExternalJoin
    } else {
        Kind::Commit
    };
    let submission = Submission::new(state, kind, me, group_id, commit.as_slice());
    if let Some(epoch) = submission.repeated(state).await? {
        // Applied already (the group may be at a later epoch by now): the original answer.
        return Ok(Attempt::Done(CommitResponse { epoch }));
    }
    let Some(Hosted {
        mut group,
        roster,
        version,
        persisted,
    }) = slot.take()
    else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    let identity = identity_of(me)?;
    let max = state.settings.limits.max_group_size as usize;
    let past_epochs = u64::from(state.settings.limits.past_epochs);
    let commit_bytes = commit.clone();
    let welcome_bytes = welcome.clone();
    let Checker {
        check,
        failure,
        undecided,
    } = credential_checker(state, certified);
    let (store, domain) = (state.store.clone(), state.settings.domain.clone());
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
        let result = match result {
            Err(err) => Err((err, roster)),
            Ok(outcome) => {
                // Joins older than every epoch whose messages are still accepted no longer
                // restrict any fan-out.
                group.forget_joins_up_to(outcome.new_epoch.saturating_sub(past_epochs));
                let resolved = resolve_commit(&store, &domain, &identity, roster, &group, &outcome);
                Ok((outcome, resolved))
            }
        };
        (group, result)
    })
    .await?;
    let (outcome, resolved) = match result {
        Ok(accepted) => accepted,
        Err((MlsError::CredentialsUnverified, roster)) => {
            // Valid so far, nothing merged: ask the ASes without holding the lock, then redo.
            *slot = Some(Hosted {
                group,
                roster,
                version,
                persisted,
            });
            return Ok(Attempt::Ask(undecided.take()));
        }
        Err((err, roster)) => {
            // A refused commit leaves the state as it was.
            let err = confirm_refusal(state, group_id, version, failure.or(err.into())).await;
            if !matches!(err, ServiceError::GroupMoved) {
                *slot = Some(Hosted {
                    group,
                    roster,
                    version,
                    persisted,
                });
            }
            return Err(err);
        }
    };
    // From here on the in-memory state is ahead of the store: on any failure, drop it.
    let (commit_to, roster) = resolved?;
    let welcome_to = roster.subset(&outcome.added);
    // Every later recipient must be reachable too, or the group would split.
    commit_to
        .check_domains(allowed(state))
        .and_then(|()| roster.check_domains(allowed(state)))
        .map_err(unknown_domain)?;
    let (stored, persisted) = GroupState::after(&group, version + 1, &persisted)?;
    let written = stored.written();
    let write = GroupWrite {
        key: group.group_id(),
        loaded: version,
        state: Some(stored),
        receipt: Some(submission.receipt(Answer::Value(group.epoch()))),
        lazy: true,
    };
    let now_ms = state.clock.unix_millis();
    let mut fan_outs = vec![commit_to.with(
        QueuePayload::GroupMessage(GroupMessage {
            group: group_id.clone(),
            message: commit,
        }),
        now_ms,
    )];
    if let Some(welcome) = welcome {
        fan_outs.push(welcome_to.with(
            QueuePayload::Welcome(GroupMessage {
                group: group_id.clone(),
                message: welcome,
            }),
            now_ms,
        ));
    }
    let max_depth = state.settings.limits.max_queue_depth;
    let result = state.store.apply(write, fan_outs, max_depth).await?;
    count_state_write(written);
    let epoch = group.epoch();
    *slot = Some(Hosted {
        group,
        roster,
        version: version + 1,
        persisted,
    });
    drop(slot);
    let reached = result.wake(state);
    let (commits, welcomes) = (
        reached.first().copied().unwrap_or(0),
        reached.get(1).copied().unwrap_or(0),
    );
    metrics::histogram!("roost_fanout_recipients").record(f64::from(commits + welcomes));
    tracing::debug!(group = %group_id, epoch, commits, welcomes, "commit accepted");
    Ok(Attempt::Done(CommitResponse { epoch }))
}

/// For an accepted commit (already merged into `group`): its recipients (the old epoch's
/// members but the committer) and the new epoch's roster, the old one advanced by the commit's
/// changes. Runs on a blocking thread.
fn resolve_commit(
    store: &Backend,
    domain: &Domain,
    committer: &[u8],
    old: Roster,
    group: &DsGroup,
    outcome: &CommitOutcome,
) -> Result<(Recipients, Roster), ServiceError> {
    let new_epoch = outcome.new_epoch;
    let old_epoch = new_epoch.saturating_sub(1);
    let old = if old.epoch() == old_epoch {
        old
    } else {
        // The cached roster always follows the group; should it not, start afresh from the
        // old epoch's members: those of the new one the commit did not add, and those it
        // removed.
        let added: std::collections::HashSet<u32> =
            outcome.added.iter().map(|m| m.leaf_index).collect();
        let mut before: Vec<Member> = group
            .members()
            .into_iter()
            .filter(|m| !added.contains(&m.leaf_index))
            .chain(outcome.removed.iter().cloned())
            .collect();
        before.sort_by_key(|m| m.leaf_index);
        resolve(store, domain, old_epoch, &before, None)?
    };
    let commit_to = old.all_but(committer);
    let roster = old.advance(
        new_epoch,
        (&outcome.removed, &outcome.added),
        domain,
        |clients| tokio::runtime::Handle::current().block_on(store.client_nums(clients)),
    )?;
    Ok((commit_to, roster))
}

/// Commit.
pub(crate) async fn commit(
    state: &State,
    me: &ClientId,
    req: CommitRequest,
) -> Result<CommitResponse, ServiceError> {
    check_send_rate(state, me)?;
    on_current_state(|| {
        commit_common(
            state,
            me,
            &req.group,
            false,
            (&req.commit, req.welcome.as_ref(), &req.group_info),
        )
    })
    .await
}

/// ExternalJoin.
pub(crate) async fn external_join(
    state: &State,
    me: &ClientId,
    req: ExternalJoinRequest,
) -> Result<CommitResponse, ServiceError> {
    check_send_rate(state, me)?;
    on_current_state(|| {
        commit_common(
            state,
            me,
            &req.group,
            true,
            (&req.commit, None, &req.group_info),
        )
    })
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
    let mut first = true;
    on_current_state(|| send_once(state, me, &req, None, !std::mem::take(&mut first))).await
}

/// SendCounted: SendMessage with the sender's send counter (PROTOCOL.md §7.4, "Send
/// counters").
pub(crate) async fn send_counted(
    state: &State,
    me: &ClientId,
    req: SendCountedRequest,
) -> Result<SendMessageResponse, ServiceError> {
    check_send_rate(state, me)?;
    let SendCountedRequest {
        group,
        counter,
        message,
    } = req;
    // Every engine stores counters as signed 64-bit integers.
    if i64::try_from(counter).is_err() {
        return Err(ServiceError::InvalidMessage(
            "send counter above 2^63 - 1".into(),
        ));
    }
    let req = SendMessageRequest { group, message };
    let mut first = true;
    on_current_state(|| send_once(state, me, &req, Some(counter), !std::mem::take(&mut first)))
        .await
}

/// One attempt at a send. The first attempt (`look_up` false) reads no receipt and no send
/// counter before its write: the write batch refuses a message applied already, or a counter
/// not above the stored one, as [`ServiceError::GroupMoved`], and the next attempt looks them
/// up and answers as before (the original answer, or SEND_COUNTER_USED). A new message, the
/// common case, thus costs no read transaction; a repeated one costs a retry. A message the
/// group's state refuses is looked up before the refusal is returned, as the lookup came
/// first before.
async fn send_once(
    state: &State,
    me: &ClientId,
    req: &SendMessageRequest,
    counter: Option<u64>,
    look_up: bool,
) -> Result<SendMessageResponse, ServiceError> {
    locked_group!(state, &req.group, slot);
    // A counted message has the same digest as the same bytes sent uncounted: one message.
    let submission = Submission::new(
        state,
        Kind::SendMessage,
        me,
        &req.group,
        req.message.as_slice(),
    );
    if look_up && let Some(recipients) = submission.repeated(state).await? {
        tracing::debug!(group = %req.group, sender = %me, recipients, "repeated message answered from its receipt");
        return Ok(SendMessageResponse {
            recipients: u32::try_from(recipients).unwrap_or(u32::MAX),
        });
    }
    let Some(Hosted {
        group,
        roster,
        version,
        ..
    }) = slot.as_ref()
    else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    let identity = identity_of(me)?;
    let epoch = if roster.contains(&identity) {
        group
            .check_application_message(
                req.message.as_slice(),
                u64::from(state.settings.limits.past_epochs),
            )
            .map_err(ServiceError::from)
    } else {
        Err(ServiceError::NotMember)
    };
    let epoch = match epoch {
        Ok(epoch) => epoch,
        Err(err) => {
            if !look_up && let Some(recipients) = submission.repeated(state).await? {
                return Ok(SendMessageResponse {
                    recipients: u32::try_from(recipients).unwrap_or(u32::MAX),
                });
            }
            let loaded = *version;
            let err = confirm_refusal(state, &req.group, loaded, err).await;
            if matches!(err, ServiceError::GroupMoved) {
                *slot = None;
            }
            return Err(err);
        }
    };
    let Some(Hosted {
        group,
        roster,
        version,
        ..
    }) = slot.as_ref()
    else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    let counter = match counter {
        Some(counter) if !look_up => Some(Box::new(SendCounter {
            member: receipt::member_key(me, &req.group),
            counter,
        })),
        Some(counter) => {
            let member = receipt::member_key(me, &req.group);
            let row = state.store.send_counter(member).await?;
            if let Some(row) = row
                && row.key == submission.key()
            {
                // The sender's last accepted message, repeated after its receipt expired.
                metrics::counter!("roost_repeated_requests_total").increment(1);
                return Ok(SendMessageResponse {
                    recipients: u32::try_from(row.answer).unwrap_or(u32::MAX),
                });
            }
            let highest = row.map_or(0, |row| row.counter);
            if counter <= highest {
                return Err(ServiceError::SendCounterUsed(highest));
            }
            Some(Box::new(SendCounter { member, counter }))
        }
        None => None,
    };
    // A message of an older epoch goes only to the members of that epoch: one who joined
    // later cannot read it (and would learn who talked when).
    let to = if epoch < group.epoch() {
        roster.all_but_these(&identity, &group.joined_after(epoch))
    } else {
        roster.all_but(&identity)
    };
    to.check_domains(allowed(state)).map_err(unknown_domain)?;
    tracing::debug!(
        group = %req.group,
        sender = %me,
        epoch,
        current = group.epoch(),
        local = to.local.len(),
        remote = ?to.remote.values().flatten().map(ToString::to_string).collect::<Vec<_>>(),
        "message to fan out"
    );
    let payload = QueuePayload::GroupMessage(GroupMessage {
        group: req.group.clone(),
        message: req.message.clone(),
    });
    let max_depth = state.settings.limits.max_queue_depth;
    let write = GroupWrite {
        key: group.group_id(),
        loaded: *version,
        state: None,
        receipt: Some(Receipt {
            counter,
            ..submission.receipt(Answer::Reached)
        }),
        lazy: false,
    };
    let loaded = *version;
    // The message takes its place in the store's order under the lock (the group's order),
    // and the lock goes before its durable write: the group's next message is submitted
    // meanwhile and shares the store's batch (docs/ARCHITECTURE.md, "One group's messages
    // share the write batches").
    let applying = match state
        .store
        .submit(
            write,
            vec![to.with(payload, state.clock.unix_millis())],
            max_depth,
        )
        .await
    {
        Err(ServiceError::GroupMoved) => {
            *slot = None;
            return Err(ServiceError::GroupMoved);
        }
        other => other?,
    };
    drop(slot);
    let result = match applying.durable().await {
        Err(ServiceError::GroupMoved) => {
            forget_moved(state, &req.group, loaded).await;
            return Err(ServiceError::GroupMoved);
        }
        other => other?,
    };
    let reached = result.wake(state).first().copied().unwrap_or(0);
    metrics::histogram!("roost_fanout_recipients").record(f64::from(reached));
    Ok(SendMessageResponse {
        recipients: reached,
    })
}

/// Drops the cached state of `group` if it is still the one loaded at version `loaded` (a
/// write against it was refused because the group moved on; a state loaded since stays).
async fn forget_moved(state: &State, group: &GroupId, loaded: u64) {
    let entry = state.groups.entry(group);
    let mut slot = entry.lock().await;
    if slot.as_ref().is_some_and(|hosted| hosted.version == loaded) {
        *slot = None;
    }
}

/// LeaveGroup: stores the self-remove proposal and fans it out.
pub(crate) async fn leave(
    state: &State,
    me: &ClientId,
    req: LeaveGroupRequest,
) -> Result<LeaveGroupResponse, ServiceError> {
    check_send_rate(state, me)?;
    on_current_state(|| leave_once(state, me, &req)).await
}

async fn leave_once(
    state: &State,
    me: &ClientId,
    req: &LeaveGroupRequest,
) -> Result<LeaveGroupResponse, ServiceError> {
    locked_group!(state, &req.group, slot);
    let submission = Submission::new(
        state,
        Kind::LeaveGroup,
        me,
        &req.group,
        req.proposal.as_slice(),
    );
    if submission.repeated(state).await?.is_some() {
        return Ok(LeaveGroupResponse {});
    }
    let Some(Hosted {
        mut group,
        roster,
        version,
        persisted,
    }) = slot.take()
    else {
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
    if let Err(err) = result {
        let err = confirm_refusal(state, &req.group, version, err.into()).await;
        if !matches!(err, ServiceError::GroupMoved) {
            *slot = Some(Hosted {
                group,
                roster,
                version,
                persisted,
            });
        }
        return Err(err);
    }
    // A proposal does not change the membership: the epoch's roster still holds.
    let to = roster.all_but(&identity);
    to.check_domains(allowed(state)).map_err(unknown_domain)?;
    let (stored, persisted) = GroupState::after(&group, version + 1, &persisted)?;
    let written = stored.written();
    let write = GroupWrite {
        key: group.group_id(),
        loaded: version,
        state: Some(stored),
        receipt: Some(submission.receipt(Answer::Value(0))),
        lazy: false,
    };
    let payload = QueuePayload::GroupMessage(GroupMessage {
        group: req.group.clone(),
        message: req.proposal.clone(),
    });
    let max_depth = state.settings.limits.max_queue_depth;
    let result = state
        .store
        .apply(
            write,
            vec![to.with(payload, state.clock.unix_millis())],
            max_depth,
        )
        .await?;
    count_state_write(written);
    *slot = Some(Hosted {
        group,
        roster,
        version: version + 1,
        persisted,
    });
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
    // Serve the current state even if another node moved the group on since it was cached.
    let stored = state.store.group_version(req.group.to_mls_bytes()).await?;
    if slot.as_ref().map(|hosted| hosted.version) != stored {
        *slot = Some(load(state, &req.group).await?);
    }
    let Some(Hosted { group, roster, .. }) = slot.as_ref() else {
        return Err(ServiceError::Internal("group state missing".into()));
    };
    if !roster.contains(&identity_of(me)?) {
        return Err(ServiceError::NotMember);
    }
    Ok(FetchGroupInfoResponse {
        epoch: group.epoch(),
        group_info: group.group_info().into(),
        ratchet_tree: group.export_ratchet_tree().into(),
    })
}

/// Shared type of the per-group slot, for the cache.
pub(crate) type GroupSlot = Arc<tokio::sync::Mutex<Option<Hosted>>>;
