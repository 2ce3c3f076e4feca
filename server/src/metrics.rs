//! `/metrics` (Prometheus text exposition, rendered by metrics-exporter-prometheus) and
//! `/health` on a plain TCP listener, off unless `metrics_listen` is configured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::State;

/// Largest request head we read.
const MAX_HEAD: usize = 8 * 1024;

/// Installs the recorder (once per process) and serves HTTP on `addr`.
pub(crate) async fn start(
    addr: SocketAddr,
    state: Arc<State>,
    tracker: &TaskTracker,
) -> std::io::Result<SocketAddr> {
    // One recorder per process (metrics are process-wide): every server in it renders the
    // same one, so a second server (tests) shows the process's metrics rather than none.
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed in this process; /metrics shows none of it"
                );
            }
            handle
        })
        .clone();
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%addr, "metrics and health listening");
    spawn_executor_probe(state.clone(), tracker);
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = state.shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let (state, handle) = (state.clone(), handle.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    serve(stream, &state, &handle),
                )
                .await;
            });
        }
    });
    Ok(bound)
}

/// How long the executor probe sleeps between two measurements.
const PROBE_PERIOD: Duration = Duration::from_millis(10);

/// Lateness above which a probe counts as a stall, by label.
const STALL_LIMITS: [(&str, Duration); 3] = [
    ("5ms", Duration::from_millis(5)),
    ("20ms", Duration::from_millis(20)),
    ("100ms", Duration::from_millis(100)),
];

/// Measures whether the async executor keeps up: a task asks to be woken [`PROBE_PERIOD`]
/// from now and records how much later it actually runs. Work that blocks a worker thread
/// (a store call or MLS processing on the executor instead of a blocking thread) or a
/// saturated runtime shows up as lag. Exported as `roost_executor_probes_total`,
/// `roost_executor_lag_microseconds_total` (their ratio is the mean lag),
/// `roost_executor_stalls_total{over}` and the `roost_executor_lag_seconds` summary. The
/// timer's 1 ms resolution is part of every reading.
fn spawn_executor_probe(state: Arc<State>, tracker: &TaskTracker) {
    tracker.spawn(async move {
        loop {
            let asked = Instant::now();
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_PERIOD) => {}
            }
            let lag = asked.elapsed().saturating_sub(PROBE_PERIOD);
            metrics::counter!("roost_executor_probes_total").increment(1);
            metrics::counter!("roost_executor_lag_microseconds_total")
                .increment(u64::try_from(lag.as_micros()).unwrap_or(u64::MAX));
            for (label, limit) in STALL_LIMITS {
                if lag > limit {
                    metrics::counter!("roost_executor_stalls_total", "over" => label).increment(1);
                }
            }
            metrics::histogram!("roost_executor_lag_seconds").record(lag.as_secs_f64());
        }
    });
}

async fn serve(
    mut stream: TcpStream,
    state: &State,
    handle: &PrometheusHandle,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let path = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => break request.path.unwrap_or("/").to_owned(),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => {
                return respond(
                    &mut stream,
                    "400 Bad Request",
                    "text/plain",
                    "bad request\n",
                )
                .await;
            }
        }
    };
    match path.as_str() {
        "/metrics" => {
            handle.run_upkeep();
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4",
                &handle.render(),
            )
            .await
        }
        "/health" => {
            // Healthy when the store answers a read.
            let ok = state.store.healthy().await.is_ok();
            if ok {
                respond(&mut stream, "200 OK", "text/plain", "ok\n").await
            } else {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    "store unavailable\n",
                )
                .await
            }
        }
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
