//! redb implementation of the administration store: user listing and deactivation, counts,
//! registration-token uses, and the backup (one read snapshot copied table by table into a
//! new database file, while the writer goes on).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableHandle,
};
use roost_protocol::UserName;
use tls_codec::DeserializeBytes;

use super::auth::{StoredClient, StoredUser, decode_client, encode};
use super::tables::*;
use super::{Store, StoreError};
use crate::admin::store::{AdminStore, BackupOutcome, DEACTIVATED_KEY, StoreStats, UserSummary};
use crate::error::ServiceError;

fn decode_user(bytes: &[u8]) -> Result<StoredUser, StoreError> {
    match StoredUser::tls_deserialize_bytes(bytes) {
        Ok((record, [])) => Ok(record),
        _ => Err(StoreError::Corrupt("users")),
    }
}

/// Active clients per user name, from one pass over the clients table.
fn active_counts(txn: &ReadTransaction) -> Result<BTreeMap<String, u64>, StoreError> {
    let clients = txn.open_table(CLIENTS)?;
    let mut counts = BTreeMap::new();
    for entry in clients.iter()? {
        let (key, raw) = entry?;
        if decode_client(raw.value())?.revoked != 0 {
            continue;
        }
        let name = key.value().split('/').next().unwrap_or_default().to_owned();
        *counts.entry(name).or_insert(0u64) += 1;
    }
    Ok(counts)
}

fn summary(name: &str, raw: &[u8], clients: u64) -> Result<UserSummary, StoreError> {
    let user = decode_user(raw)?;
    Ok(UserSummary {
        name: name.to_owned(),
        created_ms: user.created_ms,
        deactivated: user.user_key.as_slice() == DEACTIVATED_KEY,
        clients,
    })
}

