//! Golden byte vectors: the exact encoding of every message, stored as hex in
//! `tests/vectors/*.txt` (`name hex` per line). Each test builds the values in code, checks that
//! their encoding equals the stored bytes and that the stored bytes decode back to them, so any
//! change of the wire format fails here.
//!
//! After an intended, reviewed change of the format, rewrite the files with
//! `ROOST_REGEN_VECTORS=1 cargo test -p roost-protocol --test vectors` and commit the diff.
//! `ROOST_SEED_FUZZ_CORPUS=1` additionally writes the fuzz seeds (see fuzz/README.md).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::PathBuf;

use roost_protocol::frame::{
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, FrameDecoder, decode_body, encode_frame, frame_len,
};
use roost_protocol::messages::auth::*;
use roost_protocol::messages::federation::FederationRequest;
use roost_protocol::messages::queue::{
    ListenControl, ListenEvent, QueuePayload, listen_message_head,
};
use roost_protocol::messages::{ClientRequest, RequestKind, Response};
use tls_codec::{DeserializeBytes, Serialize, Size};

const REGEN_VAR: &str = "ROOST_REGEN_VECTORS";
const SEED_VAR: &str = "ROOST_SEED_FUZZ_CORPUS";

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

type DecodeCheck = Box<dyn Fn(&[u8]) -> Result<(), String>>;

/// One named vector: the bytes the code produces now, and how to check stored bytes decode
/// back to the same value.
struct Case {
    name: String,
    encoded: Vec<u8>,
    decodes_back: DecodeCheck,
}

/// A complete frame (`u32` length, version, message).
fn frame_case<T>(name: &str, value: T) -> Case
where
    T: Serialize + Size + DeserializeBytes + PartialEq + Debug + 'static,
{
    let encoded = encode_frame(&value).unwrap_or_else(|e| panic!("{name}: {e}"));
    Case {
        name: name.to_string(),
        encoded,
        decodes_back: Box::new(move |stored| {
            let header: [u8; FRAME_HEADER_LEN] = stored
                .get(..FRAME_HEADER_LEN)
                .and_then(|h| h.try_into().ok())
                .ok_or("shorter than a frame header")?;
            let len = frame_len(header, DEFAULT_MAX_FRAME_LEN).map_err(|e| e.to_string())?;
            if len != stored.len() - FRAME_HEADER_LEN {
                return Err(format!(
                    "header says {len} bytes, body has {}",
                    stored.len() - FRAME_HEADER_LEN
                ));
            }
            let decoded = decode_body::<T>(&stored[FRAME_HEADER_LEN..])
                .map_err(|e| format!("does not decode: {e}"))?;
            if decoded != value {
                return Err(format!("decodes to {decoded:?}, expected {value:?}"));
            }
            Ok(())
        }),
    }
}

/// A bare TLS encoding (structs that are not sent as frames on their own).
fn plain_case<T>(name: &str, value: T) -> Case
where
    T: Serialize + Size + DeserializeBytes + PartialEq + Debug + 'static,
{
    let mut encoded = Vec::new();
    value
        .tls_serialize(&mut encoded)
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    assert_eq!(encoded.len(), value.tls_serialized_len(), "{name}: size");
    Case {
        name: name.to_string(),
        encoded,
        decodes_back: Box::new(move |stored| {
            let decoded = T::tls_deserialize_exact_bytes(stored)
                .map_err(|e| format!("does not decode: {e:?}"))?;
            if decoded != value {
                return Err(format!("decodes to {decoded:?}, expected {value:?}"));
            }
            Ok(())
        }),
    }
}

