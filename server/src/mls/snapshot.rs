//! The persisted form of a DS group: the entries openmls writes to its storage provider for the
//! group's `PublicGroup`, plus the DS's own GroupInfo and pending proposals, in one versioned
//! byte string.
//!
//! openmls persists a `PublicGroup` through a `PublicStorageProvider` and rebuilds it with
//! `PublicGroup::load`, which takes the stored state as it is. Rebuilding from GroupInfo and
//! ratchet tree instead (`PublicGroup::from_external`) re-validates every leaf against the clock,
//! so a member whose KeyPackage lifetime ran out after it joined would make the group impossible
//! to load. The envelope is TLS-encoded behind a format version byte. These bytes only ever
//! come from the DS's own store.
//!
//! Each value openmls hands over is encoded with serde: format 2 writes postcard (a compact
//! binary serde format) behind a [`POSTCARD`] marker byte; format 1 wrote serde_json, as
//! openmls's own storage providers do. serde_json output never starts with that byte, so values
//! of both kinds are read back and a group stored in format 1 migrates value by value as
//! openmls rewrites them. JSON turns every byte of a key or hash into up to four characters:
//! the ratchet tree of a 1,000-member group was ≈ 1 MB per commit to encode and write.

use std::cell::RefCell;

use openmls_traits::public_storage::PublicStorageProvider;
use openmls_traits::storage::{CURRENT_VERSION, traits};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tls_codec::{
    DeserializeBytes as _, Serialize as _, Size as _, TlsDeserializeBytes, TlsSerialize, TlsSize,
    VLByteSlice, VLBytes,
};

/// The first byte of every snapshot. Bump it (and keep a decoder for the old one) whenever
/// the envelope, the value encoding or openmls's storage version changes. Format 1 (values in
/// serde_json only) and format 2 (without the recent joins) are still read.
const FORMAT_VERSION: u8 = 3;

/// The formats [`Snapshot::decode`] reads.
const READABLE_VERSIONS: [u8; 3] = [1, 2, FORMAT_VERSION];

/// First byte of a postcard-encoded value. serde_json output starts with `{`, `[`, `"`, a digit,
/// `-`, `t`, `f` or `n`, never with this.
const POSTCARD: u8 = 0;

/// Why a snapshot cannot be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("group snapshot: {0}")]
pub(super) struct SnapshotError(String);

impl SnapshotError {
    fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// What openmls stored for one public group, as encoded values (see the module docs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct StoredState {
    pub(super) tree: Option<Vec<u8>>,
    context: Option<Vec<u8>>,
    interim_transcript_hash: Option<Vec<u8>>,
    confirmation_tag: Option<Vec<u8>>,
    /// (ProposalRef, QueuedProposal), in queue order.
    proposals: Vec<(Vec<u8>, Vec<u8>)>,
    /// A value openmls handed over did not serialize. openmls writes after it changed its
    /// in-memory state, so the write itself reports success and the failure sticks here: such
    /// a state cannot be snapshotted, and its owner must be discarded.
    failure: Option<String>,
    /// Writes values and the envelope as format 1 did, to test reading it.
    #[cfg(test)]
    pub(super) legacy_json: bool,
}

impl StoredState {
    fn serialize(&mut self, value: &impl Serialize) -> Option<Vec<u8>> {
        #[cfg(test)]
        if self.legacy_json {
            return json_of(value);
        }
        match encode_value(value) {
            Ok(bytes) => Some(bytes),
            Err(err) => {
                self.failure.get_or_insert_with(|| err.to_string());
                None
            }
        }
    }
}

/// A pending proposal as the DS keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PendingProposal {
    /// The MLSMessage as received.
    pub(super) message: Vec<u8>,
    /// Its ProposalRef.
    pub(super) reference: Vec<u8>,
    /// The leaf that sent it (and leaves).
    pub(super) leaf: u32,
}

