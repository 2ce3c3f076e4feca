//! `join-large`: a new member added to a group of N members (10,000 by default: the pool and
//! the group's creator; the `fanout` workload's largest group when it has that size). The
//! creator commits the add with the ratchet tree in the Welcome (as the SDK does); the new
//! member, listening, gets the Welcome pushed and joins from it with openmls.
//!
//! Two rows: the commit's round trip as the creator sees it, beside openmls's `PublicGroup`
//! processing the very same commit in this process; and the new member's time to join (from
//! the creator's answer until the member holds the group), beside openmls alone joining from
//! the very same Welcome (a copy of the member's keys). Targets: commit ≤ 1.5 × PublicGroup
//! (the DS's MLS work plus one durable N-entry fan-out, the same allowance as `fanout`'s);
//! join ≤ 1.25 × openmls (the member's own MLS work dominates: verifying N leaves; what the
//! server adds is pushing one Welcome).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::ProgressBar;
use openmls_rust_crypto::OpenMlsRustCrypto;
use roost_protocol::messages::queue::{ListenEvent, QueuePayload};
use serde_json::json;

use super::{Pool, set_phase, uuid};
use crate::bench::WorkloadResult;
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::{GroupOwner, copy_provider, join_group};
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};

/// Target: commit round trip ≤ this × PublicGroup.
const COMMIT_RATIO: f64 = 1.5;
/// Target: join ≤ this × openmls alone.
const JOIN_RATIO: f64 = 1.25;
/// Longest wait for the Welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds a group of the creator and the first `size − 1` pooled clients.
pub(super) async fn build_group(
    owner: BenchClient,
    pool: &Pool,
    size: usize,
    progress: &ProgressBar,
) -> anyhow::Result<GroupOwner> {
    set_phase(progress, &format!("join-large N={size}: group"), 1);
    let members = size.clamp(2, pool.clients.len() + 1) - 1;
    let mut group = GroupOwner::create(owner, uuid(8, size)).await?;
    let kps = clients::key_packages(&pool.clients[..members]).await?;
    group.add_members(kps, 1_000).await?;
    Ok(group)
}

fn row(
    params: serde_json::Value,
    latency: Duration,
    peak: u64,
    baseline_name: &str,
    baseline: Duration,
    limit: f64,
    details: serde_json::Value,
) -> WorkloadResult {
    let us = latency.as_micros() as u64;
    let base = baseline.as_micros() as f64;
    let ratio = if base > 0.0 { us as f64 / base } else { 0.0 };
    let mut one = Latencies::new();
    one.record(latency);
    WorkloadResult {
        workload: "join-large".into(),
        params,
        ops_per_sec: stats::rate(1, latency),
        p50_us: one.median(),
        p99_us: one.quantile(0.99),
        p999_us: one.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: baseline_name.to_owned(),
        baseline_value: base,
        ratio,
        target: format!("≤ {limit} × {baseline_name}"),
        met: ratio <= limit && us > 0,
        details,
    }
}

pub(super) async fn run(
    servers: &BenchServers,
    group: &mut GroupOwner,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<WorkloadResult>> {
    let size = group.size();
    set_phase(progress, &format!("join-large N={size}: new member"), 2);
    let alpha = servers.connect_config(0)?;
    let domain = servers.domain(0)?;
    let joiner = clients::ready_clients(&alpha, &domain, "jl", 1, progress)
        .await?
        .into_iter()
        .next()
        .context("no joiner")?;
    let provider = OpenMlsRustCrypto::default();
    let kp = joiner.key_package(&provider)?;
    let alone = copy_provider(&provider)?;
    let mut stream = joiner.conn()?.listen(0).await?;

    set_phase(progress, &format!("join-large N={size}: commit"), 1);
    let mut raw = group.public_group()?;
    group.set_tree_in_welcome(true)?;
    let mut bundle = group.commit(vec![kp], &[])?;
    group.set_tree_in_welcome(false)?;
    // As the SDK does: the new epoch's GroupInfo without the tree (the Welcome has it).
    group.merge()?;
    bundle.group_info = group.group_info()?;
    stats::reset_peak(servers.pid(0));
    let sent = Instant::now();
    group.send_commit(&bundle).await?;
    let answered = Instant::now();
    let welcome = loop {
        let event = tokio::time::timeout(WELCOME_TIMEOUT, stream.next())
            .await
            .context("no Welcome pushed in time")?
            .context("the listen stream ended")??;
        match event {
            ListenEvent::Message(message) => {
                if let QueuePayload::Welcome(m) = message.payload {
                    break m.message;
                }
            }
            ListenEvent::Closed(err) => bail!("listen stream closed: {err:?}"),
        }
    };
    let welcomed = Instant::now();
    let welcome_bytes = welcome.as_slice().to_vec();
    let joined_group = tokio::task::spawn_blocking(move || {
        join_group(&provider, &welcome_bytes, None).map(|g| g.epoch().as_u64())
    })
    .await??;
    let joined = Instant::now();
    let peak = stats::rss_of(servers.pid(0)).peak;
    drop(stream);
    joiner.conn()?.close();

    // The baselines: openmls alone on the same bytes.
    let raw_commit = raw.process(&bundle.commit)?;
    let welcome_bytes = bundle.welcome.clone().context("no Welcome in the bundle")?;
    let raw_join = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        join_group(&alone, &welcome_bytes, None).map(|_| start.elapsed())
    })
    .await??;

    let welcome_len = bundle.welcome.as_ref().map_or(0, Vec::len);
    let commit_rtt = answered.duration_since(sent);
    let join_time = joined.duration_since(answered);
    Ok(vec![
        row(
            json!({ "members": size, "what": "commit" }),
            commit_rtt,
            peak,
            "openmls PublicGroup",
            raw_commit,
            COMMIT_RATIO,
            json!({
                "commit_bytes": bundle.commit.len(),
                "welcome_bytes": welcome_len,
                "group_info_bytes": bundle.group_info.len(),
                "ops": "commits per second (one); latency: Commit round trip seen by the committer",
            }),
        ),
        row(
            json!({ "members": size, "what": "join" }),
            join_time,
            peak,
            "openmls join from the Welcome",
            raw_join,
            JOIN_RATIO,
            json!({
                "welcome_bytes": welcome_len,
                "welcome_pushed_after_answer_us": welcomed.saturating_duration_since(answered).as_micros() as u64,
                "commit_sent_to_joined_us": joined.duration_since(sent).as_micros() as u64,
                "joined_epoch": joined_group,
                "ops": "joins per second (one); latency: committer answered → the new member holds the group",
            }),
        ),
    ])
}
