//! PostgreSQL implementation of the Authentication Service's store: users, registration-token
//! uses, clients (removed ones stay, revoked, so a device name is never reused) and the
//! creation and deletion of a client's queue.
//!
//! A refusal (USER_EXISTS, CLIENT_EXISTS, CLIENT_NOT_FOUND, ...) rolls its transaction back:
//! nothing of it is written.

use roost_protocol::messages::auth::ClientCredential;
use roost_protocol::{ClientId, UserId, UserName};
use tls_codec::{DeserializeBytes, Serialize as _};
use tokio_postgres::{GenericClient, Row};

use super::{PgStore, column, to_i64, to_u64};
use crate::auth::{AuthStore, ClientRecord};
use crate::error::ServiceError;
use crate::storage::StoreError;

/// A write's outcome: the outer error is a storage failure, the inner one the operation's own
/// refusal (its transaction rolled back).
pub(super) type Refusable<T> = Result<Result<T, ServiceError>, StoreError>;

/// Flattens a [`Refusable`] for the service.
pub(super) fn flatten<T>(outcome: Refusable<T>) -> Result<T, ServiceError> {
    outcome?
}

fn encode_credential(credential: &ClientCredential) -> Result<Vec<u8>, StoreError> {
    credential
        .tls_serialize_detached()
        .map_err(|_| StoreError::Corrupt("credential encoding"))
}

/// Decodes a stored credential exactly: trailing bytes are corruption too.
fn decode_credential(bytes: &[u8]) -> Result<ClientCredential, StoreError> {
    match ClientCredential::tls_deserialize_bytes(bytes) {
        Ok((credential, [])) => Ok(credential),
        _ => Err(StoreError::Corrupt("clients")),
    }
}

/// The record of a row of `SELECT credential, client_num FROM clients ...`.
fn client_record(row: &Row) -> Result<ClientRecord, StoreError> {
    let credential: &[u8] = column(row, 0, "clients")?;
    Ok(ClientRecord {
        credential: decode_credential(credential)?,
        client_num: to_u64(column(row, 1, "clients")?)?,
    })
}

/// An active client, read on a connection or inside a transaction (claims resolve their
/// target in their own).
pub(super) async fn active_client_in(
    db: &impl GenericClient,
    client: &ClientId,
) -> Result<Option<ClientRecord>, StoreError> {
    let row = db
        .query_opt(
            "SELECT credential, client_num FROM clients
             WHERE user_name = $1 AND device = $2 AND NOT revoked",
            &[&client.user.name.as_str(), &client.device.as_str()],
        )
        .await?;
    row.as_ref().map(client_record).transpose()
}

/// Every active client of a user, in device-name order.
pub(super) async fn active_clients_in(
    db: &impl GenericClient,
    user: &UserId,
) -> Result<Vec<ClientRecord>, StoreError> {
    let rows = db
        .query(
            "SELECT credential, client_num FROM clients
             WHERE user_name = $1 AND NOT revoked ORDER BY device",
            &[&user.name.as_str()],
        )
        .await?;
    rows.iter().map(client_record).collect()
}

