//! Requests from peer homeservers. A peer may act only for clients of the domains its
//! certificate speaks for, only about this server's own users, clients and groups (one hop,
//! no relaying), and may deliver only messages of groups it hosts.

use roost_protocol::messages::federation::{
    DeliverRequest, DeliverResponse, FederationRequest, ForwardRequest,
};
use roost_protocol::messages::{ClientRequest, Response};
use roost_protocol::{ClientId, Domain};
use rustls::pki_types::CertificateDer;

use crate::error::ServiceError;
use crate::{State, auth, delivery, keypackage, queue};

/// Who is on the other end of a federation connection.
pub(crate) struct PeerContext {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) ca_verified: bool,
    /// Rate-limit key: SHA-256 of the leaf certificate.
    pub(crate) key: Vec<u8>,
}

impl PeerContext {
    pub(crate) fn new(state: &State, chain: Vec<CertificateDer<'static>>) -> Option<Self> {
        let leaf = chain.first()?;
        let key = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref())
            .as_ref()
            .to_vec();
        let ca_verified = state.federation.verifier.ca_verified(&chain);
        Some(Self {
            chain,
            ca_verified,
            key,
        })
    }

    fn speaks_for(&self, state: &State, domain: &Domain) -> bool {
        state.federation.allowed(domain)
            && state
                .federation
                .verifier
                .speaks_for(&self.chain, self.ca_verified, domain)
    }
}

fn error(err: ServiceError) -> Response {
    tracing::debug!(%err, "federation request refused");
    Response::Error(err.to_wire())
}

fn reply<T>(result: Result<T, ServiceError>, wrap: impl FnOnce(T) -> Response) -> Response {
    result.map_or_else(error, wrap)
}

fn admit(state: &State, peer: &PeerContext) -> Result<(), ServiceError> {
    if !state.federation.admits_peer(&peer.chain, peer.ca_verified) {
        return Err(ServiceError::Forbidden(
            "this homeserver does not federate with the peer",
        ));
    }
    state
        .federation
        .inbound_limiter
        .check(peer.key.clone())
        .map_err(ServiceError::RateLimited)
}

/// Serves a peer's proxy download of a blob this server stores, on `out`; false if the
/// stream must be reset.
pub(crate) async fn blob_download<W: tokio::io::AsyncWrite + Unpin>(
    state: &State,
    peer: &PeerContext,
    request: roost_protocol::messages::blob::BlobDownloadRequest,
    out: &mut W,
) -> bool {
    if let Err(err) = admit(state, peer) {
        let frame = roost_protocol::frame::encode_frame(&error(err));
        return match frame {
            Ok(frame) => tokio::io::AsyncWriteExt::write_all(out, &frame)
                .await
                .is_ok(),
            Err(_) => false,
        };
    }
    crate::blob::download(
        state,
        crate::blob::Downloader::Peer(&peer.key),
        request,
        out,
    )
    .await
}

/// Handles one federation request.
pub(crate) async fn handle(
    state: &State,
    peer: &PeerContext,
    request: FederationRequest,
) -> Response {
    if let Err(err) = admit(state, peer) {
        return error(err);
    }
    match request {
        FederationRequest::Forward(forward) => handle_forward(state, peer, forward).await,
        FederationRequest::Deliver(deliver) => reply(
            handle_deliver(state, peer, deliver).await,
            Response::Deliver,
        ),
        // The transport serves blob downloads on their stream.
        FederationRequest::BlobDownload(_) => error(ServiceError::WrongStream(
            "blob downloads are served on their own stream",
        )),
    }
}

