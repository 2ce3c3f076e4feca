//! The workloads and the order they run in, on one pair of homeservers (`alpha.test`,
//! `beta.test`): single-server workloads use alpha, `federated-send` sends from alpha to beta.
//!
//! The large workloads share one pool of listening clients on alpha ([`Pool`]): created (and
//! measured) by `idle-connections`, then used as the members of the `commit` and `fanout`
//! groups. Every pooled client's listen stream is read by its own task, which reports each
//! application message (a PrivateMessage) it receives with the time it arrived.

mod blob;
mod busy;
mod commit;
mod fanout;
mod idle;
mod instructions;
mod join;
mod keypackages;
mod restart;
mod send;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use roost_client::transport::{ConnectConfig, Connection, ListenStream};
use roost_protocol::messages::queue::{
    ListenEvent, QueueAckRequest, QueueFetchRequest, QueuePayload,
};

use super::clients::{self, BenchClient};
use super::mls;
use super::server::BenchServers;
use super::stats::{self, ExecutorProbe, Latencies};
use super::{BenchConfig, OPTIONAL_WORKLOADS, WorkloadResult};
use crate::harness::Storage;
use send::Route;

/// What the listen tasks of some pooled clients received: per client, how many application
/// messages (PrivateMessages) of the watched group and when the last one arrived. Each task
/// writes only its own slots, and the waiter is woken once per round, when the last client
/// got its message: 10,000 listeners cost the bench one atomic update each, not a channel
/// message and a wake-up of a collecting task each.
pub(crate) struct Arrivals {
    base: Instant,
    /// The group whose application messages count.
    group: std::sync::OnceLock<[u8; 16]>,
    counts: Vec<AtomicU64>,
    /// Nanoseconds after `base` of each client's last counted arrival.
    last_at: Vec<AtomicU64>,
    /// The round waited for: clients reaching this count are counted in `reached`.
    round: AtomicU64,
    reached: AtomicUsize,
    all_reached: tokio::sync::Notify,
}

impl Arrivals {
    fn new(clients: usize) -> Self {
        Self {
            base: Instant::now(),
            group: std::sync::OnceLock::new(),
            counts: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            last_at: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            round: AtomicU64::new(u64::MAX),
            reached: AtomicUsize::new(0),
            all_reached: tokio::sync::Notify::new(),
        }
    }

    /// Counts application messages of `group` from now on (once per listening).
    pub(crate) fn watch(&self, group: [u8; 16]) -> anyhow::Result<()> {
        self.group
            .set(group)
            .map_err(|_| anyhow::anyhow!("already watching a group"))
    }

    /// Client `index` got an application message of `group`.
    fn arrived(&self, index: usize, group: [u8; 16]) {
        if self.group.get() == Some(&group) {
            self.count(index);
        }
    }

    /// Client `index` got a message that counts.
    fn count(&self, index: usize) {
        let (Some(count), Some(at)) = (self.counts.get(index), self.last_at.get(index)) else {
            return;
        };
        at.store(self.base.elapsed().as_nanos() as u64, Ordering::Release);
        let count = count.fetch_add(1, Ordering::AcqRel) + 1;
        if count == self.round.load(Ordering::Acquire)
            && self.reached.fetch_add(1, Ordering::AcqRel) + 1 == self.counts.len()
        {
            self.all_reached.notify_one();
        }
    }

    /// Starts round `round` (1, 2, ...): waits for every client's `round`-th message. Call it
    /// before sending that round's message.
    pub(crate) fn start_round(&self, round: u64) {
        self.reached.store(0, Ordering::Release);
        self.round.store(round, Ordering::Release);
        // Clients that got there before the round was set (not expected: the message is sent
        // after this) are counted too.
        let early = self
            .counts
            .iter()
            .filter(|c| c.load(Ordering::Acquire) >= round)
            .count();
        if early > 0 && self.reached.fetch_add(early, Ordering::AcqRel) + early >= self.counts.len()
        {
            self.all_reached.notify_one();
        }
    }

