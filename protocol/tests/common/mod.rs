//! Fixed example values of every message, shared by the integration tests: the golden vectors
//! are their encodings, the negative tests cut and corrupt them, and the fuzz corpus is seeded
//! from them. Every value is deterministic so the encodings never change by themselves.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use roost_protocol::error::{ErrorCode, ErrorDetail, WireError};
use roost_protocol::ids::{ClientId, Domain, GroupId, MessageId, UserId};
use roost_protocol::messages::auth::*;
use roost_protocol::messages::blob::*;
use roost_protocol::messages::delivery::*;
use roost_protocol::messages::federation::*;
use roost_protocol::messages::keypackage::*;
use roost_protocol::messages::push::*;
use roost_protocol::messages::queue::*;
use roost_protocol::messages::{ClientRequest, RequestKind, Response};
use roost_protocol::opaque::Opaque;

pub(crate) fn domain(s: &str) -> Domain {
    s.parse().expect("fixture domain")
}

pub(crate) fn user(s: &str) -> UserId {
    s.parse().expect("fixture user id")
}

pub(crate) fn client(s: &str) -> ClientId {
    s.parse().expect("fixture client id")
}

pub(crate) fn group() -> GroupId {
    "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .expect("fixture group id")
}

pub(crate) fn remote_group() -> GroupId {
    GroupId::new([0xa5; 16], domain("chat.remote.example"))
}

/// `len` bytes counting up from `start` (wrapping), so vectors show where each field begins.
pub(crate) fn bytes(start: u8, len: usize) -> Opaque {
    Opaque::new((0..len).map(|i| start.wrapping_add(i as u8)).collect())
}

/// A 32-byte "Ed25519 public key".
pub(crate) fn key(seed: u8) -> Opaque {
    bytes(seed, ED25519_PUBLIC_KEY_LEN)
}

/// A 64-byte "Ed25519 signature".
pub(crate) fn signature(seed: u8) -> Opaque {
    bytes(seed, ED25519_SIGNATURE_LEN)
}

pub(crate) fn credential(client_id: &str, seed: u8) -> ClientCredential {
    ClientCredential {
        client: client(client_id),
        signature_key: key(seed),
        not_before: 1_700_000_000,
        not_after: 1_731_536_000,
        as_signature: signature(seed.wrapping_add(0x40)),
    }
}

pub(crate) fn claimed(client_id: &str, seed: u8, kind: KeyPackageKind) -> ClaimedKeyPackage {
    ClaimedKeyPackage {
        credential: credential(client_id, seed),
        key_package: bytes(seed, 70),
        kind,
    }
}

pub(crate) fn queue_message(seq: u64, payload: QueuePayload) -> QueueMessage {
    QueueMessage {
        seq,
        id: MessageId([seq as u8; 16]),
        timestamp_ms: 1_700_000_000_123 + seq,
        payload,
    }
}

pub(crate) fn group_message() -> QueuePayload {
    QueuePayload::GroupMessage(GroupMessage {
        group: group(),
        message: bytes(0x30, 24),
    })
}

pub(crate) fn welcome() -> QueuePayload {
    QueuePayload::Welcome(GroupMessage {
        group: remote_group(),
        message: bytes(0x50, 100),
    })
}

/// One or more named values per request kind.
pub(crate) fn blob_ref() -> BlobRef {
    BlobRef {
        domain: domain("example.org"),
        address: [0x5a; 32],
        token: [0x7b; 32],
    }
}

