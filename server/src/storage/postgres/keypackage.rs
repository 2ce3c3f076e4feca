//! PostgreSQL implementation of the KeyPackage service's store.
//!
//! A claim deletes the ordinary KeyPackage it hands out in one statement that first locks the
//! client's oldest unexpired one, skipping any another claim holds (`FOR UPDATE SKIP
//! LOCKED`): concurrent claims on any number of nodes each get a different one, or none, and
//! never wait for each other. An upload locks the client's row, so concurrent uploads cannot
//! together exceed the per-client limit. `SKIP LOCKED` is PostgreSQL's (CockroachDB has it
//! from 23.2; elsewhere a plain `FOR UPDATE` keeps the guarantee and only serialises claims).

use roost_protocol::messages::keypackage::{ClaimedKeyPackage, KeyPackageKind};
use roost_protocol::{ClientId, UserId};
use tokio_postgres::Transaction;

use super::auth::{Refusable, active_client_in, active_clients_in, flatten};
use super::{PgStore, column, to_u64};
use crate::auth::ClientRecord;
use crate::delivery::receipt::Receipt;
use crate::error::ServiceError;
use crate::keypackage::KeyPackageStore;
use crate::storage::StoreError;

/// A time in seconds as stored; beyond BIGINT means never (it compares the same way).
fn secs(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Takes one KeyPackage of a client inside `txn`: the oldest unexpired ordinary one (deleted),
/// else the unexpired last-resort one (kept). The client's expired ones are deleted on the way,
/// as the embedded engine does.
async fn take_one(
    txn: &Transaction<'_>,
    client_num: u64,
    now: u64,
) -> Result<Option<(Vec<u8>, KeyPackageKind)>, StoreError> {
    let num = super::to_i64(client_num)?;
    let now = secs(now);
    txn.execute(
        "DELETE FROM key_packages WHERE client_num = $1 AND not_after <= $2",
        &[&num, &now],
    )
    .await?;
    let taken = txn
        .query_opt(
            "DELETE FROM key_packages
             WHERE (client_num, seq) = (
                 SELECT client_num, seq FROM key_packages
                 WHERE client_num = $1 AND not_after > $2
                 ORDER BY seq LIMIT 1
                 FOR UPDATE SKIP LOCKED
             )
             RETURNING body",
            &[&num, &now],
        )
        .await?;
    if let Some(row) = taken {
        return Ok(Some((
            column(&row, 0, "key_packages")?,
            KeyPackageKind::Ordinary,
        )));
    }
    let last = txn
        .query_opt(
            "SELECT body FROM last_resort WHERE client_num = $1 AND not_after > $2",
            &[&num, &now],
        )
        .await?;
    last.map(|row| Ok((column(&row, 0, "last_resort")?, KeyPackageKind::LastResort)))
        .transpose()
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

impl PgStore {
    async fn add_txn(
        &self,
        client_num: u64,
        ordinary: Vec<(u64, Vec<u8>)>,
        last_resort: Option<(u64, Vec<u8>)>,
        max_held: u64,
        receipt: Option<Receipt>,
    ) -> Refusable<u64> {
        let num = super::to_i64(client_num)?;
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // The client's row is the lock that serialises its uploads (and its removal).
        let locked = txn
            .query_opt(
                "SELECT client_num FROM clients WHERE client_num = $1 AND NOT revoked FOR UPDATE",
                &[&num],
            )
            .await?;
        if locked.is_none() {
            return Ok(Err(ServiceError::ClientNotFound));
        }
        // Uploads of this client are serialised by the lock above: a repeat finds the receipt.
        if let Some(receipt) = &receipt
            && let Some(answer) = super::receipts::fresh_answer(&txn, receipt).await?
        {
            txn.rollback().await?;
            return Ok(Ok(answer));
        }
        let row = txn
            .query_one(
                "SELECT COUNT(*) FROM key_packages WHERE client_num = $1",
                &[&num],
            )
            .await?;
        let held = to_u64(column(&row, 0, "key_packages")?)?;
        let adding = ordinary.len() as u64;
        if held.saturating_add(adding) > max_held {
            return Ok(Err(ServiceError::LimitExceeded(format!(
                "at most {max_held} KeyPackages held"
            ))));
        }
        if !ordinary.is_empty() {
            // Seqs for the batch, ascending in upload order (a claim takes the lowest first).
            let rows = txn
                .query(
                    "SELECT nextval('key_package_seq') FROM generate_series(1, $1::BIGINT)",
                    &[&super::to_i64(adding)?],
                )
                .await?;
            let mut seqs = rows
                .iter()
                .map(|row| column::<i64>(row, 0, "key_package_seq"))
                .collect::<Result<Vec<_>, _>>()?;
            if seqs.len() != ordinary.len() {
                return Err(StoreError::Database("key_package_seq: short batch".into()));
            }
            seqs.sort_unstable();
            let not_after: Vec<i64> = ordinary.iter().map(|(n, _)| secs(*n)).collect();
            let bodies: Vec<&[u8]> = ordinary.iter().map(|(_, b)| b.as_slice()).collect();
            txn.execute(
                "INSERT INTO key_packages (client_num, seq, not_after, body)
                 SELECT $1, t.seq, t.not_after, t.body
                 FROM unnest($2::BIGINT[], $3::BIGINT[], $4::BYTEA[]) AS t (seq, not_after, body)",
                &[&num, &seqs, &not_after, &bodies],
            )
            .await?;
        }
        if let Some((not_after, body)) = &last_resort {
            txn.execute(
                "INSERT INTO last_resort (client_num, not_after, body) VALUES ($1, $2, $3)
                 ON CONFLICT (client_num)
                 DO UPDATE SET not_after = EXCLUDED.not_after, body = EXCLUDED.body",
                &[&num, &secs(*not_after), body],
            )
            .await?;
        }
        if let Some(receipt) = &receipt {
            super::receipts::claim(&txn, &[receipt]).await?;
            super::receipts::set_answers(&txn, &[(receipt, held + adding)]).await?;
        }
        txn.commit().await?;
        Ok(Ok(held + adding))
    }

    async fn claim_one_txn(&self, target: &ClientId, now: u64) -> Refusable<ClaimedKeyPackage> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let Some(record) = active_client_in(&*txn, target).await? else {
            return Ok(Err(ServiceError::ClientNotFound));
        };
        let taken = take_one(&txn, record.client_num, now).await?;
        let Some(claimed) = claimed(record, taken) else {
            return Ok(Err(ServiceError::NoKeyPackage));
        };
        txn.commit().await?;
        Ok(Ok(claimed))
    }

    async fn claim_for_user_txn(
        &self,
        user: &UserId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // Resolved inside the transaction: a client may have been removed meanwhile.
        let records = active_clients_in(&*txn, user).await?;
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let taken = take_one(&txn, record.client_num, now).await?;
            out.extend(claimed(record, taken));
        }
        txn.commit().await?;
        Ok(out)
    }

    async fn count_read(&self, client_num: u64, now: u64) -> Result<(u32, bool), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT
                     (SELECT COUNT(*) FROM key_packages WHERE client_num = $1 AND not_after > $2),
                     EXISTS (SELECT 1 FROM last_resort WHERE client_num = $1 AND not_after > $2)",
                &[&super::to_i64(client_num)?, &secs(now)],
            )
            .await?;
        let remaining = to_u64(column(&row, 0, "key_packages")?)?;
        let has_last_resort: bool = column(&row, 1, "last_resort")?;
        Ok((
            u32::try_from(remaining).unwrap_or(u32::MAX),
            has_last_resort,
        ))
    }

    /// Deletes expired KeyPackages through their indexes by expiry, at most
    /// [`PURGE_BATCH`] rows of each table per statement (each its own transaction): the work
    /// is what expired, not what is stored.
    async fn purge_expired_txn(&self, now: u64) -> Result<u64, StoreError> {
        let now = secs(now);
        let client = self.client().await?;
        let mut purged = 0;
        loop {
            let n = client
                .execute(
                    "DELETE FROM key_packages WHERE (client_num, seq) IN
                         (SELECT client_num, seq FROM key_packages WHERE not_after <= $1
                          LIMIT $2)",
                    &[&now, &PURGE_BATCH],
                )
                .await?;
            purged += n;
            if n < PURGE_BATCH as u64 {
                break;
            }
        }
        loop {
            let n = client
                .execute(
                    "DELETE FROM last_resort WHERE client_num IN
                         (SELECT client_num FROM last_resort WHERE not_after <= $1 LIMIT $2)",
                    &[&now, &PURGE_BATCH],
                )
                .await?;
            if n < PURGE_BATCH as u64 {
                return Ok(purged);
            }
        }
    }
}