/// The bytes an Ed25519 signature covers: `SignContent` with `"roost/1 " + label` around the
/// TLS encoding of `value`.
fn signing_case<T>(name: &str, label: &'static str, value: T) -> Case
where
    T: Serialize + Size + DeserializeBytes + PartialEq + Debug + 'static,
{
    let encoded = signing_input(label, &value);
    Case {
        name: name.to_string(),
        encoded,
        decodes_back: Box::new(move |stored| {
            let wrapped = SignContent::tls_deserialize_exact_bytes(stored)
                .map_err(|e| format!("not a SignContent: {e:?}"))?;
            let expected_label = format!("{LABEL_PREFIX}{label}");
            if wrapped.label.as_slice() != expected_label.as_bytes() {
                return Err(format!(
                    "label is {:?}, expected {expected_label:?}",
                    String::from_utf8_lossy(wrapped.label.as_slice())
                ));
            }
            let decoded = T::tls_deserialize_exact_bytes(wrapped.content.as_slice())
                .map_err(|e| format!("content does not decode: {e:?}"))?;
            if decoded != value {
                return Err(format!("content is {decoded:?}, expected {value:?}"));
            }
            Ok(())
        }),
    }
}

fn vector_path(file: &str) -> PathBuf {
    common::vectors_dir().join(file)
}

/// Compares `cases` with `tests/vectors/<file>` (rewriting the file first when regenerating)
/// and fails listing every disagreement.
fn check_file(file: &str, description: &str, cases: Vec<Case>) {
    let mut names = BTreeSet::new();
    for case in &cases {
        assert!(
            names.insert(case.name.clone()),
            "duplicate case {}",
            case.name
        );
        assert!(
            !case.name.contains(char::is_whitespace),
            "case name {:?} has whitespace",
            case.name
        );
    }
    if env_flag(REGEN_VAR) {
        let mut text = format!(
            "# {description}\n# Generated by `{REGEN_VAR}=1 cargo test -p roost-protocol --test vectors`.\n# Format: one `name hex` per line.\n"
        );
        for case in &cases {
            text.push_str(&format!("{} {}\n", case.name, hex::encode(&case.encoded)));
        }
        std::fs::create_dir_all(common::vectors_dir()).expect("create vectors dir");
        // Write then rename, so tests reading the file meanwhile never see half of it.
        let temp = vector_path(&format!("{file}.tmp"));
        std::fs::write(&temp, text).expect("write vectors");
        std::fs::rename(&temp, vector_path(file)).expect("replace vectors");
    }
    let stored = common::load_vectors(file);
    let mut failures = Vec::new();
    for case in &cases {
        match stored.get(&case.name) {
            None => failures.push(format!("{}: no stored vector", case.name)),
            Some(bytes) => {
                if *bytes != case.encoded {
                    failures.push(format!(
                        "{}: encoding changed\n  stored:  {}\n  encoded: {}",
                        case.name,
                        hex::encode(bytes),
                        hex::encode(&case.encoded)
                    ));
                }
                if let Err(e) = (case.decodes_back)(bytes) {
                    failures.push(format!("{}: stored bytes: {e}", case.name));
                }
            }
        }
    }
    for name in stored.keys() {
        if !names.contains(name) {
            failures.push(format!("{name}: stored but not built by the test"));
        }
    }
    assert!(
        failures.is_empty(),
        "{file} disagrees with the code ({REGEN_VAR}=1 rewrites it after an intended change):\n{}",
        failures.join("\n")
    );
}

fn client_request_cases() -> Vec<Case> {
    common::client_requests()
        .into_iter()
        .map(|(name, value)| frame_case(name, value))
        .collect()
}

fn response_cases() -> Vec<Case> {
    common::responses()
        .into_iter()
        .map(|(name, value)| frame_case(name, value))
        .collect()
}

fn listen_event_cases() -> Vec<Case> {
    common::listen_events()
        .into_iter()
        .map(|(name, value)| frame_case(name, value))
        .collect()
}

fn listen_control_cases() -> Vec<Case> {
    common::listen_controls()
        .into_iter()
        .map(|(name, value)| frame_case(name, value))
        .collect()
}

fn federation_request_cases() -> Vec<Case> {
    common::federation_requests()
        .into_iter()
        .map(|(name, value)| frame_case(name, value))
        .collect()
}

#[test]
fn client_request_vectors() {
    check_file(
        "client_request.txt",
        "Frames of every ClientRequest variant.",
        client_request_cases(),
    );
}

#[test]
fn response_vectors() {
    check_file(
        "response.txt",
        "Frames of every Response variant, and Response::Error with every ErrorDetail.",
        response_cases(),
    );
}

#[test]
fn listen_event_vectors() {
    check_file(
        "listen_event.txt",
        "Frames of every ListenEvent variant.",
        listen_event_cases(),
    );
}

#[test]
fn listen_control_vectors() {
    check_file(
        "listen_control.txt",
        "Frames of every ListenControl variant (written by a client on its listen stream).",
        listen_control_cases(),
    );
}

#[test]
fn federation_request_vectors() {
    check_file(
        "federation_request.txt",
        "Frames of every FederationRequest variant.",
        federation_request_cases(),
    );
}

#[test]
fn queue_payload_vectors() {
    check_file(
        "queue_payload.txt",
        "TLS encoding (no frame) of every QueuePayload variant.",
        common::queue_payloads()
            .into_iter()
            .map(|(name, value)| plain_case(name, value))
            .collect(),
    );
}

#[test]
fn signed_struct_vectors() {
    check_file(
        "signed.txt",
        "TLS encoding of each signed struct (`Xxx`) and the SignContent bytes its signature covers (`Xxx/signing_input`).",
        vec![
            plain_case("RegisterUserTbs", common::register_user_tbs()),
            signing_case(
                "RegisterUserTbs/signing_input",
                LABEL_REGISTER_USER,
                common::register_user_tbs(),
            ),
            plain_case("AddClientTbs", common::add_client_tbs()),
            signing_case(
                "AddClientTbs/signing_input",
                LABEL_ADD_CLIENT,
                common::add_client_tbs(),
            ),
            plain_case("RemoveClientTbs", common::remove_client_tbs()),
            signing_case(
                "RemoveClientTbs/signing_input",
                LABEL_REMOVE_CLIENT,
                common::remove_client_tbs(),
            ),
            plain_case("ConnectionAuthTbs", common::connection_auth_tbs()),
            signing_case(
                "ConnectionAuthTbs/signing_input",
                LABEL_CONNECTION_AUTH,
                common::connection_auth_tbs(),
            ),
            plain_case("ClientCredentialTbs", common::client_credential_tbs()),
            signing_case(
                "ClientCredentialTbs/signing_input",
                LABEL_CLIENT_CREDENTIAL,
                common::client_credential_tbs(),
            ),
        ],
    );
}

#[test]
fn message_content_vectors() {
    use roost_protocol::content::{ContentType, MessageContent};
    check_file(
        "content.txt",
        "TLS encoding of MessageContent, the plaintext of an application message (PROTOCOL.md §4.5).",
        vec![
            plain_case(
                "MessageContent/text",
                MessageContent {
                    content_type: ContentType::TEXT,
                    body: roost_protocol::Opaque::from(&b"hello"[..]),
                },
            ),
            plain_case(
                "MessageContent/unknown_type",
                MessageContent {
                    content_type: ContentType(0x7f01),
                    body: roost_protocol::Opaque::from(&[1u8, 2, 3][..]),
                },
            ),
            plain_case(
                "Attachment",
                roost_protocol::content::Attachment {
                    blob: common::blob_ref(),
                    encryption:
                        roost_protocol::content::AttachmentEncryption::AES256GCM_CHUNKED_64K,
                    key: [0x11; 32],
                    nonce_prefix: [0x22; 7],
                    size: 70_000,
                    media_type: roost_protocol::Opaque::from(&b"image/jpeg"[..]),
                    name: roost_protocol::Opaque::from(&b"a.jpg"[..]),
                },
            ),
        ],
    );
}

/// Decodes every frame stored in `file` as `T`.
fn stored_frames<T: DeserializeBytes + Debug>(file: &str) -> Vec<(String, T)> {
    common::load_vectors(file)
        .into_iter()
        .map(|(name, frame)| {
            let value = decode_body::<T>(&frame[FRAME_HEADER_LEN..])
                .unwrap_or_else(|e| panic!("{file} {name}: {e}"));
            (name, value)
        })
        .collect()
}

#[test]
fn every_request_kind_has_a_request_vector() {
    let stored = stored_frames::<ClientRequest>("client_request.txt");
    let covered = common::kinds(stored.iter().map(|(_, request)| request));
    let missing: Vec<&str> = RequestKind::ALL
        .iter()
        .filter(|kind| !covered.contains(kind))
        .map(|kind| kind.name())
        .collect();
    assert!(
        missing.is_empty(),
        "request kinds without a vector in client_request.txt: {missing:?}"
    );
    // A vector's name starts with the kind it encodes.
    for (name, request) in &stored {
        let base = name.split('/').next().unwrap_or_default();
        assert_eq!(base, request.kind().name(), "vector {name}");
    }
}

#[test]
fn every_response_variant_has_a_vector() {
    let stored = stored_frames::<Response>("response.txt");
    let covered: BTreeSet<&str> = stored
        .iter()
        .map(|(_, response)| common::response_name(response))
        .collect();
    let expected = RequestKind::ALL
        .iter()
        .map(|kind| kind.name())
        .chain(["Error", "Deliver"]);
    let missing: Vec<&str> = expected.filter(|name| !covered.contains(name)).collect();
    assert!(
        missing.is_empty(),
        "response variants without a vector: {missing:?}"
    );
    for (name, response) in &stored {
        let base = name.split('/').next().unwrap_or_default();
        assert_eq!(base, common::response_name(response), "vector {name}");
    }

    let details: BTreeSet<&str> = stored
        .iter()
        .filter_map(|(_, response)| match response {
            Response::Error(err) => Some(common::detail_name(&err.detail)),
            _ => None,
        })
        .collect();
    for detail in common::error_details() {
        assert!(
            details.contains(common::detail_name(&detail)),
            "no Response::Error vector with ErrorDetail::{}",
            common::detail_name(&detail)
        );
    }
}

fn listen_event_name(event: &ListenEvent) -> &'static str {
    match event {
        ListenEvent::Message(_) => "Message",
        ListenEvent::Closed(_) => "Closed",
    }
}

