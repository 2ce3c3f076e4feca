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
use roost_protocol::ClientId;
use roost_protocol::frame::encode_frame;
use roost_protocol::messages::Operation as _;
use roost_protocol::messages::Response;
use roost_protocol::messages::keypackage::{
    ClaimClientKeyPackageRequest, ClaimClientKeyPackageResponse, ClaimedKeyPackage, KeyPackageKind,
    UploadKeyPackagesRequest,
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
    sample: Option<ClaimedKeyPackage>,
    refused: usize,
    last_resort: usize,
}

/// What every claimer saw together.
pub(super) struct Outcome {
    pub(super) latencies: Latencies,
    /// Distinct KeyPackages handed out.
    pub(super) seen: HashSet<Vec<u8>>,
    pub(super) claims: usize,
    pub(super) duplicates: usize,
    pub(super) refused: usize,
    pub(super) last_resort: usize,
    /// One claimed KeyPackage as answered (for the response's size).
    sample: Option<ClaimedKeyPackage>,
}

impl Outcome {
    /// Every one of `total` claims answered with an ordinary KeyPackage, none handed out twice.
    pub(super) fn unique(&self, total: usize) -> bool {
        self.duplicates == 0 && self.refused == 0 && self.last_resort == 0 && self.claims == total
    }

    /// The frame sizes of a claim of `target` (request with its length prefix, response
    /// without: what the echo servers take).
    pub(super) fn frame_sizes(&self, target: &ClientId) -> anyhow::Result<(usize, usize)> {
        let request = ClaimClientKeyPackageRequest {
            client: target.clone(),
        };
        let request_len = encode_frame(&request.into_request())?.len();
        let Some(key_package) = self.sample.clone() else {
            anyhow::bail!("no KeyPackage was claimed");
        };
        let response =
            Response::ClaimClientKeyPackage(ClaimClientKeyPackageResponse { key_package });
        Ok((request_len, encode_frame(&response)?.len() - 4))
    }
}

/// Stocks each of `targets` with `per_target` KeyPackages, all uploading at once.
pub(super) async fn stock_all(
    targets: &[BenchClient],
    per_target: usize,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let mut uploads = JoinSet::new();
    for target in targets {
        uploads.spawn(stock(target.clone(), per_target));
    }
    while let Some(done) = uploads.join_next().await {
        done??;
        progress.inc(1);
    }
    Ok(())
}

/// `total` ClaimClientKeyPackage requests round-robin over `ids`, every claimer sending one at
/// a time, all claimers at once; every claimed KeyPackage is kept and checked for duplicates.
pub(super) async fn claim_all(
    claimers: &[BenchClient],
    ids: &[ClientId],
    total: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Outcome> {
    let ids: Arc<Vec<ClientId>> = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for claimer in claimers {
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
                        if claimed.sample.is_none() {
                            claimed.sample = Some(response.key_package);
                        }
                    }
                    Err(_) => claimed.refused += 1,
                }
                progress.inc(1);
            }
            claimed
        });
    }
    let mut outcome = Outcome {
        latencies: Latencies::new(),
        seen: HashSet::with_capacity(total),
        claims: 0,
        duplicates: 0,
        refused: 0,
        last_resort: 0,
        sample: None,
    };
    while let Some(done) = tasks.join_next().await {
        let claimed = done?;
        outcome.latencies.merge(claimed.latencies);
        outcome.refused += claimed.refused;
        outcome.last_resort += claimed.last_resort;
        outcome.sample = outcome.sample.or(claimed.sample);
        for kp in claimed.key_packages {
            outcome.claims += 1;
            if !outcome.seen.insert(kp) {
                outcome.duplicates += 1;
            }
        }
    }
    Ok(outcome)
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
    stock_all(&targets, per_target, progress).await?;

    set_phase(progress, "keypackages: claim", total);
    let ids: Vec<ClientId> = targets.iter().map(|t| t.id.clone()).collect();
    let start = Instant::now();
    let outcome = claim_all(&claimers, &ids, total, progress).await?;
    let ops = stats::rate(outcome.claims, start.elapsed());
    let peak = stats::rss_of(servers.pid(0)).peak;
    clients::close_all(&targets);
    clients::close_all(&claimers);

    set_phase(progress, "keypackages: quinn baseline", 1);
    let (request_len, response_len) = outcome.frame_sizes(&ids[0])?;
    let echo = EchoServer::start(response_len)?;
    let duration = config.duration.min(Duration::from_secs(3));
    let (echo_ops, _) = echo_rate(&echo, config.claimers, request_len, duration).await?;
    echo.stop();

    let unique = outcome.unique(total);
    let ratio = if echo_ops > 0.0 { ops / echo_ops } else { 0.0 };
    Ok(WorkloadResult {
        workload: "keypackages".into(),
        params: json!({ "targets": config.kp_targets, "per_target": per_target, "claimers": config.claimers }),
        ops_per_sec: ops,
        p50_us: outcome.latencies.median(),
        p99_us: outcome.latencies.quantile(0.99),
        p999_us: outcome.latencies.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: format!("quinn echo req/s, {} conns", config.claimers),
        baseline_value: echo_ops,
        ratio,
        target: format!("≥ {TARGET_RATIO:.2} × quinn echo, none twice"),
        met: unique && ratio >= TARGET_RATIO,
        details: json!({
            "claims": outcome.claims,
            "unique": outcome.seen.len(),
            "duplicates": outcome.duplicates,
            "refused": outcome.refused,
            "last_resort": outcome.last_resort,
        }),
    })
}
