//! The high-level [`Client`]: one device of one user, its profile database, its connection to
//! the homeserver and its groups.
//!
//! Every operation that touches MLS state takes the client's state lock, so operations and
//! the processing of incoming messages never interleave; the store's openmls overlay is empty
//! whenever the lock is free. Submodules: `groups` (group operations and the commit retry),
//! `inbox` (queue processing and the background listener), `keypackages` (replenishment).

mod devices;
mod files;
mod groups;
mod inbox;
mod keypackages;
mod outbox;
pub(crate) mod push;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use files::{CHUNK_LEN, DownloadTarget, FileSource, ciphertext_len, guess_media_type};
use roost_protocol::messages::auth::{
    AddClientRequest, AddClientTbs, ClientCredential, LABEL_ADD_CLIENT, LABEL_REGISTER_USER,
    RegisterUserRequest, RegisterUserTbs, signing_input,
};
use roost_protocol::{ClientId, DeviceName, GroupId, Opaque, UserId};
use tls_codec::{DeserializeBytes, Serialize as _, TlsDeserializeBytes, TlsSerialize, TlsSize};
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::config::ClientConfig;
use crate::credential::Verifier;
use crate::error::ClientError;
use crate::event::Event;
use crate::mls::{self, Identity, Mls};
use crate::store::{Changes, Profile, Store, StoreError};
use crate::transport::{Endpoint, ReconnectingConnection};

/// A user's signing key, which authorises adding devices. Secret: move it between a user's
/// devices only over a channel the user trusts.
#[derive(Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct UserKey {
    user: UserId,
    stored: Opaque,
}

impl std::fmt::Debug for UserKey {
    // Not derived: never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserKey")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl UserKey {
    /// The user this key belongs to.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The key as bytes, to move it to another device.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.tls_serialize_detached().unwrap_or_default()
    }

    /// The key from [`UserKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ClientError> {
        let key = Self::tls_deserialize_exact_bytes(bytes)
            .map_err(|_| ClientError::Mls("not a user key".into()))?;
        mls::public_key_of(key.stored.as_slice())?;
        Ok(key)
    }
}

/// One device of a user: registered with the homeserver, with its own MLS state.
///
/// Dropping the client stops its background listener; [`Client::close`] also waits for it
/// and closes the connection, so the profile can be reopened at once.
#[derive(Debug)]
pub struct Client {
    inner: Arc<Inner>,
    listener: Option<JoinHandle<()>>,
    /// The task delivering the outgoing queue.
    sender: Option<JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        for task in [&self.listener, &self.sender].into_iter().flatten() {
            task.abort();
        }
    }
}

/// The shared state of a client (the background listener holds a weak reference).
#[derive(Debug)]
pub(crate) struct Inner {
    config: ClientConfig,
    endpoint: Endpoint,
    conn: ReconnectingConnection,
    identity: Arc<Identity>,
    profile: Profile,
    store: Arc<Store>,
    /// The state lock: MLS operations and message processing.
    state: Mutex<Mls>,
    verifier: Verifier,
    events_ready: Notify,
    /// Id of the last event handed to the app.
    event_cursor: Mutex<u64>,
    /// Highest seq acknowledged to the server.
    acked: AtomicU64,
    /// Serialises KeyPackage top-ups (count, then upload), so two never both top up.
    key_package_lock: Mutex<()>,
    /// Test hook: stop right after the DS accepted a commit, before merging it (as if the app
    /// were killed there); see [`Client::simulate_crash_after_commit`].
    crash_after_commit: std::sync::atomic::AtomicBool,
    /// Test hook: stop right after a commit was made durable as pending, before it is sent;
    /// see [`Client::simulate_crash_before_commit_sent`].
    crash_before_send: std::sync::atomic::AtomicBool,
    /// Wakes the task that delivers the outgoing queue.
    outbox_ready: Arc<Notify>,
    /// Test hook: answers of the outgoing queue's requests to throw away; see
    /// [`Client::simulate_lost_answers`].
    lose_answers: std::sync::atomic::AtomicU32,
    /// Groups of another domain's hub found behind the hub's epoch with nothing left to
    /// process: the epoch they were at, and since when ([`ClientConfig::rejoin_after`]).
    behind: std::sync::Mutex<std::collections::HashMap<GroupId, (u64, std::time::Instant)>>,
}

