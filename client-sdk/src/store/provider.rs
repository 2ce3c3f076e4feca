//! openmls's [`StorageProvider`] over the profile database, with a write overlay.
//!
//! openmls writes its group state through this trait as it works. Those writes go to an
//! in-memory overlay first; reads see the overlay, then the database. [`Store::commit`]
//! (in the parent module) writes the overlay together with the SDK's own changes (the last
//! processed queue seq, events, group records) in one redb write transaction, and
//! [`Store::discard`] drops it. So an MLS state change and its SDK bookkeeping are durable
//! together or not at all.
//!
//! Keys are a label, `/`, and the serde_json encoding of openmls's key; values are the
//! serde_json encoding of the entity (lists are JSON arrays).

use openmls_traits::storage::{CURRENT_VERSION, StorageProvider, traits};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Store, StoreError};

type Version = u16;
const V: Version = CURRENT_VERSION;

/// A failure of the MLS storage: the database or the serialisation of a value.
#[derive(Debug, thiserror::Error)]
#[error("MLS storage: {0}")]
pub(crate) struct MlsStorageError(String);

impl From<StoreError> for MlsStorageError {
    fn from(err: StoreError) -> Self {
        MlsStorageError(err.to_string())
    }
}

impl From<serde_json::Error> for MlsStorageError {
    fn from(err: serde_json::Error) -> Self {
        MlsStorageError(format!("encoding: {err}"))
    }
}

fn storage_key(label: &str, key: &impl Serialize) -> Result<Vec<u8>, MlsStorageError> {
    let mut out = Vec::with_capacity(label.len() + 64);
    out.extend_from_slice(label.as_bytes());
    out.push(b'/');
    serde_json::to_writer(&mut out, key)?;
    Ok(out)
}

impl Store {
    fn put<K: Serialize, T: Serialize + ?Sized>(
        &self,
        label: &str,
        key: &K,
        value: &T,
    ) -> Result<(), MlsStorageError> {
        let key = storage_key(label, key)?;
        self.overlay_put(key, Some(serde_json::to_vec(value)?));
        Ok(())
    }

    fn get<K: Serialize, T: DeserializeOwned>(
        &self,
        label: &str,
        key: &K,
    ) -> Result<Option<T>, MlsStorageError> {
        let key = storage_key(label, key)?;
        match self.mls_read(&key)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    fn del<K: Serialize>(&self, label: &str, key: &K) -> Result<(), MlsStorageError> {
        self.overlay_put(storage_key(label, key)?, None);
        Ok(())
    }

    fn list<K: Serialize, T: DeserializeOwned>(
        &self,
        label: &str,
        key: &K,
    ) -> Result<Vec<T>, MlsStorageError> {
        Ok(self.get(label, key)?.unwrap_or_default())
    }

    fn push<K: Serialize, T: Serialize>(
        &self,
        label: &str,
        key: &K,
        value: &T,
    ) -> Result<(), MlsStorageError> {
        let mut items: Vec<serde_json::Value> = self.list(label, key)?;
        items.push(serde_json::to_value(value)?);
        self.put(label, key, &items)
    }
}

/// Labels of the stored values.
mod label {
    pub(super) const JOIN_CONFIG: &str = "join_config";
    pub(super) const OWN_LEAF_NODES: &str = "own_leaf_nodes";
    pub(super) const PROPOSAL_REFS: &str = "proposal_refs";
    pub(super) const PROPOSAL: &str = "proposal";
    pub(super) const TREE: &str = "tree";
    pub(super) const INTERIM_TRANSCRIPT_HASH: &str = "interim_transcript_hash";
    pub(super) const CONTEXT: &str = "context";
    pub(super) const CONFIRMATION_TAG: &str = "confirmation_tag";
    pub(super) const GROUP_STATE: &str = "group_state";
    pub(super) const MESSAGE_SECRETS: &str = "message_secrets";
    pub(super) const RESUMPTION_PSK_STORE: &str = "resumption_psk_store";
    pub(super) const OWN_LEAF_INDEX: &str = "own_leaf_index";
    pub(super) const EPOCH_SECRETS: &str = "epoch_secrets";
    pub(super) const SIGNATURE_KEY_PAIR: &str = "signature_key_pair";
    pub(super) const ENCRYPTION_KEY_PAIR: &str = "encryption_key_pair";
    pub(super) const EPOCH_KEY_PAIRS: &str = "epoch_key_pairs";
    pub(super) const KEY_PACKAGE: &str = "key_package";
    pub(super) const PSK: &str = "psk";
}

/// One value per group: its writer, reader and deleter.
macro_rules! group_value {
    ($write:ident, $read:ident, $delete:ident, $kind:ident, $label:expr) => {
        fn $write<GroupId: traits::GroupId<V>, Value: traits::$kind<V>>(
            &self,
            group_id: &GroupId,
            value: &Value,
        ) -> Result<(), Self::Error> {
            self.put($label, group_id, value)
        }

        fn $read<GroupId: traits::GroupId<V>, Value: traits::$kind<V>>(
            &self,
            group_id: &GroupId,
        ) -> Result<Option<Value>, Self::Error> {
            self.get($label, group_id)
        }

        fn $delete<GroupId: traits::GroupId<V>>(
            &self,
            group_id: &GroupId,
        ) -> Result<(), Self::Error> {
            self.del($label, group_id)
        }
    };
}

impl StorageProvider<V> for Store {
    type Error = MlsStorageError;

