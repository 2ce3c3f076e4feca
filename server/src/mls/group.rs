//! The Delivery Service's MLS engine: the public state of one MLS group (openmls `PublicGroup`),
//! and the checks the DS runs on every handshake message before it accepts and fans it out.
//!
//! openmls validates the framing, signatures, proposals and update path of PublicMessage
//! handshakes. This module adds what a DS must decide on its own: that the sender is the
//! authenticated client, that a commit covers every pending proposal, that identities stay unique
//! and never change, that the Welcome matches the added KeyPackages, and that the GroupInfo the
//! committer hands over (and that the DS serves to rejoining members) belongs to the new epoch.
//! Nothing is merged before every check passed, so a refused input leaves the state untouched.
//!
//! A group is persisted as a [`DsGroup::snapshot`] (openmls's own stored state of the
//! `PublicGroup`, see `snapshot.rs`) and rebuilt with [`DsGroup::from_snapshot`].
//!
//! The API is non-generic and free of openmls types so that the rest of the server does not
//! instantiate openmls generics.

use std::collections::HashSet;

use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::{
    ContentType, Credential, CredentialType, GroupContext, LeafNodeIndex, MlsMessageBodyIn,
    MlsMessageIn, OpenMlsSignaturePublicKey, ProcessedMessageContent, Proposal, ProposalOrRefType,
    ProposalStore, PublicGroup, PublicMessageIn, QueuedProposal, RatchetTreeIn, Sender,
    SignaturePublicKey, StagedCommit, Verifiable, Welcome,
};
use openmls_rust_crypto::RustCrypto;
use tls_codec::{Deserialize as _, Serialize as _, Size as _};

use super::CIPHERSUITE;
use super::snapshot::{PendingProposal, Recorder, Snapshot, StoredState};

/// Why the DS refuses an MLS input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MlsError {
    /// The bytes do not decode as the expected MLS structure.
    #[error("malformed MLS input: {0}")]
    Malformed(String),
    /// The message is for another MLS group id.
    #[error("message for another group")]
    WrongGroup,
    /// Not the server's ciphersuite.
    #[error("unsupported ciphersuite")]
    WrongCiphersuite,
    /// The GroupInfo is not acceptable (signature, mismatch with the group state, ...).
    #[error("invalid GroupInfo: {0}")]
    InvalidGroupInfo(String),
    /// The GroupInfo carries the `ratchet_tree` extension (the DS serves the tree itself).
    #[error("the GroupInfo must not carry the ratchet_tree extension (the DS serves the tree)")]
    GroupInfoHasRatchetTree,
    /// The GroupInfo lacks the `external_pub` extension (no rejoin by external commit).
    #[error("the GroupInfo must carry the external_pub extension")]
    GroupInfoWithoutExternalPub,
    /// The message is for an older epoch.
    #[error("stale epoch, the group is at epoch {current}")]
    StaleEpoch { current: u64 },
    /// The message is for an epoch the group has not reached.
    #[error("future epoch, the group is at epoch {current}")]
    FutureEpoch { current: u64 },
    /// A handshake message was not sent as a PublicMessage.
    #[error("handshake messages must be sent as PublicMessage")]
    NotPublicMessage,
    /// Another kind of message than the one expected.
    #[error("wrong message content type")]
    WrongContentType,
    /// The sender leaf or the authenticated client is not a member.
    #[error("sender is not a member of the group")]
    NotMember,
    /// The message's sender is not the authenticated client.
    #[error("message sender is not the authenticated client")]
    SenderMismatch,
    /// openmls or the DS rejected the commit.
    #[error("invalid commit: {0}")]
    InvalidCommit(String),
    /// openmls or the DS rejected the proposal.
    #[error("invalid proposal: {0}")]
    InvalidProposal(String),
    /// The commit does not cover every pending proposal.
    #[error("the commit does not include every pending proposal")]
    MissingProposals,
    /// The commit adds members but no Welcome came with it.
    #[error("the commit adds members but no Welcome was given")]
    MissingWelcome,
    /// The Welcome is malformed or not for exactly the added members.
    #[error("invalid Welcome: {0}")]
    InvalidWelcome(String),
    /// The group would exceed its size limit.
    #[error("group too large")]
    GroupTooLarge,
    /// A snapshot does not load, or the state cannot be snapshotted. Never the client's fault.
    #[error("unusable group state: {0}")]
    State(String),
    /// The commit passed every check but the credential check could not decide on some of the
    /// credentials it brings in yet (their AS has to be asked first). Nothing was merged.
    #[error("credentials not verified yet")]
    CredentialsUnverified,
}

/// What a credential check says about a credential a commit brings in: `Some(true)` accepted,
/// `Some(false)` refused, `None` not known yet (the commit is then checked completely but not
/// merged: [`MlsError::CredentialsUnverified`]).
pub(crate) type CredentialCheck<'a> = &'a dyn Fn(&[u8], &[u8]) -> Option<bool>;

