//! redb implementation of the KeyPackage service's store. A claim deletes the KeyPackage in
//! the claiming write transaction, so no two claims can ever receive the same one.

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::messages::keypackage::{ClaimedKeyPackage, KeyPackageKind};
use roost_protocol::{ClientId, UserId};

use super::auth::active_client;
use super::tables::{KEY_PACKAGE_COUNTS, KEY_PACKAGE_EXPIRY, KEY_PACKAGES, LAST_RESORT};
use super::{KeyPackageTables, Store, StoreError};
use crate::auth::ClientRecord;
use crate::delivery::receipt::{Answer, Receipt};
use crate::error::ServiceError;
use crate::keypackage::KeyPackageStore;

/// Takes one KeyPackage of a client in the batch's KeyPackage tables: the oldest unexpired
/// ordinary one (deleted), else the unexpired last-resort one (kept).
fn take_one(
    tables: &mut KeyPackageTables<'_>,
    client_num: u64,
    now: u64,
) -> Result<Option<(Vec<u8>, KeyPackageKind)>, StoreError> {
    let mut gone = Vec::new();
    let mut found = None;
    for entry in tables
        .key_packages
        .range((client_num, 0)..=(client_num, u64::MAX))?
    {
        let (key, value) = entry?;
        let (not_after, bytes) = value.value();
        gone.push((not_after, key.value().1));
        if not_after <= now {
            continue;
        }
        found = Some(bytes.to_vec());
        break;
    }
    let taken = gone.len() as u64;
    for &(not_after, seq) in &gone {
        tables.key_packages.remove((client_num, seq))?;
        tables.expiry.remove((not_after, client_num, seq))?;
    }
    if taken > 0 {
        let current = tables.counts.get(client_num)?.map(|v| v.value());
        if let Some((next, held)) = current {
            tables
                .counts
                .insert(client_num, (next, held.saturating_sub(taken)))?;
        }
    }
    if let Some(bytes) = found {
        return Ok(Some((bytes, KeyPackageKind::Ordinary)));
    }
    let Some(guard) = tables.last_resort.get(client_num)? else {
        return Ok(None);
    };
    let (not_after, bytes) = guard.value();
    Ok((not_after > now).then(|| (bytes.to_vec(), KeyPackageKind::LastResort)))
}

fn claimed(
    record: ClientRecord,
    taken: Option<(Vec<u8>, KeyPackageKind)>,
) -> Option<ClaimedKeyPackage> {
    taken.map(|(bytes, kind)| ClaimedKeyPackage {
        credential: record.credential,
        key_package: bytes.into(),
        kind,
    })
}

impl Store {
    /// Adds KeyPackages (see [`KeyPackageStore::add`]); with a receipt, at most once.
    async fn add_with(
        &self,
        client_num: u64,
        ordinary: Vec<(u64, Vec<u8>)>,
        last_resort: Option<(u64, Vec<u8>)>,
        max_held: u64,
        receipt: Option<Receipt>,
    ) -> Result<u64, ServiceError> {
        self.write(move |txn| {
            if let Some(receipt) = &receipt
                && let Some(answer) = super::receipts::fresh_answer(txn, receipt)?
            {
                return Ok(Ok(answer));
            }
            let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
            let (mut next, mut held) = counts.get(client_num)?.map(|v| v.value()).unwrap_or((1, 0));
            if held + ordinary.len() as u64 > max_held {
                return Ok(Err(ServiceError::LimitExceeded(format!(
                    "at most {max_held} KeyPackages held"
                ))));
            }
            let mut kps = txn.open_table(KEY_PACKAGES)?;
            let mut expiry = txn.open_table(KEY_PACKAGE_EXPIRY)?;
            for (not_after, bytes) in &ordinary {
                kps.insert((client_num, next), (*not_after, bytes.as_slice()))?;
                expiry.insert((*not_after, client_num, next), ())?;
                next += 1;
                held += 1;
            }
            counts.insert(client_num, (next, held))?;
            if let Some((not_after, bytes)) = &last_resort {
                let replaced = txn
                    .open_table(LAST_RESORT)?
                    .insert(client_num, (*not_after, bytes.as_slice()))?
                    .map(|old| old.value().0);
                if let Some(old) = replaced {
                    expiry.remove((old, client_num, LAST_RESORT_SEQ))?;
                }
                expiry.insert((*not_after, client_num, LAST_RESORT_SEQ), ())?;
            }
            if let Some(receipt) = &receipt {
                let answered = Receipt {
                    answer: Answer::Value(held),
                    ..receipt.clone()
                };
                super::receipts::insert(txn, &answered, &Default::default())?;
            }
            Ok(Ok(held))
        })
        .await
    }
}

impl KeyPackageStore for Store {
    async fn add(
        &self,
        client_num: u64,
        ordinary: Vec<(u64, Vec<u8>)>,
        last_resort: Option<(u64, Vec<u8>)>,
        max_held: u64,
        receipt: Option<Receipt>,
    ) -> Result<u64, ServiceError> {
        self.add_with(client_num, ordinary, last_resort, max_held, receipt)
            .await
    }

    async fn claim_one(
        &self,
        target: &ClientId,
        now: u64,
    ) -> Result<ClaimedKeyPackage, ServiceError> {
        let target = target.clone();
        // Claims of a batch share its open KeyPackage tables.
        self.write_held(move |held| {
            let tables = held.key_packages()?;
            let Some(record) = active_client(&tables.clients, &target)? else {
                return Ok(Err(ServiceError::ClientNotFound));
            };
            let taken = take_one(tables, record.client_num, now)?;
            Ok(claimed(record, taken).ok_or(ServiceError::NoKeyPackage))
        })
        .await
    }

