//! Authentication Service: users, their clients (devices), credentials, discovery and
//! connection authentication.

use std::net::IpAddr;

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::messages::auth::*;
use roost_protocol::{ClientId, Domain, Opaque, UserId};
use tls_codec::{DeserializeBytes, TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::State;
use crate::error::ServiceError;
use crate::identity::{check_ed25519_key, verify_ed25519};
use crate::storage::tables::{CLIENTS, QUEUE_HEADS, TOKEN_USES, USERS};
use crate::storage::{StoreError, next_counter};

pub(crate) mod tokens;

/// A local user as stored.
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
struct UserRecord {
    user_key: Opaque,
    created_ms: u64,
}

/// A local client as stored.
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub(crate) struct ClientRecord {
    pub(crate) credential: ClientCredential,
    /// Number of the client's queue and KeyPackage rows.
    pub(crate) client_num: u64,
    /// 0 = active, 1 = removed (tombstone: the device name stays used).
    pub(crate) revoked: u8,
}

/// The client a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authenticated {
    pub(crate) client: ClientId,
    pub(crate) client_num: u64,
}

pub(crate) fn client_key(client: &ClientId) -> String {
    format!("{}/{}", client.user.name, client.device)
}

fn encode<T: tls_codec::Serialize + tls_codec::Size>(value: &T) -> Result<Vec<u8>, StoreError> {
    value
        .tls_serialize_detached()
        .map_err(|_| StoreError::Corrupt("encode"))
}

pub(crate) fn decode_client(bytes: &[u8]) -> Result<ClientRecord, StoreError> {
    match ClientRecord::tls_deserialize_bytes(bytes) {
        Ok((record, [])) => Ok(record),
        _ => Err(StoreError::Corrupt("clients")),
    }
}

/// Looks up an active local client.
pub(crate) fn active_client<T>(
    clients: &T,
    client: &ClientId,
) -> Result<Option<ClientRecord>, StoreError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    let Some(raw) = clients.get(client_key(client).as_str())? else {
        return Ok(None);
    };
    let record = decode_client(raw.value())?;
    Ok((record.revoked == 0).then_some(record))
}

/// Every active client of a local user, in device-name order.
pub(crate) fn active_clients_of<T>(
    clients: &T,
    user: &UserId,
) -> Result<Vec<ClientRecord>, StoreError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    // Keys are "name/device"; '0' is the byte after '/'.
    let start = format!("{}/", user.name);
    let end = format!("{}0", user.name);
    let mut out = Vec::new();
    for entry in clients.range(start.as_str()..end.as_str())? {
        let (_, raw) = entry?;
        let record = decode_client(raw.value())?;
        if record.revoked == 0 {
            out.push(record);
        }
    }
    Ok(out)
}

fn require_local(state: &State, domain: &Domain) -> Result<(), ServiceError> {
    if domain == &state.settings.domain {
        Ok(())
    } else {
        Err(ServiceError::Forbidden("id is not of this homeserver"))
    }
}

fn now_secs() -> u64 {
    crate::unix_millis() / 1000
}

/// RegisterUser.
pub(crate) async fn register(
    state: &State,
    source: IpAddr,
    req: RegisterUserRequest,
) -> Result<RegisterUserResponse, ServiceError> {
    require_local(state, &req.user.domain)?;
    state
        .registration_limiter
        .check(source)
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
        let allowed = tokens::allowed_uses(&state.settings.data_dir, &hash)
            .ok_or(ServiceError::RegistrationTokenRequired)?;
        Some((hash, allowed))
    } else {
        None
    };
    let record = UserRecord {
        user_key: req.user_key,
        created_ms: crate::unix_millis(),
    };
    let user = req.user;
    let name = user.name.as_str().to_owned();
    state
        .store
        .write(move |txn| {
            let mut users = txn.open_table(USERS)?;
            if users.get(name.as_str())?.is_some() {
                return Ok(Err(ServiceError::UserExists));
            }
            if let Some((hash, allowed)) = token {
                let mut uses = txn.open_table(TOKEN_USES)?;
                let used = uses.get(hash.as_str())?.map(|v| v.value()).unwrap_or(0);
                if used >= allowed {
                    return Ok(Err(ServiceError::RegistrationTokenRequired));
                }
                uses.insert(hash.as_str(), used + 1)?;
            }
            users.insert(name.as_str(), encode(&record)?.as_slice())?;
            Ok(Ok(()))
        })
        .await?;
    tracing::info!(%user, "user registered");
    Ok(RegisterUserResponse { user })
}

