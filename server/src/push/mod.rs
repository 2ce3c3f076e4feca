//! Push notifications: a client registers where its homeserver sends wake-ups (Web Push,
//! APNs or FCM); when a message lands in the queue of a client with no listen stream, a
//! wake-up without content or sender goes out, at most one per client per `coalesce_ms`.
//!
//! The path of a wake-up, off the request path:
//! 1. the node that committed queue entries hands their client numbers to [`Push::woken`]
//!    (an in-memory set, so a burst costs one store call);
//! 2. the scheduler drops clients listening on this node and asks the store to schedule a
//!    wake-up for the others that have a registration ([`PushStore::schedule_push`]): one
//!    durable job per client (the push outbox), due `delay_ms` from now but not before
//!    `coalesce_ms` after the last one sent; a client with a job pending gets no second one;
//! 3. every node's worker claims due jobs (a lease: another node does not take them
//!    meanwhile), skips clients that have nothing queued any more (they were online: a
//!    listener on another node got and acknowledged the messages) or listen here, and sends;
//!    transient failures are retried with backoff (or after the service's `Retry-After`),
//!    permanent ones (404/410, APNs `Unregistered`, FCM `UNREGISTERED`) delete the
//!    registration;
//! 4. step 1 is in memory: a node that stops between the queue commit and step 2 loses the
//!    wake-up (never the message). Every node therefore sweeps at start and every
//!    `recover_ms` ([`PushStore::recover_push`]): a client with a registration, no pending
//!    wake-up and a queue entry newer than what its last scheduled wake-up covered gets one.
//!    The sweep costs one pass over the registrations; the message path pays nothing.
//!
//! Registrations are sealed at rest with the server's push key (`push-token.key`, kept with
//! the identity files) and bound to their client number; they are deleted with the client.

pub(crate) mod crypto;
pub(crate) mod endpoint;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz;
mod http;
mod send;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_protocol::messages::push::*;
use tls_codec::{DeserializeBytes as _, Serialize as _};
use tokio::sync::{Notify, Semaphore};
use tokio_util::task::TaskTracker;

use crate::State;
use crate::auth::Authenticated;
use crate::config::{PushConfig, Settings};
use crate::error::ServiceError;
use crypto::{AUTH_SECRET_LEN, Es256Key, P256_PUBLIC_LEN, SealKey};
use endpoint::HttpsUrl;
use send::{Apns, Fcm, Outcome, Senders};

/// File name of the key that seals registrations, in the identity directory.
pub(crate) const PUSH_KEY_FILE: &str = "push-token.key";
/// File name of the VAPID signing key (PKCS#8), in the identity directory.
pub(crate) const VAPID_KEY_FILE: &str = "vapid-key.pk8";

/// A due wake-up, as claimed from the push outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PushJob {
    pub(crate) client_num: u64,
    /// Failed attempts so far.
    pub(crate) attempts: u32,
    /// The sealed registration (None if it was deleted meanwhile).
    pub(crate) sealed: Option<Vec<u8>>,
}

