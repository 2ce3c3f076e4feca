//! redb implementation of push registrations and the push outbox: the registration (sealed)
//! and its last wake-up time by client number; pending wake-ups by client number (at most
//! one each: that is the coalescing) and by due time, for taking the due ones in order.
//! One node per domain: a claim's lease only matters to the PostgreSQL engine, but is kept
//! the same here (a job claimed and not finished is due again after its lease).

use redb::{ReadableTable, WriteTransaction};

use super::tables::{
    PUSH_DUE, PUSH_JOBS, PUSH_NOTED, PUSH_REGISTRATIONS, QUEUE_ENTRIES, QUEUE_HEADS,
};
use super::{Store, StoreError};
use crate::error::ServiceError;
use crate::push::{PushJob, PushStore};

/// Deletes a client's registration and pending wake-up (client removed, or unregistered);
/// whether there was a registration.
pub(super) fn delete(txn: &WriteTransaction, client_num: u64) -> Result<bool, StoreError> {
    let existed = txn
        .open_table(PUSH_REGISTRATIONS)?
        .remove(client_num)?
        .is_some();
    unschedule(txn, client_num)?;
    txn.open_table(PUSH_NOTED)?.remove(client_num)?;
    Ok(existed)
}

fn unschedule(txn: &WriteTransaction, client_num: u64) -> Result<(), StoreError> {
    let old = txn
        .open_table(PUSH_JOBS)?
        .remove(client_num)?
        .map(|v| v.value());
    if let Some((due, _, _)) = old {
        txn.open_table(PUSH_DUE)?.remove((due, client_num))?;
    }
    Ok(())
}

fn set_job(
    txn: &WriteTransaction,
    client_num: u64,
    due_ms: u64,
    attempts: u32,
    again: bool,
) -> Result<(), StoreError> {
    unschedule(txn, client_num)?;
    txn.open_table(PUSH_JOBS)?
        .insert(client_num, (due_ms, attempts, again))?;
    txn.open_table(PUSH_DUE)?.insert((due_ms, client_num), ())?;
    Ok(())
}

/// Whether the client's queue holds an entry enqueued after `after_ms` and at or before
/// `until_ms`. Entries are in enqueue order: reads from the newest back to the first one at or
/// before `until_ms`.
fn entry_between(
    entries: &impl ReadableTable<(u64, u64), (u64, u64, [u8; 16])>,
    client_num: u64,
    after_ms: u64,
    until_ms: u64,
) -> Result<bool, StoreError> {
    for entry in entries
        .range((client_num, 0)..=(client_num, u64::MAX))?
        .rev()
    {
        let (_, timestamp, _) = entry?.1.value();
        if timestamp <= until_ms {
            return Ok(timestamp > after_ms);
        }
    }
    Ok(false)
}

impl PushStore for Store {
    async fn put_push(&self, client_num: u64, sealed: Vec<u8>) -> Result<(), ServiceError> {
        self.write(move |txn| {
            // A queue exists exactly while the client is active.
            if txn.open_table(QUEUE_HEADS)?.get(client_num)?.is_none() {
                return Ok(Err(ServiceError::ClientNotFound));
            }
            let mut table = txn.open_table(PUSH_REGISTRATIONS)?;
            let last_sent = table.get(client_num)?.map_or(0, |v| v.value().0);
            table.insert(client_num, (last_sent, sealed.as_slice()))?;
            Ok(Ok(()))
        })
        .await
    }

    async fn delete_push(&self, client_num: u64) -> Result<bool, ServiceError> {
        self.write(move |txn| Ok(Ok::<_, ServiceError>(delete(txn, client_num)?)))
            .await
    }

    async fn schedule_push(
        &self,
        client_nums: Vec<u64>,
        due_ms: u64,
        coalesce_ms: u64,
    ) -> Result<u64, ServiceError> {
        self.write(move |txn| {
            let mut scheduled = 0;
            for client_num in client_nums {
                let last_sent = match txn.open_table(PUSH_REGISTRATIONS)?.get(client_num)? {
                    Some(v) => v.value().0,
                    None => continue,
                };
                let pending = txn
                    .open_table(PUSH_JOBS)?
                    .get(client_num)?
                    .map(|v| v.value());
                txn.open_table(PUSH_NOTED)?.insert(client_num, due_ms)?;
                if let Some((due, attempts, _)) = pending {
                    txn.open_table(PUSH_JOBS)?
                        .insert(client_num, (due, attempts, true))?;
                    continue;
                }
                let due = if last_sent == 0 {
                    due_ms
                } else {
                    due_ms.max(last_sent.saturating_add(coalesce_ms))
                };
                set_job(txn, client_num, due, 0, false)?;
                scheduled += 1;
            }
            Ok(Ok::<_, ServiceError>(scheduled))
        })
        .await
    }

