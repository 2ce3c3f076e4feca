use roost_protocol::ErrorCode;
use roost_protocol::messages::auth::*;

use crate::common::*;

fn code(err: roost_client::transport::RequestError) -> ErrorCode {
    err.wire_error()
        .map(|e| e.code)
        .unwrap_or_else(|| panic!("not a server error: {err}"))
}

#[tokio::test]
async fn users_register_add_devices_and_are_discovered() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let conn = connect(&server).await;
    let alice = register(&conn, "alice").await;
    let phone = add_client(&conn, &alice, "phone").await;
    let laptop = add_client(&conn, &alice, "laptop").await;

    // The credential is signed by the AS key the server publishes.
    let keys = conn
        .call(AsKeysRequest {
            domain: DOMAIN.parse().unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(keys.keys, vec![server.as_public_key().into()]);
    for client in [&phone, &laptop] {
        let cred = &client.credential;
        assert_eq!(cred.client, client.id);
        assert_eq!(cred.signature_key.as_slice(), client.key.public());
        assert!(cred.not_after > cred.not_before);
        let input = signing_input(LABEL_CLIENT_CREDENTIAL, &cred.tbs());
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, server.as_public_key())
            .verify(&input, cred.as_signature.as_slice())
            .expect("AS signature verifies");
    }

    // Discovery needs an authenticated connection.
    let err = conn
        .call(DiscoverUserRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::UNAUTHENTICATED);

    let (_bob, _bob_phone, bob_conn) = new_client(&server, "bob").await;
    let found = bob_conn
        .call(DiscoverUserRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap();
    let mut ids: Vec<_> = found.clients.iter().map(|c| c.client.to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["alice@example.org/laptop", "alice@example.org/phone"]);

    // Unknown users look like users without clients.
    let err = bob_conn
        .call(DiscoverUserRequest {
            user: "nobody@example.org".parse().unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::USER_NOT_FOUND);

    // Duplicates are refused.
    let err = conn
        .call(register_request(&alice.id, &keypair(), None))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::USER_EXISTS);
    let err = conn
        .call(add_client_request(&alice, &phone.id, &keypair()))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::CLIENT_EXISTS);

    // Removing a client revokes it: it disappears from discovery, cannot authenticate, and
    // its device name is never reused.
    conn.call(remove_client_request(&alice, &laptop.id))
        .await
        .unwrap();
    let found = bob_conn
        .call(DiscoverUserRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(found.clients.len(), 1);
    assert_eq!(found.clients[0].client, phone.id);
    let fresh = connect(&server).await;
    let err = fresh
        .authenticate(&laptop.id, |input| sign(&laptop.key, input))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::BAD_SIGNATURE);
    let err = conn
        .call(add_client_request(&alice, &laptop.id, &keypair()))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::CLIENT_EXISTS);
    let err = conn
        .call(remove_client_request(&alice, &laptop.id))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::CLIENT_NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn client_changes_need_the_user_signature_and_a_local_domain() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let conn = connect(&server).await;
    let alice = register(&conn, "alice").await;
    let mallory = register(&conn, "mallory").await;

    // Mallory signs an AddClient for alice's account with her own key.
    let client = roost_protocol::ClientId::new(alice.id.clone(), "evil".parse().unwrap());
    let forged = TestUser {
        id: alice.id.clone(),
        key: mallory.key,
    };
    let err = conn
        .call(add_client_request(&forged, &client, &keypair()))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::BAD_SIGNATURE);

    // A registration whose signature is not by the presented key.
    let other = keypair();
    let mut req = register_request(&"carol@example.org".parse().unwrap(), &keypair(), None);
    req.user_key = other.public().into();
    let err = conn.call(req).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::BAD_SIGNATURE);

    // Another domain's user cannot be registered here.
    let err = conn
        .call(register_request(
            &"dave@elsewhere.test".parse().unwrap(),
            &keypair(),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::FORBIDDEN);

    // A key that is not 32 bytes.
    let mut req = register_request(&"erin@example.org".parse().unwrap(), &keypair(), None);
    req.user_key = vec![1u8; 31].into();
    let err = conn.call(req).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::BAD_KEY);
    server.shutdown().await;
}

