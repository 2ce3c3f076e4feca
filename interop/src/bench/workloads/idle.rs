//! `idle-connections`: K authenticated clients holding listen streams (the [`Pool`]); the
//! server's RSS per connection is the growth of its RSS from before the clients connected
//! (already registered) to a second after every listen stream is open, divided by K. The
//! baseline is a bare quinn server process holding K idle connections of the same client
//! transport in the same run ([`quinn_idle`]): what quinn alone costs per connection, so the
//! difference is roost's own (authentication, listener, buffers).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Pool, set_phase};
use crate::bench::clients;
use crate::bench::quinn::QuinnProcess;
use crate::bench::server::BenchServers;
use crate::bench::stats;
use crate::bench::{BenchConfig, WorkloadResult};

/// The target: server memory per idle listening connection.
const TARGET_BYTES: f64 = 24.0 * 1024.0;

pub(super) fn result(
    config: &BenchConfig,
    servers: &BenchServers,
    pool: &Pool,
    quinn: &QuinnIdle,
) -> WorkloadResult {
    let count = pool.clients.len().max(1);
    let growth = pool.rss_after.saturating_sub(pool.rss_before);
    let per_connection = growth as f64 / count as f64;
    let quinn_bytes = quinn.rss_per_connection;
    WorkloadResult {
        workload: "idle-connections".into(),
        params: json!({ "connections": count, "requested": config.idle }),
        ops_per_sec: pool.connect_rate,
        p50_us: pool.connect_latencies.median(),
        p99_us: pool.connect_latencies.quantile(0.99),
        p999_us: pool.connect_latencies.quantile(0.999),
        server_peak_rss_bytes: stats::rss_of(servers.pid(0)).peak,
        baseline: "bare quinn RSS bytes per idle connection".into(),
        baseline_value: quinn_bytes,
        ratio: if quinn_bytes > 0.0 {
            per_connection / quinn_bytes
        } else {
            0.0
        },
        target: "≤ 24 KiB server RSS per listener".into(),
        met: per_connection <= TARGET_BYTES,
        details: json!({
            "rss_per_connection_bytes": per_connection,
            "quinn_rss_per_connection_bytes": quinn_bytes,
            "overhead_above_quinn_bytes": per_connection - quinn_bytes,
            "quinn_connections": quinn.connections,
            "rss_before_bytes": pool.rss_before,
            "rss_after_bytes": pool.rss_after,
            "ops": "connections (connect + authenticate + listen) per second; latency: connect + authenticate",
        }),
    }
}

/// What the bare quinn server cost in the same run: the baseline of `idle-connections` (RSS
/// per connection) and of `reconnect-storm` (time to set up the connections).
#[derive(Debug, Clone)]
pub(crate) struct QuinnIdle {
    /// Connections held.
    pub(crate) connections: usize,
    /// RSS growth of its process per connection (bytes).
    pub(crate) rss_per_connection: f64,
    /// Time to set up every connection, `concurrency` at a time.
    pub(crate) connect_time: Duration,
    /// Connections set up at a time.
    pub(crate) concurrency: usize,
}

/// Starts a bare quinn server process, opens `count` idle connections to it (the bench's
/// client transport, `concurrency` handshakes at a time), measures its RSS growth, closes
/// them and stops it.
pub(crate) async fn quinn_idle(
    dir: &Path,
    count: usize,
    concurrency: usize,
    progress: &ProgressBar,
) -> anyhow::Result<QuinnIdle> {
    set_phase(progress, "idle-connections: bare quinn baseline", count);
    let exe = crate::binary::locate_interop()?;
    let server = QuinnProcess::spawn(&exe, &[], dir, 50)?;
    let connect = server.connect_config();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = stats::rss_of(server.pid()).current;
    let endpoints = clients::endpoints(&connect, count)?;
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let (connect, limit) = (connect.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            Ok::<_, anyhow::Error>(endpoint.connect(&connect).await?)
        });
    }
    let mut conns = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        conns.push(done??);
        progress.inc(1);
    }
    let connect_time = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = stats::rss_of(server.pid()).current;
    for conn in &conns {
        conn.close();
    }
    drop(conns);
    for endpoint in &endpoints {
        endpoint.close();
    }
    server.stop()?;
    Ok(QuinnIdle {
        connections: count,
        rss_per_connection: after.saturating_sub(before) as f64 / count.max(1) as f64,
        connect_time,
        concurrency,
    })
}