pub(crate) fn client_requests() -> Vec<(&'static str, ClientRequest)> {
    use ClientRequest as R;
    vec![
        (
            "RegisterUser",
            R::RegisterUser(RegisterUserRequest {
                user: user("alice@example.org"),
                user_key: key(0x01),
                registration_token: None,
                signature: signature(0x21),
            }),
        ),
        (
            "RegisterUser/with_token",
            R::RegisterUser(RegisterUserRequest {
                user: user("bob_2.x-y@example.org"),
                user_key: key(0x02),
                registration_token: Some(Opaque::from(&b"invite-7f3a"[..])),
                signature: signature(0x22),
            }),
        ),
        (
            "AddClient",
            R::AddClient(AddClientRequest {
                client: client("alice@example.org/phone"),
                client_key: key(0x03),
                user_signature: signature(0x23),
            }),
        ),
        (
            "RemoveClient",
            R::RemoveClient(RemoveClientRequest {
                client: client("alice@example.org/old_laptop-1"),
                user_signature: signature(0x24),
            }),
        ),
        (
            "DiscoverUser",
            R::DiscoverUser(DiscoverUserRequest {
                user: user("carol@chat.remote.example"),
            }),
        ),
        (
            "AsKeys",
            R::AsKeys(AsKeysRequest {
                domain: domain("chat.remote.example"),
            }),
        ),
        (
            "Authenticate",
            R::Authenticate(AuthenticateRequest {
                client: client("alice@example.org/phone"),
                signature: signature(0x25),
            }),
        ),
        (
            "UploadKeyPackages",
            R::UploadKeyPackages(UploadKeyPackagesRequest {
                key_packages: vec![bytes(0x60, 40), bytes(0x61, 41)],
                last_resort: Some(bytes(0x62, 42)),
            }),
        ),
        (
            "UploadKeyPackages/empty",
            R::UploadKeyPackages(UploadKeyPackagesRequest {
                key_packages: Vec::new(),
                last_resort: None,
            }),
        ),
        (
            "ClaimUserKeyPackages",
            R::ClaimUserKeyPackages(ClaimUserKeyPackagesRequest {
                user: user("carol@chat.remote.example"),
            }),
        ),
        (
            "ClaimClientKeyPackage",
            R::ClaimClientKeyPackage(ClaimClientKeyPackageRequest {
                client: client("carol@chat.remote.example/desktop"),
            }),
        ),
        (
            "KeyPackageCount",
            R::KeyPackageCount(KeyPackageCountRequest {}),
        ),
        (
            "QueueFetch",
            R::QueueFetch(QueueFetchRequest {
                after_seq: 41,
                max_messages: 100,
                max_bytes: 1 << 20,
            }),
        ),
        (
            "QueueAck",
            R::QueueAck(QueueAckRequest {
                up_to_seq: 0x0102_0304_0506_0708,
            }),
        ),
        (
            "QueueListen",
            R::QueueListen(QueueListenRequest { after_seq: 42 }),
        ),
        (
            "CreateGroup",
            R::CreateGroup(CreateGroupRequest {
                group: group(),
                group_info: bytes(0x70, 80),
                ratchet_tree: bytes(0x80, 20),
            }),
        ),
        (
            "Commit",
            R::Commit(CommitRequest {
                group: group(),
                commit: bytes(0x90, 30),
                welcome: Some(bytes(0xa0, 64)),
                group_info: bytes(0xb0, 10),
            }),
        ),
        (
            "Commit/no_welcome",
            R::Commit(CommitRequest {
                group: remote_group(),
                commit: bytes(0x91, 31),
                welcome: None,
                group_info: bytes(0xb1, 11),
            }),
        ),
        (
            "SendMessage",
            R::SendMessage(SendMessageRequest {
                group: group(),
                message: bytes(0xc0, 16),
            }),
        ),
        (
            "LeaveGroup",
            R::LeaveGroup(LeaveGroupRequest {
                group: group(),
                proposal: bytes(0xd0, 12),
            }),
        ),
        (
            "FetchGroupInfo",
            R::FetchGroupInfo(FetchGroupInfoRequest {
                group: remote_group(),
            }),
        ),
        (
            "ExternalJoin",
            R::ExternalJoin(ExternalJoinRequest {
                group: remote_group(),
                commit: bytes(0xe0, 33),
                group_info: bytes(0xf0, 9),
            }),
        ),
        (
            "SendCounted",
            R::SendCounted(SendCountedRequest {
                group: remote_group(),
                counter: 0x0102_0304_0506,
                message: bytes(0xc1, 17),
            }),
        ),
        (
            "BlobUpload",
            R::BlobUpload(BlobUploadRequest { size: 0x0102_0304 }),
        ),
        (
            "BlobDownload",
            R::BlobDownload(BlobDownloadRequest {
                blob: blob_ref(),
                offset: 1 << 20,
                length: Some(4096),
            }),
        ),
        (
            "BlobDownload/to_end",
            R::BlobDownload(BlobDownloadRequest {
                blob: blob_ref(),
                offset: 0,
                length: None,
            }),
        ),
        (
            "RegisterPush/web_push",
            R::RegisterPush(RegisterPushRequest {
                endpoint: PushEndpoint::WebPush(WebPushSubscription {
                    endpoint: Opaque::from(&b"https://push.example.net/s/1"[..]),
                    p256dh: bytes(0x04, 65),
                    auth: bytes(0x15, 16),
                }),
            }),
        ),
        (
            "RegisterPush/apns",
            R::RegisterPush(RegisterPushRequest {
                endpoint: PushEndpoint::Apns(ApnsToken {
                    device_token: bytes(0x20, 32),
                    topic: Opaque::from(&b"org.example.app"[..]),
                }),
            }),
        ),
        (
            "RegisterPush/fcm",
            R::RegisterPush(RegisterPushRequest {
                endpoint: PushEndpoint::Fcm(FcmToken {
                    token: Opaque::from(&b"fcm-token-1"[..]),
                }),
            }),
        ),
        (
            "UnregisterPush",
            R::UnregisterPush(UnregisterPushRequest {}),
        ),
        ("PushInfo", R::PushInfo(PushInfoRequest {})),
    ]
}