/// What push needs from storage: registrations (sealed) and the push outbox (one job per
/// client at most).
pub(crate) trait PushStore {
    /// Stores or replaces the registration of an active client (CLIENT_NOT_FOUND otherwise).
    async fn put_push(&self, client_num: u64, sealed: Vec<u8>) -> Result<(), ServiceError>;
    /// Deletes a client's registration and pending wake-up; whether there was one.
    async fn delete_push(&self, client_num: u64) -> Result<bool, ServiceError>;
    /// For each of these clients that has a registration and no pending wake-up, schedules
    /// one at max(`due_ms`, its last wake-up + `coalesce_ms`); returns how many. A pending
    /// one is marked, so that finishing it while claimed schedules the next. Either way the
    /// client's queue entries up to `due_ms` count as covered (a job runs no earlier than
    /// its due time and looks at the queue then), for [`PushStore::recover_push`].
    async fn schedule_push(
        &self,
        client_nums: Vec<u64>,
        due_ms: u64,
        coalesce_ms: u64,
    ) -> Result<u64, ServiceError>;
    /// Schedules the wake-ups a node lost by stopping between a queue commit and
    /// `schedule_push` (the hand-over is in memory): for every client with a registration,
    /// no pending wake-up and a queue entry enqueued at or before `cutoff_ms` but after the
    /// entries covered by its last scheduled wake-up, one wake-up as `schedule_push` would
    /// schedule it; returns how many.
    async fn recover_push(
        &self,
        cutoff_ms: u64,
        due_ms: u64,
        coalesce_ms: u64,
    ) -> Result<u64, ServiceError>;
    /// Up to `limit` wake-ups due at `now_ms`, each pushed back to `lease_until_ms` so that
    /// no other node takes it while this one sends.
    async fn claim_push(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: u32,
    ) -> Result<Vec<PushJob>, ServiceError>;
    /// The wake-up is done: deletes the job, unless messages arrived while it was claimed
    /// (`schedule_push` marked it): then it is due again at `again_ms`. `sent_ms` (if it was
    /// sent) starts the coalescing interval.
    async fn finish_push(
        &self,
        client_num: u64,
        sent_ms: Option<u64>,
        again_ms: u64,
    ) -> Result<(), ServiceError>;
    /// Puts a failed wake-up back, due at `due_ms` (if the client still has a registration).
    async fn retry_push(
        &self,
        client_num: u64,
        due_ms: u64,
        attempts: u32,
    ) -> Result<(), ServiceError>;
    /// When the next wake-up is due.
    async fn next_push_due(&self) -> Result<Option<u64>, ServiceError>;
}

/// Push state of a node.
pub(crate) struct Push {
    seal: SealKey,
    senders: Senders,
    /// Clients with new queue entries committed on this node, not yet scheduled.
    woken: Mutex<HashSet<u64>>,
    woken_notify: Notify,
    work_notify: Notify,
    /// Test fault point: hand-overs are dropped, as when the node stops right after the
    /// queue commit (see [`crate::testing`]).
    lose_handovers: AtomicBool,
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Push")
    }
}

/// Checks `[push]` (called by `Config::validate`).
pub(crate) fn check_config(push: &PushConfig) -> Result<(), String> {
    endpoint::parse_ranges(&push.forbidden_ranges)
        .map_err(|e| format!("push.forbidden_ranges: {e}"))?;
    HttpsUrl::parse(&push.apns_url).map_err(|e| format!("push.apns_url: {e}"))?;
    HttpsUrl::parse(&push.fcm_url).map_err(|e| format!("push.fcm_url: {e}"))?;
    if push.request_timeout_ms == 0
        || push.max_in_flight == 0
        || push.poll_ms == 0
        || push.recover_ms == 0
    {
        return Err(
            "push.request_timeout_ms, max_in_flight, poll_ms and recover_ms must be at least 1"
                .into(),
        );
    }
    let apns = [
        push.apns_key_file.is_some(),
        push.apns_key_id.is_some(),
        push.apns_team_id.is_some(),
    ];
    if apns.iter().any(|x| *x) && !apns.iter().all(|x| *x) {
        return Err("push.apns_key_file, apns_key_id and apns_team_id go together".into());
    }
    if push.fcm_project_id.is_some() != push.fcm_access_token_file.is_some() {
        return Err("push.fcm_project_id and fcm_access_token_file go together".into());
    }
    if let Some(project) = &push.fcm_project_id
        && !project
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err("push.fcm_project_id is not a project id".into());
    }
    Ok(())
}

fn load_or_create(
    path: &std::path::Path,
    make: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let bytes = make()?;
            crate::identity::write_private(path, &bytes).map_err(|e| e.to_string())?;
            Ok(bytes)
        }
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

