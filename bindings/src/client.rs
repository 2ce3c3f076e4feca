//! [`RoostClient`]: one device of one user, and the functions that enroll or open one
//! ([`register`], [`add_device`], [`open_profile`]).
//!
//! Every async method runs on the SDK runtime ([`crate::run`]). The SDK `Client` is shared
//! behind an `Arc` with the calls in flight; [`RoostClient::close`] withdraws it, stops the
//! event listener, wakes a waiting [`RoostClient::next_event`] and waits (briefly) for the
//! calls in flight before closing the profile.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_client::{Client, DeviceName, GroupId, MessageId, UserId, UserKey};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServerConfig;
use crate::error::{RoostError, parse};
use crate::event::{Event, OutgoingMessage};
use crate::{run, run_cancellable};

/// How long [`RoostClient::close`] waits for calls in flight before closing without them.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Delay before an event is offered again to a listener that raised an error for it.
const LISTENER_RETRY: Duration = Duration::from_secs(1);

/// Registers a new user and its first device on the homeserver and creates the device's
/// profile database at `profile_path` (which must not hold one).
#[uniffi::export]
pub async fn register(
    server: ServerConfig,
    profile_path: String,
    user: String,
    device: String,
) -> Result<Arc<RoostClient>, RoostError> {
    run(async move {
        let user: UserId = parse("user", &user)?;
        let device: DeviceName = parse("device", &device)?;
        let config = server.to_client_config().await?;
        let client = Client::register(config, &profile_path, user, device).await?;
        Ok(RoostClient::new(client))
    })
    .await
}

/// Adds a device to an existing user, with the user key of a device that holds it
/// ([`RoostClient::user_key`]), and creates its profile database at `profile_path`.
#[uniffi::export]
pub async fn add_device(
    server: ServerConfig,
    profile_path: String,
    user_key: Vec<u8>,
    device: String,
) -> Result<Arc<RoostClient>, RoostError> {
    run(async move {
        let user_key = UserKey::from_bytes(&user_key).map_err(|_| RoostError::InvalidArgument {
            message: "user_key: not a user key".into(),
        })?;
        let device: DeviceName = parse("device", &device)?;
        let config = server.to_client_config().await?;
        let client = Client::add_device(config, &profile_path, &user_key, device).await?;
        Ok(RoostClient::new(client))
    })
    .await
}

/// Opens the profile at `profile_path` and continues where it left off (groups, queued
/// messages, undelivered events).
#[uniffi::export]
pub async fn open_profile(
    server: ServerConfig,
    profile_path: String,
) -> Result<Arc<RoostClient>, RoostError> {
    run(async move {
        let config = server.to_client_config().await?;
        let client = Client::open(config, &profile_path).await?;
        Ok(RoostClient::new(client))
    })
    .await
}

/// One of the user's devices.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Device {
    /// Its ClientId, `user@domain/device`.
    pub client_id: String,
    /// Its device name.
    pub device: String,
    /// Whether it is the device this client runs as.
    pub this_device: bool,
    /// Start of its AS credential's validity (Unix seconds).
    pub not_before: u64,
    /// End of its AS credential's validity (Unix seconds).
    pub not_after: u64,
}

/// Why a listener could not take an event. The event is offered to it again (after a
/// second), so no event is skipped.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum ListenerError {
    /// The listener failed.
    #[error("{message}")]
    Failed {
        /// Why.
        message: String,
    },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for ListenerError {
    fn from(err: uniffi::UnexpectedUniFFICallbackError) -> Self {
        ListenerError::Failed {
            message: err.reason,
        }
    }
}

/// Receives the client's events, one at a time and in order, on a thread of the SDK (not the
/// app's main thread: hand UI work to it yourself).
#[uniffi::export(with_foreign)]
pub trait EventListener: Send + Sync {
    /// One event. Return normally once it is handled; an error (an exception) has it offered
    /// again a second later.
    fn on_event(&self, event: Event) -> Result<(), ListenerError>;
}

