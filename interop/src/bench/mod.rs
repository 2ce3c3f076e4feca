//! `roost-interop bench`: a load generator against real homeservers.
//!
//! [`run`] starts two release `roost` processes (a [`crate::harness::Harness`] with limits
//! that do not throttle one load generator, see [`server`]), creates the users, groups and
//! KeyPackages each workload needs with raw requests and openmls ([`clients`], [`mls`]), runs
//! the named workloads and measures, in the same run, the baselines they are compared with
//! ([`baseline`]): raw quinn request/response, raw redb durable inserts and raw openmls
//! `PublicGroup` processing. Every loop is bounded in count and in time; all traffic goes to
//! 127.0.0.1.
//!
//! Workloads (in the order they run): `keypackages`, `send-1to1`, `federated-send`,
//! `busy-group`, `blob`, `idle-connections`, `commit`, `fanout`, `join-large`, `reconnect-storm`,
//! `cold-start` (the last two restart alpha). Each yields one or more [`WorkloadResult`]s, printed
//! as a table ([`print_table`]) or as one JSON object per line ([`print_json`]).

pub mod baseline;
pub mod clients;
pub mod mls;
pub mod quinn;
pub mod server;
pub mod stats;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::binary::{Profile, locate_roost};
use crate::harness::Storage;

/// Every workload, in the order [`run`] runs them.
pub const WORKLOADS: [&str; 11] = [
    "keypackages",
    "send-1to1",
    "federated-send",
    "busy-group",
    "blob",
    "idle-connections",
    "commit",
    "fanout",
    "join-large",
    "reconnect-storm",
    "cold-start",
];

/// Workloads that run only when named (`--workload instructions`): not part of the full run.
pub const OPTIONAL_WORKLOADS: [&str; 1] = ["instructions"];

/// What to run and how hard.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The `roost` binary; `None`: build it in release mode.
    pub roost: Option<PathBuf>,
    /// Workloads to run (names of [`WORKLOADS`]); empty: all.
    pub workloads: Vec<String>,
    /// Concurrent sender/receiver pairs of `send-1to1` and `federated-send`.
    pub pairs: usize,
    /// How long each measured phase of the send workloads runs.
    pub duration: Duration,
    /// Group sizes (members, the sender included) of `fanout`.
    pub members: Vec<usize>,
    /// Messages sent per group size in `fanout`.
    pub fanout_rounds: usize,
    /// Plaintext bytes of each `fanout` message (at least 6: "fanout", then zeros).
    pub fanout_message_bytes: usize,
    /// Group sizes of `commit`.
    pub commit_sizes: Vec<usize>,
    /// Commits per group size (alternately a remove and an add).
    pub commits: usize,
    /// Clients whose KeyPackages are claimed in `keypackages`.
    pub kp_targets: usize,
    /// KeyPackages uploaded per target (at most 1,000, the server's default cap).
    pub kp_per_target: usize,
    /// Concurrent claiming clients.
    pub claimers: usize,
    /// Authenticated clients holding listen streams in `idle-connections` (and reconnecting
    /// in `reconnect-storm`).
    pub idle: usize,
    /// Members of `busy-group`, all sending at once.
    pub busy_members: usize,
    /// Members of the group `join-large` adds one to.
    pub join_members: usize,
    /// Groups in `cold-start`'s database.
    pub cold_groups: usize,
    /// Queued messages (queue entries) in `cold-start`'s database, at least.
    pub cold_queued: usize,
    /// Blobs of 1 KiB in `cold-start`'s blob store.
    pub cold_blobs: usize,
    /// Messages counted by `instructions` (and echo requests of its baseline).
    pub callgrind_messages: usize,
    /// Pairs (and echo connections) of `instructions`.
    pub callgrind_pairs: usize,
    /// Size of the large blobs of `blob` (bytes), and how many clients upload one at once.
    pub blob_large: usize,
    /// Concurrent large uploads of `blob`.
    pub blob_concurrent: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Directory for the servers' data and logs; `None`: a temporary directory.
    pub dir: Option<PathBuf>,
    /// Storage engine of the servers. With PostgreSQL, `send-1to1` also runs on redb in the
    /// same run (the baseline of the PostgreSQL figure) and `fanout` compares with a raw
    /// PostgreSQL insert.
    pub storage: Storage,
    /// Nodes per domain (PostgreSQL). With two or more, `send-1to1` also runs with its pairs
    /// spread over the nodes, compared with all on one node.
    pub nodes: usize,
}

