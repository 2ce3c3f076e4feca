//! Variable-length byte strings (`opaque data<V>` in RFC 9420 §2.1.2 notation).
//!
//! The length prefix is the MLS variable-length integer: the two top bits of the first byte
//! give the size of the prefix (1, 2 or 4 bytes), values must use the shortest encoding and
//! are limited to 30 bits. We decode it ourselves rather than through `tls_codec::VLBytes`,
//! whose decoder asserts in debug builds on truncated input: the bytes here come from peers.
//!
//! [`Opaque`] holds its bytes in a reference-counted [`Bytes`], so cloning one (a commit or
//! Welcome of hundreds of kilobytes handed to a store, a fan-out and a federation outbox) does
//! not copy them.

use bytes::Bytes;
use tls_codec::{DeserializeBytes, Error, Serialize, Size};

/// Largest length an MLS variable-length integer can express (2^30 - 1).
pub const MAX_VARINT: u32 = (1 << 30) - 1;

/// Number of bytes the variable-length encoding of `value` takes.
pub fn varint_len(value: u32) -> usize {
    match value {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        _ => 4,
    }
}

/// Appends the variable-length encoding of `value` to `out`.
pub fn write_varint(value: u32, out: &mut Vec<u8>) -> Result<(), Error> {
    match value {
        0..=0x3f => out.push(value as u8),
        0x40..=0x3fff => out.extend_from_slice(&(0x4000 | value as u16).to_be_bytes()),
        0x4000..=MAX_VARINT => out.extend_from_slice(&(0x8000_0000 | value).to_be_bytes()),
        _ => return Err(Error::InvalidVectorLength),
    }
    Ok(())
}

/// Reads a variable-length integer from the front of `bytes`.
pub fn read_varint(bytes: &[u8]) -> Result<(u32, &[u8]), Error> {
    let first = *bytes.first().ok_or(Error::EndOfStream)?;
    let len = 1usize << (first >> 6);
    if len == 8 {
        // The 0b11 prefix would be a 62-bit length, which MLS forbids.
        return Err(Error::InvalidVectorLength);
    }
    let head = bytes.get(..len).ok_or(Error::EndOfStream)?;
    let mut value = u32::from(first & 0x3f);
    for byte in &head[1..] {
        value = (value << 8) | u32::from(*byte);
    }
    if varint_len(value) != len {
        return Err(Error::DecodingError(
            "non-minimal variable-length integer".into(),
        ));
    }
    Ok((value, &bytes[len..]))
}

/// An `opaque data<V>` byte string. Decoding checks the claimed length against the bytes
/// actually present before allocating. Clones share the bytes.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Opaque(Bytes);

