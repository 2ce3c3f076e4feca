//! A real openmls client for the DS end-to-end tests: registered with the server, talking to it
//! over QUIC, sending handshake messages as PublicMessages.

use openmls::prelude::{
    KeyPackage, KeyPackageIn, LeafNodeIndex, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroup,
    MlsGroupCreateConfig, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut,
    OpenMlsProvider, ProcessedMessageContent, ProtocolMessage, ProtocolVersion, RatchetTreeIn,
    StagedWelcome,
    tls_codec::{Deserialize as _, Serialize as _},
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use roost_client::transport::{Connection, RequestError};
use roost_protocol::messages::delivery::*;
use roost_protocol::messages::keypackage::*;
use roost_protocol::messages::queue::*;
use roost_protocol::{ClientId, GroupId, UserId};
use roost_server::Server;

use crate::common::*;

pub struct Bundle {
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub group_info: Vec<u8>,
}

pub struct Member {
    pub user: TestUser,
    pub client: TestClient,
    pub conn: Connection,
    pub provider: OpenMlsRustCrypto,
    pub group: Option<MlsGroup>,
    pub group_id: Option<GroupId>,
    pub seen: u64,
}

fn bytes(message: &MlsMessageOut) -> Vec<u8> {
    message.tls_serialize_detached().unwrap()
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build()
}

/// What a member got from its queue.
#[derive(Debug, Default)]
pub struct Received {
    pub messages: Vec<Vec<u8>>,
    pub commits: usize,
    pub proposals: usize,
    pub joined: bool,
    pub removed: bool,
}

impl Member {
    pub async fn new(server: &Server, name: &str) -> Member {
        Member::new_in(server, name, DOMAIN).await
    }

    pub async fn new_in(server: &Server, name: &str, domain: &str) -> Member {
        let (user, client, conn) = new_client_in(server, name, domain).await;
        Member {
            user,
            client,
            conn,
            provider: OpenMlsRustCrypto::default(),
            group: None,
            group_id: None,
            seen: 0,
        }
    }

    pub fn id(&self) -> &ClientId {
        &self.client.id
    }

    pub fn user_id(&self) -> &UserId {
        &self.user.id
    }

    pub fn group(&mut self) -> &mut MlsGroup {
        self.group.as_mut().unwrap()
    }

    pub fn epoch(&self) -> u64 {
        self.group.as_ref().unwrap().epoch().as_u64()
    }

    pub fn gid(&self) -> GroupId {
        self.group_id.clone().unwrap()
    }

    /// Uploads KeyPackages built with this member's own provider (which keeps their private
    /// keys, so a Welcome can be opened).
    pub async fn upload_key_packages(&self, n: usize) {
        let credential = openmls::prelude::CredentialWithKey {
            credential: openmls::prelude::BasicCredential::new(
                self.client.id.tls_serialize_detached().unwrap(),
            )
            .into(),
            signature_key: self.client.key.public().into(),
        };
        let kps = (0..n)
            .map(|_| {
                let bundle = KeyPackage::builder()
                    .build(
                        CIPHERSUITE,
                        &self.provider,
                        &self.client.key,
                        credential.clone(),
                    )
                    .unwrap();
                bundle
                    .key_package()
                    .tls_serialize_detached()
                    .unwrap()
                    .into()
            })
            .collect();
        self.conn
            .call(UploadKeyPackagesRequest {
                key_packages: kps,
                last_resort: None,
            })
            .await
            .unwrap();
    }

    pub async fn create_group(&mut self, uuid: u8) {
        let group_id = GroupId::new([uuid; 16], self.client.id.domain().clone());
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        let credential = openmls::prelude::CredentialWithKey {
            credential: openmls::prelude::BasicCredential::new(
                self.client.id.tls_serialize_detached().unwrap(),
            )
            .into(),
            signature_key: self.client.key.public().into(),
        };
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.client.key,
            &config,
            openmls::group::GroupId::from_slice(&group_id.to_mls_bytes()),
            credential,
        )
        .unwrap();
        let group_info = group
            .export_group_info(self.provider.crypto(), &self.client.key, false)
            .unwrap();
        let tree = group
            .export_ratchet_tree()
            .tls_serialize_detached()
            .unwrap();
        self.group = Some(group);
        self.conn
            .call(CreateGroupRequest {
                group: group_id.clone(),
                group_info: bytes(&group_info).into(),
                ratchet_tree: tree.into(),
            })
            .await
            .unwrap();
        self.group_id = Some(group_id);
    }

    /// Claims one KeyPackage per device of each user, through the server.
    pub async fn claim(&self, users: &[&UserId]) -> Vec<KeyPackage> {
        let mut out = Vec::new();
        for user in users {
            let claimed = self
                .conn
                .call(ClaimUserKeyPackagesRequest {
                    user: (*user).clone(),
                })
                .await
                .unwrap();
            for kp in claimed.key_packages {
                let kp = KeyPackageIn::tls_deserialize_exact(kp.key_package.as_slice()).unwrap();
                out.push(
                    kp.validate(self.provider.crypto(), ProtocolVersion::Mls10)
                        .unwrap(),
                );
            }
        }
        out
    }

    /// Builds a commit (staged, not merged) adding and removing.
    pub fn commit(&mut self, adds: Vec<KeyPackage>, removes: &[u32]) -> Bundle {
        let provider = &self.provider;
        let group = self.group.as_mut().unwrap();
        let bundle = group
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes.iter().map(|&i| LeafNodeIndex::new(i)))
            .consume_proposal_store(true)
            .load_psks(provider.storage())
            .unwrap()
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), &self.client.key, |_| {
                true
            })
            .unwrap()
            .stage_commit(provider)
            .unwrap();
        let welcome = bundle.to_welcome_msg().map(|w| bytes(&w));
        let (commit, _, group_info) = bundle.into_contents();
        Bundle {
            commit: bytes(&commit),
            welcome,
            group_info: bytes(&MlsMessageOut::from(group_info.unwrap())),
        }
    }

    pub async fn send_commit(&self, bundle: &Bundle) -> Result<CommitResponse, RequestError> {
        self.conn
            .call(CommitRequest {
                group: self.gid(),
                commit: bundle.commit.clone().into(),
                welcome: bundle.welcome.clone().map(Into::into),
                group_info: bundle.group_info.clone().into(),
            })
            .await
    }

    pub fn merge(&mut self) {
        let provider = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .merge_pending_commit(provider)
            .unwrap();
    }

    pub fn discard(&mut self) {
        let provider = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .clear_pending_commit(provider.storage())
            .unwrap();
    }

    /// Commits adds/removes and merges once the DS accepted.
    pub async fn commit_and_merge(&mut self, adds: Vec<KeyPackage>, removes: &[u32]) -> u64 {
        let bundle = self.commit(adds, removes);
        let response = self.send_commit(&bundle).await.unwrap();
        self.merge();
        assert_eq!(response.epoch, self.epoch());
        response.epoch
    }

    /// Encrypts an application message without sending it.
    pub fn encrypt(&mut self, text: &[u8]) -> Vec<u8> {
        let provider = &self.provider;
        let message = self
            .group
            .as_mut()
            .unwrap()
            .create_message(provider, &self.client.key, text)
            .unwrap();
        bytes(&message)
    }

    /// Sends an encrypted application message (the same bytes as often as called).
    pub async fn send_bytes(&self, message: &[u8]) -> Result<SendMessageResponse, RequestError> {
        self.conn
            .call(SendMessageRequest {
                group: self.gid(),
                message: message.to_vec().into(),
            })
            .await
    }

    pub async fn send(&mut self, text: &[u8]) -> Result<SendMessageResponse, RequestError> {
        let provider = &self.provider;
        let message = self
            .group
            .as_mut()
            .unwrap()
            .create_message(provider, &self.client.key, text)
            .unwrap();
        self.conn
            .call(SendMessageRequest {
                group: self.gid(),
                message: bytes(&message).into(),
            })
            .await
    }

    pub async fn leave(&mut self) -> Result<LeaveGroupResponse, RequestError> {
        let provider = &self.provider;
        let proposal = self
            .group
            .as_mut()
            .unwrap()
            .leave_group(provider, &self.client.key)
            .unwrap();
        self.conn
            .call(LeaveGroupRequest {
                group: self.gid(),
                proposal: bytes(&proposal).into(),
            })
            .await
    }

    /// Fetches and processes everything new in the queue, then acks it.
    pub async fn sync(&mut self) -> Received {
        let fetched = self
            .conn
            .call(QueueFetchRequest {
                after_seq: self.seen,
                max_messages: 1000,
                max_bytes: 1 << 24,
            })
            .await
            .unwrap();
        let mut received = Received::default();
        for message in fetched.messages {
            assert!(message.seq > self.seen, "queue order");
            self.seen = message.seq;
            self.process(message.payload, &mut received).await;
        }
        if self.seen > 0 {
            self.conn
                .call(QueueAckRequest {
                    up_to_seq: self.seen,
                })
                .await
                .unwrap();
        }
        received
    }

    async fn process(&mut self, payload: QueuePayload, received: &mut Received) {
        match payload {
            QueuePayload::Welcome(welcome) => {
                let MlsMessageBodyIn::Welcome(w) =
                    MlsMessageIn::tls_deserialize_exact(welcome.message.as_slice())
                        .unwrap()
                        .extract()
                else {
                    panic!("not a Welcome");
                };
                // The ratchet tree comes from the DS.
                let info = self
                    .conn
                    .call(FetchGroupInfoRequest {
                        group: welcome.group.clone(),
                    })
                    .await
                    .unwrap();
                let tree =
                    RatchetTreeIn::tls_deserialize_exact(info.ratchet_tree.as_slice()).unwrap();
                let staged =
                    StagedWelcome::new_from_welcome(&self.provider, &join_config(), w, Some(tree))
                        .unwrap();
                self.group = Some(staged.into_group(&self.provider).unwrap());
                self.group_id = Some(welcome.group);
                received.joined = true;
            }
            QueuePayload::GroupMessage(message) => {
                let protocol: ProtocolMessage =
                    MlsMessageIn::tls_deserialize_exact(message.message.as_slice())
                        .unwrap()
                        .try_into_protocol_message()
                        .unwrap();
                let provider = &self.provider;
                let Some(group) = self.group.as_mut() else {
                    return;
                };
                let processed = group.process_message(provider, protocol).unwrap();
                match processed.into_content() {
                    ProcessedMessageContent::ApplicationMessage(app) => {
                        received.messages.push(app.into_bytes())
                    }
                    ProcessedMessageContent::StagedCommitMessage(staged) => {
                        let removed = staged.self_removed();
                        group.merge_staged_commit(provider, *staged).unwrap();
                        received.commits += 1;
                        if removed {
                            received.removed = true;
                        }
                    }
                    ProcessedMessageContent::ProposalMessage(proposal) => {
                        group
                            .store_pending_proposal(provider.storage(), *proposal)
                            .unwrap();
                        received.proposals += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    /// The leaf index of a client in this member's view.
    pub fn leaf_of(&self, client: &ClientId) -> u32 {
        let identity = client.tls_serialize_detached().unwrap();
        self.group
            .as_ref()
            .unwrap()
            .members()
            .find(|m| m.credential.serialized_content() == identity.as_slice())
            .map(|m| m.index.u32())
            .unwrap()
    }
}
