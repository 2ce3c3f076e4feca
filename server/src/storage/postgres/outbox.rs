//! PostgreSQL implementation of the federation outbox: entries keyed by (destination domain,
//! seq), drained by every node of the domain but, per destination, by one at a time.
//!
//! Which node drains a destination is decided by a lease in `outbox_leases`: reading a batch
//! takes the destination's lease when it is free or expired, renews it when this node holds
//! it, and returns nothing when another node holds it (its worker then idles). A node that
//! finds nothing left to send drops its lease, so the next node with new entries for that
//! destination takes over at once. Lease times are the database's clock, so the nodes' clocks
//! need not agree.
//!
//! A node that stops mid-batch leaves its entries and its lease. The lease is another node's
//! to take as soon as the stopped node has no connection to the database left (every
//! connection of a node carries its id in `application_name`; a killed process's connections
//! close with it), or once it expires (a node alive but stuck). The others hear of the stop
//! from their wake-up bus's liveness check and look for pending destinations at once; their
//! periodic rescan of `pending_domains` is the fallback. The receiver deduplicates by message
//! id, so a batch sent twice is stored once. The same holds for a delivery that outlasts the
//! lease: another node may send it meanwhile, never lose it.

use roost_protocol::messages::federation::Delivery;
use roost_protocol::messages::queue::QueuePayload;
use roost_protocol::{ClientId, Domain, MessageId};
use tls_codec::{DeserializeBytes, Serialize as _};

use super::{PgStore, column, to_i64, to_u64};
use crate::error::ServiceError;
use crate::federation::outbox::{MAX_RECIPIENTS_PER_DELIVERY, OutboxStore};
use crate::storage::StoreError;

/// The database's clock in ms since the epoch (transaction start).
const NOW_MS: &str = "(EXTRACT(EPOCH FROM now()) * 1000)::BIGINT";

/// How many storage timeouts a lease lasts: long enough for the holder to read, send and
/// remove a batch, short enough that a stopped node's destinations are picked up soon.
const LEASE_TIMEOUTS: u32 = 3;

/// Adds one message for `clients` (all of `domain`) inside `txn`, the Delivery Service's
/// fan-out transaction: one entry per [`MAX_RECIPIENTS_PER_DELIVERY`] recipients, each
/// holding the payload once. Seqs come from `outbox_seq`, so a destination's entries are sent
/// in the order their transactions took them (for one group: its commit order, as a group's
/// writes are serialised on its row).
pub(crate) async fn add_in_txn(
    txn: &tokio_postgres::Transaction<'_>,
    domain: &Domain,
    clients: &[ClientId],
    id: MessageId,
    timestamp_ms: u64,
    payload: &QueuePayload,
) -> Result<(), StoreError> {
    for chunk in clients.chunks(MAX_RECIPIENTS_PER_DELIVERY) {
        let delivery = Delivery {
            recipients: chunk.to_vec(),
            id,
            timestamp_ms,
            payload: payload.clone(),
        };
        let bytes = delivery
            .tls_serialize_detached()
            .map_err(|_| StoreError::Corrupt("delivery encoding"))?;
        // Typed: no prepare round trip inside the fan-out transaction.
        txn.execute_typed(
            "INSERT INTO outbox (domain, seq, delivery) VALUES ($1, nextval('outbox_seq'), $2)",
            &[
                (&domain.as_str(), tokio_postgres::types::Type::TEXT),
                (&bytes, tokio_postgres::types::Type::BYTEA),
            ],
        )
        .await?;
    }
    Ok(())
}

/// The oldest entries of a destination: at most `$2`, and while their running size stays
/// within `$3` bytes (the first always). Sizes are counted in the database, so entries that
/// do not fit are never sent over.
const BATCH: &str = "
    SELECT seq, delivery FROM (
        SELECT seq, delivery,
               ROW_NUMBER() OVER w AS n,
               SUM(octet_length(delivery)) OVER w AS bytes
        FROM (
            SELECT seq, delivery FROM outbox WHERE domain = $1 ORDER BY seq LIMIT $2
        ) AS head
        WINDOW w AS (ORDER BY seq)
    ) AS batch
    WHERE n = 1 OR bytes <= $3
    ORDER BY seq";

