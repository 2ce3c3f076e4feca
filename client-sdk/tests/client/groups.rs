//! Groups end to end: create, invite (including a user's other device), messages in every
//! direction, remove, leave, rejoin, and concurrent commits resolved by the retry.

use roost_client::Event;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_users_one_with_two_devices() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    let laptop = t.add_device(&alice, "laptop").await;
    let bob = t.register("bob").await;
    let carol = t.register("carol").await;

    let group = alice.create_group().await.unwrap();
    assert_eq!(alice.groups().unwrap(), vec![group.clone()]);
    let added = alice
        .invite(&group, &[user("bob"), user("carol"), user("alice")])
        .await
        .unwrap();
    assert_eq!(
        sorted(added),
        sorted(vec![
            client_id("bob", "phone"),
            client_id("carol", "phone"),
            client_id("alice", "laptop"),
        ])
    );
    for joiner in [&bob, &carol, &laptop] {
        assert_eq!(wait_joined(joiner).await, group);
    }
    let everyone = sorted(vec![
        client_id("alice", "phone"),
        client_id("alice", "laptop"),
        client_id("bob", "phone"),
        client_id("carol", "phone"),
    ]);
    assert_eq!(members(&bob, &group).await, everyone);
    assert_eq!(members(&laptop, &group).await, everyone);
    // One commit (the invite) since the group was created at epoch 0: everyone at epoch 1.
    for member in [&alice, &laptop, &bob, &carol] {
        assert_eq!(member.epoch(&group).await.unwrap(), 1);
    }

    // Every member sends; every other member, both of alice's devices included, receives.
    let clients = [&alice, &laptop, &bob, &carol];
    for (i, sender) in clients.iter().enumerate() {
        let text = format!("hello from {}", sender.client_id());
        sender.send(&group, text.as_bytes()).await.unwrap();
        for (j, receiver) in clients.iter().enumerate() {
            if i == j {
                continue;
            }
            let (from, bytes) = wait_message(receiver, &group).await;
            assert_eq!(&from, sender.client_id());
            assert_eq!(bytes, text.as_bytes());
        }
    }

    // Remove carol: she learns it, the others see her go.
    let removed = alice.remove_users(&group, &[user("carol")]).await.unwrap();
    assert_eq!(removed, vec![client_id("carol", "phone")]);
    let event = wait_for(&carol, "removed", |e| {
        matches!(e, Event::RemovedFromGroup { .. })
    })
    .await;
    assert_eq!(
        event,
        Event::RemovedFromGroup {
            group: group.clone(),
            by: client_id("alice", "phone")
        }
    );
    assert!(carol.groups().unwrap().is_empty());
    let event = wait_for(&bob, "members removed", |e| {
        matches!(e, Event::MembersRemoved { .. })
    })
    .await;
    assert_eq!(
        event,
        Event::MembersRemoved {
            group: group.clone(),
            by: client_id("alice", "phone"),
            members: vec![client_id("carol", "phone")]
        }
    );
    assert!(matches!(
        carol.send(&group, b"still here?").await,
        Err(roost_client::ClientError::UnknownGroup(_))
    ));
    // The removal is the second commit: the committer and bob (who processed it) are at
    // epoch 2; carol has no epoch of the group any more.
    assert_eq!(alice.epoch(&group).await.unwrap(), 2);
    assert_eq!(bob.epoch(&group).await.unwrap(), 2);
    assert!(matches!(
        carol.epoch(&group).await,
        Err(roost_client::ClientError::UnknownGroup(_))
    ));

    // Bob leaves: alice's phone (lowest leaf) commits his removal. Everyone is told it was a
    // leave: bob that he left, the laptop and alice's phone (the committer) that he left.
    bob.leave_group(&group).await.unwrap();
    let left = wait_for(&bob, "his leave committed", |e| {
        matches!(e, Event::LeftGroup { .. } | Event::RemovedFromGroup { .. })
    })
    .await;
    assert_eq!(
        left,
        Event::LeftGroup {
            group: group.clone(),
            by: client_id("alice", "phone")
        }
    );
    assert!(bob.groups().unwrap().is_empty());
    for member in [&laptop, &alice] {
        let bob_phone = client_id("bob", "phone");
        let told = wait_for(member, "bob left", |e| match e {
            Event::MembersLeft { members, .. } | Event::MembersRemoved { members, .. } => {
                members.contains(&bob_phone)
            }
            _ => false,
        })
        .await;
        assert_eq!(
            told,
            Event::MembersLeft {
                group: group.clone(),
                by: client_id("alice", "phone"),
                members: vec![client_id("bob", "phone")]
            }
        );
    }
    let remaining = sorted(vec![
        client_id("alice", "phone"),
        client_id("alice", "laptop"),
    ]);
    assert_eq!(members(&alice, &group).await, remaining);
    assert_eq!(members(&laptop, &group).await, remaining);

    // The two remaining devices still talk.
    laptop.send(&group, b"just us").await.unwrap();
    assert_eq!(wait_message(&alice, &group).await.1, b"just us");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_up_acknowledges_as_it_goes() {
    // Queues hold at most 3 messages: unless bob's listener acknowledges what it processed,
    // his queue fills and later messages are dropped for him.
    let t = start_server_with(|config| config.limits.max_queue_depth = 3).await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;
    for n in 0..12u8 {
        alice.send(&group, &[n]).await.unwrap();
        let (from, bytes) = wait_message(&bob, &group).await;
        assert_eq!(&from, alice.client_id());
        assert_eq!(bytes, vec![n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_commit_is_rebuilt_on_the_new_epoch() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    // Bob processes his queue only when he syncs (or a commit of his needs it).
    let mut quiet = t.client_config();
    quiet.listen = false;
    let bob = t.register_with("bob", quiet).await;
    let carol = t.register("carol").await;
    let dave = t.register("dave").await;

    let group = alice.create_group().await.unwrap();
    alice.invite(&group, &[user("bob")]).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(wait_joined(&bob).await, group);

    // Alice's commit wins epoch 2 while bob still sits at epoch 1: his commit is refused
    // with STALE_EPOCH, he processes alice's commit and commits again.
    alice.invite(&group, &[user("carol")]).await.unwrap();
    let added = bob.invite(&group, &[user("dave")]).await.unwrap();
    assert_eq!(added, vec![client_id("dave", "phone")]);
    wait_joined(&carol).await;
    wait_joined(&dave).await;
    let all = sorted(vec![
        client_id("alice", "phone"),
        client_id("bob", "phone"),
        client_id("carol", "phone"),
        client_id("dave", "phone"),
    ]);
    assert_eq!(members(&bob, &group).await, all);
    wait_for(&alice, "dave added", |e| {
        matches!(e, Event::MembersAdded { members, .. } if members == &vec![client_id("dave", "phone")])
    })
    .await;
    assert_eq!(members(&alice, &group).await, all);
    dave.send(&group, b"hi all").await.unwrap();
    assert_eq!(wait_message(&carol, &group).await.1, b"hi all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_both_end_up_applied() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let carol = t.register("carol").await;
    let dave = t.register("dave").await;
    let group = alice.create_group().await.unwrap();
    alice.invite(&group, &[user("bob")]).await.unwrap();
    wait_joined(&bob).await;

    let (carol_id, dave_id) = ([user("carol")], [user("dave")]);
    let (by_alice, by_bob) = tokio::join!(
        alice.invite(&group, &carol_id),
        bob.invite(&group, &dave_id)
    );
    assert_eq!(by_alice.unwrap(), vec![client_id("carol", "phone")]);
    assert_eq!(by_bob.unwrap(), vec![client_id("dave", "phone")]);
    wait_joined(&carol).await;
    wait_joined(&dave).await;
    carol.send(&group, b"from carol").await.unwrap();
    assert_eq!(wait_message(&dave, &group).await.1, b"from carol");
    assert_eq!(wait_message(&alice, &group).await.1, b"from carol");
    assert_eq!(wait_message(&bob, &group).await.1, b"from carol");
    assert_eq!(members(&alice, &group).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_update_moves_the_group_to_a_new_epoch_and_everything_sent_around_it_arrives_in_order()
 {
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;
    assert_eq!(alice.epoch(&group).await.unwrap(), 1);

    // Queued just before the update: it goes out before the update (by the background sender
    // or by update_keys itself), at the epoch it was encrypted for; bob gets both, in order.
    alice.send(&group, b"before").await.unwrap();
    assert_eq!(alice.update_keys(&group).await.unwrap(), 2);
    alice.send(&group, b"after").await.unwrap();
    for text in [&b"before"[..], b"after"] {
        assert_eq!(
            wait_message(&bob, &group).await,
            (client_id("alice", "phone"), text.to_vec())
        );
    }
    assert_eq!(bob.epoch(&group).await.unwrap(), 2);
    // Bob updates too; both still talk, in the same epoch.
    assert_eq!(bob.update_keys(&group).await.unwrap(), 3);
    bob.send(&group, b"from epoch 3").await.unwrap();
    assert_eq!(wait_message(&alice, &group).await.1, b"from epoch 3");
    assert_eq!(alice.epoch(&group).await.unwrap(), 3);
    let both = sorted(vec![client_id("alice", "phone"), client_id("bob", "phone")]);
    assert_eq!(members(&alice, &group).await, both);

    // Not a member: refused, nothing sent.
    let elsewhere = t.register("carol").await.create_group().await.unwrap();
    assert!(matches!(
        alice.update_keys(&elsewhere).await,
        Err(roost_client::ClientError::UnknownGroup(_))
    ));
    assert_eq!(alice.epoch(&group).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_by_external_commit() {
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;

    bob.rejoin_group(&group).await.unwrap();
    let both = sorted(vec![client_id("alice", "phone"), client_id("bob", "phone")]);
    assert_eq!(members(&bob, &group).await, both);
    // Alice processes bob's external commit (it replaced his leaf: no membership change).
    bob.send(&group, b"back").await.unwrap();
    assert_eq!(
        wait_message(&alice, &group).await,
        (client_id("bob", "phone"), b"back".to_vec())
    );
    assert_eq!(members(&alice, &group).await, both);
    alice.send(&group, b"welcome back").await.unwrap();
    assert_eq!(wait_message(&bob, &group).await.1, b"welcome back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_invited_while_others_write_gets_none_of_their_older_messages_and_no_error() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    // Bob processes his queue only when he syncs: he keeps writing in the epoch he knows.
    let mut quiet = t.client_config();
    quiet.listen = false;
    let bob = t.register_with("bob", quiet).await;
    let dave = t.register("dave").await;

    let group = alice.create_group().await.unwrap();
    alice.invite(&group, &[user("bob")]).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(wait_joined(&bob).await, group);
    // Dave joins in epoch 2; bob has not seen that commit and writes in epoch 1.
    alice.invite(&group, &[user("dave")]).await.unwrap();
    assert_eq!(wait_joined(&dave).await, group);
    bob.send(&group, b"epoch 1").await.unwrap();
    // Alice, a member of epoch 1, reads it.
    assert_eq!(
        wait_message(&alice, &group).await,
        (client_id("bob", "phone"), b"epoch 1".to_vec())
    );
    // Dave's next event is alice's next message: neither bob's nor an error about it.
    let id = alice.send(&group, b"epoch 2").await.unwrap();
    let next = tokio::time::timeout(EVENT_TIMEOUT, dave.next_event())
        .await
        .expect("no event for dave")
        .unwrap();
    assert_eq!(
        next,
        Event::Message {
            group: group.clone(),
            sender: client_id("alice", "phone"),
            id: Some(id),
            bytes: b"epoch 2".to_vec(),
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_as_a_stream_with_the_sdks_own_id_types() {
    use futures_util::StreamExt as _;
    // Ids come from roost_client itself: an app needs no roost-protocol dependency.
    let bob_id: roost_client::UserId = format!("bob@{DOMAIN}").parse().unwrap();
    let t = start_server().await;
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let group: roost_client::GroupId = alice.create_group().await.unwrap();
    alice.invite(&group, &[bob_id]).await.unwrap();
    let mut sent = std::collections::HashMap::new();
    for text in ["one", "two", "three"] {
        let id = alice.send(&group, text.as_bytes()).await.unwrap();
        sent.insert(text.to_owned(), id);
    }

    let mut events = std::pin::pin!(bob.events());
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(std::time::Duration::from_secs(20), events.next())
            .await
            .expect("no event within 20 s")
            .expect("the stream does not end")
            .unwrap();
        match event {
            Event::Joined { group: joined, .. } => {
                assert_eq!(joined, group);
                seen.push("joined".to_owned());
            }
            Event::Message { id, bytes, .. } => {
                // Each message carries the id its sender's `send` returned.
                let text = String::from_utf8(bytes).unwrap();
                assert_eq!(id, sent.get(&text).copied(), "{text}");
                seen.push(text);
            }
            _ => {}
        }
    }
    assert_eq!(seen, ["joined", "one", "two", "three"]);
}