/// A member as the DS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) leaf_index: u32,
    /// The BasicCredential identity.
    pub(crate) identity: Vec<u8>,
    pub(crate) signature_key: Vec<u8>,
}

/// What an accepted commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommitOutcome {
    pub(crate) new_epoch: u64,
    /// New members (they get the Welcome), in leaf order. For an external commit, the joiner.
    pub(crate) added: Vec<Member>,
    /// Members the commit removed (as they were in the old epoch), in leaf order.
    pub(crate) removed: Vec<Member>,
    /// The committer in the new epoch; for an external commit the joiner. Always set.
    pub(crate) committer: Option<Member>,
    /// Senders (as of the old epoch) of pending leaves that the commit dropped. Only an external
    /// commit drops them (it cannot reference proposals): unless it removed them too (a rejoin),
    /// these leavers are still members and have to leave again.
    pub(crate) discarded_proposals: Vec<Member>,
}

/// Summary of an MLS message, computed without changing any state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg(test)]
pub(crate) struct MessageInfo {
    /// Empty for Welcome and KeyPackage (they carry no readable group id).
    pub(crate) group_id: Vec<u8>,
    /// 0 for Welcome and KeyPackage.
    pub(crate) epoch: u64,
    pub(crate) kind: MessageKind,
}

/// The kind of an MLSMessage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg(test)]
pub(crate) enum MessageKind {
    PublicCommit,
    PublicProposal,
    PublicApplication,
    /// A PrivateMessage, any content type.
    Private,
    Welcome,
    GroupInfo,
    KeyPackage,
    /// A wire format this build of openmls does not decode (never produced today: such input
    /// is `Malformed`).
    #[allow(dead_code)]
    Other,
}

/// Decodes an MLSMessage exactly (no trailing bytes) and says what it is.
#[cfg(test)]
pub(crate) fn inspect(message: &[u8]) -> Result<MessageInfo, MlsError> {
    let info = |group_id: &[u8], epoch: u64, kind| MessageInfo {
        group_id: group_id.to_vec(),
        epoch,
        kind,
    };
    Ok(match decode(message)? {
        MlsMessageBodyIn::PublicMessage(m) => {
            let kind = match m.content_type() {
                ContentType::Commit => MessageKind::PublicCommit,
                ContentType::Proposal => MessageKind::PublicProposal,
                ContentType::Application => MessageKind::PublicApplication,
            };
            info(m.group_id().as_slice(), m.epoch().as_u64(), kind)
        }
        MlsMessageBodyIn::PrivateMessage(m) => info(
            m.group_id().as_slice(),
            m.epoch().as_u64(),
            MessageKind::Private,
        ),
        MlsMessageBodyIn::Welcome(_) => info(&[], 0, MessageKind::Welcome),
        MlsMessageBodyIn::GroupInfo(gi) => info(
            gi.group_id().as_slice(),
            gi.epoch().as_u64(),
            MessageKind::GroupInfo,
        ),
        MlsMessageBodyIn::KeyPackage(_) => info(&[], 0, MessageKind::KeyPackage),
    })
}

/// The DS's state of one group: openmls's public group plus the GroupInfo of the current epoch
/// and the pending proposals as received (only leaves, i.e. self-Removes, are accepted).
pub(crate) struct DsGroup {
    public: PublicGroup,
    /// What openmls stored for `public`, kept current by every change (through [`Recorder`]).
    stored: StoredState,
    group_info: Vec<u8>,
    pending: Vec<PendingProposal>,
    /// Members whose leaf joined in a recent epoch: (credential identity, epoch of the join),
    /// so that an application message of an older epoch is not sent to members that cannot
    /// read it. Kept by every accepted commit, pruned with [`DsGroup::forget_joins_up_to`].
    joins: Vec<(Vec<u8>, u64)>,
}

// The Delivery Service caches groups behind locks and works on them in blocking tasks.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<DsGroup>();
};