fn federation_request_name(request: &FederationRequest) -> &'static str {
    match request {
        FederationRequest::Forward(_) => "Forward",
        FederationRequest::Deliver(_) => "Deliver",
        FederationRequest::BlobDownload(_) => "BlobDownload",
    }
}

fn queue_payload_name(payload: &QueuePayload) -> &'static str {
    match payload {
        QueuePayload::GroupMessage(_) => "GroupMessage",
        QueuePayload::Welcome(_) => "Welcome",
    }
}

#[test]
fn every_event_control_federation_and_payload_variant_has_a_vector() {
    let events: BTreeSet<&str> = stored_frames::<ListenEvent>("listen_event.txt")
        .iter()
        .map(|(_, event)| listen_event_name(event))
        .collect();
    assert_eq!(events, BTreeSet::from(["Message", "Closed"]));

    let controls: BTreeSet<&str> = stored_frames::<ListenControl>("listen_control.txt")
        .iter()
        .map(|(_, control)| match control {
            ListenControl::Ack(_) => "Ack",
        })
        .collect();
    assert_eq!(controls, BTreeSet::from(["Ack"]));

    let federation: BTreeSet<&str> = stored_frames::<FederationRequest>("federation_request.txt")
        .iter()
        .map(|(_, request)| federation_request_name(request))
        .collect();
    assert_eq!(
        federation,
        BTreeSet::from(["Forward", "Deliver", "BlobDownload"])
    );

    let payloads: BTreeSet<&str> = common::load_vectors("queue_payload.txt")
        .values()
        .map(|bytes| {
            let payload = QueuePayload::tls_deserialize_exact_bytes(bytes).expect("payload");
            queue_payload_name(&payload)
        })
        .collect();
    assert_eq!(payloads, BTreeSet::from(["GroupMessage", "Welcome"]));
}

