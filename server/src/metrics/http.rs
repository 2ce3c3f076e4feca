//! The HTTP/1.1 server of `/metrics` and `/health` (hyper). One request per connection
//! (keep-alive off: a scraper connects every interval anyway), GET and HEAD only.
//!
//! Bounds, so that a slow or hostile client costs little: at most
//! `limits.metrics_max_connections` connections at once (more are closed at once); the request
//! head must arrive within `limits.request_read_timeout_ms` and hold at most [`MAX_HEADERS`]
//! headers in at most [`MAX_HEAD_BYTES`] bytes (else 431); the whole exchange, answer
//! included, ends within twice the read timeout; `/health` answers 503 when storage does not
//! answer within the read timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::State;

/// Most request header fields.
const MAX_HEADERS: usize = 32;
/// Largest request head (request line and headers), in bytes; hyper's read buffer is capped
/// at the same size.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a connection closed for shutdown may take to finish its answer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` and serves until shutdown; returns the bound address.
pub(super) async fn serve(
    addr: SocketAddr,
    state: Arc<State>,
    handle: PrometheusHandle,
    tracker: &TaskTracker,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(
        state.settings.limits.metrics_max_connections as usize,
    ));
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = state.shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // Out of file descriptors and the like: do not spin.
                        tracing::debug!(%err, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!("metrics connection refused: limits.metrics_max_connections");
                drop(stream);
                continue;
            };
            connections.spawn(connection(stream, state.clone(), handle.clone(), permit));
        }
    });
    Ok(bound)
}

/// Serves one connection within the bounds of the module docs.
async fn connection(
    stream: TcpStream,
    state: Arc<State>,
    handle: PrometheusHandle,
    _permit: OwnedSemaphorePermit,
) {
    let read_timeout = state.settings.limits.request_read_timeout();
    let shutdown = state.shutdown.clone();
    let service = hyper::service::service_fn(move |request| {
        let (state, handle) = (state.clone(), handle.clone());
        async move { Ok::<_, Infallible>(route(&state, &handle, &request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .keep_alive(false)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%err, "metrics connection ended with an error");
            }
        }
        _ = tokio::time::sleep(read_timeout.saturating_mul(2)) => {
            tracing::debug!("metrics connection cut off: too slow");
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

async fn route(
    state: &State,
    handle: &PrometheusHandle,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            handle.run_upkeep();
            let mut response = Response::new(Full::new(Bytes::from(handle.render())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
            response
        }
        "/health" => {
            // Healthy when the store answers a read in time.
            let limit = state.settings.limits.request_read_timeout();
            match tokio::time::timeout(limit, state.store.healthy()).await {
                Ok(Ok(())) => text(StatusCode::OK, "ok\n"),
                Ok(Err(err)) => {
                    tracing::debug!(%err, "health check: store unavailable");
                    text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
                }
                Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "store did not answer\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