    group_value!(
        write_mls_join_config,
        mls_group_join_config,
        delete_group_config,
        MlsGroupJoinConfig,
        label::JOIN_CONFIG
    );
    group_value!(write_tree, tree, delete_tree, TreeSync, label::TREE);
    group_value!(
        write_interim_transcript_hash,
        interim_transcript_hash,
        delete_interim_transcript_hash,
        InterimTranscriptHash,
        label::INTERIM_TRANSCRIPT_HASH
    );
    group_value!(
        write_context,
        group_context,
        delete_context,
        GroupContext,
        label::CONTEXT
    );
    group_value!(
        write_confirmation_tag,
        confirmation_tag,
        delete_confirmation_tag,
        ConfirmationTag,
        label::CONFIRMATION_TAG
    );
    group_value!(
        write_message_secrets,
        message_secrets,
        delete_message_secrets,
        MessageSecrets,
        label::MESSAGE_SECRETS
    );
    group_value!(
        write_resumption_psk_store,
        resumption_psk_store,
        delete_all_resumption_psk_secrets,
        ResumptionPskStore,
        label::RESUMPTION_PSK_STORE
    );
    group_value!(
        write_own_leaf_index,
        own_leaf_index,
        delete_own_leaf_index,
        LeafNodeIndex,
        label::OWN_LEAF_INDEX
    );
    group_value!(
        write_group_epoch_secrets,
        group_epoch_secrets,
        delete_group_epoch_secrets,
        GroupEpochSecrets,
        label::EPOCH_SECRETS
    );

    fn write_group_state<GroupState: traits::GroupState<V>, GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.put(label::GROUP_STATE, group_id, group_state)
    }

    fn group_state<GroupState: traits::GroupState<V>, GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.get(label::GROUP_STATE, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.del(label::GROUP_STATE, group_id)
    }

    fn append_own_leaf_node<GroupId: traits::GroupId<V>, LeafNode: traits::LeafNode<V>>(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.push(label::OWN_LEAF_NODES, group_id, leaf_node)
    }

    fn own_leaf_nodes<GroupId: traits::GroupId<V>, LeafNode: traits::LeafNode<V>>(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.list(label::OWN_LEAF_NODES, group_id)
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.del(label::OWN_LEAF_NODES, group_id)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<V>,
        ProposalRef: traits::ProposalRef<V>,
        QueuedProposal: traits::QueuedProposal<V>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.put(label::PROPOSAL, &(group_id, proposal_ref), proposal)?;
        let refs: Vec<serde_json::Value> = self.list(label::PROPOSAL_REFS, group_id)?;
        let new_ref = serde_json::to_value(proposal_ref)?;
        if !refs.contains(&new_ref) {
            self.push(label::PROPOSAL_REFS, group_id, &new_ref)?;
        }
        Ok(())
    }

