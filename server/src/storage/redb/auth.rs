//! redb implementation of the Authentication Service's store: users, clients (with
//! tombstones), registration-token uses.

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::messages::auth::ClientCredential;
use roost_protocol::{ClientId, Opaque, UserId, UserName};
use tls_codec::{DeserializeBytes, TlsDeserializeBytes, TlsSerialize, TlsSize};

use super::tables::{CLIENTS, QUEUE_HEADS, TOKEN_USES, USERS};
use super::{Store, StoreError, next_counter};
use crate::auth::{AuthStore, ClientRecord};
use crate::error::ServiceError;

/// A local user as stored.
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub(super) struct StoredUser {
    pub(super) user_key: Opaque,
    pub(super) created_ms: u64,
}

/// A local client as stored. Removed clients stay as tombstones so their device name is never
/// reused.
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub(super) struct StoredClient {
    pub(super) credential: ClientCredential,
    pub(super) client_num: u64,
    /// 0 = active, 1 = removed.
    pub(super) revoked: u8,
}

fn client_key(client: &ClientId) -> String {
    format!("{}/{}", client.user.name, client.device)
}

pub(super) fn encode<T: tls_codec::Serialize + tls_codec::Size>(
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    value
        .tls_serialize_detached()
        .map_err(|_| StoreError::Corrupt("encode"))
}

pub(super) fn decode_client(bytes: &[u8]) -> Result<StoredClient, StoreError> {
    match StoredClient::tls_deserialize_bytes(bytes) {
        Ok((record, [])) => Ok(record),
        _ => Err(StoreError::Corrupt("clients")),
    }
}

/// The stored record of an active client, by key.
fn stored_active<T>(clients: &T, key: &str) -> Result<Option<StoredClient>, StoreError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    let Some(raw) = clients.get(key)? else {
        return Ok(None);
    };
    let record = decode_client(raw.value())?;
    Ok((record.revoked == 0).then_some(record))
}

fn active(stored: StoredClient) -> Option<ClientRecord> {
    (stored.revoked == 0).then_some(ClientRecord {
        credential: stored.credential,
        client_num: stored.client_num,
    })
}

/// Looks up an active local client in an open table (for other stores' transactions).
pub(super) fn active_client<T>(
    clients: &T,
    client: &ClientId,
) -> Result<Option<ClientRecord>, StoreError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    let Some(raw) = clients.get(client_key(client).as_str())? else {
        return Ok(None);
    };
    Ok(active(decode_client(raw.value())?))
}

/// Every active client of a local user, in device-name order.
pub(super) fn active_clients_of<T>(
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
        out.extend(active(decode_client(raw.value())?));
    }
    Ok(out)
}

/// Resolves an active local client inside a write transaction.
pub(crate) fn active_client_in(
    txn: &WriteTransaction,
    client: &ClientId,
) -> Result<Option<ClientRecord>, StoreError> {
    let clients = txn.open_table(CLIENTS)?;
    active_client(&clients, client)
}

impl AuthStore for Store {
    async fn create_user(
        &self,
        name: &UserName,
        user_key: Vec<u8>,
        token: Option<(String, u64)>,
    ) -> Result<(), ServiceError> {
        let record = StoredUser {
            user_key: user_key.into(),
            created_ms: crate::unix_millis(),
        };
        let name = name.as_str().to_owned();
        self.write(move |txn| {
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
        .await
    }

    async fn user_key(&self, name: &UserName) -> Result<Option<Vec<u8>>, ServiceError> {
        let name = name.as_str().to_owned();
        self.read(move |txn| {
            let users = txn.open_table(USERS)?;
            let Some(raw) = users.get(name.as_str())? else {
                return Ok(None);
            };
            match StoredUser::tls_deserialize_bytes(raw.value()) {
                Ok((record, [])) => Ok(Some(record.user_key.into_vec())),
                _ => Err(StoreError::Corrupt("users")),
            }
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn client_nums(&self, clients: Vec<ClientId>) -> Result<Vec<Option<u64>>, ServiceError> {
        self.read(move |txn| {
            let table = txn.open_table(CLIENTS)?;
            clients
                .iter()
                .map(|client| Ok(active_client(&table, client)?.map(|r| r.client_num)))
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn add_client(&self, credential: ClientCredential) -> Result<u64, ServiceError> {
        let key = client_key(&credential.client);
        self.write(move |txn| {
            let mut clients = txn.open_table(CLIENTS)?;
            if clients.get(key.as_str())?.is_some() {
                return Ok(Err(ServiceError::ClientExists));
            }
            let client_num = next_counter(txn, "next_client_num")?;
            let record = StoredClient {
                credential,
                client_num,
                revoked: 0,
            };
            clients.insert(key.as_str(), encode(&record)?.as_slice())?;
            txn.open_table(QUEUE_HEADS)?.insert(client_num, (0, 0))?;
            Ok(Ok(client_num))
        })
        .await
    }

    async fn remove_client(&self, client: &ClientId) -> Result<u64, ServiceError> {
        let key = client_key(client);
        self.write(move |txn| {
            let mut clients = txn.open_table(CLIENTS)?;
            let record = match stored_active(&clients, &key)? {
                Some(record) => record,
                None => return Ok(Err(ServiceError::ClientNotFound)),
            };
            let client_num = record.client_num;
            let tombstone = StoredClient {
                revoked: 1,
                ..record
            };
            clients.insert(key.as_str(), encode(&tombstone)?.as_slice())?;
            drop(clients);
            super::queue::delete_queue(txn, client_num)?;
            super::keypackage::delete_all(txn, client_num)?;
            Ok(Ok(client_num))
        })
        .await
    }

    async fn active_client(&self, client: &ClientId) -> Result<Option<ClientRecord>, ServiceError> {
        let client = client.clone();
        self.read(move |txn| {
            let clients = txn.open_table(CLIENTS)?;
            active_client(&clients, &client)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn active_clients_of(&self, user: &UserId) -> Result<Vec<ClientRecord>, ServiceError> {
        let user = user.clone();
        self.read(move |txn| {
            let clients = txn.open_table(CLIENTS)?;
            active_clients_of(&clients, &user)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn replace_credential(&self, credential: ClientCredential) -> Result<(), ServiceError> {
        let key = client_key(&credential.client);
        self.write(move |txn| {
            let mut clients = txn.open_table(CLIENTS)?;
            let record = match stored_active(&clients, &key)? {
                Some(record) => record,
                None => return Ok(Err(ServiceError::ClientNotFound)),
            };
            let renewed = StoredClient {
                credential,
                ..record
            };
            clients.insert(key.as_str(), encode(&renewed)?.as_slice())?;
            Ok(Ok(()))
        })
        .await
    }
}
