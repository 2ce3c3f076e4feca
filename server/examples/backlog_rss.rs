//! Memory of a homeserver holding a large queue backlog, for `storage.cache_size_mib`
//! (docs/BENCHMARKS.md, "redb cache and memory under a backlog").
//!
//! Runs one homeserver in this process on 127.0.0.1:0 (redb in DIR), registers one user
//! with CLIENTS devices, enqueues MESSAGES messages of 1 KiB spread over their queues (as the
//! DS does on fan-out), then every device fetches its whole queue over QUIC. Prints the
//! process's RSS after each phase and its peak during each (Linux `/proc/self/status`; the
//! peak is reset between phases), as one JSON line.
//!
//! `cargo run --release -p roost-server --example backlog_rss -- DIR CACHE_MIB MESSAGES [CLIENTS]`

use std::sync::Arc;
use std::time::Instant;

use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::signatures::Signer as _;
use openmls_traits::types::SignatureScheme;
use roost_client::transport::{ConnectConfig, Connection, Endpoint, TrustConfig};
use roost_protocol::messages::auth::*;
use roost_protocol::messages::queue::{GroupMessage, QueueFetchRequest, QueuePayload};
use roost_protocol::{ClientId, GroupId, MessageId, UserId};
use roost_server::Server;
use roost_server::config::Config;

const DOMAIN: &str = "example.org";
/// Enqueues in flight at once (the writer batches them into shared transactions).
const CONCURRENCY: usize = 256;
/// Payload bytes per message.
const PAYLOAD: usize = 1024;

fn sign(key: &SignatureKeyPair, message: &[u8]) -> Vec<u8> {
    key.sign(message).expect("signing")
}

/// (current RSS, peak RSS) of this process in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak RSS to the current one.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: backlog_rss DIR CACHE_MIB MESSAGES [CLIENTS]";
    let dir = std::path::PathBuf::from(args.first().ok_or_else(|| anyhow::anyhow!(usage))?);
    let cache_mib: u64 = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let messages: usize = args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let clients: usize = args.get(3).map_or(Ok(100), |c| c.parse())?;

    let mut config = Config {
        domain: DOMAIN.into(),
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.clone(),
        ..Config::default()
    };
    config.storage.cache_size_mib = cache_mib;
    config.limits.max_queue_depth = messages as u64;
    config.limits.max_clients_per_user = clients as u32;
    config.limits.add_client_burst = clients as u32;
    config.limits.max_fetch_messages = 10_000;
    config.limits.max_fetch_bytes = 16 * 1024 * 1024;
    let server = Arc::new(Server::start(config.validate()?).await?);
    let (rss_start, _) = rss_mib();

    // One user, `clients` devices, each with its own authenticated connection.
    let endpoint = Endpoint::for_server(server.local_addr())?;
    let trust = TrustConfig::PinnedCertificates(vec![server.certificate().clone()]);
    let connect = ConnectConfig::new(server.local_addr(), DOMAIN, trust);
    let admin = endpoint.connect(&connect).await?;
    let user: UserId = format!("backlog@{DOMAIN}").parse()?;
    let user_key = SignatureKeyPair::new(SignatureScheme::ED25519)?;
    let tbs = RegisterUserTbs {
        user: user.clone(),
        user_key: user_key.public().into(),
    };
    admin
        .call(RegisterUserRequest {
            user: user.clone(),
            user_key: user_key.public().into(),
            registration_token: None,
            signature: sign(&user_key, &signing_input(LABEL_REGISTER_USER, &tbs)).into(),
        })
        .await?;
    let mut devices: Vec<(ClientId, Connection)> = Vec::with_capacity(clients);
    for n in 0..clients {
        let id = ClientId::new(user.clone(), format!("d{n}").parse()?);
        let key = SignatureKeyPair::new(SignatureScheme::ED25519)?;
        let tbs = AddClientTbs {
            client: id.clone(),
            client_key: key.public().into(),
        };
        admin
            .call(AddClientRequest {
                client: id.clone(),
                client_key: key.public().into(),
                user_signature: sign(&user_key, &signing_input(LABEL_ADD_CLIENT, &tbs)).into(),
            })
            .await?;
        let conn = endpoint.connect(&connect).await?;
        conn.authenticate(&id, |input| sign(&key, input)).await?;
        devices.push((id, conn));
    }

    // Fill: `messages` distinct 1 KiB messages, round robin over the devices' queues.
    reset_peak();
    let group: GroupId = format!("2f1c0d3e-8a5b-4c7d-9e0f-112233445566@{DOMAIN}").parse()?;
    let ids: Arc<Vec<ClientId>> = Arc::new(devices.iter().map(|(id, _)| id.clone()).collect());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..CONCURRENCY {
        let (server, ids, group) = (server.clone(), ids.clone(), group.clone());
        tasks.spawn(async move {
            let mut n = worker;
            while n < messages {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(n as u64).to_be_bytes());
                let mut body = vec![0u8; PAYLOAD];
                body[..8].copy_from_slice(&(n as u64).to_le_bytes());
                let payload = QueuePayload::GroupMessage(GroupMessage {
                    group: group.clone(),
                    message: body.into(),
                });
                server
                    .enqueue(&ids[n % ids.len()], MessageId(id), payload)
                    .await
                    .map_err(|e| anyhow::anyhow!("enqueue: {e:?}"))?;
                n += CONCURRENCY;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let (rss_filled, peak_fill) = rss_mib();

    // Read: every device fetches its whole queue.
    reset_peak();
    let started = Instant::now();
    let mut fetched = 0usize;
    for (_, conn) in &devices {
        let mut after = 0;
        loop {
            let page = conn
                .call(QueueFetchRequest {
                    after_seq: after,
                    max_messages: 10_000,
                    max_bytes: 16 * 1024 * 1024,
                })
                .await?;
            let Some(last) = page.messages.last() else {
                break;
            };
            after = last.seq;
            fetched += page.messages.len();
        }
    }
    let read_secs = started.elapsed().as_secs_f64();
    let (rss_read, peak_read) = rss_mib();
    anyhow::ensure!(
        fetched == messages,
        "fetched {fetched} of {messages} messages"
    );
    let database_mib =
        std::fs::metadata(dir.join(roost_server::DATABASE_FILE))?.len() as f64 / (1024.0 * 1024.0);
    println!(
        "{}",
        serde_json::json!({
            "cache_size_mib": cache_mib,
            "messages": messages,
            "clients": clients,
            "database_mib": database_mib.round(),
            "rss_start_mib": rss_start.round(),
            "fill_secs": (fill_secs * 10.0).round() / 10.0,
            "rss_after_fill_mib": rss_filled.round(),
            "peak_rss_fill_mib": peak_fill.round(),
            "read_secs": (read_secs * 10.0).round() / 10.0,
            "rss_after_read_mib": rss_read.round(),
            "peak_rss_read_mib": peak_read.round(),
        })
    );
    drop(devices);
    drop(admin);
    if let Ok(server) = Arc::try_unwrap(server) {
        server.shutdown().await;
    }
    Ok(())
}