impl Push {
    /// Loads (or makes, on first start) the push key and VAPID key from the identity
    /// directory, and the providers' settings.
    pub(crate) fn new(settings: &Settings) -> Result<Self, String> {
        let config = &settings.push;
        let dir = &settings.identity_dir;
        let seal = load_or_create(&dir.join(PUSH_KEY_FILE), || {
            use ring::rand::SecureRandom;
            let mut key = vec![0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| "no randomness".to_owned())?;
            Ok(key)
        })?;
        let seal = SealKey::new(&seal).map_err(|e| format!("{PUSH_KEY_FILE}: {e}"))?;
        let vapid = if config.web_push {
            let der = load_or_create(&dir.join(VAPID_KEY_FILE), || {
                Es256Key::generate_pkcs8().map_err(|e| e.to_string())
            })?;
            let key = Es256Key::from_pkcs8(&der).map_err(|e| format!("{VAPID_KEY_FILE}: {e}"))?;
            let subject = config
                .vapid_subject
                .clone()
                .unwrap_or_else(|| format!("mailto:postmaster@{}", settings.domain));
            Some((key, subject))
        } else {
            None
        };
        let apns = match (
            &config.apns_key_file,
            &config.apns_key_id,
            &config.apns_team_id,
        ) {
            (Some(file), Some(key_id), Some(team_id)) => {
                use rustls_pki_types::PrivateKeyDer;
                use rustls_pki_types::pem::PemObject;
                let der = PrivateKeyDer::from_pem_file(file)
                    .map_err(|e| format!("push.apns_key_file {}: {e}", file.display()))?;
                let key = Es256Key::from_pkcs8(der.secret_der())
                    .map_err(|e| format!("push.apns_key_file {}: {e}", file.display()))?;
                Some(Apns {
                    key,
                    key_id: key_id.clone(),
                    team_id: team_id.clone(),
                    base: HttpsUrl::parse(&config.apns_url)?,
                    token: Mutex::new(None),
                    pool: http::H2Pool::default(),
                })
            }
            _ => None,
        };
        let fcm = match (&config.fcm_project_id, &config.fcm_access_token_file) {
            (Some(project_id), Some(file)) => Some(Fcm {
                project_id: project_id.clone(),
                access_token_file: file.clone(),
                base: HttpsUrl::parse(&config.fcm_url)?,
                pool: http::H2Pool::default(),
            }),
            _ => None,
        };
        let forbidden = endpoint::parse_ranges(&config.forbidden_ranges)?;
        let http = http::HttpClient::new(
            http::roots(config.ca_file.as_deref())?,
            forbidden,
            Duration::from_millis(config.request_timeout_ms),
        )?;
        Ok(Self {
            seal,
            senders: Senders {
                http,
                vapid,
                web_push_pools: http::OriginPools::default(),
                apns,
                fcm,
                ttl_secs: config.ttl_secs,
            },
            woken: Mutex::new(HashSet::new()),
            woken_notify: Notify::new(),
            work_notify: Notify::new(),
            lose_handovers: AtomicBool::new(false),
        })
    }

    /// New queue entries were committed on this node for these clients.
    pub(crate) fn woken(&self, client_nums: impl IntoIterator<Item = u64>) {
        if self.lose_handovers.load(Ordering::Relaxed) {
            return;
        }
        let mut set = match self.woken.lock() {
            Ok(set) => set,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = set.len();
        set.extend(client_nums);
        if set.len() != before {
            self.woken_notify.notify_one();
        }
    }

    /// From now on, drops every hand-over to the push outbox (a test fault point).
    pub(crate) fn lose_handovers(&self) {
        self.lose_handovers.store(true, Ordering::Relaxed);
    }

    fn take_woken(&self) -> Vec<u64> {
        let mut set = match self.woken.lock() {
            Ok(set) => set,
            Err(poisoned) => poisoned.into_inner(),
        };
        set.drain().collect()
    }

    fn context(client_num: u64) -> [u8; 8] {
        client_num.to_be_bytes()
    }
}

fn rejected(reason: impl Into<String>) -> ServiceError {
    ServiceError::PushEndpointRejected(reason.into())
}

/// Which providers a server sends to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Enabled {
    pub(crate) web_push: bool,
    pub(crate) apns: bool,
    pub(crate) fcm: bool,
}

