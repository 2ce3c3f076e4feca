//! The profile database: one redb file holding the client's keys, openmls's group state and
//! the SDK's own state, so that everything a conversation needs survives an app restart.
//!
//! Tables:
//!
//! | table | key → value |
//! |---|---|
//! | `meta` | name → bytes: schema version, the [`Profile`], the last processed queue seq, the next event id, the next outgoing queue position, the next send counter |
//! | `mls` | openmls storage key → value (see [`provider`]) |
//! | `groups` | MLS group id → [`GroupRecord`] |
//! | `events` | event id → event not yet taken by the app |
//! | `verified` | encoded ClientId ‖ signature key → `not_after` of the AS credential that vouched for it |
//! | `pending` | MLS group id → [`PendingCommit`]: a commit sent (or about to be) whose outcome is not known yet |
//! | `outbox` | queue position → [`OutgoingRecord`]: an application message not yet accepted by the hub, or failed and not yet dismissed |
//!
//! Writes happen only in [`Store::commit`]: the openmls overlay and a [`Changes`] set go into
//! one durable write transaction.

pub(crate) mod provider;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use roost_protocol::messages::auth::ClientCredential;
use roost_protocol::{ClientId, GroupId, Opaque};
use tls_codec::{DeserializeBytes, TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::event::{Event, StoredEvent, StoredOutgoingState};

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const MLS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("mls");
const GROUPS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("groups");
const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
const VERIFIED: TableDefinition<'_, &[u8], u64> = TableDefinition::new("verified");
const PENDING: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("pending");
const OUTBOX: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("outbox");
/// Ids of application messages received (PROTOCOL.md §4.5, "Message ids"): key (see
/// [`seen_key`]) → its number in `SEEN_ORDER`.
const SEEN: TableDefinition<'_, &[u8], u64> = TableDefinition::new("seen");
/// The same keys in the order they were received, so the oldest go first.
const SEEN_ORDER: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("seen_order");

/// How many received message ids a profile remembers (all groups together, about 80 bytes
/// each): a copy of one of them is dropped. Docs: CLIENT.md "Duplicates".
pub(crate) const MAX_SEEN_IDS: u64 = 65_536;

/// The key of a received message id: its group, its sender and the id, length-prefixed.
pub(crate) fn seen_key(group: &GroupId, sender: &roost_protocol::ClientId, id: u64) -> Vec<u8> {
    let group = group.to_mls_bytes();
    let sender = sender.to_string();
    let mut key = Vec::with_capacity(group.len() + sender.len() + 12);
    key.extend_from_slice(&(group.len() as u16).to_be_bytes());
    key.extend_from_slice(&group);
    key.extend_from_slice(&(sender.len() as u16).to_be_bytes());
    key.extend_from_slice(sender.as_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

const SCHEMA_VERSION: u64 = 1;
const KEY_SCHEMA: &str = "schema";
const KEY_PROFILE: &str = "profile";
const KEY_LAST_SEQ: &str = "last_seq";
const KEY_NEXT_EVENT: &str = "next_event";
const KEY_NEXT_OUTGOING: &str = "next_outgoing";
const KEY_NEXT_COUNTER: &str = "next_send_counter";
const KEY_NEXT_SEEN: &str = "next_seen";

/// A failure of the profile database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O, corruption).
    #[error("database: {0}")]
    Database(String),
    /// A stored value does not decode: the file is damaged or of another program.
    #[error("corrupt profile database: {0}")]
    Corrupt(String),
    /// The database was written by an SDK with another schema.
    #[error("profile database schema {found}, this SDK reads {SCHEMA_VERSION}")]
    Schema {
        /// The schema found in the file.
        found: u64,
    },
    /// Another client holds the database open (in this process or another: one profile, one
    /// client at a time).
    #[error("the profile database is open in another client")]
    InUse,
}

impl From<redb::DatabaseError> for StoreError {
    fn from(err: redb::DatabaseError) -> Self {
        match err {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse,
            err => StoreError::Database(err.to_string()),
        }
    }
}

macro_rules! db_err {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(err: $ty) -> Self {
                StoreError::Database(err.to_string())
            }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Who this profile is: the client, its keys and its AS credential.
#[derive(Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub(crate) struct Profile {
    pub(crate) client: ClientId,
    /// The client's Ed25519 key pair (connection auth and MLS signatures), secret.
    pub(crate) client_key: Opaque,
    /// The user's key pair, if this device holds it (it signs device additions), secret.
    pub(crate) user_key: Option<Opaque>,
    pub(crate) credential: ClientCredential,
}

impl std::fmt::Debug for Profile {
    // Not derived: never print private keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// What the SDK keeps about a group besides openmls's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub(crate) struct GroupRecord {
    /// 1 once this client asked to leave (its removal is pending).
    pub(crate) leaving: u8,
    /// The epoch in which this client (its current leaf) joined: messages of earlier epochs
    /// were never meant for it. 0 in records written before this was kept.
    pub(crate) joined_epoch: u64,
}

impl GroupRecord {
    /// A group this client has just joined (or created) at `epoch`.
    pub(crate) fn joined(epoch: u64) -> Self {
        Self {
            leaving: 0,
            joined_epoch: epoch,
        }
    }

    /// Reads a record, also in its first layout (the `leaving` byte alone).
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes {
            [leaving] => Ok(Self {
                leaving: *leaving,
                joined_epoch: 0,
            }),
            _ => decode(bytes, "group record"),
        }
    }
}

/// A commit of ours whose outcome is not known yet: the request as sent (the same bytes are
/// sent again until the DS answers) and the openmls writes that merging it makes, kept aside
/// (the group's stored state stays at the old epoch until they are applied).
#[derive(Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub(crate) struct PendingCommit {
    pub(crate) commit: Opaque,
    pub(crate) welcome: Option<Opaque>,
    pub(crate) group_info: Opaque,
    /// The new epoch's group context (to recognise the commit in the DS's GroupInfo).
    pub(crate) context: Opaque,
    writes: Vec<PendingWrite>,
    /// [`PendingKind`] as a byte.
    kind: u8,
    /// The members the commit adds and removes (for the event when it is settled later).
    pub(crate) added: Vec<ClientId>,
    pub(crate) removed: Vec<ClientId>,
}

