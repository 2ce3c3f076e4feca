//! `fanout`: one sender, a group of N members (the sender and N−1 pooled clients, all
//! listening). Per message: the time until the SendMessage is acknowledged, i.e. every
//! member's queue holds it durably (the DS answers after the transaction with the N−1 queue
//! entries committed), and the time until every listener got it pushed. The baseline is the
//! raw engine: one durable transaction inserting N−1 queue-entry-shaped rows, one per client
//! (redb, or PostgreSQL when the servers run on it).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::ProgressBar;
use roost_protocol::MessageId;
use roost_protocol::frame::encode_frame;
use roost_protocol::messages::queue::{GroupMessage, ListenEvent, QueueMessage, QueuePayload};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Arrivals, Pool, listen, set_phase, uuid};
use crate::bench::baseline::{BROADCAST_TAG, LISTEN_TAG, postgres_insert, redb_insert};
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::GroupOwner;
use crate::bench::quinn::QuinnProcess;
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
/// Handshakes in flight while the bare quinn baseline's listeners connect.
const BARE_CONNECT_CONCURRENCY: usize = 256;

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
    let mut push_frame_bytes = 0;
    for round in 1..=config.fanout_rounds as u64 {
        let request = owner.message(&text)?;
        // What each listener is pushed: the entry in a ListenEvent frame.
        push_frame_bytes = encode_frame(&ListenEvent::Message(QueueMessage {
            seq: round,
            id: MessageId([0; 16]),
            timestamp_ms: 0,
            payload: QueuePayload::GroupMessage(GroupMessage {
                group: request.group.clone(),
                message: request.message.clone(),
            }),
        }))?
        .len();
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
            "push_frame_bytes": push_frame_bytes,
            "ops": "queue deliveries per second (durable); latency: send until durable in every queue",
        }),
    };
    Ok((row, owner))
}

/// The floor under the push figure: a bare quinn server in a process of its own, configured
/// like the homeserver (`bench-quinn-server`), holds `listeners` connections from the bench's
/// client transport, each with a listen stream, and pushes a frame of `frame_len` bytes (a
/// pushed entry's size) to every one of them, `rounds` times, each listener's write from its
/// own task woken through one watch channel. Per round: the time from the broadcast request
/// until the last listener read its frame. No storage and no protocol: what quinn alone
/// needs to reach that many listeners on this machine.
pub(super) async fn bare_quinn_pushes(
    dir: &Path,
    listeners: usize,
    frame_len: usize,
    rounds: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Latencies> {
    set_phase(
        progress,
        &format!("fanout N={}: bare quinn baseline", listeners + 1),
        listeners,
    );
    let exe = crate::binary::locate_interop()?;
    let server = QuinnProcess::spawn_fanout(&exe, dir)?;
    let connect = server.connect_config();
    let endpoints = clients::endpoints(&connect, listeners + 1)?;
    let arrivals = Arc::new(Arrivals::new(listeners));
    let limit = Arc::new(Semaphore::new(BARE_CONNECT_CONCURRENCY));
    let mut opening = JoinSet::new();
    for index in 0..listeners {
        let endpoint = endpoints[index % endpoints.len()].clone();
        let (connect, limit) = (connect.clone(), limit.clone());
        opening.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let conn = endpoint.connect(&connect).await?;
            let (mut send, mut recv) = conn.open_raw_stream().await?;
            send.write_all(LISTEN_TAG).await?;
            send.finish()?;
            // The server's empty frame: it pushes to this stream from now on.
            let mut head = [0u8; 4];
            recv.read_exact(&mut head).await?;
            Ok::<_, anyhow::Error>((index, conn, recv))
        });
    }
    let mut conns = Vec::with_capacity(listeners);
    let mut tasks = Vec::with_capacity(listeners);
    while let Some(done) = opening.join_next().await {
        let (index, conn, recv) = done??;
        tasks.push(tokio::spawn(read_pushes(index, recv, arrivals.clone())));
        conns.push(conn);
        progress.inc(1);
    }
    let broadcaster = endpoints[0].connect(&connect).await?;
    let body_len = u32::try_from(frame_len.saturating_sub(4)).context("push frame too large")?;
    let mut request = BROADCAST_TAG.to_vec();
    request.extend_from_slice(&body_len.to_be_bytes());
    let mut pushed = Latencies::new();
    let measured = async {
        for round in 1..=rounds as u64 {
            arrivals.start_round(round);
            let sent = Instant::now();
            broadcaster.request_raw(&request).await?;
            let deadline = tokio::time::Instant::now() + PUSH_TIMEOUT;
            let last = match arrivals.all_arrived(deadline).await {
                Ok(last) => last.max(sent),
                Err(got) => bail!(
                    "bare quinn: only {got} of {listeners} listeners got round {round} within {PUSH_TIMEOUT:?}"
                ),
            };
            pushed.record(last.duration_since(sent));
        }
        Ok(())
    }
    .await;
    for task in &tasks {
        task.abort();
    }
    broadcaster.close();
    for conn in &conns {
        conn.close();
    }
    for endpoint in &endpoints {
        endpoint.close();
    }
    server.stop()?;
    measured.map(|()| pushed)
}

/// Reads the bare server's pushes on one listen stream, counting each.
async fn read_pushes(index: usize, mut recv: quinn::RecvStream, arrivals: Arc<Arrivals>) {
    let mut head = [0u8; 4];
    let mut body = Vec::new();
    loop {
        if recv.read_exact(&mut head).await.is_err() {
            return;
        }
        body.resize(u32::from_be_bytes(head) as usize, 0);
        if recv.read_exact(&mut body).await.is_err() {
            return;
        }
        arrivals.count(index);
    }
}
