//! `instructions`: user-space instructions the homeserver executes per operation, counted by
//! `valgrind --tool=callgrind` — figures that do not move with the machine's noise.
//!
//! The homeserver runs under callgrind with instrumentation off (`--instr-atstart=no`, so
//! start-up and the pairs' setup run at near-native speed) through a wrapper script given to
//! the harness as the `roost` binary. After the setup the bench switches instrumentation on and
//! zeroes the counters (`callgrind_control --instr=on`, `-z`), sends N messages through P
//! `send-1to1` pairs (each: SendMessage, pushed on the receiver's listen stream, acked on that
//! stream), dumps the counters (`callgrind_control -d`) and divides the dump's total by N. The
//! baseline is the same for the bare quinn server process (`bench-quinn-server`) answering N
//! echo requests of the same sizes over P connections. Client work, the kernel and the
//! other threads of the machine are not counted.
//!
//! Row `op=federated-send`: the same N messages through P pairs whose senders are on alpha and
//! receivers on beta, both homeservers under callgrind (instrumentation on in both while the
//! messages go), beside send-1to1's instructions per message: what a message costs when it
//! crosses the federation (alpha's DS and outbox, beta's inbound request, queue and push).
//!
//! The target is the CPU form of `send-1to1`'s ≥ 0.40 × echo: at most 2.5 × the echo's
//! instructions per message.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::ProgressBar;
use roost_client::transport::Endpoint;
use serde_json::json;
use tokio::task::JoinSet;

use super::send::{self, Route};
use super::{keypackages, set_phase};
use crate::bench::quinn::QuinnProcess;
use crate::bench::server::BenchServers;
use crate::bench::{BenchConfig, WorkloadResult};
use crate::bench::{clients, stats};
use crate::harness::Storage;

/// Target: instructions per message ≤ this × per echo request.
const TARGET_RATIO: f64 = 2.5;
/// Longest a `callgrind_control` command may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// valgrind's command line before the program, writing its dumps to `out` (`%p`: the pid).
fn callgrind_args(out: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        format!("--callgrind-out-file={}", out.display()),
    ]
}

/// Fails with a clear message when valgrind is not installed.
fn check_valgrind() -> anyhow::Result<()> {
    for program in ["valgrind", "callgrind_control"] {
        let found = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("{program} not found: install the Debian package valgrind");
        }
    }
    Ok(())
}

/// Runs `callgrind_control ARG PID` (on a blocking thread; killed after a while).
async fn control(arg: &str, pid: u32) -> anyhow::Result<()> {
    let arg = arg.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("callgrind_control")
            .arg(&arg)
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run callgrind_control")?;
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!("callgrind_control {arg} {pid} failed ({status})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("callgrind_control {arg} {pid} took over {CONTROL_TIMEOUT:?}")
    })
    .await?
}

/// The `totals:` (or `summary:`) figure of the newest dump `<prefix>.<pid>.callgrind.N` of
/// `pid` in `dir`.
fn dumped_total(dir: &Path, prefix: &str, pid: u32) -> anyhow::Result<u64> {
    let stem = format!("{prefix}.{pid}.callgrind.");
    let mut dumps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(&stem)?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    dumps.sort();
    let (_, path) = dumps
        .pop()
        .with_context(|| format!("no callgrind dump {stem}N in {}", dir.display()))?;
    let text = std::fs::read_to_string(&path)?;
    parse_total(&text).with_context(|| format!("no totals in {}", path.display()))
}

/// The instruction count of a callgrind dump (`totals:` or else `summary:`, first event).
fn parse_total(text: &str) -> Option<u64> {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    field("totals:").or_else(|| field("summary:"))
}

