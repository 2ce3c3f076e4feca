//! redb implementation of the receipts of accepted DS requests (see `delivery::receipt`):
//! written inside the transaction of the request's effect, looked up by digest, pruned by age
//! and count through a second table ordered by acceptance time. A counted send's counter is
//! checked and stored with its receipt, in `SEND_COUNTERS`.

use redb::{ReadableTable, ReadableTableMetadata};

use super::delivery_tables::DeliveryTables;
use super::tables::{RECEIPT_TIMES, RECEIPTS, SEND_COUNTERS};
use super::{Store, StoreError};
use crate::delivery::FanOutResult;
use crate::delivery::receipt::{Answer, CounterRow, Receipt, ReceiptStore};
use crate::error::ServiceError;

/// Whether the write of `receipt`'s request must be refused as applied already: a receipt for
/// `receipt.key` accepted within its window is stored, or (a counted send) the stored counter
/// of its sender in its group is not below its counter.
pub(super) fn is_fresh(t: &mut DeliveryTables<'_>, receipt: &Receipt) -> Result<bool, StoreError> {
    let found = t.receipts.open(t.txn)?.get(receipt.key)?.map(|v| v.value());
    if found.is_some_and(|(accepted, _)| accepted >= receipt.fresh_after_ms) {
        return Ok(true);
    }
    let Some(counter) = &receipt.counter else {
        return Ok(false);
    };
    let stored = t
        .counters
        .open(t.txn)?
        .get(counter.member)?
        .map(|v| v.value().0);
    Ok(stored.is_some_and(|highest| highest >= counter.counter))
}

/// The answer of the stored receipt for `receipt.key`, if it was accepted within the window.
pub(super) fn fresh_answer(
    txn: &redb::WriteTransaction,
    receipt: &Receipt,
) -> Result<Option<u64>, StoreError> {
    let table = txn.open_table(RECEIPTS)?;
    let found = table.get(receipt.key)?.map(|v| v.value());
    Ok(found
        .filter(|(accepted, _)| *accepted >= receipt.fresh_after_ms)
        .map(|(_, answer)| answer))
}

/// Stores `receipt` (replacing a stale one for the same key); a [`Answer::Reached`] answer is
/// the first fan-out's count in `result`.
pub(super) fn insert(
    txn: &redb::WriteTransaction,
    receipt: &Receipt,
    result: &FanOutResult,
) -> Result<(), StoreError> {
    insert_in(&mut DeliveryTables::new(txn), receipt, result)
}

/// [`insert`] through a set of open tables.
pub(super) fn insert_in(
    t: &mut DeliveryTables<'_>,
    receipt: &Receipt,
    result: &FanOutResult,
) -> Result<(), StoreError> {
    let answer = match receipt.answer {
        Answer::Value(value) => value,
        Answer::Reached => u64::from(result.reached.first().copied().unwrap_or(0)),
    };
    let old = t
        .receipts
        .open(t.txn)?
        .insert(receipt.key, (receipt.accepted_ms, answer))?
        .map(|v| v.value());
    let times = t.receipt_times.open(t.txn)?;
    if let Some((old_ms, _)) = old {
        times.remove((old_ms, receipt.key))?;
    }
    times.insert((receipt.accepted_ms, receipt.key), ())?;
    if let Some(counter) = &receipt.counter {
        t.counters
            .open(t.txn)?
            .insert(counter.member, (counter.counter, receipt.key, answer))?;
    }
    Ok(())
}

/// Most receipts deleted per write transaction while pruning (a large backlog is pruned in
/// several transactions, so other writers are not held up).
const PRUNE_BATCH: usize = 10_000;

impl ReceiptStore for Store {
    async fn receipt(
        &self,
        key: [u8; 32],
        fresh_after_ms: u64,
    ) -> Result<Option<u64>, ServiceError> {
        self.read(move |txn| {
            let table = txn.open_table(RECEIPTS)?;
            let found = table.get(key)?.map(|v| v.value());
            Ok(found
                .filter(|(accepted, _)| *accepted >= fresh_after_ms)
                .map(|(_, answer)| answer))
        })
        .await
        .map_err(|err: StoreError| ServiceError::from(err))
    }

    async fn send_counter(&self, member: [u8; 32]) -> Result<Option<CounterRow>, ServiceError> {
        self.read(move |txn| {
            let table = txn.open_table(SEND_COUNTERS)?;
            Ok(table.get(member)?.map(|v| {
                let (counter, key, answer) = v.value();
                CounterRow {
                    counter,
                    key,
                    answer,
                }
            }))
        })
        .await
        .map_err(|err: StoreError| ServiceError::from(err))
    }

    async fn prune_receipts(&self, before_ms: u64, max_kept: u64) -> Result<u64, ServiceError> {
        let mut total = 0u64;
        loop {
            let deleted = self
                .write(move |txn| {
                    let mut table = txn.open_table(RECEIPTS)?;
                    let mut times = txn.open_table(RECEIPT_TIMES)?;
                    let held = table.len()?;
                    let over = held.saturating_sub(max_kept);
                    let mut doomed = Vec::new();
                    for entry in times.iter()? {
                        if doomed.len() >= PRUNE_BATCH {
                            break;
                        }
                        let (ms, key) = entry?.0.value();
                        if ms >= before_ms && (doomed.len() as u64) >= over {
                            break;
                        }
                        doomed.push((ms, key));
                    }
                    for (ms, key) in &doomed {
                        times.remove((*ms, *key))?;
                        table.remove(*key)?;
                    }
                    Ok(Ok::<_, ServiceError>(doomed.len()))
                })
                .await?;
            total += deleted as u64;
            if deleted < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }
}
