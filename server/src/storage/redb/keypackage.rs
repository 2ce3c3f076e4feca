//! redb implementation of the KeyPackage service's store. A claim deletes the KeyPackage in
//! the claiming write transaction, so no two claims can ever receive the same one.

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::messages::keypackage::{ClaimedKeyPackage, KeyPackageKind};
use roost_protocol::{ClientId, UserId};

use super::auth::active_client_in;
use super::tables::{CLIENTS, KEY_PACKAGE_COUNTS, KEY_PACKAGES, LAST_RESORT};
use super::{Store, StoreError};
use crate::auth::ClientRecord;
use crate::delivery::receipt::{Answer, Receipt};
use crate::error::ServiceError;
use crate::keypackage::KeyPackageStore;

/// Takes one KeyPackage of a client inside `txn`: the oldest unexpired ordinary one (deleted),
/// else the unexpired last-resort one (kept).
fn take_one(
    txn: &WriteTransaction,
    client_num: u64,
    now: u64,
) -> Result<Option<(Vec<u8>, KeyPackageKind)>, StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    let mut expired = Vec::new();
    let mut found = None;
    for entry in kps.range((client_num, 0)..=(client_num, u64::MAX))? {
        let (key, value) = entry?;
        let (not_after, bytes) = value.value();
        if not_after <= now {
            expired.push(key.value().1);
            continue;
        }
        found = Some((key.value().1, bytes.to_vec()));
        break;
    }
    let taken = u64::from(found.is_some()) + expired.len() as u64;
    for seq in expired {
        kps.remove((client_num, seq))?;
    }
    if let Some((seq, _)) = &found {
        kps.remove((client_num, *seq))?;
    }
    if taken > 0 {
        let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
        let current = counts.get(client_num)?.map(|v| v.value());
        if let Some((next, held)) = current {
            counts.insert(client_num, (next, held.saturating_sub(taken)))?;
        }
    }
    if let Some((_, bytes)) = found {
        return Ok(Some((bytes, KeyPackageKind::Ordinary)));
    }
    let last = txn.open_table(LAST_RESORT)?;
    let Some(guard) = last.get(client_num)? else {
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
            for (not_after, bytes) in &ordinary {
                kps.insert((client_num, next), (*not_after, bytes.as_slice()))?;
                next += 1;
                held += 1;
            }
            counts.insert(client_num, (next, held))?;
            if let Some((not_after, bytes)) = &last_resort {
                txn.open_table(LAST_RESORT)?
                    .insert(client_num, (*not_after, bytes.as_slice()))?;
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
        self.write(move |txn| {
            let Some(record) = active_client_in(txn, &target)? else {
                return Ok(Err(ServiceError::ClientNotFound));
            };
            let taken = take_one(txn, record.client_num, now)?;
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
        self.write(move |txn| {
            // Resolved inside the transaction: a client may have been removed meanwhile.
            let records = {
                let clients = txn.open_table(CLIENTS)?;
                super::auth::active_clients_of(&clients, &user)?
            };
            let mut out = Vec::with_capacity(records.len());
            for record in records {
                let taken = take_one(txn, record.client_num, now)?;
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
        self.write(move |txn| Ok(Ok(purge_expired(txn, now)?)))
            .await
    }
}

/// Deletes every KeyPackage of a client (client removed).
pub(crate) fn delete_all(txn: &WriteTransaction, client_num: u64) -> Result<(), StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    kps.retain_in((client_num, 0)..=(client_num, u64::MAX), |_, _| false)?;
    txn.open_table(KEY_PACKAGE_COUNTS)?.remove(client_num)?;
    txn.open_table(LAST_RESORT)?.remove(client_num)?;
    Ok(())
}

/// Deletes expired KeyPackages of every client. Returns how many.
fn purge_expired(txn: &WriteTransaction, now: u64) -> Result<u64, StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    let mut per_client: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    kps.retain(|(client_num, _), (not_after, _)| {
        let keep = not_after > now;
        if !keep {
            *per_client.entry(client_num).or_default() += 1;
        }
        keep
    })?;
    let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
    let mut total = 0;
    for (client_num, gone) in per_client {
        total += gone;
        let current = counts.get(client_num)?.map(|v| v.value());
        if let Some((next, held)) = current {
            counts.insert(client_num, (next, held.saturating_sub(gone)))?;
        }
    }
    txn.open_table(LAST_RESORT)?
        .retain(|_, (not_after, _)| not_after > now)?;
    Ok(total)
}
