//! `busy-group`: M members (50 by default) all sending into one group at once, closed loop,
//! each member with its own MLS state (joined from the creator's Welcome) and its own
//! listen stream, acking what it receives. Every recipient records the order in which the
//! group's messages reached it; the DS must give every recipient the same order.
//!
//! The baseline, in the same run, on the same clients: M groups of the same M members, each
//! owned by one member who alone sends into it — the same concurrency, the same recipients
//! per message and the same listeners, with the messages spread over M groups instead of
//! one. The target (≥ 0.8 × the baseline's messages/s) says that one group's ordering must
//! not turn M concurrent senders into one at a time.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::ProgressBar;
use openmls_rust_crypto::OpenMlsRustCrypto;
use roost_client::transport::ListenStream;
use roost_protocol::messages::queue::{ListenEvent, QueuePayload};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{is_private_message, listen_at_head, set_phase, uuid};
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::GroupOwner;
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};
use crate::bench::{BenchConfig, WorkloadResult};

/// Target: messages/s into one group ≥ this × the same senders into a group each.
const TARGET_RATIO: f64 = 0.8;
/// Longest wait for every recipient to have every message after the senders stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Most messages one sender sends in a phase (the duration normally ends it first).
const MAX_PER_SENDER: usize = 1_000_000;
/// Plaintext bytes of each message.
const TEXT_LEN: usize = 100;

/// A message's identity: a hash of its bytes as sent and received.
fn fingerprint(message: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    message.hash(&mut hasher);
    hasher.finish()
}

/// What one phase measured.
struct Phase {
    rate: f64,
    latencies: Latencies,
    /// Per sender, the fingerprints it sent (in order).
    sent: Vec<Vec<u64>>,
    /// Per member, the fingerprints of messages of `group` it received (in order).
    received: Vec<Vec<u64>>,
}

/// Opens a listen stream at the head of each client's queue (acknowledging what was there).
async fn open_streams(members: &[BenchClient]) -> anyhow::Result<Vec<ListenStream>> {
    let mut opening = JoinSet::new();
    for (i, member) in members.iter().enumerate() {
        let conn = member.conn()?.clone();
        opening.spawn(async move { Ok::<_, anyhow::Error>((i, listen_at_head(&conn).await?)) });
    }
    let mut streams: Vec<Option<ListenStream>> = (0..members.len()).map(|_| None).collect();
    while let Some(done) = opening.join_next().await {
        let (i, stream) = done??;
        streams[i] = Some(stream);
    }
    streams
        .into_iter()
        .map(|s| s.context("a listen stream did not open"))
        .collect()
}

/// Reads one listen stream, acking each message, recording the fingerprints of application
/// messages of groups `uuids` until `expected` (published when the senders stopped) is reached.
async fn receive(
    mut stream: ListenStream,
    index: usize,
    mut expected: watch::Receiver<Option<Vec<usize>>>,
) -> anyhow::Result<Vec<u64>> {
    let mut got = Vec::new();
    loop {
        if let Some(want) = expected.borrow().as_ref()
            && got.len() >= want.get(index).copied().unwrap_or(0)
        {
            return Ok(got);
        }
        tokio::select! {
            event = stream.next() => {
                let event = event.context("the listen stream ended")??;
                match event {
                    ListenEvent::Message(message) => {
                        if is_private_message(&message.payload).is_some()
                            && let QueuePayload::GroupMessage(m) = &message.payload
                        {
                            got.push(fingerprint(m.message.as_slice()));
                        }
                        stream.ack(message.seq).await?;
                    }
                    ListenEvent::Closed(err) => bail!("listen stream closed: {err:?}"),
                }
            }
            changed = expected.changed() => {
                if changed.is_err() {
                    bail!("the phase ended without a count");
                }
            }
        }
    }
}