/// The domain recorded in the database at `path`, read without creating anything. Fails
/// while another process (a running server) holds the database.
pub(crate) fn stored_domain(path: &Path) -> Result<Option<String>, StoreError> {
    let db = Database::open(path)?;
    let txn = db.begin_read()?;
    let settings = match txn.open_table(SETTINGS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    Ok(settings.get("domain")?.map(|v| v.value().to_owned()))
}

/// Copies every row of a table from the snapshot into the new database.
macro_rules! copy_tables {
    ($from:expr, $to:expr, $copied:expr, $($table:expr),* $(,)?) => {$(
        {
            let source = $from.open_table($table)?;
            let mut target = $to.open_table($table)?;
            for entry in source.iter()? {
                let (key, value) = entry?;
                target.insert(key.value(), value.value())?;
            }
            $copied.insert($table.name().to_owned());
        }
    )*};
}

/// Writes the snapshot `from` into a new database at `dest`; refuses a database holding a
/// table this code does not know (a backup missing a table would restore to a broken server).
fn copy_snapshot(from: &ReadTransaction, dest: &Path) -> Result<u64, StoreError> {
    let target = Database::builder().create(dest)?;
    let txn = target.begin_write()?;
    let mut copied = BTreeSet::new();
    copy_tables!(
        from,
        txn,
        copied,
        META,
        SETTINGS,
        USERS,
        CLIENTS,
        QUEUE_HEADS,
        QUEUE_ENTRIES,
        QUEUE_DEDUP,
        QUEUE_EXPIRY,
        PAYLOADS,
        PAYLOAD_REFS,
        KEY_PACKAGES,
        KEY_PACKAGE_COUNTS,
        KEY_PACKAGE_EXPIRY,
        LAST_RESORT,
        GROUPS,
        GROUP_VERSIONS,
        GROUP_DELTAS,
        OUTBOX,
        TOKEN_USES,
        RECEIPTS,
        RECEIPT_TIMES,
        SEND_COUNTERS,
        FANOUT_PENDING,
        PUSH_REGISTRATIONS,
        PUSH_JOBS,
        PUSH_DUE,
        PUSH_NOTED,
    );
    for table in from.list_tables()? {
        if !copied.contains(table.name()) {
            return Err(StoreError::Database(
                format!("backup does not know table {:?}", table.name()).into(),
            ));
        }
    }
    if from.list_multimap_tables()?.next().is_some() {
        return Err(StoreError::Database(
            "backup does not know multimap tables".into(),
        ));
    }
    txn.commit()?;
    drop(target);
    let file = std::fs::File::open(dest)
        .map_err(|err| StoreError::Database(format!("{}: {err}", dest.display()).into()))?;
    file.sync_all()
        .map_err(|err| StoreError::Database(format!("{}: {err}", dest.display()).into()))?;
    let size = file
        .metadata()
        .map_err(|err| StoreError::Database(err.to_string().into()))?
        .len();
    Ok(size)
}

impl AdminStore for Store {
    async fn users(&self) -> Result<Vec<UserSummary>, ServiceError> {
        self.read(|txn| {
            let counts = active_counts(txn)?;
            let users = txn.open_table(USERS)?;
            let mut out = Vec::new();
            for entry in users.iter()? {
                let (name, raw) = entry?;
                let clients = counts.get(name.value()).copied().unwrap_or(0);
                out.push(summary(name.value(), raw.value(), clients)?);
            }
            Ok::<_, StoreError>(out)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn user(&self, name: &UserName) -> Result<Option<UserSummary>, ServiceError> {
        let name = name.as_str().to_owned();
        self.read(move |txn| {
            let users = txn.open_table(USERS)?;
            let Some(raw) = users.get(name.as_str())? else {
                return Ok(None);
            };
            let clients = txn.open_table(CLIENTS)?;
            let start = format!("{name}/");
            let end = format!("{name}0");
            let mut active = 0u64;
            for entry in clients.range(start.as_str()..end.as_str())? {
                let (_, client) = entry?;
                if decode_client(client.value())?.revoked == 0 {
                    active += 1;
                }
            }
            Ok::<_, StoreError>(Some(summary(&name, raw.value(), active)?))
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn deactivate_user(&self, name: &UserName) -> Result<Vec<u64>, ServiceError> {
        let name = name.as_str().to_owned();
        self.write(move |txn| {
            let mut users = txn.open_table(USERS)?;
            let user = match users.get(name.as_str())? {
                Some(raw) => decode_user(raw.value())?,
                None => return Ok(Err(ServiceError::UserNotFound)),
            };
            let deactivated = StoredUser {
                user_key: DEACTIVATED_KEY.to_vec().into(),
                ..user
            };
            users.insert(name.as_str(), encode(&deactivated)?.as_slice())?;
            drop(users);
            let mut clients = txn.open_table(CLIENTS)?;
            let start = format!("{name}/");
            let end = format!("{name}0");
            let mut removed: Vec<(String, StoredClient)> = Vec::new();
            for entry in clients.range(start.as_str()..end.as_str())? {
                let (key, raw) = entry?;
                let record = decode_client(raw.value())?;
                if record.revoked == 0 {
                    removed.push((key.value().to_owned(), record));
                }
            }
            let mut nums = Vec::with_capacity(removed.len());
            for (key, record) in removed {
                nums.push(record.client_num);
                let tombstone = StoredClient {
                    revoked: 1,
                    ..record
                };
                clients.insert(key.as_str(), encode(&tombstone)?.as_slice())?;
            }
            drop(clients);
            for num in &nums {
                super::queue::delete_queue(txn, *num)?;
                super::keypackage::delete_all(txn, *num)?;
            }
            Ok(Ok(nums))
        })
        .await
    }

    async fn token_uses(&self) -> Result<Vec<(String, u64)>, ServiceError> {
        self.read(|txn| {
            let uses = txn.open_table(TOKEN_USES)?;
            uses.iter()?
                .map(|entry| {
                    let (hash, used) = entry?;
                    Ok((hash.value().to_owned(), used.value()))
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn stats(&self) -> Result<StoreStats, ServiceError> {
        self.read(|txn| {
            let mut stats = StoreStats::default();
            for entry in txn.open_table(USERS)?.iter()? {
                let (_, raw) = entry?;
                stats.users += 1;
                if decode_user(raw.value())?.user_key.as_slice() == DEACTIVATED_KEY {
                    stats.deactivated_users += 1;
                }
            }
            stats.clients = active_counts(txn)?.values().sum();
            stats.groups = txn.open_table(GROUPS)?.len()?;
            for entry in txn.open_table(QUEUE_HEADS)?.iter()? {
                let (_, head) = entry?;
                stats.queued_messages += head.value().1;
            }
            let mut outbox: BTreeMap<String, u64> = BTreeMap::new();
            for entry in txn.open_table(OUTBOX)?.iter()? {
                let (key, _) = entry?;
                *outbox.entry(key.value().0.to_owned()).or_insert(0) += 1;
            }
            stats.outbox = outbox.into_iter().collect();
            Ok::<_, StoreError>(stats)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn backup(&self, dest: PathBuf) -> Result<BackupOutcome, ServiceError> {
        self.read(move |txn| copy_snapshot(txn, &dest).map(BackupOutcome::Written))
            .await
            .map_err(ServiceError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table a fresh database holds is copied: a table added to `tables.rs` but not to
    /// the backup fails here (and the backup itself refuses such a database).
    #[tokio::test]
    async fn a_backup_holds_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer) = Store::open(&dir.path().join("db.redb"), "example.org", 8).unwrap();
        let dest = dir.path().join("copy.redb");
        store.backup(dest.clone()).await.unwrap();
        let names = |db: &Database| -> BTreeSet<String> {
            let txn = db.begin_read().unwrap();
            txn.list_tables()
                .unwrap()
                .map(|t| t.name().to_owned())
                .collect()
        };
        let source = names(&store.shared.current().unwrap());
        let copy = names(&Database::open(&dest).unwrap());
        assert!(source.len() >= 16, "{source:?}");
        assert_eq!(source, copy);
    }
}