    /// Waits until every client got its message of the current round, at most until
    /// `deadline`; returns when the last of them arrived, or how many did.
    pub(crate) async fn all_arrived(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Instant, usize> {
        while self.reached.load(Ordering::Acquire) < self.counts.len() {
            if tokio::time::timeout_at(deadline, self.all_reached.notified())
                .await
                .is_err()
            {
                return Err(self.reached.load(Ordering::Acquire));
            }
        }
        let last = self
            .last_at
            .iter()
            .map(|at| at.load(Ordering::Acquire))
            .max()
            .unwrap_or(0);
        Ok(self.base + Duration::from_nanos(last))
    }
}

/// Clients on alpha.
pub(crate) struct Pool {
    pub(crate) clients: Vec<BenchClient>,
    /// Connect + authenticate latencies of the pool's connections.
    pub(crate) connect_latencies: Latencies,
    /// Connections (connect, authenticate, listen) established per second.
    pub(crate) connect_rate: f64,
    /// Server RSS after registration, before the pool connected (bytes).
    pub(crate) rss_before: u64,
    /// Server RSS with every pooled client connected and listening (bytes).
    pub(crate) rss_after: u64,
    /// The pool's listen streams, held until the idle measurements are done.
    listening: Option<Listening>,
}

/// Listen streams of some pooled clients, each read by its own task.
pub(crate) struct Listening {
    pub(crate) arrivals: Arc<Arrivals>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        // Dropping a task drops its stream: the server ends that listener.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Whether a queued group message is an application message (MLS wire format 2,
/// PrivateMessage; commits are PublicMessages).
fn is_private_message(payload: &QueuePayload) -> Option<[u8; 16]> {
    match payload {
        QueuePayload::GroupMessage(m) if m.message.as_slice().get(2..4) == Some(&[0, 2]) => {
            Some(m.group.uuid)
        }
        _ => None,
    }
}

/// Reads one listen stream until it ends, reporting application messages.
async fn listen_task(index: usize, mut stream: ListenStream, arrivals: Arc<Arrivals>) {
    while let Some(Ok(event)) = stream.next().await {
        if let ListenEvent::Message(message) = event
            && let Some(uuid) = is_private_message(&message.payload)
        {
            arrivals.arrived(index, uuid);
        }
    }
}

/// Acknowledges everything a client's queue holds and opens a listen stream at its head.
pub(crate) async fn listen_at_head(conn: &Connection) -> anyhow::Result<ListenStream> {
    let head = conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 0,
            max_bytes: 1,
        })
        .await?
        .head_seq;
    if head > 0 {
        conn.call(QueueAckRequest { up_to_seq: head }).await?;
    }
    Ok(conn.listen(head).await?)
}

/// Opens a listen stream for each client, after acknowledging what its queue holds (a
/// listener that started at the beginning would first be pushed the whole backlog, e.g. the
/// large commits that built a group), and spawns a task reading it.
pub(crate) async fn listen(clients: &[BenchClient]) -> anyhow::Result<Listening> {
    listen_with(clients, 64).await
}

/// [`listen`] with `concurrency` streams being opened at a time.
pub(crate) async fn listen_with(
    clients: &[BenchClient],
    concurrency: usize,
) -> anyhow::Result<Listening> {
    let arrivals = Arc::new(Arrivals::new(clients.len()));
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut opening = tokio::task::JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        let conn = client.conn()?.clone();
        let limit = limit.clone();
        opening.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            Ok::<_, anyhow::Error>((index, listen_at_head(&conn).await?))
        });
    }
    let mut tasks = Vec::with_capacity(clients.len());
    while let Some(done) = opening.join_next().await {
        let (index, stream) = done??;
        tasks.push(tokio::spawn(listen_task(index, stream, arrivals.clone())));
    }
    Ok(Listening { arrivals, tasks })
}

impl Pool {
    /// Registers `count` clients on server 0, connects and authenticates them, opens their
    /// listen streams and measures the server's RSS before and after. The listen streams stay
    /// open (`listening`) until the caller drops them.
    async fn create(
        servers: &BenchServers,
        connect: &ConnectConfig,
        count: usize,
        progress: &ProgressBar,
    ) -> anyhow::Result<Pool> {
        let domain = servers.domain(0)?;
        set_phase(progress, "pool: register", count);
        let mut clients = clients::register(connect, &domain, "p", count, progress).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_before = stats::rss_of(servers.pid(0)).current;
        set_phase(progress, "pool: connect + listen", count);
        let start = Instant::now();
        let connect_latencies = clients::connect_all(connect, &mut clients, progress).await?;
        let listening = listen(&clients).await?;
        let connect_rate = stats::rate(count, start.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = stats::rss_of(servers.pid(0)).current;
        Ok(Pool {
            clients,
            connect_latencies,
            connect_rate,
            rss_before,
            rss_after,
            listening: Some(listening),
        })
    }
}

/// Whether phases are also logged as lines on stderr (a progress bar is wanted but stderr is
/// not a terminal, so indicatif draws nothing).
pub(crate) static LOG_PHASES: AtomicBool = AtomicBool::new(false);

/// Sets the progress bar to a new phase of `len` steps.
pub(crate) fn set_phase(progress: &ProgressBar, name: &str, len: usize) {
    if LOG_PHASES.load(Ordering::Relaxed) {
        eprintln!("bench: {name} ({len})");
    }
    progress.set_message(name.to_owned());
    progress.set_length(len as u64);
    progress.set_position(0);
}

/// A group uuid that differs per workload and index.
pub(crate) fn uuid(tag: u8, index: usize) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    uuid[0] = tag;
    uuid[8..].copy_from_slice(&(index as u64).to_be_bytes());
    uuid
}

