//! Authentication Service messages, client credentials, and what is signed.

use tls_codec::{Serialize, Size, TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::ids::{ClientId, Domain, UserId};
use crate::opaque::Opaque;

/// Length of an Ed25519 public key.
pub const ED25519_PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const ED25519_SIGNATURE_LEN: usize = 64;

/// Prefix of every signing label (like MLS's `"MLS 1.0 "`).
pub const LABEL_PREFIX: &str = "roost/1 ";
/// Label of the signature in [`RegisterUserRequest`].
pub const LABEL_REGISTER_USER: &str = "register user";
/// Label of the user's signature in [`AddClientRequest`].
pub const LABEL_ADD_CLIENT: &str = "add client";
/// Label of the user's signature in [`RemoveClientRequest`].
pub const LABEL_REMOVE_CLIENT: &str = "remove client";
/// Label of the AS's signature on a [`ClientCredential`].
pub const LABEL_CLIENT_CREDENTIAL: &str = "client credential";
/// Label of the client's signature in [`AuthenticateRequest`].
pub const LABEL_CONNECTION_AUTH: &str = "connection auth";

/// TLS keying-material exporter label for connection authentication.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-roost-connection-auth";
/// Length of the exported value.
pub const EXPORTER_LEN: usize = 32;

/// `struct { opaque label<V>; opaque content<V>; } SignContent;` with
/// `label = "roost/1 " + Label`: the exact bytes an Ed25519 signature covers.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct SignContent {
    /// `"roost/1 " + Label`.
    pub label: Opaque,
    /// The TLS encoding of the signed struct.
    pub content: Opaque,
}

/// Builds the bytes to sign or verify for `label` over the TLS encoding of `content`.
pub fn signing_input<T: Serialize + Size>(label: &str, content: &T) -> Vec<u8> {
    let mut inner = Vec::with_capacity(content.tls_serialized_len());
    // Serializing our own well-formed structs into a Vec cannot fail.
    let _ = content.tls_serialize(&mut inner);
    let wrapped = SignContent {
        label: Opaque::from(format!("{LABEL_PREFIX}{label}").into_bytes()),
        content: Opaque::new(inner),
    };
    let mut out = Vec::with_capacity(wrapped.tls_serialized_len());
    let _ = wrapped.tls_serialize(&mut out);
    out
}

/// What [`RegisterUserRequest::signature`] signs: proof that the registrant holds the user key.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RegisterUserTbs {
    /// The user being registered.
    pub user: UserId,
    /// Its Ed25519 public key.
    pub user_key: Opaque,
}

/// What [`AddClientRequest::user_signature`] signs.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AddClientTbs {
    /// The new client.
    pub client: ClientId,
    /// Its Ed25519 signature key (also its MLS signature key).
    pub client_key: Opaque,
}

/// What [`RemoveClientRequest::user_signature`] signs.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RemoveClientTbs {
    /// The client to remove.
    pub client: ClientId,
}

/// What [`AuthenticateRequest::signature`] signs. `exporter` is 32 bytes from the QUIC
/// connection's TLS keying-material exporter with label [`EXPORTER_LABEL`] and an empty
/// context, so the signature is worthless on any other connection.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ConnectionAuthTbs {
    /// The client authenticating.
    pub client: ClientId,
    /// The exported value.
    pub exporter: Opaque,
}

/// What the AS signs in a [`ClientCredential`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ClientCredentialTbs {
    /// The client.
    pub client: ClientId,
    /// The client's Ed25519 signature key.
    pub signature_key: Opaque,
    /// Valid from (Unix seconds).
    pub not_before: u64,
    /// Valid until (Unix seconds).
    pub not_after: u64,
}

/// A client's credential as issued by its homeserver's AS. Members of a group check an MLS
/// leaf's BasicCredential (identity = encoded ClientId) and signature key against it.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ClientCredential {
    /// The client.
    pub client: ClientId,
    /// The client's Ed25519 signature key.
    pub signature_key: Opaque,
    /// Valid from (Unix seconds).
    pub not_before: u64,
    /// Valid until (Unix seconds).
    pub not_after: u64,
    /// The AS's Ed25519 signature over `SignContent("client credential", ClientCredentialTbs)`.
    pub as_signature: Opaque,
}

impl ClientCredential {
    /// The signed part.
    pub fn tbs(&self) -> ClientCredentialTbs {
        ClientCredentialTbs {
            client: self.client.clone(),
            signature_key: self.signature_key.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

/// Register a new user on the client's homeserver.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RegisterUserRequest {
    /// The user id; its domain must be the server's.
    pub user: UserId,
    /// Ed25519 public key (32 bytes) that signs the user's client changes.
    pub user_key: Opaque,
    /// Required when the server gates registration.
    pub registration_token: Option<Opaque>,
    /// Signature with the user key over `SignContent("register user", RegisterUserTbs)`.
    pub signature: Opaque,
}

/// Result of [`RegisterUserRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RegisterUserResponse {
    /// The registered user.
    pub user: UserId,
}

/// Add a client (device) to a user. Needs no authenticated connection: the user signature is
/// the authorisation.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AddClientRequest {
    /// The new client; its device name must never have been used by this user.
    pub client: ClientId,
    /// The client's Ed25519 signature key.
    pub client_key: Opaque,
    /// Signature with the user key over `SignContent("add client", AddClientTbs)`.
    pub user_signature: Opaque,
}

/// Result of [`AddClientRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AddClientResponse {
    /// The credential the AS issued.
    pub credential: ClientCredential,
}

/// Remove (revoke) a client. Its queue and KeyPackages are deleted.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RemoveClientRequest {
    /// The client to remove.
    pub client: ClientId,
    /// Signature with the user key over `SignContent("remove client", RemoveClientTbs)`.
    pub user_signature: Opaque,
}

/// Result of [`RemoveClientRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RemoveClientResponse {}

/// Look up a user's current clients.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct DiscoverUserRequest {
    /// The user, of any domain.
    pub user: UserId,
}

/// Result of [`DiscoverUserRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct DiscoverUserResponse {
    /// The user's current client credentials (at least one).
    pub clients: Vec<ClientCredential>,
}

/// Ask for the AS verifying keys of a domain.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AsKeysRequest {
    /// The domain, this server's or a federated one.
    pub domain: Domain,
}

/// Result of [`AsKeysRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AsKeysResponse {
    /// The domain.
    pub domain: Domain,
    /// Ed25519 public keys, current first. A credential verifies if any of them signed it.
    pub keys: Vec<Opaque>,
}

/// Authenticate this connection as a client.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AuthenticateRequest {
    /// The client; its domain must be the server's.
    pub client: ClientId,
    /// Signature with the client key over `SignContent("connection auth", ConnectionAuthTbs)`.
    pub signature: Opaque,
}

/// Result of [`AuthenticateRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct AuthenticateResponse {
    /// The client's current credential.
    pub credential: ClientCredential,
}
