//! KeyPackage service messages. KeyPackages travel as the TLS encoding of an RFC 9420
//! `KeyPackage` (not wrapped in an `MLSMessage`).

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::ids::{ClientId, UserId};
use crate::messages::auth::ClientCredential;
use crate::opaque::Opaque;

/// Upload KeyPackages for the authenticated client.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct UploadKeyPackagesRequest {
    /// Ordinary KeyPackages, each handed out at most once.
    pub key_packages: Vec<Opaque>,
    /// A last-resort KeyPackage, replacing the previous one; served only when no ordinary
    /// one is left, and never consumed.
    pub last_resort: Option<Opaque>,
}

/// Result of [`UploadKeyPackagesRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct UploadKeyPackagesResponse {
    /// Ordinary KeyPackages now held for the client.
    pub remaining: u32,
}

/// Claim one KeyPackage for every current client of a user.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ClaimUserKeyPackagesRequest {
    /// The user, of any domain.
    pub user: UserId,
}

/// Result of [`ClaimUserKeyPackagesRequest`]. Clients with nothing to hand out are absent.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ClaimUserKeyPackagesResponse {
    /// One entry per client that had a KeyPackage.
    pub key_packages: Vec<ClaimedKeyPackage>,
}

/// Claim one KeyPackage of one client.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ClaimClientKeyPackageRequest {
    /// The client, of any domain.
    pub client: ClientId,
}

/// Result of [`ClaimClientKeyPackageRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ClaimClientKeyPackageResponse {
    /// The KeyPackage.
    pub key_package: ClaimedKeyPackage,
}

/// Whether a claimed KeyPackage was an ordinary or the last-resort one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub enum KeyPackageKind {
    /// Handed out once, now deleted from the server.
    Ordinary = 0,
    /// The client's last-resort KeyPackage; others may get it too.
    LastResort = 1,
}

/// One claimed KeyPackage with the owner's AS credential.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ClaimedKeyPackage {
    /// The owner's credential, to check the KeyPackage's leaf against.
    pub credential: ClientCredential,
    /// The KeyPackage.
    pub key_package: Opaque,
    /// Ordinary or last resort.
    pub kind: KeyPackageKind,
}

/// How many KeyPackages the authenticated client has left.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct KeyPackageCountRequest {}

/// Result of [`KeyPackageCountRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct KeyPackageCountResponse {
    /// Ordinary KeyPackages left.
    pub remaining: u32,
    /// 1 if a last-resort KeyPackage is held, else 0.
    pub has_last_resort: u8,
}
