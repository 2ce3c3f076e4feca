//! KeyPackage validation: openmls verifies the structure and both signatures; the lifetime is read by
//! our own small parser so that a configurable clock skew can be tolerated (openmls compares
//! `not_before` to its own clock exactly, while some implementations set it to "now").

use openmls::prelude::{
    BasicCredential, Ciphersuite, KeyPackageIn, KeyPackageVerifyError, ProtocolVersion,
};
use openmls_rust_crypto::RustCrypto;
use roost_protocol::opaque::read_varint;
use tls_codec::DeserializeBytes;

/// The only ciphersuite this server accepts.
pub(crate) const CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// What a KeyPackage must be bound to.
pub(crate) struct KeyPackagePolicy<'a> {
    /// TLS encoding of the uploading client's ClientId (the BasicCredential identity).
    pub(crate) identity: &'a [u8],
    /// The client's signature key from its AS credential.
    pub(crate) signature_key: &'a [u8],
    /// Unix seconds now.
    pub(crate) now: u64,
    /// Tolerated skew of `not_before`.
    pub(crate) clock_skew: u64,
    /// Longest accepted lifetime.
    pub(crate) max_lifetime: u64,
}

/// Validates one KeyPackage; returns its `not_after`.
pub(crate) fn validate_key_package(
    bytes: &[u8],
    policy: &KeyPackagePolicy<'_>,
) -> Result<u64, String> {
    let (not_before, not_after) = key_package_lifetime(bytes).ok_or("malformed KeyPackage")?;
    let kp = match KeyPackageIn::tls_deserialize_bytes(bytes) {
        Ok((kp, [])) => kp,
        Ok(_) => return Err("trailing bytes after KeyPackage".into()),
        Err(_) => return Err("malformed KeyPackage".into()),
    };
    let credential = kp.unverified_credential();
    let basic = BasicCredential::try_from(credential.credential)
        .map_err(|_| "credential is not a BasicCredential")?;
    if basic.identity() != policy.identity {
        return Err("credential identity is not the uploading client".into());
    }
    if credential.signature_key.as_slice() != policy.signature_key {
        return Err("signature key is not the client's key".into());
    }
    if bytes.get(2..4) != Some(&u16::from(CIPHERSUITE).to_be_bytes()[..]) {
        return Err("unsupported ciphersuite".into());
    }
    match kp.validate(&RustCrypto::default(), ProtocolVersion::Mls10) {
        Ok(_) => {}
        // openmls checks the lifetime last, after both signatures; we check it ourselves below
        // with the configured skew.
        Err(KeyPackageVerifyError::LifetimeError(_)) => {}
        Err(err) => return Err(err.to_string()),
    }
    if not_after <= policy.now {
        return Err("KeyPackage expired".into());
    }
    if not_before > policy.now.saturating_add(policy.clock_skew) {
        return Err("KeyPackage not valid yet".into());
    }
    if not_after.saturating_sub(not_before) > policy.max_lifetime {
        return Err("KeyPackage lifetime too long".into());
    }
    Ok(not_after)
}

/// Reads (not_before, not_after) from the leaf node of a TLS-encoded KeyPackage (RFC 9420
/// §10 and §7.2) without interpreting anything else.
pub(crate) fn key_package_lifetime(bytes: &[u8]) -> Option<(u64, u64)> {
    fn skip_vec(b: &[u8]) -> Option<&[u8]> {
        let (len, rest) = read_varint(b).ok()?;
        rest.get(len as usize..)
    }
    let rest = bytes.get(4..)?; // version, cipher_suite
    let rest = skip_vec(rest)?; // init_key
    let rest = skip_vec(rest)?; // leaf_node.encryption_key
    let rest = skip_vec(rest)?; // leaf_node.signature_key
    let credential_type = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
    let rest = match credential_type {
        // basic: opaque identity<V>; x509: Certificate certificates<V>. Both one vector.
        1 | 2 => skip_vec(rest.get(2..)?)?,
        _ => return None,
    };
    let mut rest = rest;
    for _ in 0..5 {
        // capabilities: versions, cipher_suites, extensions, proposals, credentials
        rest = skip_vec(rest)?;
    }
    // leaf_node_source must be key_package (1), followed by the lifetime.
    if *rest.first()? != 1 {
        return None;
    }
    let not_before = u64::from_be_bytes(rest.get(1..9)?.try_into().ok()?);
    let not_after = u64::from_be_bytes(rest.get(9..17)?.try_into().ok()?);
    Some((not_before, not_after))
}
