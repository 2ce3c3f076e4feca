//! Who a peer homeserver is. A federation connection must present a certificate that is
//! either pinned in the configuration for a domain, or chains to the federation CA bundle; the
//! peer then speaks for the domains its certificate is valid for (pinned: exactly the
//! configured domain; CA: the certificate's DNS names). Client connections (ALPN `roost/1`)
//! present no certificate: client authentication is offered, never required, at the TLS
//! layer, and required by the transport for `roost-fed/1`.

use std::collections::BTreeMap;
use std::sync::Arc;

use roost_protocol::Domain;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Verifies peer certificates against pins and the CA bundle.
#[derive(Debug)]
pub(crate) struct PeerVerifier {
    pins: BTreeMap<Domain, CertificateDer<'static>>,
    ca: Option<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    pub(crate) fn new(
        pins: BTreeMap<Domain, CertificateDer<'static>>,
        roots: Option<rustls::RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let ca = match roots {
            Some(roots) => Some(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok(Self { pins, ca, provider })
    }

    /// Whether the chain is valid under the CA bundle (not just pinned).
    pub(crate) fn ca_verified(&self, chain: &[CertificateDer<'static>]) -> bool {
        let (Some(ca), Some((leaf, intermediates))) = (&self.ca, chain.split_first()) else {
            return false;
        };
        ca.verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
    }

    /// Whether a peer presenting `chain` (already accepted by the handshake) speaks for
    /// `domain`.
    pub(crate) fn speaks_for(
        &self,
        chain: &[CertificateDer<'static>],
        ca_verified: bool,
        domain: &Domain,
    ) -> bool {
        let Some(leaf) = chain.first() else {
            return false;
        };
        if self.pins.get(domain) == Some(leaf) {
            return true;
        }
        if !ca_verified {
            return false;
        }
        let Ok(name) = ServerName::try_from(domain.as_str()) else {
            return false;
        };
        webpki::EndEntityCert::try_from(leaf)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Clients of this server connect without a certificate.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        match &self.ca {
            Some(ca) => ca.root_hint_subjects(),
            None => &[],
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self
            .pins
            .values()
            .any(|pin| pin.as_ref() == end_entity.as_ref())
        {
            return Ok(ClientCertVerified::assertion());
        }
        match &self.ca {
            Some(ca) => ca.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General(
                "certificate is not a known peer".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