/// Instructions counted in process `pid` while `work` runs.
async fn count<T>(
    dir: &Path,
    prefix: &str,
    pid: u32,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(u64, T)> {
    let (totals, out) = count_each(dir, prefix, &[pid], work).await?;
    Ok((totals[0], out))
}

/// Instructions counted in each process of `pids` while `work` runs (in `pids`' order).
async fn count_each<T>(
    dir: &Path,
    prefix: &str,
    pids: &[u32],
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(Vec<u64>, T)> {
    for &pid in pids {
        control("--instr=on", pid).await?;
        control("-z", pid).await?;
    }
    let out = work.await?;
    let mut totals = Vec::with_capacity(pids.len());
    for &pid in pids {
        control("-d", pid).await?;
        totals.push(dumped_total(dir, prefix, pid)?);
    }
    Ok((totals, out))
}

pub(super) async fn run(
    config: &BenchConfig,
    roost: &Path,
    dir: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<WorkloadResult>> {
    check_valgrind()?;
    let dir = std::path::absolute(dir.join("instructions"))?;
    std::fs::create_dir_all(&dir)?;
    let pairs_n = config.callgrind_pairs.max(1);
    let per_pair = config.callgrind_messages.div_ceil(pairs_n).max(1);
    let messages = per_pair * pairs_n;

    set_phase(progress, "instructions: roost under callgrind", 1);
    let wrapper = dir.join("roost-callgrind.sh");
    let mut script = String::from("#!/bin/sh\nexec");
    for arg in callgrind_args(&dir.join("roost.%p.callgrind")) {
        script.push_str(&format!(" '{arg}'"));
    }
    script.push_str(&format!(" '{}' \"$@\"\n", roost.display()));
    std::fs::write(&wrapper, script)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    // Two homeservers: alpha counts send-1to1 and the claims (beta idles meanwhile); then
    // both count federated-send.
    let servers = BenchServers::start(&wrapper, &dir.join("servers"), 2, Storage::Redb, 1).await?;
    let measured = async {
        let pid = servers.pid(0).context("no homeserver pid")?;
        let beta_pid = servers.pid(1).context("no homeserver pid")?;
        let pairs = send::setup(&servers, Route::LOCAL, pairs_n, 10, progress).await?;
        let (request_len, response_len) = send::frame_sizes(&pairs)?;
        set_phase(progress, "instructions: send-1to1", messages);
        let start = Instant::now();
        let (total, (pairs, latencies)) =
            count(&dir, "roost", pid, send::counted(pairs, per_pair)).await?;
        let send = Counted {
            total,
            latencies,
            elapsed: start.elapsed(),
            request_len,
            response_len,
        };
        send::close(&pairs);
        // The claims' setup (clients, KeyPackage uploads) runs uninstrumented again.
        control("--instr=off", pid).await?;
        let claim = claims(&servers, &dir, pid, pairs_n, per_pair, progress).await?;
        control("--instr=off", pid).await?;
        let federated =
            federated(&servers, &dir, [pid, beta_pid], pairs_n, per_pair, progress).await?;
        Ok::<_, anyhow::Error>((send, claim, federated))
    }
    .await;
    let stopped = servers.shutdown().await;
    let (send, claim, federated) = measured?;
    stopped?;

    let rows = [("send-1to1", "message", send), ("claim", "claim", claim)];
    let mut results = Vec::with_capacity(rows.len());
    for (op, unit, counted) in rows {
        set_phase(
            progress,
            &format!("instructions: quinn echo under callgrind ({op} sizes)"),
            messages,
        );
        let echo_total = echo_instructions(
            &dir,
            pairs_n,
            per_pair,
            counted.request_len,
            counted.response_len,
        )
        .await?;
        results.push(row(op, unit, &counted, echo_total, messages, pairs_n));
    }
    let send_per_message = results[0].details["instructions_per_message"]
        .as_f64()
        .unwrap_or(0.0);
    results.push(federated_row(
        &federated,
        send_per_message,
        messages,
        pairs_n,
    ));
    Ok(results)
}

/// What both homeservers did for federated-send under callgrind.
struct Federated {
    /// Instructions counted in alpha (the senders' server) and in beta (the receivers').
    alpha: u64,
    beta: u64,
    latencies: stats::Latencies,
    elapsed: Duration,
}

/// Sets up `n` federated-send pairs (senders on alpha, receivers on beta, both servers under
/// callgrind with instrumentation off), then counts the instructions of both processes
/// (`pids`: alpha's, beta's) while `per_pair` messages go through each pair.
async fn federated(
    servers: &BenchServers,
    dir: &Path,
    pids: [u32; 2],
    n: usize,
    per_pair: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Federated> {
    let pairs = send::setup(servers, Route::FEDERATED, n, 11, progress).await?;
    set_phase(progress, "instructions: federated-send", n * per_pair);
    let start = Instant::now();
    let (totals, (pairs, latencies)) =
        count_each(dir, "roost", &pids, send::counted(pairs, per_pair)).await?;
    let elapsed = start.elapsed();
    send::close(&pairs);
    Ok(Federated {
        alpha: totals[0],
        beta: totals[1],
        latencies,
        elapsed,
    })
}

/// Target of the federated row: alpha's and beta's instructions per message together at most
/// this × send-1to1's (the CPU form of federated-send ≥ 0.85 × send-1to1 on one machine).
const FEDERATED_TARGET_RATIO: f64 = 1.0 / 0.85;

/// The row `op=federated-send`: instructions per message of alpha and beta together, beside
/// send-1to1's per message in the same run.
fn federated_row(
    counted: &Federated,
    send_per_message: f64,
    messages: usize,
    pairs_n: usize,
) -> WorkloadResult {
    let per = |total: u64| total as f64 / messages as f64;
    let per_message = per(counted.alpha + counted.beta);
    let ratio = ratio_of(per_message, send_per_message);
    WorkloadResult {
        baseline: "send-1to1 instructions/message (same run)".into(),
        baseline_value: send_per_message,
        ratio,
        target: format!(
            "≤ {FEDERATED_TARGET_RATIO:.2} × send-1to1 instructions per message (alpha + beta)"
        ),
        met: counted.alpha > 0 && counted.beta > 0 && ratio <= FEDERATED_TARGET_RATIO,
        details: json!({
            "instructions_per_message": per_message,
            "alpha_instructions_per_message": per(counted.alpha),
            "beta_instructions_per_message": per(counted.beta),
            "alpha_instructions_total": counted.alpha,
            "beta_instructions_total": counted.beta,
            "ops": "messages per second under callgrind (slowed; not a speed figure); the figure is instructions_per_message",
        }),
        ..timed_row(
            "federated-send",
            messages,
            pairs_n,
            &counted.latencies,
            counted.elapsed,
        )
    }
}

/// `figure / baseline`, 0 without a baseline.
fn ratio_of(figure: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        figure / baseline
    } else {
        0.0
    }
}

/// A row of `op` with its rate and latencies (under callgrind); no baseline yet.
fn timed_row(
    op: &str,
    operations: usize,
    pairs_n: usize,
    latencies: &stats::Latencies,
    elapsed: Duration,
) -> WorkloadResult {
    WorkloadResult {
        workload: "instructions".into(),
        params: json!({ "op": op, "operations": operations, "pairs": pairs_n }),
        ops_per_sec: stats::rate(latencies.len(), elapsed),
        p50_us: latencies.median(),
        p99_us: latencies.quantile(0.99),
        p999_us: latencies.quantile(0.999),
        server_peak_rss_bytes: 0,
        baseline: String::new(),
        baseline_value: 0.0,
        ratio: 0.0,
        target: String::new(),
        met: false,
        details: json!({}),
    }
}

/// What the homeserver did for one kind of operation under callgrind.
struct Counted {
    /// Instructions counted over all operations.
    total: u64,
    latencies: stats::Latencies,
    elapsed: Duration,
    request_len: usize,
    response_len: usize,
}

/// Registers `n` KeyPackage targets and `n` claimers on the homeserver (process `pid`, under
/// callgrind with instrumentation off), stocks each target with `per_target` KeyPackages,
/// then counts the instructions of claiming all of them (every claimer at once, one claim at a
/// time each, round-robin over the targets). Fails if any KeyPackage is handed out twice.
async fn claims(
    servers: &BenchServers,
    dir: &Path,
    pid: u32,
    n: usize,
    per_target: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Counted> {
    let connect = servers.connect_config(0)?;
    let domain = servers.domain(0)?;
    set_phase(progress, "instructions: claim setup", 4 * n);
    let targets = clients::ready_clients(&connect, &domain, "it", n, progress).await?;
    let claimers = clients::ready_clients(&connect, &domain, "ic", n, progress).await?;
    keypackages::stock_all(&targets, per_target, progress).await?;
    let ids: Vec<_> = targets.iter().map(|t| t.id.clone()).collect();
    let total = n * per_target;
    set_phase(progress, "instructions: claim", total);
    let start = Instant::now();
    let (instructions, outcome) = count(
        dir,
        "roost",
        pid,
        keypackages::claim_all(&claimers, &ids, total, progress),
    )
    .await?;
    let elapsed = start.elapsed();
    clients::close_all(&targets);
    clients::close_all(&claimers);
    if !outcome.unique(total) {
        bail!(
            "claims under callgrind: {} of {total} answered, {} refused, {} last resort, {} handed out twice",
            outcome.claims,
            outcome.refused,
            outcome.last_resort,
            outcome.duplicates
        );
    }
    let (request_len, response_len) = outcome.frame_sizes(&ids[0])?;
    Ok(Counted {
        total: instructions,
        latencies: outcome.latencies,
        elapsed,
        request_len,
        response_len,
    })
}

/// Instructions the bare quinn server (a process of its own, under callgrind) executes
/// answering `conns_n` × `per_conn` echo requests of these sizes over `conns_n` connections.
async fn echo_instructions(
    dir: &Path,
    conns_n: usize,
    per_conn: usize,
    request_len: usize,
    response_len: usize,
) -> anyhow::Result<u64> {
    let exe = crate::binary::locate_interop()?;
    let echo = QuinnProcess::spawn(
        &exe,
        &callgrind_args(&dir.join("quinn.%p.callgrind")),
        dir,
        response_len,
    )?;
    let pid = echo.pid().context("no quinn pid")?;
    let connect = echo.connect_config();
    let endpoint = Endpoint::for_servers(&connect.server_addrs)?;
    let mut conns = Vec::with_capacity(conns_n);
    for _ in 0..conns_n {
        conns.push(endpoint.connect(&connect).await?);
    }
    let request = vec![7u8; request_len];
    // One uncounted request per connection first: the homeserver is counted warm (after the
    // setup's traffic), so is the echo (not its first streams' one-time costs).
    for conn in &conns {
        conn.request_raw(&request).await?;
    }
    let requests = async {
        let mut tasks = JoinSet::new();
        for conn in conns.clone() {
            let request = request.clone();
            tasks.spawn(async move {
                for _ in 0..per_conn {
                    conn.request_raw(&request).await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    };
    let (echo_total, ()) = count(dir, "quinn", pid, requests).await?;
    for conn in &conns {
        conn.close();
    }
    endpoint.close();
    echo.stop()?;
    Ok(echo_total)
}

/// The result row of `op` (`unit`: what one operation is called in `details`).
fn row(
    op: &str,
    unit: &str,
    counted: &Counted,
    echo_total: u64,
    operations: usize,
    pairs_n: usize,
) -> WorkloadResult {
    let per_op = counted.total as f64 / operations as f64;
    let per_echo = echo_total as f64 / operations as f64;
    let ratio = ratio_of(per_op, per_echo);
    WorkloadResult {
        baseline: "quinn echo instructions/request".into(),
        baseline_value: per_echo,
        ratio,
        target: format!("≤ {TARGET_RATIO} × echo instructions per {unit}"),
        met: counted.total > 0 && ratio <= TARGET_RATIO,
        details: json!({
            format!("instructions_per_{unit}"): per_op,
            "instructions_total": counted.total,
            "echo_instructions_per_request": per_echo,
            "echo_instructions_total": echo_total,
            "echo_requests": operations,
            "request_bytes": counted.request_len,
            "response_bytes": counted.response_len,
            "ops": format!("{unit}s per second under callgrind (slowed; not a speed figure); the figure is instructions_per_{unit}"),
        }),
        ..timed_row(op, operations, pairs_n, &counted.latencies, counted.elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_a_dump() {
        let dump = "version: 1\ncmd: roost\nevents: Ir\nfn=main\n3 10\nsummary: 120\ntotals: 130\n";
        assert_eq!(parse_total(dump), Some(130));
        assert_eq!(parse_total("events: Ir\nsummary: 7\n"), Some(7));
        assert_eq!(parse_total("events: Ir\n"), None);
    }
}