/// What a pending commit was sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingKind {
    /// A Commit of a member.
    Commit,
    /// An ExternalJoin (a rejoin by external commit).
    ExternalJoin,
}

/// The first layout of [`PendingCommit`] (before external joins and the member lists).
#[derive(TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct PendingCommitV1 {
    commit: Opaque,
    welcome: Option<Opaque>,
    group_info: Opaque,
    context: Opaque,
    writes: Vec<PendingWrite>,
}

impl PendingCommit {
    /// A commit about to be sent; the writes of merging it are added by
    /// [`Store::stash_pending`].
    pub(crate) fn new(
        kind: PendingKind,
        commit: Opaque,
        welcome: Option<Opaque>,
        group_info: Opaque,
        context: Opaque,
    ) -> Self {
        Self {
            commit,
            welcome,
            group_info,
            context,
            writes: Vec::new(),
            kind: match kind {
                PendingKind::Commit => 0,
                PendingKind::ExternalJoin => 1,
            },
            added: Vec::new(),
            removed: Vec::new(),
        }
    }

    pub(crate) fn kind(&self) -> PendingKind {
        if self.kind == 1 {
            PendingKind::ExternalJoin
        } else {
            PendingKind::Commit
        }
    }

    /// Reads a record, also in its first layout.
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match decode::<Self>(bytes, "pending commit") {
            Ok(record) => Ok(record),
            Err(err) => match PendingCommitV1::tls_deserialize_exact_bytes(bytes) {
                Ok(old) => Ok(Self {
                    commit: old.commit,
                    welcome: old.welcome,
                    group_info: old.group_info,
                    context: old.context,
                    writes: old.writes,
                    kind: 0,
                    added: Vec::new(),
                    removed: Vec::new(),
                }),
                Err(_) => Err(err),
            },
        }
    }
}

impl std::fmt::Debug for PendingCommit {
    // Not derived: the writes hold secrets of the new epoch.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCommit").finish_non_exhaustive()
    }
}

#[derive(Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct PendingWrite {
    // Debug (required by tls_codec's Vec) shows no values: they hold secrets.
    key: Opaque,
    value: Option<Opaque>,
}

impl std::fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingWrite").finish_non_exhaustive()
    }
}

/// A message of the outgoing queue: the ciphertext as it is sent (the same bytes on every
/// retry) and the plaintext (to encrypt it again if the hub refuses it for its epoch, which
/// means it was never delivered).
#[derive(Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub(crate) struct OutgoingRecord {
    pub(crate) id: u64,
    pub(crate) group: GroupId,
    /// Milliseconds since the Unix epoch when it was queued.
    pub(crate) queued_at_ms: u64,
    pub(crate) message: Opaque,
    pub(crate) plaintext: Opaque,
    /// `Queued` or `Failed` (sent messages are deleted).
    pub(crate) state: StoredOutgoingState,
    /// Its send counter (PROTOCOL.md §7.4, "Send counters"): given by [`Store::commit`] when
    /// the record is pushed (the profile's next one: every message this profile queues, in
    /// any group, gets a higher one than the last). 0 in records queued before counters were
    /// kept: those are sent uncounted.
    pub(crate) counter: u64,
}

