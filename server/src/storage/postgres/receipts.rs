//! PostgreSQL implementation of the receipts of accepted DS requests (see
//! `delivery::receipt`). A write claims its receipt's key inside its transaction before it
//! enqueues anything: the insert replaces only a receipt out of the window, so of two nodes
//! (or two jobs) writing the same request, the second finds the key taken (after the first
//! committed: the unique index makes it wait) and is refused, writing nothing. The answer is
//! filled in once the fan-out's outcome is known, in the same transaction. A counted send
//! first takes its sender's counter in `send_counters` (only above the stored one; the row
//! lock orders two writers) and is refused like an applied request if it cannot.

use std::collections::HashSet;

use tokio_postgres::types::Type;

use super::queue::{col, exec, query};
use super::{PgStore, to_i64, to_u64};
use crate::delivery::receipt::{CounterRow, Receipt, ReceiptStore};
use crate::error::ServiceError;
use crate::storage::StoreError;

/// Claims the keys of `receipts` (distinct keys, one window start: a node's); returns the keys
/// claimed. A key not returned has a receipt within its window: that request was applied.
pub(super) async fn claim(
    txn: &tokio_postgres::Transaction<'_>,
    receipts: &[&Receipt],
) -> Result<HashSet<Vec<u8>>, StoreError> {
    let receipts = take_counters(txn, receipts).await?;
    if receipts.is_empty() {
        return Ok(HashSet::new());
    }
    let keys: Vec<Vec<u8>> = receipts.iter().map(|r| r.key.to_vec()).collect();
    let times: Vec<i64> = receipts
        .iter()
        .map(|r| to_i64(r.accepted_ms))
        .collect::<Result<_, _>>()?;
    let fresh_after = receipts
        .iter()
        .map(|r| r.fresh_after_ms)
        .min()
        .map(to_i64)
        .transpose()?
        .unwrap_or(0);
    let rows = query(
        txn,
        "INSERT INTO receipts (key, accepted_ms, answer)
         SELECT k, t, 0 FROM unnest($1::bytea[], $2::int8[]) AS u(k, t)
         ON CONFLICT (key) DO UPDATE SET accepted_ms = EXCLUDED.accepted_ms, answer = 0
         WHERE receipts.accepted_ms < $3
         RETURNING key",
        [
            (&keys, Type::BYTEA_ARRAY),
            (&times, Type::INT8_ARRAY),
            (&fresh_after, Type::INT8),
        ],
    )
    .await?;
    rows.iter().map(|row| col::<Vec<u8>>(row, 0)).collect()
}

/// Takes the send counters of the counted receipts among `receipts`; returns the receipts
/// that may be claimed: the uncounted ones and those whose counter was above the stored one
/// (of two for the same sender and group, only the first).
async fn take_counters<'r>(
    txn: &tokio_postgres::Transaction<'_>,
    receipts: &[&'r Receipt],
) -> Result<Vec<&'r Receipt>, StoreError> {
    let mut members = Vec::new();
    let mut counters = Vec::new();
    let mut keys = Vec::new();
    let mut seen = HashSet::new();
    for receipt in receipts {
        if let Some(counter) = &receipt.counter
            && seen.insert(counter.member)
        {
            members.push(counter.member.to_vec());
            counters.push(to_i64(counter.counter)?);
            keys.push(receipt.key.to_vec());
        }
    }
    if members.is_empty() {
        return Ok(receipts.to_vec());
    }
    let rows = query(
        txn,
        "INSERT INTO send_counters (member, counter, receipt, answer)
         SELECT m, c, k, 0 FROM unnest($1::bytea[], $2::int8[], $3::bytea[]) AS u(m, c, k)
         ON CONFLICT (member) DO UPDATE
         SET counter = EXCLUDED.counter, receipt = EXCLUDED.receipt, answer = 0
         WHERE send_counters.counter < EXCLUDED.counter
         RETURNING member, receipt",
        [
            (&members, Type::BYTEA_ARRAY),
            (&counters, Type::INT8_ARRAY),
            (&keys, Type::BYTEA_ARRAY),
        ],
    )
    .await?;
    let mut taken = HashSet::new();
    for row in &rows {
        taken.insert((col::<Vec<u8>>(row, 0)?, col::<Vec<u8>>(row, 1)?));
    }
    Ok(receipts
        .iter()
        .copied()
        .filter(|r| match &r.counter {
            None => true,
            Some(c) => taken.contains(&(c.member.to_vec(), r.key.to_vec())),
        })
        .collect())
}

