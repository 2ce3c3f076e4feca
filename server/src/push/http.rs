//! The HTTPS client of the push senders (hyper 1 over tokio-rustls): one connection per
//! request, HTTP/2 when the service offers it by ALPN (APNs requires it), HTTP/1.1 otherwise.
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

/// A response: status and (bounded) body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
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

    /// POSTs `body` to `url` with `headers`; the whole exchange is bounded by the timeout.
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

    async fn post_inner(
        &self,
        url: &HttpsUrl,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, HttpError> {
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
        let mut builder = Request::post(format!("https://{}{}", url.authority(), url.path));
        if !h2 {
            builder = builder.header("host", url.authority());
        }
        for (name, value) in headers {
            builder = builder.header(*name, value.as_str());
        }
        let request = builder
            .header("content-length", body.len().to_string())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| transport(&e))?;
        let io = TokioIo::new(tls);
        if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| transport(&e))?;
            let driver = tokio::spawn(conn);
            let response = sender.send_request(request).await;
            let answer = read(response).await;
            driver.abort();
            answer
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| transport(&e))?;
            let driver = tokio::spawn(conn);
            let response = sender.send_request(request).await;
            let answer = read(response).await;
            driver.abort();
            answer
        }
    }
}

async fn read(
    response: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<Answer, HttpError> {
    let response = response.map_err(|e| HttpError::Transport(e.to_string()))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Ok(Answer { status, body })
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