/// Checks a registration from a client: shape, provider enabled, and for Web Push the URL and
/// its addresses (resolved now; refused if any is forbidden).
async fn check_endpoint(push: &Push, endpoint: &PushEndpoint) -> Result<(), ServiceError> {
    let enabled = Enabled {
        web_push: push.senders.vapid.is_some(),
        apns: push.senders.apns.is_some(),
        fcm: push.senders.fcm.is_some(),
    };
    if let Some(url) = check_shape(endpoint, enabled)? {
        endpoint::resolve_allowed(&url, push.senders.http.forbidden())
            .await
            .map_err(rejected)?;
    }
    Ok(())
}

/// The checks of a registration that need no network: its shape and provider. Returns the
/// URL of a Web Push endpoint, whose addresses are checked next.
pub(crate) fn check_shape(
    endpoint: &PushEndpoint,
    enabled: Enabled,
) -> Result<Option<HttpsUrl>, ServiceError> {
    match endpoint {
        PushEndpoint::WebPush(sub) => {
            if !enabled.web_push {
                return Err(ServiceError::PushProviderDisabled);
            }
            if sub.p256dh.len() != P256_PUBLIC_LEN || sub.p256dh.as_slice().first() != Some(&4) {
                return Err(rejected("p256dh is not an uncompressed P-256 key"));
            }
            if sub.auth.len() != AUTH_SECRET_LEN {
                return Err(rejected("auth is not 16 bytes"));
            }
            let url = std::str::from_utf8(sub.endpoint.as_slice())
                .map_err(|_| rejected("endpoint is not UTF-8"))?;
            return HttpsUrl::parse(url).map(Some).map_err(rejected);
        }
        PushEndpoint::Apns(token) => {
            if !enabled.apns {
                return Err(ServiceError::PushProviderDisabled);
            }
            if token.device_token.is_empty() || token.device_token.len() > 100 {
                return Err(rejected("device token must be 1 to 100 bytes"));
            }
            let topic = std::str::from_utf8(token.topic.as_slice())
                .map_err(|_| rejected("topic is not UTF-8"))?;
            if topic.is_empty()
                || topic.len() > 255
                || !topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(rejected("topic is not a bundle id"));
            }
        }
        PushEndpoint::Fcm(token) => {
            if !enabled.fcm {
                return Err(ServiceError::PushProviderDisabled);
            }
            let token = std::str::from_utf8(token.token.as_slice())
                .map_err(|_| rejected("token is not UTF-8"))?;
            if token.is_empty()
                || token.len() > 4096
                || !token
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            {
                return Err(rejected("token is not an FCM registration token"));
            }
        }
    }
    Ok(None)
}

/// RegisterPush.
pub(crate) async fn register(
    state: &State,
    me: &Authenticated,
    req: RegisterPushRequest,
) -> Result<RegisterPushResponse, ServiceError> {
    check_endpoint(&state.push, &req.endpoint).await?;
    let plain = req
        .endpoint
        .tls_serialize_detached()
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let sealed = state
        .push
        .seal
        .seal(&Push::context(me.client_num), &plain)
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    state.store.put_push(me.client_num, sealed).await?;
    tracing::debug!(client = %me.client, "push endpoint registered");
    Ok(RegisterPushResponse {})
}

/// UnregisterPush.
pub(crate) async fn unregister(
    state: &State,
    me: &Authenticated,
) -> Result<UnregisterPushResponse, ServiceError> {
    let removed = state.store.delete_push(me.client_num).await?;
    Ok(UnregisterPushResponse {
        removed: u8::from(removed),
    })
}

