//! `send-1to1` and `federated-send`: C concurrent pairs, each in its own 1:1 group. The sender
//! sends a real SendMessage (a fresh PrivateMessage of the group's epoch each time, encrypted
//! before its clock starts: the DS answers a repeat of the same bytes from its receipt and
//! enqueues nothing), the DS validates it and enqueues it durably,
//! the receiver's listen stream gets it pushed and the receiver acks it on its listen stream
//! (a `ListenControl::Ack` frame, no round trip); then the next.
//!
//! Phase 1 runs closed-loop as fast as it goes (messages/s, send→receive latency); phase 2
//! paces every pair so the total is half that rate and measures latency from each message's
//! scheduled send time (so a stall counts against every message it delays). The baseline is
//! the raw quinn echo at the same concurrency, with the same request and response sizes.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::ProgressBar;
use roost_client::transport::ListenStream;
use roost_protocol::frame::encode_frame;
use roost_protocol::messages::Operation as _;
use roost_protocol::messages::delivery::{SendMessageRequest, SendMessageResponse};
use roost_protocol::messages::queue::{ListenEvent, QueueAckRequest, QueuePayload};
use serde_json::json;
use tokio::task::JoinSet;

use super::{set_phase, uuid};
use crate::bench::baseline::{EchoServer, echo_rate};
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::GroupOwner;
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};
use crate::bench::{BenchConfig, WorkloadResult};

/// Most messages one pair sends in a phase (the phase's duration normally ends it first).
const MAX_PER_PAIR: u64 = 1_000_000;
/// Longest wait for a pushed message.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Application payload size (bytes of plaintext).
const TEXT_LEN: usize = 100;
/// Target: federated-send's rate ≥ this × the same run's send-1to1.
const FEDERATED_RATIO: f64 = 0.85;

pub(super) struct Pair {
    sender: BenchClient,
    receiver: BenchClient,
    /// The sender's group, which encrypts each message.
    owner: GroupOwner,
    /// A message as sent (for its size).
    request: SendMessageRequest,
    stream: ListenStream,
}

/// The next pushed message's sequence number, and what it carried.
async fn next_message(stream: &mut ListenStream) -> anyhow::Result<(u64, QueuePayload)> {
    let event = tokio::time::timeout(PUSH_TIMEOUT, stream.next())
        .await
        .context("no message pushed within 30 s")?
        .context("the listen stream ended")??;
    match event {
        ListenEvent::Message(message) => Ok((message.seq, message.payload)),
        ListenEvent::Closed(err) => anyhow::bail!("listen stream closed: {err:?}"),
    }
}

/// Where a send workload's pairs are: senders on server `from`, receivers on server `to`;
/// with `spread` > 1 the pairs are spread over that many nodes of a domain (a pair's sender
/// and receiver on the same node), otherwise all are on node 0.
#[derive(Debug, Clone, Copy)]
pub(super) struct Route {
    pub(super) from: usize,
    pub(super) to: usize,
    pub(super) spread: usize,
}

impl Route {
    /// `send-1to1` on one node.
    pub(super) const LOCAL: Route = Route {
        from: 0,
        to: 0,
        spread: 1,
    };
    /// `federated-send`.
    pub(super) const FEDERATED: Route = Route {
        from: 0,
        to: 1,
        spread: 1,
    };
}