/// AddClient: authorised by the user's signature.
pub(crate) async fn add_client(
    state: &State,
    req: AddClientRequest,
) -> Result<AddClientResponse, ServiceError> {
    require_local(state, req.client.domain())?;
    check_ed25519_key(req.client_key.as_slice())?;
    let user_key = user_key(state, &req.client.user).await?;
    let tbs = AddClientTbs {
        client: req.client.clone(),
        client_key: req.client_key.clone(),
    };
    verify_ed25519(
        &user_key,
        &signing_input(LABEL_ADD_CLIENT, &tbs),
        req.user_signature.as_slice(),
    )?;

    let credential = issue_credential(state, req.client.clone(), req.client_key);
    let key = client_key(&req.client);
    let cred = credential.clone();
    state
        .store
        .write(move |txn| {
            let mut clients = txn.open_table(CLIENTS)?;
            if clients.get(key.as_str())?.is_some() {
                return Ok(Err(ServiceError::ClientExists));
            }
            let client_num = next_counter(txn, "next_client_num")?;
            let record = ClientRecord {
                credential: cred,
                client_num,
                revoked: 0,
            };
            clients.insert(key.as_str(), encode(&record)?.as_slice())?;
            txn.open_table(QUEUE_HEADS)?.insert(client_num, (0, 0))?;
            Ok(Ok(()))
        })
        .await?;
    tracing::info!(client = %req.client, "client added");
    Ok(AddClientResponse { credential })
}

async fn user_key(state: &State, user: &UserId) -> Result<Vec<u8>, ServiceError> {
    let name = user.name.as_str().to_owned();
    state
        .store
        .read(move |txn| {
            let users = txn.open_table(USERS).map_err(StoreError::from)?;
            let raw = users
                .get(name.as_str())
                .map_err(StoreError::from)?
                .ok_or(ServiceError::UserNotFound)?;
            match UserRecord::tls_deserialize_bytes(raw.value()) {
                Ok((record, [])) => Ok(record.user_key.into_vec()),
                _ => Err(StoreError::Corrupt("users").into()),
            }
        })
        .await
}

/// RemoveClient: authorised by the user's signature. Deletes the queue and KeyPackages and
/// keeps a tombstone so the device name is never reused.
pub(crate) async fn remove_client(
    state: &State,
    req: RemoveClientRequest,
) -> Result<RemoveClientResponse, ServiceError> {
    require_local(state, req.client.domain())?;
    let user_key = user_key(state, &req.client.user).await?;
    let tbs = RemoveClientTbs {
        client: req.client.clone(),
    };
    verify_ed25519(
        &user_key,
        &signing_input(LABEL_REMOVE_CLIENT, &tbs),
        req.user_signature.as_slice(),
    )?;
    let key = client_key(&req.client);
    let client_num = state
        .store
        .write(move |txn| {
            let mut clients = txn.open_table(CLIENTS)?;
            let record = match clients.get(key.as_str())? {
                Some(raw) => decode_client(raw.value())?,
                None => return Ok(Err(ServiceError::ClientNotFound)),
            };
            if record.revoked != 0 {
                return Ok(Err(ServiceError::ClientNotFound));
            }
            let client_num = record.client_num;
            let tombstone = ClientRecord {
                revoked: 1,
                ..record
            };
            clients.insert(key.as_str(), encode(&tombstone)?.as_slice())?;
            drop(clients);
            crate::queue::delete_queue(txn, client_num)?;
            crate::keypackage::delete_all(txn, client_num)?;
            Ok(Ok(client_num))
        })
        .await?;
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
    let user = req.user;
    let clients = state
        .store
        .read(move |txn| {
            let clients = txn.open_table(CLIENTS).map_err(StoreError::from)?;
            Ok::<_, ServiceError>(active_clients_of(&clients, &user)?)
        })
        .await?;
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
    let client = req.client.clone();
    let record = state
        .store
        .read(move |txn| {
            let clients = txn.open_table(CLIENTS).map_err(StoreError::from)?;
            Ok::<_, ServiceError>(active_client(&clients, &client)?)
        })
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
    let credential = if record.credential.not_after <= now_secs().saturating_add(validity / 2) {
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
    let key = client_key(&credential.client);
    let stored = credential.clone();
    state
        .store
        .write(move |txn| {
            let mut clients = txn.open_table(CLIENTS)?;
            let record = match clients.get(key.as_str())? {
                Some(raw) => decode_client(raw.value())?,
                None => return Ok(Err(ServiceError::ClientNotFound)),
            };
            if record.revoked != 0 {
                return Ok(Err(ServiceError::ClientNotFound));
            }
            let renewed = ClientRecord {
                credential: stored,
                ..record
            };
            clients.insert(key.as_str(), encode(&renewed)?.as_slice())?;
            Ok(Ok(()))
        })
        .await?;
    tracing::info!(client = %credential.client, "credential renewed");
    Ok(credential)
}

/// Makes and signs a credential valid from now for the configured validity.
fn issue_credential(state: &State, client: ClientId, signature_key: Opaque) -> ClientCredential {
    let not_before = now_secs();
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

/// Checks that an authenticated client is still active (not removed since it authenticated).
pub(crate) fn still_active(txn: &WriteTransaction, client: &ClientId) -> Result<bool, StoreError> {
    let clients = txn.open_table(CLIENTS)?;
    Ok(active_client(&clients, client)?.is_some())
}
