//! `blob`: upload and download throughput of 1 MiB and large (64 MiB) blobs through alpha,
//! against the same run's raw quinn bulk transfer of the same sizes (a sink/source server on
//! its own runtime, reached with the same client transport); and alpha's RSS while several
//! clients upload a large blob each at once (bounded by the stream windows, not by the blob
//! size).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use roost_client::transport::{ConnectConfig, Connection, Endpoint, TrustConfig};
use roost_protocol::messages::blob::BlobDownloadRequest;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::task::JoinSet;

use super::set_phase;
use crate::bench::clients::{self, BenchClient};
use crate::bench::server::BenchServers;
use crate::bench::stats::{self, Latencies};
use crate::bench::{BenchConfig, WorkloadResult};

const MIB: usize = 1024 * 1024;
/// Bytes written per call, like an app streaming a file.
const WRITE: usize = 256 * 1024;
/// The target: roost's throughput over raw quinn's.
const TARGET_RATIO: f64 = 0.70;
const RAW_NAME: &str = "bulk.test";

/// Runs the workload: one row per (direction, size), then the RSS row.
pub(super) async fn run(
    config: &BenchConfig,
    servers: &BenchServers,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<WorkloadResult>> {
    let alpha = servers.connect_config(0)?;
    let domain = servers.domain(0)?;
    let concurrent = config.blob_concurrent.max(1);
    set_phase(progress, "blob: register", concurrent + 1);
    let clients = clients::ready_clients(&alpha, &domain, "blob", concurrent, progress).await?;
    let conn = clients.first().context("no blob client")?.conn()?.clone();
    let raw = RawBulk::start()?;
    let raw_conn = Endpoint::for_server(raw.addr)?
        .connect(&raw.connect_config())
        .await?;
    let mut chunk = vec![0x5au8; WRITE];
    // Every upload's bytes are distinct, as an app's (freshly encrypted) files are: identical
    // bytes would be stored once and the upload answered from the stored copy.
    let mut uploads = 0u64;
    let mut rows = Vec::new();
    for (size, rounds) in [(MIB, 32), (config.blob_large, 3)] {
        set_phase(
            progress,
            &format!("blob: {} MiB transfers", size / MIB),
            rounds * 4,
        );
        // Alternating runs of roost and raw, so both see the same machine noise.
        let mut up = (Latencies::new(), Duration::ZERO);
        let mut down = (Latencies::new(), Duration::ZERO);
        let mut raw_up = Duration::ZERO;
        let mut raw_down = Duration::ZERO;
        let mut stored = None;
        for _ in 0..rounds {
            uploads += 1;
            chunk[..8].copy_from_slice(&uploads.to_be_bytes());
            let started = Instant::now();
            let mut upload = conn.start_blob_upload(size as u64).await?;
            let mut left = size;
            while left > 0 {
                let n = left.min(WRITE);
                upload.write(&chunk[..n]).await?;
                left -= n;
            }
            stored = Some(upload.finish().await?);
            let took = started.elapsed();
            up.0.record(took);
            up.1 += took;
            raw_up += raw_transfer(&raw_conn, 0, size, &chunk).await?;
            progress.inc(2);
        }
        let stored = stored.context("nothing uploaded")?;
        for _ in 0..rounds {
            let started = Instant::now();
            let mut download = conn
                .download_blob(BlobDownloadRequest {
                    blob: stored.blob.clone(),
                    offset: 0,
                    length: None,
                })
                .await?;
            let mut got = 0;
            while let Some(bytes) = download.chunk().await? {
                got += bytes.len();
            }
            anyhow::ensure!(got == size, "downloaded {got} of {size} bytes");
            let took = started.elapsed();
            down.0.record(took);
            down.1 += took;
            raw_down += raw_transfer(&raw_conn, 1, size, &chunk).await?;
            progress.inc(2);
        }
        for (direction, (latencies, total), raw_total) in
            [("upload", up, raw_up), ("download", down, raw_down)]
        {
            let bytes = (size * rounds) as f64;
            let rate = bytes / total.as_secs_f64().max(1e-9) / MIB as f64;
            let raw_rate = bytes / raw_total.as_secs_f64().max(1e-9) / MIB as f64;
            let ratio = rate / raw_rate.max(1e-9);
            rows.push(WorkloadResult {
                workload: "blob".into(),
                params: json!({ "direction": direction, "size_mib": size / MIB, "rounds": rounds }),
                ops_per_sec: rounds as f64 / total.as_secs_f64().max(1e-9),
                p50_us: latencies.median(),
                p99_us: latencies.quantile(0.99),
                p999_us: latencies.quantile(0.999),
                server_peak_rss_bytes: stats::rss_of(servers.pid(0)).peak,
                baseline: "raw quinn bulk MiB/s".into(),
                baseline_value: raw_rate,
                ratio,
                target: format!("≥ {TARGET_RATIO:.2} of raw quinn"),
                met: ratio >= TARGET_RATIO,
                details: json!({ "mib_per_sec": rate, "ops": "blobs per second, one at a time" }),
            });
        }
    }
    raw_conn.close();
    raw.stop();
    rows.push(concurrent_uploads(config, servers, &clients, progress).await?);
    clients::close_all(&clients);
    Ok(rows)
}

/// Every client uploads one large blob at once; alpha's peak RSS growth is compared with the
/// bytes in flight.
async fn concurrent_uploads(
    config: &BenchConfig,
    servers: &BenchServers,
    clients: &[BenchClient],
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<WorkloadResult> {
    let size = config.blob_large;
    set_phase(progress, "blob: concurrent uploads", clients.len());
    tokio::time::sleep(Duration::from_millis(200)).await;
    stats::reset_peak(servers.pid(0));
    let before = stats::rss_of(servers.pid(0)).current;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let conn = client.conn()?.clone();
        tasks.spawn(async move {
            // Distinct bytes per client: identical blobs would be stored once.
            let mut chunk = vec![0u8; WRITE];
            let mut upload = conn.start_blob_upload(size as u64).await?;
            let mut left = size;
            let mut n_chunk = 0u64;
            while left > 0 {
                chunk[..8].copy_from_slice(&(n_chunk ^ ((i as u64) << 32)).to_be_bytes());
                let n = left.min(WRITE);
                upload.write(&chunk[..n]).await?;
                left -= n;
                n_chunk += 1;
            }
            let started = Instant::now();
            upload.finish().await?;
            Ok::<_, anyhow::Error>(started.elapsed())
        });
    }
    let mut latencies = Latencies::new();
    while let Some(done) = tasks.join_next().await {
        latencies.record(done??);
        progress.inc(1);
    }
    let elapsed = started.elapsed();
    let peak = stats::rss_of(servers.pid(0)).peak;
    let growth = peak.saturating_sub(before);
    let in_flight = (size * clients.len()) as u64;
    // Each upload holds at most its stream window (1 MiB by default) in quinn plus the
    // blob service's read buffers; allow 4 MiB per upload for allocator slack.
    let bound = (clients.len() * 4 * MIB) as u64;
    Ok(WorkloadResult {
        workload: "blob".into(),
        params: json!({ "concurrent_uploads": clients.len(), "size_mib": size / MIB }),
        ops_per_sec: clients.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: latencies.median(),
        p99_us: latencies.quantile(0.99),
        p999_us: latencies.quantile(0.999),
        server_peak_rss_bytes: peak,
        baseline: "bytes uploaded at once".into(),
        baseline_value: in_flight as f64,
        ratio: growth as f64 / in_flight as f64,
        target: "RSS growth ≤ 4 MiB per upload".into(),
        met: growth <= bound,
        details: json!({
            "rss_before_bytes": before,
            "rss_growth_bytes": growth,
            "mib_per_sec": in_flight as f64 / elapsed.as_secs_f64().max(1e-9) / MIB as f64,
            "ops": "uploads per second; latency: from the last byte written to the durable answer",
        }),
    })
}

/// One raw transfer of `size` bytes: `op` 0 uploads to the sink, 1 downloads from the source.
async fn raw_transfer(
    conn: &Connection,
    op: u8,
    size: usize,
    chunk: &[u8],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_raw_stream().await?;
    let mut head = [0u8; 9];
    head[0] = op;
    head[1..].copy_from_slice(&(size as u64).to_be_bytes());
    send.write_all(&head).await?;
    if op == 0 {
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            send.write_all(&chunk[..n]).await?;
            left -= n;
        }
        send.finish()?;
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await?;
    } else {
        send.finish()?;
        let mut got = 0;
        while let Some(bytes) = recv.read_chunk(usize::MAX, true).await? {
            got += bytes.bytes.len();
        }
        anyhow::ensure!(got == size, "raw download got {got} of {size} bytes");
    }
    Ok(started.elapsed())
}

