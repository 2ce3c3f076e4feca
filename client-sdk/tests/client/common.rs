//! Shared helpers: an in-process homeserver on 127.0.0.1:0 and SDK clients with profiles in
//! temporary directories.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::time::Duration;

use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::signatures::Signer;
use openmls_traits::types::SignatureScheme;
use roost_client::transport::{ConnectConfig, Connection, Endpoint, TrustConfig};
use roost_client::{Client, ClientConfig, Event};
use roost_protocol::messages::auth::{
    AddClientRequest, AddClientTbs, LABEL_ADD_CLIENT, LABEL_REGISTER_USER, RegisterUserRequest,
    RegisterUserTbs, signing_input,
};
use roost_protocol::{ClientId, GroupId, UserId};
use roost_server::Server;
use roost_server::config::Config;

pub const DOMAIN: &str = "example.org";
/// How long a test waits for an event before failing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub server: Server,
    pub dir: tempfile::TempDir,
}

pub async fn start_server() -> TestServer {
    start_server_with(|_| {}).await
}

/// A server whose configuration `adjust` changed.
pub async fn start_server_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        domain: DOMAIN.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("server"),
        ..Config::default()
    };
    adjust(&mut config);
    let server = Server::start(config.validate().unwrap()).await.unwrap();
    TestServer { server, dir }
}

impl TestServer {
    pub fn connect_config(&self) -> ConnectConfig {
        let trust = TrustConfig::PinnedCertificates(vec![self.server.certificate().clone()]);
        ConnectConfig::new(self.server.local_addr(), DOMAIN, trust)
    }

    /// A small KeyPackage stock keeps the suite fast.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(self.connect_config());
        config.key_package_target = 3;
        config.key_package_low_water = 2;
        config
    }

    pub fn profile_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.redb"))
    }

    /// Registers `name@example.org` with device `phone`.
    pub async fn register(&self, name: &str) -> Client {
        self.register_with(name, self.client_config()).await
    }

    pub async fn register_with(&self, name: &str, config: ClientConfig) -> Client {
        Client::register(
            config,
            self.profile_path(&format!("{name}-phone")),
            user(name),
            "phone".parse().unwrap(),
        )
        .await
        .unwrap()
    }

    /// Registers alice and bob; alice creates a group and invites bob, who has joined it
    /// (both at epoch 1).
    pub async fn alice_and_bob_in_a_group(&self) -> (Client, Client, GroupId) {
        let alice = self.register("alice").await;
        let bob = self.register("bob").await;
        let group = alice.create_group().await.unwrap();
        alice.invite(&group, &[user("bob")]).await.unwrap();
        assert_eq!(wait_joined(&bob).await, group);
        (alice, bob, group)
    }

    /// Adds device `device` to the user of `existing`.
    pub async fn add_device(&self, existing: &Client, device: &str) -> Client {
        let key = existing.user_key().unwrap();
        let name = existing.user_id().name.as_str().to_owned();
        Client::add_device(
            self.client_config(),
            self.profile_path(&format!("{name}-{device}")),
            &key,
            device.parse().unwrap(),
        )
        .await
        .unwrap()
    }

    /// A raw connection (not authenticated).
    pub async fn raw_connection(&self) -> Connection {
        let endpoint = Endpoint::for_server(self.server.local_addr()).unwrap();
        endpoint.connect(&self.connect_config()).await.unwrap()
    }
}

/// Registers `name` with device `phone` through raw requests (keys made here, no SDK) and
/// returns a connection authenticated as that client, its id and its key.
pub async fn raw_client(t: &TestServer, name: &str) -> (Connection, ClientId, SignatureKeyPair) {
    let conn = t.raw_connection().await;
    let user_key = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    let key = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    let client = enroll(&conn, name, &user_key, &key).await;
    conn.authenticate(&client, |input| key.sign(input).unwrap())
        .await
        .unwrap();
    (conn, client, key)
}

/// Registers user `name` with `user_key` and adds its device `phone` with `client_key`, over
/// `conn` (raw requests); returns the device's id.
pub async fn enroll(
    conn: &Connection,
    name: &str,
    user_key: &SignatureKeyPair,
    client_key: &SignatureKeyPair,
) -> ClientId {
    let id = user(name);
    let tbs = RegisterUserTbs {
        user: id.clone(),
        user_key: user_key.public().into(),
    };
    conn.call(RegisterUserRequest {
        user: id.clone(),
        user_key: user_key.public().into(),
        registration_token: None,
        signature: user_key
            .sign(&signing_input(LABEL_REGISTER_USER, &tbs))
            .unwrap()
            .into(),
    })
    .await
    .unwrap();
    let client = ClientId::new(id, "phone".parse().unwrap());
    let tbs = AddClientTbs {
        client: client.clone(),
        client_key: client_key.public().into(),
    };
    conn.call(AddClientRequest {
        client: client.clone(),
        client_key: client_key.public().into(),
        user_signature: user_key
            .sign(&signing_input(LABEL_ADD_CLIENT, &tbs))
            .unwrap()
            .into(),
    })
    .await
    .unwrap();
    client
}

pub fn user(name: &str) -> UserId {
    format!("{name}@{DOMAIN}").parse().unwrap()
}

pub fn client_id(name: &str, device: &str) -> ClientId {
    format!("{name}@{DOMAIN}/{device}").parse().unwrap()
}

/// Waits for the first event that `matches` accepts (earlier ones are skipped) and returns
/// it; fails after [`EVENT_TIMEOUT`].
pub async fn wait_for(client: &Client, what: &str, matches: impl Fn(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("{}: no event {what} in time", client.client_id()))
            .unwrap();
        if matches(&event) {
            return event;
        }
    }
}

/// Waits for an application message in `group` and returns (sender, bytes).
pub async fn wait_message(client: &Client, group: &GroupId) -> (ClientId, Vec<u8>) {
    let event = wait_for(
        client,
        "message",
        |e| matches!(e, Event::Message { group: g, .. } if g == group),
    )
    .await;
    match event {
        Event::Message { sender, bytes, .. } => (sender, bytes),
        _ => unreachable!(),
    }
}

/// Waits until `client` has joined `group` (or any group when `None`) and returns it.
pub async fn wait_joined(client: &Client) -> GroupId {
    match wait_for(client, "joined", |e| matches!(e, Event::Joined { .. })).await {
        Event::Joined { group, .. } => group,
        _ => unreachable!(),
    }
}

/// Sorted member list.
pub async fn members(client: &Client, group: &GroupId) -> Vec<ClientId> {
    let mut members = client.members(group).await.unwrap();
    members.sort();
    members
}

pub fn sorted(mut ids: Vec<ClientId>) -> Vec<ClientId> {
    ids.sort();
    ids
}
