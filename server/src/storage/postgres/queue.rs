//! PostgreSQL implementation of the Queuing Service's store: per-client head rows that assign
//! seqs, (client, seq) entries, payloads stored once with a reference count, dedup records.
//!
//! - Seqs come from the queue's head row, read and bumped under a row lock inside the writing
//!   transaction, so per queue they are strictly increasing and gap-free in commit order
//!   whichever node writes.
//! - Lock order, the same for every writer of this module: head rows in ascending client
//!   number (one `SELECT ... ORDER BY client_num FOR UPDATE`), then payload rows in ascending
//!   id. Group rows (`groups`) come before both.
//! - Writes are set-based: a fan-out to any number of recipients is a handful of statements
//!   over unnested arrays. Statements that do not need each other's answers are pipelined on
//!   the connection (sent together, answered in order); the server still runs them one after
//!   the other, in the order sent.
//! - Every transaction that adds entries returns their heads, which the caller announces to
//!   the other nodes once it committed ([`PgStore::announce`]).
//! - A payload's reference count is one row that every ack of a fan-out's recipients updates:
//!   acks of one big fan-out wait for each other on it (briefly: one statement each).
//!
//! Portability to Postgres-wire distributed engines: the SQL is plain (row locks, `unnest`,
//! window functions, sequences), but the reasoning relies on PostgreSQL's default READ
//! COMMITTED, where each statement sees what committed before it started (the dedup records
//! read after the head rows are locked). Under SERIALIZABLE (CockroachDB's default) the same
//! statements stay correct but concurrent writers of one queue may be aborted with a
//! serialization failure, which surfaces as UNAVAILABLE and would want a retry loop there.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use roost_protocol::messages::federation::{DeliverResponse, Delivery};
use roost_protocol::messages::queue::{QueueMessage, QueuePayload};
use roost_protocol::{ClientId, MessageId};
use tls_codec::{DeserializeBytes, Serialize as _};
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Row, Transaction};

use super::{PgStore, to_i64, to_u64};
use crate::error::ServiceError;
use crate::queue::{Enqueued, Fresh, QueueStore};
use crate::storage::StoreError;

/// A statement parameter with its type (statements run without a prepare round trip).
pub(super) type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// Runs a statement inside `txn`; returns the rows it affected. The statement is sent on the
/// first poll, so statements whose futures are polled in order are sent in that order.
pub(super) async fn exec<const N: usize>(
    txn: &Transaction<'_>,
    sql: &str,
    params: [Param<'_>; N],
) -> Result<u64, StoreError> {
    Ok(txn.execute_typed(sql, &params).await?)
}

/// Runs a query inside `txn` (sent on the first poll, like [`exec`]).
pub(super) async fn query<const N: usize>(
    txn: &Transaction<'_>,
    sql: &str,
    params: [Param<'_>; N],
) -> Result<Vec<Row>, StoreError> {
    Ok(txn.query_typed(sql, &params).await?)
}

/// A column of a row (a column of another type than the schema's is a corrupt record, not a
/// panic).
pub(super) fn col<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|_| StoreError::Corrupt("unexpected column type"))
}

/// Ends a transaction that refuses: nothing of it is kept. A failing rollback changes
/// nothing (the connection is then broken and the pool drops it; nothing was committed), so
/// the refusal is what the caller gets.
pub(super) async fn refuse<T>(
    txn: deadpool_postgres::Transaction<'_>,
    err: ServiceError,
) -> Result<Result<T, ServiceError>, StoreError> {
    if let Err(rollback) = txn.rollback().await {
        tracing::debug!(%rollback, "rollback of a refused write failed");
    }
    Ok(Err(err))
}

/// A number of the services as a statement limit (values beyond BIGINT mean "no limit").
fn limit(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn message_id(raw: &[u8], table: &'static str) -> Result<MessageId, StoreError> {
    raw.try_into()
        .map(MessageId)
        .map_err(|_| StoreError::Corrupt(table))
}

/// One payload to enqueue for several local queues.
pub(super) struct Batch<'a> {
    /// Client numbers; outcomes come back in this order.
    pub(super) recipients: &'a [u64],
    pub(super) id: MessageId,
    pub(super) timestamp_ms: u64,
    /// The TLS-encoded [`QueuePayload`], stored once for all of the batch's entries.
    pub(super) payload: &'a [u8],
}

/// Rows to insert, as column arrays.
#[derive(Default)]
struct Rows<'a> {
    payload_ids: Vec<i64>,
    payload_bodies: Vec<&'a [u8]>,
    payload_refs: Vec<i64>,
    nums: Vec<i64>,
    seqs: Vec<i64>,
    entry_payloads: Vec<i64>,
    times: Vec<i64>,
    ids: Vec<&'a [u8]>,
    dedup_nums: Vec<i64>,
    dedup_ids: Vec<&'a [u8]>,
    dedup_seqs: Vec<i64>,
    dedup_times: Vec<i64>,
    /// (client number, seq) of every new entry, for the wake-ups.
    woken: Vec<(u64, u64)>,
}

