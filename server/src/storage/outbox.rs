//! redb implementation of the federation outbox: entries keyed by (destination domain, seq).

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::Domain;
use roost_protocol::messages::federation::Delivery;
use tls_codec::{DeserializeBytes, Serialize as _};

use super::tables::OUTBOX;
use super::{Store, StoreError, next_counter};
use crate::error::ServiceError;
use crate::federation::outbox::OutboxStore;

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

impl OutboxStore for Store {
    async fn pending_domains(&self) -> Result<Vec<Domain>, ServiceError> {
        self.read(|txn| {
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
            Ok::<_, StoreError>(domains)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn outbox_batch(
        &self,
        domain: &Domain,
        max: usize,
    ) -> Result<Vec<(u64, Delivery)>, ServiceError> {
        let name = domain.as_str().to_owned();
        self.read(move |txn| {
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
            Ok::<_, StoreError>(batch)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn outbox_remove(&self, domain: &Domain, seqs: Vec<u64>) -> Result<(), ServiceError> {
        let name = domain.as_str().to_owned();
        self.write(move |txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            for seq in seqs {
                outbox.remove((name.as_str(), seq))?;
            }
            Ok(Ok(()))
        })
        .await
    }
}