/// A raw quinn sink/source on its own runtime and thread, with the homeserver's windows.
struct RawBulk {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RawBulk {
    fn start() -> anyhow::Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec![RAW_NAME.to_owned()])?;
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)?;
        tls.alpn_protocols = vec![roost_protocol::ALPN_CLIENT.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(quinn::VarInt::from_u32(1 << 20))
            .receive_window(quinn::VarInt::from_u32(16 << 20));
        server_config.transport_config(Arc::new(transport));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        let _ = socket.set_recv_buffer_size(4 << 20);
        let _ = socket.set_send_buffer_size(4 << 20);
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
        let endpoint = {
            let _guard = runtime.enter();
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server_config),
                socket.into(),
                Arc::new(quinn::TokioRuntime),
            )?
        };
        let addr = endpoint.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("bench-bulk".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        _ = bulk_accept(endpoint.clone()) => {}
                    }
                    endpoint.close(quinn::VarInt::from_u32(0), b"done");
                });
            })?;
        Ok(Self {
            addr,
            cert,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn connect_config(&self) -> ConnectConfig {
        let trust = TrustConfig::PinnedCertificates(vec![self.cert.clone()]);
        ConnectConfig::new(self.addr, RAW_NAME, trust)
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn bulk_accept(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 9];
                    if recv.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let mut size_bytes = [0u8; 8];
                    size_bytes.copy_from_slice(&head[1..]);
                    let size = u64::from_be_bytes(size_bytes) as usize;
                    if head[0] == 0 {
                        while let Ok(Some(_)) = recv.read_chunk(usize::MAX, true).await {}
                        let _ = send.write_all(&[1]).await;
                    } else {
                        let chunk = vec![0xa5u8; WRITE];
                        let mut left = size;
                        while left > 0 {
                            let n = left.min(WRITE);
                            if send.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n;
                        }
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}