pub(super) async fn setup(
    servers: &BenchServers,
    route: Route,
    count: usize,
    tag: u8,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Pair>> {
    let Route { from, to, spread } = route;
    let name = if from == to { "send" } else { "fed" };
    set_phase(progress, &format!("{name}: clients"), 4 * count);
    let spread = spread.clamp(1, count.max(1));
    let mut senders = Vec::with_capacity(count);
    let mut receivers = Vec::with_capacity(count);
    for node in 0..spread {
        let here = count / spread + usize::from(node < count % spread);
        senders.extend(
            clients::ready_clients(
                &servers.node_connect_config(from, node)?,
                &servers.domain(from)?,
                &format!("{name}s{tag}n{node}x"),
                here,
                progress,
            )
            .await?,
        );
        receivers.extend(
            clients::ready_clients(
                &servers.node_connect_config(to, node)?,
                &servers.domain(to)?,
                &format!("{name}r{tag}n{node}x"),
                here,
                progress,
            )
            .await?,
        );
    }
    let kps = clients::key_packages(&receivers).await?;
    set_phase(progress, &format!("{name}: groups"), count);
    let mut tasks = JoinSet::new();
    for (i, ((sender, receiver), kp)) in senders.into_iter().zip(receivers).zip(kps).enumerate() {
        tasks.spawn(async move {
            let mut owner = GroupOwner::create(sender.clone(), uuid(tag, i)).await?;
            owner.add_members(vec![kp], 1).await?;
            let request = owner.message(&[b'x'; TEXT_LEN])?;
            let mut stream = receiver.conn()?.listen(0).await?;
            // The Welcome comes first.
            let (seq, _) = next_message(&mut stream).await?;
            receiver
                .conn()?
                .call(QueueAckRequest { up_to_seq: seq })
                .await?;
            Ok::<_, anyhow::Error>(Pair {
                sender,
                receiver,
                owner,
                request,
                stream,
            })
        });
    }
    let mut pairs = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        pairs.push(done??);
        progress.inc(1);
    }
    Ok(pairs)
}

/// One pair's loop: closed-loop (`pace` None) or one message per `pace` from `start`.
async fn drive(
    mut pair: Pair,
    start: Instant,
    deadline: Instant,
    pace: Option<Duration>,
) -> anyhow::Result<(Pair, Latencies)> {
    let mut latencies = Latencies::new();
    for k in 0..MAX_PER_PAIR {
        let request = pair.owner.message(&[b'x'; TEXT_LEN])?;
        let sent = match pace {
            Some(pace) => {
                let at = start + pace.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX));
                if at >= deadline {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        if sent >= deadline {
            break;
        }
        pair.sender.conn()?.call(request).await?;
        let (seq, _) = next_message(&mut pair.stream).await?;
        latencies.record(sent.elapsed());
        pair.stream.ack(seq).await?;
    }
    Ok((pair, latencies))
}

/// Sends `per_pair` messages through each pair (closed loop, every pair at once: send, pushed,
/// acked on the listen stream); returns the pairs and the latencies.
pub(super) async fn counted(
    pairs: Vec<Pair>,
    per_pair: usize,
) -> anyhow::Result<(Vec<Pair>, Latencies)> {
    let mut tasks = JoinSet::new();
    for mut pair in pairs {
        tasks.spawn(async move {
            let mut latencies = Latencies::new();
            for _ in 0..per_pair {
                let request = pair.owner.message(&[b'x'; TEXT_LEN])?;
                let sent = Instant::now();
                pair.sender.conn()?.call(request).await?;
                let (seq, _) = next_message(&mut pair.stream).await?;
                latencies.record(sent.elapsed());
                pair.stream.ack(seq).await?;
            }
            Ok::<_, anyhow::Error>((pair, latencies))
        });
    }
    let mut all = Latencies::new();
    let mut back = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (pair, latencies) = done??;
        all.merge(latencies);
        back.push(pair);
    }
    Ok((back, all))
}

/// Closes both connections of every pair.
pub(super) fn close(pairs: &[Pair]) {
    for pair in pairs {
        if let (Ok(a), Ok(b)) = (pair.sender.conn(), pair.receiver.conn()) {
            a.close();
            b.close();
        }
    }
}

/// The request and response frame sizes of a pair's messages (for the echo baseline).
pub(super) fn frame_sizes(pairs: &[Pair]) -> anyhow::Result<(usize, usize)> {
    let request_len = match pairs.first() {
        Some(pair) => encode_frame(&pair.request.clone().into_request())?.len(),
        None => anyhow::bail!("no pairs"),
    };
    let response_len = encode_frame(&roost_protocol::messages::Response::SendMessage(
        SendMessageResponse { recipients: 1 },
    ))?
    .len()
        - 4;
    Ok((request_len, response_len))
}

