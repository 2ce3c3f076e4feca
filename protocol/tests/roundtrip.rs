//! Property tests: every message built from arbitrary valid contents survives
//! `encode_frame` → `decode_body` unchanged, and its declared size is its real size.

use proptest::collection::vec;
use proptest::prelude::*;
use roost_protocol::error::{ErrorCode, ErrorDetail, WireError};
use roost_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame};
use roost_protocol::ids::{ClientId, DeviceName, Domain, GroupId, MessageId, UserId, UserName};
use roost_protocol::messages::auth::*;
use roost_protocol::messages::delivery::*;
use roost_protocol::messages::federation::*;
use roost_protocol::messages::keypackage::*;
use roost_protocol::messages::push::*;
use roost_protocol::messages::queue::*;
use roost_protocol::messages::{ClientRequest, Response};
use roost_protocol::opaque::Opaque;
use tls_codec::{DeserializeBytes, Serialize, Size};

const CASES: u32 = 128;

// ---- ids ----------------------------------------------------------------------------------

/// A domain label: 1-63 bytes of `a-z 0-9 -`, not starting or ending with `-`.
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?",
        1 => "[a-z0-9][a-z0-9-]{61}[a-z0-9]",
    ]
}

fn domain() -> impl Strategy<Value = Domain> {
    vec(label(), 1..5)
        .prop_map(|labels| labels.join("."))
        .prop_filter("at most 253 bytes", |s| s.len() <= 253)
        .prop_map(|s| Domain::new(s).expect("generated domain is valid"))
}

fn user_name() -> impl Strategy<Value = UserName> {
    prop_oneof![
        4 => "[a-z0-9][a-z0-9._-]{0,15}",
        1 => "[a-z0-9][a-z0-9._-]{63}",
    ]
    .prop_map(|s| UserName::new(s).expect("generated user name is valid"))
}

fn device_name() -> impl Strategy<Value = DeviceName> {
    "[a-z0-9][a-z0-9_-]{0,31}"
        .prop_map(|s| DeviceName::new(s).expect("generated device name is valid"))
}

fn user_id() -> impl Strategy<Value = UserId> {
    (user_name(), domain()).prop_map(|(name, domain)| UserId::new(name, domain))
}

fn client_id() -> impl Strategy<Value = ClientId> {
    (user_id(), device_name()).prop_map(|(user, device)| ClientId::new(user, device))
}

fn group_id() -> impl Strategy<Value = GroupId> {
    (any::<[u8; 16]>(), domain()).prop_map(|(uuid, domain)| GroupId::new(uuid, domain))
}

fn message_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

/// Byte strings, with lengths around the 1/2/4-byte varint boundaries (63/64, 16383/16384).
fn opaque() -> impl Strategy<Value = Opaque> {
    prop_oneof![
        8 => vec(any::<u8>(), 0..80),
        1 => vec(any::<u8>(), 16380..16390),
    ]
    .prop_map(Opaque::new)
}

fn small_opaque() -> impl Strategy<Value = Opaque> {
    vec(any::<u8>(), 0..70).prop_map(Opaque::new)
}

// ---- shared structs -----------------------------------------------------------------------

fn error_detail() -> impl Strategy<Value = ErrorDetail> {
    prop_oneof![
        Just(ErrorDetail::None),
        any::<u64>().prop_map(|current_epoch| ErrorDetail::StaleEpoch { current_epoch }),
        any::<u64>().prop_map(|retry_after_ms| ErrorDetail::RateLimited { retry_after_ms }),
        any::<u32>().prop_map(|max_frame_len| ErrorDetail::FrameTooLarge { max_frame_len }),
        (any::<u16>(), any::<u16>())
            .prop_map(|(min, max)| ErrorDetail::UnsupportedVersion { min, max }),
        any::<u64>().prop_map(|highest_counter| ErrorDetail::SendCounterUsed { highest_counter }),
    ]
}

fn wire_error() -> impl Strategy<Value = WireError> {
    // Any code (unknown ones decode too) and any reason bytes (the wire does not require
    // UTF-8 or the length cap that `WireError::new` applies).
    (any::<u16>(), small_opaque(), error_detail()).prop_map(|(code, reason, detail)| WireError {
        code: ErrorCode(code),
        reason,
        detail,
    })
}

fn credential() -> impl Strategy<Value = ClientCredential> {
    (
        client_id(),
        small_opaque(),
        any::<u64>(),
        any::<u64>(),
        small_opaque(),
    )
        .prop_map(
            |(client, signature_key, not_before, not_after, as_signature)| ClientCredential {
                client,
                signature_key,
                not_before,
                not_after,
                as_signature,
            },
        )
}