/// The variant name of a response. No wildcard: a new variant fails to compile here until it
/// has a name, and the vector test then asks for its vector.
pub(crate) fn response_name(response: &Response) -> &'static str {
    match response {
        Response::Error(_) => "Error",
        Response::RegisterUser(_) => "RegisterUser",
        Response::AddClient(_) => "AddClient",
        Response::RemoveClient(_) => "RemoveClient",
        Response::DiscoverUser(_) => "DiscoverUser",
        Response::AsKeys(_) => "AsKeys",
        Response::Authenticate(_) => "Authenticate",
        Response::UploadKeyPackages(_) => "UploadKeyPackages",
        Response::ClaimUserKeyPackages(_) => "ClaimUserKeyPackages",
        Response::ClaimClientKeyPackage(_) => "ClaimClientKeyPackage",
        Response::KeyPackageCount(_) => "KeyPackageCount",
        Response::QueueFetch(_) => "QueueFetch",
        Response::QueueAck(_) => "QueueAck",
        Response::QueueListen(_) => "QueueListen",
        Response::CreateGroup(_) => "CreateGroup",
        Response::Commit(_) => "Commit",
        Response::SendMessage(_) => "SendMessage",
        Response::LeaveGroup(_) => "LeaveGroup",
        Response::FetchGroupInfo(_) => "FetchGroupInfo",
        Response::ExternalJoin(_) => "ExternalJoin",
        Response::SendCounted(_) => "SendCounted",
        Response::RegisterPush(_) => "RegisterPush",
        Response::UnregisterPush(_) => "UnregisterPush",
        Response::PushInfo(_) => "PushInfo",
        Response::Deliver(_) => "Deliver",
        Response::BlobUpload(_) => "BlobUpload",
        Response::BlobDownload(_) => "BlobDownload",
    }
}

