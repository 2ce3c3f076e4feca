//! The durable federation outbox. The hub writes one entry per message and destination domain
//! (naming up to 1,024 of its recipients, the payload once) in the same transaction that
//! accepts the message; a worker per destination domain sends them in order,
//! in batches, and deletes them only once the peer acknowledged them (the peer acknowledges
//! only what it stored durably, and deduplicates by message id, so a retry never delivers
//! twice). While a peer is unreachable, its worker retries with capped exponential backoff.
//!
//! With several nodes over one database, every node runs workers, and the store lets one node
//! at a time drain a destination (a lease: `outbox_batch` is empty for the others, whose
//! workers then idle). A node hears only of the entries it wrote itself, so every node also
//! rescans the pending destinations every `federation.outbox_rescan_ms` (one seek per
//! destination, cheap on any engine), and at once when the bus says another node stopped:
//! that is how entries of a node that stopped, or whose lease ran out, are sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_protocol::Domain;
use roost_protocol::messages::Response;
use roost_protocol::messages::federation::{DeliverRequest, Delivery};
use tls_codec::Size as _;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use crate::State;
use crate::error::ServiceError;

/// Most recipients named by one outbox entry (one `Delivery`): bounds the size of an entry
/// and of the batch it travels in. The same for every storage engine.
pub(crate) const MAX_RECIPIENTS_PER_DELIVERY: usize = 1024;

/// Wakes the per-domain workers.
#[derive(Default)]
pub(crate) struct Outbox {
    wake: Mutex<Option<mpsc::UnboundedSender<Domain>>>,
}

impl Outbox {
    /// Tells the worker of each domain that entries are waiting (starting it if needed).
    pub(crate) fn wake(&self, domains: impl IntoIterator<Item = Domain>) {
        let guard = match self.wake.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(sender) = guard.as_ref() {
            for domain in domains {
                let _ = sender.send(domain);
            }
        }
    }
}

/// What the outbox needs from storage (implemented by every engine in `storage`; entries are
/// added by the Delivery Service's fan-out transaction).
pub(crate) trait OutboxStore {
    /// Domains with pending entries.
    async fn pending_domains(&self) -> Result<Vec<Domain>, ServiceError>;
    /// The oldest entries for `domain`, in order, with their seqs: at most `max`, and at most
    /// `max_bytes` of encoded deliveries unless the first alone is larger. Empty as well when
    /// another node of the domain drains `domain` now (an engine shared by several nodes
    /// grants each destination to one node at a time; the embedded engine always to this one).
    async fn outbox_batch(
        &self,
        domain: &Domain,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Delivery)>, ServiceError>;
    /// Deletes delivered entries.
    async fn outbox_remove(&self, domain: &Domain, seqs: Vec<u64>) -> Result<(), ServiceError>;
}

/// Starts the dispatcher: one worker per destination with pending entries, now and whenever
/// new entries are written, and (with a database shared by several nodes) on every rescan.
pub(crate) fn start(state: Arc<State>, tracker: &tokio_util::task::TaskTracker) {
    let (sender, mut receiver) = mpsc::unbounded_channel::<Domain>();
    {
        let mut guard = match state.federation.outbox.wake.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Some(sender);
    }
    let period = Duration::from_millis(state.federation.config.outbox_rescan_ms.max(1));
    tracker.spawn(rescan(state.clone(), period));
    let tracker_inner = tracker.clone();
    tracker.spawn(async move {
        let mut workers: HashMap<Domain, Arc<Notify>> = HashMap::new();
        // Entries left from before a restart.
        match state.store.pending_domains().await {
            Ok(domains) => state.federation.outbox.wake(domains),
            Err(err) => tracing::error!(%err, "cannot read the outbox"),
        }
        loop {
            let domain = tokio::select! {
                _ = state.shutdown.cancelled() => return,
                domain = receiver.recv() => match domain {
                    Some(domain) => domain,
                    None => return,
                },
            };
            let notify = workers.entry(domain.clone()).or_insert_with(|| {
                let notify = Arc::new(Notify::new());
                tracker_inner.spawn(worker(state.clone(), domain.clone(), notify.clone()));
                notify
            });
            notify.notify_one();
        }
    });
}