/// Runs every pair for `duration`; returns the pairs, messages/s and latencies.
async fn phase(
    pairs: Vec<Pair>,
    duration: Duration,
    total_rate: Option<f64>,
) -> anyhow::Result<(Vec<Pair>, f64, Latencies)> {
    let count = pairs.len().max(1);
    let start = Instant::now();
    let deadline = start + duration;
    let pace = total_rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(count as f64 / r));
    let mut tasks = JoinSet::new();
    for (i, pair) in pairs.into_iter().enumerate() {
        // Stagger paced pairs over one interval.
        let offset = pace.map_or(Duration::ZERO, |p| p.mul_f64(i as f64 / count as f64));
        tasks.spawn(drive(pair, start + offset, deadline, pace));
    }
    let mut all = Latencies::new();
    let mut back = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        let (pair, latencies) = done??;
        all.merge(latencies);
        back.push(pair);
    }
    let ops = stats::rate(all.len(), start.elapsed());
    Ok((back, ops, all))
}

/// The pairs of a `send-1to1` run, kept connected to measure again later (with the idle
/// listeners held).
pub(super) struct Kept {
    pairs: Vec<Pair>,
    max_rate: f64,
}

/// `send-1to1`'s half-rate phase again, while the `idle` pooled clients hold their listen
/// streams: the latency target must still hold among them. Closes the pairs.
pub(super) async fn among_idle(
    config: &BenchConfig,
    servers: &BenchServers,
    kept: Kept,
    idle: usize,
    progress: &ProgressBar,
) -> anyhow::Result<WorkloadResult> {
    set_phase(progress, "idle-connections: send-1to1 half rate", 1);
    let offered = kept.max_rate / 2.0;
    let (pairs, rate, latencies) = phase(kept.pairs, config.duration, Some(offered)).await?;
    for pair in &pairs {
        pair.sender.conn()?.close();
        pair.receiver.conn()?.close();
    }
    let p99 = latencies.quantile(0.99);
    Ok(WorkloadResult {
        workload: "idle-connections".into(),
        params: json!({
            "connections": idle,
            "pairs": config.pairs,
            "load": "send-1to1 half",
            "offered_per_sec": offered.round(),
        }),
        ops_per_sec: rate,
        p50_us: latencies.median(),
        p99_us: p99,
        p999_us: latencies.quantile(0.999),
        server_peak_rss_bytes: stats::rss_of(servers.pid(0)).peak,
        baseline: "send-1to1 max msgs/s".into(),
        baseline_value: kept.max_rate,
        ratio: if kept.max_rate > 0.0 {
            rate / kept.max_rate
        } else {
            0.0
        },
        target: format!("send-1to1 p99 ≤ 10 ms at half the max rate among {idle} listeners"),
        met: !latencies.is_empty() && p99 <= 10_000,
        details: json!({
            "messages": latencies.len(),
            "ops": "messages (sent, pushed, acked) per second while the idle listeners are held; latency: send → received",
        }),
    })
}

