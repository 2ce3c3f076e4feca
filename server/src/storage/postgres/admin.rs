//! PostgreSQL implementation of the administration store: user listing and deactivation,
//! counts, registration-token uses. Backups are PostgreSQL's own (`pg_dump`): the engine
//! says so instead of copying.

use std::path::PathBuf;

use roost_protocol::UserName;
use tokio_postgres::Row;

use super::auth::{Refusable, flatten};
use super::{PgStore, column, to_u64};
use crate::admin::store::{AdminStore, BackupOutcome, DEACTIVATED_KEY, StoreStats, UserSummary};
use crate::error::ServiceError;
use crate::storage::StoreError;

/// Where `roost admin backup` sends an operator of this engine.
const PG_DUMP: &str = "the PostgreSQL engine is backed up with PostgreSQL's tools: run \
    `pg_dump --format=custom --file=roost.dump DBURL` (a consistent snapshot while the nodes \
    run) and copy the identity directory; restore with `pg_restore --dbname=NEWDBURL \
    roost.dump` (see README.md, Backup and restore)";

/// A row of `SELECT name, created_ms, user_key = '', (active clients)`.
fn summary(row: &Row) -> Result<UserSummary, StoreError> {
    Ok(UserSummary {
        name: column::<String>(row, 0, "users")?,
        created_ms: to_u64(column(row, 1, "users")?)?,
        deactivated: column(row, 2, "users")?,
        clients: to_u64(column(row, 3, "users")?)?,
    })
}

const SUMMARY: &str = "SELECT u.name, u.created_ms, length(u.user_key) = 0,
        (SELECT count(*) FROM clients c WHERE c.user_name = u.name AND NOT c.revoked)
     FROM users u";

impl PgStore {
    async fn deactivate_txn(&self, name: &UserName) -> Refusable<Vec<u64>> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let updated = txn
            .execute(
                "UPDATE users SET user_key = $2 WHERE name = $1",
                &[&name.as_str(), &DEACTIVATED_KEY],
            )
            .await?;
        if updated == 0 {
            return Ok(Err(ServiceError::UserNotFound));
        }
        let rows = txn
            .query(
                "UPDATE clients SET revoked = TRUE WHERE user_name = $1 AND NOT revoked
                 RETURNING client_num",
                &[&name.as_str()],
            )
            .await?;
        let mut nums = Vec::with_capacity(rows.len());
        for row in &rows {
            let num: i64 = column(row, 0, "clients")?;
            super::queue::delete_queue(&txn, to_u64(num)?).await?;
            txn.execute("DELETE FROM key_packages WHERE client_num = $1", &[&num])
                .await?;
            txn.execute("DELETE FROM last_resort WHERE client_num = $1", &[&num])
                .await?;
            // As RemoveClient: every node hears it when, and only if, this commits.
            txn.execute(
                "SELECT pg_notify($1, $2)",
                &[&crate::bus::REVOKED_CHANNEL, &num.to_string()],
            )
            .await?;
            nums.push(to_u64(num)?);
        }
        txn.commit().await?;
        Ok(Ok(nums))
    }

    async fn stats_read(&self) -> Result<StoreStats, StoreError> {
        let db = self.client().await?;
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM users),
                        (SELECT count(*) FROM users WHERE length(user_key) = 0),
                        (SELECT count(*) FROM clients WHERE NOT revoked),
                        (SELECT count(*) FROM groups),
                        (SELECT coalesce(sum(held), 0)::BIGINT FROM queue_heads)",
                &[],
            )
            .await?;
        let count = |idx| -> Result<u64, StoreError> { to_u64(column(&row, idx, "stats")?) };
        let outbox = db
            .query(
                "SELECT domain, count(*) FROM outbox GROUP BY domain ORDER BY domain",
                &[],
            )
            .await?
            .iter()
            .map(|row| {
                Ok((
                    column(row, 0, "outbox")?,
                    to_u64(column(row, 1, "outbox")?)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(StoreStats {
            users: count(0)?,
            deactivated_users: count(1)?,
            clients: count(2)?,
            groups: count(3)?,
            queued_messages: count(4)?,
            outbox,
        })
    }
}

impl AdminStore for PgStore {
    async fn users(&self) -> Result<Vec<UserSummary>, ServiceError> {
        let db = self.client().await?;
        let sql = format!("{SUMMARY} ORDER BY u.name COLLATE \"C\"");
        let rows = db
            .query(sql.as_str(), &[])
            .await
            .map_err(StoreError::from)?;
        Ok(rows
            .iter()
            .map(summary)
            .collect::<Result<Vec<_>, StoreError>>()?)
    }

    async fn user(&self, name: &UserName) -> Result<Option<UserSummary>, ServiceError> {
        let db = self.client().await?;
        let sql = format!("{SUMMARY} WHERE u.name = $1");
        let row = db
            .query_opt(sql.as_str(), &[&name.as_str()])
            .await
            .map_err(StoreError::from)?;
        Ok(row.as_ref().map(summary).transpose()?)
    }

    async fn deactivate_user(&self, name: &UserName) -> Result<Vec<u64>, ServiceError> {
        flatten(self.deactivate_txn(name).await)
    }

    async fn token_uses(&self) -> Result<Vec<(String, u64)>, ServiceError> {
        let db = self.client().await?;
        let rows = db
            .query("SELECT hash, uses FROM token_uses ORDER BY hash", &[])
            .await
            .map_err(StoreError::from)?;
        Ok(rows
            .iter()
            .map(|row| {
                Ok((
                    column(row, 0, "token_uses")?,
                    to_u64(column(row, 1, "token_uses")?)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?)
    }

    async fn stats(&self) -> Result<StoreStats, ServiceError> {
        Ok(self.stats_read().await?)
    }

    async fn backup(&self, _dest: PathBuf) -> Result<BackupOutcome, ServiceError> {
        Ok(BackupOutcome::External(PG_DUMP))
    }
}