impl std::fmt::Debug for DsGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsGroup")
            .field("group_id", &self.public.group_id().as_slice())
            .field("epoch", &self.epoch())
            .field("pending_proposals", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Accepts every credential; the default of [`DsGroup::process_commit`].
#[cfg(test)]
fn accept_any(_identity: &[u8], _signature_key: &[u8]) -> Option<bool> {
    Some(true)
}

impl DsGroup {
    /// Starts tracking a new group. `group_info` is an MLSMessage carrying the GroupInfo of
    /// epoch 0, `ratchet_tree` the TLS-encoded ratchet tree. The group must have `expected_group_id`,
    /// the server's ciphersuite, and exactly one member: `creator_identity`.
    pub(crate) fn create(
        expected_group_id: &[u8],
        creator_identity: &[u8],
        group_info: &[u8],
        ratchet_tree: &[u8],
        max_members: usize,
    ) -> Result<DsGroup, MlsError> {
        let verifiable = decode_group_info(group_info)?;
        if verifiable.group_id().as_slice() != expected_group_id {
            return Err(MlsError::WrongGroup);
        }
        if verifiable.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::WrongCiphersuite);
        }
        if verifiable.epoch().as_u64() != 0 {
            return Err(MlsError::InvalidGroupInfo(
                "a new group must be at epoch 0".into(),
            ));
        }
        check_group_info_extensions(&verifiable)?;
        let group = Self::from_parts(verifiable, group_info, ratchet_tree)?;
        let members = group.members();
        let [creator] = members.as_slice() else {
            return Err(MlsError::InvalidGroupInfo(
                "a new group must have exactly one member".into(),
            ));
        };
        if creator.identity != creator_identity {
            return Err(MlsError::SenderMismatch);
        }
        if members.len() > max_members {
            return Err(MlsError::GroupTooLarge);
        }
        Ok(group)
    }

    /// Verifies GroupInfo and tree (openmls `from_external`: tree validity, GroupInfo signature by
    /// its signer leaf, tree hash = GroupContext tree hash, every KeyPackage leaf within its
    /// lifetime) and requires BasicCredentials.
    fn from_parts(
        verifiable: VerifiableGroupInfo,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<DsGroup, MlsError> {
        let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree)
            .map_err(|e| MlsError::Malformed(format!("ratchet tree: {e}")))?;
        let mut stored = StoredState::default();
        let (public, _) = PublicGroup::from_external(
            &RustCrypto::default(),
            &Recorder::new(&mut stored),
            tree,
            verifiable,
            ProposalStore::new(),
        )
        .map_err(|e| MlsError::InvalidGroupInfo(e.to_string()))?;
        if public
            .members()
            .any(|m| m.credential.credential_type() != CredentialType::Basic)
        {
            return Err(MlsError::InvalidGroupInfo(
                "every member must have a BasicCredential".into(),
            ));
        }
        Ok(DsGroup {
            public,
            stored,
            group_info: group_info.to_vec(),
            pending: Vec::new(),
            joins: Vec::new(),
        })
    }

    /// The state to persist: openmls's stored `PublicGroup`, the GroupInfo and the pending
    /// proposals, versioned. [`DsGroup::from_snapshot`] rebuilds the group from it.
    pub(crate) fn snapshot(&self) -> Result<Vec<u8>, MlsError> {
        super::snapshot::encode(&self.group_info, &self.pending, &self.stored, &self.joins)
            .map_err(unusable)
    }

    /// Rebuilds a group from [`DsGroup::snapshot`] with openmls `PublicGroup::load`. Nothing is
    /// re-validated against the clock: leaves whose KeyPackage lifetime ran out since they
    /// joined do not matter. Only checks that the parts belong together.
    pub(crate) fn from_snapshot(bytes: &[u8]) -> Result<DsGroup, MlsError> {
        let Snapshot {
            group_info,
            pending,
            state: mut stored,
            joins,
        } = Snapshot::decode(bytes).map_err(unusable)?;
        let verifiable = decode_group_info(&group_info).map_err(unusable)?;
        let recorder = Recorder::new(&mut stored);
        let public = PublicGroup::load(&recorder, verifiable.group_id())
            .map_err(unusable)?
            .ok_or_else(|| unusable("incomplete openmls state"))?;
        if public.group_context().epoch() != verifiable.epoch()
            || public.ciphersuite() != CIPHERSUITE
        {
            return Err(unusable("the GroupInfo does not match the group state"));
        }
        let queued = public.queued_proposals(&recorder).map_err(unusable)?;
        let matches = queued.len() == pending.len()
            && queued.iter().zip(&pending).all(|((reference, queued), p)| {
                reference.as_slice() == p.reference
                    && queued.sender() == &Sender::Member(LeafNodeIndex::new(p.leaf))
            });
        if !matches {
            return Err(unusable(
                "the pending proposals do not match openmls's queue",
            ));
        }
        Ok(DsGroup {
            public,
            stored,
            group_info,
            pending,
            joins,
        })
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.public.group_context().epoch().as_u64()
    }

    pub(crate) fn group_id(&self) -> Vec<u8> {
        self.public.group_id().to_vec()
    }

    /// The members in leaf order.
    pub(crate) fn members(&self) -> Vec<Member> {
        self.public
            .members()
            .map(|m| member(m.index, &m.credential, m.signature_key))
            .collect()
    }

    pub(crate) fn member_by_identity(&self, identity: &[u8]) -> Option<Member> {
        self.members().into_iter().find(|m| m.identity == identity)
    }

    fn member_at(&self, index: LeafNodeIndex) -> Option<Member> {
        self.public.leaf(index).map(|leaf| {
            member(
                index,
                leaf.credential(),
                leaf.signature_key().as_slice().to_vec(),
            )
        })
    }

    /// The TLS encoding of the ratchet tree (what clients pass as `RatchetTreeIn`).
    pub(crate) fn export_ratchet_tree(&self) -> Vec<u8> {
        // Serializing fails only for vectors longer than the MLS length encoding allows
        // (2^30 bytes), far beyond any frame this server accepts.
        self.public
            .export_ratchet_tree()
            .tls_serialize_detached()
            .unwrap_or_default()
    }

    /// The GroupInfo MLSMessage of the current epoch, as received.
    pub(crate) fn group_info(&self) -> Vec<u8> {
        self.group_info.clone()
    }

    /// The MLSMessages of the pending proposals of the current epoch, in arrival order.
    #[cfg(test)]
    pub(crate) fn pending_proposals(&self) -> Vec<Vec<u8>> {
        self.pending.iter().map(|p| p.message.clone()).collect()
    }

    /// Validates and applies a member's commit bundle. See [`DsGroup::process_commit_checked`].
    #[cfg(test)]
    pub(crate) fn process_commit(
        &mut self,
        sender_identity: &[u8],
        commit: &[u8],
        welcome: Option<&[u8]>,
        new_group_info: &[u8],
        max_members: usize,
    ) -> Result<CommitOutcome, MlsError> {
        self.process_commit_checked(
            sender_identity,
            commit,
            welcome,
            new_group_info,
            max_members,
            &accept_any,
        )
    }

    /// Validates and applies a member's commit bundle: `commit` is a PublicMessage Commit of the
    /// current epoch from the leaf of `sender_identity`, covering every pending proposal by
    /// reference; `welcome` must be given exactly when members are added, for exactly their
    /// KeyPackages; `new_group_info` must be the GroupInfo of the new epoch signed by the
    /// committer. `accept_credential(identity, signature_key)` is asked for every credential
    /// the commit brings in (added KeyPackages, the committer's new leaf) before anything is
    /// merged. The state changes only on success; pending proposals are then cleared.
    pub(crate) fn process_commit_checked(
        &mut self,
        sender_identity: &[u8],
        commit: &[u8],
        welcome: Option<&[u8]>,
        new_group_info: &[u8],
        max_members: usize,
        accept_credential: CredentialCheck<'_>,
    ) -> Result<CommitOutcome, MlsError> {
        let message = decode_public(commit, ContentType::Commit)?;
        self.check_frame(&message)?;
        let &Sender::Member(committer) = message.sender() else {
            return Err(MlsError::NotMember);
        };
        self.authenticate(committer, sender_identity)?;
        let welcome = welcome.map(decode_welcome).transpose()?;
        let group_info = decode_group_info(new_group_info)?;
        let tag = confirmation_tag(&message)?;
        let staged = self.stage(message)?;
        for pending in &self.pending {
            let covered = staged.queued_proposals().any(|q| {
                q.proposal_or_ref_type() == ProposalOrRefType::Reference
                    && q.proposal_reference_ref().as_slice() == pending.reference
            });
            if !covered {
                return Err(MlsError::MissingProposals);
            }
        }
        let plan = CommitPlan {
            staged,
            committer,
            committer_identity: sender_identity,
            external: false,
            welcome,
            group_info,
            group_info_bytes: new_group_info,
            tag,
            max_members,
        };
        self.apply(plan, accept_credential)
    }

    /// Validates and applies an external commit (join or rejoin). See
    /// [`DsGroup::process_external_commit_checked`].
    #[cfg(test)]
    pub(crate) fn process_external_commit(
        &mut self,
        joiner_identity: &[u8],
        commit: &[u8],
        new_group_info: &[u8],
        max_members: usize,
    ) -> Result<CommitOutcome, MlsError> {
        self.process_external_commit_checked(
            joiner_identity,
            commit,
            new_group_info,
            max_members,
            &accept_any,
        )
    }

    /// Validates and applies an external commit: a PublicMessage Commit of the current epoch
    /// from a new member whose leaf identity is `joiner_identity`. If that identity already has a
    /// leaf (rejoin after lost state), the commit must remove it; it may remove nothing else.
    /// Pending proposals are dropped (an external commit cannot reference them) and reported in
    /// [`CommitOutcome::discarded_proposals`]. GroupInfo rules as for member commits.
    pub(crate) fn process_external_commit_checked(
        &mut self,
        joiner_identity: &[u8],
        commit: &[u8],
        new_group_info: &[u8],
        max_members: usize,
        accept_credential: CredentialCheck<'_>,
    ) -> Result<CommitOutcome, MlsError> {
        let message = decode_public(commit, ContentType::Commit)?;
        self.check_frame(&message)?;
        if message.sender() != &Sender::NewMemberCommit {
            return Err(MlsError::InvalidCommit(
                "not an external commit (sender must be new_member_commit)".into(),
            ));
        }
        let group_info = decode_group_info(new_group_info)?;
        let tag = confirmation_tag(&message)?;
        let staged = self.stage(message)?;
        let committer = self
            .public
            .ext_commit_sender_index(&staged)
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
        let plan = CommitPlan {
            staged,
            committer,
            committer_identity: joiner_identity,
            external: true,
            welcome: None,
            group_info,
            group_info_bytes: new_group_info,
            tag,
            max_members,
        };
        self.apply(plan, accept_credential)
    }

    /// Accepts a leave: a PublicMessage Proposal of the current epoch from the leaf of
    /// `sender_identity`, removing that leaf. It stays pending until a commit covers it.
    /// Sending the same proposal again is accepted once more without storing it twice. Returns
    /// the members (the fan-out recipients).
    pub(crate) fn add_leave_proposal(
        &mut self,
        sender_identity: &[u8],
        proposal: &[u8],
    ) -> Result<Vec<Member>, MlsError> {
        let (public, leaf) = self.check_proposal_frame(proposal)?;
        self.authenticate(leaf, sender_identity)?;
        self.accept_leave(proposal, public, leaf)?;
        Ok(self.members())
    }

    /// Checks that an application message is a PrivateMessage of this group whose epoch is at
    /// most `past_epochs` behind the current one, and returns that epoch. The sender is
    /// encrypted: the caller checks that the authenticated client is a member.
    pub(crate) fn check_application_message(
        &self,
        message: &[u8],
        past_epochs: u64,
    ) -> Result<u64, MlsError> {
        let private = match decode(message)? {
            MlsMessageBodyIn::PrivateMessage(m) => m,
            _ => return Err(MlsError::WrongContentType),
        };
        if private.group_id() != self.public.group_id() {
            return Err(MlsError::WrongGroup);
        }
        if private.content_type() != ContentType::Application {
            return Err(MlsError::WrongContentType);
        }
        let current = self.epoch();
        let epoch = private.epoch().as_u64();
        if epoch > current {
            return Err(MlsError::FutureEpoch { current });
        }
        if epoch.saturating_add(past_epochs) < current {
            return Err(MlsError::StaleEpoch { current });
        }
        Ok(epoch)
    }

    /// The credential identities of the current members whose leaf joined after `epoch` (as
    /// far as the recent joins still know: see [`DsGroup::forget_joins_up_to`]). They cannot
    /// read a message of `epoch`.
    pub(crate) fn joined_after(&self, epoch: u64) -> Vec<&[u8]> {
        self.joins
            .iter()
            .filter(|(_, joined)| *joined > epoch)
            .map(|(identity, _)| identity.as_slice())
            .collect()
    }

    /// Forgets the joins of epoch `epoch` and earlier: once no message of an epoch before
    /// them is accepted any more, such members are members of every epoch that still counts.
    pub(crate) fn forget_joins_up_to(&mut self, epoch: u64) {
        self.joins.retain(|(_, joined)| *joined > epoch);
    }

    /// Group id and epoch of a handshake message (checked before any cryptography).
    fn check_frame(&self, message: &PublicMessageIn) -> Result<(), MlsError> {
        if message.group_id() != self.public.group_id() {
            return Err(MlsError::WrongGroup);
        }
        let current = self.epoch();
        let epoch = message.epoch().as_u64();
        if epoch < current {
            return Err(MlsError::StaleEpoch { current });
        }
        if epoch > current {
            return Err(MlsError::FutureEpoch { current });
        }
        Ok(())
    }

    /// The sender leaf must be a member whose identity is the authenticated client's.
    fn authenticate(&self, leaf: LeafNodeIndex, identity: &[u8]) -> Result<Member, MlsError> {
        let sender = self.member_at(leaf).ok_or(MlsError::NotMember)?;
        if sender.identity == identity {
            return Ok(sender);
        }
        if self.member_by_identity(identity).is_none() {
            return Err(MlsError::NotMember);
        }
        Err(MlsError::SenderMismatch)
    }

    /// Decodes a proposal and checks its frame; returns it and its member sender leaf.
    fn check_proposal_frame(
        &self,
        proposal: &[u8],
    ) -> Result<(PublicMessageIn, LeafNodeIndex), MlsError> {
        let message = decode_public(proposal, ContentType::Proposal)?;
        self.check_frame(&message)?;
        let &Sender::Member(leaf) = message.sender() else {
            return Err(MlsError::NotMember);
        };
        Ok((message, leaf))
    }

    /// Verifies a leave (signature, a Remove of the sender's own leaf) and stores it as pending.
    fn accept_leave(
        &mut self,
        bytes: &[u8],
        message: PublicMessageIn,
        leaf: LeafNodeIndex,
    ) -> Result<(), MlsError> {
        let processed = self
            .public
            .process_message(&RustCrypto::default(), message)
            .map_err(|e| MlsError::InvalidProposal(e.to_string()))?;
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(MlsError::WrongContentType);
        };
        let queued: QueuedProposal = *queued;
        match queued.proposal() {
            Proposal::Remove(remove) if remove.removed() == leaf => {}
            _ => {
                return Err(MlsError::InvalidProposal(
                    "only a Remove of the sender's own leaf (a leave) is accepted".into(),
                ));
            }
        }
        let reference = queued.proposal_reference_ref().as_slice().to_vec();
        if self.pending.iter().any(|p| p.reference == reference) {
            return Ok(());
        }
        if self.pending.iter().any(|p| p.leaf == leaf.u32()) {
            return Err(MlsError::InvalidProposal(
                "a leave of this member is already pending".into(),
            ));
        }
        self.public
            .add_proposal(&Recorder::new(&mut self.stored), queued)
            .map_err(unusable)?;
        self.pending.push(PendingProposal {
            message: bytes.to_vec(),
            reference,
            leaf: leaf.u32(),
        });
        Ok(())
    }

    /// Lets openmls validate a commit without changing any state.
    fn stage(&self, message: PublicMessageIn) -> Result<StagedCommit, MlsError> {
        let processed = self
            .public
            .process_message(&RustCrypto::default(), message)
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
        match processed.into_content() {
            ProcessedMessageContent::StagedCommitMessage(staged) => Ok(*staged),
            _ => Err(MlsError::WrongContentType),
        }
    }

    /// The DS's own checks on a staged commit, then the merge. Linear in the group size and
    /// without a copy per member: the checks read the tree's leaves in place, and only the
    /// members the commit adds or removes are copied out (a commit to a 10,000-member group
    /// must not cost more than openmls's own processing of it).
    fn apply(
        &mut self,
        plan: CommitPlan<'_>,
        accept_credential: CredentialCheck<'_>,
    ) -> Result<CommitOutcome, MlsError> {
        let crypto = RustCrypto::default();
        let CommitPlan {
            staged,
            committer,
            committer_identity,
            external,
            welcome,
            group_info,
            group_info_bytes,
            tag,
            max_members,
        } = plan;
        let undecided = std::cell::Cell::new(false);
        let accept_credential = |identity: &[u8], key: &[u8]| match accept_credential(identity, key)
        {
            Some(accepted) => accepted,
            None => {
                undecided.set(true);
                true
            }
        };
        let mut removed_leaves: Vec<u32> = staged
            .remove_proposals()
            .map(|r| r.remove_proposal().removed().u32())
            .collect();
        removed_leaves.sort_unstable();
        removed_leaves.dedup();
        let is_removed = |leaf: u32| removed_leaves.binary_search(&leaf).is_ok();
        // One pass over the current leaves: the identities that stay, how many members stay,
        // and which leaves are taken (to tell the added members after the merge).
        let mut identities: HashSet<&[u8]> = HashSet::new();
        let mut occupied: Vec<bool> = Vec::new();
        let mut size = 0;
        for (index, leaf) in self.public.treesync().full_leaves() {
            let index = index.u32();
            let slot = index as usize;
            if occupied.len() <= slot {
                occupied.resize(slot + 1, false);
            }
            occupied[slot] = true;
            if !is_removed(index) {
                identities.insert(leaf.credential().serialized_content());
                size += 1;
            }
        }

        // The committer's (new) leaf keeps the committer's identity.
        if let Some(leaf) = staged.update_path_leaf_node() {
            let identity = basic_identity(leaf.credential())?;
            if identity != committer_identity {
                return Err(if external {
                    MlsError::SenderMismatch
                } else {
                    MlsError::InvalidCommit("the commit changes the committer's identity".into())
                });
            }
            if !accept_credential(identity, leaf.signature_key().as_slice()) {
                return Err(MlsError::InvalidCommit(
                    "the committer's credential is not accepted".into(),
                ));
            }
        }
        for update in staged.update_proposals() {
            let Sender::Member(index) = update.sender() else {
                return Err(MlsError::InvalidCommit("update from a non-member".into()));
            };
            let old = self.public.leaf(*index).ok_or(MlsError::NotMember)?;
            let old_identity = old.credential().serialized_content();
            let leaf = update.update_proposal().leaf_node();
            if basic_identity(leaf.credential())? != old_identity {
                return Err(MlsError::InvalidCommit(
                    "an update changes an identity".into(),
                ));
            }
            if !accept_credential(old_identity, leaf.signature_key().as_slice()) {
                return Err(MlsError::InvalidCommit(
                    "an updated credential is not accepted".into(),
                ));
            }
        }

        let mut added_refs = Vec::new();
        // Collected first: the identities borrowed from them stay in `identities`.
        let adds: Vec<_> = staged.add_proposals().collect();
        for add in &adds {
            let key_package = add.add_proposal().key_package();
            let leaf = key_package.leaf_node();
            let identity = basic_identity(leaf.credential())?;
            if !identities.insert(identity) {
                return Err(MlsError::InvalidCommit(
                    "the commit adds an identity that is already a member".into(),
                ));
            }
            if !accept_credential(identity, leaf.signature_key().as_slice()) {
                return Err(MlsError::InvalidCommit(
                    "an added credential is not accepted".into(),
                ));
            }
            let reference = key_package
                .hash_ref(&crypto)
                .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
            added_refs.push(reference.as_slice().to_vec());
            size += 1;
        }

        if external {
            // RFC 9420 §12.4.3.2: a Remove in an external commit must remove the joiner's old leaf.
            let foreign = removed_leaves.iter().any(|&leaf| {
                self.public
                    .leaf(LeafNodeIndex::new(leaf))
                    .is_some_and(|l| l.credential().serialized_content() != committer_identity)
            });
            if foreign {
                return Err(MlsError::InvalidCommit(
                    "an external commit may only remove the joiner's old leaf".into(),
                ));
            }
            if !identities.insert(committer_identity) {
                return Err(MlsError::InvalidCommit(
                    "the joiner is already a member: the external commit must remove its old leaf"
                        .into(),
                ));
            }
            size += 1;
        }
        if size > max_members {
            return Err(MlsError::GroupTooLarge);
        }
        drop(identities);
        drop(adds);

        if !external {
            check_welcome(welcome, added_refs)?;
        }

        let signer_key = match staged.update_path_leaf_node() {
            Some(leaf) => leaf.signature_key().clone(),
            None => self
                .public
                .leaf(committer)
                .map(|leaf| leaf.signature_key().clone())
                .ok_or(MlsError::NotMember)?,
        };
        check_new_group_info(
            group_info,
            staged.group_context(),
            &tag,
            committer,
            signer_key,
            &crypto,
        )?;

        let discarded_proposals = self
            .pending
            .iter()
            .filter(|p| {
                !staged
                    .queued_proposals()
                    .any(|q| q.proposal_reference_ref().as_slice() == p.reference)
            })
            .filter_map(|p| self.member_at(LeafNodeIndex::new(p.leaf)))
            .collect();

        if undecided.get() {
            return Err(MlsError::CredentialsUnverified);
        }
        // The removed members as they were, in leaf order.
        let removed: Vec<Member> = removed_leaves
            .iter()
            .filter_map(|&leaf| self.member_at(LeafNodeIndex::new(leaf)))
            .collect();
        // Everything that can fail has been checked: merge. merge_commit merges first and then
        // writes to the storage, whose writes never fail (a value that does not serialize only
        // makes the next snapshot fail).
        self.public
            .merge_commit(&Recorder::new(&mut self.stored), staged)
            .map_err(unusable)?;
        self.group_info = group_info_bytes.to_vec();
        self.pending.clear();

        // Added: every leaf that was blank or removed before the commit, in leaf order.
        let added: Vec<Member> = self
            .public
            .treesync()
            .full_leaves()
            .filter(|(index, _)| {
                let index = index.u32();
                !occupied.get(index as usize).copied().unwrap_or(false)
                    || removed_leaves.binary_search(&index).is_ok()
            })
            .map(|(index, leaf)| {
                member(
                    index,
                    leaf.credential(),
                    leaf.signature_key().as_slice().to_vec(),
                )
            })
            .collect();
        let new_epoch = self.epoch();
        // A member's join is that of its current leaf: one removed (and maybe back with a new
        // leaf, e.g. a rejoin) starts over.
        let restarted: HashSet<&[u8]> = removed
            .iter()
            .chain(&added)
            .map(|m| m.identity.as_slice())
            .collect();
        self.joins
            .retain(|(identity, _)| !restarted.contains(identity.as_slice()));
        self.joins
            .extend(added.iter().map(|m| (m.identity.clone(), new_epoch)));
        let committer = self.member_at(committer);
        Ok(CommitOutcome {
            new_epoch,
            added,
            removed,
            committer,
            discarded_proposals,
        })
    }
}

