//! The harness's own PKI: a CA generated with rcgen and one certificate per homeserver, valid
//! for the names it is issued for and usable both as TLS server certificate (clients and
//! peers connecting to it) and as TLS client certificate (federation connections it opens).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority whose certificate is written to `ca_file`.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key_file: PathBuf,
}

impl Ca {
    /// Generates a new CA named `name` and writes its certificate to `ca_file`.
    pub fn generate(name: &str, ca_file: &Path) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} (roost-interop CA)"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        write_file(ca_file, issuer.pem().as_bytes())?;
        Ok(Self {
            issuer,
            ca_file: ca_file.to_owned(),
        })
    }

    /// The PEM file holding the CA certificate (the trust root for clients and peers).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Issues a certificate valid for the DNS `names` and writes it and its key to
    /// `cert_file` and `key_file`.
    pub fn issue(
        &self,
        names: &[String],
        cert_file: &Path,
        key_file: &Path,
    ) -> anyhow::Result<IssuedCertificate> {
        let mut params = CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.clone());
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        write_file(cert_file, cert.pem().as_bytes())?;
        write_file(key_file, key.serialize_pem().as_bytes())?;
        Ok(IssuedCertificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
        })
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_client::transport::{ClientIdentity, TrustConfig};

    #[test]
    fn issued_certificates_load_as_identity_and_the_ca_as_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test", &dir.path().join("ca.pem")).unwrap();
        let issued = ca
            .issue(
                &["alpha.test".into()],
                &dir.path().join("a.pem"),
                &dir.path().join("a.key"),
            )
            .unwrap();
        let identity = ClientIdentity::from_pem_files(&issued.cert_file, &issued.key_file).unwrap();
        assert_eq!(identity.cert_chain.len(), 1);
        assert!(matches!(
            TrustConfig::roots_from_pem_file(ca.ca_file()).unwrap(),
            TrustConfig::Roots(_)
        ));
    }
}
