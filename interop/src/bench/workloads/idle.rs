//! `idle-connections`: K authenticated clients holding listen streams (the [`Pool`]); the
//! server's RSS per connection is the growth of its RSS from before the clients connected
//! (already registered) to a second after every listen stream is open, divided by K.

use serde_json::json;

use super::Pool;
use crate::bench::server::BenchServers;
use crate::bench::stats;
use crate::bench::{BenchConfig, WorkloadResult};

/// The target: server memory per idle listening connection.
const TARGET_BYTES: f64 = 64.0 * 1024.0;

pub(super) fn result(config: &BenchConfig, servers: &BenchServers, pool: &Pool) -> WorkloadResult {
    let count = pool.clients.len().max(1);
    let growth = pool.rss_after.saturating_sub(pool.rss_before);
    let per_connection = growth as f64 / count as f64;
    WorkloadResult {
        workload: "idle-connections".into(),
        params: json!({ "connections": count, "requested": config.idle }),
        ops_per_sec: pool.connect_rate,
        p50_us: pool.connect_latencies.median(),
        p99_us: pool.connect_latencies.quantile(0.99),
        p999_us: pool.connect_latencies.quantile(0.999),
        server_peak_rss_bytes: stats::rss_of(servers.pid(0)).peak,
        baseline: "64 KiB per connection".into(),
        baseline_value: TARGET_BYTES,
        ratio: per_connection / TARGET_BYTES,
        target: "≤ 64 KiB server RSS per listener".into(),
        met: per_connection <= TARGET_BYTES,
        details: json!({
            "rss_per_connection_bytes": per_connection,
            "rss_before_bytes": pool.rss_before,
            "rss_after_bytes": pool.rss_after,
            "ops": "connections (connect + authenticate + listen) per second; latency: connect + authenticate",
        }),
    }
}
