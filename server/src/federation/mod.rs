//! Federation: talking to other homeservers over QUIC with mutual TLS (ALPN `roost-fed/1`).
//!
//! Outbound, a client request that concerns another domain (a user, client or group of it) is
//! forwarded to that domain's homeserver on behalf of the authenticated client, and the hub's
//! fan-out to other domains' queues goes through a durable outbox ([`outbox`]). Inbound
//! ([`inbound`]), a peer may speak only for the domains its certificate is valid for, and only
//! about this server's own users, clients and groups. Peer connections reuse the client SDK's
//! request layer.

pub(crate) mod certified;
pub(crate) mod inbound;
pub(crate) mod outbox;
pub(crate) mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use roost_client::transport::{ClientIdentity, ConnectConfig, Connection, Endpoint, TrustConfig};
use roost_protocol::messages::federation::{DeliverRequest, FederationRequest, ForwardRequest};
use roost_protocol::messages::{ClientRequest, Response};
use roost_protocol::{ClientId, Domain};
use rustls::pki_types::CertificateDer;
use tokio::sync::{Mutex, OnceCell, Semaphore};

use crate::ServerError;
use crate::config::{FederationConfig, Settings};
use crate::error::ServiceError;
use crate::identity::TlsIdentity;
use crate::ratelimit::RateLimiter;
use tls::PeerVerifier;

/// A configured peer.
#[derive(Debug, Clone, Default)]
struct Peer {
    /// `host:port` of each node, in the order they are tried (empty: the domain, port 4433).
    addresses: Vec<String>,
    pinned: Option<CertificateDer<'static>>,
}

/// The pooled connection to one peer domain.
#[derive(Default)]
struct PeerLink {
    connection: Option<Connection>,
    /// The address the last connection was made to: the next one starts there, or after it
    /// if that connection was lost.
    last_addr: Option<SocketAddr>,
}

/// Federation state of a homeserver.
pub(crate) struct Federation {
    pub(crate) enabled: bool,
    pub(crate) config: FederationConfig,
    domain: Domain,
    peers: BTreeMap<Domain, Peer>,
    allow: Vec<Domain>,
    deny: Vec<Domain>,
    roots: Option<rustls::RootCertStore>,
    identity: ClientIdentity,
    pub(crate) verifier: Arc<PeerVerifier>,
    endpoint: OnceCell<Endpoint>,
    connections: std::sync::Mutex<HashMap<Domain, Arc<Mutex<PeerLink>>>>,
    in_flight: std::sync::Mutex<HashMap<Domain, Arc<Semaphore>>>,
    /// Requests per peer certificate (SHA-256 of the leaf).
    pub(crate) inbound_limiter: RateLimiter<Vec<u8>>,
    pub(crate) outbox: outbox::Outbox,
    /// Signature keys other domains' ASes certified (see [`certified_key`]).
    pub(crate) certified: Arc<certified::CertifiedKeys>,
}

fn parse_domains(names: &[String]) -> Vec<Domain> {
    // Validated by Config::validate.
    names.iter().filter_map(|n| n.parse().ok()).collect()
}

