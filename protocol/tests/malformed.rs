//! Negative tests: what a peer can send that must be refused, and how. Every case must give
//! an error value (never a panic, never a huge allocation), and the error must be the one a
//! receiver maps to the right wire code.

mod common;

use std::sync::OnceLock;

use proptest::collection::vec;
use proptest::prelude::*;
use roost_protocol::error::{ErrorCode, ErrorDetail};
use roost_protocol::frame::{
    DEFAULT_MAX_FRAME_LEN, DecodeError, FRAME_HEADER_LEN, FrameDecoder, FrameError,
    PROTOCOL_VERSION, decode_body, encode_frame, frame_len,
};
use roost_protocol::ids::{ClientId, GroupId, UserId};
use roost_protocol::messages::auth::{DiscoverUserRequest, RegisterUserRequest};
use roost_protocol::messages::delivery::{CommitRequest, SendMessageRequest};
use roost_protocol::messages::federation::FederationRequest;
use roost_protocol::messages::keypackage::ClaimClientKeyPackageRequest;
use roost_protocol::messages::queue::{ListenControl, ListenEvent};
use roost_protocol::messages::{ClientRequest, RequestKind, Response};
use roost_protocol::opaque::Opaque;
use tls_codec::{DeserializeBytes, Serialize, Size};

/// The five top-level message types a peer can send, by vector file.
const FRAME_FILES: [&str; 5] = [
    "client_request.txt",
    "response.txt",
    "listen_event.txt",
    "listen_control.txt",
    "federation_request.txt",
];

/// Decodes `body` as the top-level type stored in `file`; the value is dropped, only the
/// outcome matters here.
fn decode_as(file: &str, body: &[u8]) -> Result<(), DecodeError> {
    match file {
        "client_request.txt" => decode_body::<ClientRequest>(body).map(drop),
        "response.txt" => decode_body::<Response>(body).map(drop),
        "listen_event.txt" => decode_body::<ListenEvent>(body).map(drop),
        "listen_control.txt" => decode_body::<ListenControl>(body).map(drop),
        "federation_request.txt" => decode_body::<FederationRequest>(body).map(drop),
        other => panic!("unknown vector file {other}"),
    }
}

/// Every stored frame body: (file, name, body).
fn stored_bodies() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for file in FRAME_FILES {
        for (name, frame) in common::load_vectors(file) {
            out.push((file, name, frame[FRAME_HEADER_LEN..].to_vec()));
        }
    }
    assert!(out.len() > 40, "vector files look empty");
    out
}

fn body_of<T: Serialize + Size>(message: &T) -> Vec<u8> {
    encode_frame(message).expect("encode")[FRAME_HEADER_LEN..].to_vec()
}

fn encoded<T: Serialize + Size>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    value.tls_serialize(&mut out).expect("encode");
    out
}

/// `bytes` as an `opaque<V>`.
fn opaque_of(bytes: &[u8]) -> Vec<u8> {
    encoded(&Opaque::from(bytes))
}

/// A body: version, discriminant, then `parts`.
fn body(discriminant: u16, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = PROTOCOL_VERSION.to_be_bytes().to_vec();
    out.extend_from_slice(&discriminant.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, DecodeError>, what: &str) {
    match result {
        Err(err @ DecodeError::Invalid(_)) => {
            assert_eq!(err.to_wire().code, ErrorCode::MALFORMED, "{what}");
        }
        other => panic!("{what}: expected DecodeError::Invalid, got {other:?}"),
    }
}

// ---- framing ------------------------------------------------------------------------------

#[test]
fn oversized_length_prefix_is_refused_without_buffering_a_body() {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    decoder.push(&u32::MAX.to_be_bytes());
    let err = decoder.next_frame().expect_err("u32::MAX header accepted");
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: u32::MAX,
            max: DEFAULT_MAX_FRAME_LEN
        }
    );
    // Nothing beyond the four header bytes was reserved or kept.
    assert_eq!(decoder.buffered(), FRAME_HEADER_LEN);
    let wire = err.to_wire();
    assert_eq!(wire.code, ErrorCode::FRAME_TOO_LARGE);
    assert_eq!(
        wire.detail,
        ErrorDetail::FrameTooLarge {
            max_frame_len: DEFAULT_MAX_FRAME_LEN
        }
    );

    // The limit itself is accepted (the decoder waits for the body), one more is not.
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    decoder.push(&DEFAULT_MAX_FRAME_LEN.to_be_bytes());
    assert_eq!(decoder.next_frame(), Ok(None));
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    decoder.push(&(DEFAULT_MAX_FRAME_LEN + 1).to_be_bytes());
    assert!(matches!(
        decoder.next_frame(),
        Err(FrameError::TooLarge { .. })
    ));
    assert_eq!(
        frame_len(u32::MAX.to_be_bytes(), DEFAULT_MAX_FRAME_LEN),
        Err(FrameError::TooLarge {
            len: u32::MAX,
            max: DEFAULT_MAX_FRAME_LEN
        })
    );

    // The header is checked as soon as it is complete, even if it arrives byte by byte.
    let mut decoder = FrameDecoder::new(1024);
    for byte in 1025u32.to_be_bytes() {
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.push(&[byte]);
    }
    assert!(matches!(
        decoder.next_frame(),
        Err(FrameError::TooLarge {
            len: 1025,
            max: 1024
        })
    ));
}