/// The first layout of [`OutgoingRecord`] (before send counters).
#[derive(TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct OutgoingRecordV1 {
    id: u64,
    group: GroupId,
    queued_at_ms: u64,
    message: Opaque,
    plaintext: Opaque,
    state: StoredOutgoingState,
}

impl OutgoingRecord {
    /// Reads a record, also in its first layout.
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match decode::<Self>(bytes, "outgoing message") {
            Ok(record) => Ok(record),
            Err(err) => match OutgoingRecordV1::tls_deserialize_exact_bytes(bytes) {
                Ok(old) => Ok(Self {
                    id: old.id,
                    group: old.group,
                    queued_at_ms: old.queued_at_ms,
                    message: old.message,
                    plaintext: old.plaintext,
                    state: old.state,
                    counter: 0,
                }),
                Err(_) => Err(err),
            },
        }
    }
}

impl std::fmt::Debug for OutgoingRecord {
    // Not derived: never print message bodies.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingRecord")
            .field("id", &self.id)
            .field("group", &self.group)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// A change to the outgoing queue.
#[derive(Debug)]
pub(crate) enum OutgoingChange {
    /// Append at the end of the queue.
    Push(OutgoingRecord),
    /// Replace the record at this position.
    Put(u64, OutgoingRecord),
    /// Delete the record at this position.
    Remove(u64),
}

/// The SDK's side of one state change, written with the openmls overlay.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) profile: Option<Profile>,
    pub(crate) last_seq: Option<u64>,
    pub(crate) groups: Vec<(GroupId, Option<GroupRecord>)>,
    pub(crate) events: Vec<Event>,
    pub(crate) delete_events_up_to: Option<u64>,
    pub(crate) verified: Vec<(ClientId, Vec<u8>, u64)>,
    pub(crate) pending: Vec<(GroupId, Option<PendingCommit>)>,
    pub(crate) outgoing: Vec<OutgoingChange>,
    /// The next send counter to give (applied before `outgoing`'s pushes take theirs).
    pub(crate) next_counter: Option<u64>,
    /// Received message ids to remember ([`seen_key`]).
    pub(crate) seen: Vec<Vec<u8>>,
}

impl Changes {
    pub(crate) fn event(&mut self, event: Event) {
        self.events.push(event);
    }
}

/// The profile database plus openmls's pending writes.
pub(crate) struct Store {
    db: Database,
    /// openmls writes not yet committed: key → value, `None` = deleted.
    overlay: Mutex<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn encode<T: tls_codec::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    value
        .tls_serialize_detached()
        .map_err(|e| StoreError::Corrupt(format!("encoding: {e}")))
}

fn decode<T: DeserializeBytes>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    T::tls_deserialize_exact_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn u64_value(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("counter".into()))?;
    Ok(u64::from_be_bytes(array))
}