/// Wakes the worker of every destination with pending entries, every `period` and when the
/// bus says another node stopped: entries written by other nodes, and those a stopped node
/// held the lease of.
async fn rescan(state: Arc<State>, period: Duration) {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
            _ = state.nodes_gone.notified() => {}
        }
        match state.store.pending_domains().await {
            Ok(domains) => state.federation.outbox.wake(domains),
            Err(err) => tracing::warn!(%err, "cannot rescan the outbox"),
        }
    }
}

async fn worker(state: Arc<State>, domain: Domain, notify: Arc<Notify>) {
    let config = &state.federation.config;
    let initial = Duration::from_millis(config.retry_initial_ms.max(1));
    let max_delay = Duration::from_millis(config.retry_max_ms.max(config.retry_initial_ms).max(1));
    let mut delay = initial;
    let mut removing = Removing::default();
    loop {
        removing.reap();
        let read = match state
            .store
            .outbox_batch(
                &domain,
                (config.outbox_batch.max(1) as usize).saturating_add(removing.seqs.len()),
                (config.outbox_batch_bytes as usize).saturating_add(removing.bytes),
            )
            .await
        {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(%domain, %err, "cannot read the outbox");
                Vec::new()
            }
        };
        let was_empty = read.is_empty();
        let batch: Vec<_> = read
            .into_iter()
            .filter(|(seq, _)| !removing.seqs.contains_key(seq))
            .collect();
        if batch.is_empty() && !was_empty {
            // Only entries delivered already, whose removal is not committed yet: wait for it.
            removing.wait_one().await;
            continue;
        }
        if batch.is_empty() {
            // Nothing to send, or another node sends it: wait for new entries or a rescan.
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = notify.notified() => continue,
            }
        }
        metrics::gauge!("roost_outbox_batch", "domain" => domain.to_string())
            .set(batch.len() as f64);
        // Entries older than the message age limit would be expired by the receiver anyway:
        // drop them instead of holding a long outage's backlog forever.
        let cutoff = crate::queue::cutoff_ms(&state);
        let (stale, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(_, d)| d.timestamp_ms < cutoff);
        if !stale.is_empty() {
            let count: usize = stale.iter().map(|(_, d)| d.recipients.len()).sum();
            tracing::warn!(%domain, count, "dropping outbox entries older than the message age limit");
            metrics::counter!("roost_federation_expired_total").increment(count as u64);
            if let Err(err) = state
                .store
                .outbox_remove(&domain, stale.into_iter().map(|(seq, _)| seq).collect())
                .await
            {
                tracing::error!(%domain, %err, "cannot remove expired outbox entries");
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max_delay);
                continue;
            }
            if batch.is_empty() {
                continue;
            }
        }
        let sizes: Vec<usize> = batch.iter().map(|(_, d)| d.tls_serialized_len()).collect();
        let (seqs, deliveries): (Vec<u64>, Vec<Delivery>) = batch.into_iter().unzip();
        let count: usize = deliveries.iter().map(|d| d.recipients.len()).sum();
        let outcome = state
            .federation
            .deliver(&domain, DeliverRequest { deliveries })
            .await;
        let done = match outcome {
            Ok(Response::Deliver(result)) => {
                tracing::debug!(%domain, count, accepted = result.accepted, "delivered");
                metrics::counter!("roost_federation_delivered_total").increment(count as u64);
                true
            }
            Ok(Response::Error(err)) if err.code.0 < 500 && !is_transient(err.code) => {
                // The peer refuses these deliveries for good: keeping them would block every
                // later message to that domain.
                tracing::error!(%domain, count, %err, "peer refused deliveries; dropping them");
                metrics::counter!("roost_federation_dropped_total").increment(count as u64);
                true
            }
            Ok(other) => {
                tracing::warn!(%domain, response = ?other, "unexpected answer to Deliver");
                false
            }
            Err(err) => {
                tracing::debug!(%domain, %err, "peer unreachable; will retry");
                false
            }
        };
        if done {
            // The next batch goes out while the removal commits: the peer stored these
            // durably and deduplicates by message id, so a removal lost in a crash only sends
            // them again. Until it committed, the reads of this worker skip them.
            removing.start(&state, &domain, seqs, &sizes);
            delay = initial;
        } else {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(max_delay);
        }
    }
}

