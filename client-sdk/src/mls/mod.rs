//! Every openmls call of the SDK, behind non-generic functions (openmls's generics are
//! instantiated once, here), so the rest of the SDK deals in bytes, roost ids and a few
//! opaque handles.
//!
//! The profile: ciphersuite 0x0001, BasicCredential whose identity is the TLS encoding of the
//! ClientId, the client's Ed25519 key as MLS signature key, handshake messages as
//! PublicMessages (MIXED_PLAINTEXT policy) and the ratchet tree in Welcomes and GroupInfos.

mod group;

use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, CredentialWithKey, ExtensionType, KeyPackage,
    KeyPackageIn, LeafNode, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroupCreateConfig,
    MlsGroupJoinConfig, ProtocolVersion,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::Signer;
use openmls_traits::types::SignatureScheme;
use roost_protocol::ClientId;
use tls_codec::{DeserializeBytes, Serialize as _};

use crate::store::Store;
use crate::store::provider::MlsStorageError;

pub(crate) use group::{Incoming, group_info_context, private_message_epoch};

/// The only ciphersuite of roost/1.
pub(crate) const CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Past epochs whose application messages can still be decrypted (the DS accepts 2).
const MAX_PAST_EPOCHS: usize = 2;

/// An MLS operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MlsError {
    /// Bytes from a peer or the server are not the MLS object expected.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// openmls refused (invalid message, wrong state, ...).
    #[error("{context}: {reason}")]
    Refused {
        context: &'static str,
        reason: String,
    },
    /// The group is not known locally.
    #[error("no local state for this group")]
    NoGroup,
    /// The message is for a later epoch than ours: we missed something.
    #[error("message of epoch {theirs} but the group is at epoch {ours}")]
    Behind { ours: u64, theirs: u64 },
    /// The message is for an earlier epoch than the ones we keep.
    #[error("message of old epoch {theirs} (group at epoch {ours})")]
    Stale { ours: u64, theirs: u64 },
    /// An application message whose ratchet generation was used up already: a copy of one
    /// this client processed before.
    #[error("a copy of a message processed before")]
    Replayed,
    /// The profile database failed.
    #[error(transparent)]
    Storage(#[from] MlsStorageError),
}

impl MlsError {
    fn refused(context: &'static str, err: impl std::fmt::Debug) -> Self {
        MlsError::Refused {
            context,
            reason: format!("{err:?}"),
        }
    }
}

/// A leaf of a group (or of a KeyPackage): who it claims to be and its signature key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leaf {
    /// The leaf index in the tree (0 for KeyPackages).
    pub(crate) index: u32,
    /// The ClientId its BasicCredential names, if the identity decodes as one.
    pub(crate) client: Option<ClientId>,
    /// Its signature key.
    pub(crate) signature_key: Vec<u8>,
}

impl Leaf {
    fn of(index: u32, credential: &openmls::prelude::Credential, key: &[u8]) -> Self {
        let client = BasicCredential::try_from(credential.clone())
            .ok()
            .and_then(|basic| ClientId::tls_deserialize_exact_bytes(basic.identity()).ok());
        Leaf {
            index,
            client,
            signature_key: key.to_vec(),
        }
    }

    fn of_node(index: u32, node: &LeafNode) -> Self {
        Leaf::of(index, node.credential(), node.signature_key().as_slice())
    }
}

/// The client's MLS identity: its ClientId and Ed25519 key pair.
pub(crate) struct Identity {
    pub(crate) client: ClientId,
    key: SignatureKeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity of `client` with a key pair stored by [`generate_key`].
    pub(crate) fn new(client: ClientId, stored_key: &[u8]) -> Result<Self, MlsError> {
        Ok(Self {
            client,
            key: decode_key(stored_key)?,
        })
    }

    pub(crate) fn public_key(&self) -> &[u8] {
        self.key.public()
    }

    /// Signs `message` with the client key (connection authentication).
    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        // Ed25519 signing of a byte string cannot fail once the key decoded.
        self.key.sign(message).unwrap_or_default()
    }

    fn credential(&self) -> Result<CredentialWithKey, MlsError> {
        let identity = self
            .client
            .tls_serialize_detached()
            .map_err(|_| MlsError::Malformed("client id"))?;
        Ok(CredentialWithKey {
            credential: BasicCredential::new(identity).into(),
            signature_key: self.key.public().into(),
        })
    }
}