/// Creates the profile database file readable and writable by its owner only (it holds the
/// device's private keys and group secrets), or narrows an existing one to that.
fn owner_only(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
            }
            Err(err) => {
                return Err(StoreError::Database(format!("{}: {err}", path.display())));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The key of a verified (client, signature key) pair.
fn verified_key(client: &ClientId, key: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut out = encode(client)?;
    out.extend_from_slice(key);
    Ok(out)
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        owner_only(path)?;
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta
                .get(KEY_SCHEMA)?
                .map(|v| u64_value(v.value()))
                .transpose()?;
            match found {
                None => {
                    meta.insert(KEY_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => return Err(StoreError::Schema { found }),
            }
            txn.open_table(MLS)?;
            txn.open_table(GROUPS)?;
            txn.open_table(EVENTS)?;
            txn.open_table(VERIFIED)?;
            txn.open_table(PENDING)?;
            txn.open_table(OUTBOX)?;
            txn.open_table(SEEN)?;
            txn.open_table(SEEN_ORDER)?;
        }
        txn.commit()?;
        Ok(Self {
            db,
            overlay: Mutex::new(BTreeMap::new()),
        })
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Option<Vec<u8>>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts).
        self.overlay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn overlay_put(&self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.overlay().insert(key, value);
    }

    /// An openmls value: the overlay's if it has one, else the database's.
    pub(crate) fn mls_read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(pending) = self.overlay().get(key) {
            return Ok(pending.clone());
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MLS)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Drops openmls's uncommitted writes (the operation they belong to failed).
    pub(crate) fn discard(&self) {
        self.overlay().clear();
    }

    /// Writes openmls's pending writes and `changes` in one durable transaction. Returns the
    /// ids given to `changes.events`. On failure nothing is written and the overlay is
    /// dropped too (the database stays the truth).
    pub(crate) fn commit(&self, changes: Changes) -> Result<(), StoreError> {
        let overlay = std::mem::take(&mut *self.overlay());
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut mls = txn.open_table(MLS)?;
            for (key, value) in &overlay {
                match value {
                    Some(value) => mls.insert(key.as_slice(), value.as_slice())?,
                    None => mls.remove(key.as_slice())?,
                };
            }
            let mut meta = txn.open_table(META)?;
            if let Some(profile) = &changes.profile {
                meta.insert(KEY_PROFILE, encode(profile)?.as_slice())?;
            }
            if let Some(seq) = changes.last_seq {
                meta.insert(KEY_LAST_SEQ, seq.to_be_bytes().as_slice())?;
            }
            let mut groups = txn.open_table(GROUPS)?;
            for (group, record) in &changes.groups {
                let key = group.to_mls_bytes();
                match record {
                    Some(record) => groups.insert(key.as_slice(), encode(record)?.as_slice())?,
                    None => groups.remove(key.as_slice())?,
                };
            }
            let mut events = txn.open_table(EVENTS)?;
            if let Some(up_to) = changes.delete_events_up_to {
                events.retain_in(..=up_to, |_, _| false)?;
            }
            if !changes.events.is_empty() {
                let mut next = meta
                    .get(KEY_NEXT_EVENT)?
                    .map(|v| u64_value(v.value()))
                    .transpose()?
                    .unwrap_or(1);
                for event in &changes.events {
                    events.insert(next, encode(&StoredEvent::from(event))?.as_slice())?;
                    next += 1;
                }
                meta.insert(KEY_NEXT_EVENT, next.to_be_bytes().as_slice())?;
            }
            let mut verified = txn.open_table(VERIFIED)?;
            for (client, key, not_after) in &changes.verified {
                verified.insert(verified_key(client, key)?.as_slice(), *not_after)?;
            }
            let mut pending = txn.open_table(PENDING)?;
            for (group, record) in &changes.pending {
                let key = group.to_mls_bytes();
                match record {
                    Some(record) => pending.insert(key.as_slice(), encode(record)?.as_slice())?,
                    None => pending.remove(key.as_slice())?,
                };
            }
            let mut outbox = txn.open_table(OUTBOX)?;
            if let Some(next) = changes.next_counter {
                meta.insert(KEY_NEXT_COUNTER, next.to_be_bytes().as_slice())?;
            }
            for change in &changes.outgoing {
                match change {
                    OutgoingChange::Push(record) => {
                        let next = meta
                            .get(KEY_NEXT_OUTGOING)?
                            .map(|v| u64_value(v.value()))
                            .transpose()?
                            .unwrap_or(1);
                        let counter = meta
                            .get(KEY_NEXT_COUNTER)?
                            .map(|v| u64_value(v.value()))
                            .transpose()?
                            .unwrap_or(1);
                        let record = OutgoingRecord {
                            counter,
                            ..record.clone()
                        };
                        outbox.insert(next, encode(&record)?.as_slice())?;
                        meta.insert(KEY_NEXT_OUTGOING, (next + 1).to_be_bytes().as_slice())?;
                        meta.insert(KEY_NEXT_COUNTER, (counter + 1).to_be_bytes().as_slice())?;
                    }
                    OutgoingChange::Put(position, record) => {
                        outbox.insert(*position, encode(record)?.as_slice())?;
                    }
                    OutgoingChange::Remove(position) => {
                        outbox.remove(*position)?;
                    }
                }
            }
            if !changes.seen.is_empty() {
                let mut seen = txn.open_table(SEEN)?;
                let mut order = txn.open_table(SEEN_ORDER)?;
                let mut next = meta
                    .get(KEY_NEXT_SEEN)?
                    .map(|v| u64_value(v.value()))
                    .transpose()?
                    .unwrap_or(0);
                for key in &changes.seen {
                    if let Some(old) = seen.insert(key.as_slice(), next)? {
                        order.remove(old.value())?;
                    }
                    order.insert(next, key.as_slice())?;
                    next += 1;
                }
                meta.insert(KEY_NEXT_SEEN, next.to_be_bytes().as_slice())?;
                // The oldest beyond the bound go.
                while seen.len()? > MAX_SEEN_IDS {
                    let Some((_, key)) = order.pop_first()? else {
                        break;
                    };
                    seen.remove(key.value())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Whether a message id was received before ([`seen_key`]).
    pub(crate) fn seen(&self, key: &[u8]) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(SEEN)?.get(key)?.is_some())
    }

    /// The outgoing queue in order: (position, record).
    pub(crate) fn outbox(&self) -> Result<Vec<(u64, OutgoingRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (position, value) = entry?;
            out.push((position.value(), OutgoingRecord::decode(value.value())?));
        }
        Ok(out)
    }

    /// The send counter the next queued message gets.
    pub(crate) fn next_counter(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta
            .get(KEY_NEXT_COUNTER)?
            .map(|v| u64_value(v.value()))
            .transpose()?
            .unwrap_or(1))
    }

    /// The first message of the outgoing queue still to be sent.
    pub(crate) fn next_queued(&self) -> Result<Option<(u64, OutgoingRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        for entry in table.iter()? {
            let (position, value) = entry?;
            let record = OutgoingRecord::decode(value.value())?;
            if matches!(record.state, StoredOutgoingState::Queued) {
                return Ok(Some((position.value(), record)));
            }
        }
        Ok(None)
    }

    /// Durably sets the overlay (the writes of merging our commit for `group`) aside as that
    /// group's pending commit, with the request that carries it; the group's stored state stays
    /// at the old epoch. The overlay is empty afterwards.
    pub(crate) fn stash_pending(
        &self,
        group: &GroupId,
        mut record: PendingCommit,
    ) -> Result<PendingCommit, StoreError> {
        let overlay = std::mem::take(&mut *self.overlay());
        record.writes = overlay
            .into_iter()
            .map(|(key, value)| PendingWrite {
                key: key.into(),
                value: value.map(Into::into),
            })
            .collect();
        self.commit(Changes {
            pending: vec![(group.clone(), Some(record.clone()))],
            ..Changes::default()
        })?;
        Ok(record)
    }

    /// Applies `group`'s pending commit (our commit was accepted: the group moves to its new
    /// epoch) with `changes`, in one durable transaction; drops the record. Any uncommitted
    /// overlay is dropped first.
    pub(crate) fn apply_pending(
        &self,
        group: &GroupId,
        record: PendingCommit,
        mut changes: Changes,
    ) -> Result<(), StoreError> {
        {
            let mut overlay = self.overlay();
            overlay.clear();
            for write in record.writes {
                overlay.insert(write.key.into_vec(), write.value.map(Opaque::into_vec));
            }
        }
        changes.pending.push((group.clone(), None));
        self.commit(changes)
    }

    /// Drops `group`'s pending commit (refused: the group stays at its stored state). Any
    /// uncommitted overlay is dropped too.
    pub(crate) fn drop_pending(&self, group: &GroupId) -> Result<(), StoreError> {
        self.discard();
        self.commit(Changes {
            pending: vec![(group.clone(), None)],
            ..Changes::default()
        })
    }

    /// `group`'s pending commit, if it has one.
    pub(crate) fn pending_commit(
        &self,
        group: &GroupId,
    ) -> Result<Option<PendingCommit>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PENDING)?;
        let key = group.to_mls_bytes();
        match table.get(key.as_slice())? {
            Some(value) => Ok(Some(decode(value.value(), "pending commit")?)),
            None => Ok(None),
        }
    }

    /// Every pending commit, by group.
    pub(crate) fn pending_commits(&self) -> Result<Vec<(GroupId, PendingCommit)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PENDING)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let group = GroupId::from_mls_bytes(key.value())
                .map_err(|_| StoreError::Corrupt("pending commit's group id".into()))?;
            out.push((group, PendingCommit::decode(value.value())?));
        }
        Ok(out)
    }

    pub(crate) fn profile(&self) -> Result<Option<Profile>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        meta.get(KEY_PROFILE)?
            .map(|v| decode(v.value(), "profile"))
            .transpose()
    }

    /// The highest queue seq whose effect is stored (0 if none).
    pub(crate) fn last_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta
            .get(KEY_LAST_SEQ)?
            .map(|v| u64_value(v.value()))
            .transpose()?
            .unwrap_or(0))
    }

    pub(crate) fn groups(&self) -> Result<Vec<(GroupId, GroupRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(GROUPS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let group = GroupId::from_mls_bytes(key.value())
                .map_err(|e| StoreError::Corrupt(format!("group id: {e}")))?;
            out.push((group, GroupRecord::decode(value.value())?));
        }
        Ok(out)
    }

    pub(crate) fn group(&self, group: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(GROUPS)?;
        table
            .get(group.to_mls_bytes().as_slice())?
            .map(|v| GroupRecord::decode(v.value()))
            .transpose()
    }

    /// The oldest event the app has not taken, after `after`.
    pub(crate) fn next_event(&self, after: u64) -> Result<Option<(u64, Event)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let Some(entry) = table.range(after.saturating_add(1)..)?.next() else {
            return Ok(None);
        };
        let (id, bytes) = entry?;
        let stored: StoredEvent = decode(bytes.value(), "event")?;
        Ok(Some((id.value(), stored.into())))
    }

    /// Deletes the events the app has taken (ids up to `up_to`). Touches nothing else, so it
    /// needs no state lock.
    pub(crate) fn delete_events_up_to(&self, up_to: u64) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.open_table(EVENTS)?.retain_in(..=up_to, |_, _| false)?;
        txn.commit()?;
        Ok(())
    }

    /// `not_after` of the AS credential that vouched for `key` as `client`'s key, if any.
    pub(crate) fn verified(
        &self,
        client: &ClientId,
        key: &[u8],
    ) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VERIFIED)?;
        Ok(table
            .get(verified_key(client, key)?.as_slice())?
            .map(|v| v.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> GroupId {
        "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
            .parse()
            .unwrap()
    }

    #[test]
    fn overlay_is_invisible_on_disk_until_committed_and_gone_when_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.redb");
        let store = Store::open(&path).unwrap();
        store.overlay_put(b"k".to_vec(), Some(b"v".to_vec()));
        assert_eq!(store.mls_read(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        store.discard();
        assert_eq!(store.mls_read(b"k").unwrap(), None);

        store.overlay_put(b"k".to_vec(), Some(b"v2".to_vec()));
        let changes = Changes {
            last_seq: Some(7),
            groups: vec![(group(), Some(GroupRecord::joined(0)))],
            ..Changes::default()
        };
        store.commit(changes).unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.mls_read(b"k").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(store.last_seq().unwrap(), 7);
        assert_eq!(store.groups().unwrap().len(), 1);
        store.overlay_put(b"k".to_vec(), None);
        store.commit(Changes::default()).unwrap();
        assert_eq!(store.mls_read(b"k").unwrap(), None);
    }

    #[cfg(unix)]
    #[test]
    fn the_profile_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let path = dir.path().join("new.redb");
        drop(Store::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
        // A profile written by an older SDK with the default mode is narrowed when opened,
        // and keeps what it holds.
        let old = dir.path().join("old.redb");
        {
            let store = Store::open(&old).unwrap();
            store
                .commit(Changes {
                    last_seq: Some(3),
                    ..Changes::default()
                })
                .unwrap();
        }
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(store.last_seq().unwrap(), 3);
    }

    #[test]
    fn group_records_keep_the_join_epoch_and_old_records_still_read() {
        let record = GroupRecord::joined(5);
        let bytes = encode(&record).unwrap();
        assert_eq!(GroupRecord::decode(&bytes).unwrap(), record);
        // The first layout: the `leaving` byte alone.
        assert_eq!(
            GroupRecord::decode(&[1]).unwrap(),
            GroupRecord {
                leaving: 1,
                joined_epoch: 0
            }
        );
        assert!(GroupRecord::decode(&[]).is_err());
    }

    #[test]
    fn events_are_kept_until_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("p.redb")).unwrap();
        let event = |n: u8| Event::GroupError {
            group: group(),
            reason: format!("e{n}"),
        };
        let mut changes = Changes::default();
        changes.event(event(1));
        changes.event(event(2));
        store.commit(changes).unwrap();
        let (first, e1) = store.next_event(0).unwrap().unwrap();
        assert_eq!(e1, event(1));
        let (second, e2) = store.next_event(first).unwrap().unwrap();
        assert_eq!(e2, event(2));
        store
            .commit(Changes {
                delete_events_up_to: Some(first),
                ..Changes::default()
            })
            .unwrap();
        assert_eq!(store.next_event(0).unwrap().unwrap().0, second);
    }
}
