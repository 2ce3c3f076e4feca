//! docs/PROTOCOL.md is the normative description of the protocol: every request kind, every
//! error code and every variant of the other message enums must be named in it.

use std::path::PathBuf;

use roost_protocol::error::{ErrorCode, ErrorDetail, WireError};
use roost_protocol::frame::encode_frame;
use roost_protocol::messages::auth::{
    ConnectionAuthTbs, DiscoverUserRequest, LABEL_CONNECTION_AUTH, signing_input,
};
use roost_protocol::messages::queue::QueueAckRequest;
use roost_protocol::messages::{ClientRequest, RequestKind, Response};
use roost_protocol::opaque::Opaque;

/// Variant names of the enums that have no `ALL` list (ListenEvent, ListenControl, FederationRequest,
/// Response's two extra variants, QueuePayload, PushEndpoint, ErrorDetail).
const OTHER_VARIANTS: &[&str] = &[
    // ListenEvent
    "Message",
    "Closed",
    // ListenControl
    "ListenControl",
    "Ack",
    // FederationRequest
    "Forward",
    "Deliver",
    "BlobDownload",
    // Response
    "Error",
    // QueuePayload
    "GroupMessage",
    "Welcome",
    // PushEndpoint
    "WebPush",
    "Apns",
    "Fcm",
    // ErrorDetail
    "StaleEpoch",
    "RateLimited",
    "FrameTooLarge",
    "UnsupportedVersion",
    "SendCounterUsed",
];

fn spec() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether `word` occurs in `text` as a whole identifier (so `Message` inside `SendMessage`
/// does not count).
fn mentions(text: &str, word: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(word).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + word.len()).copied();
        !before.is_some_and(is_ident_byte) && !after.is_some_and(is_ident_byte)
    })
}

#[test]
fn whole_word_matching() {
    assert!(mentions("a `Message` here", "Message"));
    assert!(mentions("ListenEvent::Message", "Message"));
    assert!(mentions("Message", "Message"));
    assert!(!mentions("SendMessage and Messages", "Message"));
    assert!(!mentions("STALE_EPOCH_X", "STALE_EPOCH"));
}

#[test]
fn protocol_md_names_every_request_error_code_and_variant() {
    let spec = spec();
    let mut names: Vec<&str> = RequestKind::ALL.iter().map(|kind| kind.name()).collect();
    for code in ErrorCode::ALL {
        names.push(
            code.name()
                .unwrap_or_else(|| panic!("ErrorCode::ALL holds unnamed {code:?}")),
        );
    }
    names.extend_from_slice(OTHER_VARIANTS);
    let missing: Vec<&str> = names
        .into_iter()
        .filter(|name| !mentions(&spec, name))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/PROTOCOL.md does not mention: {missing:?}"
    );
}

#[test]
fn protocol_md_gives_every_error_code_its_number() {
    // Each code's line in the spec must carry its number, so renumbering shows in review.
    let spec = spec();
    let mut missing = Vec::new();
    for code in ErrorCode::ALL {
        let name = code.name().expect("named");
        let number = code.0.to_string();
        let stated = spec
            .lines()
            .filter(|line| mentions(line, name))
            .any(|line| mentions(line, &number));
        if !stated {
            missing.push(format!("{name} = {number}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/PROTOCOL.md names these codes without their number on the same line: {missing:?}"
    );
}

fn spaced_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn protocol_md_worked_example_frames_are_what_the_code_encodes() {
    let spec = spec();
    let examples = [
        (
            "QueueAck",
            encode_frame(&ClientRequest::QueueAck(QueueAckRequest { up_to_seq: 7 })),
        ),
        (
            "DiscoverUser",
            encode_frame(&ClientRequest::DiscoverUser(DiscoverUserRequest {
                user: "alice@example.org".parse().expect("id"),
            })),
        ),
    ];
    for (what, frame) in examples {
        let frame = spaced_hex(&frame.expect("encode"));
        assert!(
            spec.contains(&format!("Frame: `{frame}`")),
            "docs/PROTOCOL.md §12 should show the {what} frame as `{frame}`"
        );
    }
}

#[test]
fn protocol_md_annotated_examples_match_the_code() {
    // The annotated examples of §12, byte for byte as the document lists them.
    let error = Response::Error(WireError::with_detail(
        ErrorCode::STALE_EPOCH,
        "stale epoch",
        ErrorDetail::StaleEpoch { current_epoch: 5 },
    ));
    assert_eq!(
        spaced_hex(&encode_frame(&error).expect("encode")),
        "00 00 00 1c 00 01 00 00 01 93 0b 73 74 61 6c 65 20 65 70 6f 63 68 \
         00 01 00 00 00 00 00 00 00 05"
    );
    let tbs = ConnectionAuthTbs {
        client: "alice@example.org/phone".parse().expect("id"),
        exporter: Opaque::new(vec![0xaa; 32]),
    };
    let mut expected = String::from(
        "17 72 6f 6f 73 74 2f 31 20 63 6f 6e 6e 65 63 74 69 6f 6e 20 61 75 74 68 39 \
         05 61 6c 69 63 65 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 05 70 68 6f 6e 65 20",
    );
    expected.push_str(&" aa".repeat(32));
    assert_eq!(
        spaced_hex(&signing_input(LABEL_CONNECTION_AUTH, &tbs)),
        expected
    );
}
