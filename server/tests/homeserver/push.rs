//! Push notifications end to end: a real homeserver over QUIC, and a local HTTPS push service
//! (`push_receiver`) trusted through a test CA in the configuration. Every address is on
//! 127.0.0.0/8; the configuration forbids 127.0.0.2/32 so that the SSRF refusal is tested on
//! loopback too.

use std::time::Duration;

use roost_client::transport::Connection;
use roost_protocol::messages::push::*;
use roost_protocol::messages::queue::{GroupMessage, ListenEvent, QueuePayload};
use roost_protocol::{ErrorCode, GroupId, MessageId, Opaque};
use roost_server::config::Config;

use crate::common::*;
use crate::push_receiver::*;

fn payload(n: u8) -> QueuePayload {
    let group: GroupId = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .unwrap();
    QueuePayload::GroupMessage(GroupMessage {
        group,
        message: vec![n; 10].into(),
    })
}

fn id(tag: u8, n: u8) -> MessageId {
    let mut id = [n; 16];
    id[0] = tag;
    MessageId(id)
}

fn code(err: roost_client::transport::RequestError) -> ErrorCode {
    err.wire_error().expect("a wire error").code
}

/// A configuration that trusts the receiver's CA and forbids 127.0.0.2 (instead of all of
/// loopback, as the defaults do).
fn push_config(dir: &std::path::Path, receiver: &Receiver) -> Config {
    let mut config = config(dir);
    config.push.ca_file = Some(receiver.ca_file.clone());
    config.push.forbidden_ranges = vec!["127.0.0.2/32".into(), "10.0.0.0/8".into()];
    config.push.delay_ms = 100;
    config.push.coalesce_ms = 3_000;
    config.push.poll_ms = 50;
    config.push.retry_initial_ms = 200;
    config.push.retry_max_ms = 1_000;
    config.push.request_timeout_ms = 5_000;
    config
}

fn web_push(receiver: &Receiver, subscriber: &Subscriber, path: &str) -> RegisterPushRequest {
    RegisterPushRequest {
        endpoint: PushEndpoint::WebPush(WebPushSubscription {
            endpoint: Opaque::from(receiver.url(path).into_bytes()),
            p256dh: subscriber.public().into(),
            auth: Opaque::from(&subscriber.auth[..]),
        }),
    }
}

/// Checks one Web Push request as a push service and the user agent would: the VAPID token
/// (signed by the server's advertised key, for this origin), the headers, and the payload,
/// which decrypts with the subscription's keys to the bare wake-up marker.
fn check_web_push(got: &Received, subscriber: &Subscriber, vapid_key: &[u8], receiver: &Receiver) {
    assert_eq!(got.header("content-encoding"), "aes128gcm");
    assert!(got.header("ttl").parse::<u32>().unwrap() > 0);
    let auth = got.header("authorization");
    let rest = auth
        .strip_prefix("vapid t=")
        .expect("a VAPID authorization");
    let (jwt, k) = rest.split_once(", k=").expect("t and k");
    assert_eq!(k, b64(vapid_key), "k is the key PushInfo advertises");
    let (header, claims) = verify_jwt(jwt, vapid_key);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(claims["aud"], format!("https://{}", receiver.addr));
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        exp > now_secs() && exp <= now_secs() + 24 * 3600,
        "exp {exp}"
    );
    assert_eq!(claims["sub"], "mailto:postmaster@example.org");
    // No content, no sender: the plaintext is the fixed marker only.
    assert_eq!(subscriber.decrypt(&got.body), b"wake");
}

