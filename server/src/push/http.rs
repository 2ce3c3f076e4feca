//! The HTTPS client of the push senders (hyper 1 over tokio-rustls): HTTP/2 when the service
//! offers it by ALPN (APNs requires it), HTTP/1.1 otherwise. An HTTP/2 connection is kept and
//! reused across wake-ups ([`H2Pool`]: one per APNs and FCM endpoint, one per Web Push
//! origin up to [`MAX_POOLED_ORIGINS`]); HTTP/1.1 and origins past that limit get one
//! connection per request.
//! It resolves the host itself, refuses forbidden addresses (see `endpoint`) and connects
//! only to an address it checked.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;

use super::endpoint::{Cidr, HttpsUrl, resolve_allowed};

/// Largest response body read (error reasons are small JSON documents).
const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// Web Push origins whose HTTP/2 connection is kept open (subscriptions name few push
/// services in practice; past this, wake-ups to a new origin connect per request).
pub(crate) const MAX_POOLED_ORIGINS: usize = 64;

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// The endpoint's address is forbidden (or does not resolve).
    #[error("refused: {0}")]
    Refused(String),
    /// Connecting, TLS or HTTP failed, or the time ran out.
    #[error("transport: {0}")]
    Transport(String),
}

/// A response: status, `Retry-After` (if any) and (bounded) body.
#[derive(Debug, Clone, Default)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<String>,
    pub(crate) body: Bytes,
}

/// The client: TLS configuration and SSRF rules.
pub(crate) struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
    forbidden: Vec<Cidr>,
    timeout: Duration,
}

impl HttpClient {
    pub(crate) fn new(
        roots: rustls::RootCertStore,
        forbidden: Vec<Cidr>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            tls: Arc::new(tls),
            forbidden,
            timeout,
        })
    }

    /// The forbidden ranges (for checks at registration).
    pub(crate) fn forbidden(&self) -> &[Cidr] {
        &self.forbidden
    }

    /// POSTs `body` to `url` with `headers` on a connection of its own; the whole exchange
    /// is bounded by the timeout.
    pub(crate) async fn post(
        &self,
        url: &HttpsUrl,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, HttpError> {
        match tokio::time::timeout(self.timeout, self.post_inner(url, headers, body)).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Transport("timed out".into())),
        }
    }

    /// POSTs on `pool`'s HTTP/2 connection to `url`'s endpoint (made now if there is none
    /// or it is closed). A request that fails on a reused connection (closed by the service
    /// meanwhile) is sent once more on a new one. Bounded by the timeout as a whole.
    pub(crate) async fn post_pooled(
        &self,
        pool: &H2Pool,
        url: &HttpsUrl,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, HttpError> {
        let body = Bytes::from(body);
        let exchange = async {
            let (sender, reused) = match self.pooled_sender(pool, url).await? {
                Pooled::H2(sender, reused) => (sender, reused),
                // The service speaks HTTP/1.1 only: this one request on the new connection.
                Pooled::Http1(tls) => {
                    return http1_exchange(*tls, request(url, headers, body, false)?).await;
                }
            };
            let answer = send(sender, request(url, headers, body.clone(), true)?).await;
            match answer {
                Err(err) if reused => {
                    tracing::debug!(%err, "pooled push connection failed; reconnecting");
                    pool.forget().await;
                    match self.pooled_sender(pool, url).await? {
                        Pooled::H2(sender, _) => {
                            send(sender, request(url, headers, body, true)?).await
                        }
                        Pooled::Http1(tls) => {
                            http1_exchange(*tls, request(url, headers, body, false)?).await
                        }
                    }
                }
                Err(err) => {
                    pool.forget().await;
                    Err(err)
                }
                answer => answer,
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Transport("timed out".into())),
        }
    }

    /// The pool's connection if it is open (true: reused), else a new one, kept in the pool
    /// if it speaks HTTP/2.
    async fn pooled_sender(&self, pool: &H2Pool, url: &HttpsUrl) -> Result<Pooled, HttpError> {
        let mut slot = pool.0.lock().await;
        if let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(Pooled::H2(sender.clone(), true));
        }
        *slot = None;
        let (tls, h2) = self.connect(url).await?;
        if !h2 {
            return Ok(Pooled::Http1(Box::new(tls)));
        }
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| HttpError::Transport(e.to_string()))?;
        // Runs until the connection closes or the pool drops its sender.
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%err, "pooled push connection ended");
            }
        });
        metrics::counter!("roost_push_connections_total").increment(1);
        *slot = Some(sender.clone());
        Ok(Pooled::H2(sender, false))
    }

    /// Resolves (refusing forbidden addresses), connects to the first address that answers,
    /// and makes TLS; whether HTTP/2 was agreed.
    async fn connect(
        &self,
        url: &HttpsUrl,
    ) -> Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, bool), HttpError> {
        let transport = |e: &dyn std::fmt::Display| HttpError::Transport(e.to_string());
        let addrs = resolve_allowed(url, &self.forbidden)
            .await
            .map_err(HttpError::Refused)?;
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(err) => last = Some(err),
            }
        }
        let tcp = match (tcp, last) {
            (Some(tcp), _) => tcp,
            (None, Some(err)) => return Err(transport(&err)),
            (None, None) => return Err(HttpError::Transport("no address".into())),
        };
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(url.host.clone()).map_err(|e| transport(&e))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| transport(&e))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok((tls, h2))
    }

    async fn post_inner(
        &self,
        url: &HttpsUrl,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, HttpError> {
        let transport = |e: &dyn std::fmt::Display| HttpError::Transport(e.to_string());
        let (tls, h2) = self.connect(url).await?;
        let request = request(url, headers, Bytes::from(body), h2)?;
        let io = TokioIo::new(tls);
        if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| transport(&e))?;
            let driver = tokio::spawn(conn);
            let answer = send(sender, request).await;
            driver.abort();
            answer
        } else {
            http1_exchange(io.into_inner(), request).await
        }
    }
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// What [`HttpClient::pooled_sender`] found or made.
enum Pooled {
    /// An HTTP/2 connection in the pool (true: it was open already).
    H2(H2Sender, bool),
    /// A new connection to a service without HTTP/2, for one request.
    Http1(Box<TlsStream>),
}

