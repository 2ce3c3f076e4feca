//! Workloads around a homeserver restart, on alpha with the pool's clients:
//!
//! - `reconnect-storm`: every pooled client (10,000 by default) holds a listen stream; alpha
//!   is stopped (SIGTERM) and started again, and every client reconnects at once (256
//!   handshakes in flight), authenticates and listens again. Measured: time from the new
//!   process's start until every client listens again, and the new process's peak RSS.
//!   Baseline: the same client code setting up as many connections to a bare quinn server
//!   process at the same concurrency (handshakes only), measured in the same run by
//!   `idle-connections` (or here when that did not run).
//! - `cold-start`: alpha's database filled with 10,000 groups and 1 million queued messages
//!   (built through the homeserver itself, which is fast: one message to a group of N members
//!   is N−1 queue entries in one transaction), and its blob store with 20,000 blobs of 1 KiB
//!   (uploaded by the pooled clients, two each); then the time from process start until an
//!   authenticated client's QueueFetch is answered, over three restarts of the same database.
//!   Baseline: the same on beta, whose database holds next to nothing.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::ProgressBar;
use roost_client::transport::{ConnectConfig, Endpoint};
use roost_protocol::messages::delivery::CreateGroupRequest;
use roost_protocol::messages::queue::QueueFetchRequest;
use serde_json::json;
use tokio::task::JoinSet;

use super::idle::{QuinnIdle, quinn_idle};
use super::{Pool, listen_with, set_phase, uuid};
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::GroupOwner;
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};
use crate::bench::{BenchConfig, WorkloadResult};

/// Handshakes (and listen streams) in flight while the clients reconnect.
pub(crate) const STORM_CONCURRENCY: usize = 256;
/// Target: reconnecting takes at most this × the bare quinn handshakes.
const STORM_TIME_RATIO: f64 = 3.0;
/// Target: the restarted process's peak RSS at most this × the RSS held before the restart.
const STORM_RSS_RATIO: f64 = 1.5;
/// Target: a cold start with the large database at most this × the nearly empty one's.
const COLD_RATIO: f64 = 2.0;
/// Restarts measured per database.
const COLD_ROUNDS: usize = 3;
/// How long a probe's handshake may take before it tries again.
const PROBE_CONNECT: Duration = Duration::from_millis(25);
/// Longest a restarted server may take to serve.
const SERVE_TIMEOUT: Duration = Duration::from_secs(300);
/// CreateGroup requests in flight while filling the database.
const FILL_CONCURRENCY: usize = 64;

