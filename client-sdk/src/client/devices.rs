//! The user's own devices: listing them (DiscoverUser of the own user: the current
//! credentials of every current client) and removing one (RemoveClient, signed with the user
//! key, which only devices that hold it can do).

use roost_protocol::messages::auth::{
    ClientCredential, DiscoverUserRequest, LABEL_REMOVE_CLIENT, RemoveClientRequest,
    RemoveClientTbs, signing_input,
};
use roost_protocol::{ClientId, DeviceName};

use super::Client;
use crate::error::ClientError;
use crate::mls;

impl Client {
    /// The current devices of this user (this one included), in device-name order, each with
    /// its current AS credential.
    pub async fn devices(&self) -> Result<Vec<ClientCredential>, ClientError> {
        let user = self.user_id().clone();
        let response = self.inner.conn.call(DiscoverUserRequest { user }).await?;
        Ok(response.clients)
    }

    /// Removes one of this user's devices: the server revokes it (its connections are cut
    /// off), deletes its queue and KeyPackages, and never accepts its name again. The groups
    /// it is in still list it until a member removes it with a commit. Needs the user key
    /// ([`ClientError::NoUserKey`] otherwise). Removing this very device leaves the profile
    /// unusable: the server refuses it from then on.
    pub async fn remove_device(&self, device: &DeviceName) -> Result<(), ClientError> {
        let stored = self
            .inner
            .profile
            .user_key
            .clone()
            .ok_or(ClientError::NoUserKey)?;
        let client = ClientId::new(self.user_id().clone(), device.clone());
        let tbs = RemoveClientTbs {
            client: client.clone(),
        };
        let signature =
            mls::sign_with(stored.as_slice(), &signing_input(LABEL_REMOVE_CLIENT, &tbs))?;
        self.inner
            .conn
            .call(RemoveClientRequest {
                client,
                user_signature: signature.into(),
            })
            .await?;
        Ok(())
    }
}
