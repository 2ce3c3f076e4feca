//! PostgreSQL implementation of the federation outbox's store.

use roost_protocol::Domain;
use roost_protocol::messages::federation::Delivery;

use super::PgStore;
use crate::error::ServiceError;
use crate::federation::outbox::OutboxStore;

fn pending() -> ServiceError {
    ServiceError::Internal("postgres outbox: in progress".into())
}

/// Adds one message for `clients` (all of `domain`) inside `txn`: one entry per 1,024
/// recipients, each holding the payload once (as the embedded engine's outbox).
pub(crate) async fn add_in_txn(
    txn: &tokio_postgres::Transaction<'_>,
    domain: &Domain,
    clients: &[roost_protocol::ClientId],
    id: roost_protocol::MessageId,
    timestamp_ms: u64,
    payload: &roost_protocol::messages::queue::QueuePayload,
) -> Result<(), crate::storage::StoreError> {
    use tls_codec::Serialize as _;
    use tokio_postgres::types::Type;
    /// Most recipients named by one entry (one `Delivery`).
    const MAX_RECIPIENTS_PER_DELIVERY: usize = 1024;
    for chunk in clients.chunks(MAX_RECIPIENTS_PER_DELIVERY) {
        let delivery = Delivery {
            recipients: chunk.to_vec(),
            id,
            timestamp_ms,
            payload: payload.clone(),
        };
        let bytes = delivery
            .tls_serialize_detached()
            .map_err(|_| crate::storage::StoreError::Corrupt("delivery encoding"))?;
        txn.execute_typed(
            "INSERT INTO outbox (domain, seq, delivery) VALUES ($1, nextval('outbox_seq'), $2)",
            &[(&domain.as_str(), Type::TEXT), (&bytes, Type::BYTEA)],
        )
        .await?;
    }
    Ok(())
}

impl OutboxStore for PgStore {
    async fn pending_domains(&self) -> Result<Vec<Domain>, ServiceError> {
        Err(pending())
    }
    async fn outbox_batch(
        &self,
        _domain: &Domain,
        _max: usize,
        _max_bytes: usize,
    ) -> Result<Vec<(u64, Delivery)>, ServiceError> {
        Err(pending())
    }
    async fn outbox_remove(&self, _domain: &Domain, _seqs: Vec<u64>) -> Result<(), ServiceError> {
        Err(pending())
    }
}
