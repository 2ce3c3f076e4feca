//! Group operations: create, commit, encrypt, leave, process incoming messages and Welcomes,
//! join by external commit. Every state change lands in the store's overlay; the caller
//! commits or discards it.

use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
use openmls::group::{ProcessMessageError, ValidationError};
use openmls::prelude::{
    GroupId as MlsGroupId, LeafNodeIndex, LeafNodeParameters, MlsGroup, MlsMessageBodyIn,
    MlsMessageIn, MlsMessageOut, ProcessedMessageContent, Proposal, ProtocolMessage, RatchetTreeIn,
    Sender, StagedCommit, StagedWelcome,
};
use openmls_traits::OpenMlsProvider;
use roost_protocol::GroupId;
use tls_codec::DeserializeBytes;

use super::{Identity, Leaf, Mls, MlsError, ValidKeyPackage, create_config, join_config};

/// What a commit sends: the Commit, the Welcome (if it adds anyone) and the new GroupInfo.
#[derive(Debug)]
pub(crate) struct CommitOut {
    pub(crate) commit: Vec<u8>,
    pub(crate) welcome: Option<Vec<u8>>,
    pub(crate) group_info: Vec<u8>,
    /// The TLS encoding of the new epoch's group context (to recognise our commit in the
    /// DS's GroupInfo when its answer was lost).
    pub(crate) context: Vec<u8>,
}

/// Someone else's commit, staged but not merged: its new leaves must be verified first.
pub(crate) struct IncomingCommit {
    group: MlsGroup,
    staged: Box<StagedCommit>,
    pub(crate) committer: Leaf,
    pub(crate) added: Vec<Leaf>,
    pub(crate) removed: Vec<Leaf>,
    /// The removed leaves that asked for it themselves (their own Remove proposal: a leave).
    pub(crate) left: Vec<Leaf>,
    /// Leaves whose credential the commit introduces (adds, updates, the committer's path).
    pub(crate) to_verify: Vec<Leaf>,
    pub(crate) self_removed: bool,
}

impl std::fmt::Debug for IncomingCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingCommit")
            .field("committer", &self.committer)
            .field("added", &self.added)
            .field("removed", &self.removed)
            .finish_non_exhaustive()
    }
}

/// A processed group message.
#[derive(Debug)]
pub(crate) enum Incoming {
    Application {
        sender: Leaf,
        /// The sender's id of the message, from its authenticated data (absent: an older
        /// sender, or one that does not set it).
        message_id: Option<u64>,
        bytes: Vec<u8>,
    },
    /// A proposal, now stored as pending. `self_remove` if the sender proposes to remove
    /// itself (a leave).
    Proposal {
        sender: Leaf,
        self_remove: bool,
    },
    Commit(Box<IncomingCommit>),
}

/// A Welcome, decrypted but not yet turned into a group: its members must be verified first.
pub(crate) struct PendingJoin {
    staged: StagedWelcome,
    pub(crate) group: GroupId,
    pub(crate) members: Vec<Leaf>,
    pub(crate) inviter: Leaf,
}

impl std::fmt::Debug for PendingJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingJoin")
            .field("group", &self.group)
            .field("inviter", &self.inviter)
            .finish_non_exhaustive()
    }
}

fn mls_id(group: &GroupId) -> MlsGroupId {
    MlsGroupId::from_slice(&group.to_mls_bytes())
}

fn encode(message: &impl tls_codec::Serialize, what: &'static str) -> Result<Vec<u8>, MlsError> {
    message
        .tls_serialize_detached()
        .map_err(|_| MlsError::Malformed(what))
}

fn decode_message(bytes: &[u8]) -> Result<MlsMessageBodyIn, MlsError> {
    let message = MlsMessageIn::tls_deserialize_exact_bytes(bytes)
        .map_err(|_| MlsError::Malformed("MLS message"))?;
    Ok(message.extract())
}