async fn vapid_key(conn: &Connection) -> Vec<u8> {
    let info = conn.call(PushInfoRequest {}).await.unwrap();
    assert_eq!((info.apns, info.fcm), (0, 0));
    assert_eq!(info.vapid_public_key.len(), 65);
    info.vapid_public_key.as_slice().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_listener_gets_one_web_push_wake_up_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let server = start(push_config(dir.path(), &receiver)).await;
    let (_bob, phone, conn) = new_client(&server, "bob").await;
    let key = vapid_key(&conn).await;
    let subscriber = Subscriber::new();
    conn.call(web_push(&receiver, &subscriber, "/push/bob-phone"))
        .await
        .unwrap();
    drop(conn);

    // A burst of messages: one wake-up.
    for n in 1..=5 {
        server
            .enqueue(&phone.id, id(1, n), payload(n))
            .await
            .unwrap();
    }
    let got = receiver.wait_for(1, 10).await;
    assert_eq!(got[0].path, "/push/bob-phone");
    check_web_push(&got[0], &subscriber, &key, &receiver);
    let first = got[0].at;

    // More messages within the interval wait for its end: nothing before, exactly one after.
    server
        .enqueue(&phone.id, id(1, 6), payload(6))
        .await
        .unwrap();
    server
        .enqueue(&phone.id, id(1, 7), payload(7))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "a second wake-up within the interval"
    );
    let got = receiver.wait_for(2, 10).await;
    assert!(
        got[1].at.duration_since(first) >= Duration::from_millis(2_900),
        "second wake-up {:?} after the first",
        got[1].at.duration_since(first)
    );
    check_web_push(&got[1], &subscriber, &key, &receiver);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(receiver.received().len(), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_listens_or_has_fetched_everything_gets_no_wake_up() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let server = start(push_config(dir.path(), &receiver)).await;
    let (_carol, phone, conn) = new_client(&server, "carol").await;
    let subscriber = Subscriber::new();
    conn.call(web_push(&receiver, &subscriber, "/push/carol"))
        .await
        .unwrap();

    // Listening: messages arrive on the stream, no wake-up.
    let mut stream = conn.listen(0).await.unwrap();
    for n in 1..=3 {
        server
            .enqueue(&phone.id, id(2, n), payload(n))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(ListenEvent::Message(m)))) => assert_eq!(m.seq, u64::from(n)),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        receiver.received().is_empty(),
        "a listening client was woken"
    );

    // Not listening any more but everything acknowledged before the delay: no wake-up.
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server_config_delay = Duration::from_millis(100);
    let seq = server
        .enqueue(&phone.id, id(2, 9), payload(9))
        .await
        .unwrap();
    conn.call(roost_protocol::messages::queue::QueueAckRequest { up_to_seq: seq })
        .await
        .unwrap();
    tokio::time::sleep(server_config_delay * 10).await;
    assert!(
        receiver.received().is_empty(),
        "woken for acknowledged messages"
    );

    // Once it is away, the next message wakes it.
    server
        .enqueue(&phone.id, id(2, 10), payload(10))
        .await
        .unwrap();
    receiver.wait_for(1, 10).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_subscription_is_dropped_on_410() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    receiver.answer(410);
    let server = start(push_config(dir.path(), &receiver)).await;
    let (_dave, phone, conn) = new_client(&server, "dave").await;
    let subscriber = Subscriber::new();
    conn.call(web_push(&receiver, &subscriber, "/push/dave"))
        .await
        .unwrap();
    server
        .enqueue(&phone.id, id(3, 1), payload(1))
        .await
        .unwrap();
    receiver.wait_for(1, 10).await;
    // The registration is gone: later messages wake nobody (with it, the next wake-up would
    // be due 100 ms after the message: the first one was not sent, so no interval runs), and
    // unregistering finds nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    receiver.answer(201);
    server
        .enqueue(&phone.id, id(3, 2), payload(2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        conn.call(UnregisterPushRequest {}).await.unwrap().removed,
        0
    );
    assert_eq!(receiver.received().len(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_that_failed_before_a_restart_is_sent_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    receiver.answer(503);
    let data = dir.path().join("data");
    let server = start(push_config(&data, &receiver)).await;
    let (_erin, phone, conn) = new_client(&server, "erin").await;
    let subscriber = Subscriber::new();
    conn.call(web_push(&receiver, &subscriber, "/push/erin"))
        .await
        .unwrap();
    let key = vapid_key(&conn).await;
    drop(conn);
    server
        .enqueue(&phone.id, id(4, 1), payload(1))
        .await
        .unwrap();
    // The push service is down: the wake-up is retried, not lost.
    receiver.wait_for(2, 10).await;
    server.shutdown().await;

    let tried = receiver.received().len();
    receiver.answer(201);
    let server = start(push_config(&data, &receiver)).await;
    let got = receiver.wait_for(tried + 1, 10).await;
    let last = got.last().unwrap();
    assert_eq!(last.path, "/push/erin");
    // The same keys after the restart (kept with the identity files).
    check_web_push(last, &subscriber, &key, &receiver);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        receiver.received().len(),
        tried + 1,
        "sent once it succeeded"
    );
    server.shutdown().await;
}

/// The node stops right after a message was committed to the queue and before the wake-up
/// reached the push outbox (the fault point drops that in-memory hand-over; the graceful stop
/// that follows cannot bring it back). The next start finds it: exactly one wake-up, and the
/// coalescing interval holds across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_lost_by_a_stop_after_the_enqueue_is_sent_after_restart_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let data = dir.path().join("data");
    let server = start(push_config(&data, &receiver)).await;
    let (_ivan, phone, conn) = new_client(&server, "ivan").await;
    let key = vapid_key(&conn).await;
    let subscriber = Subscriber::new();
    conn.call(web_push(&receiver, &subscriber, "/push/ivan"))
        .await
        .unwrap();
    drop(conn);
    roost_server::testing::lose_push_handovers(&server);
    for n in 1..=3 {
        server
            .enqueue(&phone.id, id(10, n), payload(n))
            .await
            .unwrap();
    }
    // The fault point works: this node never sends it (its periodic sweep, at the default
    // minute, does not run within the test).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(receiver.received().is_empty(), "the hand-over was not lost");
    server.shutdown().await;

    let mut config = push_config(&data, &receiver);
    config.push.recover_ms = 300;
    let server = start(config).await;
    let got = receiver.wait_for(1, 10).await;
    assert_eq!(got[0].path, "/push/ivan");
    check_web_push(&got[0], &subscriber, &key, &receiver);
    let first = got[0].at;
    // The three messages are still queued (never fetched): the sweeps that follow, every
    // 300 ms, do not wake the client again for them.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "woken twice for the same messages"
    );
    // A new message within the interval: one more wake-up, at the end of the interval.
    server
        .enqueue(&phone.id, id(10, 4), payload(4))
        .await
        .unwrap();
    let got = receiver.wait_for(2, 10).await;
    assert!(
        got[1].at.duration_since(first) >= Duration::from_millis(2_900),
        "second wake-up {:?} after the first",
        got[1].at.duration_since(first)
    );
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(receiver.received().len(), 2);
    server.shutdown().await;
}