/// Delivered entries of one destination whose removal from the store has not committed yet.
#[derive(Default)]
struct Removing {
    /// Their seqs and encoded sizes.
    seqs: HashMap<u64, usize>,
    /// The sum of those sizes.
    bytes: usize,
    tasks: JoinSet<(Vec<u64>, Result<(), ServiceError>)>,
}

impl Removing {
    /// Removes delivered entries in a task of their own.
    fn start(&mut self, state: &Arc<State>, domain: &Domain, seqs: Vec<u64>, sizes: &[usize]) {
        let (state, domain, taken) = (state.clone(), domain.clone(), seqs.clone());
        self.run(seqs, sizes, async move {
            state.store.outbox_remove(&domain, taken).await
        });
    }

    /// Skips `seqs` until `removal` finished.
    fn run(
        &mut self,
        seqs: Vec<u64>,
        sizes: &[usize],
        removal: impl Future<Output = Result<(), ServiceError>> + Send + 'static,
    ) {
        for (seq, size) in seqs.iter().zip(sizes) {
            self.seqs.insert(*seq, *size);
            self.bytes = self.bytes.saturating_add(*size);
        }
        self.tasks.spawn(async move { (seqs, removal.await) });
    }

    /// Forgets the entries of every finished removal.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            self.finished(done);
        }
    }

    /// Waits for one removal to finish (if any runs) and forgets its entries.
    async fn wait_one(&mut self) {
        match self.tasks.join_next().await {
            Some(done) => self.finished(done),
            None => {
                self.seqs.clear();
                self.bytes = 0;
            }
        }
    }

    fn finished(
        &mut self,
        done: Result<(Vec<u64>, Result<(), ServiceError>), tokio::task::JoinError>,
    ) {
        let seqs = match done {
            Ok((seqs, Ok(()))) => seqs,
            // Left in the store: the entries are read and sent again (the peer deduplicates).
            Ok((seqs, Err(err))) => {
                tracing::error!(%err, "cannot remove delivered entries");
                seqs
            }
            Err(_) => {
                // Not known which: send them all again rather than skip any.
                self.seqs.clear();
                self.bytes = 0;
                return;
            }
        };
        for seq in seqs {
            if let Some(size) = self.seqs.remove(&seq) {
                self.bytes = self.bytes.saturating_sub(size);
            }
        }
    }
}

fn is_transient(code: roost_protocol::ErrorCode) -> bool {
    use roost_protocol::ErrorCode as C;
    matches!(
        code,
        C::INTERNAL | C::UNAVAILABLE | C::RATE_LIMITED | C::REQUEST_TIMEOUT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivered_entries_are_skipped_until_their_removal_finished() {
        let mut removing = Removing::default();
        let (done, finish) = tokio::sync::oneshot::channel::<()>();
        removing.run(vec![1, 2], &[10, 20], async move {
            let _ = finish.await;
            Ok(())
        });
        removing.reap();
        assert_eq!(removing.seqs.len(), 2);
        assert_eq!(removing.bytes, 30);
        let _ = done.send(());
        removing.wait_one().await;
        assert!(removing.seqs.is_empty());
        assert_eq!(removing.bytes, 0);

        // A removal that failed leaves the entries in the store: they are read (and sent)
        // again rather than skipped for ever.
        removing.run(vec![3], &[5], async { Err(ServiceError::Unavailable) });
        removing.run(vec![4], &[6], std::future::pending());
        removing.wait_one().await;
        assert_eq!(removing.seqs.keys().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(removing.bytes, 6);
    }
}