impl Default for BenchConfig {
    /// The full run (a few minutes on two cores).
    fn default() -> Self {
        Self {
            roost: None,
            workloads: Vec::new(),
            pairs: 100,
            duration: Duration::from_secs(5),
            members: vec![10, 100, 1_000, 10_000],
            fanout_rounds: 10,
            fanout_message_bytes: 6,
            commit_sizes: vec![100, 1_000],
            commits: 20,
            kp_targets: 20,
            kp_per_target: 1_000,
            claimers: 32,
            idle: 10_000,
            busy_members: 50,
            join_members: 10_000,
            cold_groups: 10_000,
            cold_queued: 1_000_000,
            cold_blobs: 20_000,
            callgrind_messages: 2_000,
            callgrind_pairs: 10,
            blob_large: 64 << 20,
            blob_concurrent: 16,
            progress: true,
            dir: None,
            storage: Storage::Redb,
            nodes: 1,
        }
    }
}

impl BenchConfig {
    /// Every workload with tiny parameters: a few seconds, for CI (no speed assertions).
    pub fn smoke() -> Self {
        Self {
            pairs: 4,
            duration: Duration::from_millis(300),
            members: vec![3, 10],
            fanout_rounds: 2,
            commit_sizes: vec![5],
            commits: 4,
            kp_targets: 2,
            kp_per_target: 20,
            claimers: 4,
            idle: 20,
            busy_members: 4,
            join_members: 10,
            cold_groups: 20,
            cold_queued: 200,
            cold_blobs: 20,
            callgrind_messages: 20,
            callgrind_pairs: 2,
            blob_large: 2 << 20,
            blob_concurrent: 2,
            progress: false,
            ..Self::default()
        }
    }

    fn selected(&self, name: &str) -> bool {
        self.workloads.is_empty() || self.named(name)
    }

    /// Whether `name` was asked for by name.
    fn named(&self, name: &str) -> bool {
        self.workloads.iter().any(|w| w == name)
    }
}

/// One measured figure, with its same-run baseline and target.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// The workload's name.
    pub workload: String,
    /// Its parameters.
    pub params: serde_json::Value,
    /// Operations per second (what an operation is depends on the workload; see `unit`).
    pub ops_per_sec: f64,
    /// Median latency (µs) of one operation.
    pub p50_us: u64,
    /// 99th percentile latency (µs).
    pub p99_us: u64,
    /// 99.9th percentile latency (µs).
    pub p999_us: u64,
    /// Peak RSS of the (sending side's) homeserver during the workload (bytes).
    pub server_peak_rss_bytes: u64,
    /// Name of the same-run baseline.
    pub baseline: String,
    /// The baseline's value (unit in the name).
    pub baseline_value: f64,
    /// The figure the target constrains divided by the baseline.
    pub ratio: f64,
    /// The target, in words.
    pub target: String,
    /// Whether the target is met (always true for informational rows).
    pub met: bool,
    /// Further figures of this workload.
    pub details: serde_json::Value,
}

/// Runs the selected workloads and returns their results (also printed as they complete
/// when `out` is given: the table or JSON lines).
pub fn run(config: BenchConfig) -> anyhow::Result<Vec<WorkloadResult>> {
    for name in &config.workloads {
        if !WORKLOADS.contains(&name.as_str()) && !OPTIONAL_WORKLOADS.contains(&name.as_str()) {
            bail!(
                "unknown workload {name}; known: {}, {}",
                WORKLOADS.join(", "),
                OPTIONAL_WORKLOADS.join(", ")
            );
        }
    }
    let roost = locate_roost(config.roost.as_deref(), &Profile::Release)
        .context("cannot find or build the roost binary")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    workloads::LOG_PHASES.store(
        config.progress && !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::sync::atomic::Ordering::Relaxed,
    );
    let progress = if config.progress {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg:32} [{bar:30}] {pos}/{len}")
                .context("progress template")?
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let temp;
    let dir = match &config.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("roost-bench").tempdir()?;
            temp.path().to_owned()
        }
    };
    let results = runtime.block_on(workloads::run_all(&config, &roost, &dir, &progress));
    progress.finish_and_clear();
    results
}

/// Prints results as a table.
pub fn print_table(
    results: &[WorkloadResult],
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<18} {:<22} {:>11} {:>9} {:>9} {:>9} {:>9} {:<30} {:>11} {:>7}  target",
        "workload",
        "params",
        "ops/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "RSS MiB",
        "baseline",
        "value",
        "ratio"
    )?;
    for r in results {
        let params = compact_params(&r.params);
        writeln!(
            out,
            "{:<18} {:<22} {:>11.0} {:>9} {:>9} {:>9} {:>9.1} {:<30} {:>11.1} {:>7.2}  {} [{}]",
            r.workload,
            params,
            r.ops_per_sec,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.server_peak_rss_bytes as f64 / (1024.0 * 1024.0),
            r.baseline,
            r.baseline_value,
            r.ratio,
            r.target,
            if r.met { "met" } else { "MISSED" }
        )?;
    }
    Ok(())
}

/// Prints results as one JSON object per line.
pub fn print_json(results: &[WorkloadResult], out: &mut impl std::io::Write) -> anyhow::Result<()> {
    for r in results {
        writeln!(out, "{}", serde_json::to_string(r)?)?;
    }
    Ok(())
}

fn compact_params(params: &serde_json::Value) -> String {
    match params {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}
