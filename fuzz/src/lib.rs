//! The check every fuzz target applies to what it manages to decode.
#![forbid(unsafe_code)]

use std::fmt::Debug;

use roost_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame};
use tls_codec::{DeserializeBytes, Serialize, Size};

/// Decodes a frame body as `T`. When that succeeds, the value must encode again, the encoding
/// must be exactly `body` (the format is canonical: minimal varints, 0/1 option flags, no
/// slack), and it must decode to the same value. Panics (a finding) otherwise.
pub fn decode_and_check<T>(body: &[u8]) -> Option<T>
where
    T: DeserializeBytes + Serialize + Size + PartialEq + Debug,
{
    let value = decode_body::<T>(body).ok()?;
    let frame = match encode_frame(&value) {
        Ok(frame) => frame,
        Err(e) => panic!("decoded value does not re-encode: {e}: {value:?}"),
    };
    let again = &frame[FRAME_HEADER_LEN..];
    assert_eq!(again, body, "re-encoding differs from the input: {value:?}");
    match decode_body::<T>(again) {
        Ok(decoded) => assert_eq!(decoded, value, "re-encoding decodes to another value"),
        Err(e) => panic!("re-encoding does not decode: {e}: {value:?}"),
    }
    Some(value)
}