fn claimed_key_package() -> impl Strategy<Value = ClaimedKeyPackage> {
    (
        credential(),
        opaque(),
        prop_oneof![
            Just(KeyPackageKind::Ordinary),
            Just(KeyPackageKind::LastResort)
        ],
    )
        .prop_map(|(credential, key_package, kind)| ClaimedKeyPackage {
            credential,
            key_package,
            kind,
        })
}

fn group_message() -> impl Strategy<Value = GroupMessage> {
    (group_id(), opaque()).prop_map(|(group, message)| GroupMessage { group, message })
}

fn queue_payload() -> impl Strategy<Value = QueuePayload> {
    prop_oneof![
        group_message().prop_map(QueuePayload::GroupMessage),
        group_message().prop_map(QueuePayload::Welcome),
    ]
}

fn queue_message() -> impl Strategy<Value = QueueMessage> {
    (any::<u64>(), message_id(), any::<u64>(), queue_payload()).prop_map(
        |(seq, id, timestamp_ms, payload)| QueueMessage {
            seq,
            id,
            timestamp_ms,
            payload,
        },
    )
}

// ---- top-level messages -------------------------------------------------------------------

fn client_request() -> impl Strategy<Value = ClientRequest> {
    use ClientRequest as R;
    prop_oneof![
        (
            user_id(),
            small_opaque(),
            proptest::option::of(small_opaque()),
            small_opaque()
        )
            .prop_map(|(user, user_key, registration_token, signature)| {
                R::RegisterUser(RegisterUserRequest {
                    user,
                    user_key,
                    registration_token,
                    signature,
                })
            }),
        (client_id(), small_opaque(), small_opaque()).prop_map(
            |(client, client_key, user_signature)| R::AddClient(AddClientRequest {
                client,
                client_key,
                user_signature,
            })
        ),
        (client_id(), small_opaque()).prop_map(|(client, user_signature)| R::RemoveClient(
            RemoveClientRequest {
                client,
                user_signature,
            }
        )),
        user_id().prop_map(|user| R::DiscoverUser(DiscoverUserRequest { user })),
        domain().prop_map(|domain| R::AsKeys(AsKeysRequest { domain })),
        (client_id(), small_opaque()).prop_map(|(client, signature)| R::Authenticate(
            AuthenticateRequest { client, signature }
        )),
        (vec(opaque(), 0..4), proptest::option::of(opaque())).prop_map(
            |(key_packages, last_resort)| R::UploadKeyPackages(UploadKeyPackagesRequest {
                key_packages,
                last_resort,
            })
        ),
        user_id().prop_map(|user| R::ClaimUserKeyPackages(ClaimUserKeyPackagesRequest { user })),
        client_id()
            .prop_map(|client| R::ClaimClientKeyPackage(ClaimClientKeyPackageRequest { client })),
        Just(R::KeyPackageCount(KeyPackageCountRequest {})),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(after_seq, max_messages, max_bytes)| R::QueueFetch(QueueFetchRequest {
                after_seq,
                max_messages,
                max_bytes,
            })
        ),
        any::<u64>().prop_map(|up_to_seq| R::QueueAck(QueueAckRequest { up_to_seq })),
        any::<u64>().prop_map(|after_seq| R::QueueListen(QueueListenRequest { after_seq })),
        (group_id(), opaque(), opaque()).prop_map(|(group, group_info, ratchet_tree)| {
            R::CreateGroup(CreateGroupRequest {
                group,
                group_info,
                ratchet_tree,
            })
        }),
        (
            group_id(),
            opaque(),
            proptest::option::of(opaque()),
            opaque()
        )
            .prop_map(
                |(group, commit, welcome, group_info)| R::Commit(CommitRequest {
                    group,
                    commit,
                    welcome,
                    group_info,
                })
            ),
        (group_id(), opaque())
            .prop_map(|(group, message)| R::SendMessage(SendMessageRequest { group, message })),
        (group_id(), opaque())
            .prop_map(|(group, proposal)| R::LeaveGroup(LeaveGroupRequest { group, proposal })),
        group_id().prop_map(|group| R::FetchGroupInfo(FetchGroupInfoRequest { group })),
        (group_id(), any::<u64>(), opaque()).prop_map(|(group, counter, message)| {
            R::SendCounted(SendCountedRequest {
                group,
                counter,
                message,
            })
        }),
        (group_id(), opaque(), opaque()).prop_map(|(group, commit, group_info)| {
            R::ExternalJoin(ExternalJoinRequest {
                group,
                commit,
                group_info,
            })
        }),
        prop_oneof![
            (opaque(), opaque(), opaque()).prop_map(|(endpoint, p256dh, auth)| {
                PushEndpoint::WebPush(WebPushSubscription {
                    endpoint,
                    p256dh,
                    auth,
                })
            }),
            (opaque(), opaque()).prop_map(|(device_token, topic)| {
                PushEndpoint::Apns(ApnsToken {
                    device_token,
                    topic,
                })
            }),
            opaque().prop_map(|token| PushEndpoint::Fcm(FcmToken { token })),
        ]
        .prop_map(|endpoint| R::RegisterPush(RegisterPushRequest { endpoint })),
        Just(R::UnregisterPush(UnregisterPushRequest {})),
        Just(R::PushInfo(PushInfoRequest {})),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    use Response as R;
    prop_oneof![
        wire_error().prop_map(R::Error),
        user_id().prop_map(|user| R::RegisterUser(RegisterUserResponse { user })),
        credential().prop_map(|credential| R::AddClient(AddClientResponse { credential })),
        Just(R::RemoveClient(RemoveClientResponse {})),
        vec(credential(), 0..4)
            .prop_map(|clients| R::DiscoverUser(DiscoverUserResponse { clients })),
        (domain(), vec(small_opaque(), 0..4))
            .prop_map(|(domain, keys)| R::AsKeys(AsKeysResponse { domain, keys })),
        credential().prop_map(|credential| R::Authenticate(AuthenticateResponse { credential })),
        any::<u32>()
            .prop_map(|remaining| R::UploadKeyPackages(UploadKeyPackagesResponse { remaining })),
        vec(claimed_key_package(), 0..4).prop_map(|key_packages| R::ClaimUserKeyPackages(
            ClaimUserKeyPackagesResponse { key_packages }
        )),
        claimed_key_package().prop_map(|key_package| R::ClaimClientKeyPackage(
            ClaimClientKeyPackageResponse { key_package }
        )),
        (any::<u32>(), any::<u8>()).prop_map(|(remaining, has_last_resort)| {
            R::KeyPackageCount(KeyPackageCountResponse {
                remaining,
                has_last_resort,
            })
        }),
        (vec(queue_message(), 0..4), any::<u64>()).prop_map(|(messages, head_seq)| {
            R::QueueFetch(QueueFetchResponse { messages, head_seq })
        }),
        Just(R::QueueAck(QueueAckResponse {})),
        any::<u64>().prop_map(|head_seq| R::QueueListen(QueueListenResponse { head_seq })),
        any::<u64>().prop_map(|epoch| R::CreateGroup(CreateGroupResponse { epoch })),
        any::<u64>().prop_map(|epoch| R::Commit(CommitResponse { epoch })),
        any::<u32>().prop_map(|recipients| R::SendMessage(SendMessageResponse { recipients })),
        Just(R::LeaveGroup(LeaveGroupResponse {})),
        (any::<u64>(), opaque(), opaque()).prop_map(|(epoch, group_info, ratchet_tree)| {
            R::FetchGroupInfo(FetchGroupInfoResponse {
                epoch,
                group_info,
                ratchet_tree,
            })
        }),
        any::<u64>().prop_map(|epoch| R::ExternalJoin(CommitResponse { epoch })),
        any::<u32>().prop_map(|recipients| R::SendCounted(SendMessageResponse { recipients })),
        Just(R::RegisterPush(RegisterPushResponse {})),
        any::<u8>().prop_map(|removed| R::UnregisterPush(UnregisterPushResponse { removed })),
        (opaque(), any::<u8>(), any::<u8>()).prop_map(|(vapid_public_key, apns, fcm)| {
            R::PushInfo(PushInfoResponse {
                vapid_public_key,
                apns,
                fcm,
            })
        }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(accepted, unknown_recipients, queue_full)| R::Deliver(DeliverResponse {
                accepted,
                unknown_recipients,
                queue_full,
            })
        ),
    ]
}

