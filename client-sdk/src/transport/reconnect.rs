//! A connection that comes back: [`ReconnectingConnection`] hands out the current connection
//! and, once it is lost, makes a new one with capped exponential backoff ([`Backoff`]) and
//! re-runs the `on_connect` hook (re-authentication) before anyone uses it. With several
//! server addresses it fails over: a round tries each address once, starting from the one
//! that last worked (or the next one, if that one's connection was lost), and only a round in
//! which every address failed is followed by a backoff delay.
//!
//! Requests are never retried here: whether a request may run twice is the caller's call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use roost_protocol::messages::{ClientRequest, Operation, Response};

use super::connection::Connection;
use super::error::RequestError;
use super::{ConnectConfig, Endpoint, Failure};

type HookFuture = Pin<Box<dyn Future<Output = Result<(), RequestError>> + Send>>;
type Hook = Arc<dyn Fn(Connection) -> HookFuture + Send + Sync>;

/// Capped exponential backoff: `initial`, then doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt; each call doubles the following one, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts over at the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    /// 100 ms doubling to 10 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// A connection to one server that is re-established when lost, at whichever of the server's
/// addresses answers.
///
/// Concurrent callers share one connection and, when it is gone, wait for the same
/// reconnection.
pub struct ReconnectingConnection {
    endpoint: Endpoint,
    config: ConnectConfig,
    backoff: Backoff,
    max_attempts: Option<u32>,
    on_connect: Option<Hook>,
    current: tokio::sync::Mutex<Current>,
}

/// The shared connection and where the next round of attempts starts.
#[derive(Default)]
struct Current {
    connection: Option<Connection>,
    /// Index in [`ConnectConfig::server_addrs`] of the address that last worked.
    preferred: usize,
}

impl fmt::Debug for ReconnectingConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconnectingConnection")
            .field("server", &self.config.server_name)
            .field("addrs", &self.config.server_addrs)
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl ReconnectingConnection {
    /// Connects lazily, on first use, with the default backoff and unlimited attempts.
    pub fn new(endpoint: Endpoint, config: ConnectConfig) -> Self {
        Self {
            endpoint,
            config,
            backoff: Backoff::default(),
            max_attempts: None,
            on_connect: None,
            current: tokio::sync::Mutex::new(Current::default()),
        }
    }

    /// Runs `hook` on every new connection before handing it out (e.g. to authenticate). If
    /// the hook fails the connection is closed; a transient failure is retried with backoff,
    /// any other is returned.
    pub fn with_on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Connection) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), RequestError>> + Send + 'static,
    {
        self.on_connect = Some(Arc::new(move |connection| Box::pin(hook(connection))));
        self
    }

    /// Replaces the backoff (default: 100 ms doubling to 10 s).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Gives up after this many failed rounds in a row, a round trying every address once
    /// (default: never).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// The current connection, or a new one if there is none or it was lost. Retries
    /// transient failures with backoff between rounds; fails at once on configuration errors,
    /// and after a round in which no address failed transiently (e.g. untrusted
    /// certificates).
    pub async fn connection(&self) -> Result<Connection, RequestError> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.connection.as_ref().filter(|c| c.is_open()) {
            return Ok(connection.clone());
        }
        let count = self.config.server_addrs.len().max(1);
        // The node of a lost connection may be gone for good: ask the next one first.
        let lost = current.connection.take().is_some();
        let start = (current.preferred + usize::from(lost)) % count;
        let client_config = self.config.quinn_client_config()?;
        let mut backoff = self.backoff.clone();
        let mut rounds = 0u32;
        loop {
            rounds = rounds.saturating_add(1);
            match self.connect_round(&client_config, start).await {
                Ok((index, connection)) => {
                    current.preferred = index;
                    current.connection = Some(connection.clone());
                    return Ok(connection);
                }
                Err(err) => {
                    let exhausted = self.max_attempts.is_some_and(|max| rounds >= max);
                    if !err.is_transient() || exhausted {
                        return Err(err);
                    }
                    let delay = backoff.next_delay();
                    tracing::debug!(%err, rounds, ?delay, "reconnect failed, backing off");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// [`Connection::call`] on the current connection (reconnecting first if it was lost).
    pub async fn call<O: Operation>(&self, op: O) -> Result<O::Response, RequestError> {
        self.connection().await?.call(op).await
    }

    /// [`Connection::request`] on the current connection (reconnecting first if it was lost).
    pub async fn request(&self, request: &ClientRequest) -> Result<Response, RequestError> {
        Ok(self.connection().await?.request(request).await?)
    }

    /// Closes the current connection, if any; the next use connects again (first to the
    /// same address).
    pub async fn close(&self) {
        if let Some(connection) = self.current.lock().await.connection.take() {
            connection.close();
        }
    }

    /// Tries every address once, from index `start` on (wrapping around), and returns the
    /// first connection that is established and passes the hook, with its index.
    async fn connect_round(
        &self,
        client_config: &quinn::ClientConfig,
        start: usize,
    ) -> Result<(usize, Connection), RequestError> {
        let addrs = &self.config.server_addrs;
        let mut failure = Failure::default();
        for (index, &addr) in addrs
            .iter()
            .enumerate()
            .cycle()
            .skip(start)
            .take(addrs.len())
        {
            match self.connect_once(client_config.clone(), addr).await {
                Ok(connection) => return Ok((index, connection)),
                Err(err) => {
                    if addrs.len() > 1 {
                        tracing::info!(%addr, %err, "cannot connect at this server address");
                    }
                    failure.record(err);
                }
            }
        }
        Err(failure.into_error())
    }

    async fn connect_once(
        &self,
        client_config: quinn::ClientConfig,
        addr: std::net::SocketAddr,
    ) -> Result<Connection, RequestError> {
        let connection = self
            .endpoint
            .connect_addr(&self.config, client_config, addr)
            .await?;
        if let Some(hook) = &self.on_connect
            && let Err(err) = hook(connection.clone()).await
        {
            connection.close();
            return Err(err);
        }
        Ok(connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..10)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_initial_is_capped() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
    }
}
