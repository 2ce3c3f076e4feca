//! The durable federation outbox. The hub writes one entry per remote recipient in the same
//! transaction that accepts the message; a worker per destination domain sends them in order,
//! in batches, and deletes them only once the peer acknowledged them (the peer acknowledges
//! only what it stored durably, and deduplicates by message id, so a retry never delivers
//! twice). While a peer is unreachable, its worker retries with capped exponential backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::Domain;
use roost_protocol::messages::Response;
use roost_protocol::messages::federation::{DeliverRequest, Delivery};
use tls_codec::{DeserializeBytes, Serialize as _};
use tokio::sync::{Notify, mpsc};

use crate::State;
use crate::storage::tables::OUTBOX;
use crate::storage::{StoreError, next_counter};

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

/// Adds deliveries for `domain` inside `txn`.
pub(crate) fn add_in_txn(
    txn: &WriteTransaction,
    domain: &Domain,
    deliveries: &[Delivery],
) -> Result<(), StoreError> {
    let mut outbox = txn.open_table(OUTBOX)?;
    for delivery in deliveries {
        let seq = next_counter(txn, "next_outbox_seq")?;
        let bytes = delivery
            .tls_serialize_detached()
            .map_err(|_| StoreError::Corrupt("delivery encoding"))?;
        outbox.insert((domain.as_str(), seq), bytes.as_slice())?;
    }
    Ok(())
}

/// Starts the dispatcher: one worker per destination with pending entries, now and whenever
/// new entries are written.
pub(crate) fn start(state: Arc<State>, tracker: &tokio_util::task::TaskTracker) {
    let (sender, mut receiver) = mpsc::unbounded_channel::<Domain>();
    {
        let mut guard = match state.federation.outbox.wake.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Some(sender);
    }
    let tracker_inner = tracker.clone();
    tracker.spawn(async move {
        let mut workers: HashMap<Domain, Arc<Notify>> = HashMap::new();
        // Entries left from before a restart.
        match pending_domains(&state).await {
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

async fn pending_domains(state: &State) -> Result<Vec<Domain>, StoreError> {
    state
        .store
        .read(|txn| {
            let outbox = txn.open_table(OUTBOX)?;
            let mut domains: Vec<Domain> = Vec::new();
            for entry in outbox.iter()? {
                let (key, _) = entry?;
                if let Ok(domain) = key.value().0.parse::<Domain>()
                    && domains.last() != Some(&domain)
                {
                    domains.push(domain);
                }
            }
            domains.dedup();
            Ok(domains)
        })
        .await
}

async fn read_batch(
    state: &State,
    domain: &Domain,
    max: usize,
) -> Result<Vec<(u64, Delivery)>, StoreError> {
    let name = domain.as_str().to_owned();
    state
        .store
        .read(move |txn| {
            let outbox = txn.open_table(OUTBOX)?;
            let mut batch = Vec::new();
            for entry in outbox.range((name.as_str(), 0)..=(name.as_str(), u64::MAX))? {
                let (key, value) = entry?;
                match Delivery::tls_deserialize_bytes(value.value()) {
                    Ok((delivery, [])) => batch.push((key.value().1, delivery)),
                    _ => return Err(StoreError::Corrupt("outbox")),
                }
                if batch.len() >= max {
                    break;
                }
            }
            Ok(batch)
        })
        .await
}

async fn remove(state: &State, domain: &Domain, seqs: Vec<u64>) -> Result<(), StoreError> {
    let name = domain.as_str().to_owned();
    state
        .store
        .write(move |txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            for seq in seqs {
                outbox.remove((name.as_str(), seq))?;
            }
            Ok(Ok(()))
        })
        .await
}

async fn worker(state: Arc<State>, domain: Domain, notify: Arc<Notify>) {
    let config = &state.federation.config;
    let initial = Duration::from_millis(config.retry_initial_ms.max(1));
    let max_delay = Duration::from_millis(config.retry_max_ms.max(config.retry_initial_ms).max(1));
    let mut delay = initial;
    loop {
        let batch = match read_batch(&state, &domain, config.outbox_batch.max(1) as usize).await {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(%domain, %err, "cannot read the outbox");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = notify.notified() => continue,
            }
        }
        metrics::gauge!("roost_outbox_batch", "domain" => domain.to_string())
            .set(batch.len() as f64);
        let (seqs, deliveries): (Vec<u64>, Vec<Delivery>) = batch.into_iter().unzip();
        let count = deliveries.len();
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
            if let Err(err) = remove(&state, &domain, seqs).await {
                tracing::error!(%domain, %err, "cannot remove delivered entries");
            }
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

fn is_transient(code: roost_protocol::ErrorCode) -> bool {
    use roost_protocol::ErrorCode as C;
    matches!(
        code,
        C::INTERNAL | C::UNAVAILABLE | C::RATE_LIMITED | C::REQUEST_TIMEOUT
    )
}