#[tokio::test]
async fn forged_and_replayed_connection_signatures_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let first = connect(&server).await;
    let alice = register(&first, "alice").await;
    let phone = add_client(&first, &alice, "phone").await;

    // Signed with the wrong key.
    let err = first
        .authenticate(&phone.id, |input| sign(&keypair(), input))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::BAD_SIGNATURE);

    // A valid signature made for the first connection, replayed on a second one.
    let replayed = sign(&phone.key, &first.auth_signing_input(&phone.id).unwrap());
    let second = connect(&server).await;
    let err = second
        .call(AuthenticateRequest {
            client: phone.id.clone(),
            signature: replayed.clone().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::BAD_SIGNATURE);

    // Both connections stay usable: the genuine signatures work.
    first
        .call(AuthenticateRequest {
            client: phone.id.clone(),
            signature: replayed.into(),
        })
        .await
        .unwrap();
    login(&second, &phone).await;
    second
        .call(roost_protocol::messages::queue::QueueFetchRequest {
            after_seq: 0,
            max_messages: 10,
            max_bytes: 1024,
        })
        .await
        .unwrap();

    // A connection cannot switch to another client.
    let laptop = add_client(&first, &alice, "laptop").await;
    let err = first
        .authenticate(&laptop.id, |input| sign(&laptop.key, input))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::ALREADY_AUTHENTICATED);
    server.shutdown().await;
}

#[tokio::test]
async fn registration_tokens_gate_registration() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.require_registration_token = true;
    let token = roost_server::create_registration_token(dir.path(), 1).unwrap();
    let server = start(cfg).await;
    let conn = connect(&server).await;
    let err = conn
        .call(register_request(
            &"alice@example.org".parse().unwrap(),
            &keypair(),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::REGISTRATION_TOKEN_REQUIRED);
    let err = conn
        .call(register_request(
            &"alice@example.org".parse().unwrap(),
            &keypair(),
            Some("guessed"),
        ))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::REGISTRATION_TOKEN_REQUIRED);
    conn.call(register_request(
        &"alice@example.org".parse().unwrap(),
        &keypair(),
        Some(&token),
    ))
    .await
    .unwrap();
    // Single use.
    let err = conn
        .call(register_request(
            &"bob@example.org".parse().unwrap(),
            &keypair(),
            Some(&token),
        ))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::REGISTRATION_TOKEN_REQUIRED);
    server.shutdown().await;
}

#[tokio::test]
async fn registrations_are_rate_limited_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.registration_burst = 2;
    cfg.limits.registration_rate_per_minute = 1;
    let server = start(cfg).await;
    let conn = connect(&server).await;
    register(&conn, "a1").await;
    register(&conn, "a2").await;
    let err = conn
        .call(register_request(
            &"a3@example.org".parse().unwrap(),
            &keypair(),
            None,
        ))
        .await
        .unwrap_err();
    let wire = err.wire_error().unwrap();
    assert_eq!(wire.code, ErrorCode::RATE_LIMITED);
    assert!(
        matches!(wire.detail, roost_protocol::ErrorDetail::RateLimited { retry_after_ms } if retry_after_ms > 0)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_removed_clients_open_connections_stop_working() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (alice, phone, conn) = new_client(&server, "alice").await;
    let fetch = roost_protocol::messages::queue::QueueFetchRequest {
        after_seq: 0,
        max_messages: 0,
        max_bytes: 0,
    };
    let head = conn.call(fetch.clone()).await.unwrap();
    assert!(head.messages.is_empty());
    let admin = connect(&server).await;
    admin
        .call(remove_client_request(&alice, &phone.id))
        .await
        .unwrap();
    let err = conn.call(fetch).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::CLIENT_NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn credentials_are_renewed_when_half_their_validity_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.credential_validity_secs = 3600;
    let clock = ManualClock::new();
    let server = start_with_clock(cfg, &clock).await;
    let conn = connect(&server).await;
    let alice = register(&conn, "alice").await;
    let phone = add_client(&conn, &alice, "phone").await;
    // Fresh: authentication returns the issued credential.
    let first = conn
        .authenticate(&phone.id, |i| sign(&phone.key, i))
        .await
        .unwrap();
    assert_eq!(first.credential, phone.credential);
    // With just over half of the validity left, nothing changes yet.
    clock.advance(std::time::Duration::from_secs(1799));
    let early = connect(&server).await;
    let same = early
        .authenticate(&phone.id, |i| sign(&phone.key, i))
        .await
        .unwrap();
    assert_eq!(same.credential, phone.credential);
    clock.advance(std::time::Duration::from_secs(2));
    let later = connect(&server).await;
    let renewed = later
        .authenticate(&phone.id, |i| sign(&phone.key, i))
        .await
        .unwrap();
    assert!(renewed.credential.not_after > phone.credential.not_after);
    assert_eq!(
        renewed.credential.not_after - renewed.credential.not_before,
        3600
    );
    assert_eq!(
        renewed.credential.signature_key,
        phone.credential.signature_key
    );
    // Discovery hands out the renewed one.
    let found = later
        .call(DiscoverUserRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(found.clients, vec![renewed.credential]);
    server.shutdown().await;
}

/// The code and reason of a refused request.
fn refusal(err: roost_client::transport::RequestError) -> (ErrorCode, String) {
    let wire = err.wire_error().expect("a server error");
    (
        wire.code,
        String::from_utf8_lossy(wire.reason.as_slice()).into_owned(),
    )
}

#[tokio::test]
async fn unauthenticated_client_changes_do_not_reveal_whether_a_user_exists() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let conn = connect(&server).await;
    let alice = register(&conn, "alice").await;
    let phone = add_client(&conn, &alice, "phone").await;

    // A stranger's key, once for alice and once for a user that does not exist.
    let guess = |id: &str| TestUser {
        id: id.parse().unwrap(),
        key: keypair(),
    };
    let (existing, unknown) = (guess("alice@example.org"), guess("nobody@example.org"));
    let device = |user: &TestUser, name: &str| {
        roost_protocol::ClientId::new(user.id.clone(), name.parse().unwrap())
    };

    let add_existing = conn
        .call(add_client_request(
            &existing,
            &device(&existing, "evil"),
            &keypair(),
        ))
        .await
        .unwrap_err();
    let add_unknown = conn
        .call(add_client_request(
            &unknown,
            &device(&unknown, "evil"),
            &keypair(),
        ))
        .await
        .unwrap_err();
    let add_existing = refusal(add_existing);
    assert_eq!(add_existing.0, ErrorCode::BAD_SIGNATURE);
    assert_eq!(add_existing, refusal(add_unknown));

    // RemoveClient: an existing device, an unknown device of alice, a device of nobody.
    let mut answers = Vec::new();
    for (user, name) in [
        (&existing, "phone"),
        (&existing, "tablet"),
        (&unknown, "phone"),
    ] {
        let err = conn
            .call(remove_client_request(user, &device(user, name)))
            .await
            .unwrap_err();
        answers.push(refusal(err));
    }
    assert_eq!(answers[0].0, ErrorCode::BAD_SIGNATURE);
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");

    // Only alice's own signature learns that a device does not exist; the phone is intact.
    let err = conn
        .call(remove_client_request(&alice, &device(&existing, "tablet")))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::CLIENT_NOT_FOUND);
    login(&conn, &phone).await;
    server.shutdown().await;
}