/// One device of one user: its groups, messages and events. Obtained from [`register`],
/// [`add_device`] or [`open_profile`].
#[derive(uniffi::Object)]
pub struct RoostClient {
    client: Mutex<Option<Arc<Client>>>,
    client_id: String,
    user_id: String,
    /// `true` once closed: wakes a waiting `next_event`.
    closed: watch::Sender<bool>,
    /// The task that feeds the event listener, if one is set.
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl RoostClient {
    fn new(client: Client) -> Arc<Self> {
        Arc::new(Self {
            client_id: client.client_id().to_string(),
            user_id: client.user_id().to_string(),
            client: Mutex::new(Some(Arc::new(client))),
            closed: watch::channel(false).0,
            pump: Mutex::new(None),
        })
    }

    /// The SDK client, for one call.
    pub(crate) fn client(&self) -> Result<Arc<Client>, RoostError> {
        self.client
            .lock()
            .map_err(|_| poisoned())?
            .clone()
            .ok_or(RoostError::Closed)
    }

    fn listener_running(&self) -> Result<bool, RoostError> {
        Ok(self
            .pump
            .lock()
            .map_err(|_| poisoned())?
            .as_ref()
            .is_some_and(|pump| !pump.is_finished()))
    }
}

/// What a send carries.
enum Payload {
    Text(String),
    Bytes(Vec<u8>),
}

impl RoostClient {
    /// Queues `payload` for `group`; returns the message id.
    async fn send_payload(&self, group: String, payload: Payload) -> Result<String, RoostError> {
        let client = self.client()?;
        run(async move {
            let group: GroupId = parse("group", &group)?;
            let id = match payload {
                Payload::Text(text) => client.send_text(&group, &text).await?,
                Payload::Bytes(bytes) => client.send(&group, &bytes).await?,
            };
            Ok(id.to_string())
        })
        .await
    }
}

fn poisoned() -> RoostError {
    RoostError::Internal {
        message: "a lock was poisoned by an earlier failure".into(),
    }
}

fn users(users: &[String]) -> Result<Vec<UserId>, RoostError> {
    users.iter().map(|user| parse("user", user)).collect()
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

#[uniffi::export]
impl RoostClient {
    /// This device's ClientId, `user@domain/device`.
    pub fn client_id(&self) -> String {
        self.client_id.clone()
    }

    /// The user this device belongs to, `user@domain`.
    pub fn user_id(&self) -> String {
        self.user_id.clone()
    }

    /// The user key, if this device holds it: pass it to [`add_device`] on a new device, over
    /// a channel the user trusts (it is a secret).
    pub fn user_key(&self) -> Result<Option<Vec<u8>>, RoostError> {
        Ok(self.client()?.user_key().map(|key| key.to_bytes()))
    }

    /// Creates a group with this client as its only member; returns its id.
    pub async fn create_group(&self) -> Result<String, RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.create_group().await?.to_string()) }).await
    }

    /// Adds every device of each of `users` that is not a member yet; returns the clients
    /// added (a device whose credential is refused is left out and reported as a
    /// `CredentialRejected` event).
    pub async fn invite(
        &self,
        group: String,
        users: Vec<String>,
    ) -> Result<Vec<String>, RoostError> {
        let client = self.client()?;
        run(async move {
            let group: GroupId = parse("group", &group)?;
            let users = self::users(&users)?;
            Ok(strings(&client.invite(&group, &users).await?))
        })
        .await
    }

    /// Removes every device of each of `users`; returns the clients removed. To leave
    /// yourself, use [`RoostClient::leave_group`].
    pub async fn remove(
        &self,
        group: String,
        users: Vec<String>,
    ) -> Result<Vec<String>, RoostError> {
        let client = self.client()?;
        run(async move {
            let group: GroupId = parse("group", &group)?;
            let users = self::users(&users)?;
            Ok(strings(&client.remove_users(&group, &users).await?))
        })
        .await
    }

    /// Leaves the group: this client sends nothing more there, and the group is gone from it
    /// once a member commits the removal (a `RemovedFromGroup` event).
    pub async fn leave_group(&self, group: String) -> Result<(), RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.leave_group(&parse("group", &group)?).await?) }).await
    }

    /// Updates this device's keys in the group (a self-update commit): a copy of this
    /// profile taken before cannot read what is sent after. Call it regularly (e.g. weekly
    /// per active group) and after a device was restored. Returns the group's new epoch.
    pub async fn update_keys(&self, group: String) -> Result<u64, RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.update_keys(&parse("group", &group)?).await?) }).await
    }

    /// Rejoins a group whose state this client lost or cannot use (after a `GroupError`).
    pub async fn rejoin_group(&self, group: String) -> Result<(), RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.rejoin_group(&parse("group", &group)?).await?) }).await
    }

    /// The groups this client is a member of.
    pub async fn groups(&self) -> Result<Vec<String>, RoostError> {
        let client = self.client()?;
        run(async move { Ok(strings(&client.groups()?)) }).await
    }

    /// The members of `group` (ClientIds, in leaf order).
    pub async fn members(&self, group: String) -> Result<Vec<String>, RoostError> {
        let client = self.client()?;
        run(async move { Ok(strings(&client.members(&parse("group", &group)?).await?)) }).await
    }

    /// The epoch of `group` as this client knows it: one more with every commit it processed
    /// or made. A message reaches the members of the epoch it is sent in, so to reach a member
    /// just seen added, wait until this is at least the epoch of that add.
    pub async fn epoch(&self, group: String) -> Result<u64, RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.epoch(&parse("group", &group)?).await?) }).await
    }

    /// Sends a text message to the group. Returns the message's id as soon as it is durably
    /// in the profile's outgoing queue (state `Queued`); a background task delivers it, across
    /// reconnects and restarts, and an `Outgoing` event reports `Sent` or `Failed`. Fails at
    /// once only for what is known locally (not a member, left the group, profile storage).
    pub async fn send_text(&self, group: String, text: String) -> Result<String, RoostError> {
        self.send_payload(group, Payload::Text(text)).await
    }

    /// The outgoing queue: messages still queued, and failed ones not yet dismissed.
    pub async fn outbox(&self) -> Result<Vec<OutgoingMessage>, RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.outbox().await?.into_iter().map(Into::into).collect()) }).await
    }

    /// Waits until the outgoing queue is empty (every message sent or failed); fails with a
    /// network error if the homeserver is unreachable.
    pub async fn flush(&self) -> Result<(), RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.flush().await?) }).await
    }

    /// Removes a failed message from the outgoing queue; `false` if there is no failed
    /// message with this id.
    pub async fn dismiss(&self, id: String) -> Result<bool, RoostError> {
        let client = self.client()?;
        run(async move {
            let id: MessageId = parse("message id", &id)?;
            Ok(client.dismiss(id).await?)
        })
        .await
    }

    /// Sends `bytes` as they are, for apps that encode content themselves (the receiver sees
    /// them as `MessageContent::Unreadable` unless they are a valid content encoding).
    /// Returns the message's id, like [`RoostClient::send_text`].
    pub async fn send_bytes(&self, group: String, bytes: Vec<u8>) -> Result<String, RoostError> {
        self.send_payload(group, Payload::Bytes(bytes)).await
    }

    /// This user's current devices (this one included), in device-name order.
    pub async fn devices(&self) -> Result<Vec<Device>, RoostError> {
        let client = self.client()?;
        let own = self.client_id.clone();
        run(async move {
            Ok(client
                .devices()
                .await?
                .into_iter()
                .map(|credential| Device {
                    client_id: credential.client.to_string(),
                    device: credential.client.device.to_string(),
                    this_device: credential.client.to_string() == own,
                    not_before: credential.not_before,
                    not_after: credential.not_after,
                })
                .collect())
        })
        .await
    }

    /// Removes one of this user's devices (needs the user key): the server revokes it for
    /// good. Its groups list it until a member removes it.
    pub async fn remove_device(&self, device: String) -> Result<(), RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.remove_device(&parse("device", &device)?).await?) }).await
    }

    /// Fetches and processes every queued message now (a background listener does this
    /// continuously; this is for apps that were suspended).
    pub async fn sync(&self) -> Result<(), RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.sync().await?) }).await
    }

    /// The next event; waits until there is one. At-least-once: an event is deleted when the
    /// next one is asked for, so after a crash the app gets again the one it was handling.
    /// Fails with `InvalidOperation` while an event listener is set, and with `Closed` when
    /// the client is closed while waiting.
    pub async fn next_event(&self) -> Result<Event, RoostError> {
        if self.listener_running()? {
            return Err(RoostError::InvalidOperation {
                message: "an event listener is set: events go to it".into(),
            });
        }
        let client = self.client()?;
        let mut closed = self.closed.subscribe();
        run_cancellable(async move {
            tokio::select! {
                event = client.next_event() => Ok(event?.into()),
                _ = closed.wait_for(|closed| *closed) => Err(RoostError::Closed),
            }
        })
        .await
    }

    /// Delivers every event to `listener`, in order, from now on (replacing a listener set
    /// before). The same at-least-once rule as [`RoostClient::next_event`].
    pub fn set_event_listener(&self, listener: Arc<dyn EventListener>) -> Result<(), RoostError> {
        let client = self.client()?;
        let pump = crate::runtime()?.spawn(pump_events(client, listener));
        if let Some(old) = self.pump.lock().map_err(|_| poisoned())?.replace(pump) {
            old.abort();
        }
        Ok(())
    }

    /// Stops delivering events to the listener (the event it is handling, if any, is offered
    /// again to the next listener or `next_event`).
    pub fn clear_event_listener(&self) -> Result<(), RoostError> {
        if let Some(pump) = self.pump.lock().map_err(|_| poisoned())?.take() {
            pump.abort();
        }
        Ok(())
    }

    /// Stops the background work, closes the connection and releases the profile, so it can
    /// be opened again. Later calls fail with `Closed`. Waits up to 5 s for calls in flight.
    pub async fn close(&self) -> Result<(), RoostError> {
        let Some(client) = self.client.lock().map_err(|_| poisoned())?.take() else {
            return Ok(());
        };
        self.closed.send_replace(true);
        let pump = self.pump.lock().map_err(|_| poisoned())?.take();
        run(async move {
            if let Some(pump) = pump {
                pump.abort();
                let _ = pump.await;
            }
            let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
            let mut client = client;
            loop {
                match Arc::try_unwrap(client) {
                    Ok(client) => {
                        client.close().await;
                        return Ok(());
                    }
                    Err(shared) if tokio::time::Instant::now() >= deadline => {
                        tracing::warn!("closing a client with calls still in flight");
                        drop(shared);
                        return Ok(());
                    }
                    Err(shared) => {
                        client = shared;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        })
        .await
    }
}

/// Feeds `listener` every event, in order, until aborted. The foreign call runs on a blocking
/// thread: a slow listener never stalls the runtime's workers.
async fn pump_events(client: Arc<Client>, listener: Arc<dyn EventListener>) {
    loop {
        let event: Event = match client.next_event().await {
            Ok(event) => event.into(),
            Err(err) => {
                tracing::warn!(%err, "cannot read the next event");
                tokio::time::sleep(LISTENER_RETRY).await;
                continue;
            }
        };
        loop {
            let listener = listener.clone();
            let offered = event.clone();
            match tokio::task::spawn_blocking(move || listener.on_event(offered)).await {
                Ok(Ok(())) => break,
                Ok(Err(err)) => {
                    tracing::warn!(%err, "the event listener failed; offering the event again")
                }
                Err(_) => tracing::warn!("the event listener panicked; offering the event again"),
            }
            tokio::time::sleep(LISTENER_RETRY).await;
        }
    }
}