impl Federation {
    pub(crate) fn new(settings: &Settings, tls: &TlsIdentity) -> Result<Self, ServerError> {
        let config = settings.federation.clone();
        let mut peers = BTreeMap::new();
        let mut pins = BTreeMap::new();
        for (name, peer) in &config.peers {
            let domain: Domain = name
                .parse()
                .map_err(|_| ServerError::Tls(format!("bad peer domain {name}")))?;
            let pinned = match &peer.certificate {
                Some(path) => {
                    let certs = roost_client::transport::load_certificates_pem(path)
                        .map_err(|e| ServerError::Tls(format!("peer {name}: {e}")))?;
                    let leaf = certs
                        .into_iter()
                        .next()
                        .ok_or_else(|| ServerError::Tls(format!("peer {name}: no certificate")))?;
                    pins.insert(domain.clone(), leaf.clone());
                    Some(leaf)
                }
                None => None,
            };
            peers.insert(
                domain,
                Peer {
                    addresses: peer
                        .address
                        .iter()
                        .chain(&peer.addresses)
                        .cloned()
                        .collect(),
                    pinned,
                },
            );
        }
        let roots = match &config.ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = roost_client::transport::load_certificates_pem(path)
                    .map_err(|e| ServerError::Tls(format!("federation CA: {e}")))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| ServerError::Tls(format!("federation CA: {e}")))?;
                }
                Some(roots)
            }
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            PeerVerifier::new(pins, roots.clone(), provider).map_err(ServerError::Tls)?;
        Ok(Self {
            enabled: config.enabled,
            domain: settings.domain.clone(),
            allow: parse_domains(&config.allow_domains),
            deny: parse_domains(&config.deny_domains),
            peers,
            roots,
            identity: ClientIdentity::new(tls.cert_chain.clone(), tls.key.clone_key()),
            verifier: Arc::new(verifier),
            endpoint: OnceCell::new(),
            connections: Default::default(),
            in_flight: Default::default(),
            inbound_limiter: RateLimiter::new(
                f64::from(config.peer_rate_per_sec),
                config.peer_burst,
            ),
            outbox: outbox::Outbox::default(),
            certified: Arc::new(certified::CertifiedKeys::new(
                config.certified_keys_cached as usize,
                std::time::Duration::from_millis(config.certified_keys_ttl_ms),
            )),
            config,
        })
    }

    /// Whether requests for `domain` may go to (and come from) its homeserver.
    pub(crate) fn allowed(&self, domain: &Domain) -> bool {
        self.enabled
            && domain != &self.domain
            && !self.deny.contains(domain)
            && (self.allow.is_empty() || self.allow.contains(domain))
    }

    /// Whether a peer presenting `chain` may talk to us at all: it speaks for no denied domain,
    /// and, with an allow list, for at least one allowed domain. (Per request, it must also
    /// speak for the domain it acts for.)
    pub(crate) fn admits_peer(&self, chain: &[CertificateDer<'static>], ca_verified: bool) -> bool {
        if !self.enabled
            || self
                .deny
                .iter()
                .any(|d| self.verifier.speaks_for(chain, ca_verified, d))
        {
            return false;
        }
        self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|d| self.verifier.speaks_for(chain, ca_verified, d))
    }

    fn semaphore(&self, domain: &Domain) -> Arc<Semaphore> {
        let mut map = match self.in_flight.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(domain.clone())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(
                    self.config.max_in_flight_per_peer.max(1) as usize
                ))
            })
            .clone()
    }

    /// Every address of `domain`'s homeserver, in the configured order (each `host:port` may
    /// resolve to several). Names that do not resolve are skipped while others do.
    async fn resolve(&self, domain: &Domain) -> Result<Vec<SocketAddr>, ServiceError> {
        let default = [format!("{domain}:{}", roost_protocol::DEFAULT_PORT)];
        let targets = match self.peers.get(domain) {
            Some(peer) if !peer.addresses.is_empty() => peer.addresses.as_slice(),
            _ => &default,
        };
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for target in targets {
            match tokio::net::lookup_host(target.as_str()).await {
                Ok(found) => {
                    for addr in found {
                        if !addrs.contains(&addr) {
                            addrs.push(addr);
                        }
                    }
                }
                Err(err) => tracing::debug!(%domain, %target, %err, "cannot resolve peer address"),
            }
        }
        if addrs.is_empty() {
            return Err(ServiceError::PeerUnreachable(domain.to_string()));
        }
        Ok(addrs)
    }

    /// The pooled connection to `domain`'s homeserver, (re)connecting if needed: to the
    /// address that worked last, or, if that connection was lost, first to the addresses after
    /// it (its node may be gone), then to the others in order.
    async fn connection(&self, domain: &Domain) -> Result<Connection, ServiceError> {
        let slot = {
            let mut map = match self.connections.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            map.entry(domain.clone()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.connection.as_ref().filter(|c| c.is_open()) {
            return Ok(conn.clone());
        }
        let lost = slot.connection.take().is_some();
        let trust = match (
            self.peers.get(domain).and_then(|p| p.pinned.clone()),
            &self.roots,
        ) {
            (Some(pin), _) => TrustConfig::PinnedCertificates(vec![pin]),
            (None, Some(roots)) => TrustConfig::Roots(roots.clone()),
            (None, None) => return Err(ServiceError::UnknownDomain(domain.to_string())),
        };
        let mut addrs = self.resolve(domain).await?;
        if let Some(last) = slot
            .last_addr
            .and_then(|last| addrs.iter().position(|a| *a == last))
        {
            let start = (last + usize::from(lost)) % addrs.len();
            addrs.rotate_left(start);
        }
        let endpoint = self
            .endpoint
            .get_or_try_init(|| async { Endpoint::bind(SocketAddr::from(([0, 0, 0, 0], 0))) })
            .await
            .map_err(|e| ServiceError::Internal(format!("federation endpoint: {e}")))?;
        let Some(&first) = addrs.first() else {
            return Err(ServiceError::PeerUnreachable(domain.to_string()));
        };
        let mut config =
            ConnectConfig::federation(first, domain.as_str(), trust, self.identity.clone());
        config.server_addrs = addrs;
        // A peer address that does not answer within the connect timeout is treated as
        // unreachable (the next one is tried; once all failed, the outbox retries); a
        // restarted peer resets our old connection at once (stable reset key).
        config.request_timeout = std::time::Duration::from_millis(self.config.request_timeout_ms);
        config.connect_timeout = std::time::Duration::from_millis(self.config.connect_timeout_ms);
        let conn = endpoint.connect(&config).await.map_err(|err| {
            tracing::warn!(%domain, %err, "cannot reach peer");
            ServiceError::PeerUnreachable(domain.to_string())
        })?;
        slot.last_addr = Some(conn.server_addr());
        slot.connection = Some(conn.clone());
        Ok(conn)
    }

    async fn send(
        &self,
        domain: &Domain,
        request: &FederationRequest,
    ) -> Result<Response, ServiceError> {
        let permits = self.semaphore(domain);
        let _permit = permits
            .acquire()
            .await
            .map_err(|_| ServiceError::Unavailable)?;
        let conn = self.connection(domain).await?;
        conn.request_federation(request).await.map_err(|err| {
            tracing::debug!(%domain, %err, "federation request failed");
            // Lost, timed out or broken: drop the pooled connection so that the next request
            // (an outbox retry) connects afresh instead of waiting on a dead one.
            conn.close();
            ServiceError::PeerUnreachable(domain.to_string())
        })
    }

    /// Forwards a client request to `domain` on behalf of `sender`. The peer's answer, error
    /// or not, is the answer to the client.
    pub(crate) async fn forward(
        &self,
        domain: &Domain,
        sender: Option<ClientId>,
        request: ClientRequest,
    ) -> Result<Response, ServiceError> {
        if !self.allowed(domain) {
            return Err(ServiceError::UnknownDomain(domain.to_string()));
        }
        let kind = request.kind();
        metrics::counter!("roost_federation_forwarded_total", "kind" => kind.name()).increment(1);
        self.send(
            domain,
            &FederationRequest::Forward(ForwardRequest { sender, request }),
        )
        .await
    }

    /// Opens a stream to `domain`'s homeserver for a streamed request (a proxy download).
    pub(crate) async fn open_stream(
        &self,
        domain: &Domain,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ServiceError> {
        if !self.allowed(domain) {
            return Err(ServiceError::UnknownDomain(domain.to_string()));
        }
        let conn = self.connection(domain).await?;
        conn.open_raw_stream().await.map_err(|err| {
            tracing::debug!(%domain, %err, "cannot open a stream to the peer");
            conn.close();
            ServiceError::PeerUnreachable(domain.to_string())
        })
    }

    /// Sends a batch of deliveries to `domain`.
    pub(crate) async fn deliver(
        &self,
        domain: &Domain,
        request: DeliverRequest,
    ) -> Result<Response, ServiceError> {
        self.send(domain, &FederationRequest::Deliver(request))
            .await
    }
}

/// The domain a client request must be forwarded to, if it concerns another homeserver.
/// CreateGroup is never forwarded (groups are created on the creator's server).
pub(crate) fn remote_target<'a>(ours: &Domain, request: &'a ClientRequest) -> Option<&'a Domain> {
    use ClientRequest as R;
    let domain = match request {
        R::DiscoverUser(r) => &r.user.domain,
        R::AsKeys(r) => &r.domain,
        R::ClaimUserKeyPackages(r) => &r.user.domain,
        R::ClaimClientKeyPackage(r) => r.client.domain(),
        R::Commit(r) => &r.group.domain,
        R::SendMessage(r) => &r.group.domain,
        R::SendCounted(r) => &r.group.domain,
        R::LeaveGroup(r) => &r.group.domain,
        R::FetchGroupInfo(r) => &r.group.domain,
        R::ExternalJoin(r) => &r.group.domain,
        _ => return None,
    };
    (domain != ours).then_some(domain)
}

