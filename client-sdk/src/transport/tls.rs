//! TLS for the request layer: how the server is trusted ([`TrustConfig`]), the optional
//! client certificate ([`ClientIdentity`]), PEM loading, and the rustls client configuration
//! (ring provider, TLS 1.3 only, as QUIC requires).
//!
//! There is deliberately no way to accept any certificate: a server is trusted either because
//! its exact certificate is pinned or because a configured CA vouches for its domain.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use super::error::TransportError;

/// How the client decides that it talks to the right server.
#[derive(Debug, Clone)]
pub enum TrustConfig {
    /// Accept exactly these end-entity certificates (byte-for-byte DER comparison). The
    /// server must still prove, in the TLS 1.3 handshake, that it holds the certificate's key.
    /// Neither the name nor the validity period is checked: the pin is the trust. This is how
    /// clients trust a homeserver's self-signed certificate.
    PinnedCertificates(Vec<CertificateDer<'static>>),
    /// Normal web PKI verification: the chain must lead to one of these roots and the
    /// certificate must be valid now and for the server name (the domain).
    Roots(RootCertStore),
}

impl TrustConfig {
    /// Pins every certificate of a PEM file.
    pub fn pinned_from_pem_file(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        Ok(TrustConfig::PinnedCertificates(load_certificates_pem(
            path,
        )?))
    }

    /// Trusts every CA certificate of a PEM file (a CA bundle).
    pub fn roots_from_pem_file(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        let path = path.as_ref();
        let mut roots = RootCertStore::empty();
        for cert in load_certificates_pem(path)? {
            roots.add(cert).map_err(|err| {
                TransportError::Config(format!(
                    "unusable CA certificate in {}: {err}",
                    path.display()
                ))
            })?;
        }
        Ok(TrustConfig::Roots(roots))
    }

    fn verifier(
        &self,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ServerCertVerifier>, TransportError> {
        match self {
            TrustConfig::PinnedCertificates(certs) => {
                if certs.is_empty() {
                    return Err(TransportError::Config("no pinned certificate".into()));
                }
                Ok(Arc::new(PinnedVerifier {
                    pinned: certs.clone(),
                    algorithms: provider.signature_verification_algorithms,
                }))
            }
            TrustConfig::Roots(roots) => {
                if roots.is_empty() {
                    return Err(TransportError::Config("no trusted root".into()));
                }
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots.clone()),
                    provider.clone(),
                )
                .build()
                .map_err(|err| TransportError::Config(err.to_string()))?;
                Ok(verifier)
            }
        }
    }
}

/// A certificate chain and its private key, presented as TLS client certificate (mutual TLS
/// between homeservers).
pub struct ClientIdentity {
    /// End-entity certificate first, then intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The end-entity certificate's private key.
    pub key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// An identity from a chain and its key.
    pub fn new(cert_chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Self { cert_chain, key }
    }

    /// Loads the chain and the key from PEM files (the key file's first private key).
    pub fn from_pem_files(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            cert_chain: load_certificates_pem(cert_path)?,
            key: load_private_key_pem(key_path)?,
        })
    }
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads every certificate of a PEM file. A file without any is an error.
pub fn load_certificates_pem(
    path: impl AsRef<Path>,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let path = path.as_ref();
    let pem_err = |source| TransportError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(pem_err(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_private_key_pem(
    path: impl AsRef<Path>,
) -> Result<PrivateKeyDer<'static>, TransportError> {
    let path = path.as_ref();
    PrivateKeyDer::from_pem_file(path).map_err(|source| TransportError::Pem {
        path: path.to_path_buf(),
        source,
    })
}

/// The rustls client configuration for one connection attempt.
pub(crate) fn client_config(
    trust: &TrustConfig,
    identity: Option<&ClientIdentity>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = trust.verifier(&provider)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| TransportError::Config(err.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
            .map_err(|err| TransportError::Config(format!("client identity: {err}")))?,
        None => builder.with_no_client_auth(),
    };
    if alpn.is_empty() {
        return Err(TransportError::Config("empty ALPN".into()));
    }
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Accepts exactly the pinned end-entity certificates; handshake signatures are still checked
/// with the provider's algorithms.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|pin| pin.as_ref() == end_entity.as_ref())
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration offers TLS 1.3 only; QUIC has no TLS 1.2.
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("roost-client-tls-{}-{name}", std::process::id()))
    }

    fn self_signed() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap()
    }

    #[test]
    fn pinned_verifier_compares_der_bytes() {
        let provider = rustls::crypto::ring::default_provider();
        let pinned = self_signed();
        let other = self_signed();
        let verifier = PinnedVerifier {
            pinned: vec![pinned.cert.der().clone()],
            algorithms: provider.signature_verification_algorithms,
        };
        let name = ServerName::try_from("localhost").unwrap();
        assert!(
            verifier
                .verify_server_cert(pinned.cert.der(), &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        assert_eq!(
            verifier
                .verify_server_cert(other.cert.der(), &[], &name, &[], UnixTime::now())
                .unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        assert!(!verifier.supported_verify_schemes().is_empty());
    }

    #[test]
    fn no_trust_means_no_config() {
        let empty_pins = TrustConfig::PinnedCertificates(Vec::new());
        assert!(matches!(
            client_config(&empty_pins, None, b"roost/1"),
            Err(TransportError::Config(_))
        ));
        let empty_roots = TrustConfig::Roots(RootCertStore::empty());
        assert!(matches!(
            client_config(&empty_roots, None, b"roost/1"),
            Err(TransportError::Config(_))
        ));
    }

    #[test]
    fn pem_files_load() {
        let cert = self_signed();
        let cert_path = temp_path("cert.pem");
        let key_path = temp_path("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();

        let TrustConfig::PinnedCertificates(pins) =
            TrustConfig::pinned_from_pem_file(&cert_path).unwrap()
        else {
            panic!("pinned trust expected");
        };
        assert_eq!(pins, vec![cert.cert.der().clone()]);
        let identity = ClientIdentity::from_pem_files(&cert_path, &key_path).unwrap();
        assert_eq!(identity.cert_chain.len(), 1);
        assert!(!format!("{identity:?}").contains("key:"));
        assert!(
            client_config(
                &TrustConfig::PinnedCertificates(pins),
                Some(&identity),
                b"roost/1"
            )
            .is_ok()
        );

        let TrustConfig::Roots(roots) = TrustConfig::roots_from_pem_file(&cert_path).unwrap()
        else {
            panic!("roots expected");
        };
        assert_eq!(roots.len(), 1);

        // A key file is not a certificate file, and a missing file is reported with its path.
        assert!(matches!(
            load_certificates_pem(&key_path),
            Err(TransportError::Pem { .. })
        ));
        assert!(TrustConfig::roots_from_pem_file(&key_path).is_err());
        let missing = temp_path("missing.pem");
        let err = load_private_key_pem(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"));
        std::fs::remove_file(cert_path).unwrap();
        std::fs::remove_file(key_path).unwrap();
    }
}