    fn queued_proposal_refs<GroupId: traits::GroupId<V>, ProposalRef: traits::ProposalRef<V>>(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.list(label::PROPOSAL_REFS, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<V>,
        ProposalRef: traits::ProposalRef<V>,
        QueuedProposal: traits::QueuedProposal<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        let refs: Vec<ProposalRef> = self.list(label::PROPOSAL_REFS, group_id)?;
        let mut proposals = Vec::with_capacity(refs.len());
        for proposal_ref in refs {
            if let Some(proposal) = self.get(label::PROPOSAL, &(group_id, &proposal_ref))? {
                proposals.push((proposal_ref, proposal));
            }
        }
        Ok(proposals)
    }

    fn remove_proposal<GroupId: traits::GroupId<V>, ProposalRef: traits::ProposalRef<V>>(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        let target = serde_json::to_value(proposal_ref)?;
        let mut refs: Vec<serde_json::Value> = self.list(label::PROPOSAL_REFS, group_id)?;
        refs.retain(|r| *r != target);
        self.put(label::PROPOSAL_REFS, group_id, &refs)?;
        self.del(label::PROPOSAL, &(group_id, proposal_ref))
    }

    fn clear_proposal_queue<GroupId: traits::GroupId<V>, ProposalRef: traits::ProposalRef<V>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let refs: Vec<ProposalRef> = self.list(label::PROPOSAL_REFS, group_id)?;
        for proposal_ref in &refs {
            self.del(label::PROPOSAL, &(group_id, proposal_ref))?;
        }
        self.del(label::PROPOSAL_REFS, group_id)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<V>,
        SignatureKeyPair: traits::SignatureKeyPair<V>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.put(label::SIGNATURE_KEY_PAIR, public_key, signature_key_pair)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<V>,
        SignatureKeyPair: traits::SignatureKeyPair<V>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.get(label::SIGNATURE_KEY_PAIR, public_key)
    }

    fn delete_signature_key_pair<SignaturePublicKey: traits::SignaturePublicKey<V>>(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.del(label::SIGNATURE_KEY_PAIR, public_key)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<V>,
        HpkeKeyPair: traits::HpkeKeyPair<V>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.put(label::ENCRYPTION_KEY_PAIR, public_key, key_pair)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<V>,
        EncryptionKey: traits::EncryptionKey<V>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.get(label::ENCRYPTION_KEY_PAIR, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<V>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.del(label::ENCRYPTION_KEY_PAIR, public_key)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<V>,
        EpochKey: traits::EpochKey<V>,
        HpkeKeyPair: traits::HpkeKeyPair<V>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.put(
            label::EPOCH_KEY_PAIRS,
            &(group_id, epoch, leaf_index),
            key_pairs,
        )
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<V>,
        EpochKey: traits::EpochKey<V>,
        HpkeKeyPair: traits::HpkeKeyPair<V>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        self.list(label::EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<V>,
        EpochKey: traits::EpochKey<V>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.del(label::EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn write_key_package<
        HashReference: traits::HashReference<V>,
        KeyPackage: traits::KeyPackage<V>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.put(label::KEY_PACKAGE, hash_ref, key_package)
    }

    fn key_package<KeyPackageRef: traits::HashReference<V>, KeyPackage: traits::KeyPackage<V>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.get(label::KEY_PACKAGE, hash_ref)
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<V>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.del(label::KEY_PACKAGE, hash_ref)
    }

    fn write_psk<PskId: traits::PskId<V>, PskBundle: traits::PskBundle<V>>(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.put(label::PSK, psk_id, psk)
    }

    fn psk<PskBundle: traits::PskBundle<V>, PskId: traits::PskId<V>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.get(label::PSK, psk_id)
    }

    fn delete_psk<PskKey: traits::PskId<V>>(&self, psk_id: &PskKey) -> Result<(), Self::Error> {
        self.del(label::PSK, psk_id)
    }
}
