//! The cryptography of push: Web Push message encryption (RFC 8291, `aes128gcm` content
//! coding of RFC 8188), ES256 JSON Web Tokens (VAPID, RFC 8292, and the APNs provider token),
//! and the sealing of stored registrations with the server's push key (AES-256-GCM).
//! Everything goes through ring, the TLS stack's provider.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey};
use ring::hkdf::{HKDF_SHA256, KeyType, Prk, Salt};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

/// Length of an uncompressed P-256 public key.
pub(crate) const P256_PUBLIC_LEN: usize = 65;
/// Length of a Web Push authentication secret.
pub(crate) const AUTH_SECRET_LEN: usize = 16;
/// Record size announced in the `aes128gcm` header (one record carries the whole wake-up).
const RECORD_SIZE: u32 = 4096;

/// A crypto operation failed (bad key material from a peer, or no randomness).
#[derive(Debug, thiserror::Error)]
#[error("push crypto: {0}")]
pub(crate) struct CryptoError(pub(crate) &'static str);

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &Prk, info: &[&[u8]], len: usize) -> Result<Vec<u8>, CryptoError> {
    let mut out = vec![0u8; len];
    prk.expand(info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| CryptoError("hkdf"))?;
    Ok(out)
}

/// Encrypts `plaintext` for a Web Push subscription (RFC 8291 §3.4): a fresh ECDH key and
/// salt per message; the body is the RFC 8188 header (salt, record size, the sender's public
/// key) and one record.
pub(crate) fn web_push_encrypt(
    ua_public: &[u8],
    auth_secret: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let rng = SystemRandom::new();
    if ua_public.len() != P256_PUBLIC_LEN || auth_secret.len() != AUTH_SECRET_LEN {
        return Err(CryptoError("subscription keys have the wrong length"));
    }
    let as_private =
        EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| CryptoError("ecdh key"))?;
    let as_public = as_private
        .compute_public_key()
        .map_err(|_| CryptoError("ecdh key"))?;
    let as_public = as_public.as_ref().to_vec();
    let ecdh_secret = ring::agreement::agree_ephemeral(
        as_private,
        &UnparsedPublicKey::new(&ECDH_P256, ua_public),
        |secret| secret.to_vec(),
    )
    .map_err(|_| CryptoError("the subscription's public key is not a P-256 point"))?;
    // IKM = HKDF(auth_secret, ecdh_secret, "WebPush: info" || 0 || ua_public || as_public, 32)
    let prk_key = Salt::new(HKDF_SHA256, auth_secret).extract(&ecdh_secret);
    let ikm = expand(&prk_key, &[b"WebPush: info\0", ua_public, &as_public], 32)?;
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| CryptoError("randomness"))?;
    let prk = Salt::new(HKDF_SHA256, &salt).extract(&ikm);
    let cek = expand(&prk, &[b"Content-Encoding: aes128gcm\0"], 16)?;
    let nonce = expand(&prk, &[b"Content-Encoding: nonce\0"], 12)?;
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| CryptoError("aead key"))?);
    let nonce = Nonce::try_assume_unique_for_key(&nonce).map_err(|_| CryptoError("nonce"))?;
    // The last (only) record ends with the delimiter 0x02.
    let mut record = Vec::with_capacity(plaintext.len() + 1 + 16);
    record.extend_from_slice(plaintext);
    record.push(2);
    key.seal_in_place_append_tag(nonce, Aad::empty(), &mut record)
        .map_err(|_| CryptoError("seal"))?;
    let mut body = Vec::with_capacity(16 + 4 + 1 + P256_PUBLIC_LEN + record.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(P256_PUBLIC_LEN as u8);
    body.extend_from_slice(&as_public);
    body.extend_from_slice(&record);
    Ok(body)
}

/// An ES256 signing key (P-256).
pub(crate) struct Es256Key {
    pair: EcdsaKeyPair,
}

impl Es256Key {
    /// From a PKCS#8 document (DER).
    pub(crate) fn from_pkcs8(der: &[u8]) -> Result<Self, CryptoError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|_| CryptoError("not a P-256 PKCS#8 key"))?;
        Ok(Self { pair })
    }

    /// A new key, as PKCS#8 DER.
    pub(crate) fn generate_pkcs8() -> Result<Vec<u8>, CryptoError> {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| CryptoError("key generation"))
    }

    /// The uncompressed public key (65 bytes).
    pub(crate) fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// A compact JWS (`header.claims.signature`) over these JSON values.
    pub(crate) fn jwt(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, CryptoError> {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| CryptoError("sign"))?;
        Ok(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// Base64url without padding, as Web Push and JWTs use it.
pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The key registrations are sealed with at rest.
pub(crate) struct SealKey(LessSafeKey);

/// Length of a sealed value's nonce prefix.
const SEAL_NONCE_LEN: usize = 12;

impl SealKey {
    /// From 32 secret bytes.
    pub(crate) fn new(key: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, key).map_err(|_| CryptoError("seal key length"))?,
        )))
    }

    /// Encrypts `plaintext` bound to `context` (the client number: a sealed value copied to
    /// another client's row does not open). Output: nonce || ciphertext || tag.
    pub(crate) fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; SEAL_NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptoError("randomness"))?;
        let mut out = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut out,
            )
            .map_err(|_| CryptoError("seal"))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Ok(sealed)
    }

    /// Decrypts what [`SealKey::seal`] made for the same `context`.
    pub(crate) fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < SEAL_NONCE_LEN {
            return Err(CryptoError("sealed value too short"));
        }
        let (nonce, ciphertext) = sealed.split_at(SEAL_NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError("nonce"))?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(context), &mut buf)
            .map_err(|_| CryptoError("sealed value does not open with the push key"))?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let key = SealKey::new(&[7u8; 32]).unwrap();
        let sealed = key.seal(b"client 1", b"token").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"token"));
        assert_eq!(key.open(b"client 1", &sealed).unwrap(), b"token");
        assert!(key.open(b"client 2", &sealed).is_err());
        assert!(
            SealKey::new(&[8u8; 32])
                .unwrap()
                .open(b"client 1", &sealed)
                .is_err()
        );
        assert!(key.open(b"client 1", &sealed[..5]).is_err());
        // A fresh nonce each time.
        assert_ne!(sealed, key.seal(b"client 1", b"token").unwrap());
    }

    #[test]
    fn web_push_bodies_have_the_rfc8188_header_and_refuse_bad_keys() {
        let ua = EphemeralPrivateKey::generate(&ECDH_P256, &SystemRandom::new()).unwrap();
        let ua_public = ua.compute_public_key().unwrap();
        let body = web_push_encrypt(ua_public.as_ref(), &[1u8; 16], b"wake").unwrap();
        assert_eq!(&body[16..20], &RECORD_SIZE.to_be_bytes());
        assert_eq!(body[20] as usize, P256_PUBLIC_LEN);
        // header + plaintext + delimiter + tag
        assert_eq!(body.len(), 21 + 65 + 4 + 1 + 16);
        assert!(web_push_encrypt(&[4u8; 65], &[1u8; 16], b"x").is_err());
        assert!(web_push_encrypt(ua_public.as_ref(), &[1u8; 15], b"x").is_err());
    }
}