/// Enqueues `batches` inside `txn`, each payload stored once for its recipients, as if one
/// after the other: outcomes per batch, in recipient order. With `dedup`, a message id
/// already queued for a recipient (earlier, or by an earlier batch) is not queued again. A
/// client number without a queue (client removed) is [`Enqueued::Gone`]; a queue holding
/// `max_depth` entries is [`Enqueued::Full`]. Sends the wake-ups of the new entries. Records
/// the deepest queue each batch appended to in `roost_queue_depth`.
pub(super) async fn enqueue_in_txn(
    txn: &Transaction<'_>,
    max_depth: u64,
    batches: &[Batch<'_>],
    dedup: bool,
) -> Result<(Vec<Vec<Enqueued>>, Vec<(u64, u64)>), StoreError> {
    let mut queues = Vec::new();
    for batch in batches {
        for &num in batch.recipients {
            queues.push(to_i64(num)?);
        }
    }
    queues.sort_unstable();
    queues.dedup();
    if queues.is_empty() {
        return Ok((batches.iter().map(|_| Vec::new()).collect(), Vec::new()));
    }
    let (mut key_nums, mut key_ids) = (Vec::new(), Vec::new());
    if dedup {
        for batch in batches {
            for &num in batch.recipients {
                key_nums.push(to_i64(num)?);
                key_ids.push(&batch.id.0[..]);
            }
        }
    }
    let wanted = limit(batches.len());
    // Pipelined, run in this order: the dedup records are read after the head rows are
    // locked, so a concurrent enqueue of the same message (which holds the lock) is seen.
    let (locked, seen, payload_ids) = tokio::try_join!(
        biased;
        query(
            txn,
            "SELECT client_num, head, held FROM queue_heads WHERE client_num = ANY($1)
             ORDER BY client_num FOR UPDATE",
            [(&queues, Type::INT8_ARRAY)],
        ),
        async {
            if !dedup {
                return Ok(Vec::new());
            }
            query(
                txn,
                "SELECT d.client_num, d.message_id, d.seq FROM queue_dedup AS d
                 JOIN unnest($1::bigint[], $2::bytea[]) AS k(client_num, message_id)
                   ON d.client_num = k.client_num AND d.message_id = k.message_id",
                [(&key_nums, Type::INT8_ARRAY), (&key_ids, Type::BYTEA_ARRAY)],
            )
            .await
        },
        // One id per batch; a batch that queues nothing leaves a gap in the sequence.
        query(
            txn,
            "SELECT nextval('payload_id_seq') FROM generate_series(1, $1)",
            [(&wanted, Type::INT8)],
        ),
    )?;

    let mut heads: HashMap<u64, (u64, u64)> = HashMap::with_capacity(locked.len());
    for row in &locked {
        let num = to_u64(col(row, 0)?)?;
        heads.insert(num, (to_u64(col(row, 1)?)?, to_u64(col(row, 2)?)?));
    }
    let mut prior: HashMap<(u64, [u8; 16]), u64> = HashMap::with_capacity(seen.len());
    for row in &seen {
        let id = message_id(col(row, 1)?, "queue_dedup")?;
        prior.insert((to_u64(col(row, 0)?)?, id.0), to_u64(col(row, 2)?)?);
    }
    if payload_ids.len() != batches.len() {
        return Err(StoreError::Database(
            "payload_id_seq gave too few ids".into(),
        ));
    }

    let mut rows = Rows::default();
    let mut touched = std::collections::BTreeSet::new();
    let mut outcomes = Vec::with_capacity(batches.len());
    for (batch, id_row) in batches.iter().zip(&payload_ids) {
        let payload_id: i64 = col(id_row, 0)?;
        let timestamp_ms = to_i64(batch.timestamp_ms)?;
        let mut refs = 0i64;
        let mut deepest = None;
        let mut out = Vec::with_capacity(batch.recipients.len());
        for &num in batch.recipients {
            if dedup && let Some(&seq) = prior.get(&(num, batch.id.0)) {
                out.push(Enqueued::Duplicate(seq));
                continue;
            }
            let Some((head, held)) = heads.get_mut(&num) else {
                // No such queue (client removed meanwhile): callers resolved recipients earlier.
                out.push(Enqueued::Gone);
                continue;
            };
            if *held >= max_depth {
                out.push(Enqueued::Full);
                continue;
            }
            *head += 1;
            *held += 1;
            let seq = *head;
            deepest = deepest.max(Some(*held));
            touched.insert(num);
            rows.nums.push(to_i64(num)?);
            rows.seqs.push(to_i64(seq)?);
            rows.entry_payloads.push(payload_id);
            rows.times.push(timestamp_ms);
            rows.ids.push(&batch.id.0[..]);
            if dedup {
                prior.insert((num, batch.id.0), seq);
                rows.dedup_nums.push(to_i64(num)?);
                rows.dedup_ids.push(&batch.id.0[..]);
                rows.dedup_seqs.push(to_i64(seq)?);
                rows.dedup_times.push(timestamp_ms);
            }
            rows.woken.push((num, seq));
            refs += 1;
            out.push(Enqueued::Queued(seq));
        }
        if refs > 0 {
            rows.payload_ids.push(payload_id);
            rows.payload_bodies.push(batch.payload);
            rows.payload_refs.push(refs);
        }
        if let Some(depth) = deepest {
            metrics::histogram!("roost_queue_depth").record(depth as f64);
        }
        outcomes.push(out);
    }
    if rows.woken.is_empty() {
        return Ok((outcomes, Vec::new()));
    }
    let (mut head_nums, mut head_seqs, mut head_held) = (Vec::new(), Vec::new(), Vec::new());
    for num in touched {
        if let Some((head, held)) = heads.get(&num) {
            head_nums.push(to_i64(num)?);
            head_seqs.push(to_i64(*head)?);
            head_held.push(to_i64(*held)?);
        }
    }
    tokio::try_join!(
        biased;
        exec(
            txn,
            "INSERT INTO payloads (id, body, refs)
             SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bigint[])",
            [
                (&rows.payload_ids, Type::INT8_ARRAY),
                (&rows.payload_bodies, Type::BYTEA_ARRAY),
                (&rows.payload_refs, Type::INT8_ARRAY),
            ],
        ),
        exec(
            txn,
            "INSERT INTO queue_entries (client_num, seq, payload_id, timestamp_ms, message_id)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                  $5::bytea[])",
            [
                (&rows.nums, Type::INT8_ARRAY),
                (&rows.seqs, Type::INT8_ARRAY),
                (&rows.entry_payloads, Type::INT8_ARRAY),
                (&rows.times, Type::INT8_ARRAY),
                (&rows.ids, Type::BYTEA_ARRAY),
            ],
        ),
        exec(
            txn,
            "UPDATE queue_heads AS h SET head = t.head, held = t.held
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS t(client_num, head, held)
             WHERE h.client_num = t.client_num",
            [
                (&head_nums, Type::INT8_ARRAY),
                (&head_seqs, Type::INT8_ARRAY),
                (&head_held, Type::INT8_ARRAY),
            ],
        ),
        async {
            if rows.dedup_nums.is_empty() {
                return Ok(0);
            }
            exec(
                txn,
                "INSERT INTO queue_dedup (client_num, message_id, seq, timestamp_ms)
                 SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::bigint[])",
                [
                    (&rows.dedup_nums, Type::INT8_ARRAY),
                    (&rows.dedup_ids, Type::BYTEA_ARRAY),
                    (&rows.dedup_seqs, Type::INT8_ARRAY),
                    (&rows.dedup_times, Type::INT8_ARRAY),
                ],
            )
            .await
        },
    )?;
    Ok((outcomes, rows.woken))
}

