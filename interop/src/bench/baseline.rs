//! Same-run baselines: what the machine does without roost around it.
//!
//! - [`EchoServer`]: a minimal quinn server (own runtime on its own thread, like a separate
//!   process sharing the two cores) that answers every request stream with a frame of a fixed
//!   size; [`echo_rate`] drives it with the same client transport the bench uses for roost,
//!   with the same request sizes and concurrency.
//! - [`redb_insert`]: durable redb transactions inserting a batch of queue-entry-shaped rows
//!   ((client number, sequence) → 32 bytes), one row per recipient as a fan-out needs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redb::{Database, Durability, TableDefinition};
use roost_client::transport::{ConnectConfig, Connection, Endpoint, TrustConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::JoinSet;

use super::stats::{Latencies, rate};

/// The echo server's name (SNI; the client pins its certificate).
pub(crate) const ECHO_NAME: &str = "echo.test";
/// Largest request the echo server reads.
const ECHO_MAX_REQUEST: usize = 1 << 20;

/// A raw quinn request/response server on 127.0.0.1.
pub struct EchoServer {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Starts the server; every request is answered with a `response_len`-byte frame body.
    pub fn start(response_len: usize) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (endpoint, cert) = {
            let _guard = runtime.enter();
            bare_endpoint()?
        };
        let addr = endpoint.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(endpoint.clone(), response_len) => {}
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

    /// How the bench's transport reaches it.
    pub fn connect_config(&self) -> ConnectConfig {
        let trust = TrustConfig::PinnedCertificates(vec![self.cert.clone()]);
        ConnectConfig::new(self.addr, ECHO_NAME, trust)
    }

    /// Stops the server and its runtime.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A bare quinn server endpoint on 127.0.0.1 (port 0) with a fresh self-signed certificate
/// for [`ECHO_NAME`], configured like a roost homeserver with its default limits (TLS 1.3 with
/// ring, ALPN `roost/1`, no 0-RTT, idle timeout 30 s, 32 bidirectional streams (a client
/// connection's `max_concurrent_streams`), no unidirectional ones, 1 MiB stream and 16 MiB
/// connection receive windows, 4 MiB socket buffers): what quinn alone costs per connection.
/// Call within a tokio runtime.
pub fn bare_endpoint() -> anyhow::Result<(quinn::Endpoint, CertificateDer<'static>)> {
    let certified = rcgen::generate_simple_self_signed(vec![ECHO_NAME.to_owned()])?;
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
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(30))?))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(32))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(1 << 20))
        .receive_window(quinn::VarInt::from_u32(16 << 20));
    server_config.transport_config(Arc::new(transport));
    // The same socket buffers as the homeserver's.
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, cert))
}

/// Accepts connections and holds each until its peer closes it (or it idles out), answering
/// every request stream with a `response_len`-byte frame.
pub async fn accept_loop(endpoint: quinn::Endpoint, response_len: usize) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if recv.read_to_end(ECHO_MAX_REQUEST).await.is_err() {
                        return;
                    }
                    let mut frame = Vec::with_capacity(4 + response_len);
                    frame.extend_from_slice(&(response_len as u32).to_be_bytes());
                    frame.resize(4 + response_len, 0);
                    if send.write_all(&frame).await.is_ok() {
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}

/// A request that makes its stream a listen stream of the fan-out server
/// ([`fanout_accept_loop`]): it stays open, and the server writes every broadcast frame to it.
pub(crate) const LISTEN_TAG: &[u8] = b"\xffbench-listen";
/// A request to the fan-out server, followed by a frame body length (u32 big-endian): write a
/// frame of that length to every listen stream, each from its own task woken through one watch
/// channel (as the homeserver wakes its listeners); answered with an empty frame.
pub(crate) const BROADCAST_TAG: &[u8] = b"\xffbench-broadcast";

/// A frame of `len` zero bytes behind its length prefix.
fn zero_frame(len: usize) -> bytes::Bytes {
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.resize(4 + len, 0);
    frame.into()
}

