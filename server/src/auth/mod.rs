//! Authentication Service: users, their clients (devices), credentials, discovery and
//! connection authentication.

use std::net::IpAddr;

use roost_protocol::messages::auth::*;
use roost_protocol::{ClientId, Domain, Opaque, UserId, UserName};

use crate::State;
use crate::error::ServiceError;
use crate::identity::{check_ed25519_key, verify_ed25519};

pub(crate) mod tokens;

/// An active local client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientRecord {
    /// Its current credential.
    pub(crate) credential: ClientCredential,
    /// Number of the client's queue and KeyPackage rows.
    pub(crate) client_num: u64,
}

/// The client a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authenticated {
    pub(crate) client: ClientId,
    pub(crate) client_num: u64,
}

/// What the Authentication Service needs from storage (implemented by every engine in
/// `storage`). Removed clients must stay known so a device name is never reused.
pub(crate) trait AuthStore {
    /// Creates a user unless the name is taken (USER_EXISTS); with a token (hash, allowed
    /// uses), consumes one use or refuses (REGISTRATION_TOKEN_REQUIRED).
    async fn create_user(
        &self,
        name: &UserName,
        user_key: Vec<u8>,
        token: Option<(String, u64)>,
    ) -> Result<(), ServiceError>;
    /// The user's key, if the user exists.
    async fn user_key(&self, name: &UserName) -> Result<Option<Vec<u8>>, ServiceError>;
    /// Adds a client with its queue unless the device name was ever used (CLIENT_EXISTS);
    /// returns its client number.
    async fn add_client(&self, credential: ClientCredential) -> Result<u64, ServiceError>;
    /// Removes an active client (CLIENT_NOT_FOUND otherwise) with its queue and KeyPackages,
    /// keeping its name used; returns its client number.
    async fn remove_client(&self, client: &ClientId) -> Result<u64, ServiceError>;
    /// An active client.
    async fn active_client(&self, client: &ClientId) -> Result<Option<ClientRecord>, ServiceError>;
    /// Every active client of a user, in device-name order.
    async fn active_clients_of(&self, user: &UserId) -> Result<Vec<ClientRecord>, ServiceError>;
    /// The client numbers of local clients, in the order asked; `None` for clients that are
    /// not active (unknown or removed). One call for many, as the Delivery Service resolves a
    /// group's members.
    async fn client_nums(&self, clients: Vec<ClientId>) -> Result<Vec<Option<u64>>, ServiceError>;
    /// Replaces an active client's credential (CLIENT_NOT_FOUND if removed).
    async fn replace_credential(&self, credential: ClientCredential) -> Result<(), ServiceError>;
}

fn require_local(state: &State, domain: &Domain) -> Result<(), ServiceError> {
    if domain == &state.settings.domain {
        Ok(())
    } else {
        Err(ServiceError::Forbidden("id is not of this homeserver"))
    }
}

/// RegisterUser.
pub(crate) async fn register(
    state: &State,
    source: IpAddr,
    req: RegisterUserRequest,
) -> Result<RegisterUserResponse, ServiceError> {
    require_local(state, &req.user.domain)?;
    let key = crate::ratelimit::source_key(source, state.settings.limits.registration_ipv6_prefix);
    state
        .registration_limiter
        .check(key)
        .map_err(ServiceError::RateLimited)?;
    check_ed25519_key(req.user_key.as_slice())?;
    let tbs = RegisterUserTbs {
        user: req.user.clone(),
        user_key: req.user_key.clone(),
    };
    verify_ed25519(
        req.user_key.as_slice(),
        &signing_input(LABEL_REGISTER_USER, &tbs),
        req.signature.as_slice(),
    )?;
    let token = if state.settings.require_registration_token {
        let token = req
            .registration_token
            .as_ref()
            .ok_or(ServiceError::RegistrationTokenRequired)?;
        let hash = tokens::hash_token(token.as_slice());
        let allowed = tokens::allowed_uses(&state.settings.identity_dir, &hash)
            .map_err(|err| {
                tracing::error!(%err, "cannot read the registration tokens");
                ServiceError::Unavailable
            })?
            .ok_or(ServiceError::RegistrationTokenRequired)?;
        Some((hash, allowed))
    } else {
        None
    };
    let user = req.user;
    state
        .store
        .create_user(&user.name, req.user_key.into_vec(), token)
        .await?;
    tracing::info!(%user, "user registered");
    Ok(RegisterUserResponse { user })
}

/// AddClient: authorised by the user's signature, then limited per user (rate, and number of
/// active clients). Before the signature is checked an unknown user and a wrong key give the
/// same answer (BAD_SIGNATURE), so the request is no existence oracle.
pub(crate) async fn add_client(
    state: &State,
    req: AddClientRequest,
) -> Result<AddClientResponse, ServiceError> {
    require_local(state, req.client.domain())?;
    check_ed25519_key(req.client_key.as_slice())?;
    let tbs = AddClientTbs {
        client: req.client.clone(),
        client_key: req.client_key.clone(),
    };
    verify_user_signature(
        state,
        &req.client.user,
        &signing_input(LABEL_ADD_CLIENT, &tbs),
        req.user_signature.as_slice(),
    )
    .await?;
    state
        .add_client_limiter
        .check(req.client.user.clone())
        .map_err(ServiceError::RateLimited)?;
    // Removed clients are tombstones: they do not count. Concurrent AddClients of one user
    // may pass this check together; the rate limit above bounds how many.
    let max = state.settings.limits.max_clients_per_user;
    let active = state.store.active_clients_of(&req.client.user).await?.len();
    if active >= max as usize {
        return Err(ServiceError::LimitExceeded(format!(
            "at most {max} clients per user"
        )));
    }

    let credential = issue_credential(state, req.client.clone(), req.client_key);
    state.store.add_client(credential.clone()).await?;
    tracing::info!(client = %req.client, "client added");
    Ok(AddClientResponse { credential })
}

