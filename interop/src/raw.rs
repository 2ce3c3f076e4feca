//! Connections below the SDK's `Client`, for scenarios that need requests it does not make:
//! an authenticated client connection of a user made here (Ed25519 keys from ring), e.g. to
//! ask for user discovery, and a federation connection presenting a chosen certificate, to
//! play a peer homeserver (honest or not).

use std::net::SocketAddr;

use anyhow::Context as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use roost_client::transport::{ClientIdentity, ConnectConfig, Connection, Endpoint, TrustConfig};
use roost_protocol::messages::Response;
use roost_protocol::messages::auth::{
    AddClientRequest, AddClientTbs, ClientCredential, LABEL_ADD_CLIENT, LABEL_REGISTER_USER,
    RegisterUserRequest, RegisterUserTbs, signing_input,
};
use roost_protocol::{ClientId, ErrorCode, UserId};

/// A user with one device, registered through raw requests, and a connection authenticated
/// as that device.
pub struct RawClient {
    /// The connection (authenticated).
    pub conn: Connection,
    /// The device.
    pub id: ClientId,
    /// The AS credential the server issued.
    pub credential: ClientCredential,
    endpoint: Endpoint,
}

impl std::fmt::Debug for RawClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn new_key() -> anyhow::Result<Ed25519KeyPair> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("cannot load the generated Ed25519 key"))
}

impl RawClient {
    /// Registers `user` with device `phone` on the server `connect` describes and
    /// authenticates a connection as that device.
    pub async fn register(connect: &ConnectConfig, user: &str) -> anyhow::Result<Self> {
        let user: UserId = user
            .parse()
            .with_context(|| format!("bad user id {user}"))?;
        let endpoint = Endpoint::for_servers(&connect.server_addrs)?;
        let conn = endpoint.connect(connect).await?;
        let user_key = new_key()?;
        let user_public = user_key.public_key().as_ref().to_vec();
        let tbs = RegisterUserTbs {
            user: user.clone(),
            user_key: user_public.clone().into(),
        };
        let signature = user_key.sign(&signing_input(LABEL_REGISTER_USER, &tbs));
        conn.call(RegisterUserRequest {
            user: user.clone(),
            user_key: user_public.into(),
            registration_token: None,
            signature: signature.as_ref().to_vec().into(),
        })
        .await
        .with_context(|| format!("registering {user}"))?;
        let id = ClientId::new(user, "phone".parse()?);
        let client_key = new_key()?;
        let client_public = client_key.public_key().as_ref().to_vec();
        let tbs = AddClientTbs {
            client: id.clone(),
            client_key: client_public.clone().into(),
        };
        let user_signature = user_key.sign(&signing_input(LABEL_ADD_CLIENT, &tbs));
        let added = conn
            .call(AddClientRequest {
                client: id.clone(),
                client_key: client_public.into(),
                user_signature: user_signature.as_ref().to_vec().into(),
            })
            .await
            .with_context(|| format!("adding {id}"))?;
        conn.authenticate(&id, |input| client_key.sign(input).as_ref().to_vec())
            .await
            .with_context(|| format!("authenticating {id}"))?;
        Ok(Self {
            conn,
            id,
            credential: added.credential,
            endpoint,
        })
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close();
        self.endpoint.close();
    }
}

/// A federation connection (ALPN `roost-fed/1`) to the server at `addr` serving
/// `server_domain`, presenting `identity` as this side's certificate and trusting the server
/// through `trust`. The caller keeps the endpoint alive as long as the connection is used.
pub async fn peer_connection(
    addr: SocketAddr,
    server_domain: &str,
    trust: TrustConfig,
    identity: ClientIdentity,
) -> anyhow::Result<(Endpoint, Connection)> {
    let endpoint = Endpoint::for_server(addr)?;
    let config = ConnectConfig::federation(addr, server_domain, trust, identity);
    let conn = endpoint
        .connect(&config)
        .await
        .with_context(|| format!("federation connection to {server_domain}"))?;
    Ok((endpoint, conn))
}

/// The error code of a response, if it is an error.
pub fn error_code(response: &Response) -> Option<ErrorCode> {
    match response {
        Response::Error(err) => Some(err.code),
        _ => None,
    }
}

/// A code's name for messages (`FORBIDDEN`, or the number).
pub fn code_name(code: Option<ErrorCode>) -> String {
    match code {
        Some(code) => code
            .name()
            .map_or_else(|| format!("error {}", code.0), str::to_owned),
        None => "success".into(),
    }
}