/// Most expired KeyPackages one purge statement deletes.
const PURGE_BATCH: i64 = 2_000;

impl KeyPackageStore for PgStore {
    async fn add(
        &self,
        client_num: u64,
        ordinary: Vec<(u64, Vec<u8>)>,
        last_resort: Option<(u64, Vec<u8>)>,
        max_held: u64,
        receipt: Option<Receipt>,
    ) -> Result<u64, ServiceError> {
        flatten(
            self.add_txn(client_num, ordinary, last_resort, max_held, receipt)
                .await,
        )
    }

    async fn claim_one(
        &self,
        target: &ClientId,
        now: u64,
    ) -> Result<ClaimedKeyPackage, ServiceError> {
        flatten(self.claim_one_txn(target, now).await)
    }

    async fn claim_for_user(
        &self,
        user: &UserId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, ServiceError> {
        Ok(self.claim_for_user_txn(user, now).await?)
    }

    async fn count(&self, client_num: u64, now: u64) -> Result<(u32, bool), ServiceError> {
        Ok(self.count_read(client_num, now).await?)
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, ServiceError> {
        Ok(self.purge_expired_txn(now).await?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::auth::AuthStore;
    use crate::storage::suite::credential;
    use crate::storage::suite::postgres_backend::connect;

    const HELD: usize = 40;
    const CLAIMS: usize = 60;

    /// 60 claims at once, from two nodes (separate pools) over one database, on a client with
    /// 40 ordinary KeyPackages: each of the 40 goes to exactly one claim; the others get the
    /// last-resort one, or NO_KEY_PACKAGE for a client without one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_on_two_nodes_never_share_a_key_package() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("claims").unwrap();
        let (a, closer_a) = connect(&url, Duration::from_secs(10)).await;
        let (b, closer_b) = connect(&url, Duration::from_secs(10)).await;
        let now = 1_000;

        for (device, last_resort) in [("phone", true), ("laptop", false)] {
            let id = format!("claims@example.org/{device}");
            let target: ClientId = id.parse().unwrap();
            let num = a.add_client(credential(&id)).await.unwrap();
            let ordinary: Vec<(u64, Vec<u8>)> = (0..HELD)
                .map(|i| (now + 100, format!("{device}-{i}").into_bytes()))
                .collect();
            let last = last_resort.then(|| (now + 100, b"last".to_vec()));
            assert_eq!(
                a.add(num, ordinary.clone(), last, HELD as u64, None)
                    .await
                    .unwrap(),
                HELD as u64
            );

            let claims: Vec<_> = (0..CLAIMS)
                .map(|i| {
                    let node = if i % 2 == 0 { a.clone() } else { b.clone() };
                    let target = target.clone();
                    tokio::spawn(async move { node.claim_one(&target, now).await })
                })
                .collect();
            let mut handed = Vec::new();
            let (mut last_resorts, mut none) = (0, 0);
            for claim in claims {
                match claim.await.unwrap() {
                    Ok(claimed) if claimed.kind == KeyPackageKind::Ordinary => {
                        handed.push(claimed.key_package.into_vec());
                    }
                    Ok(claimed) => {
                        assert_eq!(claimed.key_package.as_slice(), b"last");
                        last_resorts += 1;
                    }
                    Err(ServiceError::NoKeyPackage) => none += 1,
                    Err(err) => panic!("claim failed: {err}"),
                }
            }
            let distinct: HashSet<&Vec<u8>> = handed.iter().collect();
            assert_eq!(
                distinct.len(),
                handed.len(),
                "{device}: one handed out twice"
            );
            let uploaded: HashSet<&Vec<u8>> = ordinary.iter().map(|(_, b)| b).collect();
            assert_eq!(distinct, uploaded, "{device}: every one handed out once");
            let rest = CLAIMS - HELD;
            if last_resort {
                assert_eq!((last_resorts, none), (rest, 0), "{device}");
            } else {
                assert_eq!((last_resorts, none), (0, rest), "{device}");
            }
            assert_eq!(b.count(num, now).await.unwrap(), (0, last_resort));
        }

        drop((a, b));
        closer_a.join();
        closer_b.join();
    }

    /// Uploads at once from two nodes cannot together exceed the limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_uploads_on_two_nodes_stay_within_the_limit() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("uploads").unwrap();
        let (a, closer_a) = connect(&url, Duration::from_secs(10)).await;
        let (b, closer_b) = connect(&url, Duration::from_secs(10)).await;
        let num = a
            .add_client(credential("uploads@example.org/phone"))
            .await
            .unwrap();
        let uploads: Vec<_> = (0..12u8)
            .map(|i| {
                let node = if i % 2 == 0 { a.clone() } else { b.clone() };
                let batch = (0..10u8).map(|j| (u64::MAX, vec![i, j])).collect();
                tokio::spawn(async move { node.add(num, batch, None, 50, None).await })
            })
            .collect();
        let mut accepted = 0;
        for upload in uploads {
            match upload.await.unwrap() {
                Ok(_) => accepted += 1,
                Err(ServiceError::LimitExceeded(_)) => {}
                Err(err) => panic!("upload failed: {err}"),
            }
        }
        assert_eq!(accepted, 5);
        assert_eq!(a.count(num, 0).await.unwrap(), (50, false));

        drop((a, b));
        closer_a.join();
        closer_b.join();
    }
}
