//! PostgreSQL implementation of push registrations and the push outbox (see `push`). Every
//! node's worker claims due wake-ups with `FOR UPDATE SKIP LOCKED` and moves them past a
//! lease in the same statement, so two nodes never send the same wake-up while the lease
//! runs; a node that dies mid-send leaves its claims to be taken again when the lease ends.

use tokio_postgres::types::Type;

use super::queue::col;
use super::{PgStore, to_i64, to_u64};
use crate::error::ServiceError;
use crate::push::{PushJob, PushStore};
use crate::storage::StoreError;

impl PushStore for PgStore {
    async fn put_push(&self, client_num: u64, sealed: Vec<u8>) -> Result<(), ServiceError> {
        let client = self.client().await?;
        let num = to_i64(client_num)?;
        // Only while the client is active: its queue exists exactly that long.
        let stored = client
            .execute_typed(
                "INSERT INTO push_registrations (client_num, sealed, last_sent_ms)
                 SELECT client_num, $2, 0 FROM queue_heads WHERE client_num = $1
                 ON CONFLICT (client_num) DO UPDATE SET sealed = EXCLUDED.sealed",
                &[(&num, Type::INT8), (&sealed, Type::BYTEA)],
            )
            .await
            .map_err(StoreError::from)?;
        if stored == 0 {
            return Err(ServiceError::ClientNotFound);
        }
        Ok(())
    }

    async fn delete_push(&self, client_num: u64) -> Result<bool, ServiceError> {
        let mut client = self.client().await?;
        let num = to_i64(client_num)?;
        let txn = client.transaction().await.map_err(StoreError::from)?;
        let deleted = txn
            .execute_typed(
                "DELETE FROM push_registrations WHERE client_num = $1",
                &[(&num, Type::INT8)],
            )
            .await
            .map_err(StoreError::from)?;
        txn.execute_typed(
            "DELETE FROM push_jobs WHERE client_num = $1",
            &[(&num, Type::INT8)],
        )
        .await
        .map_err(StoreError::from)?;
        txn.commit().await.map_err(StoreError::from)?;
        Ok(deleted > 0)
    }

