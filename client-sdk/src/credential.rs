//! Member verification (RFC 9420 §5.3.1, PROTOCOL.md §6.4): a leaf is accepted only if its
//! BasicCredential identity decodes as a ClientId, the AS of that ClientId's domain issued a
//! currently valid ClientCredential for it (signature checked with the domain's AS keys), and
//! the leaf's signature key is the credential's.
//!
//! Verified (ClientId, key) pairs are remembered in the profile database until their
//! credential expires; AS keys are cached per domain for the life of the [`Verifier`].

use std::collections::HashMap;
use std::time::Duration;

use roost_protocol::messages::auth::{
    AsKeysRequest, ClientCredential, DiscoverUserRequest, LABEL_CLIENT_CREDENTIAL, signing_input,
};
use roost_protocol::{ClientId, Domain, ErrorCode};

use crate::clock::Clock;
use crate::error::ClientError;
use crate::mls::Leaf;
use crate::store::{Changes, Store};
use crate::transport::{ReconnectingConnection, RequestError};

/// Why a leaf was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) client: Option<ClientId>,
    pub(crate) reason: String,
}

impl Rejection {
    fn new(client: Option<&ClientId>, reason: impl Into<String>) -> Self {
        Rejection {
            client: client.cloned(),
            reason: reason.into(),
        }
    }
}

impl From<Rejection> for ClientError {
    fn from(r: Rejection) -> Self {
        ClientError::CredentialRejected {
            client: r.client,
            reason: r.reason,
        }
    }
}

fn ed25519_verifies(key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(message, signature)
        .is_ok()
}

/// Sorts the failure of a question to the AS: a definite refusal by a server (e.g. an
/// unknown or unfederated domain) is a rejection of the leaf; a failure that may pass (network,
/// overload) is an error, so the check is made again later.
fn permanent_refusal<T>(
    result: Result<T, ClientError>,
    client: &ClientId,
) -> Result<Result<T, Rejection>, ClientError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(ClientError::Request(err)) if err.wire_error().is_some() && !err.is_transient() => {
            Ok(Err(Rejection::new(
                Some(client),
                format!("the AS could not vouch for this client: {err}"),
            )))
        }
        Err(err) => Err(err),
    }
}

/// Checks member credentials against the AS.
#[derive(Debug)]
pub(crate) struct Verifier {
    own: ClientId,
    own_key: Vec<u8>,
    skew: Duration,
    clock: Clock,
    as_keys: tokio::sync::Mutex<HashMap<Domain, Vec<Vec<u8>>>>,
}

impl Verifier {
    pub(crate) fn new(own: ClientId, own_key: Vec<u8>, skew: Duration, clock: Clock) -> Self {
        Self {
            own,
            own_key,
            skew,
            clock,
            as_keys: Default::default(),
        }
    }

    /// Verifies `leaf`. `Ok(Err(_))` is a refusal; `Err(_)` means the check could not be made
    /// (network, database) and should be retried later. `hint` is a credential that came
    /// with the leaf (a claimed KeyPackage's); otherwise the AS is asked (DiscoverUser).
    /// A success is recorded in `changes` (to be committed with the state change).
    pub(crate) async fn verify(
        &self,
        conn: &ReconnectingConnection,
        store: &Store,
        leaf: &Leaf,
        hint: Option<&ClientCredential>,
        changes: &mut Changes,
    ) -> Result<Result<(), Rejection>, ClientError> {
        let Some(client) = &leaf.client else {
            return Ok(Err(Rejection::new(
                None,
                "the leaf's credential is not a BasicCredential naming a ClientId",
            )));
        };
        if *client == self.own {
            return Ok(if leaf.signature_key == self.own_key {
                Ok(())
            } else {
                Err(Rejection::new(
                    Some(client),
                    "a leaf claims to be this client with another key",
                ))
            });
        }
        let now = self.clock.unix_secs();
        if let Some(not_after) = store.verified(client, &leaf.signature_key)?
            && not_after > now
        {
            return Ok(Ok(()));
        }
        let credential = match hint.filter(|c| c.client == *client) {
            Some(credential) => credential.clone(),
            None => match permanent_refusal(self.discover(conn, client).await, client)? {
                Ok(Some(credential)) => credential,
                Ok(None) => {
                    return Ok(Err(Rejection::new(
                        Some(client),
                        "the AS has no current credential for this client",
                    )));
                }
                Err(rejection) => return Ok(Err(rejection)),
            },
        };
        if credential.signature_key.as_slice() != leaf.signature_key.as_slice() {
            return Ok(Err(Rejection::new(
                Some(client),
                "the leaf's signature key is not the one in the client's AS credential",
            )));
        }
        let skew = self.skew.as_secs();
        if credential.not_before > now.saturating_add(skew)
            || credential.not_after.saturating_add(skew) < now
        {
            return Ok(Err(Rejection::new(
                Some(client),
                "the client's AS credential is not valid now",
            )));
        }
        let valid =
            match permanent_refusal(self.as_signature_valid(conn, &credential).await, client)? {
                Ok(valid) => valid,
                Err(rejection) => return Ok(Err(rejection)),
            };
        if !valid {
            return Ok(Err(Rejection::new(
                Some(client),
                "the AS signature on the client's credential does not verify",
            )));
        }
        changes.verified.push((
            client.clone(),
            leaf.signature_key.clone(),
            credential.not_after,
        ));
        Ok(Ok(()))
    }

    async fn discover(
        &self,
        conn: &ReconnectingConnection,
        client: &ClientId,
    ) -> Result<Option<ClientCredential>, ClientError> {
        let request = DiscoverUserRequest {
            user: client.user.clone(),
        };
        match conn.call(request).await {
            Ok(found) => Ok(found.clients.into_iter().find(|c| c.client == *client)),
            Err(RequestError::Server(err)) if err.code == ErrorCode::USER_NOT_FOUND => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Whether one of the AS keys of the credential's domain signed it. Keys are fetched
    /// once per domain and again if none verifies (the AS may have rotated).
    async fn as_signature_valid(
        &self,
        conn: &ReconnectingConnection,
        credential: &ClientCredential,
    ) -> Result<bool, ClientError> {
        let message = signing_input(LABEL_CLIENT_CREDENTIAL, &credential.tbs());
        let signature = credential.as_signature.as_slice();
        let domain = credential.client.domain().clone();
        let mut cache = self.as_keys.lock().await;
        for refresh in [false, true] {
            if refresh || !cache.contains_key(&domain) {
                let keys = conn
                    .call(AsKeysRequest {
                        domain: domain.clone(),
                    })
                    .await?;
                if keys.domain != domain {
                    return Ok(false);
                }
                cache.insert(
                    domain.clone(),
                    keys.keys.into_iter().map(|k| k.into_vec()).collect(),
                );
            }
            let keys = cache.get(&domain).map(Vec::as_slice).unwrap_or_default();
            if keys
                .iter()
                .any(|key| ed25519_verifies(key, &message, signature))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