/// The signature key the AS of `client`'s domain currently certifies for it (None if the
/// client does not exist there, or the credential does not verify under that AS's keys),
/// asking that AS and remembering the answer in [`Federation::certified`].
pub(crate) async fn certified_key(
    state: &crate::State,
    client: &ClientId,
) -> Result<Option<Vec<u8>>, ServiceError> {
    let key = ask_certified_key(state, client).await?;
    let cache = &state.federation.certified;
    match &key {
        Some(key) => cache.insert(client.clone(), key.clone()),
        None => cache.remove(client),
    }
    Ok(key)
}

async fn ask_certified_key(
    state: &crate::State,
    client: &ClientId,
) -> Result<Option<Vec<u8>>, ServiceError> {
    use roost_protocol::messages::auth::*;
    let federation = &state.federation;
    let domain = client.domain();
    let keys = match federation
        .forward(
            domain,
            None,
            ClientRequest::AsKeys(AsKeysRequest {
                domain: domain.clone(),
            }),
        )
        .await?
    {
        Response::AsKeys(keys) if &keys.domain == domain => keys.keys,
        _ => return Ok(None),
    };
    let discovered = federation
        .forward(
            domain,
            None,
            ClientRequest::DiscoverUser(DiscoverUserRequest {
                user: client.user.clone(),
            }),
        )
        .await?;
    let Response::DiscoverUser(found) = discovered else {
        return Ok(None);
    };
    let now = state.clock.unix_secs();
    let Some(credential) = found.clients.into_iter().find(|c| &c.client == client) else {
        return Ok(None);
    };
    if credential.not_before > now.saturating_add(300) || credential.not_after < now {
        return Ok(None);
    }
    let signed = signing_input(LABEL_CLIENT_CREDENTIAL, &credential.tbs());
    let valid = keys.iter().any(|key| {
        crate::identity::verify_ed25519(key.as_slice(), &signed, credential.as_signature.as_slice())
            .is_ok()
    });
    Ok(valid.then(|| credential.signature_key.into_vec()))
}
