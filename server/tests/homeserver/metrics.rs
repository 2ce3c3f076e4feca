//! `/metrics` and `/health` as an operator and Prometheus see them, over real TCP on
//! 127.0.0.1: every series described, build info, the storage gauges, the shipped Grafana
//! dashboard naming only exported metrics, and the HTTP server's bounds against slow or
//! oversized requests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roost_protocol::messages::auth::AsKeysRequest;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use roost_protocol::{GroupId, MessageId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// The dashboard operators import, as shipped.
const DASHBOARD: &str = include_str!("../../../deploy/grafana/roost.json");

/// Sends `request` as is and reads the whole answer; `None` if the server closed without
/// answering. The timeout only bounds a failure.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may close before reading everything (an oversized head): ignore that.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("the server neither answered nor closed");
    match read {
        Ok(_) if answer.is_empty() => None,
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        // A reset after an early close counts as closed when nothing was answered.
        Err(_) if answer.is_empty() => None,
        Err(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
    }
}

/// The body of a `/metrics` answer.
async fn scrape(addr: SocketAddr) -> String {
    let answer = http_get(addr, "/metrics").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{answer}"
    );
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap()
}

/// Sample lines by series name (without labels): (labels, value).
fn samples(text: &str) -> BTreeMap<String, Vec<(String, f64)>> {
    let mut out: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        out.entry(name.to_owned())
            .or_default()
            .push((labels.to_owned(), value.parse().unwrap()));
    }
    out
}

/// The value of the unlabelled series `name`.
fn value(text: &str, name: &str) -> Option<f64> {
    samples(text)
        .get(name)?
        .iter()
        .find(|(labels, _)| labels.is_empty())
        .map(|(_, v)| *v)
}

/// `# HELP` and `# TYPE` lines: name → text.
fn comments(text: &str, kind: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix(&format!("# {kind} ")))
        .map(|rest| {
            let (name, text) = rest.split_once(' ').unwrap();
            (name.to_owned(), text.to_owned())
        })
        .collect()
}

/// The metric a sample belongs to: histogram and summary parts share their metric's
/// `# TYPE`.
fn family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
        {
            return base;
        }
    }
    name
}

/// One request that succeeds.
async fn ask_local_keys(conn: &roost_client::transport::Connection) {
    conn.call(AsKeysRequest {
        domain: DOMAIN.parse().unwrap(),
    })
    .await
    .unwrap();
}

/// A server with metrics on, after some real traffic: requests that succeed, one that fails,
/// and a malformed frame.
async fn busy_server(dir: &std::path::Path) -> roost_server::Server {
    let mut cfg = config(dir);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.federation.peers.insert(
        "peer.example".into(),
        toml::from_str("address = \"127.0.0.1:9\"").unwrap(),
    );
    let server = start(cfg).await;
    let (_alice, _phone, conn) = new_client(&server, "alice").await;
    ask_local_keys(&conn).await;
    conn.call(AsKeysRequest {
        domain: "nowhere.example".parse().unwrap(),
    })
    .await
    .unwrap_err();
    conn.request_raw(&[0, 0, 0, 1, 0xff]).await.unwrap();
    server
}

#[tokio::test]
async fn every_series_is_described_and_build_info_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let server = busy_server(dir.path()).await;
    let text = scrape(server.metrics_addr().unwrap()).await;
    let (help, types) = (comments(&text, "HELP"), comments(&text, "TYPE"));
    let samples = samples(&text);
    assert!(samples.len() > 20, "{text}");
    for name in samples.keys() {
        let metric = family(name, &types);
        assert!(
            help.get(metric).is_some_and(|h| h.len() > 10),
            "{metric} has no # HELP\n{text}"
        );
        assert!(types.contains_key(metric), "{metric} has no # TYPE\n{text}");
    }
    assert_eq!(
        types
            .get("roost_request_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    let build = &samples["roost_build_info"];
    assert_eq!(build.len(), 1, "{build:?}");
    assert!(
        build[0]
            .0
            .contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build:?}"
    );
    assert_eq!(build[0].1, 1.0);
    // The requests made are counted by kind and outcome, the failing one by its code.
    let requests = &samples["roost_requests_total"];
    assert!(
        requests.iter().any(|(l, v)| l.contains("kind=\"AsKeys\"")
            && l.contains("outcome=\"OK\"")
            && *v >= 1.0),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|(l, _)| l.contains("kind=\"AsKeys\"") && !l.contains("outcome=\"OK\"")),
        "{requests:?}"
    );
    // Counters that nothing incremented yet are there at zero.
    assert!(
        value(&text, "roost_queue_full_drops_total").is_some(),
        "{text}"
    );
    // The storage gauges and the configured peer's (empty) backlog.
    assert!(value(&text, "roost_users").is_some(), "{text}");
    assert!(
        samples["roost_outbox_backlog"].contains(&("domain=\"peer.example\"".into(), 0.0)),
        "{text}"
    );
    server.shutdown().await;
}

