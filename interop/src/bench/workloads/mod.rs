//! The workloads and the order they run in, on one pair of homeservers (`alpha.test`,
//! `beta.test`): single-server workloads use alpha, `federated-send` sends from alpha to beta.
//!
//! The large workloads share one pool of listening clients on alpha ([`Pool`]): created (and
//! measured) by `idle-connections`, then used as the members of the `commit` and `fanout`
//! groups. Every pooled client's listen stream is read by its own task, which reports each
//! application message (a PrivateMessage) it receives with the time it arrived.

mod commit;
mod fanout;
mod idle;
mod keypackages;
mod send;

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use roost_client::transport::{ConnectConfig, ListenStream};
use roost_protocol::messages::queue::{ListenEvent, QueuePayload};
use tokio::sync::mpsc;

use super::clients::{self, BenchClient};
use super::server::BenchServers;
use super::stats::{self, Latencies};
use super::{BenchConfig, WorkloadResult};

/// An application message a pooled client received: (its index in the pool, the group's
/// uuid, when it arrived).
pub(crate) type Arrival = (usize, [u8; 16], Instant);

/// Clients on alpha, each listening on its queue.
pub(crate) struct Pool {
    pub(crate) clients: Vec<BenchClient>,
    pub(crate) arrivals: mpsc::UnboundedReceiver<Arrival>,
    /// Connect + authenticate latencies of the pool's connections.
    pub(crate) connect_latencies: Latencies,
    /// Connections established per second.
    pub(crate) connect_rate: f64,
    /// Server RSS after registration, before the pool connected (bytes).
    pub(crate) rss_before: u64,
    /// Server RSS with every pooled client connected and listening (bytes).
    pub(crate) rss_after: u64,
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
async fn listen_task(index: usize, mut stream: ListenStream, tx: mpsc::UnboundedSender<Arrival>) {
    while let Some(Ok(event)) = stream.next().await {
        if let ListenEvent::Message(message) = event
            && let Some(uuid) = is_private_message(&message.payload)
            && tx.send((index, uuid, Instant::now())).is_err()
        {
            return;
        }
    }
}

impl Pool {
    /// Registers `count` clients on server 0, connects and authenticates them and opens their
    /// listen streams.
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
        let (tx, arrivals) = mpsc::unbounded_channel();
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut opening = tokio::task::JoinSet::new();
        for (index, client) in clients.iter().enumerate() {
            let conn = client.conn()?.clone();
            let limit = limit.clone();
            opening.spawn(async move {
                let _permit = limit.acquire_owned().await?;
                let stream = conn.listen(0).await?;
                Ok::<_, anyhow::Error>((index, stream))
            });
        }
        while let Some(done) = opening.join_next().await {
            let (index, stream) = done??;
            tokio::spawn(listen_task(index, stream, tx.clone()));
        }
        let connect_rate = stats::rate(count, start.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = stats::rss_of(servers.pid(0)).current;
        Ok(Pool {
            clients,
            arrivals,
            connect_latencies,
            connect_rate,
            rss_before,
            rss_after,
        })
    }

    /// Forgets arrivals reported so far.
    pub(crate) fn drain(&mut self) {
        while self.arrivals.try_recv().is_ok() {}
    }
}

/// Sets the progress bar to a new phase of `len` steps.
pub(crate) fn set_phase(progress: &ProgressBar, name: &str, len: usize) {
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
    set_phase(progress, "starting homeservers", 1);
    let servers = BenchServers::start(roost, dir, 2).await?;
    let result = run_on(config, &servers, dir, progress).await;
    let stopped = servers.shutdown().await;
    let results = result?;
    stopped?;
    Ok(results)
}

async fn run_on(
    config: &BenchConfig,
    servers: &BenchServers,
    dir: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<WorkloadResult>> {
    let mut results = Vec::new();
    let alpha = servers.connect_config(0)?;
    if config.selected("keypackages") {
        stats::reset_peak(servers.pid(0));
        results.push(keypackages::run(config, servers, &alpha, progress).await?);
    }
    let mut one_to_one = None;
    if config.selected("send-1to1") {
        stats::reset_peak(servers.pid(0));
        let rows = send::run(config, servers, (0, 0), progress).await?;
        one_to_one = rows.first().map(|r| r.ops_per_sec);
        results.extend(rows);
    }
    if config.selected("federated-send") {
        stats::reset_peak(servers.pid(0));
        let mut rows = send::run(config, servers, (0, 1), progress).await?;
        if let (Some(row), Some(local)) = (rows.first_mut(), one_to_one) {
            send::compare_with_local(row, local);
        }
        results.extend(rows);
    }
    let mut pool_size = 0;
    if config.selected("idle-connections") {
        pool_size = pool_size.max(config.idle);
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
    stats::reset_peak(servers.pid(0));
    let mut pool = Pool::create(servers, &alpha, pool_size, progress).await?;
    if config.selected("idle-connections") {
        results.push(idle::result(config, servers, &pool));
    }
    let domain = servers.domain(0)?;
    set_phase(progress, "owners: register", 1);
    let owners = clients::ready_clients(&alpha, &domain, "o", 1, progress).await?;
    let owner = owners.into_iter().next();
    let Some(owner) = owner else {
        anyhow::bail!("no group owner");
    };
    if config.selected("commit") {
        for (i, &size) in config.commit_sizes.iter().enumerate() {
            stats::reset_peak(servers.pid(0));
            let row =
                commit::run(config, servers, &mut pool, owner.clone(), size, i, progress).await?;
            results.push(row);
        }
    }
    if config.selected("fanout") {
        for (i, &size) in config.members.iter().enumerate() {
            stats::reset_peak(servers.pid(0));
            let row = fanout::run(
                config,
                servers,
                &mut pool,
                owner.clone(),
                size,
                i,
                dir,
                progress,
            )
            .await?;
            results.push(row);
        }
    }
    clients::close_all(&pool.clients);
    Ok(results)
}