/// Accounts for deleted entries, given as (client number, payload id): lowers the payloads'
/// reference counts, deleting the payloads no entry names any more, and with `heads` the
/// queues' held counts. The caller holds the queues' head rows.
async fn release(txn: &Transaction<'_>, deleted: &[Row], heads: bool) -> Result<(), StoreError> {
    if deleted.is_empty() {
        return Ok(());
    }
    let mut per_queue: BTreeMap<i64, i64> = BTreeMap::new();
    let mut per_payload: BTreeMap<i64, i64> = BTreeMap::new();
    for row in deleted {
        *per_queue.entry(col(row, 0)?).or_default() += 1;
        *per_payload.entry(col(row, 1)?).or_default() += 1;
    }
    let (queue_nums, queue_counts): (Vec<i64>, Vec<i64>) = per_queue.into_iter().unzip();
    let (payload_ids, payload_counts): (Vec<i64>, Vec<i64>) = per_payload.into_iter().unzip();
    tokio::try_join!(
        biased;
        async {
            if !heads {
                return Ok(0);
            }
            exec(
                txn,
                "UPDATE queue_heads AS h SET held = GREATEST(h.held - t.n, 0)
                 FROM unnest($1::bigint[], $2::bigint[]) AS t(client_num, n)
                 WHERE h.client_num = t.client_num",
                [
                    (&queue_nums, Type::INT8_ARRAY),
                    (&queue_counts, Type::INT8_ARRAY),
                ],
            )
            .await
        },
        // Payload rows are shared by the queues of a fan-out: lock them in id order first, so
        // that releases on several nodes wait for each other instead of deadlocking.
        query(
            txn,
            "SELECT id FROM payloads WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            [(&payload_ids, Type::INT8_ARRAY)],
        ),
        exec(
            txn,
            "UPDATE payloads AS p SET refs = p.refs - t.n
             FROM unnest($1::bigint[], $2::bigint[]) AS t(id, n) WHERE p.id = t.id",
            [
                (&payload_ids, Type::INT8_ARRAY),
                (&payload_counts, Type::INT8_ARRAY),
            ],
        ),
        exec(
            txn,
            "DELETE FROM payloads WHERE id = ANY($1) AND refs <= 0",
            [(&payload_ids, Type::INT8_ARRAY)],
        ),
    )?;
    Ok(())
}

/// Deletes a whole queue inside `txn` (client removed): its entries (releasing their
/// payloads), its head row and its dedup records.
pub(crate) async fn delete_queue(txn: &Transaction<'_>, client_num: u64) -> Result<(), StoreError> {
    let num = to_i64(client_num)?;
    let (_, deleted) = tokio::try_join!(
        biased;
        query(
            txn,
            "SELECT head FROM queue_heads WHERE client_num = $1 FOR UPDATE",
            [(&num, Type::INT8)],
        ),
        query(
            txn,
            "DELETE FROM queue_entries WHERE client_num = $1 RETURNING client_num, payload_id",
            [(&num, Type::INT8)],
        ),
    )?;
    tokio::try_join!(
        biased;
        release(txn, &deleted, false),
        exec(
            txn,
            "DELETE FROM queue_heads WHERE client_num = $1",
            [(&num, Type::INT8)],
        ),
        exec(
            txn,
            "DELETE FROM queue_dedup WHERE client_num = $1",
            [(&num, Type::INT8)],
        ),
        exec(
            txn,
            "DELETE FROM push_registrations WHERE client_num = $1",
            [(&num, Type::INT8)],
        ),
        exec(
            txn,
            "DELETE FROM push_jobs WHERE client_num = $1",
            [(&num, Type::INT8)],
        ),
    )?;
    Ok(())
}