#[test]
fn every_truncation_of_real_frames_is_an_error() {
    for (file, name, body) in stored_bodies() {
        for cut in 0..body.len() {
            assert_eq!(
                decode_as(file, &body[..cut]),
                Err(DecodeError::Truncated),
                "{file} {name} cut at {cut} of {}",
                body.len()
            );
        }
        assert_eq!(decode_as(file, &body), Ok(()), "{file} {name} whole");
    }
}

#[test]
fn frame_stream_ending_inside_a_frame_is_truncated() {
    for (file, name, body) in stored_bodies() {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        for cut in 1..frame.len() {
            let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
            decoder.push(&frame[..cut]);
            assert_eq!(decoder.next_frame(), Ok(None), "{file} {name} cut {cut}");
            assert_eq!(
                decoder.finish(),
                Err(FrameError::Truncated),
                "{file} {name} cut {cut}"
            );
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for (file, name, body) in stored_bodies() {
        for extra in [&[0u8][..], &[0, 1, 2], &body[..]] {
            let mut long = body.clone();
            long.extend_from_slice(extra);
            assert_eq!(
                decode_as(file, &long),
                Err(DecodeError::TrailingBytes(extra.len())),
                "{file} {name} + {} bytes",
                extra.len()
            );
        }
    }
}

#[test]
fn bad_protocol_version_is_refused_before_the_message() {
    for (file, name, body) in stored_bodies() {
        for version in [0u16, 2, 0x0100, u16::MAX] {
            let mut other = body.clone();
            other[..2].copy_from_slice(&version.to_be_bytes());
            let result = decode_as(file, &other);
            assert_eq!(
                result,
                Err(DecodeError::UnsupportedVersion(version)),
                "{file} {name}"
            );
            let wire = result.expect_err("checked above").to_wire();
            assert_eq!(wire.code, ErrorCode::UNSUPPORTED_VERSION);
            assert_eq!(
                wire.detail,
                ErrorDetail::UnsupportedVersion {
                    min: PROTOCOL_VERSION,
                    max: PROTOCOL_VERSION
                }
            );
        }
    }
    // A version that is itself cut short is a truncation.
    assert_eq!(decode_as("response.txt", &[0]), Err(DecodeError::Truncated));
}

// ---- unknown discriminants ----------------------------------------------------------------

/// Tries every `u16` as the top-level discriminant: the known ones must not be reported as
/// unknown, every other one must be, with its value.
fn check_all_discriminants(file: &str, known: &[u16]) {
    for discriminant in 0..=u16::MAX {
        let result = decode_as(file, &body(discriminant, &[]));
        if known.contains(&discriminant) {
            assert!(
                !matches!(result, Err(DecodeError::UnknownDiscriminant(_))),
                "{file}: known discriminant {discriminant} reported unknown"
            );
        } else {
            assert_eq!(
                result,
                Err(DecodeError::UnknownDiscriminant(u64::from(discriminant))),
                "{file}: discriminant {discriminant}"
            );
            assert_eq!(
                result.expect_err("checked above").to_wire().code,
                ErrorCode::MALFORMED
            );
        }
    }
}

#[test]
fn unknown_top_level_discriminants() {
    let requests: Vec<u16> = RequestKind::ALL.iter().map(|kind| *kind as u16).collect();
    check_all_discriminants("client_request.txt", &requests);
    let mut responses = requests.clone();
    responses.extend([0, 1000]);
    check_all_discriminants("response.txt", &responses);
    check_all_discriminants("listen_event.txt", &[1, 2]);
    check_all_discriminants("listen_control.txt", &[1]);
    check_all_discriminants("federation_request.txt", &[1, 2, 1010]);
}

/// Replaces the `u16` at `offset` of `body` (checking it held `expected`) and decodes.
fn with_discriminant(
    file: &str,
    body: &[u8],
    offset: usize,
    expected: u16,
    discriminant: u16,
) -> Result<(), DecodeError> {
    assert_eq!(
        body[offset..offset + 2],
        expected.to_be_bytes(),
        "{file}: wrong offset {offset}"
    );
    let mut other = body.to_vec();
    other[offset..offset + 2].copy_from_slice(&discriminant.to_be_bytes());
    decode_as(file, &other)
}

#[test]
fn unknown_nested_discriminants() {
    let vectors = |file: &str, name: &str| -> Vec<u8> {
        common::load_vectors(file)[name][FRAME_HEADER_LEN..].to_vec()
    };
    let unknown = |d: u16| Err(DecodeError::UnknownDiscriminant(u64::from(d)));

    // QueuePayload in ListenEvent::Message: version, event, seq, id, timestamp.
    let message = vectors("listen_event.txt", "Message");
    let payload_at = 2 + 2 + 8 + 16 + 8;
    for d in [1u16, 2] {
        assert_eq!(
            with_discriminant("listen_event.txt", &message, payload_at, 1, d),
            Ok(())
        );
    }
    for d in [0u16, 3, u16::MAX] {
        assert_eq!(
            with_discriminant("listen_event.txt", &message, payload_at, 1, d),
            unknown(d)
        );
    }

    // ErrorDetail in Response::Error: version, variant, code, empty reason.
    let error = body(0, &[&ErrorCode::INTERNAL.0.to_be_bytes(), &[0], &[0, 0]]);
    assert!(decode_as("response.txt", &error).is_ok());
    for d in [6u16, 0x100, u16::MAX] {
        assert_eq!(
            with_discriminant("response.txt", &error, 7, 0, d),
            unknown(d)
        );
    }

    // KeyPackageKind: the last field of ClaimClientKeyPackage's response.
    let claimed = vectors("response.txt", "ClaimClientKeyPackage");
    let kind_at = claimed.len() - 2;
    assert_eq!(
        with_discriminant("response.txt", &claimed, kind_at, 1, 0),
        Ok(())
    );
    for d in [2u16, u16::MAX] {
        assert_eq!(
            with_discriminant("response.txt", &claimed, kind_at, 1, d),
            unknown(d)
        );
    }

    // The ClientRequest inside a forwarded request (sender absent: one flag byte).
    let forward = vectors("federation_request.txt", "Forward/no_sender");
    for d in [0u16, 7, 1000, u16::MAX] {
        assert_eq!(
            with_discriminant("federation_request.txt", &forward, 5, 4, d),
            unknown(d)
        );
    }

    // QueuePayload in a federation delivery: after the Vec length, the recipients (one), id,
    // timestamp.
    let deliver = vectors("federation_request.txt", "Deliver");
    let recipient: ClientId = "carol@chat.remote.example/desktop".parse().expect("id");
    let vec_len_len = 2; // two deliveries of > 63 bytes
    let recipients_len = 1 + recipient.tls_serialized_len(); // one recipient, < 64 bytes
    let payload_at = 4 + vec_len_len + recipients_len + 16 + 8;
    for d in [0u16, 3] {
        assert_eq!(
            with_discriminant("federation_request.txt", &deliver, payload_at, 1, d),
            unknown(d)
        );
    }
}

// ---- invalid ids --------------------------------------------------------------------------

#[test]
fn invalid_ids_inside_valid_messages() {
    let discover = RequestKind::DiscoverUser as u16;
    let user = |name: &[u8], domain: &[u8]| body(discover, &[&opaque_of(name), &opaque_of(domain)]);
    // The control: well-formed ids decode.
    assert_eq!(
        decode_body::<ClientRequest>(&user(b"alice", b"example.org")),
        Ok(ClientRequest::DiscoverUser(DiscoverUserRequest {
            user: "alice@example.org".parse().expect("id"),
        }))
    );
    let long_name = [b'a'; 65];
    for (name, domain, what) in [
        (&b"alice"[..], &b"Example.org"[..], "uppercase domain"),
        (b"alice", b"example.org.", "trailing dot"),
        (b"alice", b"exa mple.org", "space in domain"),
        (b"alice", b"-example.org", "label starting with -"),
        (b"alice", b"", "empty domain"),
        (b"alice", b"ex\xffample.org", "bad UTF-8 domain"),
        (b"", b"example.org", "empty user name"),
        (b"Alice", b"example.org", "uppercase user name"),
        (b".alice", b"example.org", "user name starting with ."),
        (b"al@ice", b"example.org", "@ in user name"),
        (b"al\xc3ice", b"example.org", "bad UTF-8 user name"),
        (b"\xc3\xa9", b"example.org", "non-ASCII user name"),
        (&long_name[..], b"example.org", "65-byte user name"),
    ] {
        assert_invalid(decode_body::<ClientRequest>(&user(name, domain)), what);
    }

    let claim = RequestKind::ClaimClientKeyPackage as u16;
    let client = |device: &[u8]| {
        body(
            claim,
            &[
                &opaque_of(b"alice"),
                &opaque_of(b"example.org"),
                &opaque_of(device),
            ],
        )
    };
    assert_eq!(
        decode_body::<ClientRequest>(&client(b"phone-2")),
        Ok(ClientRequest::ClaimClientKeyPackage(
            ClaimClientKeyPackageRequest {
                client: "alice@example.org/phone-2".parse().expect("id"),
            }
        ))
    );
    for (device, what) in [
        (&b"ph.one"[..], "dot in device name"),
        (b"", "empty device name"),
        (b"Phone", "uppercase device name"),
        (b"_phone", "device name starting with _"),
        (&[b'd'; 33][..], "33-byte device name"),
        (b"\xff", "bad UTF-8 device name"),
    ] {
        assert_invalid(decode_body::<ClientRequest>(&client(device)), what);
    }

    // A group id with an invalid hub domain, inside SendMessage.
    let send = RequestKind::SendMessage as u16;
    let uuid = [7u8; 16];
    let good = body(
        send,
        &[&uuid, &opaque_of(b"example.org"), &opaque_of(b"hi")],
    );
    assert_eq!(
        decode_body::<ClientRequest>(&good),
        Ok(ClientRequest::SendMessage(SendMessageRequest {
            group: GroupId::new(uuid, "example.org".parse().expect("domain")),
            message: Opaque::from(&b"hi"[..]),
        }))
    );
    let bad = body(
        send,
        &[&uuid, &opaque_of(b"EXAMPLE.ORG"), &opaque_of(b"hi")],
    );
    assert_invalid(decode_body::<ClientRequest>(&bad), "uppercase group domain");

    // An invalid recipient deep inside a federation delivery.
    let deliver = common::load_vectors("federation_request.txt")["Deliver"].clone();
    let needle = b"carol";
    let at = deliver
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("recipient in vector");
    let mut bad = deliver[FRAME_HEADER_LEN..].to_vec();
    bad[at - FRAME_HEADER_LEN] = b'C';
    assert_invalid(
        decode_body::<FederationRequest>(&bad),
        "uppercase recipient",
    );
}

// ---- lengths and flags --------------------------------------------------------------------

#[test]
fn huge_claimed_lengths_with_short_bodies_are_truncated() {
    let group = GroupId::new([1; 16], "example.org".parse().expect("domain"));
    let send = RequestKind::SendMessage as u16;
    // message: opaque claiming 2^30 - 1 bytes, three present.
    let claim_max = body(
        send,
        &[&encoded(&group), &[0xbf, 0xff, 0xff, 0xff], &[1, 2, 3]],
    );
    assert_eq!(
        decode_body::<ClientRequest>(&claim_max),
        Err(DecodeError::Truncated)
    );
    // A domain claiming 2^30 - 1 bytes.
    let discover = RequestKind::DiscoverUser as u16;
    let long_domain = body(discover, &[&opaque_of(b"alice"), &[0xbf, 0xff, 0xff, 0xff]]);
    assert_eq!(
        decode_body::<ClientRequest>(&long_domain),
        Err(DecodeError::Truncated)
    );
    // A vector of KeyPackages claiming 2^30 - 1 bytes, holding one short element.
    let upload = RequestKind::UploadKeyPackages as u16;
    let long_vec = body(upload, &[&[0xbf, 0xff, 0xff, 0xff], &opaque_of(b"kp")]);
    assert_eq!(
        decode_body::<ClientRequest>(&long_vec),
        Err(DecodeError::Truncated)
    );
    // Over 30 bits (the 8-byte varint form) is never a valid opaque length.
    let over = body(
        send,
        &[
            &encoded(&group),
            &[0xc0, 0, 0, 0, 0x40, 0, 0, 0],
            &[1, 2, 3],
        ],
    );
    assert_invalid(decode_body::<ClientRequest>(&over), "62-bit opaque length");
    // ...nor a vector length: whatever the error, it is one.
    let over_vec = body(
        upload,
        &[&[0xc0, 0, 0, 0, 0x40, 0, 0, 0], &opaque_of(b"kp")],
    );
    assert!(decode_body::<ClientRequest>(&over_vec).is_err());
}

#[test]
fn non_minimal_varints_are_refused() {
    let discover = RequestKind::DiscoverUser as u16;
    let domain = opaque_of(b"example.org");
    // "alice" with its length 5 written in two and in four bytes.
    for prefix in [&[0x40u8, 0x05][..], &[0x80, 0, 0, 0x05]] {
        let mut name = prefix.to_vec();
        name.extend_from_slice(b"alice");
        assert_invalid(
            decode_body::<ClientRequest>(&body(discover, &[&name, &domain])),
            "non-minimal opaque length",
        );
    }
    // 64 (needs two bytes) written in four.
    let send = RequestKind::SendMessage as u16;
    let group = GroupId::new([1; 16], "example.org".parse().expect("domain"));
    let mut message = vec![0x80, 0, 0, 0x40];
    message.extend_from_slice(&[9; 64]);
    assert_invalid(
        decode_body::<ClientRequest>(&body(send, &[&encoded(&group), &message])),
        "64 in four bytes",
    );
    // Vector lengths: an empty list of KeyPackages with its length 0 in two bytes.
    let upload = RequestKind::UploadKeyPackages as u16;
    assert!(decode_body::<ClientRequest>(&body(upload, &[&[0], &[0]])).is_ok());
    assert_invalid(
        decode_body::<ClientRequest>(&body(upload, &[&[0x40, 0], &[0]])),
        "non-minimal vector length",
    );
    let list = [opaque_of(b"kp1"), opaque_of(b"kp2")].concat();
    let mut long_prefix = vec![0x80, 0, 0, list.len() as u8];
    long_prefix.extend_from_slice(&list);
    assert_invalid(
        decode_body::<ClientRequest>(&body(upload, &[&long_prefix, &[0]])),
        "vector length in four bytes",
    );
}

#[test]
fn option_flags_other_than_0_and_1_are_refused() {
    // RegisterUser: the registration_token flag follows the user id and the key.
    let register = RegisterUserRequest {
        user: "alice@example.org".parse().expect("id"),
        user_key: Opaque::from(&[1u8; 32][..]),
        registration_token: None,
        signature: Opaque::from(&[2u8; 64][..]),
    };
    let flag_at = 4 + register.user.tls_serialized_len() + register.user_key.tls_serialized_len();
    let good = body_of(&ClientRequest::RegisterUser(register));
    assert_eq!(good[flag_at], 0);
    // Commit: the welcome flag follows the group id and the commit.
    let commit = CommitRequest {
        group: GroupId::new([3; 16], "example.org".parse().expect("domain")),
        commit: Opaque::from(&b"commit"[..]),
        welcome: None,
        group_info: Opaque::from(&b"info"[..]),
    };
    let commit_flag_at = 4 + commit.group.tls_serialized_len() + commit.commit.tls_serialized_len();
    let commit_body = body_of(&ClientRequest::Commit(commit));
    assert_eq!(commit_body[commit_flag_at], 0);
    // UploadKeyPackages: the last_resort flag follows an empty list.
    let upload = body(RequestKind::UploadKeyPackages as u16, &[&[0], &[0]]);

    for flag in [2u8, 3, 0x80, 0xff] {
        for (message, at, what) in [
            (&good, flag_at, "registration_token"),
            (&commit_body, commit_flag_at, "welcome"),
            (&upload, upload.len() - 1, "last_resort"),
        ] {
            let mut bad = message.clone();
            bad[at] = flag;
            assert_invalid(
                decode_body::<ClientRequest>(&bad),
                &format!("{what} flag {flag}"),
            );
        }
        // ForwardRequest::sender, right after the FederationRequest discriminant.
        let mut forward =
            common::load_vectors("federation_request.txt")["Forward/no_sender"].clone();
        assert_eq!(forward[FRAME_HEADER_LEN + 4], 0);
        forward[FRAME_HEADER_LEN + 4] = flag;
        assert_invalid(
            decode_body::<FederationRequest>(&forward[FRAME_HEADER_LEN..]),
            &format!("sender flag {flag}"),
        );
    }
}

#[test]
fn ids_from_their_own_decoders_reject_leftovers() {
    // GroupId::from_mls_bytes is an exact decode: a valid id plus one byte is not a group id.
    let group = GroupId::new([5; 16], "example.org".parse().expect("domain"));
    let mut bytes = group.to_mls_bytes();
    assert_eq!(GroupId::from_mls_bytes(&bytes), Ok(group));
    bytes.push(0);
    assert!(GroupId::from_mls_bytes(&bytes).is_err());
    assert!(UserId::tls_deserialize_exact_bytes(&[5, b'a', b'l', b'i', b'c', b'e']).is_err());
}

// ---- random input -------------------------------------------------------------------------

/// Decoding `body` as `T` must not panic; if it succeeds, the encoding is canonical: encoding
/// the value again gives exactly `body`, which decodes to the same value.
fn decode_is_total_and_canonical<T>(body: &[u8]) -> Result<(), TestCaseError>
where
    T: DeserializeBytes + Serialize + Size + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = decode_body::<T>(body) {
        let frame = encode_frame(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&frame[FRAME_HEADER_LEN..], body);
        prop_assert_eq!(decode_body::<T>(&frame[FRAME_HEADER_LEN..]), Ok(value));
    }
    Ok(())
}

fn decode_all_types(body: &[u8]) -> Result<(), TestCaseError> {
    decode_is_total_and_canonical::<ClientRequest>(body)?;
    decode_is_total_and_canonical::<Response>(body)?;
    decode_is_total_and_canonical::<ListenEvent>(body)?;
    decode_is_total_and_canonical::<ListenControl>(body)?;
    decode_is_total_and_canonical::<FederationRequest>(body)?;
    Ok(())
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Insert(at, b)),
        1 => any::<usize>().prop_map(Edit::Remove),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    let len = bytes.len();
    match *edit {
        Edit::Set(at, b) if len > 0 => bytes[at % len] = b,
        Edit::Insert(at, b) => bytes.insert(at % (len + 1), b),
        Edit::Remove(at) if len > 0 => {
            bytes.remove(at % len);
        }
        Edit::Truncate(at) => bytes.truncate(at % (len + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096)) {
        decode_all_types(&bytes)?;
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(
        discriminant in prop_oneof![0u16..70, Just(1000u16), any::<u16>()],
        rest in vec(any::<u8>(), 0..4096),
    ) {
        decode_all_types(&body(discriminant, &[&rest]))?;
    }

    #[test]
    fn edited_vectors_never_panic(
        pick in any::<prop::sample::Index>(),
        edits in vec(edit(), 1..6),
    ) {
        static BODIES: OnceLock<Vec<(&'static str, String, Vec<u8>)>> = OnceLock::new();
        let bodies = BODIES.get_or_init(stored_bodies);
        let (_, _, original) = pick.get(bodies);
        let mut bytes = original.clone();
        for e in &edits {
            apply(&mut bytes, e);
        }
        decode_all_types(&bytes)?;
    }

    #[test]
    fn frame_decoder_survives_any_stream_and_chunking(
        stream in vec(any::<u8>(), 0..4096),
        chunk in 1usize..300,
        max in 0u32..2048,
    ) {
        let mut decoder = FrameDecoder::new(max);
        let mut consumed = 0usize;
        'outer: for piece in stream.chunks(chunk) {
            decoder.push(piece);
            loop {
                match decoder.next_frame() {
                    Ok(Some(body)) => {
                        prop_assert!(body.len() <= max as usize);
                        // The body is exactly the bytes after the header.
                        let start = consumed + FRAME_HEADER_LEN;
                        prop_assert_eq!(&stream[start..start + body.len()], &body[..]);
                        consumed = start + body.len();
                        let _ = decode_body::<ListenEvent>(&body);
                    }
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max: limit }) => {
                        prop_assert!(len > limit);
                        break 'outer;
                    }
                    Err(other) => return Err(TestCaseError::fail(other.to_string())),
                }
            }
            // At most one partial frame plus the last chunk stays buffered.
            prop_assert!(decoder.buffered() <= FRAME_HEADER_LEN + max as usize + chunk);
        }
    }
}
