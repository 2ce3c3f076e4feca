//! A scenario's view of one device: an SDK [`Client`] whose profile lives in a scenario's
//! temporary directory, with a background task that takes every [`Event`] from the client
//! and keeps it, so scenarios can wait for "bob joined" or "carol received these three
//! messages" without caring about the order in which other events arrived.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use roost_client::{Client, ClientConfig, Event};
use roost_protocol::{ClientId, GroupId, UserId};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How long a member waits for an expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Most events one member's pump takes (a bound for its loop; scenarios see a few dozen).
const MAX_EVENTS: usize = 1_000_000;

#[derive(Default)]
struct EventLog {
    events: Mutex<Vec<Event>>,
    error: Mutex<Option<String>>,
    changed: Notify,
}

impl EventLog {
    fn snapshot(&self) -> Vec<Event> {
        match self.events.lock() {
            Ok(events) => events.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn error(&self) -> Option<String> {
        match self.error.lock() {
            Ok(error) => error.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

async fn pump(client: Arc<Client>, log: Arc<EventLog>) {
    for _ in 0..MAX_EVENTS {
        match client.next_event().await {
            Ok(event) => {
                match log.events.lock() {
                    Ok(mut events) => events.push(event),
                    Err(poisoned) => poisoned.into_inner().push(event),
                }
                log.changed.notify_waiters();
            }
            Err(err) => {
                if let Ok(mut error) = log.error.lock() {
                    *error = Some(err.to_string());
                }
                log.changed.notify_waiters();
                return;
            }
        }
    }
}

/// One device of a user in a scenario.
pub struct Member {
    client: Arc<Client>,
    log: Arc<EventLog>,
    pump: JoinHandle<()>,
    profile: PathBuf,
    label: String,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("client", self.client.client_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Member {
    fn wrap(client: Client, profile: PathBuf) -> Self {
        let client = Arc::new(client);
        let log = Arc::new(EventLog::default());
        let pump = tokio::spawn(pump(client.clone(), log.clone()));
        let label = client.client_id().to_string();
        Self {
            client,
            log,
            pump,
            profile,
            label,
        }
    }

    /// Registers `user` with its first device `device` (profile `<dir>/<user>-<device>.redb`).
    pub async fn register(
        config: ClientConfig,
        dir: &Path,
        user: &str,
        device: &str,
    ) -> anyhow::Result<Self> {
        let user: UserId = user
            .parse()
            .with_context(|| format!("bad user id {user}"))?;
        let profile = profile_path(dir, &user, device);
        let client = Client::register(config, &profile, user.clone(), device.parse()?)
            .await
            .with_context(|| format!("registering {user}/{device}"))?;
        Ok(Self::wrap(client, profile))
    }

    /// Adds device `device` to this member's user (this device holds the user key).
    pub async fn add_device(
        &self,
        config: ClientConfig,
        dir: &Path,
        device: &str,
    ) -> anyhow::Result<Self> {
        let key = self
            .client
            .user_key()
            .context("no user key on this device")?;
        let user = self.client.user_id().clone();
        let profile = profile_path(dir, &user, device);
        let client = Client::add_device(config, &profile, &key, device.parse()?)
            .await
            .with_context(|| format!("adding device {user}/{device}"))?;
        Ok(Self::wrap(client, profile))
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This device's ClientId.
    pub fn id(&self) -> &ClientId {
        self.client.client_id()
    }

    /// This device's user.
    pub fn user(&self) -> &UserId {
        self.client.user_id()
    }

    /// The profile database file.
    pub fn profile(&self) -> &Path {
        &self.profile
    }

    /// Every event received so far.
    pub fn events(&self) -> Vec<Event> {
        self.log.snapshot()
    }

    /// Waits until `check` finds what it looks for in the events received so far (it is
    /// called again after every new event) and returns it; fails after `timeout`.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Event]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Each round waits for a new event or the deadline, so the rounds are bounded by the
        // number of events and by time.
        for _ in 0..MAX_EVENTS {
            let changed = self.log.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = check(&self.log.snapshot()) {
                return Ok(found);
            }
            if let Some(err) = self.log.error() {
                bail!(
                    "{}: event stream failed while waiting for {what}: {err}",
                    self.label
                );
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        bail!(
            "{}: no {what} within {timeout:?}; events: {}",
            self.label,
            summarize(&self.log.snapshot())
        )
    }

    /// Waits until this device joined `group` (or any group when `None`) and returns it.
    pub async fn wait_joined(&self, group: Option<&GroupId>) -> anyhow::Result<GroupId> {
        self.wait_until("join", EVENT_TIMEOUT, |events| {
            events.iter().find_map(|e| match e {
                Event::Joined { group: g, .. } if group.is_none_or(|want| want == g) => {
                    Some(g.clone())
                }
                _ => None,
            })
        })
        .await
    }

    /// The application messages received in `group` so far, in order.
    pub fn messages(&self, group: &GroupId) -> Vec<(ClientId, Vec<u8>)> {
        messages_in(&self.log.snapshot(), group)
    }

    /// Waits until at least `count` messages arrived in `group` and returns all of them.
    pub async fn wait_messages(
        &self,
        group: &GroupId,
        count: usize,
    ) -> anyhow::Result<Vec<(ClientId, Vec<u8>)>> {
        self.wait_until(&format!("{count} messages"), EVENT_TIMEOUT, |events| {
            let got = messages_in(events, group);
            (got.len() >= count).then_some(got)
        })
        .await
    }

    /// Waits for an event that `matches` accepts and returns it.
    pub async fn wait_event(
        &self,
        what: &str,
        matches: impl Fn(&Event) -> bool,
    ) -> anyhow::Result<Event> {
        self.wait_until(what, EVENT_TIMEOUT, |events| {
            events.iter().find(|e| matches(e)).cloned()
        })
        .await
    }

    /// Waits until this device's view of `group`'s members is exactly `expected` (any order).
    pub async fn wait_members(
        &self,
        group: &GroupId,
        expected: &[&ClientId],
    ) -> anyhow::Result<()> {
        let mut want: Vec<ClientId> = expected.iter().map(|c| (*c).clone()).collect();
        want.sort();
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        let attempts = EVENT_TIMEOUT.as_millis() / 50 + 1;
        let mut last = Vec::new();
        for _ in 0..attempts {
            if let Ok(mut members) = self.client.members(group).await {
                members.sort();
                if members == want {
                    return Ok(());
                }
                last = members;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{}: members of {group} are {} instead of {}",
            self.label,
            ids(&last),
            ids(&want)
        )
    }

    /// Stops the event pump and closes the client (releasing its profile).
    pub async fn close(mut self) {
        self.pump.abort();
        // An aborted task's handle completes once its future (and its client) is dropped.
        let _ = (&mut self.pump).await;
        let client = self.client.clone();
        drop(self);
        if let Ok(client) = Arc::try_unwrap(client) {
            client.close().await;
        }
    }
}

fn profile_path(dir: &Path, user: &UserId, device: &str) -> PathBuf {
    dir.join(format!(
        "{}-{}-{device}.redb",
        user.name.as_str(),
        user.domain
    ))
}

/// How the marker messages of `scenarios::barrier` begin; they are not counted as messages.
pub(crate) const BARRIER_PREFIX: &[u8] = b"\0barrier ";

fn messages_in(events: &[Event], group: &GroupId) -> Vec<(ClientId, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message {
                group: g,
                sender,
                bytes,
                ..
            } if g == group && !bytes.starts_with(BARRIER_PREFIX) => {
                Some((sender.clone(), bytes.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The texts of the application messages of `group` among `events`, in order.
pub fn texts(events: &[Event], group: &GroupId) -> Vec<String> {
    messages_in(events, group)
        .into_iter()
        .map(|(_, bytes)| String::from_utf8_lossy(&bytes).into_owned())
        .collect()
}

/// Comma-separated ids.
pub fn ids<'a>(clients: impl IntoIterator<Item = &'a ClientId>) -> String {
    clients
        .into_iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A short description of events, for failure messages (no message bodies).
fn summarize(events: &[Event]) -> String {
    let parts: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Message { sender, .. } => format!("Message from {sender}"),
            Event::Joined { inviter, .. } => format!("Joined (by {inviter})"),
            Event::MembersAdded { members, .. } => format!("MembersAdded [{}]", ids(members)),
            Event::MembersRemoved { members, .. } => format!("MembersRemoved [{}]", ids(members)),
            Event::RemovedFromGroup { by, .. } => format!("RemovedFromGroup (by {by})"),
            Event::CredentialRejected { reason, .. } => format!("CredentialRejected ({reason})"),
            Event::GroupError { reason, .. } => format!("GroupError ({reason})"),
            other => format!("{other:?}"),
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}