/// The variant names of ErrorDetail, exhaustively (see [`response_name`]).
pub(crate) fn detail_name(detail: &ErrorDetail) -> &'static str {
    match detail {
        ErrorDetail::None => "None",
        ErrorDetail::StaleEpoch { .. } => "StaleEpoch",
        ErrorDetail::RateLimited { .. } => "RateLimited",
        ErrorDetail::FrameTooLarge { .. } => "FrameTooLarge",
        ErrorDetail::UnsupportedVersion { .. } => "UnsupportedVersion",
        ErrorDetail::SendCounterUsed { .. } => "SendCounterUsed",
    }
}

/// One example of every ErrorDetail variant.
pub(crate) fn error_details() -> Vec<ErrorDetail> {
    vec![
        ErrorDetail::None,
        ErrorDetail::StaleEpoch { current_epoch: 17 },
        ErrorDetail::RateLimited {
            retry_after_ms: 1500,
        },
        ErrorDetail::FrameTooLarge {
            max_frame_len: 8 * 1024 * 1024,
        },
        ErrorDetail::UnsupportedVersion { min: 1, max: 1 },
        ErrorDetail::SendCounterUsed {
            highest_counter: 41,
        },
    ]
}

pub(crate) fn responses() -> Vec<(&'static str, Response)> {
    use Response as R;
    let mut out = vec![
        (
            "RegisterUser",
            R::RegisterUser(RegisterUserResponse {
                user: user("alice@example.org"),
            }),
        ),
        (
            "AddClient",
            R::AddClient(AddClientResponse {
                credential: credential("alice@example.org/phone", 0x03),
            }),
        ),
        ("RemoveClient", R::RemoveClient(RemoveClientResponse {})),
        (
            "DiscoverUser",
            R::DiscoverUser(DiscoverUserResponse {
                clients: vec![
                    credential("carol@chat.remote.example/desktop", 0x10),
                    credential("carol@chat.remote.example/phone", 0x11),
                ],
            }),
        ),
        (
            "AsKeys",
            R::AsKeys(AsKeysResponse {
                domain: domain("chat.remote.example"),
                keys: vec![key(0x12), key(0x13)],
            }),
        ),
        (
            "Authenticate",
            R::Authenticate(AuthenticateResponse {
                credential: credential("alice@example.org/phone", 0x03),
            }),
        ),
        (
            "UploadKeyPackages",
            R::UploadKeyPackages(UploadKeyPackagesResponse { remaining: 2 }),
        ),
        (
            "ClaimUserKeyPackages",
            R::ClaimUserKeyPackages(ClaimUserKeyPackagesResponse {
                key_packages: vec![
                    claimed(
                        "carol@chat.remote.example/desktop",
                        0x10,
                        KeyPackageKind::Ordinary,
                    ),
                    claimed(
                        "carol@chat.remote.example/phone",
                        0x11,
                        KeyPackageKind::LastResort,
                    ),
                ],
            }),
        ),
        (
            "ClaimUserKeyPackages/empty",
            R::ClaimUserKeyPackages(ClaimUserKeyPackagesResponse {
                key_packages: Vec::new(),
            }),
        ),
        (
            "ClaimClientKeyPackage",
            R::ClaimClientKeyPackage(ClaimClientKeyPackageResponse {
                key_package: claimed(
                    "carol@chat.remote.example/desktop",
                    0x10,
                    KeyPackageKind::LastResort,
                ),
            }),
        ),
        (
            "KeyPackageCount",
            R::KeyPackageCount(KeyPackageCountResponse {
                remaining: 5,
                has_last_resort: 1,
            }),
        ),
        (
            "QueueFetch",
            R::QueueFetch(QueueFetchResponse {
                messages: vec![
                    queue_message(7, group_message()),
                    queue_message(9, welcome()),
                ],
                head_seq: 12,
            }),
        ),
        (
            "QueueFetch/empty",
            R::QueueFetch(QueueFetchResponse {
                messages: Vec::new(),
                head_seq: 0,
            }),
        ),
        ("QueueAck", R::QueueAck(QueueAckResponse {})),
        (
            "QueueListen",
            R::QueueListen(QueueListenResponse { head_seq: 12 }),
        ),
        (
            "CreateGroup",
            R::CreateGroup(CreateGroupResponse { epoch: 0 }),
        ),
        ("Commit", R::Commit(CommitResponse { epoch: 18 })),
        (
            "SendMessage",
            R::SendMessage(SendMessageResponse { recipients: 3 }),
        ),
        ("LeaveGroup", R::LeaveGroup(LeaveGroupResponse {})),
        (
            "FetchGroupInfo",
            R::FetchGroupInfo(FetchGroupInfoResponse {
                epoch: 18,
                group_info: bytes(0x70, 80),
                ratchet_tree: bytes(0x80, 20),
            }),
        ),
        (
            "ExternalJoin",
            R::ExternalJoin(CommitResponse { epoch: 19 }),
        ),
        (
            "SendCounted",
            R::SendCounted(SendMessageResponse { recipients: 4 }),
        ),
        ("RegisterPush", R::RegisterPush(RegisterPushResponse {})),
        (
            "UnregisterPush",
            R::UnregisterPush(UnregisterPushResponse { removed: 1 }),
        ),
        (
            "PushInfo",
            R::PushInfo(PushInfoResponse {
                vapid_public_key: bytes(0x04, 65),
                apns: 1,
                fcm: 0,
            }),
        ),
        (
            "BlobUpload",
            R::BlobUpload(BlobUploadResponse {
                blob: blob_ref(),
                size: 0x0102_0304,
                expires_at: 1_700_000_000,
            }),
        ),
        (
            "BlobDownload",
            R::BlobDownload(BlobDownloadResponse {
                size: 3 << 20,
                offset: 1 << 20,
                length: 4096,
            }),
        ),
        (
            "Deliver",
            R::Deliver(DeliverResponse {
                accepted: 2,
                unknown_recipients: 1,
                queue_full: 0,
            }),
        ),
    ];
    for (name, detail) in [
        "Error/None",
        "Error/StaleEpoch",
        "Error/RateLimited",
        "Error/FrameTooLarge",
        "Error/UnsupportedVersion",
        "Error/SendCounterUsed",
    ]
    .into_iter()
    .zip(error_details())
    {
        let code = match detail {
            ErrorDetail::None => ErrorCode::GROUP_NOT_FOUND,
            ErrorDetail::StaleEpoch { .. } => ErrorCode::STALE_EPOCH,
            ErrorDetail::RateLimited { .. } => ErrorCode::RATE_LIMITED,
            ErrorDetail::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            ErrorDetail::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            ErrorDetail::SendCounterUsed { .. } => ErrorCode::SEND_COUNTER_USED,
        };
        let reason = format!("{} example", detail_name(&detail));
        out.push((name, R::Error(WireError::with_detail(code, reason, detail))));
    }
    out.push((
        "Error/unknown_code",
        R::Error(WireError::new(ErrorCode(9999), "")),
    ));
    out
}