/// Everything a DS group is rebuilt from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Snapshot {
    /// The GroupInfo MLSMessage of the current epoch, as received.
    pub(super) group_info: Vec<u8>,
    /// In arrival order.
    pub(super) pending: Vec<PendingProposal>,
    pub(super) state: StoredState,
    /// Members that joined in recent epochs: (credential identity, epoch of the join).
    /// Format 3 on; empty when read from an older format.
    pub(super) joins: Vec<(Vec<u8>, u64)>,
}

/// One recent join, format 3.
#[derive(Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct JoinV3 {
    identity: VLBytes,
    epoch: u64,
}

#[derive(Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct PendingV1 {
    message: VLBytes,
    reference: VLBytes,
    leaf: u32,
}

#[derive(Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct ProposalV1 {
    reference: VLBytes,
    proposal: VLBytes,
}

/// Format 1, after the version byte.
#[derive(Debug, TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct SnapshotV1 {
    group_info: VLBytes,
    pending: Vec<PendingV1>,
    tree: VLBytes,
    context: VLBytes,
    interim_transcript_hash: VLBytes,
    confirmation_tag: VLBytes,
    proposals: Vec<ProposalV1>,
}

impl Snapshot {
    #[cfg(test)]
    pub(super) fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        encode(&self.group_info, &self.pending, &self.state, &self.joins)
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err(SnapshotError::new("empty"));
        };
        if !READABLE_VERSIONS.contains(&version) {
            return Err(SnapshotError::new(format!(
                "unknown format version {version}"
            )));
        }
        let (v1, rest) = SnapshotV1::tls_deserialize_bytes(rest)
            .map_err(|e| SnapshotError::new(e.to_string()))?;
        // Format 3 appends the recent joins.
        let joins = if version >= 3 {
            match Vec::<JoinV3>::tls_deserialize_bytes(rest) {
                Ok((joins, [])) => joins
                    .into_iter()
                    .map(|j| (j.identity.into(), j.epoch))
                    .collect(),
                Ok(_) => return Err(SnapshotError::new("trailing bytes")),
                Err(e) => return Err(SnapshotError::new(e.to_string())),
            }
        } else if rest.is_empty() {
            Vec::new()
        } else {
            return Err(SnapshotError::new("trailing bytes"));
        };
        Ok(Snapshot {
            group_info: v1.group_info.into(),
            pending: v1
                .pending
                .into_iter()
                .map(|p| PendingProposal {
                    message: p.message.into(),
                    reference: p.reference.into(),
                    leaf: p.leaf,
                })
                .collect(),
            state: StoredState {
                tree: Some(v1.tree.into()),
                context: Some(v1.context.into()),
                interim_transcript_hash: Some(v1.interim_transcript_hash.into()),
                confirmation_tag: Some(v1.confirmation_tag.into()),
                proposals: v1
                    .proposals
                    .into_iter()
                    .map(|p| (p.reference.into(), p.proposal.into()))
                    .collect(),
                failure: None,
                #[cfg(test)]
                legacy_json: false,
            },
            joins,
        })
    }
}