/// Runs the selected workloads in order.
pub(crate) async fn run_all(
    config: &BenchConfig,
    roost: &Path,
    dir: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<WorkloadResult>> {
    let mut results = Vec::new();
    // On PostgreSQL, send-1to1 is compared with redb's in the same run.
    let mut redb_send = None;
    if config.storage == Storage::Postgres && config.selected("send-1to1") {
        set_phase(progress, "redb baseline: starting a homeserver", 1);
        let servers =
            BenchServers::start(roost, &dir.join("redb-baseline"), 1, Storage::Redb, 1).await?;
        let result = send::run(config, &servers, Route::LOCAL, false, progress).await;
        let stopped = servers.shutdown().await;
        let (mut rows, _) = result?;
        stopped?;
        tag(&mut rows, Storage::Redb, 1);
        redb_send = rows.first().map(|r| r.ops_per_sec);
        results.extend(rows);
    }
    if config.named("instructions") {
        results.extend(instructions::run(config, roost, dir, progress).await?);
    }
    if config
        .workloads
        .iter()
        .all(|w| OPTIONAL_WORKLOADS.contains(&w.as_str()))
        && !config.workloads.is_empty()
    {
        return Ok(results);
    }
    set_phase(progress, "starting homeservers", 1);
    let mut servers = BenchServers::start(roost, dir, 2, config.storage, config.nodes).await?;
    let result = run_on(config, &mut servers, dir, redb_send, progress)
        .await
        .map(|mut rows| {
            tag(&mut rows, config.storage, config.nodes);
            results.extend(rows);
            results
        });
    let stopped = servers.shutdown().await;
    let results = result?;
    stopped?;
    Ok(results)
}

/// Adds the storage engine and nodes per domain to every row's parameters.
fn tag(rows: &mut [WorkloadResult], storage: Storage, nodes: usize) {
    let backend = match storage {
        Storage::Redb => "redb",
        Storage::Postgres => "postgres",
    };
    for row in rows {
        if let serde_json::Value::Object(params) = &mut row.params {
            params.insert("backend".into(), serde_json::json!(backend));
            params.insert("nodes".into(), serde_json::json!(nodes));
        }
    }
}

/// The executor probe of alpha (server 0), if its `/metrics` answers.
async fn probe(servers: &BenchServers) -> Option<ExecutorProbe> {
    ExecutorProbe::scrape(servers.metrics_addr(0)?).await
}

/// Adds to `rows` (a workload's results) what alpha's executor probe saw while it ran:
/// `details.alpha_executor` (probes, mean lag, stalls over 5, 20 and 100 ms).
async fn attach_probe(
    servers: &BenchServers,
    before: Option<ExecutorProbe>,
    rows: &mut [WorkloadResult],
) {
    let (Some(before), Some(after)) = (before, probe(servers).await) else {
        return;
    };
    let seen = before.since(&after);
    for row in rows {
        if let serde_json::Value::Object(details) = &mut row.details {
            details.insert("alpha_executor".into(), seen.clone());
        }
    }
}

async fn run_on(
    config: &BenchConfig,
    servers: &mut BenchServers,
    dir: &Path,
    redb_send: Option<f64>,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<WorkloadResult>> {
    let mut results = Vec::new();
    let alpha = servers.connect_config(0)?;
    if config.selected("keypackages") {
        stats::reset_peak(servers.pid(0));
        let before = probe(servers).await;
        let mut rows = vec![keypackages::run(config, servers, &alpha, progress).await?];
        attach_probe(servers, before, &mut rows).await;
        results.extend(rows);
    }
    let mut one_to_one = None;
    let mut kept = None;
    if config.selected("send-1to1") {
        stats::reset_peak(servers.pid(0));
        let keep = config.selected("idle-connections");
        let before = probe(servers).await;
        let (mut rows, pairs) = send::run(config, servers, Route::LOCAL, keep, progress).await?;
        attach_probe(servers, before, &mut rows).await;
        one_to_one = rows.first().map(|r| r.ops_per_sec);
        kept = pairs;
        if let (Some(redb), Some(row)) = (redb_send, rows.first()) {
            let row = send::compared(row, "postgres vs redb", "redb send-1to1 msgs/s", redb, 0.5);
            rows.push(row);
        }
        results.extend(rows);
        let spread = servers.nodes(0);
        if spread > 1 {
            let route = Route {
                spread,
                ..Route::LOCAL
            };
            let (mut rows, _) = send::run(config, servers, route, false, progress).await?;
            if let (Some(one), Some(row)) = (one_to_one, rows.first()) {
                let row = send::compared(
                    row,
                    "pairs spread over the nodes vs all on node 0",
                    "send-1to1 msgs/s on one node",
                    one,
                    1.0,
                );
                rows.push(row);
            }
            results.extend(rows);
        }
    }
    if config.selected("federated-send") {
        stats::reset_peak(servers.pid(0));
        let before = probe(servers).await;
        let (mut rows, _) = send::run(config, servers, Route::FEDERATED, false, progress).await?;
        if let (Some(row), Some(local)) = (rows.first_mut(), one_to_one) {
            send::compare_with_local(row, local);
        }
        attach_probe(servers, before, &mut rows).await;
        results.extend(rows);
    }
    if config.selected("busy-group") {
        stats::reset_peak(servers.pid(0));
        let before = probe(servers).await;
        let mut rows = vec![busy::run(config, servers, progress).await?];
        attach_probe(servers, before, &mut rows).await;
        results.extend(rows);
    }
    if config.selected("blob") {
        stats::reset_peak(servers.pid(0));
        let before = probe(servers).await;
        let mut rows = blob::run(config, servers, progress).await?;
        attach_probe(servers, before, &mut rows).await;
        results.extend(rows);
    }
    let mut pool_size = 0;
    for name in ["idle-connections", "reconnect-storm", "cold-start"] {
        if config.selected(name) {
            pool_size = pool_size.max(config.idle);
        }
    }
    if config.selected("join-large") {
        pool_size = pool_size.max(config.join_members.saturating_sub(1));
    }
    if config.selected("commit") {
        pool_size = pool_size.max(config.commit_sizes.iter().copied().max().unwrap_or(0));
    }
    if config.selected("fanout") {
        pool_size = pool_size.max(config.members.iter().copied().max().unwrap_or(0));
    }
    if pool_size == 0 {
        return Ok(results);
    }
    let mut quinn = None;
    if config.selected("idle-connections") {
        quinn = Some(
            idle::quinn_idle(
                &dir.join("quinn-idle"),
                config.idle,
                restart::STORM_CONCURRENCY,
                progress,
            )
            .await?,
        );
    }
    stats::reset_peak(servers.pid(0));
    let before = probe(servers).await;
    let mut pool = Pool::create(servers, &alpha, pool_size, progress).await?;
    if let Some(quinn) = &quinn {
        let mut rows = vec![idle::result(config, servers, &pool, quinn)];
        attach_probe(servers, before, &mut rows).await;
        if let Some(kept) = kept.take() {
            let idle = pool.clients.len();
            let before = probe(servers).await;
            rows.push(send::among_idle(config, servers, kept, idle, progress).await?);
            let last = rows.len() - 1;
            attach_probe(servers, before, &mut rows[last..]).await;
        }
        results.extend(rows);
    }
    // The later workloads open their own listen streams on the pooled clients.
    pool.listening = None;
    let domain = servers.domain(0)?;
    set_phase(progress, "owners: register", 1);
    let owners = clients::ready_clients(&alpha, &domain, "o", 1, progress).await?;
    let owner = owners.into_iter().next();
    let Some(mut owner) = owner else {
        anyhow::bail!("no group owner");
    };
    // The largest fan-out group, reused by join-large and cold-start.
    let mut big: Option<mls::GroupOwner> = None;
    if config.selected("commit") {
        for (i, &size) in config.commit_sizes.iter().enumerate() {
            stats::reset_peak(servers.pid(0));
            let before = probe(servers).await;
            let mut rows =
                vec![commit::run(config, servers, &pool, owner.clone(), size, i, progress).await?];
            attach_probe(servers, before, &mut rows).await;
            results.extend(rows);
        }
    }
    if config.selected("fanout") {
        let url = servers.scratch_database("bench_baseline")?;
        let baseline = match &url {
            Some(url) => fanout::Baseline::Postgres(url),
            None => fanout::Baseline::Redb(dir),
        };
        for (i, &size) in config.members.iter().enumerate() {
            stats::reset_peak(servers.pid(0));
            let before = probe(servers).await;
            let (mut row, group) = fanout::run(
                config,
                servers,
                &pool,
                owner.clone(),
                size,
                i,
                &baseline,
                progress,
            )
            .await?;
            if Some(&size) == config.members.iter().max() {
                // The floor under the push figure, for the largest group (its size as measured).
                let members = row.params["members"].as_u64().unwrap_or(2) as usize;
                let listeners = members.saturating_sub(1).max(1);
                let frame = row.details["push_frame_bytes"].as_u64().unwrap_or(0) as usize;
                let bare = fanout::bare_quinn_pushes(
                    &dir.join("quinn-fanout"),
                    listeners,
                    frame,
                    config.fanout_rounds,
                    progress,
                )
                .await?;
                row.details["bare_quinn_all_pushed_p50_us"] = serde_json::json!(bare.median());
                row.details["bare_quinn_all_pushed_max_us"] = serde_json::json!(bare.quantile(1.0));
            }
            let mut rows = vec![row];
            attach_probe(servers, before, &mut rows).await;
            results.extend(rows);
            if big.as_ref().is_none_or(|b| b.size() <= group.size()) {
                big = Some(group);
            }
        }
    }
    if config.selected("join-large") {
        let join_size = config.join_members.clamp(2, pool.clients.len() + 1);
        let mut group = match big.take() {
            Some(group) if group.size() == join_size => group,
            _ => join::build_group(owner.clone(), &pool, join_size, progress).await?,
        };
        stats::reset_peak(servers.pid(0));
        let before = probe(servers).await;
        let mut rows = join::run(servers, &mut group, progress).await?;
        attach_probe(servers, before, &mut rows).await;
        results.extend(rows);
        big = Some(group);
    }
    if config.selected("reconnect-storm") {
        let mut rows =
            vec![restart::storm(config, servers, &mut pool, quinn.take(), dir, progress).await?];
        // A new process: its counters start at zero.
        attach_probe(servers, Some(ExecutorProbe::default()), &mut rows).await;
        results.extend(rows);
    }
    if config.selected("cold-start") {
        // The owner's connections did not survive a restart.
        let mut owner_conns = vec![owner];
        if let Some(group) = big.take() {
            owner_conns.push(group.client.clone());
            big = Some(group);
        }
        clients::connect_all(&alpha, &mut owner_conns, progress).await?;
        owner = owner_conns.remove(0);
        if let (Some(group), Some(client)) = (big.as_mut(), owner_conns.pop()) {
            group.client = client;
        }
        let mut rows = vec![
            restart::cold_start(config, servers, &mut pool, &owner, big.take(), progress).await?,
        ];
        tokio::time::sleep(Duration::from_millis(300)).await;
        attach_probe(servers, Some(ExecutorProbe::default()), &mut rows).await;
        results.extend(rows);
    }
    clients::close_all(&pool.clients);
    clients::close_all(std::slice::from_ref(&owner));
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_round_ends_when_every_listener_got_its_message() {
        let arrivals = Arrivals::new(3);
        arrivals.watch([7; 16]).unwrap();
        let soon = || tokio::time::Instant::now() + Duration::from_millis(50);
        arrivals.start_round(1);
        arrivals.arrived(0, [7; 16]);
        // Another group's message, or a second message of the same client, is not the third
        // client's.
        arrivals.arrived(2, [8; 16]);
        arrivals.arrived(0, [7; 16]);
        arrivals.arrived(1, [7; 16]);
        assert_eq!(arrivals.all_arrived(soon()).await, Err(2));
        arrivals.arrived(2, [7; 16]);
        let last = arrivals.all_arrived(soon()).await.unwrap();
        assert!(last <= Instant::now());
        // Client 0 got two messages in round 1: it already has its second.
        arrivals.start_round(2);
        arrivals.arrived(1, [7; 16]);
        assert_eq!(arrivals.all_arrived(soon()).await, Err(2));
        arrivals.arrived(2, [7; 16]);
        assert!(arrivals.all_arrived(soon()).await.is_ok());
    }
}