pub(crate) fn listen_events() -> Vec<(&'static str, ListenEvent)> {
    vec![
        (
            "Message",
            ListenEvent::Message(queue_message(13, group_message())),
        ),
        (
            "Message/welcome",
            ListenEvent::Message(queue_message(14, welcome())),
        ),
        (
            "Closed",
            ListenEvent::Closed(WireError::new(
                ErrorCode::UNAVAILABLE,
                "server shutting down",
            )),
        ),
    ]
}

pub(crate) fn listen_controls() -> Vec<(&'static str, ListenControl)> {
    vec![
        ("Ack", ListenControl::Ack(ListenAck { up_to_seq: 13 })),
        (
            "Ack/max",
            ListenControl::Ack(ListenAck {
                up_to_seq: u64::MAX,
            }),
        ),
    ]
}

pub(crate) fn federation_requests() -> Vec<(&'static str, FederationRequest)> {
    vec![
        (
            "Forward",
            FederationRequest::Forward(ForwardRequest {
                sender: Some(client("alice@example.org/phone")),
                request: ClientRequest::SendMessage(SendMessageRequest {
                    group: remote_group(),
                    message: bytes(0xc1, 17),
                }),
            }),
        ),
        (
            "Forward/no_sender",
            FederationRequest::Forward(ForwardRequest {
                sender: None,
                request: ClientRequest::DiscoverUser(DiscoverUserRequest {
                    user: user("carol@chat.remote.example"),
                }),
            }),
        ),
        (
            "Deliver",
            FederationRequest::Deliver(DeliverRequest {
                deliveries: vec![
                    Delivery {
                        recipients: vec![client("carol@chat.remote.example/desktop")],
                        id: MessageId([0x42; 16]),
                        timestamp_ms: 1_700_000_000_999,
                        payload: group_message(),
                    },
                    Delivery {
                        recipients: vec![
                            client("dave@chat.remote.example/tablet"),
                            client("erin@chat.remote.example/phone"),
                        ],
                        id: MessageId([0x43; 16]),
                        timestamp_ms: 1_700_000_001_000,
                        payload: QueuePayload::Welcome(GroupMessage {
                            group: group(),
                            message: bytes(0x51, 90),
                        }),
                    },
                ],
            }),
        ),
        (
            "Deliver/empty",
            FederationRequest::Deliver(DeliverRequest {
                deliveries: Vec::new(),
            }),
        ),
        (
            "BlobDownload",
            FederationRequest::BlobDownload(BlobDownloadRequest {
                blob: blob_ref(),
                offset: 0,
                length: None,
            }),
        ),
    ]
}