/// The answer of the stored receipt for `receipt.key`, if accepted within its window.
pub(super) async fn fresh_answer(
    txn: &tokio_postgres::Transaction<'_>,
    receipt: &Receipt,
) -> Result<Option<u64>, StoreError> {
    let fresh_after = to_i64(receipt.fresh_after_ms)?;
    let key = receipt.key.to_vec();
    let rows = query(
        txn,
        "SELECT answer FROM receipts WHERE key = $1 AND accepted_ms >= $2",
        [(&key, Type::BYTEA), (&fresh_after, Type::INT8)],
    )
    .await?;
    rows.first().map(|row| to_u64(col(row, 0)?)).transpose()
}

/// Records the answers of claimed receipts.
pub(super) async fn set_answers(
    txn: &tokio_postgres::Transaction<'_>,
    answers: &[(&Receipt, u64)],
) -> Result<(), StoreError> {
    if answers.is_empty() {
        return Ok(());
    }
    let keys: Vec<Vec<u8>> = answers.iter().map(|(r, _)| r.key.to_vec()).collect();
    let values: Vec<i64> = answers
        .iter()
        .map(|(_, a)| to_i64(*a))
        .collect::<Result<_, _>>()?;
    exec(
        txn,
        "UPDATE receipts SET answer = u.a
         FROM unnest($1::bytea[], $2::int8[]) AS u(k, a) WHERE receipts.key = u.k",
        [(&keys, Type::BYTEA_ARRAY), (&values, Type::INT8_ARRAY)],
    )
    .await?;
    let (members, values): (Vec<Vec<u8>>, Vec<i64>) = answers
        .iter()
        .filter_map(|(r, a)| r.counter.as_ref().map(|c| (c.member.to_vec(), to_i64(*a))))
        .map(|(m, a)| a.map(|a| (m, a)))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    if !members.is_empty() {
        exec(
            txn,
            "UPDATE send_counters SET answer = u.a
             FROM unnest($1::bytea[], $2::int8[]) AS u(m, a) WHERE send_counters.member = u.m",
            [(&members, Type::BYTEA_ARRAY), (&values, Type::INT8_ARRAY)],
        )
        .await?;
    }
    Ok(())
}

impl ReceiptStore for PgStore {
    async fn receipt(
        &self,
        key: [u8; 32],
        fresh_after_ms: u64,
    ) -> Result<Option<u64>, ServiceError> {
        let client = self.client().await?;
        let fresh_after = to_i64(fresh_after_ms)?;
        let row = client
            .query_typed_opt(
                "SELECT answer FROM receipts WHERE key = $1 AND accepted_ms >= $2",
                &[(&key.as_slice(), Type::BYTEA), (&fresh_after, Type::INT8)],
            )
            .await
            .map_err(StoreError::from)?;
        Ok(row.map(|row| to_u64(col(&row, 0)?)).transpose()?)
    }

    async fn send_counter(&self, member: [u8; 32]) -> Result<Option<CounterRow>, ServiceError> {
        let client = self.client().await?;
        let row = client
            .query_typed_opt(
                "SELECT counter, receipt, answer FROM send_counters WHERE member = $1",
                &[(&member.as_slice(), Type::BYTEA)],
            )
            .await
            .map_err(StoreError::from)?;
        let Some(row) = row else { return Ok(None) };
        let key: Vec<u8> = col(&row, 1)?;
        Ok(Some(CounterRow {
            counter: to_u64(col(&row, 0)?)?,
            key: key
                .try_into()
                .map_err(|_| StoreError::Corrupt("send counter receipt"))?,
            answer: to_u64(col(&row, 2)?)?,
        }))
    }

    async fn prune_receipts(&self, before_ms: u64, max_kept: u64) -> Result<u64, ServiceError> {
        let client = self.client().await?;
        let before = to_i64(before_ms)?;
        let aged = client
            .execute_typed(
                "DELETE FROM receipts WHERE accepted_ms < $1",
                &[(&before, Type::INT8)],
            )
            .await
            .map_err(StoreError::from)?;
        // Counting is a scan: once a minute, over at most `max_receipts` small rows.
        let held: i64 = client
            .query_one("SELECT count(*) FROM receipts", &[])
            .await
            .map_err(StoreError::from)?
            .try_get(0)
            .map_err(|_| StoreError::Corrupt("receipt count"))?;
        let over = to_u64(held)?.saturating_sub(max_kept);
        if over == 0 {
            return Ok(aged);
        }
        let over = to_i64(over)?;
        let crowded = client
            .execute_typed(
                "DELETE FROM receipts WHERE key IN
                 (SELECT key FROM receipts ORDER BY accepted_ms LIMIT $1)",
                &[(&over, Type::INT8)],
            )
            .await
            .map_err(StoreError::from)?;
        Ok(aged + crowded)
    }
}