impl Opaque {
    /// Wraps bytes (no copy).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Bytes::from(bytes))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// The shared bytes, e.g. to hand to a writer that takes `Bytes` without copying.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Takes the shared bytes out (no copy).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Takes the bytes out; copies them only if a clone still shares them.
    pub fn into_vec(self) -> Vec<u8> {
        Vec::from(self.0)
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print contents: they may be key material or message bodies.
        write!(f, "Opaque({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Opaque {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl From<Bytes> for Opaque {
    fn from(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl From<&[u8]> for Opaque {
    fn from(bytes: &[u8]) -> Self {
        Self(Bytes::copy_from_slice(bytes))
    }
}

impl AsRef<[u8]> for Opaque {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Size for Opaque {
    fn tls_serialized_len(&self) -> usize {
        // A length beyond MAX_VARINT fails in `tls_serialize`.
        varint_len(self.0.len().min(MAX_VARINT as usize) as u32) + self.0.len()
    }
}

impl Serialize for Opaque {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, Error> {
        let len = u32::try_from(self.0.len()).map_err(|_| Error::InvalidVectorLength)?;
        let mut prefix = Vec::with_capacity(4);
        write_varint(len, &mut prefix)?;
        writer.write_all(&prefix)?;
        writer.write_all(&self.0)?;
        Ok(prefix.len() + self.0.len())
    }
}

impl DeserializeBytes for Opaque {
    fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(Self, &[u8]), Error> {
        let (len, rest) = read_varint(bytes)?;
        let len = len as usize;
        if rest.len() < len {
            return Err(Error::EndOfStream);
        }
        let (body, rest) = rest.split_at(len);
        Ok((Self(Bytes::copy_from_slice(body)), rest))
    }
}

/// Decodes an `opaque<V>` and returns the borrowed bytes (no copy). Used by the id decoders.
pub(crate) fn read_opaque(bytes: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let (len, rest) = read_varint(bytes)?;
    let len = len as usize;
    if rest.len() < len {
        return Err(Error::EndOfStream);
    }
    Ok(rest.split_at(len))
}

/// Encodes `bytes` as an `opaque<V>` into `writer`.
pub(crate) fn write_opaque<W: std::io::Write>(
    bytes: &[u8],
    writer: &mut W,
) -> Result<usize, Error> {
    let len = u32::try_from(bytes.len()).map_err(|_| Error::InvalidVectorLength)?;
    let mut prefix = Vec::with_capacity(4);
    write_varint(len, &mut prefix)?;
    writer.write_all(&prefix)?;
    writer.write_all(bytes)?;
    Ok(prefix.len() + bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tls_codec::DeserializeBytes;

    #[test]
    fn varint_boundaries() {
        for (value, encoded) in [
            (0u32, &[0x00][..]),
            (63, &[0x3f]),
            (64, &[0x40, 0x40]),
            (16383, &[0x7f, 0xff]),
            (16384, &[0x80, 0x00, 0x40, 0x00]),
            (MAX_VARINT, &[0xbf, 0xff, 0xff, 0xff]),
        ] {
            let mut out = Vec::new();
            write_varint(value, &mut out).unwrap();
            assert_eq!(out, encoded, "encoding {value}");
            assert_eq!(read_varint(encoded).unwrap(), (value, &[][..]));
        }
        assert!(write_varint(MAX_VARINT + 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn varint_rejects_bad_prefixes() {
        assert_eq!(read_varint(&[]), Err(Error::EndOfStream));
        assert_eq!(
            read_varint(&[0xc0, 0, 0, 0, 0, 0, 0, 1]),
            Err(Error::InvalidVectorLength)
        );
        assert_eq!(read_varint(&[0x40]), Err(Error::EndOfStream));
        // 5 encoded in two bytes is not minimal.
        assert!(matches!(
            read_varint(&[0x40, 0x05]),
            Err(Error::DecodingError(_))
        ));
    }

    #[test]
    fn opaque_checks_length_before_copying() {
        // Claims 2^30 - 1 bytes, carries 3.
        let input = [0xbf, 0xff, 0xff, 0xff, 1, 2, 3];
        assert_eq!(
            Opaque::tls_deserialize_bytes(&input),
            Err(Error::EndOfStream)
        );
        let (value, rest) = Opaque::tls_deserialize_bytes(&[0x02, 7, 8, 9]).unwrap();
        assert_eq!(value.as_slice(), &[7, 8]);
        assert_eq!(rest, &[9]);
    }

    #[test]
    fn clones_share_and_vec_round_trips() {
        let original = Opaque::new(vec![1, 2, 3]);
        let copy = original.clone();
        assert_eq!(copy.as_slice().as_ptr(), original.as_slice().as_ptr());
        assert_eq!(copy, original);
        drop(original);
        assert_eq!(copy.into_vec(), vec![1, 2, 3]);
        assert_eq!(
            Opaque::from(&[4u8, 5][..]).into_bytes(),
            Bytes::from_static(&[4, 5])
        );
        // Ordering is that of the byte strings, as with Vec<u8>.
        assert!(Opaque::from(vec![1, 2]) < Opaque::from(vec![1, 2, 0]));
        assert!(Opaque::from(vec![1, 3]) > Opaque::from(vec![1, 2, 0]));
    }
}