pub(crate) fn queue_payloads() -> Vec<(&'static str, QueuePayload)> {
    vec![("GroupMessage", group_message()), ("Welcome", welcome())]
}

pub(crate) fn register_user_tbs() -> RegisterUserTbs {
    RegisterUserTbs {
        user: user("alice@example.org"),
        user_key: key(0x01),
    }
}

pub(crate) fn add_client_tbs() -> AddClientTbs {
    AddClientTbs {
        client: client("alice@example.org/phone"),
        client_key: key(0x03),
    }
}

pub(crate) fn remove_client_tbs() -> RemoveClientTbs {
    RemoveClientTbs {
        client: client("alice@example.org/old_laptop-1"),
    }
}

pub(crate) fn connection_auth_tbs() -> ConnectionAuthTbs {
    ConnectionAuthTbs {
        client: client("alice@example.org/phone"),
        exporter: bytes(0xee, EXPORTER_LEN),
    }
}

pub(crate) fn client_credential_tbs() -> ClientCredentialTbs {
    credential("alice@example.org/phone", 0x03).tbs()
}

/// Where the vector files live.
pub(crate) fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Parses a vector file: `name hex` per line; blank lines and lines starting with `#` are
/// comments. Duplicate names are an error.
pub(crate) fn parse_vectors(text: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, hex_text) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {}: expected `name hex`", number + 1))?;
        let value = hex::decode(hex_text.trim())
            .map_err(|e| format!("line {}: bad hex: {e}", number + 1))?;
        if out.insert(name.to_string(), value).is_some() {
            return Err(format!("line {}: duplicate name {name}", number + 1));
        }
    }
    Ok(out)
}

/// Reads and parses `tests/vectors/<file>`.
pub(crate) fn load_vectors(file: &str) -> BTreeMap<String, Vec<u8>> {
    let path = vectors_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse_vectors(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The kinds a set of requests covers.
pub(crate) fn kinds<'a>(requests: impl IntoIterator<Item = &'a ClientRequest>) -> Vec<RequestKind> {
    let mut out: Vec<RequestKind> = Vec::new();
    for request in requests {
        if !out.contains(&request.kind()) {
            out.push(request.kind());
        }
    }
    out
}