#[tokio::test]
async fn devices_per_user_are_capped_and_removed_ones_do_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_clients_per_user = 2;
    let server = start(cfg).await;
    let conn = connect(&server).await;
    let alice = register(&conn, "alice").await;
    let phone = add_client(&conn, &alice, "phone").await;
    add_client(&conn, &alice, "laptop").await;
    let tablet = roost_protocol::ClientId::new(alice.id.clone(), "tablet".parse().unwrap());
    let err = conn
        .call(add_client_request(&alice, &tablet, &keypair()))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::LIMIT_EXCEEDED);
    // Another user has a cap of their own.
    let bob = register(&conn, "bob").await;
    add_client(&conn, &bob, "phone").await;
    // A removed device frees its place (its name stays used).
    conn.call(remove_client_request(&alice, &phone.id))
        .await
        .unwrap();
    add_client(&conn, &alice, "tablet").await;
    let err = conn
        .call(add_client_request(&alice, &phone.id, &keypair()))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::LIMIT_EXCEEDED);
    server.shutdown().await;
}

#[tokio::test]
async fn add_client_is_rate_limited_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.add_client_burst = 3;
    cfg.limits.add_client_rate_per_hour = 1;
    let server = start(cfg).await;
    let conn = connect(&server).await;
    let alice = register(&conn, "alice").await;
    for device in ["d1", "d2", "d3"] {
        add_client(&conn, &alice, device).await;
    }
    let d4 = roost_protocol::ClientId::new(alice.id.clone(), "d4".parse().unwrap());
    let err = conn
        .call(add_client_request(&alice, &d4, &keypair()))
        .await
        .unwrap_err();
    let wire = err.wire_error().unwrap();
    assert_eq!(wire.code, ErrorCode::RATE_LIMITED);
    assert!(matches!(
        wire.detail,
        roost_protocol::ErrorDetail::RateLimited { retry_after_ms } if retry_after_ms > 60_000
    ));
    // Requests without alice's signature neither use up nor see her budget.
    let forged = TestUser {
        id: alice.id.clone(),
        key: keypair(),
    };
    let err = conn
        .call(add_client_request(&forged, &d4, &keypair()))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::BAD_SIGNATURE);
    // Other users are not affected.
    let bob = register(&conn, "bob").await;
    add_client(&conn, &bob, "phone").await;
    server.shutdown().await;
}
