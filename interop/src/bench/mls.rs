//! openmls for the load generator: the creator of a benchmark group (creates it on the DS,
//! adds members in chunks, commits, makes application messages) and the raw baseline of the
//! DS's work, an openmls `PublicGroup` processing the same commits without a server around it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::{
    KeyPackage, LeafNodeIndex, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroup, MlsGroupCreateConfig,
    MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider as _,
    ProcessedMessageContent, ProposalStore, PublicGroup, RatchetTreeIn, StagedWelcome,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use roost_protocol::GroupId;
use roost_protocol::messages::delivery::{
    CommitRequest, CommitResponse, CreateGroupRequest, SendMessageRequest,
};
use tls_codec::{Deserialize as _, Serialize as _};

use super::clients::{BenchClient, CIPHERSUITE};

/// A commit ready to send: commit, Welcome (for adds) and the new epoch's GroupInfo.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The commit (a PublicMessage).
    pub commit: Vec<u8>,
    /// The Welcome, when members are added.
    pub welcome: Option<Vec<u8>>,
    /// The GroupInfo of the new epoch.
    pub group_info: Vec<u8>,
}

fn bytes(message: &MlsMessageOut) -> anyhow::Result<Vec<u8>> {
    Ok(message.tls_serialize_detached()?)
}

/// The member that creates a benchmark group and makes every commit in it.
pub struct GroupOwner {
    /// The creator.
    pub client: BenchClient,
    /// The group on the DS.
    pub gid: GroupId,
    provider: OpenMlsRustCrypto,
    group: MlsGroup,
}

impl GroupOwner {
    /// Creates a group `uuid@<creator's domain>` with only the creator, on the DS.
    pub async fn create(client: BenchClient, uuid: [u8; 16]) -> anyhow::Result<Self> {
        let (owner, request) = Self::new_group(client, uuid)?;
        let gid = owner.gid.clone();
        owner
            .client
            .conn()?
            .call(request)
            .await
            .with_context(|| format!("creating {gid}"))?;
        Ok(owner)
    }

    /// The CreateGroup request of a new group `uuid@<creator's domain>` (its MLS state is
    /// dropped: for filling a database with groups).
    pub fn create_request(
        client: &BenchClient,
        uuid: [u8; 16],
    ) -> anyhow::Result<CreateGroupRequest> {
        Ok(Self::new_group(client.clone(), uuid)?.1)
    }

    fn new_group(
        client: BenchClient,
        uuid: [u8; 16],
    ) -> anyhow::Result<(Self, CreateGroupRequest)> {
        let gid = GroupId::new(uuid, client.id.domain().clone());
        let provider = OpenMlsRustCrypto::default();
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        let group = MlsGroup::new_with_group_id(
            &provider,
            &*client.key,
            &config,
            openmls::group::GroupId::from_slice(&gid.to_mls_bytes()),
            client.credential()?,
        )
        .map_err(|e| anyhow::anyhow!("cannot create the MLS group: {e}"))?;
        let group_info = group
            .export_group_info(provider.crypto(), &*client.key, false)
            .map_err(|e| anyhow::anyhow!("cannot export the GroupInfo: {e}"))?;
        let tree = group.export_ratchet_tree().tls_serialize_detached()?;
        let request = CreateGroupRequest {
            group: gid.clone(),
            group_info: bytes(&group_info)?.into(),
            ratchet_tree: tree.into(),
        };
        Ok((
            Self {
                client,
                gid,
                provider,
                group,
            },
            request,
        ))
    }

    /// Joins the group of `welcome` (an encoded Welcome) as `client`, whose KeyPackage's private
    /// keys are in `provider`; `tree` is the encoded ratchet tree when the Welcome does not
    /// carry it. The joined member can then make messages like the creator.
    pub fn join(
        client: BenchClient,
        provider: OpenMlsRustCrypto,
        welcome: &[u8],
        tree: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let group = join_group(&provider, welcome, tree)?;
        let gid = GroupId::from_mls_bytes(group.group_id().as_slice())
            .map_err(|e| anyhow::anyhow!("not a roost group id: {e:?}"))?;
        Ok(Self {
            client,
            gid,
            provider,
            group,
        })
    }