/// `send-1to1` ([`Route::LOCAL`], or spread over nodes) or `federated-send`
/// ([`Route::FEDERATED`]). With `keep`, the pairs of a local run stay connected and are
/// returned for [`among_idle`].
pub(super) async fn run(
    config: &BenchConfig,
    servers: &BenchServers,
    route: Route,
    keep: bool,
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<WorkloadResult>, Option<Kept>)> {
    let federated = route.from != route.to;
    let (name, tag) = if federated {
        ("federated-send", 2)
    } else if route.spread > 1 {
        ("send-1to1", 5)
    } else {
        ("send-1to1", 1)
    };
    let pairs = setup(servers, route, config.pairs, tag, progress).await?;
    let (request_len, response_len) = frame_sizes(&pairs)?;

    set_phase(progress, &format!("{name}: max rate"), 1);
    let rss_pid = servers.pid(route.from);
    let udp_before = stats::udp_counters();
    let (pairs, max_rate, max_latencies) = phase(pairs, config.duration, None).await?;
    let udp = stats::udp_per_op(udp_before, stats::udp_counters(), max_latencies.len());
    let (pairs, half_rate, half_latencies) = if federated {
        (pairs, 0.0, Latencies::new())
    } else {
        set_phase(progress, &format!("{name}: half rate"), 1);
        phase(pairs, config.duration, Some(max_rate / 2.0)).await?
    };
    let peak = stats::rss_of(rss_pid).peak;
    let receiver_peak = stats::rss_of(servers.pid(route.to)).peak;
    let kept = if keep && !federated {
        Some(Kept { pairs, max_rate })
    } else {
        for pair in &pairs {
            pair.sender.conn()?.close();
            pair.receiver.conn()?.close();
        }
        None
    };

    set_phase(progress, &format!("{name}: quinn baseline"), 1);
    let echo = EchoServer::start(response_len)?;
    let udp_before = stats::udp_counters();
    let (echo_ops, echo_latencies) =
        echo_rate(&echo, config.pairs, request_len, config.duration).await?;
    let echo_udp = stats::udp_per_op(udp_before, stats::udp_counters(), echo_latencies.len());
    echo.stop();

    let params = json!({ "pairs": config.pairs, "load": "max", "spread": route.spread });
    let details = json!({
        "messages": max_latencies.len(),
        "request_bytes": request_len,
        "response_bytes": response_len,
        "quinn_echo_p50_us": echo_latencies.median(),
        "quinn_echo_p99_us": echo_latencies.quantile(0.99),
        "receiver_server_peak_rss_bytes": receiver_peak,
        "udp": udp,
        "quinn_echo_udp": echo_udp,
    });
    let ratio = if echo_ops > 0.0 {
        max_rate / echo_ops
    } else {
        0.0
    };
    let mut rows = vec![WorkloadResult {
        workload: name.into(),
        params,
        ops_per_sec: max_rate,
        p50_us: max_latencies.median(),
        p99_us: max_latencies.quantile(0.99),
        p999_us: max_latencies.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: format!("quinn echo req/s, {} conns", config.pairs),
        baseline_value: echo_ops,
        ratio,
        target: "≥ 0.40 × quinn echo".into(),
        met: ratio >= 0.40,
        details,
    }];
    if !federated {
        let p99 = half_latencies.quantile(0.99);
        rows.push(WorkloadResult {
            workload: name.into(),
            params: json!({ "pairs": config.pairs, "load": "half", "spread": route.spread, "offered_per_sec": (max_rate / 2.0).round() }),
            ops_per_sec: half_rate,
            p50_us: half_latencies.median(),
            p99_us: p99,
            p999_us: half_latencies.quantile(0.999),
            server_peak_rss_bytes: peak,
            baseline: "send-1to1 max msgs/s".into(),
            baseline_value: max_rate,
            ratio: if max_rate > 0.0 { half_rate / max_rate } else { 0.0 },
            target: "p99 ≤ 10 ms at half the max rate".into(),
            met: !half_latencies.is_empty() && p99 <= 10_000,
            details: json!({ "messages": half_latencies.len() }),
        });
    }
    Ok((rows, kept))
}

/// Makes a `federated-send` row compare with the same run's `send-1to1` rate.
pub(super) fn compare_with_local(row: &mut WorkloadResult, local_rate: f64) {
    let echo = row.baseline_value;
    let echo_name = std::mem::take(&mut row.baseline);
    if let serde_json::Value::Object(details) = &mut row.details {
        details.insert("quinn_echo_per_sec".into(), json!(echo));
        details.insert("quinn_echo_baseline".into(), json!(echo_name));
    }
    row.baseline = "send-1to1 msgs/s".into();
    row.baseline_value = local_rate;
    row.ratio = if local_rate > 0.0 {
        row.ops_per_sec / local_rate
    } else {
        0.0
    };
    row.target = format!("≥ {FEDERATED_RATIO:.2} × send-1to1");
    row.met = row.ratio >= FEDERATED_RATIO;
}

/// A row comparing a `send-1to1` rate with another same-run `send-1to1` rate: PostgreSQL
/// against redb (target ≥ `min_ratio`), or pairs spread over nodes against one node.
pub(super) fn compared(
    row: &WorkloadResult,
    what: &str,
    baseline_name: &str,
    baseline_rate: f64,
    min_ratio: f64,
) -> WorkloadResult {
    let ratio = if baseline_rate > 0.0 {
        row.ops_per_sec / baseline_rate
    } else {
        0.0
    };
    let mut params = row.params.clone();
    if let serde_json::Value::Object(map) = &mut params {
        map.insert("compared".into(), json!(what));
    }
    WorkloadResult {
        workload: row.workload.clone(),
        params,
        baseline: baseline_name.to_owned(),
        baseline_value: baseline_rate,
        ratio,
        target: format!("≥ {min_ratio:.2} × {baseline_name}"),
        met: ratio >= min_ratio,
        details: json!({ "quinn_echo_ratio": row.ratio }),
        ..row.clone()
    }
}