/// Encodes a snapshot from its parts without copying them first: the bytes are exactly those
/// of [`SnapshotV1`] behind the version byte, then (format 3) the recent joins as a vector of
/// [`JoinV3`] (a TLS vector `T items<V>` is its items' encodings behind a varint of their
/// total length, which is what [`VLByteSlice`] writes).
pub(super) fn encode(
    group_info: &[u8],
    pending: &[PendingProposal],
    state: &StoredState,
    joins: &[(Vec<u8>, u64)],
) -> Result<Vec<u8>, SnapshotError> {
    if let Some(failure) = &state.failure {
        return Err(SnapshotError::new(format!(
            "openmls state did not serialize: {failure}"
        )));
    }
    fn required<'a>(value: &'a Option<Vec<u8>>, name: &str) -> Result<&'a [u8], SnapshotError> {
        value
            .as_deref()
            .ok_or_else(|| SnapshotError::new(format!("openmls did not store the {name}")))
    }
    let tree = required(&state.tree, "tree")?;
    let context = required(&state.context, "group context")?;
    let transcript = required(&state.interim_transcript_hash, "interim transcript hash")?;
    let tag = required(&state.confirmation_tag, "confirmation tag")?;
    let tls = |e: tls_codec::Error| SnapshotError::new(e.to_string());
    let mut pending_items = Vec::new();
    for p in pending {
        VLByteSlice(&p.message)
            .tls_serialize(&mut pending_items)
            .map_err(tls)?;
        VLByteSlice(&p.reference)
            .tls_serialize(&mut pending_items)
            .map_err(tls)?;
        p.leaf.tls_serialize(&mut pending_items).map_err(tls)?;
    }
    let mut proposal_items = Vec::new();
    for (reference, proposal) in &state.proposals {
        VLByteSlice(reference)
            .tls_serialize(&mut proposal_items)
            .map_err(tls)?;
        VLByteSlice(proposal)
            .tls_serialize(&mut proposal_items)
            .map_err(tls)?;
    }
    let mut join_items = Vec::new();
    for (identity, epoch) in joins {
        VLByteSlice(identity)
            .tls_serialize(&mut join_items)
            .map_err(tls)?;
        epoch.tls_serialize(&mut join_items).map_err(tls)?;
    }
    let fields = [
        group_info,
        &pending_items,
        tree,
        context,
        transcript,
        tag,
        &proposal_items,
    ];
    let len = 1 + fields
        .iter()
        .chain([&join_items.as_slice()])
        .map(|f| VLByteSlice(f).tls_serialized_len())
        .sum::<usize>();
    let mut bytes = Vec::with_capacity(len);
    #[cfg(test)]
    let version = if state.legacy_json { 1 } else { FORMAT_VERSION };
    #[cfg(not(test))]
    let version = FORMAT_VERSION;
    bytes.push(version);
    for field in fields {
        VLByteSlice(field).tls_serialize(&mut bytes).map_err(tls)?;
    }
    if version >= 3 {
        VLByteSlice(&join_items)
            .tls_serialize(&mut bytes)
            .map_err(tls)?;
    }
    Ok(bytes)
}

/// openmls's storage provider for one group's `PublicGroup`, over that group's
/// [`StoredState`]. A provider serves exactly one group, so the group id openmls passes
/// along is not needed to find the entries.
pub(super) struct Recorder<'a> {
    state: RefCell<&'a mut StoredState>,
}

impl<'a> Recorder<'a> {
    pub(super) fn new(state: &'a mut StoredState) -> Self {
        Self {
            state: RefCell::new(state),
        }
    }

    fn write(
        &self,
        slot: impl FnOnce(&mut StoredState) -> &mut Option<Vec<u8>>,
        value: &impl Serialize,
    ) {
        let mut state = self.state.borrow_mut();
        let bytes = state.serialize(value);
        *slot(&mut state) = bytes;
    }

    fn read<T: DeserializeOwned>(
        &self,
        slot: impl FnOnce(&StoredState) -> &Option<Vec<u8>>,
    ) -> Result<Option<T>, SnapshotError> {
        let state = self.state.borrow();
        slot(&state).as_deref().map(deserialize).transpose()
    }
}

/// Encodes one value openmls stores: the postcard marker, then postcard.
fn encode_value(value: &impl Serialize) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_extend(value, vec![POSTCARD]).map_err(|e| SnapshotError::new(e.to_string()))
}

/// Decodes a value written by [`encode_value`] or, from a format 1 snapshot, by serde_json.
fn deserialize<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    match bytes.split_first() {
        Some((&POSTCARD, encoded)) => match postcard::take_from_bytes(encoded) {
            Ok((value, [])) => Ok(value),
            Ok(_) => Err(SnapshotError::new("trailing bytes after a stored value")),
            Err(e) => Err(SnapshotError::new(e.to_string())),
        },
        _ => serde_json::from_slice(bytes).map_err(|e| SnapshotError::new(e.to_string())),
    }
}

/// Whether a stored reference is `reference`, in either value encoding.
fn same_reference(stored: &[u8], encoded: &[u8], json: Option<&[u8]>) -> bool {
    stored == encoded || json.is_some_and(|json| stored == json)
}