impl PgStore {
    async fn create_user_txn(
        &self,
        name: &UserName,
        user_key: &[u8],
        token: Option<(String, u64)>,
    ) -> Refusable<()> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let created = txn
            .execute(
                "INSERT INTO users (name, user_key, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&name.as_str(), &user_key, &to_i64(crate::unix_millis())?],
            )
            .await?;
        if created == 0 {
            return Ok(Err(ServiceError::UserExists));
        }
        if let Some((hash, allowed)) = token {
            if allowed == 0 {
                return Ok(Err(ServiceError::RegistrationTokenRequired));
            }
            // One statement counts the use or finds the token used up, so concurrent
            // registrations (on any node) never exceed the allowed uses.
            let counted = txn
                .query_opt(
                    "INSERT INTO token_uses (hash, uses) VALUES ($1, 1)
                     ON CONFLICT (hash) DO UPDATE SET uses = token_uses.uses + 1
                     WHERE token_uses.uses < $2
                     RETURNING uses",
                    &[&hash, &to_i64(allowed)?],
                )
                .await?;
            if counted.is_none() {
                return Ok(Err(ServiceError::RegistrationTokenRequired));
            }
        }
        txn.commit().await?;
        Ok(Ok(()))
    }

    async fn add_client_txn(&self, credential: &ClientCredential) -> Refusable<u64> {
        let id = &credential.client;
        let encoded = encode_credential(credential)?;
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // The primary key covers removed clients too: their names stay used.
        let row = txn
            .query_opt(
                "INSERT INTO clients (user_name, device, client_num, credential)
                 VALUES ($1, $2, nextval('client_num_seq'), $3)
                 ON CONFLICT (user_name, device) DO NOTHING
                 RETURNING client_num",
                &[&id.user.name.as_str(), &id.device.as_str(), &encoded],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Err(ServiceError::ClientExists));
        };
        let client_num: i64 = column(&row, 0, "clients")?;
        txn.execute(
            "INSERT INTO queue_heads (client_num, head, held) VALUES ($1, 0, 0)",
            &[&client_num],
        )
        .await?;
        txn.commit().await?;
        Ok(Ok(to_u64(client_num)?))
    }

    async fn remove_client_txn(&self, id: &ClientId) -> Refusable<u64> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let row = txn
            .query_opt(
                "UPDATE clients SET revoked = TRUE
                 WHERE user_name = $1 AND device = $2 AND NOT revoked
                 RETURNING client_num",
                &[&id.user.name.as_str(), &id.device.as_str()],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Err(ServiceError::ClientNotFound));
        };
        let client_num: i64 = column(&row, 0, "clients")?;
        super::queue::delete_queue(&txn, to_u64(client_num)?).await?;
        txn.execute(
            "DELETE FROM key_packages WHERE client_num = $1",
            &[&client_num],
        )
        .await?;
        txn.execute(
            "DELETE FROM last_resort WHERE client_num = $1",
            &[&client_num],
        )
        .await?;
        // Delivered to every node (this one included) when, and only if, the removal commits:
        // they cut the client's connections off. NOTIFY is PostgreSQL's (see `listen`).
        txn.execute(
            "SELECT pg_notify($1, $2)",
            &[&crate::bus::REVOKED_CHANNEL, &client_num.to_string()],
        )
        .await?;
        txn.commit().await?;
        Ok(Ok(to_u64(client_num)?))
    }

    async fn client_nums_read(&self, ids: &[ClientId]) -> Result<Vec<Option<u64>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = ids.iter().map(|c| c.user.name.as_str()).collect();
        let devices: Vec<&str> = ids.iter().map(|c| c.device.as_str()).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT user_name, device, client_num FROM clients
                 WHERE (user_name, device) IN (SELECT * FROM unnest($1::TEXT[], $2::TEXT[]))
                   AND NOT revoked",
                &[&names, &devices],
            )
            .await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let name: &str = column(row, 0, "clients")?;
            let device: &str = column(row, 1, "clients")?;
            let num = to_u64(column(row, 2, "clients")?)?;
            found.insert((name, device), num);
        }
        Ok(names
            .iter()
            .zip(&devices)
            .map(|(name, device)| found.get(&(*name, *device)).copied())
            .collect())
    }

    async fn replace_credential_write(&self, credential: &ClientCredential) -> Refusable<()> {
        let id = &credential.client;
        let encoded = encode_credential(credential)?;
        let client = self.client().await?;
        // One statement: its own transaction.
        let updated = client
            .execute(
                "UPDATE clients SET credential = $3
                 WHERE user_name = $1 AND device = $2 AND NOT revoked",
                &[&id.user.name.as_str(), &id.device.as_str(), &encoded],
            )
            .await?;
        Ok(if updated == 0 {
            Err(ServiceError::ClientNotFound)
        } else {
            Ok(())
        })
    }
}

impl AuthStore for PgStore {
    async fn create_user(
        &self,
        name: &UserName,
        user_key: Vec<u8>,
        token: Option<(String, u64)>,
    ) -> Result<(), ServiceError> {
        flatten(self.create_user_txn(name, &user_key, token).await)
    }

