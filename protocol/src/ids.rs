//! Identifiers. Every id that names something owned by a homeserver carries that homeserver's
//! domain, so any server can tell where to forward a request.
//!
//! Accepted syntax (checked on construction and on decode; nothing else is representable):
//! - domain: 1-253 bytes, dot-separated labels of 1-63 bytes from `a-z 0-9 -`, a label neither
//!   starts nor ends with `-`; lowercase only, no trailing dot.
//! - user name: 1-64 bytes from `a-z 0-9 . _ -`, starting with `a-z` or `0-9`.
//! - device name: 1-32 bytes from `a-z 0-9 _ -`, starting with `a-z` or `0-9`.
//!
//! Text forms: `alice@example.org`, `alice@example.org/phone`,
//! `2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org`.

use std::fmt;
use std::str::FromStr;

use tls_codec::{
    DeserializeBytes, Error as CodecError, Serialize, Size, TlsDeserializeBytes, TlsSerialize,
    TlsSize,
};

use crate::opaque::{read_opaque, varint_len, write_opaque};

/// Maximum length of a domain in bytes.
pub const MAX_DOMAIN_LEN: usize = 253;
/// Maximum length of a user name in bytes.
pub const MAX_USER_NAME_LEN: usize = 64;
/// Maximum length of a device name in bytes.
pub const MAX_DEVICE_NAME_LEN: usize = 32;

/// Why a string or byte sequence is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The domain is empty, too long, or has an invalid label.
    #[error("invalid domain")]
    InvalidDomain,
    /// The user name is empty, too long, or uses characters outside `a-z 0-9 . _ -`.
    #[error("invalid user name")]
    InvalidUserName,
    /// The device name is empty, too long, or uses characters outside `a-z 0-9 _ -`.
    #[error("invalid device name")]
    InvalidDeviceName,
    /// The group id is not `uuid@domain`.
    #[error("invalid group id")]
    InvalidGroupId,
    /// The text is missing its `@` or `/` separator.
    #[error("malformed id: expected {0}")]
    Malformed(&'static str),
}

impl From<IdError> for CodecError {
    fn from(err: IdError) -> Self {
        CodecError::DecodingError(err.to_string())
    }
}

fn validate_domain(s: &str) -> Result<(), IdError> {
    if s.is_empty() || s.len() > MAX_DOMAIN_LEN {
        return Err(IdError::InvalidDomain);
    }
    for label in s.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if !ok {
            return Err(IdError::InvalidDomain);
        }
    }
    Ok(())
}

fn validate_name(s: &str, max: usize, allow_dot: bool) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || *b == b'_'
                || *b == b'-'
                || (allow_dot && *b == b'.')
        })
}

/// Defines a validated string newtype encoded as `opaque<V>`.
macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $check:expr, $err:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                let check: fn(&str) -> bool = $check;
                if check(&s) { Ok(Self(s)) } else { Err($err) }
            }

            /// The string form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl Size for $name {
            fn tls_serialized_len(&self) -> usize {
                varint_len(self.0.len() as u32) + self.0.len()
            }
        }

        impl Serialize for $name {
            fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, CodecError> {
                write_opaque(self.0.as_bytes(), writer)
            }
        }

        impl DeserializeBytes for $name {
            fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(Self, &[u8]), CodecError> {
                let (raw, rest) = read_opaque(bytes)?;
                let s = std::str::from_utf8(raw).map_err(|_| CodecError::from($err))?;
                Ok((Self::new(s)?, rest))
            }
        }
    };
}

validated_string!(
    /// A homeserver's domain, e.g. `example.org`.
    Domain,
    |s| validate_domain(s).is_ok(),
    IdError::InvalidDomain
);
validated_string!(
    /// The local part of a user id.
    UserName,
    |s| validate_name(s, MAX_USER_NAME_LEN, true),
    IdError::InvalidUserName
);
validated_string!(
    /// The name of one of a user's devices, chosen by the user (e.g. `phone`). The AS never
    /// lets a device name be used twice by the same user, so a `ClientId` names one key forever.
    DeviceName,
    |s| validate_name(s, MAX_DEVICE_NAME_LEN, false),
    IdError::InvalidDeviceName
);

/// `name@domain`.
#[derive(
    Clone, PartialEq, Eq, Hash, PartialOrd, Ord, TlsSize, TlsSerialize, TlsDeserializeBytes,
)]
pub struct UserId {
    /// The local part.
    pub name: UserName,
    /// The user's homeserver.
    pub domain: Domain,
}

impl UserId {
    /// Builds a user id from its parts.
    pub fn new(name: UserName, domain: Domain) -> Self {
        Self { name, domain }
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.domain)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({self})")
    }
}

impl FromStr for UserId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let (name, domain) = s.split_once('@').ok_or(IdError::Malformed("name@domain"))?;
        Ok(Self {
            name: name.parse()?,
            domain: domain.parse()?,
        })
    }
}

/// One device of a user: `name@domain/device`. Its queue is addressed by the same id.
#[derive(
    Clone, PartialEq, Eq, Hash, PartialOrd, Ord, TlsSize, TlsSerialize, TlsDeserializeBytes,
)]
pub struct ClientId {
    /// The user the client belongs to.
    pub user: UserId,
    /// The device name.
    pub device: DeviceName,
}