fn listen_event() -> impl Strategy<Value = ListenEvent> {
    prop_oneof![
        queue_message().prop_map(ListenEvent::Message),
        wire_error().prop_map(ListenEvent::Closed),
    ]
}

fn listen_control() -> impl Strategy<Value = ListenControl> {
    any::<u64>().prop_map(|up_to_seq| ListenControl::Ack(ListenAck { up_to_seq }))
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        proptest::collection::vec(client_id(), 0..4),
        message_id(),
        any::<u64>(),
        queue_payload(),
    )
        .prop_map(|(recipients, id, timestamp_ms, payload)| Delivery {
            recipients,
            id,
            timestamp_ms,
            payload,
        })
}

fn federation_request() -> impl Strategy<Value = FederationRequest> {
    prop_oneof![
        (proptest::option::of(client_id()), client_request()).prop_map(|(sender, request)| {
            FederationRequest::Forward(ForwardRequest { sender, request })
        }),
        vec(delivery(), 0..4)
            .prop_map(|deliveries| FederationRequest::Deliver(DeliverRequest { deliveries })),
    ]
}

// ---- properties ---------------------------------------------------------------------------

/// The frame's header states the body length, its size matches `tls_serialized_len`, and the
/// body decodes back to `value`.
fn assert_frame_round_trip<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + Size + DeserializeBytes + PartialEq + std::fmt::Debug,
{
    let frame = encode_frame(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        frame.len(),
        FRAME_HEADER_LEN + 2 + value.tls_serialized_len()
    );
    let header = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    prop_assert_eq!(header, frame.len() - FRAME_HEADER_LEN);
    let decoded = decode_body::<T>(&frame[FRAME_HEADER_LEN..]);
    prop_assert_eq!(decoded.as_ref(), Ok(value));
    Ok(())
}