/// The epoch of an MLSMessage that is a PrivateMessage (an application message, as the DS
/// sends them), without decrypting it; `None` for anything else.
pub(crate) fn private_message_epoch(bytes: &[u8]) -> Option<u64> {
    match decode_message(bytes) {
        Ok(MlsMessageBodyIn::PrivateMessage(m)) => Some(m.epoch().as_u64()),
        _ => None,
    }
}

/// The epoch and the TLS-encoded group context of an MLSMessage GroupInfo (unverified:
/// only compared with a context we computed ourselves).
pub(crate) fn group_info_context(group_info: &[u8]) -> Result<(u64, Vec<u8>), MlsError> {
    let MlsMessageBodyIn::GroupInfo(info) = decode_message(group_info)? else {
        return Err(MlsError::Malformed("GroupInfo"));
    };
    Ok((
        info.epoch().as_u64(),
        encode(info.group_context(), "group context")?,
    ))
}

fn member_leaf(group: &MlsGroup, index: LeafNodeIndex) -> Leaf {
    match group.member_at(index) {
        Some(member) => Leaf::of(index.u32(), &member.credential, &member.signature_key),
        None => Leaf {
            index: index.u32(),
            client: None,
            signature_key: Vec::new(),
        },
    }
}

impl Mls {
    fn load(&self, group: &GroupId) -> Result<MlsGroup, MlsError> {
        MlsGroup::load(self.storage(), &mls_id(group))?.ok_or(MlsError::NoGroup)
    }

    /// Whether the group has local state.
    pub(crate) fn has_group(&self, group: &GroupId) -> Result<bool, MlsError> {
        Ok(MlsGroup::load(self.storage(), &mls_id(group))?.is_some())
    }

    /// Whether proposals of the current epoch wait to be committed.
    pub(crate) fn has_pending_proposals(&self, group: &GroupId) -> Result<bool, MlsError> {
        Ok(self.load(group)?.pending_proposals().next().is_some())
    }

    /// The members the group's pending Remove proposals remove.
    pub(crate) fn pending_removed(
        &self,
        group: &GroupId,
    ) -> Result<Vec<roost_protocol::ClientId>, MlsError> {
        let mls_group = self.load(group)?;
        Ok(mls_group
            .pending_proposals()
            .filter_map(|queued| match queued.proposal() {
                Proposal::Remove(remove) => member_leaf(&mls_group, remove.removed()).client,
                _ => None,
            })
            .collect())
    }

    /// The group's members, in leaf order.
    pub(crate) fn members(&self, group: &GroupId) -> Result<Vec<Leaf>, MlsError> {
        let group = self.load(group)?;
        Ok(group
            .members()
            .map(|m| Leaf::of(m.index.u32(), &m.credential, &m.signature_key))
            .collect())
    }

    /// The group's current epoch.
    pub(crate) fn epoch(&self, group: &GroupId) -> Result<u64, MlsError> {
        Ok(self.load(group)?.epoch().as_u64())
    }

    /// Our own leaf index in the group.
    pub(crate) fn own_index(&self, group: &GroupId) -> Result<u32, MlsError> {
        Ok(self.load(group)?.own_leaf_index().u32())
    }

    /// Creates a group with us as its only member; returns (GroupInfo, ratchet tree) of
    /// epoch 0.
    pub(crate) fn create_group(
        &self,
        identity: &Identity,
        group: &GroupId,
    ) -> Result<(Vec<u8>, Vec<u8>), MlsError> {
        let mls_group = MlsGroup::new_with_group_id(
            self,
            &identity.key,
            &create_config(),
            mls_id(group),
            identity.credential()?,
        )
        .map_err(|e| MlsError::refused("group creation", e))?;
        let group_info = mls_group
            .export_group_info(self.crypto(), &identity.key, false)
            .map_err(|e| MlsError::refused("GroupInfo", e))?;
        Ok((
            encode(&group_info, "GroupInfo")?,
            encode(&mls_group.export_ratchet_tree(), "ratchet tree")?,
        ))
    }

