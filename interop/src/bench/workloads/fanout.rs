//! `fanout`: one sender, a group of N members (the sender and N−1 pooled clients, all
//! listening). Per message: the time until the SendMessage is acknowledged, i.e. every
//! member's queue holds it durably (the DS answers after the transaction with the N−1 queue
//! entries committed), and the time until every listener got it pushed. The baseline is the
//! raw engine: one durable transaction inserting N−1 queue-entry-shaped rows, one per client
//! (redb, or PostgreSQL when the servers run on it).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::ProgressBar;
use serde_json::json;

use super::{Pool, listen, set_phase, uuid};
use crate::bench::baseline::{postgres_insert, redb_insert};
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::GroupOwner;
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};
use crate::bench::{BenchConfig, WorkloadResult};

/// Adds per commit while building the group.
const SETUP_CHUNK: usize = 1_000;
/// Longest wait for every listener to get one message.
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Transactions of the raw baseline.
const BASELINE_ROUNDS: usize = 20;
/// Target at N = 1,000: durable fan-out ≤ this × the raw engine's transaction.
const DURABLE_RATIO: f64 = 1.5;
/// Target at N = 10,000: every listener pushed within this (µs), the slowest message.
const ALL_PUSHED_US: u64 = 250_000;

/// The raw engine the fan-out is compared with.
pub(super) enum Baseline<'a> {
    /// A redb file in this directory.
    Redb(&'a Path),
    /// A PostgreSQL database (connection string).
    Postgres(&'a str),
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    config: &BenchConfig,
    servers: &BenchServers,
    pool: &Pool,
    owner: BenchClient,
    size: usize,
    index: usize,
    baseline: &Baseline<'_>,
    progress: &ProgressBar,
) -> anyhow::Result<(WorkloadResult, GroupOwner)> {
    let size = size.clamp(2, pool.clients.len() + 1);
    let receivers = size - 1;
    set_phase(progress, &format!("fanout N={size}: group"), 1);
    let group_uuid = uuid(4, index);
    let mut owner = GroupOwner::create(owner, group_uuid).await?;
    let kps = clients::key_packages(&pool.clients[..receivers]).await?;
    owner.add_members(kps, SETUP_CHUNK).await?;
    set_phase(progress, &format!("fanout N={size}: listen"), 1);
    let listening = listen(&pool.clients[..receivers]).await?;
    listening.arrivals.watch(group_uuid)?;

    set_phase(
        progress,
        &format!("fanout N={size}: messages"),
        config.fanout_rounds,
    );
    let mut durable = Latencies::new();
    let mut pushed = Latencies::new();
    let mut text = b"fanout".to_vec();
    text.resize(config.fanout_message_bytes.max(text.len()), 0);
    for round in 1..=config.fanout_rounds as u64 {
        let request = owner.message(&text)?;
        listening.arrivals.start_round(round);
        let sent = Instant::now();
        owner.client.conn()?.call(request).await?;
        durable.record(sent.elapsed());
        let deadline = tokio::time::Instant::now() + PUSH_TIMEOUT;
        let last = match listening.arrivals.all_arrived(deadline).await {
            Ok(last) => last.max(sent),
            Err(got) => {
                bail!("only {got} of {receivers} listeners got the message within {PUSH_TIMEOUT:?}")
            }
        };
        pushed.record(last.duration_since(sent));
        progress.inc(1);
    }
    let peak = stats::rss_of(servers.pid(0)).peak;
    drop(listening);

    let (engine, baseline) = match baseline {
        Baseline::Redb(dir) => ("redb", redb_insert(dir, receivers, BASELINE_ROUNDS)?),
        Baseline::Postgres(url) => (
            "PostgreSQL",
            postgres_insert(url, receivers, BASELINE_ROUNDS).await?,
        ),
    };
    let baseline_us = baseline.as_micros() as f64;
    let durable_p50 = durable.median();
    let ratio = if baseline_us > 0.0 {
        durable_p50 as f64 / baseline_us
    } else {
        0.0
    };
    let pushed_max = pushed.quantile(1.0);
    let (target, met) = match size {
        1_000 => (
            format!("durable ≤ {DURABLE_RATIO} × {engine} insert"),
            ratio <= DURABLE_RATIO,
        ),
        10_000 => (
            "all listeners pushed ≤ 0.25 s".to_owned(),
            pushed_max <= ALL_PUSHED_US,
        ),
        _ => ("none (informational)".to_owned(), true),
    };
    let row = WorkloadResult {
        workload: "fanout".into(),
        params: json!({
            "members": size,
            "messages": config.fanout_rounds,
            "message_bytes": text.len(),
        }),
        ops_per_sec: if durable_p50 > 0 {
            receivers as f64 * 1e6 / durable_p50 as f64
        } else {
            0.0
        },
        p50_us: durable_p50,
        p99_us: durable.quantile(0.99),
        p999_us: durable.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: format!("{engine} µs, {receivers} rows/txn"),
        baseline_value: baseline_us,
        ratio,
        target,
        met,
        details: json!({
            "all_pushed_p50_us": pushed.median(),
            "all_pushed_max_us": pushed_max,
            "ops": "queue deliveries per second (durable); latency: send until durable in every queue",
        }),
    };
    Ok((row, owner))
}