    async fn user_key(&self, name: &UserName) -> Result<Option<Vec<u8>>, ServiceError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT user_key FROM users WHERE name = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(StoreError::from)?;
        Ok(row.map(|row| column(&row, 0, "users")).transpose()?)
    }

    async fn add_client(&self, credential: ClientCredential) -> Result<u64, ServiceError> {
        flatten(self.add_client_txn(&credential).await)
    }

    async fn remove_client(&self, client: &ClientId) -> Result<u64, ServiceError> {
        flatten(self.remove_client_txn(client).await)
    }

    async fn active_client(&self, client: &ClientId) -> Result<Option<ClientRecord>, ServiceError> {
        let db = self.client().await?;
        Ok(active_client_in(&**db, client).await?)
    }

    async fn active_clients_of(&self, user: &UserId) -> Result<Vec<ClientRecord>, ServiceError> {
        let db = self.client().await?;
        Ok(active_clients_in(&**db, user).await?)
    }

    async fn client_nums(&self, clients: Vec<ClientId>) -> Result<Vec<Option<u64>>, ServiceError> {
        Ok(self.client_nums_read(&clients).await?)
    }

    async fn replace_credential(&self, credential: ClientCredential) -> Result<(), ServiceError> {
        flatten(self.replace_credential_write(&credential).await)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bus::{BusSink, Revoked};
    use crate::keypackage::KeyPackageStore;
    use crate::storage::postgres::Options;
    use crate::storage::suite::credential;
    use crate::storage::suite::postgres_backend::connect;

    async fn numbers(store: &PgStore, sql: &str) -> Vec<i64> {
        let db = store.client().await.unwrap();
        let rows = db.query(sql, &[]).await.unwrap();
        rows.iter().map(|row| row.get(0)).collect()
    }

    /// Removal on one node: the client's queue (entries, dedup records, its references to
    /// shared payloads) and KeyPackages are gone, and another node hears of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removing_a_client_deletes_its_queue_and_tells_every_node() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("removal").unwrap();
        let (a, closer_a) = connect(&url, Duration::from_secs(10)).await;
        let revoked = Revoked::default();
        let sink = BusSink {
            queues: Default::default(),
            revoked: revoked.clone(),
            nodes_gone: Default::default(),
        };
        let options = Options {
            url: &url,
            pool_size: 2,
            timeout: Duration::from_secs(10),
            domain: "example.org",
            as_public_key: &[7; 32],
        };
        let (b, closer_b) = PgStore::connect(options, sink).await.unwrap();

        let one_id: ClientId = "rm@example.org/one".parse().unwrap();
        let two_id: ClientId = "rm@example.org/two".parse().unwrap();
        let one = a
            .add_client(credential("rm@example.org/one"))
            .await
            .unwrap();
        let two = a
            .add_client(credential("rm@example.org/two"))
            .await
            .unwrap();
        // As the queue engine writes them: payload 1 queued for both, payload 2 for `one`.
        let db = a.client().await.unwrap();
        db.batch_execute(&format!(
            "INSERT INTO payloads (id, body, refs) VALUES (1, '\\x01', 2), (2, '\\x02', 1);
             INSERT INTO queue_entries (client_num, seq, payload_id, timestamp_ms, message_id)
                 VALUES ({one}, 1, 1, 0, '\\x01'), ({one}, 2, 2, 0, '\\x02'),
                        ({two}, 1, 1, 0, '\\x01');
             INSERT INTO queue_dedup (client_num, message_id, seq, timestamp_ms)
                 VALUES ({one}, '\\x01', 1, 0), ({two}, '\\x01', 1, 0);
             UPDATE queue_heads SET head = 2, held = 2 WHERE client_num = {one};
             UPDATE queue_heads SET head = 1, held = 1 WHERE client_num = {two};"
        ))
        .await
        .unwrap();
        drop(db);
        a.add(
            one,
            vec![(u64::MAX, vec![1])],
            Some((u64::MAX, vec![2])),
            10,
            None,
        )
        .await
        .unwrap();
        assert_eq!(b.count(one, 0).await.unwrap(), (1, true));

        assert_eq!(a.remove_client(&one_id).await.unwrap(), one);
        let mut heard = false;
        for _ in 0..100 {
            if revoked.contains(one) {
                heard = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(heard, "the other node hears of the removal");
        assert!(!revoked.contains(two));
        for table in [
            "queue_heads",
            "queue_entries",
            "queue_dedup",
            "key_packages",
        ] {
            assert_eq!(
                numbers(
                    &b,
                    &format!("SELECT COUNT(*) FROM {table} WHERE client_num = {one}")
                )
                .await,
                vec![0],
                "{table}"
            );
        }
        assert_eq!(b.count(one, 0).await.unwrap(), (0, false));
        // Payload 2 was only `one`'s; payload 1 is still `two`'s.
        assert_eq!(
            numbers(&b, "SELECT id * 10 + refs FROM payloads ORDER BY id").await,
            vec![11]
        );
        assert_eq!(
            b.client_nums(vec![one_id.clone(), two_id.clone()])
                .await
                .unwrap(),
            vec![None, Some(two)]
        );
        // A refused removal writes nothing and tells nobody.
        assert!(matches!(
            b.remove_client(&one_id).await,
            Err(ServiceError::ClientNotFound)
        ));
        assert!(matches!(
            b.add(one, vec![(u64::MAX, vec![3])], None, 10, None).await,
            Err(ServiceError::ClientNotFound)
        ));
        b.remove_client(&two_id).await.unwrap();
        assert_eq!(numbers(&a, "SELECT COUNT(*) FROM payloads").await, vec![0]);
        assert_eq!(
            numbers(&a, "SELECT COUNT(*) FROM queue_dedup").await,
            vec![0]
        );

        drop((a, b));
        closer_a.join();
        closer_b.join();
    }
}
