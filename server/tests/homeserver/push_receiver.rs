//! A local HTTPS push service for the push tests: a test CA's certificate for 127.0.0.1,
//! HTTP/2 or HTTP/1.1 by ALPN (hyper 1), every request recorded, answered with a status the
//! test sets. And what a user agent does with a Web Push message: decrypt it (RFC 8291,
//! with the RustCrypto crates, not the server's ring code) and check the VAPID token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::pki::Pki;

/// One request as the push service saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub version: hyper::Version,
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    requests: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    retry_after: Arc<Mutex<Option<String>>>,
    /// TLS connections accepted so far.
    connections: Arc<AtomicUsize>,
    /// The connections being served (aborted by `drop_connections`).
    served: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start(dir: &Path) -> Receiver {
        Self::offering(dir, &[b"h2", b"http/1.1"]).await
    }

    /// A push service that speaks HTTP/1.1 only (no HTTP/2 offered by ALPN).
    pub async fn start_http1_only(dir: &Path) -> Receiver {
        Self::offering(dir, &[b"http/1.1"]).await
    }

    async fn offering(dir: &Path, alpn: &[&[u8]]) -> Receiver {
        let pki = Pki::new(dir, "push");
        let (cert, key) = pki.issue(dir, "receiver", &["127.0.0.1"]);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(&key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(201));
        let retry_after = Arc::new(Mutex::new(None::<String>));
        let connections = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        let (rq, st, ra, count, sv) = (
            requests.clone(),
            status.clone(),
            retry_after.clone(),
            connections.clone(),
            served.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, rq, st, ra, count) = (
                    acceptor.clone(),
                    rq.clone(),
                    st.clone(),
                    ra.clone(),
                    count.clone(),
                );
                let handle = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (rq, st, ra) = (rq.clone(), st.clone(), ra.clone());
                        async move {
                            let version = req.version();
                            let path = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await?.to_bytes().to_vec();
                            // The answer is chosen before the request is visible to the test.
                            let mut response =
                                hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(st.load(Ordering::SeqCst)).unwrap();
                            if let Some(value) = ra.lock().unwrap().clone() {
                                response
                                    .headers_mut()
                                    .insert("retry-after", value.parse().unwrap());
                            }
                            rq.lock().unwrap().push(Received {
                                version,
                                path,
                                headers,
                                body,
                                at: Instant::now(),
                            });
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
                sv.lock().unwrap().push(handle);
            }
        });
        Receiver {
            addr,
            ca_file: pki.ca_file.clone(),
            requests,
            status,
            retry_after,
            connections,
            served,
            task,
        }
    }

    /// The `Retry-After` value of the next answers (None: no such header).
    pub fn retry_after(&self, value: Option<&str>) {
        *self.retry_after.lock().unwrap() = value.map(str::to_owned);
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Cuts every open connection (as a push service restarting, or a network failure).
    pub fn drop_connections(&self) {
        for handle in self.served.lock().unwrap().drain(..) {
            handle.abort();
        }
    }

    /// The status the next requests are answered with.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived (panics after `secs`).
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} push requests, got {}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A Web Push subscription's private side, as a browser or UnifiedPush distributor holds it.
pub struct Subscriber {
    secret: p256::SecretKey,
    pub auth: [u8; 16],
}

impl Subscriber {
    pub fn new() -> Subscriber {
        let secret = loop {
            if let Ok(secret) = p256::SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
                break secret;
            }
        };
        let mut auth = [0u8; 16];
        rand::fill(&mut auth);
        Subscriber { secret, auth }
    }

    /// The `p256dh` key: uncompressed point.
    pub fn public(&self) -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    /// Decrypts an `aes128gcm` Web Push body (RFC 8291 §3.4, RFC 8188 §2).
    pub fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        use aes_gcm::aead::{Aead, KeyInit};
        let salt = &body[..16];
        let rs = u32::from_be_bytes(body[16..20].try_into().unwrap());
        assert!(rs >= 18, "record size {rs}");
        let idlen = body[20] as usize;
        assert_eq!(idlen, 65, "keyid must be the sender's public key");
        let as_public = &body[21..21 + idlen];
        let ciphertext = &body[21 + idlen..];
        let sender = p256::PublicKey::from_sec1_bytes(as_public).unwrap();
        let shared =
            p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), sender.as_affine());
        let mut key_info = b"WebPush: info\0".to_vec();
        key_info.extend_from_slice(&self.public());
        key_info.extend_from_slice(as_public);
        let mut ikm = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(&self.auth), shared.raw_secret_bytes())
            .expand(&key_info, &mut ikm)
            .unwrap();
        let prk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &ikm);
        let mut cek = [0u8; 16];
        prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
            .unwrap();
        let mut nonce = [0u8; 12];
        prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
            .unwrap();
        let cipher = aes_gcm::Aes128Gcm::new_from_slice(&cek).unwrap();
        let mut plain = cipher
            .decrypt(aes_gcm::Nonce::from_slice(&nonce), ciphertext)
            .expect("the payload decrypts with the subscription's keys");
        // Padding: zeros after the delimiter 0x02 (last record).
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "last-record delimiter");
        plain
    }
}

/// Verifies an ES256 JWT with `public` (uncompressed P-256); returns (header, claims).
pub fn verify_jwt(jwt: &str, public: &[u8]) -> (serde_json::Value, serde_json::Value) {
    use p256::ecdsa::signature::Verifier;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS");
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(public).unwrap();
    let signature =
        p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .expect("the JWT signature verifies");
    let decode = |part: &str| -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    };
    (decode(parts[0]), decode(parts[1]))
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
