//! What an operator notices: metrics and health, connection limits, address validation.

use roost_client::transport::{ConnectConfig, Endpoint, TrustConfig};
use roost_protocol::messages::auth::AsKeysRequest;

use crate::common::*;

#[tokio::test]
async fn metrics_and_health_are_served_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = start(cfg).await;
    let addr = server.metrics_addr().unwrap();
    let (_alice, _phone, conn) = new_client(&server, "alice").await;
    conn.call(AsKeysRequest {
        domain: DOMAIN.parse().unwrap(),
    })
    .await
    .unwrap();

    let health = http_get(addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = http_get(addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("roost_requests_total"), "{metrics}");
    assert!(metrics.contains("kind=\"AsKeys\""), "{metrics}");
    assert!(http_get(addr, "/nothing").await.starts_with("HTTP/1.1 404"));

    // The executor probe: the server shares this test's single-threaded runtime, so blocking
    // it for 150 ms is what a blocking call in a handler would do, and it is counted.
    let stalls = |metrics: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("roost_executor_stalls_total{over=\"100ms\"} "))
            .map_or(0.0, |value| value.trim().parse::<f64>().unwrap())
    };
    let before = stalls(&http_get(addr, "/metrics").await);
    std::thread::sleep(std::time::Duration::from_millis(150));
    // The probe records the stall once it runs again: wait for it (the deadline only bounds
    // a failure).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = http_get(addr, "/metrics").await;
        assert!(metrics.contains("roost_executor_probes_total"), "{metrics}");
        if stalls(&metrics) >= before + 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stall was not counted: {metrics}"
        );
        tokio::task::yield_now().await;
    }
    server.shutdown().await;

    // Off unless configured.
    let server = start(config(dir.path())).await;
    assert!(server.metrics_addr().is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_connections = 2;
    let server = start(cfg).await;
    let first = connect(&server).await;
    let second = connect(&server).await;
    let endpoint = Endpoint::for_server(server.local_addr()).unwrap();
    let trust = TrustConfig::PinnedCertificates(vec![server.certificate().clone()]);
    let config = ConnectConfig::new(server.local_addr(), DOMAIN, trust);
    let third = endpoint.connect(&config).await;
    assert!(third.is_err(), "the third connection must be refused");
    // The first two still work; when one closes, a new one gets in.
    second
        .call(AsKeysRequest {
            domain: DOMAIN.parse().unwrap(),
        })
        .await
        .unwrap();
    first.close();
    let mut again = None;
    for _ in 0..50 {
        if let Ok(conn) = endpoint.connect(&config).await {
            again = Some(conn);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let again = again.expect("a slot frees up when a connection closes");
    again
        .call(AsKeysRequest {
            domain: DOMAIN.parse().unwrap(),
        })
        .await
        .unwrap();
    server.shutdown().await;
}

/// Handshakes in progress count against the limit too: a burst of simultaneous handshakes
/// cannot push the server past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_handshakes_beyond_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_connections = 2;
    let server = start(cfg).await;
    let trust = TrustConfig::PinnedCertificates(vec![server.certificate().clone()]);
    let config = ConnectConfig::new(server.local_addr(), DOMAIN, trust);
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            let config = config.clone();
            let addr = server.local_addr();
            tokio::spawn(async move {
                let endpoint = Endpoint::for_server(addr).unwrap();
                let conn = endpoint.connect(&config).await;
                (endpoint, conn)
            })
        })
        .collect();
    let mut open = Vec::new();
    for attempt in attempts {
        let (endpoint, conn) = attempt.await.unwrap();
        if let Ok(conn) = conn {
            open.push((endpoint, conn));
        }
    }
    assert!(
        open.len() <= 2,
        "{} connections got in with max_connections = 2",
        open.len()
    );
    assert!(!open.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn clients_pass_address_validation_when_the_server_demands_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Every handshake must first answer a QUIC Retry.
    cfg.limits.retry_threshold = 0;
    let server = start(cfg).await;
    let (_alice, _phone, conn) = new_client(&server, "alice").await;
    conn.call(AsKeysRequest {
        domain: DOMAIN.parse().unwrap(),
    })
    .await
    .unwrap();
    server.shutdown().await;
}
