//! `commit`: add/remove commits in a group of N members (the owner and N−1 pooled clients).
//! The owner alternately removes the last member (a commit with an update path) and adds it
//! back with a fresh KeyPackage (no path). DS time per commit is the Commit request's round
//! trip as the owner sees it: validation by the DS, the durable write of the new state and of
//! one queue entry per member, and the response. The baseline is openmls's `PublicGroup`
//! alone (decode, `process_message`, `merge_commit`) on the very same commits, in this
//! process, while the server is idle.

use std::time::Instant;

use indicatif::ProgressBar;
use openmls_rust_crypto::OpenMlsRustCrypto;
use serde_json::json;

use super::{Pool, set_phase, uuid};
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::GroupOwner;
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};
use crate::bench::{BenchConfig, WorkloadResult};

/// Adds per commit while building the group.
const SETUP_CHUNK: usize = 1_000;
/// The group size the target applies to, and the target ratio.
const TARGET_SIZE: usize = 1_000;
const TARGET_RATIO: f64 = 1.3;

pub(super) async fn run(
    config: &BenchConfig,
    servers: &BenchServers,
    pool: &Pool,
    owner: BenchClient,
    size: usize,
    index: usize,
    progress: &ProgressBar,
) -> anyhow::Result<WorkloadResult> {
    let size = size.clamp(2, pool.clients.len() + 1);
    let members = &pool.clients[..size - 1];
    set_phase(progress, &format!("commit N={size}: group"), 1);
    let mut owner = GroupOwner::create(owner, uuid(3, index)).await?;
    let kps = clients::key_packages(members).await?;
    owner.add_members(kps, SETUP_CHUNK).await?;
    let mut raw = owner.public_group()?;
    let victim = &members[members.len() - 1];

    set_phase(
        progress,
        &format!("commit N={size}: commits"),
        config.commits,
    );
    let mut ds = Latencies::new();
    let mut baseline = Latencies::new();
    let (mut removes, mut adds) = (Latencies::new(), Latencies::new());
    let mut busy = std::time::Duration::ZERO;
    for j in 0..config.commits {
        let bundle = if j % 2 == 0 {
            let leaf = owner.leaf_of(victim)?;
            owner.commit(Vec::new(), &[leaf])?
        } else {
            let kp = victim.key_package(&OpenMlsRustCrypto::default())?;
            owner.commit(vec![kp], &[])?
        };
        let sent = Instant::now();
        owner.send_commit(&bundle).await?;
        let elapsed = sent.elapsed();
        busy += elapsed;
        ds.record(elapsed);
        if j % 2 == 0 {
            removes.record(elapsed);
        } else {
            adds.record(elapsed);
        }
        owner.merge()?;
        baseline.record(raw.process(&bundle.commit)?);
        progress.inc(1);
    }
    let peak = stats::rss_of(servers.pid(0)).peak;

    let raw_median = baseline.median() as f64;
    let ratio = if raw_median > 0.0 {
        ds.median() as f64 / raw_median
    } else {
        0.0
    };
    let has_target = size == TARGET_SIZE;
    Ok(WorkloadResult {
        workload: "commit".into(),
        params: json!({ "members": size, "commits": config.commits }),
        ops_per_sec: stats::rate(ds.len(), busy),
        p50_us: ds.median(),
        p99_us: ds.quantile(0.99),
        p999_us: ds.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: "openmls PublicGroup µs/commit".into(),
        baseline_value: raw_median,
        ratio,
        target: if has_target {
            "DS ≤ 1.3 × PublicGroup".into()
        } else {
            "none (informational)".into()
        },
        met: !has_target || ratio <= TARGET_RATIO,
        details: json!({
            "remove_p50_us": removes.median(),
            "add_p50_us": adds.median(),
            "baseline_p99_us": baseline.quantile(0.99),
            "ops": "commits per second of DS time (one commit in flight)",
        }),
    })
}