/// One HTTP/1.1 request on `tls`, which is closed afterwards.
async fn http1_exchange(
    tls: TlsStream,
    request: Request<Full<Bytes>>,
) -> Result<Answer, HttpError> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| HttpError::Transport(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let response = sender.send_request(request).await;
    let answer = read(response).await;
    driver.abort();
    answer
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// One HTTP/2 connection to one endpoint, shared by every request to it (APNs asks providers
/// to keep their connections open rather than connect per notification).
#[derive(Default)]
pub(crate) struct H2Pool(tokio::sync::Mutex<Option<H2Sender>>);

impl H2Pool {
    async fn forget(&self) {
        *self.0.lock().await = None;
    }

    /// Whether it holds no open connection (false while it is in use).
    fn is_idle_and_closed(&self) -> bool {
        self.0
            .try_lock()
            .is_ok_and(|slot| slot.as_ref().is_none_or(H2Sender::is_closed))
    }
}

/// One [`H2Pool`] per origin (Web Push: every subscription names its push service), at most
/// [`MAX_POOLED_ORIGINS`].
#[derive(Default)]
pub(crate) struct OriginPools(std::sync::Mutex<std::collections::HashMap<String, Arc<H2Pool>>>);

impl OriginPools {
    /// The pool of `url`'s origin; None when the limit is reached by origins with open
    /// connections (the request then connects on its own).
    pub(crate) fn get(&self, url: &HttpsUrl) -> Option<Arc<H2Pool>> {
        let mut pools = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let origin = url.authority();
        if let Some(pool) = pools.get(&origin) {
            return Some(Arc::clone(pool));
        }
        if pools.len() >= MAX_POOLED_ORIGINS {
            pools.retain(|_, pool| !pool.is_idle_and_closed());
            if pools.len() >= MAX_POOLED_ORIGINS {
                return None;
            }
        }
        let pool = Arc::new(H2Pool::default());
        pools.insert(origin, Arc::clone(&pool));
        Some(pool)
    }
}

fn request(
    url: &HttpsUrl,
    headers: &[(&str, String)],
    body: Bytes,
    h2: bool,
) -> Result<Request<Full<Bytes>>, HttpError> {
    let mut builder = Request::post(format!("https://{}{}", url.authority(), url.path));
    if !h2 {
        builder = builder.header("host", url.authority());
    }
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    builder
        .header("content-length", body.len().to_string())
        .body(Full::new(body))
        .map_err(|e| HttpError::Transport(e.to_string()))
}

async fn send(mut sender: H2Sender, request: Request<Full<Bytes>>) -> Result<Answer, HttpError> {
    sender
        .ready()
        .await
        .map_err(|e| HttpError::Transport(e.to_string()))?;
    read(sender.send_request(request).await).await
}

async fn read(
    response: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<Answer, HttpError> {
    let response = response.map_err(|e| HttpError::Transport(e.to_string()))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64)
        .map(str::to_owned);
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

/// The trust roots: the PEM bundle `ca_file`, else the built-in Mozilla roots.
pub(crate) fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("push.ca_file {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("push.ca_file {}: {e}", path.display()))?;
                store
                    .add(cert)
                    .map_err(|e| format!("push.ca_file {}: {e}", path.display()))?;
            }
            if store.is_empty() {
                return Err(format!(
                    "push.ca_file {} holds no certificate",
                    path.display()
                ));
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: &str) -> HttpsUrl {
        HttpsUrl::parse(&format!("https://{host}/push/1")).unwrap()
    }

    #[test]
    fn each_origin_has_one_pool_and_unused_ones_make_room() {
        let pools = OriginPools::default();
        let a = pools.get(&url("a.example")).unwrap();
        assert!(Arc::ptr_eq(&a, &pools.get(&url("a.example")).unwrap()));
        assert!(!Arc::ptr_eq(
            &a,
            &pools.get(&url("a.example:8443")).unwrap()
        ));
        for n in 0..2 * MAX_POOLED_ORIGINS {
            // None of them has an open connection: a new origin takes an unused one's place.
            assert!(pools.get(&url(&format!("h{n}.example"))).is_some());
        }
        assert!(pools.0.lock().unwrap().len() <= MAX_POOLED_ORIGINS);
    }
}