    /// Builds a commit adding `adds` and removing the leaves `removes`, together with every
    /// pending proposal (with `force_update`, always with a path: a self-update), and applies
    /// it to the group in the overlay (to be committed if the DS accepts it, discarded
    /// otherwise). The GroupInfo for the DS is the new epoch's,
    /// without the ratchet tree (the DS serves the tree); the Welcome carries the tree.
    pub(crate) fn commit(
        &self,
        identity: &Identity,
        group: &GroupId,
        adds: Vec<ValidKeyPackage>,
        removes: Vec<u32>,
        force_update: bool,
    ) -> Result<CommitOut, MlsError> {
        let mut mls_group = self.load(group)?;
        let bundle = mls_group
            .commit_builder()
            .force_self_update(force_update)
            .propose_adds(adds.into_iter().map(|kp| kp.key_package))
            .propose_removals(removes.into_iter().map(LeafNodeIndex::new))
            .load_psks(self.storage())
            .map_err(|e| MlsError::refused("commit", e))?
            .build(self.rand(), self.crypto(), &identity.key, |_| true)
            .map_err(|e| MlsError::refused("commit", e))?
            .stage_commit(self)
            .map_err(|e| MlsError::refused("commit", e))?;
        let (commit, welcome, _) = bundle.into_messages();
        mls_group
            .merge_pending_commit(self)
            .map_err(|e| MlsError::refused("merge", e))?;
        self.commit_out(identity, &mls_group, commit, welcome)
    }

    fn commit_out(
        &self,
        identity: &Identity,
        mls_group: &MlsGroup,
        commit: MlsMessageOut,
        welcome: Option<MlsMessageOut>,
    ) -> Result<CommitOut, MlsError> {
        let group_info = mls_group
            .export_group_info(self.crypto(), &identity.key, false)
            .map_err(|e| MlsError::refused("GroupInfo", e))?;
        Ok(CommitOut {
            commit: encode(&commit, "commit")?,
            welcome: welcome.map(|w| encode(&w, "Welcome")).transpose()?,
            group_info: encode(&group_info, "GroupInfo")?,
            context: encode(mls_group.public_group().group_context(), "group context")?,
        })
    }

    /// Encrypts an application message whose sender-chosen id is `message_id`: carried as
    /// the message's authenticated data (PROTOCOL.md §4.5, "Message ids"), so receivers can
    /// drop a copy that was encrypted again (a restored profile's resend).
    pub(crate) fn encrypt(
        &self,
        identity: &Identity,
        group: &GroupId,
        message_id: u64,
        bytes: &[u8],
    ) -> Result<Vec<u8>, MlsError> {
        let mut mls_group = self.load(group)?;
        mls_group.set_aad(message_id.to_be_bytes().to_vec());
        let message = mls_group
            .create_message(self, &identity.key, bytes)
            .map_err(|e| MlsError::refused("encrypt", e))?;
        encode(&message, "application message")
    }

    /// A proposal to remove our own leaf.
    pub(crate) fn leave(&self, identity: &Identity, group: &GroupId) -> Result<Vec<u8>, MlsError> {
        let mut mls_group = self.load(group)?;
        let message = mls_group
            .leave_group(self, &identity.key)
            .map_err(|e| MlsError::refused("leave", e))?;
        encode(&message, "proposal")
    }

    /// Deletes the group's local state.
    pub(crate) fn delete_group(&self, group: &GroupId) -> Result<(), MlsError> {
        if let Some(mut mls_group) = MlsGroup::load(self.storage(), &mls_id(group))? {
            mls_group.delete(self.storage())?;
        }
        Ok(())
    }