/// A staged commit with everything needed to finish checking it.
struct CommitPlan<'a> {
    staged: StagedCommit,
    /// The committer's leaf in the new epoch.
    committer: LeafNodeIndex,
    committer_identity: &'a [u8],
    external: bool,
    welcome: Option<Welcome>,
    group_info: VerifiableGroupInfo,
    group_info_bytes: &'a [u8],
    /// TLS encoding of the commit's confirmation tag.
    tag: Vec<u8>,
    max_members: usize,
}

fn member(index: LeafNodeIndex, credential: &Credential, signature_key: Vec<u8>) -> Member {
    Member {
        leaf_index: index.u32(),
        // Every leaf holds a BasicCredential (checked on create and every commit),
        // whose content is the identity.
        identity: credential.serialized_content().to_vec(),
        signature_key,
    }
}

/// The identity of a BasicCredential; other credential types are refused.
fn basic_identity(credential: &Credential) -> Result<&[u8], MlsError> {
    if credential.credential_type() != CredentialType::Basic {
        return Err(MlsError::InvalidCommit(
            "only BasicCredentials are accepted".into(),
        ));
    }
    Ok(credential.serialized_content())
}

fn unusable(reason: impl std::fmt::Display) -> MlsError {
    MlsError::State(reason.to_string())
}