/// The client number of an active local client (the domain is not looked at, as in the
/// embedded engine: callers route by domain).
async fn active_client_num(
    txn: &Transaction<'_>,
    client: &ClientId,
) -> Result<Option<u64>, StoreError> {
    let row = txn
        .query_typed_opt(
            "SELECT client_num FROM clients
             WHERE user_name = $1 AND device = $2 AND NOT revoked",
            &[
                (&client.user.name.as_str(), Type::TEXT),
                (&client.device.as_str(), Type::TEXT),
            ],
        )
        .await?;
    row.map(|row| to_u64(col(&row, 0)?)).transpose()
}

async fn enqueue(
    store: &PgStore,
    recipient: &ClientId,
    id: MessageId,
    timestamp_ms: u64,
    payload: &[u8],
    max_depth: u64,
) -> Result<Result<(u64, Enqueued), ServiceError>, StoreError> {
    let mut client = store.client().await?;
    let txn = client.transaction().await?;
    let Some(num) = active_client_num(&txn, recipient).await? else {
        return refuse(txn, ServiceError::ClientNotFound).await;
    };
    let batch = Batch {
        recipients: &[num],
        id,
        timestamp_ms,
        payload,
    };
    let (outcomes, woken) = enqueue_in_txn(&txn, max_depth, &[batch], true).await?;
    txn.commit().await?;
    store.announce(woken);
    let outcome = outcomes
        .first()
        .and_then(|out| out.first())
        .copied()
        .unwrap_or(Enqueued::Gone);
    Ok(Ok((num, outcome)))
}

/// Reads a page of a queue and its head in one statement (one snapshot). The byte budget is
/// applied by the database over the payloads' lengths (a running sum), so payloads past it are
/// not sent; the first message always goes.
async fn read_messages(
    store: &PgStore,
    client_num: u64,
    after_seq: u64,
    max_messages: usize,
    max_bytes: usize,
    cutoff_ms: u64,
) -> Result<(Vec<QueueMessage>, u64), StoreError> {
    let page = (client_num, after_seq, max_messages, max_bytes, cutoff_ms);
    let (messages, head, pending) = read_page(store, page).await?;
    if !pending {
        return Ok((messages, head));
    }
    // A commit acknowledged before this read may have its fan-out pending (see `groups`):
    // queue every pending fan-out, then read again, so the read sees it.
    super::groups::queue_pending(store, None).await?;
    let (messages, head, _) = read_page(store, page).await?;
    Ok((messages, head))
}

/// One page of a queue, its head, and whether any fan-out is pending (in the same snapshot).
async fn read_page(
    store: &PgStore,
    (client_num, after_seq, max_messages, max_bytes, cutoff_ms): (u64, u64, usize, usize, u64),
) -> Result<(Vec<QueueMessage>, u64, bool), StoreError> {
    let client = store.client().await?;
    let (num, after, cutoff) = (
        to_i64(client_num)?,
        i64::try_from(after_seq).unwrap_or(i64::MAX),
        i64::try_from(cutoff_ms).unwrap_or(i64::MAX),
    );
    let (max_messages, max_bytes) = (limit(max_messages), limit(max_bytes));
    let rows = client
        .query_typed(
            "WITH h AS (
                 SELECT COALESCE(MAX(head), 0) AS head,
                        EXISTS (SELECT 1 FROM fanout_pending) AS pending
                 FROM queue_heads WHERE client_num = $1
             ), page AS (
                 SELECT e.seq, e.message_id, e.timestamp_ms, p.body,
                        ROW_NUMBER() OVER w AS n,
                        SUM(octet_length(p.body)) OVER w AS running
                 FROM queue_entries AS e JOIN payloads AS p ON p.id = e.payload_id
                 WHERE e.client_num = $1 AND e.seq > $2 AND e.timestamp_ms >= $3
                 WINDOW w AS (ORDER BY e.seq ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
                 ORDER BY e.seq
                 LIMIT $4
             )
             SELECT h.head, page.seq, page.message_id, page.timestamp_ms, page.body, h.pending
             FROM h LEFT JOIN page ON page.n = 1 OR page.running <= $5
             ORDER BY page.seq",
            &[
                (&num, Type::INT8),
                (&after, Type::INT8),
                (&cutoff, Type::INT8),
                (&max_messages, Type::INT8),
                (&max_bytes, Type::INT8),
            ],
        )
        .await?;
    let mut head = 0;
    let mut pending = false;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        head = to_u64(col(row, 0)?)?;
        pending = col(row, 5)?;
        let Some(seq) = col::<Option<i64>>(row, 1)? else {
            continue; // an empty page
        };
        let (Some(id), Some(timestamp_ms), Some(body)) = (
            col::<Option<&[u8]>>(row, 2)?,
            col::<Option<i64>>(row, 3)?,
            col::<Option<&[u8]>>(row, 4)?,
        ) else {
            return Err(StoreError::Corrupt("queue_entries"));
        };
        let payload = match QueuePayload::tls_deserialize_bytes(body) {
            Ok((payload, [])) => payload,
            _ => return Err(StoreError::Corrupt("payloads")),
        };
        out.push(QueueMessage {
            seq: to_u64(seq)?,
            id: message_id(id, "queue_entries")?,
            timestamp_ms: to_u64(timestamp_ms)?,
            payload,
        });
    }
    Ok((out, head, pending))
}