/// Opens the profile database at `path`: [`ClientError::ProfileInUse`] if another client holds
/// it.
fn open_store(path: &Path) -> Result<Store, ClientError> {
    Store::open(path).map_err(|err| match err {
        StoreError::InUse => ClientError::ProfileInUse(path.to_owned()),
        err => err.into(),
    })
}

impl Client {
    /// Registers `user` on the homeserver with its first device, `device`, and creates the
    /// profile database at `path` (which must not hold one).
    pub async fn register(
        config: ClientConfig,
        path: impl AsRef<Path>,
        user: UserId,
        device: DeviceName,
    ) -> Result<Client, ClientError> {
        let (user_key, user_public) = mls::generate_key()?;
        let key = UserKey {
            user,
            stored: user_key.into(),
        };
        Self::enroll(config, path.as_ref(), key, Some(user_public), device).await
    }

    /// Adds `device` to the existing user of `user_key` and creates its profile database at
    /// `path`. The new device keeps a copy of the user key.
    pub async fn add_device(
        config: ClientConfig,
        path: impl AsRef<Path>,
        user_key: &UserKey,
        device: DeviceName,
    ) -> Result<Client, ClientError> {
        Self::enroll(config, path.as_ref(), user_key.clone(), None, device).await
    }

    /// Opens the profile at `path` and continues where it left off.
    pub async fn open(config: ClientConfig, path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let store = open_store(path)?;
        let profile = store
            .profile()?
            .ok_or_else(|| ClientError::NoProfile(path.to_owned()))?;
        let client = Self::start(config, store, profile)?;
        // A commit sent before the app stopped: merge it if the DS accepted it.
        {
            let mls = client.inner.state.lock().await;
            if let Err(err) = client.inner.settle_all_pending(&mls).await {
                tracing::warn!(%err, "cannot settle a pending commit now");
            }
        }
        if let Err(err) = client.inner.ensure_key_packages().await {
            tracing::warn!(%err, "cannot check KeyPackages now");
        }
        Ok(client)
    }

    /// Registration (`register_with = Some(user public key)`) or device addition.
    async fn enroll(
        config: ClientConfig,
        path: &Path,
        user_key: UserKey,
        register_with: Option<Vec<u8>>,
        device: DeviceName,
    ) -> Result<Client, ClientError> {
        let user = user_key.user.clone();
        if user.domain.as_str() != config.connect.server_name {
            return Err(ClientError::WrongDomain {
                user,
                server: config.connect.server_name.clone(),
            });
        }
        let store = open_store(path)?;
        if store.profile()?.is_some() {
            return Err(ClientError::ProfileExists(path.to_owned()));
        }
        let endpoint = Endpoint::for_servers(&config.connect.server_addrs)?;
        let conn = endpoint.connect(&config.connect).await?;
        let user_stored = user_key.stored.as_slice();
        if let Some(user_public) = register_with {
            let tbs = RegisterUserTbs {
                user: user.clone(),
                user_key: user_public.clone().into(),
            };
            let signature = mls::sign_with(user_stored, &signing_input(LABEL_REGISTER_USER, &tbs))?;
            conn.call(RegisterUserRequest {
                user: user.clone(),
                user_key: user_public.into(),
                registration_token: config
                    .registration_token
                    .as_ref()
                    .map(|t| Opaque::from(t.as_bytes())),
                signature: signature.into(),
            })
            .await?;
        }
        let client = ClientId::new(user, device);
        let (client_key, client_public) = mls::generate_key()?;
        let tbs = AddClientTbs {
            client: client.clone(),
            client_key: client_public.clone().into(),
        };
        let user_signature = mls::sign_with(user_stored, &signing_input(LABEL_ADD_CLIENT, &tbs))?;
        let added = conn
            .call(AddClientRequest {
                client: client.clone(),
                client_key: client_public.into(),
                user_signature: user_signature.into(),
            })
            .await?;
        conn.close();
        let profile = Profile {
            client,
            client_key: client_key.into(),
            user_key: Some(user_key.stored),
            credential: added.credential,
        };
        store.commit(Changes {
            profile: Some(profile.clone()),
            ..Changes::default()
        })?;
        let client = Self::start(config, store, profile)?;
        client.inner.ensure_key_packages().await?;
        Ok(client)
    }

