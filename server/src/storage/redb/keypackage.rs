//! redb implementation of the KeyPackage service's store. A claim moves its client's cursor
//! past the KeyPackage it takes in the claiming write transaction, so no two claims can ever
//! receive the same one; the rows behind the cursor are deleted a few at a time ([`prune`]).

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use roost_protocol::messages::keypackage::{ClaimedKeyPackage, KeyPackageKind};
use roost_protocol::{ClientId, UserId};

use super::auth::active_client;
use super::tables::{KEY_PACKAGE_COUNTS, KEY_PACKAGE_EXPIRY, KEY_PACKAGES, LAST_RESORT};
use super::{KeyPackageTables, Store, StoreError};
use crate::auth::ClientRecord;
use crate::delivery::receipt::{Answer, Receipt};
use crate::error::ServiceError;
use crate::keypackage::KeyPackageStore;

/// A claim moves its client's cursor ([`KEY_PACKAGE_COUNTS`]) past what it takes instead of
/// deleting the KeyPackage: deleting one row of `KEY_PACKAGES` and one of
/// `KEY_PACKAGE_EXPIRY` copied two pages per claim (every claim of a batch lands on its own
/// leaf), the claim's largest cost. The rows a cursor passed are deleted together, by the claim
/// that moves the cursor across a multiple of this (they share a page or two), by the expiry
/// sweep, or when the client is removed.
const PRUNE_EVERY: u64 = 16;