/// QueueAck, written with the other acks and fan-outs waiting on this node (`batch`, and
/// `roost_ack` in migrations/0001_init.sql). The queue's head row is the check: it exists
/// exactly while the client is active. No entry is above the head, so "up to min(up_to,
/// head)" is "up to up_to".
///
/// An ack alone does not wait for its commit to reach the disk (`synchronous_commit` off for
/// a batch of acks only): it deletes only messages the client already has, so an ack lost in
/// a database crash re-delivers them, and clients skip what they already have by seq
/// (docs/PROTOCOL.md, QueueAck). Any later durable commit flushes it too, as the log is
/// written in order.
async fn ack(
    store: &PgStore,
    client_num: u64,
    up_to_seq: u64,
) -> Result<Result<(), ServiceError>, StoreError> {
    let num = to_i64(client_num)?;
    let up_to = i64::try_from(up_to_seq).unwrap_or(i64::MAX);
    store.ack_batched(num, up_to).await
}

/// A peer's deliveries, in one transaction: recipients resolved in one statement, every
/// delivery enqueued (idempotently) by one [`enqueue_in_txn`].
async fn deliver(
    store: &PgStore,
    deliveries: Vec<Delivery>,
    max_depth: u64,
    now_ms: u64,
) -> Result<(DeliverResponse, Vec<(u64, Fresh)>), StoreError> {
    let mut response = DeliverResponse {
        accepted: 0,
        unknown_recipients: 0,
        queue_full: 0,
    };
    let mut client = store.client().await?;
    let txn = client.transaction().await?;
    let (mut users, mut devices) = (Vec::new(), Vec::new());
    for recipient in deliveries.iter().flat_map(|d| &d.recipients) {
        users.push(recipient.user.name.as_str());
        devices.push(recipient.device.as_str());
    }
    let rows = query(
        &txn,
        "SELECT c.user_name, c.device, c.client_num FROM clients AS c
         JOIN unnest($1::text[], $2::text[]) AS t(user_name, device)
           ON c.user_name = t.user_name AND c.device = t.device
         WHERE NOT c.revoked",
        [(&users, Type::TEXT_ARRAY), (&devices, Type::TEXT_ARRAY)],
    )
    .await?;
    let mut active: HashMap<(&str, &str), u64> = HashMap::with_capacity(rows.len());
    for row in &rows {
        active.insert((col(row, 0)?, col(row, 1)?), to_u64(col(row, 2)?)?);
    }
    // Per delivery with local recipients: its id, their numbers, its encoded payload.
    let mut resolved: Vec<(MessageId, Vec<u64>, Bytes)> = Vec::new();
    for delivery in &deliveries {
        let mut nums = Vec::with_capacity(delivery.recipients.len());
        for recipient in &delivery.recipients {
            let key = (recipient.user.name.as_str(), recipient.device.as_str());
            match active.get(&key) {
                Some(&num) => nums.push(num),
                None => response.unknown_recipients += 1,
            }
        }
        if nums.is_empty() {
            continue;
        }
        // The payload is encoded and stored once for all its recipients here.
        let bytes = delivery
            .payload
            .tls_serialize_detached()
            .map_err(|_| StoreError::Corrupt("payload encoding"))?;
        resolved.push((delivery.id, nums, Bytes::from(bytes)));
    }
    let batches: Vec<Batch<'_>> = resolved
        .iter()
        .map(|(id, nums, bytes)| Batch {
            recipients: nums,
            id: *id,
            timestamp_ms: now_ms,
            payload: bytes,
        })
        .collect();
    let (outcomes, woken_heads) = enqueue_in_txn(&txn, max_depth, &batches, true).await?;
    txn.commit().await?;
    store.announce(woken_heads);
    let mut woken = Vec::new();
    for ((id, nums, shared), outcomes) in resolved.iter().zip(outcomes) {
        for (num, outcome) in nums.iter().zip(outcomes) {
            match outcome {
                Enqueued::Queued(seq) => {
                    response.accepted += 1;
                    let fresh = Fresh {
                        seq,
                        id: *id,
                        timestamp_ms: now_ms,
                        payload: shared.clone(),
                    };
                    woken.push((*num, fresh));
                }
                Enqueued::Duplicate(_) => {}
                Enqueued::Full => response.queue_full += 1,
                // Removed since it was resolved (its head row went): as if unknown.
                Enqueued::Gone => response.unknown_recipients += 1,
            }
        }
    }
    Ok((response, woken))
}

/// Most expired queue entries (and, separately, dedup records) one sweep transaction takes:
/// a large backlog expires over several transactions, none holding many head rows.
const EXPIRE_BATCH: i64 = 2_000;