    fn start(config: ClientConfig, store: Store, profile: Profile) -> Result<Client, ClientError> {
        let identity = Arc::new(Identity::new(
            profile.client.clone(),
            profile.client_key.as_slice(),
        )?);
        let endpoint = Endpoint::for_servers(&config.connect.server_addrs)?;
        let hook_identity = identity.clone();
        let conn = ReconnectingConnection::new(endpoint.clone(), config.connect.clone())
            .with_max_attempts(config.connect_attempts)
            .with_on_connect(move |connection| {
                let identity = hook_identity.clone();
                async move {
                    connection
                        .authenticate(&identity.client, |input| identity.sign(input))
                        .await
                        .map(|_| ())
                }
            });
        let store = Arc::new(store);
        let inner = Arc::new(Inner {
            verifier: Verifier::new(
                profile.client.clone(),
                identity.public_key().to_vec(),
                config.clock_skew,
                config.clock.clone(),
            ),
            state: Mutex::new(Mls::new(store.clone())),
            store,
            identity,
            profile,
            conn,
            endpoint,
            events_ready: Notify::new(),
            event_cursor: Mutex::new(0),
            acked: AtomicU64::new(0),
            key_package_lock: Mutex::new(()),
            crash_after_commit: std::sync::atomic::AtomicBool::new(false),
            crash_before_send: std::sync::atomic::AtomicBool::new(false),
            outbox_ready: Arc::new(Notify::new()),
            lose_answers: std::sync::atomic::AtomicU32::new(0),
            behind: Default::default(),
            config,
        });
        let listener = inner
            .config
            .listen
            .then(|| tokio::spawn(inbox::listen_loop(Arc::downgrade(&inner))));
        let sender = Some(tokio::spawn(outbox::outbox_loop(Arc::downgrade(&inner))));
        Ok(Client {
            inner,
            listener,
            sender,
        })
    }

    /// This device's ClientId.
    pub fn client_id(&self) -> &ClientId {
        &self.inner.profile.client
    }

    /// The user this device belongs to.
    pub fn user_id(&self) -> &UserId {
        &self.inner.profile.client.user
    }

    /// The AS credential issued to this device at enrollment.
    pub fn credential(&self) -> &ClientCredential {
        &self.inner.profile.credential
    }

    /// The user key, if this device holds it (to enroll another device with
    /// [`Client::add_device`]).
    pub fn user_key(&self) -> Option<UserKey> {
        self.inner.profile.user_key.clone().map(|stored| UserKey {
            user: self.inner.profile.client.user.clone(),
            stored,
        })
    }