    async fn claim_for_user(
        &self,
        user: &UserId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, ServiceError> {
        let user = user.clone();
        self.write_held(move |held| {
            let tables = held.key_packages()?;
            // Resolved inside the transaction: a client may have been removed meanwhile.
            let records = super::auth::active_clients_of(&tables.clients, &user)?;
            let mut out = Vec::with_capacity(records.len());
            for record in records {
                let taken = take_one(tables, record.client_num, now)?;
                out.extend(claimed(record, taken));
            }
            Ok(Ok(out))
        })
        .await
    }

    async fn count(&self, client_num: u64, now: u64) -> Result<(u32, bool), ServiceError> {
        self.read(move |txn| {
            let kps = txn.open_table(KEY_PACKAGES)?;
            let mut remaining = 0u32;
            for entry in kps.range((client_num, 0)..=(client_num, u64::MAX))? {
                let (_, value) = entry?;
                if value.value().0 > now {
                    remaining = remaining.saturating_add(1);
                }
            }
            let last = txn.open_table(LAST_RESORT)?;
            let has_last_resort = last.get(client_num)?.is_some_and(|v| v.value().0 > now);
            Ok::<_, StoreError>((remaining, has_last_resort))
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, ServiceError> {
        let mut total = 0;
        loop {
            let (purged, more) = self
                .write(move |txn| Ok(Ok::<_, ServiceError>(purge_batch(txn, now)?)))
                .await?;
            total += purged;
            if !more {
                return Ok(total);
            }
        }
    }
}

/// The upload seq a last-resort KeyPackage has in `KEY_PACKAGE_EXPIRY` (ordinary ones start
/// at 1).
const LAST_RESORT_SEQ: u64 = 0;

/// Deletes every KeyPackage of a client (client removed).
pub(crate) fn delete_all(txn: &WriteTransaction, client_num: u64) -> Result<(), StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    let mut expiry = txn.open_table(KEY_PACKAGE_EXPIRY)?;
    let held: Vec<(u64, u64)> = kps
        .range((client_num, 0)..=(client_num, u64::MAX))?
        .map(|e| e.map(|(k, v)| (v.value().0, k.value().1)))
        .collect::<Result<_, _>>()?;
    for (not_after, seq) in held {
        kps.remove((client_num, seq))?;
        expiry.remove((not_after, client_num, seq))?;
    }
    txn.open_table(KEY_PACKAGE_COUNTS)?.remove(client_num)?;
    let last = txn
        .open_table(LAST_RESORT)?
        .remove(client_num)?
        .map(|v| v.value().0);
    if let Some(not_after) = last {
        expiry.remove((not_after, client_num, LAST_RESORT_SEQ))?;
    }
    Ok(())
}

/// Most expired KeyPackages one purge transaction deletes (a large number expiring at once is
/// deleted over several transactions, so other writers are not held up).
const PURGE_BATCH: usize = 2_000;

/// Deletes KeyPackages (ordinary and last-resort) expired at `now`, at most one batch, taken
/// from the front of `KEY_PACKAGE_EXPIRY`: only what expired is read. Returns (ordinary ones
/// deleted, whether more expired ones are left).
fn purge_batch(txn: &WriteTransaction, now: u64) -> Result<(u64, bool), StoreError> {
    let mut expiry = txn.open_table(KEY_PACKAGE_EXPIRY)?;
    let doomed: Vec<(u64, u64, u64)> = expiry
        .range((0, 0, 0)..=(now, u64::MAX, u64::MAX))?
        .take(PURGE_BATCH + 1)
        .map(|e| e.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()?;
    let more = doomed.len() > PURGE_BATCH;
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    let mut last = txn.open_table(LAST_RESORT)?;
    let mut per_client: std::collections::BTreeMap<u64, u64> = Default::default();
    for &(not_after, client_num, seq) in doomed.iter().take(PURGE_BATCH) {
        expiry.remove((not_after, client_num, seq))?;
        if seq == LAST_RESORT_SEQ {
            let current = last.get(client_num)?.map(|v| v.value().0);
            if current == Some(not_after) {
                last.remove(client_num)?;
            }
        } else if kps.remove((client_num, seq))?.is_some() {
            *per_client.entry(client_num).or_default() += 1;
        }
    }
    let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
    let mut total = 0;
    for (client_num, gone) in per_client {
        total += gone;
        let current = counts.get(client_num)?.map(|v| v.value());
        if let Some((next, held)) = current {
            counts.insert(client_num, (next, held.saturating_sub(gone)))?;
        }
    }
    Ok((total, more))
}

/// Builds `KEY_PACKAGE_EXPIRY` for a database of schema version 3, which had no such index.
/// Runs once, in the upgrading transaction.
pub(super) fn upgrade_from_v3(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut expiry = txn.open_table(KEY_PACKAGE_EXPIRY)?;
    for entry in txn.open_table(KEY_PACKAGES)?.iter()? {
        let (key, value) = entry?;
        let (client_num, seq) = key.value();
        expiry.insert((value.value().0, client_num, seq), ())?;
    }
    for entry in txn.open_table(LAST_RESORT)?.iter()? {
        let (key, value) = entry?;
        expiry.insert((value.value().0, key.value(), LAST_RESORT_SEQ), ())?;
    }
    Ok(())
}