    /// The encoded GroupInfo of the current epoch, without the ratchet tree (the DS serves it).
    pub fn group_info(&self) -> anyhow::Result<Vec<u8>> {
        let info = self
            .group
            .export_group_info(self.provider.crypto(), &*self.client.key, false)
            .map_err(|e| anyhow::anyhow!("cannot export the GroupInfo: {e}"))?;
        bytes(&info)
    }

    /// The encoded ratchet tree of the current epoch.
    pub fn ratchet_tree(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.group.export_ratchet_tree().tls_serialize_detached()?)
    }

    /// Whether Welcomes of later commits carry the ratchet tree (as the SDK's do).
    pub fn set_tree_in_welcome(&mut self, on: bool) -> anyhow::Result<()> {
        let config = join_config(on);
        self.group
            .set_configuration(self.provider.storage(), &config)
            .map_err(|e| anyhow::anyhow!("cannot change the group's configuration: {e}"))
    }

    /// Members in the group (the creator included).
    pub fn size(&self) -> usize {
        self.group.members().count()
    }

    /// Builds a commit adding and removing (staged, not merged).
    pub fn commit(&mut self, adds: Vec<KeyPackage>, removes: &[u32]) -> anyhow::Result<Bundle> {
        let provider = &self.provider;
        let bundle = self
            .group
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes.iter().map(|&i| LeafNodeIndex::new(i)))
            .consume_proposal_store(true)
            .load_psks(provider.storage())
            .map_err(|e| anyhow::anyhow!("cannot load PSKs: {e}"))?
            .create_group_info(true)
            .build(
                provider.rand(),
                provider.crypto(),
                &*self.client.key,
                |_| true,
            )
            .map_err(|e| anyhow::anyhow!("cannot build a commit: {e}"))?
            .stage_commit(provider)
            .map_err(|e| anyhow::anyhow!("cannot stage a commit: {e}"))?;
        let welcome = bundle.to_welcome_msg().map(|w| bytes(&w)).transpose()?;
        let (commit, _, group_info) = bundle.into_contents();
        let group_info = group_info.context("no GroupInfo in the commit bundle")?;
        Ok(Bundle {
            commit: bytes(&commit)?,
            welcome,
            group_info: bytes(&MlsMessageOut::from(group_info))?,
        })
    }

    /// Sends a commit to the DS.
    pub async fn send_commit(&self, bundle: &Bundle) -> anyhow::Result<CommitResponse> {
        Ok(self
            .client
            .conn()?
            .call(CommitRequest {
                group: self.gid.clone(),
                commit: bundle.commit.clone().into(),
                welcome: bundle.welcome.clone().map(Into::into),
                group_info: bundle.group_info.clone().into(),
            })
            .await?)
    }

    /// Drops the pending commit (refused, or only built to race another one).
    pub fn discard(&mut self) -> anyhow::Result<()> {
        self.group
            .clear_pending_commit(self.provider.storage())
            .map_err(|e| anyhow::anyhow!("cannot drop the pending commit: {e}"))
    }

    /// Merges the pending (accepted) commit.
    pub fn merge(&mut self) -> anyhow::Result<()> {
        self.group
            .merge_pending_commit(&self.provider)
            .map_err(|e| anyhow::anyhow!("cannot merge: {e}"))
    }

    /// Adds members with these KeyPackages, `chunk` per commit; each commit is accepted by the
    /// DS before the next.
    pub async fn add_members(&mut self, kps: Vec<KeyPackage>, chunk: usize) -> anyhow::Result<()> {
        let mut kps = kps.into_iter().peekable();
        while kps.peek().is_some() {
            let part: Vec<KeyPackage> = kps.by_ref().take(chunk.max(1)).collect();
            let bundle = self.commit(part, &[])?;
            self.send_commit(&bundle).await?;
            self.merge()?;
        }
        Ok(())
    }

    /// A PrivateMessage of the current epoch carrying `text`, as a SendMessage request.
    pub fn message(&mut self, text: &[u8]) -> anyhow::Result<SendMessageRequest> {
        let message = self
            .group
            .create_message(&self.provider, &*self.client.key, text)
            .map_err(|e| anyhow::anyhow!("cannot encrypt: {e}"))?;
        Ok(SendMessageRequest {
            group: self.gid.clone(),
            message: bytes(&message)?.into(),
        })
    }

    /// The leaf index of a client, if it is a member.
    pub fn leaf_of(&self, client: &BenchClient) -> anyhow::Result<u32> {
        let identity = client.id.tls_serialize_detached()?;
        self.group
            .members()
            .find(|m| m.credential.serialized_content() == identity.as_slice())
            .map(|m| m.index.u32())
            .with_context(|| format!("{} is not a member", client.id))
    }

    /// A `PublicGroup` of the current epoch, built from the GroupInfo and ratchet tree the way
    /// a DS would (the baseline of [`RawPublicGroup::process`]).
    pub fn public_group(&self) -> anyhow::Result<RawPublicGroup> {
        let info = self
            .group
            .export_group_info(self.provider.crypto(), &*self.client.key, false)
            .map_err(|e| anyhow::anyhow!("cannot export the GroupInfo: {e}"))?;
        let info = bytes(&info)?;
        let MlsMessageBodyIn::GroupInfo(verifiable) =
            MlsMessageIn::tls_deserialize_exact(info.as_slice())?.extract()
        else {
            bail!("not a GroupInfo");
        };
        let verifiable: VerifiableGroupInfo = verifiable;
        let tree = self.group.export_ratchet_tree().tls_serialize_detached()?;
        let tree = RatchetTreeIn::tls_deserialize_exact(tree.as_slice())?;
        let provider = OpenMlsRustCrypto::default();
        let (group, _) = PublicGroup::from_external(
            provider.crypto(),
            provider.storage(),
            tree,
            verifiable,
            ProposalStore::new(),
        )
        .map_err(|e| anyhow::anyhow!("PublicGroup::from_external: {e}"))?;
        Ok(RawPublicGroup { provider, group })
    }
}