/// Drops messages older than `cutoff_ms` (reads skip them already) and dedup records as old,
/// in transactions of at most [`EXPIRE_BATCH`] each, every row found through the indexes by
/// time: the work is what expired, not what is stored. In each transaction the head rows of
/// the queues concerned are locked first, in ascending order, as every writer does.
async fn expire(store: &PgStore, cutoff_ms: u64) -> Result<u64, StoreError> {
    let cutoff = i64::try_from(cutoff_ms).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let (expired, more) = expire_batch(store, cutoff).await?;
        total += expired;
        if !more {
            break;
        }
    }
    loop {
        let client = store.client().await?;
        let dropped = client
            .execute_typed(
                "DELETE FROM queue_dedup WHERE (client_num, message_id) IN
                     (SELECT client_num, message_id FROM queue_dedup WHERE timestamp_ms < $1
                      LIMIT $2)",
                &[(&cutoff, Type::INT8), (&EXPIRE_BATCH, Type::INT8)],
            )
            .await?;
        if dropped < EXPIRE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// One transaction of [`expire`]'s entries: (entries dropped, whether the batch was full).
async fn expire_batch(store: &PgStore, cutoff: i64) -> Result<(u64, bool), StoreError> {
    let mut client = store.client().await?;
    let txn = client.transaction().await?;
    let doomed = query(
        &txn,
        "SELECT client_num, seq FROM queue_entries WHERE timestamp_ms < $1
         ORDER BY timestamp_ms LIMIT $2",
        [(&cutoff, Type::INT8), (&EXPIRE_BATCH, Type::INT8)],
    )
    .await?;
    if doomed.is_empty() {
        txn.rollback().await?;
        return Ok((0, false));
    }
    let full = doomed.len() as i64 >= EXPIRE_BATCH;
    let (mut nums, mut seqs) = (Vec::with_capacity(doomed.len()), Vec::new());
    for row in &doomed {
        nums.push(col::<i64>(row, 0)?);
        seqs.push(col::<i64>(row, 1)?);
    }
    let mut heads = nums.clone();
    heads.sort_unstable();
    heads.dedup();
    query(
        &txn,
        "SELECT client_num FROM queue_heads WHERE client_num = ANY($1)
         ORDER BY client_num FOR UPDATE",
        [(&heads, Type::INT8_ARRAY)],
    )
    .await?;
    // Read again under the head locks: an ack may have deleted some meanwhile.
    let deleted = query(
        &txn,
        "DELETE FROM queue_entries AS e USING unnest($1::bigint[], $2::bigint[]) AS t(c, s)
         WHERE e.client_num = t.c AND e.seq = t.s AND e.timestamp_ms < $3
         RETURNING e.client_num, e.payload_id",
        [
            (&nums, Type::INT8_ARRAY),
            (&seqs, Type::INT8_ARRAY),
            (&cutoff, Type::INT8),
        ],
    )
    .await?;
    release(&txn, &deleted, true).await?;
    txn.commit().await?;
    Ok((deleted.len() as u64, full))
}

impl QueueStore for PgStore {
    async fn enqueue(
        &self,
        recipient: &ClientId,
        id: MessageId,
        timestamp_ms: u64,
        payload: Vec<u8>,
        max_depth: u64,
    ) -> Result<(u64, Enqueued), ServiceError> {
        enqueue(self, recipient, id, timestamp_ms, &payload, max_depth).await?
    }

    async fn read_queue(
        &self,
        client_num: u64,
        after_seq: u64,
        max_messages: usize,
        max_bytes: usize,
        cutoff_ms: u64,
    ) -> Result<(Vec<QueueMessage>, u64), ServiceError> {
        Ok(read_messages(
            self,
            client_num,
            after_seq,
            max_messages,
            max_bytes,
            cutoff_ms,
        )
        .await?)
    }

    async fn ack(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError> {
        ack(self, client_num, up_to_seq).await?
    }

    async fn ack_lazily(&self, client_num: u64, up_to_seq: u64) -> Result<(), ServiceError> {
        // The batched ack (`ack_batched`) already rides in the fan-out batches and does not
        // wait for the disk.
        ack(self, client_num, up_to_seq).await?
    }

    async fn deliver(
        &self,
        deliveries: Vec<Delivery>,
        max_depth: u64,
        now_ms: u64,
    ) -> Result<(DeliverResponse, Vec<(u64, Fresh)>), ServiceError> {
        Ok(deliver(self, deliveries, max_depth, now_ms).await?)
    }

    async fn expire(&self, cutoff_ms: u64) -> Result<u64, ServiceError> {
        Ok(expire(self, cutoff_ms).await?)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use roost_interop::postgres::Cluster;
    use roost_protocol::messages::queue::GroupMessage;

    use super::*;
    use crate::bus::BusSink;
    use crate::queue::Notifier;
    use crate::storage::postgres::{Options, PgCloser};

    /// A throwaway cluster (stopped when dropped) and the URL of a database on it.
    pub(in crate::storage::postgres) fn database() -> (Cluster, String) {
        let cluster = Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("roost").unwrap();
        (cluster, url)
    }

    /// One node of the domain over `url`: its store, its closer and the notifier its bus
    /// wakes.
    pub(in crate::storage::postgres) async fn node(url: &str) -> (PgStore, PgCloser, Notifier) {
        let sink = BusSink {
            queues: Notifier::default(),
            revoked: Default::default(),
            nodes_gone: Default::default(),
        };
        let notifier = sink.queues.clone();
        let options = Options {
            url,
            pool_size: 8,
            timeout: Duration::from_secs(10),
            domain: "example.org",
            as_public_key: &[7; 32],
        };
        let (store, closer) = PgStore::connect(options, sink).await.unwrap();
        (store, closer, notifier)
    }

    /// An active client `name@example.org/phone` with an empty queue, made with SQL as the
    /// AuthStore's add_client makes it.
    pub(in crate::storage::postgres) async fn add_queue(
        store: &PgStore,
        name: &str,
    ) -> (ClientId, u64) {
        let client = store.client().await.unwrap();
        let row = client
            .query_one(
                "INSERT INTO clients (user_name, device, client_num, credential)
                 VALUES ($1, 'phone', nextval('client_num_seq'), '\\x00') RETURNING client_num",
                &[&name],
            )
            .await
            .unwrap();
        let num: i64 = row.get(0);
        client
            .execute(
                "INSERT INTO queue_heads (client_num, head, held) VALUES ($1, 0, 0)",
                &[&num],
            )
            .await
            .unwrap();
        let id = format!("{name}@example.org/phone").parse().unwrap();
        (id, to_u64(num).unwrap())
    }

    /// A single-number SQL answer.
    pub(in crate::storage::postgres) async fn count(store: &PgStore, sql: &str) -> i64 {
        let client = store.client().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub(in crate::storage::postgres) fn message(tag: u8, n: u8) -> QueuePayload {
        QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![tag, n].into(),
        })
    }

    fn encoded(tag: u8, n: u8) -> Vec<u8> {
        message(tag, n).tls_serialize_detached().unwrap()
    }

    fn seqs(messages: &[QueueMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queues_keep_their_guarantees() {
        let (_cluster, url) = database();
        let (store, closer, _) = node(&url).await;
        let (alice, num) = add_queue(&store, "alice").await;
        let (bob, bob_num) = add_queue(&store, "bob").await;

        // Unknown and removed clients have no queue to enqueue to.
        let nobody: ClientId = "nobody@example.org/phone".parse().unwrap();
        assert!(matches!(
            store
                .enqueue(&nobody, MessageId([1; 16]), 1, encoded(0, 1), 3)
                .await,
            Err(ServiceError::ClientNotFound)
        ));

        for n in 1..=3u8 {
            let got = store
                .enqueue(
                    &alice,
                    MessageId([n; 16]),
                    100 * u64::from(n),
                    encoded(0, n),
                    3,
                )
                .await
                .unwrap();
            assert_eq!(got, (num, Enqueued::Queued(u64::from(n))));
        }
        assert_eq!(
            store
                .enqueue(&alice, MessageId([2; 16]), 0, encoded(0, 2), 3)
                .await
                .unwrap()
                .1,
            Enqueued::Duplicate(2)
        );
        assert_eq!(
            store
                .enqueue(&alice, MessageId([4; 16]), 400, encoded(0, 4), 3)
                .await
                .unwrap()
                .1,
            Enqueued::Full
        );
        let (messages, head) = store.read_queue(num, 0, 10, 1 << 20, 0).await.unwrap();
        assert_eq!((seqs(&messages), head), (vec![1, 2, 3], 3));
        assert_eq!(messages[1].payload, message(0, 2));
        assert_eq!(messages[1].id, MessageId([2; 16]));
        assert_eq!(messages[1].timestamp_ms, 200);
        // Bounded by count, by the cut-off and (softly) by bytes: the first always goes.
        let one = encoded(0, 1).len();
        let page = |after, max, bytes, cutoff| store.read_queue(num, after, max, bytes, cutoff);
        assert_eq!(seqs(&page(1, 1, 1 << 20, 0).await.unwrap().0), [2]);
        assert_eq!(seqs(&page(0, 10, 1 << 20, 250).await.unwrap().0), [3]);
        assert_eq!(seqs(&page(0, 10, 1, 0).await.unwrap().0), [1]);
        assert_eq!(seqs(&page(0, 10, 2 * one, 0).await.unwrap().0), [1, 2]);
        assert_eq!(seqs(&page(0, 10, 2 * one - 1, 0).await.unwrap().0), [1]);
        assert_eq!(page(0, 0, 1 << 20, 0).await.unwrap(), (Vec::new(), 3));
        assert_eq!(page(3, 10, 1 << 20, 0).await.unwrap(), (Vec::new(), 3));
        assert_eq!(
            store
                .read_queue(num + 100, 0, 10, 1 << 20, 0)
                .await
                .unwrap(),
            (Vec::new(), 0)
        );

        // Ack deletes up to the head and frees room; acking past the head is harmless.
        store.ack(num, 1).await.unwrap();
        assert_eq!(seqs(&page(0, 10, 1 << 20, 0).await.unwrap().0), [2, 3]);
        assert_eq!(
            store
                .enqueue(&alice, MessageId([5; 16]), 500, encoded(0, 5), 3)
                .await
                .unwrap()
                .1,
            Enqueued::Queued(4)
        );
        assert_eq!(store.expire(250).await.unwrap(), 1);
        assert_eq!(seqs(&page(0, 10, 1 << 20, 0).await.unwrap().0), [3, 4]);
        // The dedup record of message 2 expired with it; message 3's is kept.
        assert_eq!(
            store
                .enqueue(&alice, MessageId([3; 16]), 600, encoded(0, 3), 3)
                .await
                .unwrap()
                .1,
            Enqueued::Duplicate(3)
        );
        store.ack(num, u64::MAX).await.unwrap();
        assert_eq!(page(0, 10, 1 << 20, 0).await.unwrap(), (Vec::new(), 4));
        assert_eq!(count(&store, "SELECT count(*) FROM payloads").await, 0);

        // Peer deliveries: one transaction, idempotent, unknown recipients counted, the
        // payload stored once for its recipients and freed when the last one acks.
        let delivery = |recipients: &[&ClientId], n: u8| Delivery {
            recipients: recipients.iter().map(|&r| r.clone()).collect(),
            id: MessageId([50 + n; 16]),
            timestamp_ms: 0,
            payload: message(1, n),
        };
        let (response, woken) = store
            .deliver(
                vec![
                    delivery(&[&alice, &nobody, &bob], 0),
                    delivery(&[&nobody], 1),
                    delivery(&[&bob, &bob], 2),
                ],
                10,
                700,
            )
            .await
            .unwrap();
        assert_eq!(
            (
                response.accepted,
                response.unknown_recipients,
                response.queue_full
            ),
            (3, 2, 0),
            "a recipient named twice is queued once"
        );
        let woken: Vec<(u64, u64)> = woken.iter().map(|(n, f)| (*n, f.seq)).collect();
        assert_eq!(woken, [(num, 5), (bob_num, 1), (bob_num, 2)]);
        let (response, woken) = store
            .deliver(vec![delivery(&[&alice, &bob], 0)], 10, 800)
            .await
            .unwrap();
        assert_eq!((response.accepted, woken.len()), (0, 0));
        assert_eq!(
            count(&store, "SELECT count(*) FROM payloads WHERE refs = 2").await,
            1
        );
        let (messages, _) = page(4, 10, 1 << 20, 0).await.unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].payload, message(1, 0));
        store.ack(num, 5).await.unwrap();
        assert_eq!(
            count(&store, "SELECT count(*) FROM payloads WHERE refs = 1").await,
            2
        );

        // A removed client's queue is gone: entries, payload references, head, dedup records.
        {
            let mut client = store.client().await.unwrap();
            let txn = client.transaction().await.unwrap();
            delete_queue(&txn, bob_num).await.unwrap();
            txn.execute(
                "UPDATE clients SET revoked = TRUE WHERE user_name = 'bob'",
                &[],
            )
            .await
            .unwrap();
            txn.commit().await.unwrap();
        }
        assert_eq!(count(&store, "SELECT count(*) FROM payloads").await, 0);
        assert_eq!(
            count(&store, "SELECT count(*) FROM queue_dedup WHERE client_num <> (SELECT client_num FROM clients WHERE user_name = 'alice')").await,
            0
        );
        assert_eq!(
            store.read_queue(bob_num, 0, 10, 1 << 20, 0).await.unwrap(),
            (Vec::new(), 0)
        );
        assert!(matches!(
            store.ack(bob_num, 10).await,
            Err(ServiceError::ClientNotFound)
        ));
        assert!(matches!(
            store
                .enqueue(&bob, MessageId([9; 16]), 1, encoded(0, 9), 3)
                .await,
            Err(ServiceError::ClientNotFound)
        ));
        let (response, _) = store
            .deliver(vec![delivery(&[&bob], 9)], 10, 900)
            .await
            .unwrap();
        assert_eq!((response.accepted, response.unknown_recipients), (0, 1));
        drop(store);
        closer.join();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_up_reaches_the_other_node() {
        let (_cluster, url) = database();
        let (a, closer_a, _) = node(&url).await;
        let (b, closer_b, heard_by_b) = node(&url).await;
        let (client, num) = add_queue(&a, "listener").await;
        let mut signal = heard_by_b.subscribe(num);
        // `connect` returns once its node listens: B hears what A announces from now on.
        let (_, outcome) = a
            .enqueue(&client, MessageId([1; 16]), 1, encoded(0, 1), 10)
            .await
            .unwrap();
        assert_eq!(outcome, Enqueued::Queued(1));
        tokio::time::timeout(
            Duration::from_secs(5),
            signal.wait_for(|s| s.head >= 1 && !s.closed),
        )
        .await
        .expect("node B heard of the entry node A wrote")
        .unwrap();
        // The head it heard is readable there.
        assert_eq!(
            seqs(&b.read_queue(num, 0, 10, 1 << 20, 0).await.unwrap().0),
            [1]
        );
        drop((a, b));
        closer_a.join();
        closer_b.join();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_delivery_sent_to_two_nodes_at_once_is_queued_once() {
        let (_cluster, url) = database();
        let (a, closer_a, _) = node(&url).await;
        let (b, closer_b, _) = node(&url).await;
        let mut clients = Vec::new();
        for i in 0..30 {
            clients.push(add_queue(&a, &format!("d{i}")).await.0);
        }
        for n in 0..10u8 {
            let delivery = Delivery {
                recipients: clients.clone(),
                id: MessageId([n; 16]),
                timestamp_ms: 0,
                payload: message(2, n),
            };
            let (on_a, on_b) = tokio::join!(
                tokio::spawn({
                    let (a, delivery) = (a.clone(), delivery.clone());
                    async move { a.deliver(vec![delivery], 100, 1).await.unwrap() }
                }),
                tokio::spawn({
                    let b = b.clone();
                    async move { b.deliver(vec![delivery], 100, 1).await.unwrap() }
                }),
            );
            let (on_a, on_b) = (on_a.unwrap(), on_b.unwrap());
            assert_eq!(on_a.0.accepted + on_b.0.accepted, 30, "message {n}");
            assert_eq!(on_a.1.len() + on_b.1.len(), 30);
        }
        for client in &clients {
            let num = a
                .enqueue(client, MessageId([0; 16]), 0, encoded(0, 0), 100)
                .await;
            let (num, outcome) = num.unwrap();
            assert_eq!(outcome, Enqueued::Duplicate(1));
            let (messages, head) = a.read_queue(num, 0, 100, usize::MAX, 0).await.unwrap();
            assert_eq!((seqs(&messages), head), ((1..=10).collect(), 10));
        }
        drop((a, b));
        closer_a.join();
        closer_b.join();
    }
}