/// Waits until `client` can connect, authenticate and have a QueueFetch answered by the
/// server at `connect`; returns when that succeeded.
async fn wait_serving(connect: &ConnectConfig, client: &BenchClient) -> anyhow::Result<Instant> {
    let mut probe = connect.clone();
    probe.connect_timeout = PROBE_CONNECT;
    let endpoint = Endpoint::for_servers(&probe.server_addrs)?;
    let deadline = Instant::now() + SERVE_TIMEOUT;
    while Instant::now() < deadline {
        let Ok(conn) = endpoint.connect(&probe).await else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let input = conn.auth_signing_input(&client.id)?;
        let signature = openmls_traits::signatures::Signer::sign(&*client.key, &input)
            .map_err(|e| anyhow::anyhow!("cannot sign: {e:?}"))?;
        let served = async {
            conn.authenticate(&client.id, |_| signature).await?;
            conn.call(QueueFetchRequest {
                after_seq: 0,
                max_messages: 0,
                max_bytes: 1,
            })
            .await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        conn.close();
        if served.is_ok() {
            let at = Instant::now();
            endpoint.close();
            return Ok(at);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("the server did not serve within {SERVE_TIMEOUT:?}")
}

/// Stops server `index`, starts it again and returns the time until `probe` is served.
async fn restart_and_time(
    servers: &mut BenchServers,
    index: usize,
    probe: &BenchClient,
) -> anyhow::Result<Duration> {
    let connect = servers.connect_config(index)?;
    servers.stop(index).await?;
    let start = Instant::now();
    servers.launch(index)?;
    let served = wait_serving(&connect, probe).await?;
    Ok(served.duration_since(start))
}

pub(super) async fn storm(
    config: &BenchConfig,
    servers: &mut BenchServers,
    pool: &mut Pool,
    quinn: Option<QuinnIdle>,
    dir: &std::path::Path,
    progress: &ProgressBar,
) -> anyhow::Result<WorkloadResult> {
    let count = pool.clients.len();
    let quinn = match quinn {
        Some(quinn) => quinn,
        None => quinn_idle(dir, count, STORM_CONCURRENCY, progress).await?,
    };
    set_phase(progress, "reconnect-storm: listen", 1);
    pool.listening = None;
    pool.listening = Some(listen_with(&pool.clients, STORM_CONCURRENCY).await?);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = stats::rss_of(servers.pid(0)).current;
    let alpha = servers.connect_config(0)?;

    set_phase(progress, "reconnect-storm: restart", 1);
    let probe = pool.clients.first().context("no pooled clients")?.clone();
    servers.stop(0).await?;
    pool.listening = None;
    let start = Instant::now();
    servers.launch(0)?;
    let served = wait_serving(&alpha, &probe).await?;
    set_phase(progress, "reconnect-storm: reconnect", count);
    let latencies =
        clients::connect_all_with(&alpha, &mut pool.clients, progress, STORM_CONCURRENCY).await?;
    pool.listening = Some(listen_with(&pool.clients, STORM_CONCURRENCY).await?);
    let listening = Instant::now();
    let peak = stats::rss_of(servers.pid(0)).peak;

    let total = listening.duration_since(start);
    let reconnect = listening.duration_since(served);
    let quinn_secs = quinn.connect_time.as_secs_f64();
    let ratio = if quinn_secs > 0.0 {
        reconnect.as_secs_f64() / quinn_secs
    } else {
        0.0
    };
    let rss_ratio = if held > 0 {
        peak as f64 / held as f64
    } else {
        0.0
    };
    Ok(WorkloadResult {
        workload: "reconnect-storm".into(),
        params: json!({ "clients": count, "in_flight": STORM_CONCURRENCY, "requested": config.idle }),
        ops_per_sec: stats::rate(count, reconnect),
        p50_us: latencies.median(),
        p99_us: latencies.quantile(0.99),
        p999_us: latencies.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: format!("bare quinn s, {count} handshakes"),
        baseline_value: quinn_secs,
        ratio,
        target: format!(
            "reconnect ≤ {STORM_TIME_RATIO} × bare quinn, peak RSS ≤ {STORM_RSS_RATIO} × held"
        ),
        met: count > 0 && ratio <= STORM_TIME_RATIO && rss_ratio <= STORM_RSS_RATIO,
        details: json!({
            "start_to_all_listening_us": total.as_micros() as u64,
            "start_to_serving_us": served.duration_since(start).as_micros() as u64,
            "serving_to_all_listening_us": reconnect.as_micros() as u64,
            "rss_held_before_restart_bytes": held,
            "peak_rss_over_held": rss_ratio,
            "quinn_concurrency": quinn.concurrency,
            "ops": "clients reconnected (connect + authenticate + listen) per second after the server served again; latency: connect + authenticate",
        }),
    })
}

/// Creates `count` groups of one member (`owner`), each with its own MLS group.
async fn create_groups(
    owner: &BenchClient,
    count: usize,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    set_phase(progress, "cold-start: groups", count);
    let conn = owner.conn()?.clone();
    fill(count, progress, |i| {
        let (owner, conn) = (owner.clone(), conn.clone());
        Ok(async move {
            let request: CreateGroupRequest =
                tokio::task::spawn_blocking(move || GroupOwner::create_request(&owner, uuid(9, i)))
                    .await??;
            conn.call(request).await?;
            Ok(())
        })
    })
    .await
}

/// Runs `job(0..count)` with [`FILL_CONCURRENCY`] of them at once, counting each done on
/// `progress`; the first error ends it.
async fn fill<F, J>(count: usize, progress: &ProgressBar, mut job: J) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    J: FnMut(usize) -> anyhow::Result<F>,
{
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(FILL_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let (work, limit) = (job(i)?, limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            work.await
        });
        // Bound the tasks waiting for a permit.
        while tasks.len() >= 4 * FILL_CONCURRENCY {
            if let Some(done) = tasks.join_next().await {
                done??;
                progress.inc(1);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
        progress.inc(1);
    }
    Ok(())
}

/// Data files (named by their 64-hex-digit address) in the file blob store of the data
/// directory `data` (0 with PostgreSQL, whose blobs are in the database).
fn blob_files(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("blobs"))
        .map(|dir| dir.flatten().filter(|e| e.file_name().len() == 64).count())
        .unwrap_or(0)
}

/// Size of each blob `cold-start` stores.
const COLD_BLOB_BYTES: usize = 1024;

/// Uploads `count` distinct blobs of [`COLD_BLOB_BYTES`] through `clients` in turn
/// ([`FILL_CONCURRENCY`] at once; a client uploads `count / clients` of them, within the
/// default upload rate when there are enough clients).
async fn store_blobs(
    clients: &[BenchClient],
    count: usize,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    if count == 0 {
        return Ok(());
    }
    anyhow::ensure!(!clients.is_empty(), "no pooled clients to upload blobs");
    set_phase(progress, "cold-start: blobs", count);
    fill(count, progress, |i| {
        let conn = clients[i % clients.len()].conn()?.clone();
        Ok(async move {
            let mut bytes = vec![0u8; COLD_BLOB_BYTES];
            bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let mut upload = conn.start_blob_upload(bytes.len() as u64).await?;
            upload.write(&bytes).await?;
            upload.finish().await?;
            Ok(())
        })
    })
    .await
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn cold_start(
    config: &BenchConfig,
    servers: &mut BenchServers,
    pool: &mut Pool,
    owner: &BenchClient,
    big: Option<GroupOwner>,
    progress: &ProgressBar,
) -> anyhow::Result<WorkloadResult> {
    // Nobody listens or acks while the queues fill.
    pool.listening = None;
    let build = Instant::now();
    create_groups(owner, config.cold_groups, progress).await?;
    let mut big = match big {
        Some(group) => group,
        None => {
            set_phase(progress, "cold-start: a group of the pool", 1);
            let mut group = GroupOwner::create(owner.clone(), uuid(9, usize::MAX >> 8)).await?;
            let kps = clients::key_packages(&pool.clients).await?;
            group.add_members(kps, 1_000).await?;
            group
        }
    };
    let recipients = big.size().saturating_sub(1).max(1);
    let messages = config.cold_queued.div_ceil(recipients);
    set_phase(progress, "cold-start: queue messages", messages);
    for _ in 0..messages {
        let request = big.message(b"cold-start")?;
        big.client.conn()?.call(request).await?;
        progress.inc(1);
    }
    let blobs_before = blob_files(&servers.data_dir(0)?);
    store_blobs(&pool.clients, config.cold_blobs, progress).await?;
    let build_time = build.elapsed();
    let queued = messages * recipients;
    let data_bytes = dir_bytes(&servers.data_dir(0)?);
    let blobs_held = blob_files(&servers.data_dir(0)?);

    // A client of beta for the baseline's probe.
    let beta = servers.connect_config(1)?;
    let beta_domain = servers.domain(1)?;
    let beta_probe = clients::register(&beta, &beta_domain, "cold", 1, progress)
        .await?
        .into_iter()
        .next()
        .context("no beta client")?;
    set_phase(progress, "cold-start: restarts", 2 * COLD_ROUNDS);
    let probe = pool.clients.first().context("no pooled clients")?.clone();
    clients::close_all(&pool.clients);
    big.client.conn()?.close();
    let mut alpha = Latencies::new();
    let mut empty = Latencies::new();
    for _ in 0..COLD_ROUNDS {
        empty.record(restart_and_time(servers, 1, &beta_probe).await?);
        progress.inc(1);
        alpha.record(restart_and_time(servers, 0, &probe).await?);
        progress.inc(1);
    }
    let peak = stats::rss_of(servers.pid(0)).peak;
    let ratio = if empty.median() > 0 {
        alpha.median() as f64 / empty.median() as f64
    } else {
        0.0
    };
    Ok(WorkloadResult {
        workload: "cold-start".into(),
        params: json!({
            "groups": config.cold_groups,
            "queued_messages": queued,
            "requested_queued": config.cold_queued,
            "blobs": config.cold_blobs,
        }),
        ops_per_sec: if alpha.median() > 0 {
            1e6 / alpha.median() as f64
        } else {
            0.0
        },
        p50_us: alpha.median(),
        p99_us: alpha.quantile(0.99),
        p999_us: alpha.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: "µs to serve, near-empty database (beta)".into(),
        baseline_value: empty.median() as f64,
        ratio,
        target: format!("≤ {COLD_RATIO} × near-empty start"),
        met: !alpha.is_empty() && ratio <= COLD_RATIO,
        details: json!({
            "restarts": COLD_ROUNDS,
            "build_seconds": build_time.as_secs_f64(),
            "data_dir_bytes": data_bytes,
            "blob_files": blobs_held,
            "blob_files_added": blobs_held.saturating_sub(blobs_before),
            "messages_sent": messages,
            "group_members": recipients + 1,
            "ops": "starts per second (1 / median start); latency: process start → an authenticated QueueFetch answered",
        }),
    })
}