/// Checks a signature by `user`'s key. An unknown user fails exactly like a wrong signature
/// (BAD_SIGNATURE), after the same work: the signature is checked against a stand-in key
/// (the AS key, whose owner never signs these labels) and refused whatever the outcome.
async fn verify_user_signature(
    state: &State,
    user: &UserId,
    message: &[u8],
    signature: &[u8],
) -> Result<(), ServiceError> {
    match state.store.user_key(&user.name).await? {
        Some(key) => verify_ed25519(&key, message, signature),
        None => {
            let _ = verify_ed25519(&state.as_key.public_key(), message, signature);
            Err(ServiceError::BadSignature)
        }
    }
}

/// RemoveClient: authorised by the user's signature, checked before anything about the
/// client is revealed (an unknown user, like a wrong key, is BAD_SIGNATURE; CLIENT_NOT_FOUND
/// only after a valid signature). Deletes the queue and KeyPackages and keeps a tombstone so
/// the device name is never reused.
pub(crate) async fn remove_client(
    state: &State,
    req: RemoveClientRequest,
) -> Result<RemoveClientResponse, ServiceError> {
    require_local(state, req.client.domain())?;
    let tbs = RemoveClientTbs {
        client: req.client.clone(),
    };
    verify_user_signature(
        state,
        &req.client.user,
        &signing_input(LABEL_REMOVE_CLIENT, &tbs),
        req.user_signature.as_slice(),
    )
    .await?;
    let client_num = state.store.remove_client(&req.client).await?;
    state.revoke(client_num);
    state.queues.close_listeners(client_num);
    tracing::info!(client = %req.client, "client removed");
    Ok(RemoveClientResponse {})
}

/// DiscoverUser for a local user.
pub(crate) async fn discover(
    state: &State,
    req: DiscoverUserRequest,
) -> Result<DiscoverUserResponse, ServiceError> {
    if req.user.domain != state.settings.domain {
        return Err(ServiceError::UnknownDomain(req.user.domain.to_string()));
    }
    let clients = state.store.active_clients_of(&req.user).await?;
    if clients.is_empty() {
        return Err(ServiceError::UserNotFound);
    }
    Ok(DiscoverUserResponse {
        clients: clients.into_iter().map(|r| r.credential).collect(),
    })
}

/// AsKeys for the local domain.
pub(crate) fn as_keys(state: &State, req: AsKeysRequest) -> Result<AsKeysResponse, ServiceError> {
    if req.domain != state.settings.domain {
        return Err(ServiceError::UnknownDomain(req.domain.to_string()));
    }
    Ok(AsKeysResponse {
        domain: req.domain,
        keys: vec![state.as_key.public_key().into()],
    })
}

/// Authenticate: checks the client's signature over this connection's exporter value.
pub(crate) async fn authenticate(
    state: &State,
    exporter: &[u8],
    req: AuthenticateRequest,
) -> Result<(Authenticated, AuthenticateResponse), ServiceError> {
    require_local(state, req.client.domain())?;
    let record = state
        .store
        .active_client(&req.client)
        .await?
        // Unknown and removed clients fail like a bad signature: no enumeration.
        .ok_or(ServiceError::BadSignature)?;
    let tbs = ConnectionAuthTbs {
        client: req.client.clone(),
        exporter: exporter.into(),
    };
    verify_ed25519(
        record.credential.signature_key.as_slice(),
        &signing_input(LABEL_CONNECTION_AUTH, &tbs),
        req.signature.as_slice(),
    )?;
    let validity = state.settings.limits.credential_validity_secs;
    let credential =
        if record.credential.not_after <= state.clock.unix_secs().saturating_add(validity / 2) {
            renew_credential(state, record.credential).await?
        } else {
            record.credential
        };
    Ok((
        Authenticated {
            client: req.client,
            client_num: record.client_num,
        },
        AuthenticateResponse { credential },
    ))
}

/// Issues a fresh credential for the same client and key (less than half of its validity was
/// left) and stores it.
async fn renew_credential(
    state: &State,
    old: ClientCredential,
) -> Result<ClientCredential, ServiceError> {
    let credential = issue_credential(state, old.client, old.signature_key);
    state.store.replace_credential(credential.clone()).await?;
    tracing::info!(client = %credential.client, "credential renewed");
    Ok(credential)
}

/// Makes and signs a credential valid from now for the configured validity.
fn issue_credential(state: &State, client: ClientId, signature_key: Opaque) -> ClientCredential {
    let not_before = state.clock.unix_secs();
    let not_after = not_before.saturating_add(state.settings.limits.credential_validity_secs);
    let tbs = ClientCredentialTbs {
        client: client.clone(),
        signature_key: signature_key.clone(),
        not_before,
        not_after,
    };
    let as_signature = state
        .as_key
        .sign(&signing_input(LABEL_CLIENT_CREDENTIAL, &tbs));
    ClientCredential {
        client,
        signature_key,
        not_before,
        not_after,
        as_signature: as_signature.into(),
    }
}
