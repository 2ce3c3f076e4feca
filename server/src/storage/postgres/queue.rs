//! PostgreSQL implementation of the Queuing Service's store.

use roost_protocol::messages::federation::{DeliverResponse, Delivery};
use roost_protocol::messages::queue::QueueMessage;
use roost_protocol::{ClientId, MessageId};

use super::PgStore;
use crate::error::ServiceError;
use crate::queue::{Enqueued, Fresh, QueueStore};

fn pending() -> ServiceError {
    ServiceError::Internal("postgres queue: in progress".into())
}

impl QueueStore for PgStore {
    async fn enqueue(
        &self,
        _recipient: &ClientId,
        _id: MessageId,
        _timestamp_ms: u64,
        _payload: Vec<u8>,
        _max_depth: u64,
    ) -> Result<(u64, Enqueued), ServiceError> {
        Err(pending())
    }
    async fn read_queue(
        &self,
        _client_num: u64,
        _after_seq: u64,
        _max_messages: usize,
        _max_bytes: usize,
        _cutoff_ms: u64,
    ) -> Result<(Vec<QueueMessage>, u64), ServiceError> {
        Err(pending())
    }
    async fn ack(&self, _client_num: u64, _up_to_seq: u64) -> Result<(), ServiceError> {
        Err(pending())
    }
    async fn deliver(
        &self,
        _deliveries: Vec<Delivery>,
        _max_depth: u64,
        _now_ms: u64,
    ) -> Result<(DeliverResponse, Vec<(u64, Fresh)>), ServiceError> {
        Err(pending())
    }
    async fn expire(&self, _cutoff_ms: u64) -> Result<u64, ServiceError> {
        Err(pending())
    }
}