/// The bare server of the fan-out baseline: holds connections like [`accept_loop`]; a
/// [`LISTEN_TAG`] request gets an empty frame (it is counted from then on) and then every
/// broadcast frame; a [`BROADCAST_TAG`] request pushes one to all of them. (Apart from the echo
/// server, so that the echo baseline's figures stay what they were.)
pub async fn fanout_accept_loop(endpoint: quinn::Endpoint) {
    // The frame every listener is pushed next (the same bytes for all, built once).
    let pushes = Arc::new(tokio::sync::watch::channel(bytes::Bytes::new()).0);
    while let Some(incoming) = endpoint.accept().await {
        let pushes = pushes.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let pushes = pushes.clone();
                tokio::spawn(async move {
                    let Ok(request) = recv.read_to_end(ECHO_MAX_REQUEST).await else {
                        return;
                    };
                    if request == LISTEN_TAG {
                        let mut pushed = pushes.subscribe();
                        pushed.borrow_and_update();
                        if send.write_chunk(zero_frame(0)).await.is_err() {
                            return;
                        }
                        while pushed.changed().await.is_ok() {
                            let frame = pushed.borrow_and_update().clone();
                            if send.write_chunk(frame).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    if let Some(len) = request.strip_prefix(BROADCAST_TAG)
                        && let Ok(len) = <[u8; 4]>::try_from(len)
                    {
                        pushes.send_replace(zero_frame(u32::from_be_bytes(len) as usize));
                    }
                    if send.write_chunk(zero_frame(0)).await.is_ok() {
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}

/// Closed-loop request/response against the echo server: `concurrency` connections with one
/// request of `request_len` bytes in flight each, for `duration`. Returns (requests/s,
/// latencies).
pub async fn echo_rate(
    server: &EchoServer,
    concurrency: usize,
    request_len: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Latencies)> {
    let config = server.connect_config();
    let endpoint = Endpoint::for_servers(&config.server_addrs)?;
    let mut conns: Vec<Connection> = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(endpoint.connect(&config).await.context("echo connection")?);
    }
    let request = vec![7u8; request_len];
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for conn in conns.clone() {
        let request = request.clone();
        tasks.spawn(async move {
            let mut latencies = Latencies::new();
            // Bounded in time and count.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                conn.request_raw(&request).await?;
                latencies.record(sent.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        });
    }
    let mut all = Latencies::new();
    while let Some(done) = tasks.join_next().await {
        all.merge(done??);
    }
    let elapsed = start.elapsed();
    for conn in &conns {
        conn.close();
    }
    endpoint.close();
    Ok((rate(all.len(), elapsed), all))
}

/// Unmeasured transactions before the measured ones.
const WARMUP_ROUNDS: usize = 3;

/// Queue-entry-shaped rows: (client number, sequence) → 32 bytes.
const ROWS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("rows");

/// Median time of a durable redb write transaction inserting `batch` rows, one per client
/// (keys `(client, round)`), over `rounds` transactions in a fresh database under `dir`.
pub fn redb_insert(dir: &std::path::Path, batch: usize, rounds: usize) -> anyhow::Result<Duration> {
    let path = dir.join(format!("baseline-{batch}.redb"));
    let db = Database::create(&path).context("cannot create the baseline database")?;
    let value = [9u8; 32];
    let mut times = Latencies::new();
    // The first transactions grow the file: not measured.
    for round in 0..(rounds.max(1) + WARMUP_ROUNDS) as u64 {
        let start = Instant::now();
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(ROWS)?;
            for client in 0..batch as u64 {
                table.insert((client, round), value.as_slice())?;
            }
        }
        txn.commit()?;
        if round >= WARMUP_ROUNDS as u64 {
            times.record(start.elapsed());
        }
    }
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(Duration::from_micros(times.median()))
}

/// Median time of a PostgreSQL transaction inserting `batch` queue-entry-shaped rows (one
/// per client, keys `(client, round)`, 32-byte values) in one statement and committing, over
/// `rounds` transactions, in a fresh table of the database at `url`. Durability is the
/// server's (fsync and synchronous_commit on), as for the homeserver.
pub async fn postgres_insert(url: &str, batch: usize, rounds: usize) -> anyhow::Result<Duration> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the baseline database")?;
    let driver = tokio::spawn(connection);
    let table = format!("baseline_rows_{batch}");
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table};
             CREATE TABLE {table} (client BIGINT NOT NULL, seq BIGINT NOT NULL,
                                   value BYTEA NOT NULL, PRIMARY KEY (client, seq))"
        ))
        .await?;
    let insert = format!(
        "INSERT INTO {table} (client, seq, value) SELECT c, $2, $3 FROM unnest($1::BIGINT[]) AS c"
    );
    let clients: Vec<i64> = (0..i64::try_from(batch)?).collect();
    let value = vec![9u8; 32];
    let mut times = Latencies::new();
    for round in 0..(rounds.max(1) + WARMUP_ROUNDS) {
        let start = Instant::now();
        let txn = client.transaction().await?;
        txn.execute(&insert, &[&clients, &i64::try_from(round)?, &value])
            .await?;
        txn.commit().await?;
        if round >= WARMUP_ROUNDS {
            times.record(start.elapsed());
        }
    }
    client.batch_execute(&format!("DROP TABLE {table}")).await?;
    drop(client);
    driver.abort();
    Ok(Duration::from_micros(times.median()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_baseline_measures_something() {
        let dir = tempfile::tempdir().unwrap();
        let time = redb_insert(dir.path(), 10, 3).unwrap();
        assert!(time > Duration::ZERO);
    }

    #[tokio::test]
    async fn echo_server_answers_with_frames() {
        let server = EchoServer::start(50).unwrap();
        let (ops, latencies) = echo_rate(&server, 2, 200, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(ops > 0.0 && !latencies.is_empty());
        server.stop();
    }
}