    /// The events as a stream: each item is what [`Client::next_event`] returns, with the same
    /// at-least-once rule (an event is deleted when the next one is asked for). The stream
    /// never ends; one [`ClientError`] item does not end it either.
    ///
    /// ```no_run
    /// # async fn demo(client: roost_client::Client) {
    /// use futures_util::StreamExt as _;
    /// let mut events = std::pin::pin!(client.events());
    /// while let Some(event) = events.next().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> impl futures_core::Stream<Item = Result<Event, ClientError>> + '_ {
        futures_util::stream::unfold(self, |client| async move {
            Some((client.next_event().await, client))
        })
    }

    /// The next event. Events are stored durably with the state change that produced them;
    /// an event is deleted when the app asks for the next one, so after a crash the app
    /// receives again the event it was handling (at-least-once delivery). Waits until there
    /// is one.
    pub async fn next_event(&self) -> Result<Event, ClientError> {
        let inner = &self.inner;
        let mut cursor = inner.event_cursor.lock().await;
        if *cursor > 0 {
            inner.store.delete_events_up_to(*cursor)?;
        }
        loop {
            let notified = inner.events_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((id, event)) = inner.store.next_event(*cursor)? {
                *cursor = id;
                return Ok(event);
            }
            notified.await;
        }
    }

    /// The groups this client is a member of.
    pub fn groups(&self) -> Result<Vec<GroupId>, ClientError> {
        Ok(self
            .inner
            .store
            .groups()?
            .into_iter()
            .map(|(group, _)| group)
            .collect())
    }

    /// The members of `group`, in leaf order.
    pub async fn members(&self, group: &GroupId) -> Result<Vec<ClientId>, ClientError> {
        let mls = self.inner.state.lock().await;
        self.inner.check_member(&mls, group)?;
        Ok(mls
            .members(group)?
            .into_iter()
            .filter_map(|leaf| leaf.client)
            .collect())
    }

    /// The epoch of `group` as this client knows it: one more with every commit it processed
    /// (or made). Two members at the same epoch see the same membership; a message goes to the
    /// members of the epoch it was sent in (a member added later cannot read it), so an app
    /// that must reach a member it just saw added waits until its own epoch is at least the
    /// one of that add.
    pub async fn epoch(&self, group: &GroupId) -> Result<u64, ClientError> {
        let mls = self.inner.state.lock().await;
        self.inner.check_member(&mls, group)?;
        Ok(mls.epoch(group)?)
    }

    /// Fetches and processes every queued message now (the background listener does this
    /// continuously when [`ClientConfig::listen`] is set), then delivers the outgoing queue,
    /// as the background sender does. Fails if the queue cannot be fetched; a message that
    /// cannot be delivered now stays queued without failing the call (the background sender
    /// keeps trying; [`Client::flush`] reports why it waits).
    pub async fn sync(&self) -> Result<(), ClientError> {
        let outcome = {
            let mls = self.inner.state.lock().await;
            self.inner.sync_locked(&mls).await?
        };
        self.inner.ack().await;
        self.inner.follow_up(outcome).await;
        if let Err(err) = self.inner.deliver_queued().await {
            tracing::debug!(%err, "outgoing queue waits");
        }
        Ok(())
    }

    /// Uploads KeyPackages if fewer than [`ClientConfig::key_package_low_water`] are left or
    /// the last-resort one is missing. Done automatically on enrollment, on every (re)connect
    /// of the listener and after joining a group.
    pub async fn refresh_key_packages(&self) -> Result<(), ClientError> {
        self.inner.ensure_key_packages().await
    }

    /// Test hook, for crash tests: from now on, a commit this client makes stops right after
    /// the DS accepted it, before it is merged, and the operation fails — the profile is left
    /// as if the app had been killed at that moment (the commit pending). Close the client and
    /// open the profile again to see what a restarted app does.
    #[doc(hidden)]
    pub fn simulate_crash_after_commit(&self) {
        self.inner
            .crash_after_commit
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Test hook, for crash tests: from now on, a commit this client makes stops once it is
    /// durable in the profile as pending, before it is sent, and the operation fails — as if
    /// the app had been killed at that moment. Close the client and open the profile again to
    /// see what a restarted app does.
    #[doc(hidden)]
    pub fn simulate_crash_before_commit_sent(&self) {
        self.inner
            .crash_before_send
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops the background listener, closes the connection and releases the profile.
    pub async fn close(mut self) {
        for task in [self.listener.take(), self.sender.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
            let _ = task.await;
        }
        self.inner.conn.close().await;
        self.inner.endpoint.close();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.inner.endpoint.wait_idle(),
        )
        .await;
    }
}

impl Inner {
    /// Fails unless the client has state for `group`.
    fn check_member(&self, mls: &Mls, group: &GroupId) -> Result<(), ClientError> {
        if self.store.group(group)?.is_some() && mls.has_group(group)? {
            Ok(())
        } else {
            Err(ClientError::UnknownGroup(group.clone()))
        }
    }

    /// Runs an MLS operation; if it fails, drops whatever it wrote to the overlay.
    fn mls_op<T>(
        &self,
        mls: &Mls,
        op: impl FnOnce(&Mls) -> Result<T, crate::mls::MlsError>,
    ) -> Result<T, ClientError> {
        op(mls).map_err(|err| {
            mls.store().discard();
            err.into()
        })
    }

    /// Commits the overlay and `changes`; wakes event waiters if there are events.
    fn commit(&self, mls: &Mls, changes: Changes) -> Result<(), ClientError> {
        let has_events = !changes.events.is_empty();
        mls.store().commit(changes)?;
        if has_events {
            self.events_ready.notify_waiters();
        }
        Ok(())
    }
}
