//! `keypackages`: concurrent claims. T target clients each upload K distinct KeyPackages
//! (built here with openmls); C claiming clients then claim all T × K of them concurrently with
//! ClaimClientKeyPackage, round-robin over the targets. Every claimed KeyPackage is kept: the
//! workload fails its target if any is handed out twice or a claim is refused while stock
//! remains. The baseline is the raw quinn echo at the same concurrency and sizes.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use roost_client::transport::ConnectConfig;
use roost_protocol::frame::encode_frame;
use roost_protocol::messages::Operation as _;
use roost_protocol::messages::keypackage::{
    ClaimClientKeyPackageRequest, KeyPackageKind, UploadKeyPackagesRequest,
};
use serde_json::json;
use tls_codec::Serialize as _;
use tokio::task::JoinSet;

use super::set_phase;
use crate::bench::baseline::{EchoServer, echo_rate};
use crate::bench::clients::{self, BenchClient};
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};
use crate::bench::{BenchConfig, WorkloadResult};

/// KeyPackages per upload request (the server's default maximum).
const UPLOAD_BATCH: usize = 100;
/// Target: claims/s ≥ this × the raw quinn echo at the same concurrency.
const TARGET_RATIO: f64 = 0.40;

/// Builds and uploads `count` KeyPackages for `client`.
async fn stock(client: BenchClient, count: usize) -> anyhow::Result<()> {
    let mut left = count;
    while left > 0 {
        let n = left.min(UPLOAD_BATCH);
        let builder = client.clone();
        let kps = tokio::task::spawn_blocking(move || {
            let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
            (0..n)
                .map(|_| {
                    Ok(builder
                        .key_package(&provider)?
                        .tls_serialize_detached()?
                        .into())
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        client
            .conn()?
            .call(UploadKeyPackagesRequest {
                key_packages: kps,
                last_resort: None,
            })
            .await?;
        left -= n;
    }
    Ok(())
}

/// What one claiming client saw.
#[derive(Default)]
struct Claimed {
    latencies: Latencies,
    key_packages: Vec<Vec<u8>>,
    refused: usize,
    last_resort: usize,
}

pub(super) async fn run(
    config: &BenchConfig,
    servers: &BenchServers,
    connect: &ConnectConfig,
    progress: &ProgressBar,
) -> anyhow::Result<WorkloadResult> {
    let domain = servers.domain(0)?;
    let per_target = config.kp_per_target.min(1_000);
    let total = config.kp_targets * per_target;
    set_phase(
        progress,
        "keypackages: clients",
        2 * (config.kp_targets + config.claimers),
    );
    let targets =
        clients::ready_clients(connect, &domain, "kt", config.kp_targets, progress).await?;
    let claimers =
        clients::ready_clients(connect, &domain, "kc", config.claimers, progress).await?;
    set_phase(progress, "keypackages: upload", config.kp_targets);
    let mut uploads = JoinSet::new();
    for target in &targets {
        uploads.spawn(stock(target.clone(), per_target));
    }
    while let Some(done) = uploads.join_next().await {
        done??;
        progress.inc(1);
    }

    set_phase(progress, "keypackages: claim", total);
    let ids: Arc<Vec<_>> = Arc::new(targets.iter().map(|t| t.id.clone()).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for claimer in &claimers {
        let conn = claimer.conn()?.clone();
        let (ids, next, progress) = (ids.clone(), next.clone(), progress.clone());
        tasks.spawn(async move {
            let mut claimed = Claimed::default();
            // At most `total` claims over all claimers.
            for _ in 0..total {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let client = ids[i % ids.len()].clone();
                let sent = Instant::now();
                match conn.call(ClaimClientKeyPackageRequest { client }).await {
                    Ok(response) => {
                        claimed.latencies.record(sent.elapsed());
                        if response.key_package.kind == KeyPackageKind::LastResort {
                            claimed.last_resort += 1;
                        }
                        claimed
                            .key_packages
                            .push(response.key_package.key_package.as_slice().to_vec());
                    }
                    Err(_) => claimed.refused += 1,
                }
                progress.inc(1);
            }
            claimed
        });
    }
    let mut latencies = Latencies::new();
    let mut seen = HashSet::with_capacity(total);
    let (mut duplicates, mut refused, mut last_resort, mut claims) = (0, 0, 0, 0);
    while let Some(done) = tasks.join_next().await {
        let claimed = done?;
        latencies.merge(claimed.latencies);
        refused += claimed.refused;
        last_resort += claimed.last_resort;
        for kp in claimed.key_packages {
            claims += 1;
            if !seen.insert(kp) {
                duplicates += 1;
            }
        }
    }
    let ops = stats::rate(claims, start.elapsed());
    let peak = stats::rss_of(servers.pid(0)).peak;
    clients::close_all(&targets);
    clients::close_all(&claimers);

    set_phase(progress, "keypackages: quinn baseline", 1);
    let request_len = encode_frame(
        &ClaimClientKeyPackageRequest {
            client: ids[0].clone(),
        }
        .into_request(),
    )?
    .len();
    let response_len = seen.iter().next().map_or(300, |kp| kp.len() + 100);
    let echo = EchoServer::start(response_len)?;
    let duration = config.duration.min(Duration::from_secs(3));
    let (echo_ops, _) = echo_rate(&echo, config.claimers, request_len, duration).await?;
    echo.stop();

    let unique = duplicates == 0 && refused == 0 && last_resort == 0 && claims == total;
    let ratio = if echo_ops > 0.0 { ops / echo_ops } else { 0.0 };
    Ok(WorkloadResult {
        workload: "keypackages".into(),
        params: json!({ "targets": config.kp_targets, "per_target": per_target, "claimers": config.claimers }),
        ops_per_sec: ops,
        p50_us: latencies.median(),
        p99_us: latencies.quantile(0.99),
        p999_us: latencies.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: format!("quinn echo req/s, {} conns", config.claimers),
        baseline_value: echo_ops,
        ratio,
        target: format!("≥ {TARGET_RATIO:.2} × quinn echo, none twice"),
        met: unique && ratio >= TARGET_RATIO,
        details: json!({
            "claims": claims,
            "unique": seen.len(),
            "duplicates": duplicates,
            "refused": refused,
            "last_resort": last_resort,
        }),
    })
}