/// PushInfo.
pub(crate) fn info(state: &State) -> PushInfoResponse {
    let senders = &state.push.senders;
    PushInfoResponse {
        vapid_public_key: senders
            .vapid
            .as_ref()
            .map(|(key, _)| key.public_key().to_vec())
            .unwrap_or_default()
            .into(),
        apns: u8::from(senders.apns.is_some()),
        fcm: u8::from(senders.fcm.is_some()),
    }
}

/// Starts the scheduler, the worker and the recovery sweep of this node.
pub(crate) fn start(state: Arc<State>, tracker: &TaskTracker) {
    tracker.spawn(scheduler(state.clone()));
    tracker.spawn(recoverer(state.clone()));
    tracker.spawn(worker(state));
}

/// Schedules lost wake-ups (step 4 of the module documentation): at start every queue entry
/// counts (nothing of this process is in flight), later only those at least `recover_ms`
/// old, so that a hand-over still in flight on some node is not taken for a lost one.
async fn recoverer(state: Arc<State>) {
    let config = &state.settings.push;
    let mut first = true;
    loop {
        let now = state.clock.unix_millis();
        let cutoff = if first {
            now
        } else {
            now.saturating_sub(config.recover_ms)
        };
        let due = now.saturating_add(config.delay_ms);
        match state
            .store
            .recover_push(cutoff, due, config.coalesce_ms)
            .await
        {
            Ok(0) => first = false,
            Ok(scheduled) => {
                first = false;
                tracing::info!(scheduled, "lost push wake-ups scheduled again");
                metrics::counter!("roost_push_recovered_total").increment(scheduled);
                state.push.work_notify.notify_one();
            }
            Err(err) => tracing::warn!(%err, "looking for lost push wake-ups failed"),
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(config.recover_ms)) => {}
        }
    }
}

async fn scheduler(state: Arc<State>) {
    let config = &state.settings.push;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = state.push.woken_notify.notified() => {}
        }
        let nums = state.queues.unlistened(state.push.take_woken());
        if nums.is_empty() {
            continue;
        }
        let due = state.clock.unix_millis().saturating_add(config.delay_ms);
        match state
            .store
            .schedule_push(nums.clone(), due, config.coalesce_ms)
            .await
        {
            Ok(0) => {}
            Ok(_) => state.push.work_notify.notify_one(),
            Err(err) => {
                // Put them back: the next wake-up (or this retry) schedules them.
                tracing::warn!(%err, "scheduling push wake-ups failed");
                state.push.woken(nums);
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(config.poll_ms)) => {}
                }
            }
        }
    }
}

