//! [`ServerConfig`]: how a client reaches and trusts its homeserver.

use roost_client::ClientConfig;
use roost_client::transport::{ConnectConfig, TrustConfig};

use crate::error::RoostError;

/// How the homeserver's certificate is trusted.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum Trust {
    /// Accept exactly the certificate(s) in this PEM file: how clients trust a homeserver's
    /// self-signed certificate (`server-cert.pem` in its data directory).
    PinnedCertificateFile {
        /// Path of the PEM file.
        path: String,
    },
    /// Web PKI: the certificate must chain to a CA of this PEM bundle and be valid for the
    /// domain.
    CaBundleFile {
        /// Path of the PEM file.
        path: String,
    },
}

/// The homeserver of the user. Not stored in the profile: pass it on every
/// [`open_profile`](crate::open_profile), so addresses may change between runs.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ServerConfig {
    /// The homeserver's domain: the domain of the user ids it serves.
    pub domain: String,
    /// Its UDP addresses as `host:port` (IP literal or name, resolved on every call that
    /// builds a client), tried in order: several nodes of one homeserver.
    pub addresses: Vec<String>,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// Registration token, for homeservers that gate registration.
    #[uniffi(default = None)]
    pub registration_token: Option<String>,
    /// Limit of one connection handshake in milliseconds (default 10 000).
    #[uniffi(default = None)]
    pub connect_timeout_ms: Option<u32>,
    /// Rounds of connection attempts (each trying every address) before a call fails with a
    /// network error (default 3).
    #[uniffi(default = None)]
    pub connect_attempts: Option<u32>,
}

impl ServerConfig {
    /// The SDK's configuration. Resolves the addresses (on the SDK runtime: a name lookup
    /// may block).
    pub(crate) async fn to_client_config(&self) -> Result<ClientConfig, RoostError> {
        let trust = match &self.trust {
            Trust::PinnedCertificateFile { path } => TrustConfig::pinned_from_pem_file(path),
            Trust::CaBundleFile { path } => TrustConfig::roots_from_pem_file(path),
        }
        .map_err(|err| RoostError::InvalidArgument {
            message: err.to_string(),
        })?;
        if self.addresses.is_empty() {
            return Err(RoostError::InvalidArgument {
                message: "no homeserver address".into(),
            });
        }
        let mut addrs = Vec::new();
        for address in &self.addresses {
            let resolved = tokio::net::lookup_host(address.as_str())
                .await
                .map_err(|err| RoostError::InvalidArgument {
                    message: format!("address {address:?}: {err}"),
                })?;
            addrs.extend(resolved);
        }
        let mut config =
            ClientConfig::new(ConnectConfig::with_addrs(addrs, self.domain.clone(), trust));
        config.registration_token = self.registration_token.clone();
        if let Some(millis) = self.connect_timeout_ms {
            config.connect.connect_timeout = std::time::Duration::from_millis(millis.into());
        }
        if let Some(attempts) = self.connect_attempts {
            if attempts == 0 {
                return Err(RoostError::InvalidArgument {
                    message: "connect_attempts must be at least 1".into(),
                });
            }
            config.connect_attempts = attempts;
        }
        Ok(config)
    }
}