/// A push service that answers 429 or 503 with `Retry-After` is tried again after that long
/// (delay-seconds or an HTTP date), not after the configured backoff (200 ms here), and no
/// later than `retry_after_max_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_from_the_push_service_is_honoured_within_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let mut config = push_config(dir.path(), &receiver);
    config.push.retry_after_max_ms = 1_500;
    let server = start(config).await;
    let date = |secs: u64| {
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(secs))
    };
    // (status, Retry-After (None: a date 2 s ahead), earliest, latest second attempt after
    // the first, ms)
    let cases = [
        (429, Some("1"), 950, 1_400),
        (503, None, 950, 2_400),
        (503, Some("3600"), 1_450, 2_500),
    ];
    for (n, (status, value, earliest, latest)) in cases.into_iter().enumerate() {
        let before = receiver.received().len();
        let name = format!("mia{n}");
        let (_user, phone, conn) = new_client(&server, &name).await;
        let subscriber = Subscriber::new();
        let path = format!("/push/{name}");
        conn.call(web_push(&receiver, &subscriber, &path))
            .await
            .unwrap();
        drop(conn);
        let value = value.map_or_else(|| date(2), str::to_owned);
        receiver.answer(status);
        receiver.retry_after(Some(&value));
        server
            .enqueue(&phone.id, id(12, n as u8), payload(1))
            .await
            .unwrap();
        receiver.wait_for(before + 1, 10).await;
        receiver.answer(201);
        receiver.retry_after(None);
        let got = receiver.wait_for(before + 2, 10).await;
        let (first, second) = (&got[before], &got[before + 1]);
        assert_eq!(
            (first.path.as_str(), second.path.as_str()),
            (&*path, &*path)
        );
        let waited = second.at.duration_since(first.at);
        assert!(
            waited >= Duration::from_millis(earliest) && waited <= Duration::from_millis(latest),
            "{status} with Retry-After {value}: tried again after {waited:?}"
        );
        // Sent: no third attempt.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(receiver.received().len(), before + 2);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoints_are_refused_before_any_connection_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let server = start(push_config(dir.path(), &receiver)).await;
    let (_frank, phone, conn) = new_client(&server, "frank").await;
    let subscriber = Subscriber::new();
    // A listener on the forbidden address: it must never see a connection.
    let trap = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let with_url = |url: String| RegisterPushRequest {
        endpoint: PushEndpoint::WebPush(WebPushSubscription {
            endpoint: url.into_bytes().into(),
            p256dh: subscriber.public().into(),
            auth: Opaque::from(&subscriber.auth[..]),
        }),
    };
    let rejected = [
        with_url(format!("https://127.0.0.2:{trap_port}/push")),
        with_url(format!("http://{}/push", receiver.addr)),
        with_url(format!("https://10.1.2.3:{trap_port}/push")),
        with_url("https://user@127.0.0.1/push".into()),
        with_url("not a url".into()),
        RegisterPushRequest {
            endpoint: PushEndpoint::WebPush(WebPushSubscription {
                endpoint: receiver.url("/push").into_bytes().into(),
                p256dh: Opaque::from(&[4u8; 10][..]),
                auth: Opaque::from(&subscriber.auth[..]),
            }),
        },
        RegisterPushRequest {
            endpoint: PushEndpoint::WebPush(WebPushSubscription {
                endpoint: Opaque::from(&[0xff, 0xfe][..]),
                p256dh: subscriber.public().into(),
                auth: Opaque::from(&subscriber.auth[..]),
            }),
        },
    ];
    for request in rejected {
        let err = conn.call(request).await.unwrap_err();
        assert_eq!(code(err), ErrorCode::PUSH_ENDPOINT_REJECTED);
    }
    // Providers this server does not send to.
    let err = conn
        .call(RegisterPushRequest {
            endpoint: PushEndpoint::Apns(ApnsToken {
                device_token: Opaque::from(&[1u8; 32][..]),
                topic: Opaque::from(&b"org.example.app"[..]),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::PUSH_PROVIDER_DISABLED);
    // Unauthenticated.
    let anon = connect(&server).await;
    let err = anon
        .call(web_push(&receiver, &subscriber, "/push"))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::UNAUTHENTICATED);

    // Nothing was stored: a message wakes nobody; the connection still works.
    assert_eq!(
        conn.call(UnregisterPushRequest {}).await.unwrap().removed,
        0
    );
    server
        .enqueue(&phone.id, id(5, 1), payload(1))
        .await
        .unwrap();
    let accepted = tokio::time::timeout(Duration::from_millis(1_000), trap.accept()).await;
    assert!(
        accepted.is_err(),
        "a connection reached the forbidden address"
    );
    assert!(receiver.received().is_empty());
    server.shutdown().await;
}

/// A configuration with APNs sending to the receiver; the provider token's signing key.
fn apns_config(dir: &std::path::Path, receiver: &Receiver) -> (Config, rcgen::KeyPair) {
    let apns_key = rcgen::KeyPair::generate().unwrap();
    let key_file = dir.join("AuthKey_ABC123.p8");
    std::fs::write(&key_file, apns_key.serialize_pem()).unwrap();
    let mut config = push_config(dir, receiver);
    config.push.apns_key_file = Some(key_file);
    config.push.apns_key_id = Some("ABC123".into());
    config.push.apns_team_id = Some("TEAM456".into());
    config.push.apns_url = receiver.url("");
    (config, apns_key)
}

/// Turns FCM on, sending to the receiver under `/fcm`.
fn with_fcm(config: &mut Config, dir: &std::path::Path, receiver: &Receiver) {
    let token_file = dir.join("fcm-token");
    std::fs::write(&token_file, "ya29.test-access-token\n").unwrap();
    config.push.fcm_project_id = Some("roost-test".into());
    config.push.fcm_access_token_file = Some(token_file);
    config.push.fcm_url = receiver.url("/fcm");
}

async fn register_apns(conn: &Connection, device_token: &[u8]) {
    conn.call(RegisterPushRequest {
        endpoint: PushEndpoint::Apns(ApnsToken {
            device_token: Opaque::from(device_token),
            topic: Opaque::from(&b"org.example.roost"[..]),
        }),
    })
    .await
    .unwrap();
}

/// APNs wake-ups to several devices go over one HTTP/2 connection, kept open between them;
/// when APNs closes it, the next wake-up opens a new one and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_wake_ups_share_one_connection_that_is_replaced_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let (config, _key) = apns_config(dir.path(), &receiver);
    let server = start(config).await;
    let mut phones = Vec::new();
    for n in 0..5u8 {
        let (_user, phone, conn) = new_client(&server, &format!("nina{n}")).await;
        register_apns(&conn, &[0xa0 + n, 1, 2, 3]).await;
        phones.push(phone);
    }
    // Four devices, one after the other and two at once.
    for (n, phone) in phones.iter().take(2).enumerate() {
        server
            .enqueue(&phone.id, id(13, n as u8), payload(1))
            .await
            .unwrap();
        receiver.wait_for(n + 1, 10).await;
    }
    for (n, phone) in phones.iter().enumerate().take(4).skip(2) {
        server
            .enqueue(&phone.id, id(13, n as u8), payload(1))
            .await
            .unwrap();
    }
    let got = receiver.wait_for(4, 10).await;
    assert!(got.iter().all(|r| r.version == hyper::Version::HTTP_2));
    let mut paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/3/device/a0010203",
            "/3/device/a1010203",
            "/3/device/a2010203",
            "/3/device/a3010203"
        ]
    );
    assert_eq!(
        receiver.connections(),
        1,
        "one connection for every wake-up"
    );

    // APNs closes the connection: the next wake-up reconnects.
    receiver.drop_connections();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server
        .enqueue(&phones[4].id, id(13, 4), payload(1))
        .await
        .unwrap();
    let got = receiver.wait_for(5, 10).await;
    assert_eq!(got[4].path, "/3/device/a4010203");
    assert_eq!(receiver.connections(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 5);
    server.shutdown().await;
}