/// The join configuration of benchmark members: handshake messages in plaintext (the DS
/// validates them), with or without the ratchet tree in Welcomes.
fn join_config(tree_in_welcome: bool) -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(tree_in_welcome)
        .build()
}

/// Decodes a Welcome and joins its group with the KeyPackage keys in `provider` (consumed).
pub fn join_group(
    provider: &OpenMlsRustCrypto,
    welcome: &[u8],
    tree: Option<&[u8]>,
) -> anyhow::Result<MlsGroup> {
    let MlsMessageBodyIn::Welcome(welcome) =
        MlsMessageIn::tls_deserialize_exact(welcome)?.extract()
    else {
        bail!("not a Welcome");
    };
    let tree = tree.map(RatchetTreeIn::tls_deserialize_exact).transpose()?;
    let staged =
        StagedWelcome::new_from_welcome(provider, &join_config(tree.is_none()), welcome, tree)
            .map_err(|e| anyhow::anyhow!("cannot process the Welcome: {e}"))?;
    staged
        .into_group(provider)
        .map_err(|e| anyhow::anyhow!("cannot join from the Welcome: {e}"))
}

/// A copy of a provider's keys and state (to process the same Welcome twice: once timed
/// against the server, once alone as the baseline).
pub fn copy_provider(provider: &OpenMlsRustCrypto) -> anyhow::Result<OpenMlsRustCrypto> {
    let copy = OpenMlsRustCrypto::default();
    let values = provider
        .storage()
        .values
        .read()
        .map_err(|_| anyhow::anyhow!("poisoned MLS storage"))?
        .clone();
    *copy
        .storage()
        .values
        .write()
        .map_err(|_| anyhow::anyhow!("poisoned MLS storage"))? = values;
    Ok(copy)
}

/// openmls's `PublicGroup` alone: what the DS's MLS work costs without the server.
pub struct RawPublicGroup {
    provider: OpenMlsRustCrypto,
    group: PublicGroup,
}

impl RawPublicGroup {
    /// Decodes, validates (`process_message`) and merges one commit; returns the time taken.
    pub fn process(&mut self, commit: &[u8]) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let message = MlsMessageIn::tls_deserialize_exact(commit)?
            .try_into_protocol_message()
            .map_err(|e| anyhow::anyhow!("not a protocol message: {e}"))?;
        let processed = self
            .group
            .process_message(self.provider.crypto(), message)
            .map_err(|e| anyhow::anyhow!("PublicGroup::process_message: {e}"))?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            bail!("not a commit");
        };
        self.group
            .merge_commit(self.provider.storage(), *staged)
            .map_err(|e| anyhow::anyhow!("PublicGroup::merge_commit: {e}"))?;
        Ok(start.elapsed())
    }
}