/// Takes one KeyPackage of a client in the batch's KeyPackage tables: the oldest unexpired
/// ordinary one at or after the client's cursor (the cursor moves past it and past the expired
/// ones before it, so none of them is handed out again), else the unexpired last-resort one
/// (kept).
fn take_one(
    tables: &mut KeyPackageTables<'_>,
    client_num: u64,
    now: u64,
) -> Result<Option<(Vec<u8>, KeyPackageKind)>, StoreError> {
    let counts = tables.counts.get(client_num)?.map(|v| v.value());
    let mut found = None;
    if let Some((next, held, first)) = counts {
        let mut passed = 0u64;
        let mut last = None;
        for entry in tables
            .key_packages
            .range((client_num, first)..=(client_num, u64::MAX))?
        {
            let (key, value) = entry?;
            let (not_after, bytes) = value.value();
            passed += 1;
            last = Some(key.value().1);
            if not_after > now {
                found = Some(bytes.to_vec());
                break;
            }
        }
        if let Some(seq) = last {
            let cursor = seq + 1;
            tables
                .counts
                .insert(client_num, (next, held.saturating_sub(passed), cursor))?;
            if first / PRUNE_EVERY != cursor / PRUNE_EVERY {
                prune(tables, client_num, cursor)?;
            }
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

/// Deletes a client's KeyPackages below its cursor `cursor` (handed out or expired) with their
/// expiry rows, each as one range (a KeyPackage's expiry rows of one upload share their
/// not_after, so they lie side by side), not row by row.
fn prune(
    tables: &mut KeyPackageTables<'_>,
    client_num: u64,
    cursor: u64,
) -> Result<(), StoreError> {
    let below = (client_num, 0)..(client_num, cursor);
    // Runs of seqs with one not_after: (not_after, first seq, last seq).
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for entry in tables.key_packages.range(below.clone())? {
        let (key, value) = entry?;
        let (seq, not_after) = (key.value().1, value.value().0);
        match runs.last_mut() {
            Some((at, _, last)) if *at == not_after => *last = seq,
            _ => runs.push((not_after, seq, seq)),
        }
    }
    tables.key_packages.retain_in(below, |_, _| false)?;
    for (not_after, first, last) in runs {
        // Only this client's rows of these seqs lie in the range: all below the cursor.
        tables.expiry.retain_in(
            (not_after, client_num, first)..=(not_after, client_num, last),
            |_, _| false,
        )?;
    }
    Ok(())
}

/// A client's cursor: the lowest upload seq that may still be handed out (0 if none).
fn cursor_of<T>(counts: &T, client_num: u64) -> Result<u64, StoreError>
where
    T: ReadableTable<u64, (u64, u64, u64)>,
{
    Ok(counts.get(client_num)?.map_or(0, |v| v.value().2))
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
            let (mut next, mut held, cursor) = counts
                .get(client_num)?
                .map(|v| v.value())
                .unwrap_or((1, 0, 0));
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
            counts.insert(client_num, (next, held, cursor))?;
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
            let first = cursor_of(&txn.open_table(KEY_PACKAGE_COUNTS)?, client_num)?;
            let mut remaining = 0u32;
            for entry in kps.range((client_num, first)..=(client_num, u64::MAX))? {
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
    let mut per_client: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(not_after, client_num, seq) in doomed.iter().take(PURGE_BATCH) {
        expiry.remove((not_after, client_num, seq))?;
        if seq == LAST_RESORT_SEQ {
            let current = last.get(client_num)?.map(|v| v.value().0);
            if current == Some(not_after) {
                last.remove(client_num)?;
            }
        } else if kps.remove((client_num, seq))?.is_some() {
            per_client.entry(client_num).or_default().push(seq);
        }
    }
    let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
    let mut total = 0;
    for (client_num, seqs) in per_client {
        let current = counts.get(client_num)?.map(|v| v.value());
        if let Some((next, held, cursor)) = current {
            // Those below the cursor were handed out (or passed) already: not held.
            let gone = seqs.iter().filter(|&&seq| seq >= cursor).count() as u64;
            total += gone;
            counts.insert(client_num, (next, held.saturating_sub(gone), cursor))?;
        }
    }
    Ok((total, more))
}

/// `KEY_PACKAGE_COUNTS` as schema version 4 and earlier stored it: (next upload seq, ordinary
/// KeyPackages held); every KeyPackage stored was still to be handed out.
const COUNTS_V4: TableDefinition<'_, u64, (u64, u64)> = TableDefinition::new("key_package_counts");

/// Gives every client of a database of schema version 4 (or earlier) its claim cursor: 0, as
/// every KeyPackage such a database holds may still be handed out. Runs once, in the upgrading
/// transaction.
pub(super) fn upgrade_from_v4(txn: &WriteTransaction) -> Result<(), StoreError> {
    let rows: Vec<(u64, (u64, u64))> = txn
        .open_table(COUNTS_V4)?
        .iter()?
        .map(|e| e.map(|(k, v)| (k.value(), v.value())))
        .collect::<Result<_, _>>()?;
    txn.delete_table(COUNTS_V4)?;
    let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
    for (client_num, (next, held)) in rows {
        counts.insert(client_num, (next, held, 0))?;
    }
    Ok(())
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

/// Tests only: turns this version's KeyPackage tables into what schema version 4 stored (no
/// cursor: the rows below it deleted, the counters without it), as a version 4 server would
/// have left the same claims.
#[cfg(test)]
pub(super) fn as_version_4(txn: &WriteTransaction) -> Result<(), StoreError> {
    let rows: Vec<(u64, (u64, u64, u64))> = txn
        .open_table(KEY_PACKAGE_COUNTS)?
        .iter()?
        .map(|e| e.map(|(k, v)| (k.value(), v.value())))
        .collect::<Result<_, _>>()?;
    {
        let mut kps = txn.open_table(KEY_PACKAGES)?;
        let mut expiry = txn.open_table(KEY_PACKAGE_EXPIRY)?;
        for &(client_num, (_, _, cursor)) in &rows {
            let passed: Vec<(u64, u64)> = kps
                .range((client_num, 0)..(client_num, cursor))?
                .map(|e| e.map(|(k, v)| (k.value().1, v.value().0)))
                .collect::<Result<_, _>>()?;
            for (seq, not_after) in passed {
                kps.remove((client_num, seq))?;
                expiry.remove((not_after, client_num, seq))?;
            }
        }
    }
    txn.delete_table(KEY_PACKAGE_COUNTS)?;
    let mut counts = txn.open_table(COUNTS_V4)?;
    for (client_num, (next, held, _)) in rows {
        counts.insert(client_num, (next, held))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthStore as _;
    use crate::storage::suite::credential;

    /// (KeyPackage rows, expiry rows) of a client, as (seq, not_after) pairs.
    async fn rows_of(store: &Store, client_num: u64) -> (Vec<(u64, u64)>, Vec<(u64, u64)>) {
        store
            .read(move |txn| {
                let kps = txn
                    .open_table(KEY_PACKAGES)?
                    .range((client_num, 0)..=(client_num, u64::MAX))?
                    .map(|e| e.map(|(k, v)| (k.value().1, v.value().0)))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut expiry = Vec::new();
                for entry in txn.open_table(KEY_PACKAGE_EXPIRY)?.iter()? {
                    let (not_after, client, seq) = entry?.0.value();
                    if client == client_num && seq != LAST_RESORT_SEQ {
                        expiry.push((seq, not_after));
                    }
                }
                expiry.sort_unstable();
                Ok::<_, StoreError>((kps, expiry))
            })
            .await
            .unwrap()
    }

    /// A claim leaves the KeyPackage's row behind its client's cursor; the rows behind it are
    /// deleted (with their expiry rows) a few at a time, so the tables do not keep what was
    /// handed out, and the sweep deletes the rest when they expire without counting them.
    #[tokio::test]
    async fn handed_out_key_packages_are_deleted_a_few_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer) = Store::open(&dir.path().join("db.redb"), "example.org", 8).unwrap();
        let client: ClientId = "k@example.org/d".parse().unwrap();
        let num = store
            .add_client(credential("k@example.org/d"))
            .await
            .unwrap();
        // Two uploads with different lifetimes: two runs of expiry rows.
        let first: Vec<_> = (0..20u8).map(|i| (5_000, vec![i])).collect();
        let second: Vec<_> = (20..40u8).map(|i| (6_000, vec![i])).collect();
        store.add(num, first, None, 100, None).await.unwrap();
        store.add(num, second, None, 100, None).await.unwrap();
        for i in 0..40u8 {
            let claimed = store.claim_one(&client, 100).await.unwrap();
            assert_eq!(claimed.key_package.as_slice(), [i]);
            let (kps, expiry) = rows_of(&store, num).await;
            // Seq i + 1 was handed out: at most PRUNE_EVERY handed-out rows wait.
            let waiting = kps.iter().filter(|r| r.0 <= u64::from(i) + 1).count();
            assert!(waiting <= PRUNE_EVERY as usize, "{kps:?}");
            assert_eq!(kps.len() - waiting, 39 - usize::from(i));
            // Every row left has its expiry row, and no expiry row is left without its row.
            assert_eq!(kps, expiry);
        }
        // Seqs 1..=40 handed out; the cursor (41) crossed 32: 32..=40 wait.
        let (kps, _) = rows_of(&store, num).await;
        assert_eq!(
            kps.iter().map(|r| r.0).collect::<Vec<_>>(),
            (32..=40).collect::<Vec<_>>()
        );
        assert_eq!(store.count(num, 100).await.unwrap(), (0, false));
        assert_eq!(store.purge_expired(6_000).await.unwrap(), 0);
        assert_eq!(rows_of(&store, num).await, (Vec::new(), Vec::new()));
        assert!(matches!(
            store.claim_one(&client, 100).await,
            Err(ServiceError::NoKeyPackage)
        ));
    }
}