/// A new Ed25519 key pair: (its stored form, its public key). The stored form is secret.
pub(crate) fn generate_key() -> Result<(Vec<u8>, Vec<u8>), MlsError> {
    let pair = SignatureKeyPair::new(SignatureScheme::ED25519)
        .map_err(|e| MlsError::refused("key generation", e))?;
    let stored = serde_json::to_vec(&pair).map_err(|_| MlsError::Malformed("key pair"))?;
    Ok((stored, pair.public().to_vec()))
}

fn decode_key(stored: &[u8]) -> Result<SignatureKeyPair, MlsError> {
    let pair: SignatureKeyPair =
        serde_json::from_slice(stored).map_err(|_| MlsError::Malformed("stored key pair"))?;
    if pair.signature_scheme() != SignatureScheme::ED25519 {
        return Err(MlsError::Malformed("stored key pair"));
    }
    Ok(pair)
}

/// The public key of a key pair in its stored form.
pub(crate) fn public_key_of(stored: &[u8]) -> Result<Vec<u8>, MlsError> {
    Ok(decode_key(stored)?.public().to_vec())
}

/// Signs `message` with a key pair in its stored form.
pub(crate) fn sign_with(stored: &[u8], message: &[u8]) -> Result<Vec<u8>, MlsError> {
    decode_key(stored)?
        .sign(message)
        .map_err(|e| MlsError::refused("signing", e))
}

/// The openmls provider: RustCrypto for crypto and randomness, the profile database (with its
/// overlay) for storage.
pub(crate) struct Mls {
    crypto: RustCrypto,
    store: std::sync::Arc<Store>,
}

impl std::fmt::Debug for Mls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mls").finish_non_exhaustive()
    }
}

impl OpenMlsProvider for Mls {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = Store;

    fn storage(&self) -> &Store {
        &self.store
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

fn leaf_capabilities() -> Capabilities {
    // Every extension a KeyPackage of ours carries must be declared by its leaf.
    Capabilities::builder()
        .extensions(vec![ExtensionType::LastResort])
        .build()
}

fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .capabilities(leaf_capabilities())
        .build()
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

/// Encoded new KeyPackages: the ordinary ones and the last-resort one.
pub(crate) type NewKeyPackages = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// A KeyPackage that decoded and passed openmls's validation, with its leaf.
#[derive(Debug, Clone)]
pub(crate) struct ValidKeyPackage {
    key_package: KeyPackage,
    pub(crate) leaf: Leaf,
}

impl Mls {
    pub(crate) fn new(store: std::sync::Arc<Store>) -> Self {
        Self {
            crypto: RustCrypto::default(),
            store,
        }
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Makes `count` ordinary KeyPackages (and a last-resort one if asked); their private
    /// keys go to the overlay, to be committed before the KeyPackages are uploaded.
    pub(crate) fn new_key_packages(
        &self,
        identity: &Identity,
        count: usize,
        last_resort: bool,
    ) -> Result<NewKeyPackages, MlsError> {
        let build = |last_resort: bool| -> Result<Vec<u8>, MlsError> {
            let mut builder = KeyPackage::builder().leaf_node_capabilities(leaf_capabilities());
            if last_resort {
                builder = builder.mark_as_last_resort();
            }
            let bundle = builder
                .build(CIPHERSUITE, self, &identity.key, identity.credential()?)
                .map_err(|e| MlsError::refused("KeyPackage", e))?;
            bundle
                .key_package()
                .tls_serialize_detached()
                .map_err(|_| MlsError::Malformed("KeyPackage"))
        };
        let ordinary = (0..count)
            .map(|_| build(false))
            .collect::<Result<Vec<_>, _>>()?;
        let last_resort = if last_resort {
            Some(build(true)?)
        } else {
            None
        };
        Ok((ordinary, last_resort))
    }

    /// Decodes and validates a KeyPackage received from the KeyPackage service.
    pub(crate) fn validate_key_package(&self, bytes: &[u8]) -> Result<ValidKeyPackage, MlsError> {
        let key_package_in = KeyPackageIn::tls_deserialize_exact_bytes(bytes)
            .map_err(|_| MlsError::Malformed("KeyPackage"))?;
        let key_package = key_package_in
            .validate(&self.crypto, ProtocolVersion::Mls10)
            .map_err(|e| MlsError::refused("KeyPackage validation", e))?;
        if key_package.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::Refused {
                context: "KeyPackage validation",
                reason: "unsupported ciphersuite".into(),
            });
        }
        let leaf = Leaf::of_node(0, key_package.leaf_node());
        Ok(ValidKeyPackage { key_package, leaf })
    }
}
