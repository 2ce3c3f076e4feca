//! PostgreSQL implementation of the federation outbox's store.

use roost_protocol::Domain;
use roost_protocol::messages::federation::Delivery;

use super::PgStore;
use crate::error::ServiceError;
use crate::federation::outbox::OutboxStore;

fn pending() -> ServiceError {
    ServiceError::Internal("postgres outbox: in progress".into())
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