/// Runs one phase: every sender sends closed-loop into its group for `duration`; then waits
/// until every member has every message meant for it.
async fn phase(
    senders: Vec<GroupOwner>,
    members: &[BenchClient],
    duration: Duration,
) -> anyhow::Result<(Vec<GroupOwner>, Phase)> {
    let streams = open_streams(members).await?;
    let (publish, expected) = watch::channel(None);
    let mut receivers = JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let expected = expected.clone();
        receivers.spawn(async move { (i, receive(stream, i, expected).await) });
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut sending = JoinSet::new();
    for (i, mut owner) in senders.into_iter().enumerate() {
        sending.spawn(async move {
            let mut latencies = Latencies::new();
            let mut sent = Vec::new();
            for _ in 0..MAX_PER_SENDER {
                let request = owner.message(&[b'b'; TEXT_LEN])?;
                let at = Instant::now();
                if at >= deadline {
                    break;
                }
                let print = fingerprint(request.message.as_slice());
                owner.client.conn()?.call(request).await?;
                latencies.record(at.elapsed());
                sent.push(print);
            }
            Ok::<_, anyhow::Error>((i, owner, latencies, sent))
        });
    }
    let count = members.len();
    let mut owners: Vec<Option<GroupOwner>> = (0..count).map(|_| None).collect();
    let mut sent = vec![Vec::new(); count];
    let mut latencies = Latencies::new();
    while let Some(done) = sending.join_next().await {
        let (i, owner, l, s) = done??;
        latencies.merge(l);
        owners[i] = Some(owner);
        sent[i] = s;
    }
    let rate = stats::rate(latencies.len(), start.elapsed());
    // In one group every member gets everyone's messages but its own; in the baseline's
    // groups too (member i is in every group, and owns group i).
    let total: usize = sent.iter().map(Vec::len).sum();
    let want: Vec<usize> = sent.iter().map(|own| total - own.len()).collect();
    publish.send(Some(want))?;
    let mut received = vec![Vec::new(); count];
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = receivers.join_next().await {
            let (i, got) = done?;
            received[i] = got?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => bail!("not every member got every message within {DRAIN_TIMEOUT:?}"),
    }
    let owners = owners
        .into_iter()
        .map(|o| o.context("a sender did not finish"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((
        owners,
        Phase {
            rate,
            latencies,
            sent,
            received,
        },
    ))
}

/// Recipients whose order of the group's messages differs from the reference members'
/// (members 0 and 1; each compared on the messages both received).
fn order_mismatches(phase: &Phase) -> usize {
    let sender_of: HashMap<u64, usize> = phase
        .sent
        .iter()
        .enumerate()
        .flat_map(|(i, prints)| prints.iter().map(move |p| (*p, i)))
        .collect();
    let without = |list: &[u64], skip: usize| -> Vec<u64> {
        list.iter()
            .copied()
            .filter(|p| sender_of.get(p) != Some(&skip))
            .collect()
    };
    let count = phase.received.len();
    (0..count)
        .filter(|&r| {
            (0..count.min(2)).any(|reference| {
                reference != r
                    && without(&phase.received[r], reference)
                        != without(&phase.received[reference], r)
            })
        })
        .count()
}

/// Builds the members' MLS states for one group of all `members`: member 0 creates it and
/// adds the others in one commit; the others join from its Welcome.
async fn shared_group(members: &[BenchClient]) -> anyhow::Result<Vec<GroupOwner>> {
    let Some((first, others)) = members.split_first() else {
        bail!("no members");
    };
    let mut owner = GroupOwner::create(first.clone(), uuid(6, 0)).await?;
    let joiners = others.to_vec();
    let built = tokio::task::spawn_blocking(move || {
        joiners
            .into_iter()
            .map(|client| {
                let provider = OpenMlsRustCrypto::default();
                let kp = client.key_package(&provider)?;
                Ok((client, provider, kp))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let kps = built.iter().map(|(_, _, kp)| kp.clone()).collect();
    let bundle = owner.commit(kps, &[])?;
    owner.send_commit(&bundle).await?;
    owner.merge()?;
    let welcome = bundle.welcome.context("no Welcome")?;
    let tree = owner.ratchet_tree()?;
    let joined = tokio::task::spawn_blocking(move || {
        built
            .into_iter()
            .map(|(client, provider, _)| GroupOwner::join(client, provider, &welcome, Some(&tree)))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    Ok(std::iter::once(owner).chain(joined).collect())
}

/// The baseline's groups: member i owns group i, which holds every member.
async fn group_each(members: &[BenchClient]) -> anyhow::Result<Vec<GroupOwner>> {
    let mut owners = Vec::with_capacity(members.len());
    for (i, member) in members.iter().enumerate() {
        let mut owner = GroupOwner::create(member.clone(), uuid(7, i)).await?;
        let others: Vec<BenchClient> = members
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, c)| c.clone())
            .collect();
        let kps = clients::key_packages(&others).await?;
        owner.add_members(kps, others.len()).await?;
        owners.push(owner);
    }
    Ok(owners)
}

pub(super) async fn run(
    config: &BenchConfig,
    servers: &BenchServers,
    progress: &ProgressBar,
) -> anyhow::Result<WorkloadResult> {
    let count = config.busy_members.max(2);
    let domain = servers.domain(0)?;
    set_phase(progress, "busy-group: clients", 2 * count);
    // With several nodes the members are spread over them (member i on node i mod nodes):
    // the group's order must then hold across nodes too.
    let nodes = servers.nodes(0).clamp(1, count);
    let mut members = Vec::with_capacity(count);
    for node in 0..nodes {
        let here = count / nodes + usize::from(node < count % nodes);
        let connect = servers.node_connect_config(0, node)?;
        let prefix = if nodes == 1 {
            "bg".to_owned()
        } else {
            format!("bg{node}n")
        };
        members.push(clients::ready_clients(&connect, &domain, &prefix, here, progress).await?);
    }
    // Interleaved, so consecutive members (and the two whose order is the reference) sit on
    // different nodes.
    let members: Vec<BenchClient> = {
        let mut by_node: Vec<_> = members.into_iter().map(Vec::into_iter).collect();
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            for node in &mut by_node {
                out.extend(node.next());
            }
        }
        out
    };

    set_phase(progress, "busy-group: a group each (baseline)", 1);
    let owners = group_each(&members).await?;
    set_phase(progress, "busy-group: baseline, a group each", 1);
    let (_, baseline) = phase(owners, &members, config.duration).await?;

    set_phase(progress, "busy-group: one group", 1);
    let senders = shared_group(&members).await?;
    stats::reset_peak(servers.pid(0));
    set_phase(progress, "busy-group: all into one group", 1);
    let (_, busy) = phase(senders, &members, config.duration).await?;
    let peak = stats::rss_of(servers.pid(0)).peak;
    clients::close_all(&members);

    let mismatches = order_mismatches(&busy);
    let messages = busy.latencies.len();
    let ratio = if baseline.rate > 0.0 {
        busy.rate / baseline.rate
    } else {
        0.0
    };
    Ok(WorkloadResult {
        workload: "busy-group".into(),
        params: json!({ "members": count, "nodes": nodes }),
        ops_per_sec: busy.rate,
        p50_us: busy.latencies.median(),
        p99_us: busy.latencies.quantile(0.99),
        p999_us: busy.latencies.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: format!("msgs/s, {count} senders, a group each"),
        baseline_value: baseline.rate,
        ratio,
        target: format!("≥ {TARGET_RATIO:.2} × a group each, same order for all"),
        met: mismatches == 0 && messages > 0 && ratio >= TARGET_RATIO,
        details: json!({
            "messages": messages,
            "deliveries_per_sec": busy.rate * (count - 1) as f64,
            "recipients_out_of_order": mismatches,
            "baseline_messages": baseline.latencies.len(),
            "baseline_p50_us": baseline.latencies.median(),
            "baseline_p99_us": baseline.latencies.quantile(0.99),
            "ops": "messages accepted per second (all members sending, one in flight each); latency: SendMessage round trip (durable in every queue)",
        }),
    })
}