async fn handle_forward(state: &State, peer: &PeerContext, forward: ForwardRequest) -> Response {
    use ClientRequest as R;
    let ours = &state.settings.domain;
    let sender = match forward.sender {
        Some(sender) if !peer.speaks_for(state, sender.domain()) => {
            tracing::warn!(%sender, "peer forwarded for a client of a domain it does not speak for");
            return error(ServiceError::Forbidden(
                "the peer does not speak for the sender's domain",
            ));
        }
        sender => sender,
    };
    let needs = |sender: &Option<ClientId>| sender.clone().ok_or(ServiceError::Unauthenticated);
    let local = |domain: &Domain| {
        if domain == ours {
            Ok(())
        } else {
            Err(ServiceError::Forbidden("not a domain of this homeserver"))
        }
    };
    match forward.request {
        R::DiscoverUser(req) => reply(
            async {
                local(&req.user.domain)?;
                auth::discover(state, req).await
            }
            .await,
            Response::DiscoverUser,
        ),
        R::AsKeys(req) => reply(
            async {
                local(&req.domain)?;
                auth::as_keys(state, req)
            }
            .await,
            Response::AsKeys,
        ),
        R::ClaimUserKeyPackages(req) => reply(
            async {
                local(&req.user.domain)?;
                keypackage::claim_user(state, &needs(&sender)?, req).await
            }
            .await,
            Response::ClaimUserKeyPackages,
        ),
        R::ClaimClientKeyPackage(req) => reply(
            async {
                local(req.client.domain())?;
                keypackage::claim_client(state, &needs(&sender)?, req).await
            }
            .await,
            Response::ClaimClientKeyPackage,
        ),
        R::Commit(req) => reply(
            async {
                local(&req.group.domain)?;
                delivery::commit(state, &needs(&sender)?, req).await
            }
            .await,
            Response::Commit,
        ),
        R::SendMessage(req) => reply(
            async {
                local(&req.group.domain)?;
                delivery::send_message(state, &needs(&sender)?, req).await
            }
            .await,
            Response::SendMessage,
        ),
        R::SendCounted(req) => reply(
            async {
                local(&req.group.domain)?;
                delivery::send_counted(state, &needs(&sender)?, req).await
            }
            .await,
            Response::SendCounted,
        ),
        R::LeaveGroup(req) => reply(
            async {
                local(&req.group.domain)?;
                delivery::leave(state, &needs(&sender)?, req).await
            }
            .await,
            Response::LeaveGroup,
        ),
        R::FetchGroupInfo(req) => reply(
            async {
                local(&req.group.domain)?;
                delivery::fetch_group_info(state, &needs(&sender)?, req).await
            }
            .await,
            Response::FetchGroupInfo,
        ),
        R::ExternalJoin(req) => reply(
            async {
                local(&req.group.domain)?;
                delivery::external_join(state, &needs(&sender)?, req).await
            }
            .await,
            Response::ExternalJoin,
        ),
        other => error(ServiceError::WrongStream(match other.kind() {
            roost_protocol::messages::RequestKind::CreateGroup => {
                "groups are created on the creator's own homeserver"
            }
            _ => "this request cannot be forwarded",
        })),
    }
}

async fn handle_deliver(
    state: &State,
    peer: &PeerContext,
    deliver: DeliverRequest,
) -> Result<DeliverResponse, ServiceError> {
    let ours = &state.settings.domain;
    for delivery in &deliver.deliveries {
        if delivery.recipients.is_empty() {
            return Err(ServiceError::Forbidden("a delivery has no recipients"));
        }
        // The bound every sender keeps (one outbox entry), so one peer request cannot make
        // the store resolve an unbounded list of recipients in one transaction.
        if delivery.recipients.len() > super::outbox::MAX_RECIPIENTS_PER_DELIVERY {
            return Err(ServiceError::LimitExceeded(format!(
                "a delivery names at most {} recipients",
                super::outbox::MAX_RECIPIENTS_PER_DELIVERY
            )));
        }
        if delivery.recipients.iter().any(|r| r.domain() != ours) {
            return Err(ServiceError::Forbidden(
                "a recipient is not a client of this homeserver",
            ));
        }
        if !peer.speaks_for(state, &delivery.payload.group().domain) {
            tracing::warn!(group = %delivery.payload.group(), "peer delivered for a group it does not host");
            return Err(ServiceError::Forbidden("the peer does not host the group"));
        }
    }
    queue::deliver_remote(state, deliver.deliveries).await
}