impl PgStore {
    /// How long a lease lasts, in ms.
    fn lease_ms(&self) -> i64 {
        let lease = self.timeout().saturating_mul(LEASE_TIMEOUTS);
        i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1)
    }

    async fn pending_domains_read(&self) -> Result<Vec<Domain>, StoreError> {
        let client = self.client().await?;
        // One index probe per destination rather than a scan of every entry (a long outage
        // of one peer can leave many).
        let rows = client
            .query(
                "WITH RECURSIVE d (domain) AS (
                     (SELECT domain FROM outbox ORDER BY domain LIMIT 1)
                     UNION ALL
                     SELECT (SELECT o.domain FROM outbox AS o
                             WHERE o.domain > d.domain ORDER BY o.domain LIMIT 1)
                     FROM d WHERE d.domain IS NOT NULL
                 )
                 SELECT domain FROM d WHERE domain IS NOT NULL ORDER BY domain",
                &[],
            )
            .await?;
        let mut domains = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: &str = column(row, 0, "outbox")?;
            // As the embedded engine: a name that is no domain is never sent anywhere.
            if let Ok(domain) = name.parse::<Domain>() {
                domains.push(domain);
            }
        }
        Ok(domains)
    }

    async fn batch_txn(
        &self,
        domain: &Domain,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Delivery)>, StoreError> {
        let name = domain.as_str();
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // Take the lease if it is free, expired or held by a node that has no connection to
        // the database any more (it stopped: `listen`), renew it if it is ours; the row lock
        // orders this against every other node's attempt.
        let held = txn
            .query_opt(
                &format!(
                    "INSERT INTO outbox_leases AS l (domain, holder, expires_ms)
                     VALUES ($1, $2, {NOW_MS} + $3)
                     ON CONFLICT (domain) DO UPDATE
                     SET holder = EXCLUDED.holder, expires_ms = EXCLUDED.expires_ms
                     WHERE l.holder = EXCLUDED.holder OR l.expires_ms <= {NOW_MS}
                        OR NOT EXISTS (SELECT 1 FROM pg_stat_activity
                                       WHERE application_name = $4 || l.holder)
                     RETURNING holder"
                ),
                &[
                    &name,
                    &self.node(),
                    &self.lease_ms(),
                    &super::listen::NODE_PREFIX,
                ],
            )
            .await?;
        if held.is_none() {
            // Another node drains this destination; nothing written.
            return Ok(Vec::new());
        }
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let rows = txn.query(BATCH, &[&name, &max, &max_bytes]).await?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq = to_u64(column(row, 0, "outbox")?)?;
            let bytes: &[u8] = column(row, 1, "outbox")?;
            match Delivery::tls_deserialize_bytes(bytes) {
                Ok((delivery, [])) => batch.push((seq, delivery)),
                _ => return Err(StoreError::Corrupt("outbox")),
            }
        }
        if batch.is_empty() {
            // Nothing left: let the next node with entries for this destination take over
            // without waiting for the lease to run out.
            txn.execute(
                "DELETE FROM outbox_leases WHERE domain = $1 AND holder = $2",
                &[&name, &self.node()],
            )
            .await?;
        }
        txn.commit().await?;
        Ok(batch)
    }

    async fn remove_write(&self, domain: &Domain, seqs: &[u64]) -> Result<(), StoreError> {
        let seqs = seqs
            .iter()
            .map(|&seq| to_i64(seq))
            .collect::<Result<Vec<_>, _>>()?;
        let client = self.client().await?;
        // One statement: its own transaction. Entries another node removed already (it took
        // over and sent them too) are simply gone.
        client
            .execute(
                "DELETE FROM outbox WHERE domain = $1 AND seq = ANY($2)",
                &[&domain.as_str(), &seqs],
            )
            .await?;
        Ok(())
    }
}

impl OutboxStore for PgStore {
    async fn pending_domains(&self) -> Result<Vec<Domain>, ServiceError> {
        Ok(self.pending_domains_read().await?)
    }

    async fn outbox_batch(
        &self,
        domain: &Domain,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Delivery)>, ServiceError> {
        Ok(self.batch_txn(domain, max, max_bytes).await?)
    }

    async fn outbox_remove(&self, domain: &Domain, seqs: Vec<u64>) -> Result<(), ServiceError> {
        Ok(self.remove_write(domain, &seqs).await?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use roost_protocol::messages::queue::GroupMessage;
    use tls_codec::Size as _;

    use super::*;
    use crate::storage::suite::postgres_backend::connect;

    fn payload(n: u8) -> QueuePayload {
        QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![n].into(),
        })
    }

    /// Writes messages as the Delivery Service's fan-out transaction does.
    async fn write(store: &PgStore, domain: &Domain, recipients: &[ClientId], messages: &[u8]) {
        let mut client = store.client().await.unwrap();
        let txn = client.transaction().await.unwrap();
        for &n in messages {
            add_in_txn(&txn, domain, recipients, MessageId([n; 16]), 1, &payload(n))
                .await
                .unwrap();
        }
        txn.commit().await.unwrap();
    }

    fn ids(batch: &[(u64, Delivery)]) -> Vec<u8> {
        batch.iter().map(|(_, d)| d.id.0[0]).collect()
    }

    /// A node that stops while it drains a destination (its process killed: every connection
    /// of it closes) leaves its lease to the others at once, not when the lease runs out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_nodes_lease_is_taken_over_at_once() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("takeover").unwrap();
        // A 10 s timeout: leases of 30 s.
        let timeout = Duration::from_secs(10);
        let (a, closer_a) = connect(&url, timeout).await;
        let (b, closer_b) = connect(&url, timeout).await;
        let beta: Domain = "beta.test".parse().unwrap();
        let bob: Vec<ClientId> = vec!["bob@beta.test/phone".parse().unwrap()];
        write(&a, &beta, &bob, &[1, 2]).await;
        let first = a.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
        assert_eq!(ids(&first), [1, 2]);
        // Alive, A keeps it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            b.outbox_batch(&beta, 10, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );

        let stopped = Instant::now();
        drop(a);
        closer_a.join();
        let again = loop {
            let batch = b.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
            if !batch.is_empty() {
                break batch;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(10),
                "not taken over within 10 s of A's stop (the lease lasts 30 s)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(again, first);
        closer_b.join();
    }

    /// Two nodes over one database: one drains a destination at a time; when its lease runs
    /// out (it stopped mid-batch) the other sends the same entries; removed once, they are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_node_at_a_time_drains_a_destination() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("outbox").unwrap();
        // A 1 s timeout: leases of 3 s.
        let timeout = Duration::from_secs(1);
        let (a, closer_a) = connect(&url, timeout).await;
        let (b, closer_b) = connect(&url, timeout).await;
        let beta: Domain = "beta.test".parse().unwrap();
        let gamma: Domain = "gamma.test".parse().unwrap();
        let bob: Vec<ClientId> = vec!["bob@beta.test/phone".parse().unwrap()];
        let carol: Vec<ClientId> = vec!["carol@gamma.test/phone".parse().unwrap()];

        write(&a, &beta, &bob, &[1, 2, 3]).await;
        write(&b, &gamma, &carol, &[4]).await;
        assert_eq!(
            b.pending_domains().await.unwrap(),
            vec![beta.clone(), gamma.clone()]
        );

        let taken_at = Instant::now();
        let first = a.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
        assert_eq!(ids(&first), [1, 2, 3], "in order");
        assert!(first.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(first.iter().all(|(_, d)| d.recipients == bob));
        // A holds beta: B gets nothing for it, yet drains gamma.
        assert!(
            b.outbox_batch(&beta, 10, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            ids(&b.outbox_batch(&gamma, 10, usize::MAX).await.unwrap()),
            [4]
        );
        // The holder renews its lease with every batch, bounded by count and bytes.
        assert_eq!(
            ids(&a.outbox_batch(&beta, 2, usize::MAX).await.unwrap()),
            [1, 2]
        );
        let first_len = first[0].1.tls_serialized_len();
        assert_eq!(
            ids(&a.outbox_batch(&beta, 10, first_len).await.unwrap()),
            [1]
        );
        assert_eq!(ids(&a.outbox_batch(&beta, 10, 1).await.unwrap()), [1]);
        let renewed_at = Instant::now();

        // A stops here. Once its lease has run out, B sends the same entries.
        let again = loop {
            let batch = b.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
            if !batch.is_empty() {
                break batch;
            }
            assert!(
                taken_at.elapsed() < Duration::from_secs(30),
                "the lease never ran out"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            renewed_at.elapsed() >= Duration::from_millis(2_500),
            "taken over after {:?}, before the lease ran out",
            renewed_at.elapsed()
        );
        assert_eq!(again, first);
        // Now B holds it.
        assert!(
            a.outbox_batch(&beta, 10, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );

        b.outbox_remove(&beta, again.iter().map(|(seq, _)| *seq).collect())
            .await
            .unwrap();
        // Removing again (A, which sent them too, finishing late) changes nothing.
        a.outbox_remove(&beta, again.iter().map(|(seq, _)| *seq).collect())
            .await
            .unwrap();
        assert_eq!(b.pending_domains().await.unwrap(), vec![gamma.clone()]);
        // B finds nothing left and drops its lease, so A sends new entries at once.
        assert!(
            b.outbox_batch(&beta, 10, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        write(&a, &beta, &bob, &[5]).await;
        assert_eq!(
            ids(&a.outbox_batch(&beta, 10, usize::MAX).await.unwrap()),
            [5]
        );

        drop((a, b));
        closer_a.join();
        closer_b.join();
    }

    /// A message for more recipients of one domain than an entry names is split.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_fan_outs_are_split() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("split").unwrap();
        let (store, closer) = connect(&url, Duration::from_secs(10)).await;
        let beta: Domain = "beta.test".parse().unwrap();
        let many: Vec<ClientId> = (0..1500)
            .map(|i| format!("u{i}@beta.test/d").parse().unwrap())
            .collect();
        write(&store, &beta, &many, &[7]).await;
        let batch = store.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
        let sizes: Vec<usize> = batch.iter().map(|(_, d)| d.recipients.len()).collect();
        assert_eq!(sizes, [1024, 476]);
        let named: Vec<ClientId> = batch
            .iter()
            .flat_map(|(_, d)| d.recipients.clone())
            .collect();
        assert_eq!(named, many);
        assert!(batch.iter().all(|(_, d)| d.payload == payload(7)));

        drop(store);
        closer.join();
    }
}
