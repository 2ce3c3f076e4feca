//! Message fan-outs and acks written in batches: a fan-out that leaves its group's state alone
//! (an application message, the bulk of the traffic) and a queue ack are handed to this
//! node's batch worker, which writes everything waiting at that moment in one transaction, so
//! one commit (one WAL flush) and a few statements serve many messages. This is the embedded
//! engine's group commit, per node: PostgreSQL's own grouping of concurrent commits (measured
//! on 2 cores: about 2,000 single-row commits/s however many clients) left send-1to1 at 0.07
//! of redb's rate, and per-message statements cost more CPU than the rest of the server.
//! One worker: jobs pile up while a batch commits, which is what makes the next one large
//! (four workers took the jobs one by one: 1,200 msgs/s against 1,600 with one).
//!
//! Each fan-out keeps its own guarantees inside the shared transaction: its group row is
//! locked `FOR SHARE` and its version checked (a fan-out whose group moved on is refused,
//! GROUP_MOVED, and writes nothing; the others go on); its queue entries and outbox entries
//! commit with the rest or not at all; its caller is answered only after the commit. Group
//! rows are locked before queue rows and both in ascending order, as every other writer
//! does (every head row the batch touches, acks' and fan-outs', in one pass). An ack of a
//! removed client's queue is refused (CLIENT_NOT_FOUND). Acks come before the fan-outs, so a
//! queue's depth counts what was acked. A batch of acks only commits without waiting for the
//! disk (see `queue`'s ack); a batch with a fan-out is durable, acks included. A storage
//! failure fails every job of the batch (nothing of it was written).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::types::Type;

use super::groups::{Prepared, prepare, receipt_answer, results};
use super::queue::{Batch, col, enqueue_in_txn, exec, query};
use super::{PgStore, to_i64};
use crate::delivery::{FanOut, FanOutResult, GroupWrite};
use crate::error::ServiceError;
use crate::storage::StoreError;

/// Workers per node: batch transactions of this node in flight at once.
const WORKERS: usize = 1;
/// Most jobs in one transaction.
const MAX_JOBS: usize = 512;

type Reply = Result<Result<FanOutResult, ServiceError>, StoreError>;
type AckReply = Result<Result<(), ServiceError>, StoreError>;

/// One job waiting for the worker.
pub(super) enum Job {
    /// A fan-out that leaves its group's state alone.
    FanOut {
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
        reply: oneshot::Sender<Reply>,
    },
    /// A queue ack.
    Ack {
        client_num: i64,
        up_to: i64,
        reply: oneshot::Sender<AckReply>,
    },
}

/// What a batch did for each job, in order.
enum Outcome {
    FanOut(Result<FanOutResult, ServiceError>),
    Ack(Result<(), ServiceError>),
    /// Nothing written: the job's group has pending fan-outs (a commit's, see `groups`),
    /// which are queued first; the job goes into the next batch.
    Deferred,
}

/// Where a node's fan-outs wait.
pub(super) type Jobs = mpsc::UnboundedSender<Job>;

/// Starts the workers; they end when aborted.
pub(super) fn start(
    store: &PgStore,
    jobs: mpsc::UnboundedReceiver<Job>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let jobs = Arc::new(Mutex::new(jobs));
    (0..WORKERS)
        .map(|_| tokio::spawn(work(store.clone(), jobs.clone())))
        .collect()
}