/// The format 1 encoding of a reference, to find entries a format 1 snapshot brought in.
fn json_of(value: &impl Serialize) -> Option<Vec<u8>> {
    serde_json::to_vec(value).ok()
}

/// What the provider's methods return.
type StoreResult<T> = Result<T, SnapshotError>;

impl PublicStorageProvider<CURRENT_VERSION> for Recorder<'_> {
    type PublicError = SnapshotError;

    fn write_tree<G: traits::GroupId<CURRENT_VERSION>, T: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        _: &G,
        tree: &T,
    ) -> StoreResult<()> {
        self.write(|s| &mut s.tree, tree);
        Ok(())
    }

    fn write_interim_transcript_hash<
        G: traits::GroupId<CURRENT_VERSION>,
        H: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        hash: &H,
    ) -> StoreResult<()> {
        self.write(|s| &mut s.interim_transcript_hash, hash);
        Ok(())
    }

    fn write_context<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        context: &C,
    ) -> StoreResult<()> {
        self.write(|s| &mut s.context, context);
        Ok(())
    }

    fn write_confirmation_tag<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        tag: &C,
    ) -> StoreResult<()> {
        self.write(|s| &mut s.confirmation_tag, tag);
        Ok(())
    }

    fn queue_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        reference: &R,
        proposal: &P,
    ) -> StoreResult<()> {
        let json = json_of(reference);
        let mut state = self.state.borrow_mut();
        let (Some(encoded), Some(proposal)) =
            (state.serialize(reference), state.serialize(proposal))
        else {
            return Ok(());
        };
        match state
            .proposals
            .iter_mut()
            .find(|(r, _)| same_reference(r, &encoded, json.as_deref()))
        {
            Some(entry) => *entry = (encoded, proposal),
            None => state.proposals.push((encoded, proposal)),
        }
        Ok(())
    }

    fn queued_proposals<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
    ) -> StoreResult<Vec<(R, P)>> {
        let state = self.state.borrow();
        state
            .proposals
            .iter()
            .map(|(reference, proposal)| Ok((deserialize(reference)?, deserialize(proposal)?)))
            .collect()
    }

    fn tree<G: traits::GroupId<CURRENT_VERSION>, T: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> StoreResult<Option<T>> {
        self.read(|s| &s.tree)
    }

    fn group_context<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
    ) -> StoreResult<Option<C>> {
        self.read(|s| &s.context)
    }

    fn interim_transcript_hash<
        G: traits::GroupId<CURRENT_VERSION>,
        H: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
    ) -> StoreResult<Option<H>> {
        self.read(|s| &s.interim_transcript_hash)
    }

    fn confirmation_tag<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
    ) -> StoreResult<Option<C>> {
        self.read(|s| &s.confirmation_tag)
    }

    fn delete_tree<G: traits::GroupId<CURRENT_VERSION>>(&self, _: &G) -> StoreResult<()> {
        self.state.borrow_mut().tree = None;
        Ok(())
    }

    fn delete_confirmation_tag<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> StoreResult<()> {
        self.state.borrow_mut().confirmation_tag = None;
        Ok(())
    }

    fn delete_context<G: traits::GroupId<CURRENT_VERSION>>(&self, _: &G) -> StoreResult<()> {
        self.state.borrow_mut().context = None;
        Ok(())
    }

    fn delete_interim_transcript_hash<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> StoreResult<()> {
        self.state.borrow_mut().interim_transcript_hash = None;
        Ok(())
    }

    fn remove_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        reference: &R,
    ) -> StoreResult<()> {
        let json = json_of(reference);
        let mut state = self.state.borrow_mut();
        if let Some(encoded) = state.serialize(reference) {
            state
                .proposals
                .retain(|(r, _)| !same_reference(r, &encoded, json.as_deref()));
        }
        Ok(())
    }

    fn clear_proposal_queue<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
    ) -> StoreResult<()> {
        self.state.borrow_mut().proposals.clear();
        Ok(())
    }
}