/// FCM and Web Push wake-ups reuse one HTTP/2 connection per push service (FCM's endpoint,
/// each Web Push origin), one after the other and at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_and_web_push_wake_ups_reuse_one_connection_per_service() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let mut config = push_config(dir.path(), &receiver);
    with_fcm(&mut config, dir.path(), &receiver);
    let server = start(config).await;
    let mut devices = Vec::new();
    for n in 0..6u8 {
        let (_user, device, conn) = new_client(&server, &format!("ivan{n}")).await;
        let endpoint = if n % 2 == 0 {
            PushEndpoint::Fcm(FcmToken {
                token: Opaque::from(format!("fcm:token-{n}").into_bytes()),
            })
        } else {
            web_push(&receiver, &Subscriber::new(), &format!("/push/{n}")).endpoint
        };
        conn.call(RegisterPushRequest { endpoint }).await.unwrap();
        devices.push(device);
    }
    // Two of each, one after the other; then one of each at once.
    for (n, device) in devices.iter().take(4).enumerate() {
        server
            .enqueue(&device.id, id(14, n as u8), payload(1))
            .await
            .unwrap();
        receiver.wait_for(n + 1, 10).await;
    }
    for (n, device) in devices.iter().enumerate().skip(4) {
        server
            .enqueue(&device.id, id(14, n as u8), payload(1))
            .await
            .unwrap();
    }
    let got = receiver.wait_for(6, 10).await;
    assert!(got.iter().all(|r| r.version == hyper::Version::HTTP_2));
    let fcm = got.iter().filter(|r| r.path.starts_with("/fcm/")).count();
    let web_push = got.iter().filter(|r| r.path.starts_with("/push/")).count();
    assert_eq!((fcm, web_push), (3, 3));
    assert_eq!(
        receiver.connections(),
        2,
        "one connection for FCM, one for the Web Push origin"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 6);
    server.shutdown().await;
}