fn decode(bytes: &[u8]) -> Result<MlsMessageBodyIn, MlsError> {
    MlsMessageIn::tls_deserialize_exact(bytes)
        .map(MlsMessageIn::extract)
        .map_err(|e| MlsError::Malformed(e.to_string()))
}

/// A PublicMessage of the given content type.
fn decode_public(bytes: &[u8], content_type: ContentType) -> Result<PublicMessageIn, MlsError> {
    let message = match decode(bytes)? {
        MlsMessageBodyIn::PublicMessage(m) => m,
        MlsMessageBodyIn::PrivateMessage(_) => return Err(MlsError::NotPublicMessage),
        _ => return Err(MlsError::WrongContentType),
    };
    if message.content_type() != content_type {
        return Err(MlsError::WrongContentType);
    }
    Ok(message)
}

fn decode_group_info(bytes: &[u8]) -> Result<VerifiableGroupInfo, MlsError> {
    match decode(bytes) {
        Ok(MlsMessageBodyIn::GroupInfo(group_info)) => Ok(group_info),
        Ok(_) => Err(MlsError::Malformed("expected a GroupInfo".into())),
        Err(MlsError::Malformed(e)) => Err(MlsError::Malformed(format!("GroupInfo: {e}"))),
        Err(e) => Err(e),
    }
}