async fn worker(state: Arc<State>) {
    let config = &state.settings.push;
    let slots = Arc::new(Semaphore::new(config.max_in_flight as usize));
    let tracker = TaskTracker::new();
    loop {
        let now = state.clock.unix_millis();
        let wait = match state.store.next_push_due().await {
            Ok(Some(due)) if due <= now => Duration::ZERO,
            Ok(Some(due)) => Duration::from_millis((due - now).min(config.poll_ms)),
            Ok(None) => Duration::from_millis(config.poll_ms),
            Err(err) => {
                tracing::warn!(%err, "reading the push outbox failed");
                Duration::from_millis(config.poll_ms)
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = state.shutdown.cancelled() => break,
                _ = state.push.work_notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let free = slots.available_permits() as u32;
        if free == 0 {
            tokio::select! {
                _ = state.shutdown.cancelled() => break,
                _ = slots.clone().acquire_owned() => {}
            }
            continue;
        }
        let lease = now.saturating_add(config.request_timeout_ms.saturating_mul(3));
        let jobs = match state.store.claim_push(now, lease, free).await {
            Ok(jobs) => jobs,
            Err(err) => {
                tracing::warn!(%err, "claiming push wake-ups failed");
                tokio::select! {
                    _ = state.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(config.poll_ms)) => {}
                }
                continue;
            }
        };
        for job in jobs {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let state = state.clone();
            tracker.spawn(async move {
                let client_num = job.client_num;
                if let Err(err) = run_job(&state, job).await {
                    tracing::warn!(%err, client_num, "push wake-up bookkeeping failed");
                }
                drop(permit);
            });
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
}

/// Whether the client still has something queued (unacknowledged, unexpired).
async fn has_queued(state: &State, client_num: u64) -> Result<bool, ServiceError> {
    let (messages, _) = crate::queue::QueueStore::read_queue(
        &state.store,
        client_num,
        0,
        1,
        1,
        crate::queue::cutoff_ms(state),
    )
    .await?;
    Ok(!messages.is_empty())
}

async fn run_job(state: &State, job: PushJob) -> Result<(), ServiceError> {
    let config = &state.settings.push;
    let client_num = job.client_num;
    let Some(sealed) = job.sealed else {
        return state.store.finish_push(client_num, None, 0).await;
    };
    let now = state.clock.unix_millis();
    let soon = now.saturating_add(config.delay_ms);
    if state.queues.is_listened(client_num) || !has_queued(state, client_num).await? {
        metrics::counter!("roost_push_total", "outcome" => "not_needed").increment(1);
        return state.store.finish_push(client_num, None, soon).await;
    }
    let endpoint = state
        .push
        .seal
        .open(&Push::context(client_num), &sealed)
        .map_err(|e| e.to_string())
        .and_then(|plain| {
            PushEndpoint::tls_deserialize_exact_bytes(&plain).map_err(|e| e.to_string())
        });
    let endpoint = match endpoint {
        Ok(endpoint) => endpoint,
        Err(err) => {
            // Sealed under another push key (the key file was replaced): useless.
            tracing::warn!(%err, client_num, "push registration does not open; deleted");
            state.store.delete_push(client_num).await?;
            return Ok(());
        }
    };
    let outcome = state
        .push
        .senders
        .send(&endpoint, state.clock.unix_secs())
        .await;
    let label = match &outcome {
        Outcome::Sent => "sent",
        Outcome::Gone(_) => "gone",
        Outcome::Failed(_) => "failed",
        Outcome::Retry(..) => "retry",
    };
    metrics::counter!("roost_push_total", "outcome" => label).increment(1);
    match outcome {
        Outcome::Sent => {
            tracing::debug!(client_num, "push wake-up sent");
            let sent = state.clock.unix_millis();
            state
                .store
                .finish_push(
                    client_num,
                    Some(sent),
                    sent.saturating_add(config.coalesce_ms),
                )
                .await
        }
        Outcome::Gone(reason) => {
            tracing::info!(client_num, %reason, "push registration expired; deleted");
            state.store.delete_push(client_num).await.map(|_| ())
        }
        Outcome::Failed(reason) => {
            tracing::warn!(client_num, %reason, "push wake-up refused; dropped");
            state.store.finish_push(client_num, None, soon).await
        }
        Outcome::Retry(reason, retry_after) => {
            let attempts = job.attempts.saturating_add(1);
            if attempts >= config.max_attempts {
                tracing::warn!(client_num, %reason, attempts, "push wake-up given up");
                return state.store.finish_push(client_num, None, soon).await;
            }
            // The service's Retry-After (bounded), else capped exponential backoff.
            let delay = match retry_after {
                Some(secs) => secs.saturating_mul(1000).min(config.retry_after_max_ms),
                None => config
                    .retry_initial_ms
                    .saturating_mul(1u64 << attempts.saturating_sub(1).min(32))
                    .min(config.retry_max_ms),
            };
            tracing::debug!(client_num, %reason, attempts, delay, "push wake-up retried");
            state
                .store
                .retry_push(
                    client_num,
                    state.clock.unix_millis().saturating_add(delay),
                    attempts,
                )
                .await
        }
    }
}