/// A push service that offers no HTTP/2 still gets every wake-up, over HTTP/1.1 on a
/// connection per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_service_without_http2_gets_its_wake_ups_over_http1() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start_http1_only(dir.path()).await;
    let server = start(push_config(dir.path(), &receiver)).await;
    let mut devices = Vec::new();
    for n in 0..2u8 {
        let (_user, device, conn) = new_client(&server, &format!("judy{n}")).await;
        let key = vapid_key(&conn).await;
        let subscriber = Subscriber::new();
        conn.call(web_push(&receiver, &subscriber, &format!("/push/{n}")))
            .await
            .unwrap();
        devices.push((device, subscriber, key));
    }
    for (n, (device, subscriber, key)) in devices.iter().enumerate() {
        server
            .enqueue(&device.id, id(15, n as u8), payload(1))
            .await
            .unwrap();
        let got = receiver.wait_for(n + 1, 10).await;
        assert_eq!(got[n].version, hyper::Version::HTTP_11);
        assert_eq!(got[n].path, format!("/push/{n}"));
        check_web_push(&got[n], subscriber, key, &receiver);
    }
    assert_eq!(receiver.connections(), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_and_fcm_requests_have_their_shape_and_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let (mut config, apns_key) = apns_config(dir.path(), &receiver);
    with_fcm(&mut config, dir.path(), &receiver);
    let server = start(config).await;

    let (_g, ios, ios_conn) = new_client(&server, "grace").await;
    let info = ios_conn.call(PushInfoRequest {}).await.unwrap();
    assert_eq!((info.apns, info.fcm), (1, 1));
    register_apns(&ios_conn, &[0xab, 0xcd, 0x01, 0x02]).await;
    let (_h, android, android_conn) = new_client(&server, "heidi").await;
    android_conn
        .call(RegisterPushRequest {
            endpoint: PushEndpoint::Fcm(FcmToken {
                token: Opaque::from(&b"fcm:registration-token-1"[..]),
            }),
        })
        .await
        .unwrap();

    server.enqueue(&ios.id, id(6, 1), payload(1)).await.unwrap();
    let got = receiver.wait_for(1, 10).await;
    let apns = &got[0];
    assert_eq!(apns.version, hyper::Version::HTTP_2, "APNs speaks HTTP/2");
    assert_eq!(apns.path, "/3/device/abcd0102");
    assert_eq!(apns.header("apns-topic"), "org.example.roost");
    assert_eq!(apns.header("apns-push-type"), "background");
    assert_eq!(apns.header("apns-priority"), "5");
    let bearer = apns
        .header("authorization")
        .strip_prefix("bearer ")
        .unwrap();
    let (header, claims) = verify_jwt(bearer, apns_key.public_key_raw());
    assert_eq!(
        (header["alg"].as_str(), header["kid"].as_str()),
        (Some("ES256"), Some("ABC123"))
    );
    assert_eq!(claims["iss"], "TEAM456");
    assert!(claims["iat"].as_u64().unwrap().abs_diff(now_secs()) < 120);
    let body: serde_json::Value = serde_json::from_slice(&apns.body).unwrap();
    assert_eq!(body, serde_json::json!({"aps": {"content-available": 1}}));

    server
        .enqueue(&android.id, id(6, 2), payload(2))
        .await
        .unwrap();
    let got = receiver.wait_for(2, 10).await;
    let fcm = &got[1];
    assert_eq!(fcm.path, "/fcm/v1/projects/roost-test/messages:send");
    assert_eq!(fcm.header("authorization"), "Bearer ya29.test-access-token");
    let body: serde_json::Value = serde_json::from_slice(&fcm.body).unwrap();
    assert_eq!(body["message"]["token"], "fcm:registration-token-1");
    assert_eq!(body["message"]["android"]["priority"], "HIGH");
    // Nothing but the marker: no content, no sender.
    assert_eq!(
        body["message"]["data"],
        serde_json::json!({"roost": "wake"})
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_registers_and_unregisters_push() {
    use roost_client::transport::{ConnectConfig, TrustConfig};
    use roost_client::{Client, ClientConfig, PushTarget};
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let server = start(push_config(&dir.path().join("data"), &receiver)).await;
    let trust = TrustConfig::PinnedCertificates(vec![server.certificate().clone()]);
    let config = || {
        ClientConfig::new(ConnectConfig::new(
            server.local_addr(),
            DOMAIN,
            trust.clone(),
        ))
    };
    let profile = dir.path().join("judy.roost");
    let client = Client::register(
        config(),
        &profile,
        "judy@example.org".parse().unwrap(),
        "phone".parse().unwrap(),
    )
    .await
    .unwrap();
    let info = client.push_info().await.unwrap();
    assert_eq!((info.apns, info.fcm), (false, false));
    let subscriber = Subscriber::new();
    // What a browser's PushSubscription.toJSON() gives the app.
    let json = format!(
        r#"{{"endpoint":"{}","expirationTime":null,"keys":{{"p256dh":"{}","auth":"{}"}}}}"#,
        receiver.url("/push/judy"),
        b64(&subscriber.public()),
        b64(&subscriber.auth)
    );
    client
        .register_push(PushTarget::from_web_push_json(&json).unwrap())
        .await
        .unwrap();
    let err = client
        .register_push(PushTarget::Fcm {
            token: "abc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::PUSH_PROVIDER_DISABLED));
    // The app is suspended: its listener is gone, a message wakes it.
    client.close().await;
    let phone = "judy@example.org/phone".parse().unwrap();
    server.enqueue(&phone, id(8, 1), payload(1)).await.unwrap();
    let got = receiver.wait_for(1, 10).await;
    check_web_push(&got[0], &subscriber, &info.vapid_public_key, &receiver);

    // Unregistered: no more wake-ups.
    let client = Client::open(config(), &profile).await.unwrap();
    assert!(client.unregister_push().await.unwrap());
    assert!(!client.unregister_push().await.unwrap());
    client.close().await;
    server.enqueue(&phone, id(8, 2), payload(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(receiver.received().len(), 1);
    server.shutdown().await;
}

/// The configuration of node `n` of a domain on PostgreSQL at `url`: its own data directory
/// under `dir`, the identity (and so the VAPID key) shared by every node.
fn postgres_node(dir: &std::path::Path, receiver: &Receiver, url: &str, n: usize) -> Config {
    use roost_server::config::StorageBackend;
    let mut config = push_config(&dir.join(format!("node{n}")), receiver);
    config.identity_dir = Some(dir.join("identity"));
    config.storage.backend = StorageBackend::Postgres;
    config.storage.url = Some(url.to_owned());
    config.storage.pool_size = 4;
    config.storage.timeout_ms = 3_000;
    config
}

/// Two nodes of one domain on PostgreSQL: a message committed on one node wakes a client
/// that registered through the other, exactly once per interval, whichever node sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_nodes_a_message_on_either_wakes_the_client_once() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let cluster = roost_interop::postgres::Cluster::start().expect("a PostgreSQL cluster");
    let url = cluster.create_database("roost").unwrap();
    let node = |n: usize| postgres_node(dir.path(), &receiver, &url, n);
    let a = start(node(0)).await;
    let b = start(node(1)).await;
    let (_kim, phone, conn) = new_client(&a, "kim").await;
    let key = vapid_key(&conn).await;
    let subscriber = Subscriber::new();
    conn.call(web_push(&receiver, &subscriber, "/push/kim"))
        .await
        .unwrap();
    drop(conn);
    // Messages land through both nodes; both nodes' workers poll the one outbox.
    for n in 1..=3 {
        let node = if n % 2 == 0 { &a } else { &b };
        node.enqueue(&phone.id, id(9, n), payload(n)).await.unwrap();
    }
    let got = receiver.wait_for(1, 10).await;
    // The same VAPID key on both nodes (shared identity directory).
    check_web_push(&got[0], &subscriber, &key, &receiver);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "woken more than once within the interval"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Two nodes on PostgreSQL: node A commits messages for a client and stops before handing
/// the wake-up to the push outbox. Node B, still running, finds the lost wake-up in its next
/// sweep and sends it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_nodes_a_wake_up_lost_by_one_is_sent_by_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let cluster = roost_interop::postgres::Cluster::start().expect("a PostgreSQL cluster");
    let url = cluster.create_database("roost").unwrap();
    let node = |n: usize| postgres_node(dir.path(), &receiver, &url, n);
    let a = start(node(0)).await;
    let mut config_b = node(1);
    config_b.push.recover_ms = 500;
    let b = start(config_b).await;
    let (_lena, phone, conn) = new_client(&a, "lena").await;
    let key = vapid_key(&conn).await;
    let subscriber = Subscriber::new();
    conn.call(web_push(&receiver, &subscriber, "/push/lena"))
        .await
        .unwrap();
    drop(conn);
    roost_server::testing::lose_push_handovers(&a);
    let sent = std::time::Instant::now();
    for n in 1..=2 {
        a.enqueue(&phone.id, id(11, n), payload(n)).await.unwrap();
    }
    a.shutdown().await;
    let got = receiver.wait_for(1, 10).await;
    check_web_push(&got[0], &subscriber, &key, &receiver);
    // B sweeps messages at least recover_ms old.
    assert!(got[0].at.duration_since(sent) >= Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(receiver.received().len(), 1, "woken twice");
    b.shutdown().await;
}