fn decode_welcome(bytes: &[u8]) -> Result<Welcome, MlsError> {
    match decode(bytes) {
        Ok(MlsMessageBodyIn::Welcome(welcome)) => Ok(welcome),
        Ok(_) => Err(MlsError::InvalidWelcome("not a Welcome".into())),
        Err(e) => Err(MlsError::InvalidWelcome(e.to_string())),
    }
}

fn confirmation_tag(message: &PublicMessageIn) -> Result<Vec<u8>, MlsError> {
    message
        .confirmation_tag()
        .ok_or_else(|| MlsError::InvalidCommit("commit without confirmation tag".into()))?
        .tls_serialize_detached()
        .map_err(|e| MlsError::InvalidCommit(e.to_string()))
}

/// The DS serves the ratchet tree itself and promises rejoin by external commit: a stored
/// GroupInfo carries an `external_pub` and no ratchet tree (a tree in it would go unchecked and
/// joiners prefer it over the one the DS serves).
fn check_group_info_extensions(group_info: &VerifiableGroupInfo) -> Result<(), MlsError> {
    if group_info.extensions().ratchet_tree().is_some() {
        return Err(MlsError::GroupInfoHasRatchetTree);
    }
    if group_info.extensions().external_pub().is_none() {
        return Err(MlsError::GroupInfoWithoutExternalPub);
    }
    Ok(())
}