    async fn recover_push(
        &self,
        cutoff_ms: u64,
        due_ms: u64,
        coalesce_ms: u64,
    ) -> Result<u64, ServiceError> {
        // The pass over every registration reads (the writer is not held); the few clients
        // it finds are checked again and scheduled in one write.
        let candidates = self
            .read(move |txn| {
                let noted = match txn.open_table(PUSH_NOTED) {
                    Ok(table) => Some(table),
                    Err(redb::TableError::TableDoesNotExist(_)) => None,
                    Err(err) => return Err(StoreError::from(err)),
                };
                let jobs = txn.open_table(PUSH_JOBS)?;
                let entries = txn.open_table(QUEUE_ENTRIES)?;
                let mut found = Vec::new();
                for registration in txn.open_table(PUSH_REGISTRATIONS)?.iter()? {
                    let (num, value) = registration?;
                    let (client_num, last_sent) = (num.value(), value.value().0);
                    let covered = match &noted {
                        Some(table) => table.get(client_num)?.map(|v| v.value()),
                        None => None,
                    };
                    if jobs.get(client_num)?.is_none()
                        && entry_between(
                            &entries,
                            client_num,
                            covered.unwrap_or(last_sent),
                            cutoff_ms,
                        )?
                    {
                        found.push(client_num);
                    }
                }
                Ok(found)
            })
            .await
            .map_err(ServiceError::from)?;
        if candidates.is_empty() {
            return Ok(0);
        }
        self.write(move |txn| {
            let mut scheduled = 0;
            for client_num in candidates {
                let Some(last_sent) = txn
                    .open_table(PUSH_REGISTRATIONS)?
                    .get(client_num)?
                    .map(|v| v.value().0)
                else {
                    continue;
                };
                if txn.open_table(PUSH_JOBS)?.get(client_num)?.is_some() {
                    continue;
                }
                let covered = txn
                    .open_table(PUSH_NOTED)?
                    .get(client_num)?
                    .map_or(last_sent, |v| v.value());
                let entries = txn.open_table(QUEUE_ENTRIES)?;
                if !entry_between(&entries, client_num, covered, cutoff_ms)? {
                    continue;
                }
                drop(entries);
                let due = if last_sent == 0 {
                    due_ms
                } else {
                    due_ms.max(last_sent.saturating_add(coalesce_ms))
                };
                txn.open_table(PUSH_NOTED)?.insert(client_num, due_ms)?;
                set_job(txn, client_num, due, 0, false)?;
                scheduled += 1;
            }
            Ok(Ok::<_, ServiceError>(scheduled))
        })
        .await
    }

    async fn claim_push(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: u32,
    ) -> Result<Vec<PushJob>, ServiceError> {
        self.write(move |txn| {
            let due: Vec<(u64, u64)> = {
                let table = txn.open_table(PUSH_DUE)?;
                table
                    .range(..=(now_ms, u64::MAX))?
                    .take(limit as usize)
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()?
            };
            let mut jobs = Vec::with_capacity(due.len());
            for (_, client_num) in due {
                let attempts = txn
                    .open_table(PUSH_JOBS)?
                    .get(client_num)?
                    .map_or(0, |v| v.value().1);
                set_job(txn, client_num, lease_until_ms, attempts, false)?;
                let sealed = txn
                    .open_table(PUSH_REGISTRATIONS)?
                    .get(client_num)?
                    .map(|v| v.value().1.to_vec());
                jobs.push(PushJob {
                    client_num,
                    attempts,
                    sealed,
                });
            }
            Ok(Ok::<_, ServiceError>(jobs))
        })
        .await
    }

    async fn finish_push(
        &self,
        client_num: u64,
        sent_ms: Option<u64>,
        again_ms: u64,
    ) -> Result<(), ServiceError> {
        self.write(move |txn| {
            let again = txn
                .open_table(PUSH_JOBS)?
                .get(client_num)?
                .is_some_and(|v| v.value().2);
            if again {
                set_job(txn, client_num, again_ms, 0, false)?;
            } else {
                unschedule(txn, client_num)?;
            }
            if let Some(sent) = sent_ms {
                let mut table = txn.open_table(PUSH_REGISTRATIONS)?;
                let sealed = table.get(client_num)?.map(|v| v.value().1.to_vec());
                if let Some(sealed) = sealed {
                    table.insert(client_num, (sent, sealed.as_slice()))?;
                }
            }
            Ok(Ok::<_, ServiceError>(()))
        })
        .await
    }

    async fn retry_push(
        &self,
        client_num: u64,
        due_ms: u64,
        attempts: u32,
    ) -> Result<(), ServiceError> {
        self.write(move |txn| {
            if txn
                .open_table(PUSH_REGISTRATIONS)?
                .get(client_num)?
                .is_some()
            {
                let again = txn
                    .open_table(PUSH_JOBS)?
                    .get(client_num)?
                    .is_some_and(|v| v.value().2);
                set_job(txn, client_num, due_ms, attempts, again)?;
            } else {
                unschedule(txn, client_num)?;
            }
            Ok(Ok::<_, ServiceError>(()))
        })
        .await
    }

    async fn next_push_due(&self) -> Result<Option<u64>, ServiceError> {
        self.read(move |txn| {
            let table = txn.open_table(PUSH_DUE)?;
            let first = table.first()?.map(|(k, _)| k.value().0);
            Ok::<_, StoreError>(first)
        })
        .await
        .map_err(ServiceError::from)
    }
}