/// A server pushes a payload to many listeners by writing each listener's frame head and then
/// the payload's shared encoding: together they must be the stored frame, byte for byte.
#[test]
fn listen_messages_split_into_head_and_shared_payload() {
    let mut checked = 0;
    for (name, frame) in common::load_vectors("listen_event.txt") {
        let Ok(ListenEvent::Message(message)) = decode_body(&frame[FRAME_HEADER_LEN..]) else {
            continue;
        };
        let payload = message.payload.tls_serialize_detached().unwrap();
        let mut split = listen_message_head(
            message.seq,
            &message.id,
            message.timestamp_ms,
            payload.len(),
        )
        .unwrap();
        split.extend_from_slice(&payload);
        assert_eq!(hex::encode(split), hex::encode(&frame), "{name}");
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn vector_file_parser_rejects_bad_lines() {
    assert!(common::parse_vectors("a 00\n# comment\n\nb 0102\n").is_ok());
    assert!(common::parse_vectors("only-a-name\n").is_err());
    assert!(common::parse_vectors("a 0g\n").is_err());
    assert!(common::parse_vectors("a 001\n").is_err());
    assert!(common::parse_vectors("a 00\na 01\n").is_err());
}

/// The fuzz seeds: each fuzz target's input format built from the stored vectors.
/// `client_request` (ClientRequest and ListenControl bodies), `response` and
/// `federation_request` take a frame body; `listen_stream`
/// takes one byte choosing the chunk size, then a stream of frames.
fn fuzz_seeds() -> BTreeMap<&'static str, Vec<(String, Vec<u8>)>> {
    let bodies = |file: &str| -> Vec<(String, Vec<u8>)> {
        common::load_vectors(file)
            .into_iter()
            .map(|(name, frame)| (name.replace('/', "-"), frame[FRAME_HEADER_LEN..].to_vec()))
            .collect()
    };
    let events = common::load_vectors("listen_event.txt");
    let mut streams = Vec::new();
    for (name, frame) in &events {
        let mut seed = vec![0u8];
        seed.extend_from_slice(frame);
        streams.push((name.replace('/', "-"), seed));
    }
    for chunk_selector in [0u8, 1, 6, 63] {
        let mut seed = vec![chunk_selector];
        for frame in events.values() {
            seed.extend_from_slice(frame);
        }
        streams.push((format!("all-chunk{chunk_selector}"), seed));
    }
    BTreeMap::from([
        (
            "client_request",
            [bodies("client_request.txt"), bodies("listen_control.txt")].concat(),
        ),
        ("response", bodies("response.txt")),
        ("federation_request", bodies("federation_request.txt")),
        ("listen_stream", streams),
    ])
}

/// Every seed is a valid input for its target (so the fuzzer starts from deep inside the
/// format); with `ROOST_SEED_FUZZ_CORPUS=1` the seeds are written to `fuzz/corpus/<target>/`.
#[test]
fn fuzz_seeds_are_valid_inputs() {
    let seeds = fuzz_seeds();
    for (target, inputs) in &seeds {
        assert!(!inputs.is_empty(), "{target}: no seeds");
        for (name, input) in inputs {
            let ok = match *target {
                "client_request" => {
                    decode_body::<ClientRequest>(input).is_ok()
                        || decode_body::<ListenControl>(input).is_ok()
                }
                "response" => decode_body::<Response>(input).is_ok(),
                "federation_request" => decode_body::<FederationRequest>(input).is_ok(),
                "listen_stream" => {
                    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
                    decoder.push(&input[1..]);
                    let mut all = true;
                    let mut count = 0;
                    while let Some(body) = decoder.next_frame().expect("frame") {
                        all &= decode_body::<ListenEvent>(&body).is_ok();
                        count += 1;
                    }
                    all && count > 0 && decoder.finish().is_ok()
                }
                other => panic!("unknown fuzz target {other}"),
            };
            assert!(ok, "{target}/{name} is not a valid input");
        }
    }
    if env_flag(SEED_VAR) {
        let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (target, inputs) in &seeds {
            let dir = corpus.join(target);
            std::fs::create_dir_all(&dir).expect("create corpus dir");
            for (name, input) in inputs {
                std::fs::write(dir.join(format!("vector-{name}")), input).expect("write seed");
            }
        }
    }
}
