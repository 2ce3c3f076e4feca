//! PostgreSQL implementation of the Delivery Service's store.

use super::PgStore;
use crate::delivery::{FanOut, FanOutResult, GroupState, GroupStore, GroupWrite};
use crate::error::ServiceError;

fn pending() -> ServiceError {
    ServiceError::Internal("postgres groups: in progress".into())
}

impl GroupStore for PgStore {
    async fn load_group(&self, _key: Vec<u8>) -> Result<Option<GroupState>, ServiceError> {
        Err(pending())
    }
    async fn group_version(&self, _key: Vec<u8>) -> Result<Option<u64>, ServiceError> {
        Err(pending())
    }
    async fn create_group(&self, _state: GroupState) -> Result<(), ServiceError> {
        Err(pending())
    }
    async fn apply(
        &self,
        _group: GroupWrite,
        _fan_outs: Vec<FanOut>,
        _max_depth: u64,
    ) -> Result<FanOutResult, ServiceError> {
        Err(pending())
    }
}