    async fn schedule_push(
        &self,
        client_nums: Vec<u64>,
        due_ms: u64,
        coalesce_ms: u64,
    ) -> Result<u64, ServiceError> {
        let client = self.client().await?;
        let nums: Vec<i64> = client_nums
            .into_iter()
            .map(to_i64)
            .collect::<Result<_, _>>()?;
        let (due, coalesce) = (to_i64(due_ms)?, to_i64(coalesce_ms)?);
        // The registrations are updated (noted) first: their row locks order this against
        // a concurrent recovery sweep.
        let rows = client
            .query_typed(
                "WITH noted AS (
                     UPDATE push_registrations SET noted_ms = GREATEST(noted_ms, $2)
                     WHERE client_num = ANY($1)
                     RETURNING client_num, last_sent_ms
                 )
                 INSERT INTO push_jobs (client_num, due_ms, attempts)
                 SELECT client_num,
                        CASE WHEN last_sent_ms = 0 THEN $2
                             ELSE GREATEST($2, last_sent_ms + $3) END,
                        0
                 FROM noted
                 ON CONFLICT (client_num) DO UPDATE SET again = TRUE
                 RETURNING (xmax = 0)",
                &[
                    (&nums, Type::INT8_ARRAY),
                    (&due, Type::INT8),
                    (&coalesce, Type::INT8),
                ],
            )
            .await
            .map_err(StoreError::from)?;
        // xmax = 0: the row was inserted, not updated.
        let mut scheduled = 0;
        for row in &rows {
            if col::<bool>(row, 0)? {
                scheduled += 1;
            }
        }
        Ok(scheduled)
    }

    async fn recover_push(
        &self,
        cutoff_ms: u64,
        due_ms: u64,
        coalesce_ms: u64,
    ) -> Result<u64, ServiceError> {
        let client = self.client().await?;
        let (cutoff, due, coalesce) = (to_i64(cutoff_ms)?, to_i64(due_ms)?, to_i64(coalesce_ms)?);
        // The newest entry at or before the cutoff, per registered client without a pending
        // wake-up: a backward walk of the queue's primary key, usually one row. Registrations
        // locked (SKIP LOCKED: another node's sweep or a schedule has them) are left to it.
        let scheduled = client
            .execute_typed(
                "WITH lost AS (
                     SELECT r.client_num, r.last_sent_ms FROM push_registrations r
                     WHERE NOT EXISTS (SELECT 1 FROM push_jobs j WHERE j.client_num = r.client_num)
                       AND (SELECT e.timestamp_ms FROM queue_entries e
                            WHERE e.client_num = r.client_num AND e.timestamp_ms <= $1
                            ORDER BY e.seq DESC LIMIT 1) > r.noted_ms
                     FOR UPDATE OF r SKIP LOCKED
                 ), noted AS (
                     UPDATE push_registrations r SET noted_ms = GREATEST(r.noted_ms, $2)
                     FROM lost WHERE r.client_num = lost.client_num
                 )
                 INSERT INTO push_jobs (client_num, due_ms, attempts)
                 SELECT client_num,
                        CASE WHEN last_sent_ms = 0 THEN $2
                             ELSE GREATEST($2, last_sent_ms + $3) END,
                        0
                 FROM lost
                 ON CONFLICT (client_num) DO NOTHING",
                &[
                    (&cutoff, Type::INT8),
                    (&due, Type::INT8),
                    (&coalesce, Type::INT8),
                ],
            )
            .await
            .map_err(StoreError::from)?;
        Ok(scheduled)
    }

    async fn claim_push(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: u32,
    ) -> Result<Vec<PushJob>, ServiceError> {
        let client = self.client().await?;
        let (now, lease, limit) = (to_i64(now_ms)?, to_i64(lease_until_ms)?, i64::from(limit));
        let rows = client
            .query_typed(
                "WITH due AS (
                     SELECT client_num FROM push_jobs WHERE due_ms <= $1
                     ORDER BY due_ms LIMIT $3 FOR UPDATE SKIP LOCKED
                 ), claimed AS (
                     UPDATE push_jobs j SET due_ms = $2, again = FALSE FROM due
                     WHERE j.client_num = due.client_num
                     RETURNING j.client_num, j.attempts
                 )
                 SELECT c.client_num, c.attempts, r.sealed
                 FROM claimed c LEFT JOIN push_registrations r USING (client_num)",
                &[
                    (&now, Type::INT8),
                    (&lease, Type::INT8),
                    (&limit, Type::INT8),
                ],
            )
            .await
            .map_err(StoreError::from)?;
        rows.iter()
            .map(|row| {
                Ok(PushJob {
                    client_num: to_u64(col(row, 0)?)?,
                    attempts: u32::try_from(col::<i32>(row, 1)?).unwrap_or(0),
                    sealed: col(row, 2)?,
                })
            })
            .collect::<Result<_, StoreError>>()
            .map_err(ServiceError::from)
    }

    async fn finish_push(
        &self,
        client_num: u64,
        sent_ms: Option<u64>,
        again_ms: u64,
    ) -> Result<(), ServiceError> {
        let mut client = self.client().await?;
        let (num, again) = (to_i64(client_num)?, to_i64(again_ms)?);
        let txn = client.transaction().await.map_err(StoreError::from)?;
        txn.execute_typed(
            "DELETE FROM push_jobs WHERE client_num = $1 AND NOT again",
            &[(&num, Type::INT8)],
        )
        .await
        .map_err(StoreError::from)?;
        txn.execute_typed(
            "UPDATE push_jobs SET due_ms = $2, attempts = 0, again = FALSE WHERE client_num = $1",
            &[(&num, Type::INT8), (&again, Type::INT8)],
        )
        .await
        .map_err(StoreError::from)?;
        if let Some(sent) = sent_ms {
            let sent = to_i64(sent)?;
            txn.execute_typed(
                "UPDATE push_registrations SET last_sent_ms = $2 WHERE client_num = $1",
                &[(&num, Type::INT8), (&sent, Type::INT8)],
            )
            .await
            .map_err(StoreError::from)?;
        }
        txn.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    async fn retry_push(
        &self,
        client_num: u64,
        due_ms: u64,
        attempts: u32,
    ) -> Result<(), ServiceError> {
        let client = self.client().await?;
        let (num, due, attempts) = (
            to_i64(client_num)?,
            to_i64(due_ms)?,
            i32::try_from(attempts).unwrap_or(i32::MAX),
        );
        // The job row exists while claimed; a registration deleted meanwhile took it along.
        client
            .execute_typed(
                "UPDATE push_jobs SET due_ms = $2, attempts = $3 WHERE client_num = $1",
                &[
                    (&num, Type::INT8),
                    (&due, Type::INT8),
                    (&attempts, Type::INT4),
                ],
            )
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    async fn next_push_due(&self) -> Result<Option<u64>, ServiceError> {
        let client = self.client().await?;
        let row = client
            .query_typed_opt("SELECT min(due_ms) FROM push_jobs", &[])
            .await
            .map_err(StoreError::from)?;
        match row {
            Some(row) => Ok(col::<Option<i64>>(&row, 0)?.map(to_u64).transpose()?),
            None => Ok(None),
        }
    }
}