async fn work(store: PgStore, jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    // Jobs deferred by the last batch: they go first into the next.
    let mut carried: Vec<Job> = Vec::new();
    loop {
        // Take every job waiting now (one worker at a time takes).
        let batch = {
            let mut jobs = jobs.lock().await;
            let mut batch = std::mem::take(&mut carried);
            if batch.is_empty() {
                let Some(first) = jobs.recv().await else {
                    return;
                };
                batch.push(first);
            }
            while batch.len() < MAX_JOBS {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        match write(&store, &batch).await {
            Ok(outcomes) => {
                let mut waiting: Vec<Vec<u8>> = Vec::new();
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    match (job, outcome) {
                        (job @ Job::FanOut { .. }, Outcome::Deferred) => {
                            if let Job::FanOut { group, .. } = &job
                                && !waiting.contains(&group.key)
                            {
                                waiting.push(group.key.clone());
                            }
                            carried.push(job);
                        }
                        (Job::FanOut { reply, .. }, Outcome::FanOut(outcome)) => {
                            let _ = reply.send(Ok(outcome));
                        }
                        (Job::Ack { reply, .. }, Outcome::Ack(outcome)) => {
                            let _ = reply.send(Ok(outcome));
                        }
                        // `write` answers each job in kind; a mismatch drops the reply
                        // sender, so its caller sees UNAVAILABLE rather than a wrong answer.
                        _ => {}
                    }
                }
                for key in waiting {
                    if let Err(err) = super::groups::queue_pending(&store, Some(&key)).await {
                        // The carried jobs of that group would wait for it again: fail them.
                        tracing::warn!(%err, "cannot queue a group's pending fan-outs");
                        let (failed, kept) = std::mem::take(&mut carried).into_iter().partition(
                            |job| matches!(job, Job::FanOut { group, .. } if group.key == key),
                        );
                        carried = kept;
                        for job in failed {
                            if let Job::FanOut { reply, .. } = job {
                                let _ = reply.send(Err(err.clone()));
                            }
                        }
                    }
                }
            }
            Err(err) => {
                for job in batch {
                    match job {
                        Job::FanOut { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Job::Ack { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
            }
        }
    }
}

impl PgStore {
    /// Writes a fan-out that leaves its group's state alone, with the others waiting.
    pub(super) async fn fan_out_batched(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Reply {
        let answer = self.fan_out_submit(group, fan_outs, max_depth)?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    /// Hands a fan-out to the worker; the receiver gets its outcome after its batch
    /// committed. Jobs are taken in the order they were handed over.
    pub(super) fn fan_out_submit(
        &self,
        group: GroupWrite,
        fan_outs: Vec<FanOut>,
        max_depth: u64,
    ) -> Result<oneshot::Receiver<Reply>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::FanOut {
            group,
            fan_outs,
            max_depth,
            reply,
        };
        if self.fan_outs.send(job).is_err() {
            return Err(StoreError::Unavailable);
        }
        Ok(answer)
    }

    /// Acknowledges a queue up to a seq, with the other jobs waiting.
    pub(super) async fn ack_batched(&self, client_num: i64, up_to: i64) -> AckReply {
        let (reply, answer) = oneshot::channel();
        let job = Job::Ack {
            client_num,
            up_to,
            reply,
        };
        if self.fan_outs.send(job).is_err() {
            return Err(StoreError::Unavailable);
        }
        answer.await.map_err(|_| StoreError::Unavailable)?
    }
}

/// One transaction for `jobs`; their outcomes in order.
async fn write(store: &PgStore, jobs: &[Job]) -> Result<Vec<Outcome>, StoreError> {
    let mut keys: Vec<&[u8]> = Vec::new();
    let (mut ack_nums, mut ack_up_tos) = (Vec::new(), Vec::new());
    for job in jobs {
        match job {
            Job::FanOut { group, .. } => keys.push(group.key.as_slice()),
            Job::Ack {
                client_num, up_to, ..
            } => {
                ack_nums.push(*client_num);
                ack_up_tos.push(*up_to);
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    // Every head row the batch may touch (acks' and every fan-out's recipients), locked in one
    // ascending pass after the group rows: no deadlock with other batches or commits.
    let mut heads: Vec<i64> = ack_nums.clone();
    for job in jobs {
        if let Job::FanOut { fan_outs, .. } = job {
            for fan_out in fan_outs {
                for &num in &fan_out.local {
                    heads.push(to_i64(num)?);
                }
            }
        }
    }
    heads.sort_unstable();
    heads.dedup();
    let mut client = store.client().await?;
    let txn = client.transaction().await?;
    // Sent together (pipelined), run in this order.
    let (_, groups, waiting, _, acked) = tokio::try_join!(
        biased;
        async {
            if keys.is_empty() {
                // Only acks: see `queue`'s ack for why they need not wait for the disk.
                exec(&txn, "SET LOCAL synchronous_commit TO OFF", []).await
            } else {
                Ok(0)
            }
        },
        async {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            query(
                &txn,
                "SELECT key, version FROM groups WHERE key = ANY($1) ORDER BY key FOR SHARE",
                [(&keys, Type::BYTEA_ARRAY)],
            )
            .await
        },
        async {
            // After the group rows are locked: a commit that wrote a pending record held its
            // group's row, so every record of these groups committed before is seen.
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            query(
                &txn,
                "SELECT DISTINCT group_key FROM fanout_pending WHERE group_key = ANY($1)",
                [(&keys, Type::BYTEA_ARRAY)],
            )
            .await
        },
        async {
            if heads.is_empty() {
                return Ok(Vec::new());
            }
            query(
                &txn,
                "SELECT client_num FROM queue_heads WHERE client_num = ANY($1)
                 ORDER BY client_num FOR UPDATE",
                [(&heads, Type::INT8_ARRAY)],
            )
            .await
        },
        async {
            if ack_nums.is_empty() {
                return Ok(Vec::new());
            }
            query(
                &txn,
                "SELECT roost_ack($1, $2)",
                [
                    (&ack_nums, Type::INT8_ARRAY),
                    (&ack_up_tos, Type::INT8_ARRAY),
                ],
            )
            .await
        },
    )?;
    let mut versions: HashMap<Vec<u8>, i64> = HashMap::with_capacity(groups.len());
    for row in &groups {
        versions.insert(col(row, 0)?, col(row, 1)?);
    }
    let mut deferred: HashSet<Vec<u8>> = HashSet::with_capacity(waiting.len());
    for row in &waiting {
        deferred.insert(col(row, 0)?);
    }
    let mut gone = std::collections::HashSet::new();
    for row in &acked {
        gone.insert(col::<i64>(row, 0)?);
    }
    // Prepared fan-outs of the jobs that go ahead (their group did not move on).
    let mut prepared: Vec<Option<Vec<Prepared<'_>>>> = Vec::with_capacity(jobs.len());
    for job in jobs {
        prepared.push(match job {
            Job::FanOut {
                group, fan_outs, ..
            } if i64::try_from(group.loaded).ok() == versions.get(&group.key).copied()
                && !deferred.contains(&group.key) =>
            {
                Some(fan_outs.iter().map(prepare).collect::<Result<_, _>>()?)
            }
            _ => None,
        });
    }
    // Receipts of the jobs that go ahead: a job whose request was applied already (by an
    // earlier batch, another node, or an earlier job of this batch) is refused like a moved
    // group and writes nothing; it runs again and finds the receipt.
    let mut claiming: Vec<(usize, &crate::delivery::receipt::Receipt)> = Vec::new();
    let mut seen = HashSet::new();
    for (i, (job, prepared)) in jobs.iter().zip(prepared.iter_mut()).enumerate() {
        if let (Job::FanOut { group, .. }, Some(_)) = (job, &prepared)
            && let Some(receipt) = &group.receipt
        {
            if seen.insert(receipt.key) {
                claiming.push((i, receipt));
            } else {
                *prepared = None;
            }
        }
    }
    let receipts: Vec<_> = claiming.iter().map(|(_, r)| *r).collect();
    let claimed = super::receipts::claim(&txn, &receipts).await?;
    for (i, receipt) in &claiming {
        if !claimed.contains(receipt.key.as_slice())
            && let Some(slot) = prepared.get_mut(*i)
        {
            *slot = None;
        }
    }
    let mut batches = Vec::new();
    let mut max_depth = u64::MAX;
    for (job, prepared) in jobs.iter().zip(&prepared) {
        let (
            Job::FanOut {
                fan_outs,
                max_depth: depth,
                ..
            },
            Some(prepared),
        ) = (job, prepared)
        else {
            continue;
        };
        // Every job of a node comes with the node's configured depth; the smallest holds.
        max_depth = max_depth.min(*depth);
        for (fan_out, p) in fan_outs.iter().zip(prepared) {
            batches.push(Batch {
                recipients: &p.local,
                id: p.id,
                timestamp_ms: p.timestamp_ms,
                payload: &p.payload,
            });
            for (domain, clients) in &fan_out.remote {
                super::outbox::add_in_txn(
                    &txn,
                    domain,
                    clients,
                    p.id,
                    p.timestamp_ms,
                    &fan_out.payload,
                )
                .await?;
            }
        }
    }
    let (outcomes, woken) = if batches.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        enqueue_in_txn(&txn, max_depth, &batches, false).await?
    };
    let mut outcomes = outcomes.into_iter();
    let mut out = Vec::with_capacity(jobs.len());
    let mut answers = Vec::new();
    for (job, prepared) in jobs.iter().zip(&prepared) {
        out.push(match (job, prepared) {
            (
                Job::FanOut {
                    fan_outs, group, ..
                },
                Some(prepared),
            ) => {
                let mine: Vec<_> = outcomes.by_ref().take(fan_outs.len()).collect();
                let result = results(fan_outs, prepared, mine);
                if let Some(receipt) = &group.receipt {
                    answers.push((receipt, receipt_answer(receipt, &result)));
                }
                Outcome::FanOut(Ok(result))
            }
            (Job::FanOut { group, .. }, None) if deferred.contains(&group.key) => Outcome::Deferred,
            (Job::FanOut { .. }, None) => Outcome::FanOut(Err(ServiceError::GroupMoved)),
            (Job::Ack { client_num, .. }, _) => Outcome::Ack(if gone.contains(client_num) {
                Err(ServiceError::ClientNotFound)
            } else {
                Ok(())
            }),
        });
    }
    super::receipts::set_answers(&txn, &answers).await?;
    txn.commit().await?;
    store.announce(woken);
    Ok(out)
}