/// The bare encoding round-trips too (for the structs that are not frames).
fn assert_plain_round_trip<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + Size + DeserializeBytes + PartialEq + std::fmt::Debug,
{
    let mut bytes = Vec::new();
    value
        .tls_serialize(&mut bytes)
        .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
    prop_assert_eq!(bytes.len(), value.tls_serialized_len());
    let decoded = T::tls_deserialize_exact_bytes(&bytes);
    prop_assert_eq!(decoded.as_ref(), Ok(value));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn client_request_round_trips(request in client_request()) {
        assert_frame_round_trip(&request)?;
    }

    #[test]
    fn response_round_trips(response in response()) {
        assert_frame_round_trip(&response)?;
    }

    #[test]
    fn listen_event_round_trips(event in listen_event()) {
        assert_frame_round_trip(&event)?;
    }

    #[test]
    fn listen_control_round_trips(control in listen_control()) {
        assert_frame_round_trip(&control)?;
        let frame = encode_frame(&control).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(frame.len() - FRAME_HEADER_LEN <= MAX_LISTEN_CONTROL_LEN as usize);
    }

    #[test]
    fn federation_request_round_trips(request in federation_request()) {
        assert_frame_round_trip(&request)?;
    }

    #[test]
    fn queue_payload_round_trips(payload in queue_payload()) {
        assert_plain_round_trip(&payload)?;
    }

    #[test]
    fn ids_round_trip_in_text_and_binary(client in client_id(), group in group_id()) {
        prop_assert_eq!(client.to_string().parse::<ClientId>(), Ok(client.clone()));
        prop_assert_eq!(client.user.to_string().parse::<UserId>(), Ok(client.user.clone()));
        prop_assert_eq!(group.to_string().parse::<GroupId>(), Ok(group.clone()));
        prop_assert_eq!(GroupId::from_mls_bytes(&group.to_mls_bytes()), Ok(group.clone()));
        assert_plain_round_trip(&client)?;
        assert_plain_round_trip(&group)?;
    }

    #[test]
    fn opaque_round_trips(value in opaque()) {
        assert_plain_round_trip(&value)?;
    }

    #[test]
    fn signed_structs_round_trip(
        client in client_id(),
        user in user_id(),
        key in small_opaque(),
        not_before in any::<u64>(),
        not_after in any::<u64>(),
    ) {
        assert_plain_round_trip(&RegisterUserTbs { user, user_key: key.clone() })?;
        assert_plain_round_trip(&AddClientTbs { client: client.clone(), client_key: key.clone() })?;
        assert_plain_round_trip(&RemoveClientTbs { client: client.clone() })?;
        assert_plain_round_trip(&ConnectionAuthTbs { client: client.clone(), exporter: key.clone() })?;
        let tbs = ClientCredentialTbs { client, signature_key: key, not_before, not_after };
        assert_plain_round_trip(&tbs)?;
        // The signing input wraps exactly the TLS encoding of the struct.
        let input = signing_input(LABEL_CLIENT_CREDENTIAL, &tbs);
        let wrapped = SignContent::tls_deserialize_exact_bytes(&input)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(wrapped.label.as_slice(), b"roost/1 client credential");
        prop_assert_eq!(
            ClientCredentialTbs::tls_deserialize_exact_bytes(wrapped.content.as_slice()),
            Ok(tbs)
        );
    }
}