/// The committer's GroupInfo of the new epoch: the staged group context, the commit's
/// confirmation tag, signed by the committer's leaf (its new signature key if the commit has a
/// path).
fn check_new_group_info(
    group_info: VerifiableGroupInfo,
    context: &GroupContext,
    tag: &[u8],
    committer: LeafNodeIndex,
    signer_key: SignaturePublicKey,
    crypto: &RustCrypto,
) -> Result<(), MlsError> {
    if group_info.group_context() != context {
        return Err(MlsError::InvalidGroupInfo(
            "the group context differs from the commit's new epoch".into(),
        ));
    }
    check_group_info_extensions(&group_info)?;
    // GroupInfoTBS = group_context || extensions || confirmation_tag || uint32 signer. openmls does
    // not expose the last two; read them from the (canonical) re-encoding it signs.
    let payload = group_info
        .unsigned_payload()
        .map_err(|e| MlsError::InvalidGroupInfo(e.to_string()))?;
    let prefix = group_info.group_context().tls_serialized_len()
        + group_info.extensions().tls_serialized_len();
    if payload.len() != prefix + tag.len() + 4
        || payload.get(prefix..prefix + tag.len()) != Some(tag)
    {
        return Err(MlsError::InvalidGroupInfo(
            "the confirmation tag differs from the commit's".into(),
        ));
    }
    if payload.get(prefix + tag.len()..) != Some(&committer.u32().to_be_bytes()[..]) {
        return Err(MlsError::InvalidGroupInfo(
            "the GroupInfo is not signed by the committer".into(),
        ));
    }
    let key = OpenMlsSignaturePublicKey::from_signature_key(
        signer_key,
        CIPHERSUITE.signature_algorithm(),
    );
    group_info
        .verify(crypto, &key)
        .map_err(|_| MlsError::InvalidGroupInfo("bad signature".into()))?;
    Ok(())
}

/// The Welcome must be present exactly when members are added, in the server's ciphersuite,
/// with one secret for each added KeyPackage and no other.
fn check_welcome(welcome: Option<Welcome>, mut added_refs: Vec<Vec<u8>>) -> Result<(), MlsError> {
    let Some(welcome) = welcome else {
        return if added_refs.is_empty() {
            Ok(())
        } else {
            Err(MlsError::MissingWelcome)
        };
    };
    if welcome.ciphersuite() != CIPHERSUITE {
        return Err(MlsError::InvalidWelcome("wrong ciphersuite".into()));
    }
    let mut refs: Vec<Vec<u8>> = welcome
        .secrets()
        .iter()
        .map(|s| s.new_member().as_slice().to_vec())
        .collect();
    refs.sort_unstable();
    added_refs.sort_unstable();
    if refs != added_refs {
        return Err(MlsError::InvalidWelcome(
            "the Welcome is not for exactly the added KeyPackages".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "group_test_client.rs"]
mod test_client;

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod snapshot_tests;

#[cfg(test)]
#[path = "fuzz_seeds.rs"]
mod fuzz_seeds;
