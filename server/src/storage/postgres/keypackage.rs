//! PostgreSQL implementation of the KeyPackage service's store.

use roost_protocol::{ClientId, UserId};

use super::PgStore;
use crate::error::ServiceError;
use crate::keypackage::KeyPackageStore;
use roost_protocol::messages::keypackage::ClaimedKeyPackage;

fn pending() -> ServiceError {
    ServiceError::Internal("postgres keypackage: in progress".into())
}

impl KeyPackageStore for PgStore {
    async fn add(
        &self,
        _client_num: u64,
        _ordinary: Vec<(u64, Vec<u8>)>,
        _last_resort: Option<(u64, Vec<u8>)>,
        _max_held: u64,
    ) -> Result<u64, ServiceError> {
        Err(pending())
    }
    async fn claim_one(
        &self,
        _target: &ClientId,
        _now: u64,
    ) -> Result<ClaimedKeyPackage, ServiceError> {
        Err(pending())
    }
    async fn claim_for_user(
        &self,
        _user: &UserId,
        _now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, ServiceError> {
        Err(pending())
    }
    async fn count(&self, _client_num: u64, _now: u64) -> Result<(u32, bool), ServiceError> {
        Err(pending())
    }
    async fn purge_expired(&self, _now: u64) -> Result<u64, ServiceError> {
        Err(pending())
    }
}