/// Registers two users with a device each and queues three messages for the first, stops the
/// server, starts it again from `cfg` with metrics on, and checks the storage gauges.
async fn check_store_gauges(cfg: roost_server::config::Config) {
    let server = start(cfg.clone()).await;
    let (_alice, alice_phone, _a) = new_client(&server, "alice").await;
    let (_bob, _bob_phone, _b) = new_client(&server, "bob").await;
    let group: GroupId = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .unwrap();
    for n in 1..=3u8 {
        let payload = QueuePayload::GroupMessage(GroupMessage {
            group: group.clone(),
            message: vec![n; 10].into(),
        });
        server
            .enqueue(&alice_phone.id, MessageId([n; 16]), payload)
            .await
            .unwrap();
    }
    server.shutdown().await;

    // The gauges are read from storage when metrics start, then every 15 s.
    let mut cfg = cfg;
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = start(cfg).await;
    let addr = server.metrics_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(addr).await;
        if value(&text, "roost_users") == Some(2.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "users never counted: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(value(&text, "roost_clients"), Some(2.0), "{text}");
    assert_eq!(value(&text, "roost_queued_messages"), Some(3.0), "{text}");
    assert_eq!(value(&text, "roost_groups"), Some(0.0), "{text}");
    assert_eq!(value(&text, "roost_users_deactivated"), Some(0.0), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn store_gauges_count_users_clients_and_queued_messages() {
    let dir = tempfile::tempdir().unwrap();
    check_store_gauges(config(dir.path())).await;
}

#[tokio::test]
async fn store_gauges_count_the_same_on_postgres() {
    let cluster = roost_interop::postgres::Cluster::start().expect("a PostgreSQL cluster");
    let url = cluster.create_database("roost").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.storage.backend = roost_server::config::StorageBackend::Postgres;
    cfg.storage.url = Some(url);
    cfg.storage.pool_size = 4;
    check_store_gauges(cfg).await;
    drop(cluster);
}

/// Metric names a PromQL expression uses (every roost metric starts with `roost_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("roost_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every `expr` in the dashboard (panel targets and variable queries), recursively.
fn expressions(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_dashboard_query_names_an_exported_metric() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    // Importable as is: a title, a uid, panels, and no datasource left to an export input.
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert_eq!(dashboard["__inputs"], serde_json::json!([]));
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // What the dashboard must show (issue #15): each named by one of its queries.
    for needed in [
        "roost_requests_total",
        "roost_request_duration_seconds_bucket",
        "roost_bad_frames_total",
        "roost_fanout_recipients_bucket",
        "roost_queued_messages",
        "roost_outbox_backlog",
        "roost_executor_stalls_total",
        "roost_storage_failures_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let server = busy_server(dir.path()).await;
    let text = scrape(server.metrics_addr().unwrap()).await;
    let exported: BTreeSet<String> = samples(&text).into_keys().collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries name metrics the server does not export: {missing:?}\n{text}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn slow_oversized_and_non_http_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.limits.request_read_timeout_ms = 300;
    let server = start(cfg).await;
    let addr = server.metrics_addr().unwrap();

    // A head that never completes is cut off after the read timeout, with no answer.
    let started = Instant::now();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut buf))
        .await
        .expect("a slow request was never cut off");
    assert!(read.is_err() || buf.is_empty() || String::from_utf8_lossy(&buf).contains(" 408 "));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Too many or too large headers: 431, nothing else.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for n in 0..40 {
        big.extend_from_slice(format!("X-{n}: {}\r\n", "a".repeat(10)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let answer = exchange(addr, &big).await.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = exchange(addr, huge.as_bytes()).await.unwrap_or_default();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    // Only GET and HEAD; HEAD has no body.
    let answer = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let answer = exchange(addr, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    // Not HTTP at all.
    let answer = exchange(addr, b"\x16\x03\x01 hello\r\n\r\n")
        .await
        .unwrap_or_default();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );

    // The QUIC side is unaffected by all of this.
    let (_alice, _phone, conn) = new_client(&server, "alice").await;
    ask_local_keys(&conn).await;
    server.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_metrics_limit_are_closed_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.limits.metrics_max_connections = 2;
    let server = start(cfg).await;
    let addr = server.metrics_addr().unwrap();
    // Two idle connections hold both slots (for up to the 10 s read timeout); a third is
    // closed unanswered; once one of them goes, the server answers again.
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        exchange(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await,
        None,
        "a third connection was served"
    );
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = exchange(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
    server.shutdown().await;
}
