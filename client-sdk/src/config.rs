//! [`ClientConfig`]: how to reach the homeserver and the SDK's policies.

use std::time::Duration;

use crate::transport::ConnectConfig;

/// Configuration of a [`Client`](crate::Client).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// How to reach and trust the homeserver. Its `server_name` is the homeserver's domain,
    /// which must be the domain of the user; its `server_addrs` may list several nodes of the
    /// homeserver, which the client fails over between.
    pub connect: ConnectConfig,
    /// How many ordinary KeyPackages to keep uploaded (default 20).
    pub key_package_target: u32,
    /// Replenish (up to `key_package_target`) when fewer than this many are left
    /// (default 10).
    pub key_package_low_water: u32,
    /// Attempts of one commit when it loses against concurrent commits (default 8). Waiting
    /// for commits on their way from another domain's hub is bounded by `commit_wait` instead.
    pub max_commit_attempts: u32,
    /// Rounds of connection attempts of one request before it fails, each round trying every
    /// server address once, with backoff between rounds (default 3).
    pub connect_attempts: u32,
    /// Keep a listen stream open in the background, so messages are processed (and events
    /// produced) as they arrive (default true). Without it, call
    /// [`Client::sync`](crate::Client::sync).
    pub listen: bool,
    /// Delay between attempts to reopen a lost listen stream (default 1 s).
    pub listen_retry: Duration,
    /// While the homeserver cannot be reached, how often the background task tries to deliver
    /// the outgoing queue again (default 2 s). Queuing a message or a flush tries at once.
    pub outbox_retry: Duration,
    /// How long a group hosted on another domain's homeserver may stay behind the hub's
    /// epoch, with nothing left in this client's queue to process, before the SDK rejoins it
    /// (default 60 s). The commits that would bring it up to date may still be on their way:
    /// the hub's homeserver delivers them through its federation outbox, which after an
    /// outage retries with a delay of up to 30 s by default. A rejoin skips the epochs in
    /// between, and what was sent in them is lost to this client, so the SDK waits while
    /// nothing arrives; each commit that arrives restarts the wait. Meanwhile the message that
    /// showed the gap stays queued. A group hosted on this client's own homeserver is
    /// rejoined at once: its commits reach this client's queue before the hub answers. The
    /// wait is counted from this client's start: one that lives shorter (a command-line run)
    /// rejoins when a message of an epoch it never reached arrives instead.
    pub rejoin_after: Duration,
    /// How long a commit (`invite`, `remove_users`, `update_keys`, …) in a group hosted on
    /// another domain's homeserver waits for commits the hub accepted but that have not reached
    /// this client yet, before it fails (default 5 s). The hub refuses a commit (and a queued
    /// message) made at an epoch it has left; the commits that would bring this client up to
    /// date travel through the hub's federation outbox, usually in well under a second. While
    /// none arrives, the SDK tries again with growing pauses (50 ms up to 1 s) instead of
    /// failing at once. The MLS state stays locked meanwhile: other operations of this client
    /// wait for it.
    pub commit_wait: Duration,
    /// Registration token, for homeservers that gate registration.
    pub registration_token: Option<String>,
    /// Tolerated clock difference with the AS when checking credential validity (default
    /// 300 s).
    pub clock_skew: Duration,
    /// The clock credential validity is checked by (default: the system clock; tests use a
    /// [`ManualClock`](crate::clock::ManualClock)).
    pub clock: crate::clock::Clock,
}

impl ClientConfig {
    /// The defaults, for the homeserver `connect` describes.
    pub fn new(connect: ConnectConfig) -> Self {
        Self {
            connect,
            key_package_target: 20,
            key_package_low_water: 10,
            max_commit_attempts: 8,
            connect_attempts: 3,
            listen: true,
            listen_retry: Duration::from_secs(1),
            outbox_retry: Duration::from_secs(2),
            rejoin_after: Duration::from_secs(60),
            commit_wait: Duration::from_secs(5),
            registration_token: None,
            clock_skew: Duration::from_secs(300),
            clock: crate::clock::Clock::system(),
        }
    }
}
