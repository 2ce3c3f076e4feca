//! The homeserver's long-term keys: the AS signing key (Ed25519) and the TLS certificate.
//! Both are made on first start and kept in the data directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ServiceError;

/// File name of the AS signing key (PKCS#8) in the data directory.
pub const AS_KEY_FILE: &str = "as-signing-key.pk8";
/// File name of the QUIC stateless-reset secret in the data directory.
pub const RESET_KEY_FILE: &str = "stateless-reset.key";
/// File name of the self-signed certificate (PEM) in the data directory.
pub const CERT_FILE: &str = "server-cert.pem";
/// File name of the self-signed certificate's key (PEM) in the data directory.
pub const CERT_KEY_FILE: &str = "server-key.pem";

/// Failure to load or create a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key or certificate is malformed.
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a file readable only by the owner, atomically (temp file + rename).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// The AS signing key.
pub struct AsKey {
    pair: Ed25519KeyPair,
}

impl AsKey {
    /// Loads the key from `dir`, or makes and stores a new one.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let path = dir.join(AS_KEY_FILE);
        let pkcs8 = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| IdentityError::Invalid("cannot generate AS key".into()))?;
                write_private(&path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
            Err(err) => return Err(io_err(&path)(err)),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
            IdentityError::Invalid(format!("{} is not an Ed25519 key", path.display()))
        })?;
        Ok(Self { pair })
    }

    /// The verifying key (32 bytes).
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// The secret from which QUIC stateless-reset tokens are derived, made once and kept: a
/// restarted server then recognises packets of connections it lost and resets them at once,
/// instead of peers waiting for their idle timeout.
pub fn load_or_create_reset_secret(dir: &Path) -> Result<Vec<u8>, IdentityError> {
    let path = dir.join(RESET_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => Ok(bytes),
        Ok(_) => Err(IdentityError::Invalid(format!(
            "{} is not a 32-byte key",
            path.display()
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            use ring::rand::SecureRandom;
            let mut secret = vec![0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut secret)
                .map_err(|_| IdentityError::Invalid("no randomness".into()))?;
            write_private(&path, &secret)?;
            Ok(secret)
        }
        Err(err) => Err(io_err(&path)(err)),
    }
}

/// Checks that `key` is an Ed25519 public key of the right length.
pub fn check_ed25519_key(key: &[u8]) -> Result<(), ServiceError> {
    if key.len() == roost_protocol::messages::auth::ED25519_PUBLIC_KEY_LEN {
        Ok(())
    } else {
        Err(ServiceError::BadKey)
    }
}

/// Verifies an Ed25519 signature.
pub fn verify_ed25519(key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), ServiceError> {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, signature)
        .map_err(|_| ServiceError::BadSignature)
}

/// The certificate chain and key the server presents.
pub struct TlsIdentity {
    /// Leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
    /// Where the leaf certificate is (PEM), for clients to pin.
    pub cert_path: PathBuf,
}

impl TlsIdentity {
    /// Loads the configured files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let cert_chain = CertificateDer::pem_file_iter(cert_path)
            .map_err(|e| IdentityError::Invalid(format!("{}: {e}", cert_path.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::Invalid(format!("{}: {e}", cert_path.display())))?;
        if cert_chain.is_empty() {
            return Err(IdentityError::Invalid(format!(
                "{}: no certificate",
                cert_path.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| IdentityError::Invalid(format!("{}: {e}", key_path.display())))?;
        Ok(Self {
            cert_chain,
            key,
            cert_path: cert_path.to_owned(),
        })
    }

    /// Loads the self-signed certificate for `domain` from `dir`, or makes one.
    pub fn load_or_create_self_signed(dir: &Path, domain: &str) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(CERT_KEY_FILE);
        if !cert_path.exists() {
            let names = vec![domain.to_owned()];
            let certified = rcgen::generate_simple_self_signed(names)
                .map_err(|e| IdentityError::Invalid(format!("cannot make certificate: {e}")))?;
            write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
            // The certificate is public.
            std::fs::write(&cert_path, certified.cert.pem()).map_err(io_err(&cert_path))?;
        }
        Self::load(&cert_path, &key_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = AsKey::load_or_create(dir.path()).unwrap();
        let again = AsKey::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        let sig = first.sign(b"hello");
        verify_ed25519(&again.public_key(), b"hello", &sig).unwrap();
        assert!(verify_ed25519(&again.public_key(), b"hellO", &sig).is_err());

        let tls = TlsIdentity::load_or_create_self_signed(dir.path(), "example.org").unwrap();
        let tls_again = TlsIdentity::load_or_create_self_signed(dir.path(), "example.org").unwrap();
        assert_eq!(tls.cert_chain, tls_again.cert_chain);
    }
}
