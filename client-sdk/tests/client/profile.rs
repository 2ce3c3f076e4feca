//! Persistent profiles and KeyPackage management.

use roost_client::{Client, ClientError};
use roost_protocol::messages::keypackage::{ClaimClientKeyPackageRequest, KeyPackageKind};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_profile_continues_the_conversation() {
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;
    bob.send(&group, b"before").await.unwrap();
    assert_eq!(wait_message(&alice, &group).await.1, b"before");

    // Bob's app stops; alice writes meanwhile.
    bob.close().await;
    alice.send(&group, b"while you were away").await.unwrap();

    let bob = Client::open(t.client_config(), t.profile_path("bob-phone"))
        .await
        .unwrap();
    assert_eq!(bob.client_id(), &client_id("bob", "phone"));
    assert_eq!(bob.groups().unwrap(), vec![group.clone()]);
    let (from, bytes) = wait_message(&bob, &group).await;
    assert_eq!(
        (from, bytes),
        (client_id("alice", "phone"), b"while you were away".to_vec())
    );
    bob.send(&group, b"I am back").await.unwrap();
    assert_eq!(wait_message(&alice, &group).await.1, b"I am back");

    // The listener and explicit syncs see the same queue entries: each is applied once
    // (a second decryption would fail and show up as a GroupError event).
    let one = alice.send(&group, b"one").await.unwrap();
    alice.flush().await.unwrap();
    bob.sync().await.unwrap();
    bob.sync().await.unwrap();
    let two = alice.send(&group, b"two").await.unwrap();
    alice.flush().await.unwrap();
    bob.sync().await.unwrap();
    for (id, expected) in [(one, &b"one"[..]), (two, b"two")] {
        // Bob's own "I am back" was reported sent (Event::Outgoing): not what this checks.
        let event = loop {
            let event = tokio::time::timeout(EVENT_TIMEOUT, bob.next_event())
                .await
                .unwrap()
                .unwrap();
            if !matches!(event, roost_client::Event::Outgoing { .. }) {
                break event;
            }
        };
        assert_eq!(
            event,
            roost_client::Event::Message {
                group: group.clone(),
                sender: client_id("alice", "phone"),
                id: Some(id),
                bytes: expected.to_vec()
            }
        );
    }
}

/// Events come at least once: the one an app was handling when it stopped comes again from
/// the reopened profile, and its message id lets the app see that it showed it already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_being_handled_when_the_app_stopped_comes_again_with_its_message_id() {
    use roost_client::Event;
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;
    let first = alice.send(&group, b"first").await.unwrap();
    let second = alice.send(&group, b"second").await.unwrap();
    let is_message = |e: &Event| matches!(e, Event::Message { .. });
    let taken = wait_for(&bob, "the first message", is_message).await;
    assert_eq!(
        taken,
        Event::Message {
            group: group.clone(),
            sender: client_id("alice", "phone"),
            id: Some(first),
            bytes: b"first".to_vec(),
        }
    );
    // The app stops while handling it: it never asks for the next event.
    bob.close().await;
    let bob = Client::open(t.client_config(), t.profile_path("bob-phone"))
        .await
        .unwrap();
    assert_eq!(
        wait_for(&bob, "the first message again", is_message).await,
        taken
    );
    // Asking for the next one lets the first go for good.
    let next = wait_for(&bob, "the second message", is_message).await;
    assert!(
        matches!(&next, Event::Message { id, bytes, .. } if *id == Some(second) && bytes == b"second"),
        "{next:?}"
    );
    bob.close().await;
    let bob = Client::open(t.client_config(), t.profile_path("bob-phone"))
        .await
        .unwrap();
    assert_eq!(
        wait_for(&bob, "the second message again", is_message).await,
        next
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_not_overwritten_or_invented() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    // While alice's client holds the profile, a second one gets a typed refusal, and so does
    // a registration onto it.
    let twice = Client::open(t.client_config(), t.profile_path("alice-phone")).await;
    assert!(
        matches!(&twice, Err(ClientError::ProfileInUse(path)) if *path == t.profile_path("alice-phone")),
        "{:?}",
        twice.err()
    );
    let onto = Client::register(
        t.client_config(),
        t.profile_path("alice-phone"),
        user("alice3"),
        "phone".parse().unwrap(),
    )
    .await;
    assert!(matches!(onto, Err(ClientError::ProfileInUse(_))));
    // The first client is untouched.
    assert_eq!(alice.key_packages_remaining().await.unwrap(), (3, true));
    alice.close().await;
    let again = Client::register(
        t.client_config(),
        t.profile_path("alice-phone"),
        user("alice2"),
        "phone".parse().unwrap(),
    )
    .await;
    assert!(matches!(again, Err(ClientError::ProfileExists(_))));
    let missing = Client::open(t.client_config(), t.profile_path("nobody")).await;
    assert!(matches!(missing, Err(ClientError::NoProfile(_))));
    let wrong = Client::register(
        t.client_config(),
        t.profile_path("eve"),
        "eve@elsewhere.org".parse().unwrap(),
        "phone".parse().unwrap(),
    )
    .await;
    assert!(matches!(wrong, Err(ClientError::WrongDomain { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_are_replenished_and_a_last_resort_one_is_kept() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    assert_eq!(alice.key_packages_remaining().await.unwrap(), (3, true));

    // Someone claims them all: then the last-resort one is served, and not consumed.
    let (conn, _, _) = raw_client(&t, "mallory").await;
    for _ in 0..3 {
        let claimed = conn
            .call(ClaimClientKeyPackageRequest {
                client: client_id("alice", "phone"),
            })
            .await
            .unwrap();
        assert_eq!(claimed.key_package.kind, KeyPackageKind::Ordinary);
    }
    let claimed = conn
        .call(ClaimClientKeyPackageRequest {
            client: client_id("alice", "phone"),
        })
        .await
        .unwrap();
    assert_eq!(claimed.key_package.kind, KeyPackageKind::LastResort);
    assert_eq!(claimed.key_package.credential, *alice.credential());
    assert_eq!(alice.key_packages_remaining().await.unwrap(), (0, true));

    alice.refresh_key_packages().await.unwrap();
    assert_eq!(alice.key_packages_remaining().await.unwrap(), (3, true));
}