    /// Processes a commit, proposal or application message of `group`.
    pub(crate) fn process(&self, group: &GroupId, bytes: &[u8]) -> Result<Incoming, MlsError> {
        let message: ProtocolMessage = match decode_message(bytes)? {
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            _ => return Err(MlsError::Malformed("group message")),
        };
        if message.group_id().as_slice() != group.to_mls_bytes().as_slice() {
            return Err(MlsError::Malformed("message of another group"));
        }
        let mut mls_group = self.load(group)?;
        let ours = mls_group.epoch().as_u64();
        let theirs = message.epoch().as_u64();
        if theirs > ours {
            return Err(MlsError::Behind { ours, theirs });
        }
        if theirs < ours && matches!(message, ProtocolMessage::PublicMessage(_)) {
            return Err(MlsError::Stale { ours, theirs });
        }
        let processed = mls_group.process_message(self, message).map_err(|e| {
            // The ratchet secret of this message's generation is used up (deleted after the
            // first decryption, or too far in the past): a copy of a message processed
            // before (a retransmission, a redelivery, a restored backup of the sender). Not
            // when the message's whole epoch is gone (older than the past epochs we keep):
            // that one was never read, and is reported.
            let epoch_kept = ours - theirs <= super::MAX_PAST_EPOCHS as u64;
            let used_up = match &e {
                ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
                    MessageDecryptionError::SecretTreeError(err),
                )) => Some(err),
                _ => None,
            };
            if matches!(used_up, Some(SecretTreeError::SecretReuseError))
                || (matches!(used_up, Some(SecretTreeError::TooDistantInThePast)) && epoch_kept)
            {
                MlsError::Replayed
            } else {
                MlsError::Refused {
                    context: "processing",
                    reason: format!("{e:?} (a message of epoch {theirs}, ours is {ours})"),
                }
            }
        })?;
        let sender_leaf = match processed.sender() {
            Sender::Member(index) => Some(*index),
            _ => None,
        };
        let credential_leaf = |index: Option<LeafNodeIndex>| {
            let mut leaf = Leaf::of(
                index.map(|i| i.u32()).unwrap_or(u32::MAX),
                processed.credential(),
                &[],
            );
            if let Some(index) = index {
                leaf.signature_key = member_leaf(&mls_group, index).signature_key;
            }
            leaf
        };
        let sender = credential_leaf(sender_leaf);
        // Authenticated data of any other length is not a message id: no deduplication.
        let message_id = <[u8; 8]>::try_from(processed.aad())
            .ok()
            .map(u64::from_be_bytes);
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(message) => Ok(Incoming::Application {
                sender,
                message_id,
                bytes: message.into_bytes(),
            }),
            ProcessedMessageContent::ProposalMessage(proposal) => {
                let self_remove = match (proposal.proposal(), sender_leaf) {
                    (Proposal::Remove(remove), Some(index)) => remove.removed() == index,
                    _ => false,
                };
                mls_group.store_pending_proposal(self.storage(), *proposal)?;
                Ok(Incoming::Proposal {
                    sender,
                    self_remove,
                })
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::Refused {
                context: "processing",
                reason: "external proposals are not used".into(),
            }),
            ProcessedMessageContent::OwnPendingCommit
            | ProcessedMessageContent::OwnPrivateMessage => Err(MlsError::Refused {
                context: "processing",
                reason: "a message of our own came back".into(),
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let added = staged
                    .add_proposals()
                    .map(|add| {
                        Leaf::of_node(u32::MAX, add.add_proposal().key_package().leaf_node())
                    })
                    .collect::<Vec<_>>();
                let removed = staged
                    .remove_proposals()
                    .map(|remove| member_leaf(&mls_group, remove.remove_proposal().removed()))
                    .collect::<Vec<_>>();
                let left = staged
                    .remove_proposals()
                    .filter(|remove| {
                        matches!(remove.sender(), Sender::Member(index)
                            if *index == remove.remove_proposal().removed())
                    })
                    .map(|remove| member_leaf(&mls_group, remove.remove_proposal().removed()))
                    .collect::<Vec<_>>();
                let mut to_verify = added.clone();
                to_verify.extend(
                    staged
                        .update_proposals()
                        .map(|u| Leaf::of_node(u32::MAX, u.update_proposal().leaf_node())),
                );
                let path_leaf = staged.update_path_leaf_node().map(|node| {
                    Leaf::of_node(sender_leaf.map(|i| i.u32()).unwrap_or(u32::MAX), node)
                });
                let committer = path_leaf.clone().unwrap_or(sender);
                to_verify.extend(path_leaf);
                let self_removed = staged.self_removed();
                Ok(Incoming::Commit(Box::new(IncomingCommit {
                    group: mls_group,
                    staged,
                    committer,
                    added,
                    removed,
                    left,
                    to_verify,
                    self_removed,
                })))
            }
        }
    }

    /// Applies a verified incoming commit.
    pub(crate) fn merge_commit(&self, commit: Box<IncomingCommit>) -> Result<(), MlsError> {
        let IncomingCommit {
            mut group, staged, ..
        } = *commit;
        group
            .merge_staged_commit(self, *staged)
            .map_err(|e| MlsError::refused("merge", e))
    }

    /// Decrypts a Welcome (consuming our KeyPackage's private keys in the overlay).
    pub(crate) fn process_welcome(&self, bytes: &[u8]) -> Result<PendingJoin, MlsError> {
        let MlsMessageBodyIn::Welcome(welcome) = decode_message(bytes)? else {
            return Err(MlsError::Malformed("Welcome"));
        };
        let staged = StagedWelcome::new_from_welcome(self, &join_config(), welcome, None)
            .map_err(|e| MlsError::refused("Welcome", e))?;
        let group = GroupId::from_mls_bytes(staged.group_context().group_id().as_slice())
            .map_err(|_| MlsError::Malformed("group id"))?;
        let members = staged
            .members()
            .map(|m| Leaf::of(m.index.u32(), &m.credential, &m.signature_key))
            .collect();
        let sender_index = staged.welcome_sender_index();
        let inviter = staged
            .welcome_sender()
            .map(|node| Leaf::of_node(sender_index.u32(), node))
            .map_err(|e| MlsError::refused("Welcome", e))?;
        Ok(PendingJoin {
            staged,
            group,
            members,
            inviter,
        })
    }

    /// Turns a verified Welcome into a group.
    pub(crate) fn finish_join(&self, join: PendingJoin) -> Result<(), MlsError> {
        // A previous membership of the same group (we were removed, then re-added) is stale.
        self.delete_group(&join.group)?;
        join.staged
            .into_group(self)
            .map(|_| ())
            .map_err(|e| MlsError::refused("join", e))
    }

    /// Joins (or rejoins, replacing our old leaf) by external commit. The new state is in the
    /// overlay; returns the commit, the new GroupInfo and the members of the joined group.
    pub(crate) fn external_join(
        &self,
        identity: &Identity,
        group: &GroupId,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<(CommitOut, Vec<Leaf>), MlsError> {
        let MlsMessageBodyIn::GroupInfo(info) = decode_message(group_info)? else {
            return Err(MlsError::Malformed("GroupInfo"));
        };
        if info.group_id().as_slice() != group.to_mls_bytes().as_slice() {
            return Err(MlsError::Malformed("GroupInfo of another group"));
        }
        let tree = RatchetTreeIn::tls_deserialize_exact_bytes(ratchet_tree)
            .map_err(|_| MlsError::Malformed("ratchet tree"))?;
        self.delete_group(group)?;
        let (mls_group, bundle) = MlsGroup::external_commit_builder()
            .with_ratchet_tree(tree)
            .with_config(join_config())
            .build_group(self, info, identity.credential()?)
            .map_err(|e| MlsError::refused("external commit", e))?
            .leaf_node_parameters(
                LeafNodeParameters::builder()
                    .with_capabilities(super::leaf_capabilities())
                    .build(),
            )
            .load_psks(self.storage())
            .map_err(|e| MlsError::refused("external commit", e))?
            .build(self.rand(), self.crypto(), &identity.key, |_| true)
            .map_err(|e| MlsError::refused("external commit", e))?
            .finalize(self)
            .map_err(|e| MlsError::refused("external commit", e))?;
        let members = mls_group
            .members()
            .map(|m| Leaf::of(m.index.u32(), &m.credential, &m.signature_key))
            .collect();
        let (commit, _, _) = bundle.into_messages();
        Ok((
            self.commit_out(identity, &mls_group, commit, None)?,
            members,
        ))
    }
}