impl ClientId {
    /// Builds a client id from its parts.
    pub fn new(user: UserId, device: DeviceName) -> Self {
        Self { user, device }
    }

    /// The homeserver that owns this client.
    pub fn domain(&self) -> &Domain {
        &self.user.domain
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user, self.device)
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({self})")
    }
}

impl FromStr for ClientId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let (user, device) = s
            .rsplit_once('/')
            .ok_or(IdError::Malformed("name@domain/device"))?;
        Ok(Self {
            user: user.parse()?,
            device: device.parse()?,
        })
    }
}

/// A group: 16 random bytes plus the domain of the homeserver that hosts it (its hub).
/// The MLS group id of the group is the TLS encoding of this struct.
#[derive(
    Clone, PartialEq, Eq, Hash, PartialOrd, Ord, TlsSize, TlsSerialize, TlsDeserializeBytes,
)]
pub struct GroupId {
    /// 16 bytes, random (UUID v4 layout recommended, not required).
    pub uuid: [u8; 16],
    /// The hub.
    pub domain: Domain,
}

impl GroupId {
    /// Builds a group id from its parts.
    pub fn new(uuid: [u8; 16], domain: Domain) -> Self {
        Self { uuid, domain }
    }

    /// The TLS encoding, used as the MLS group id.
    pub fn to_mls_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.tls_serialized_len());
        // Writing into a Vec cannot fail and the id is valid by construction.
        let _ = self.tls_serialize(&mut out);
        out
    }

    /// Parses an MLS group id produced by [`GroupId::to_mls_bytes`].
    pub fn from_mls_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        match Self::tls_deserialize_bytes(bytes) {
            Ok((id, [])) => Ok(id),
            _ => Err(IdError::InvalidGroupId),
        }
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.uuid.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        write!(f, "@{}", self.domain)
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}

impl FromStr for GroupId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let (uuid, domain) = s.split_once('@').ok_or(IdError::Malformed("uuid@domain"))?;
        let hex: Vec<u8> = uuid.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 || uuid.len() != 36 {
            return Err(IdError::InvalidGroupId);
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16).ok_or(IdError::InvalidGroupId);
            out[i] = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
        }
        let id = Self {
            uuid: out,
            domain: domain.parse()?,
        };
        // Only the canonical lowercase, hyphenated form is accepted.
        if id.to_string() != s {
            return Err(IdError::InvalidGroupId);
        }
        Ok(id)
    }
}

/// Identifies one enqueued message, for idempotent enqueue across federation retries.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, TlsSize, TlsSerialize, TlsDeserializeBytes,
)]
pub struct MessageId(pub [u8; 16]);

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        for ok in ["localhost", "example.org", "a-b.c0", "x"] {
            assert!(ok.parse::<Domain>().is_ok(), "{ok}");
        }
        let long_label = "a".repeat(64);
        let long_domain = ["a".repeat(63).as_str(); 5].join(".");
        for bad in [
            "",
            "Example.org",
            "a..b",
            "-a.b",
            "a-.b",
            "a.b.",
            "a_b",
            &long_label,
            &long_domain,
            "é.org",
        ] {
            assert_eq!(bad.parse::<Domain>(), Err(IdError::InvalidDomain), "{bad}");
        }
    }

    #[test]
    fn user_and_client_ids() {
        let client: ClientId = "alice.b@example.org/phone-2".parse().unwrap();
        assert_eq!(client.user.name.as_str(), "alice.b");
        assert_eq!(client.domain().as_str(), "example.org");
        assert_eq!(client.to_string(), "alice.b@example.org/phone-2");
        assert!("alice@example.org".parse::<ClientId>().is_err());
        assert!("Alice@example.org".parse::<UserId>().is_err());
        assert!(".alice@example.org".parse::<UserId>().is_err());
        assert!("alice@example.org/ph.one".parse::<ClientId>().is_err());
        assert!("alice".parse::<UserId>().is_err());
    }

    #[test]
    fn group_id_text_and_mls_bytes() {
        let text = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org";
        let id: GroupId = text.parse().unwrap();
        assert_eq!(id.to_string(), text);
        assert_eq!(GroupId::from_mls_bytes(&id.to_mls_bytes()).unwrap(), id);
        assert!(
            "2F1C0D3E-8A5B-4C7D-9E0F-112233445566@example.org"
                .parse::<GroupId>()
                .is_err()
        );
        assert!(
            "2f1c0d3e8a5b4c7d9e0f112233445566@example.org"
                .parse::<GroupId>()
                .is_err()
        );
        assert!(GroupId::from_mls_bytes(&[1, 2, 3]).is_err());
    }

    #[test]
    fn decode_rejects_invalid_strings() {
        // opaque<V> "A" as a domain.
        assert!(Domain::tls_deserialize_bytes(&[1, b'A']).is_err());
        // Invalid UTF-8.
        assert!(UserName::tls_deserialize_bytes(&[1, 0xff]).is_err());
    }
}
