//! PostgreSQL implementation of the Authentication Service's store.

use roost_protocol::messages::auth::ClientCredential;
use roost_protocol::{ClientId, UserId, UserName};

use super::PgStore;
use crate::auth::{AuthStore, ClientRecord};
use crate::error::ServiceError;

fn pending() -> ServiceError {
    ServiceError::Internal("postgres auth: in progress".into())
}

impl AuthStore for PgStore {
    async fn create_user(
        &self,
        _name: &UserName,
        _user_key: Vec<u8>,
        _token: Option<(String, u64)>,
    ) -> Result<(), ServiceError> {
        Err(pending())
    }
    async fn user_key(&self, _name: &UserName) -> Result<Option<Vec<u8>>, ServiceError> {
        Err(pending())
    }
    async fn add_client(&self, _credential: ClientCredential) -> Result<u64, ServiceError> {
        Err(pending())
    }
    async fn remove_client(&self, _client: &ClientId) -> Result<u64, ServiceError> {
        Err(pending())
    }
    async fn active_client(
        &self,
        _client: &ClientId,
    ) -> Result<Option<ClientRecord>, ServiceError> {
        Err(pending())
    }
    async fn active_clients_of(&self, _user: &UserId) -> Result<Vec<ClientRecord>, ServiceError> {
        Err(pending())
    }
    async fn client_nums(&self, _clients: Vec<ClientId>) -> Result<Vec<Option<u64>>, ServiceError> {
        Err(pending())
    }
    async fn replace_credential(&self, _credential: ClientCredential) -> Result<(), ServiceError> {
        Err(pending())
    }
}
