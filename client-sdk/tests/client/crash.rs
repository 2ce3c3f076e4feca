//! A client killed between sending a commit and merging it.

use roost_client::{Client, Event};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committer_killed_before_merging_its_accepted_commit_merges_it_on_restart() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let carol = t.register("carol").await;
    let group = alice.create_group().await.unwrap();
    alice.invite(&group, &[user("bob")]).await.unwrap();
    wait_joined(&bob).await;

    // Alice's app dies after the DS accepted her commit adding carol, before she merged it.
    alice.simulate_crash_after_commit();
    assert!(alice.invite(&group, &[user("carol")]).await.is_err());
    alice.close().await;

    // The others are in the new epoch and talk.
    assert_eq!(wait_joined(&carol).await, group);
    wait_for(&bob, "carol added", |e| {
        matches!(e, Event::MembersAdded { members, .. } if members == &vec![client_id("carol", "phone")])
    })
    .await;
    // `send` returns once the message is in bob's outgoing queue; bob's reaches the hub
    // before carol's is sent, so alice gets them in this order.
    bob.send(&group, b"one").await.unwrap();
    bob.flush().await.unwrap();
    carol.send(&group, b"two").await.unwrap();

    // Alice's app starts again: she learns her commit was accepted, merges it, and gets what
    // was sent in its epoch — no rejoin, nothing missed.
    let alice = Client::open(t.client_config(), t.profile_path("alice-phone"))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut settled = Vec::new();
    while got.len() < 2 {
        let event = tokio::time::timeout(EVENT_TIMEOUT, alice.next_event())
            .await
            .expect("alice got the messages of the new epoch in time")
            .unwrap();
        match event {
            Event::Message { sender, bytes, .. } => got.push((sender, bytes)),
            Event::GroupError { reason, .. } => panic!("alice's group failed: {reason}"),
            Event::Rejoined { .. } => panic!("alice rejoined instead of merging her commit"),
            event @ Event::CommitSettled { .. } => settled.push(event),
            _ => {}
        }
    }
    assert_eq!(
        got,
        [
            (client_id("bob", "phone"), b"one".to_vec()),
            (client_id("carol", "phone"), b"two".to_vec())
        ]
    );
    // The app learns that the invitation it saw fail went through after all.
    assert_eq!(
        settled,
        [Event::CommitSettled {
            group: group.clone(),
            added: vec![client_id("carol", "phone")],
            removed: Vec::new(),
        }]
    );
    // She is in the same epoch as the others, with carol.
    alice.send(&group, b"three").await.unwrap();
    for other in [&bob, &carol] {
        wait_for(other, "alice's message", |e| {
            matches!(e, Event::Message { sender, bytes, .. }
                if sender == &client_id("alice", "phone") && bytes == b"three")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_update_accepted_before_the_app_died_is_merged_on_restart() {
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;

    // The DS accepts alice's self-update; her app dies before she merged it.
    alice.simulate_crash_after_commit();
    assert!(alice.update_keys(&group).await.is_err());
    alice.close().await;
    // Bob processes it (epoch 2) and writes in the new epoch.
    bob.send(&group, b"in epoch 2").await.unwrap();
    bob.flush().await.unwrap();

    // Alice's next start merges her own update (she has its secrets) and reads bob's message:
    // no rejoin, no group error.
    let alice = Client::open(t.client_config(), t.profile_path("alice-phone"))
        .await
        .unwrap();
    let mut settled = false;
    loop {
        let event = tokio::time::timeout(EVENT_TIMEOUT, alice.next_event())
            .await
            .expect("alice got bob's message in time")
            .unwrap();
        match event {
            Event::Message { sender, bytes, .. } => {
                assert_eq!(
                    (sender, bytes),
                    (client_id("bob", "phone"), b"in epoch 2".to_vec())
                );
                break;
            }
            Event::GroupError { reason, .. } => panic!("alice's group failed: {reason}"),
            Event::Rejoined { .. } => panic!("alice rejoined instead of merging her update"),
            Event::CommitSettled { added, removed, .. } => {
                assert!(added.is_empty() && removed.is_empty());
                settled = true;
            }
            _ => {}
        }
    }
    assert!(settled, "the app was told its update went through");
    assert_eq!(alice.epoch(&group).await.unwrap(), 2);
    alice.send(&group, b"me too").await.unwrap();
    assert_eq!(wait_message(&bob, &group).await.1, b"me too");
}

/// The chaos run's finding (docs/RELIABILITY.md): a message the hub accepted for an epoch 2
/// back, just before the committer's own commit, is read by the committer only after it has
/// merged that commit: 3 epochs back by then, and it must still decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committer_reads_a_message_of_an_old_epoch_accepted_just_before_its_commit() {
    let t = start_server().await;
    let alice = t.register("alice").await;
    // Bob processes his queue only when asked: he stays in an old epoch.
    let mut quiet = t.client_config();
    quiet.listen = false;
    let bob = t.register_with("bob", quiet).await;
    let _carol = t.register("carol").await;
    let _dave = t.register("dave").await;
    let group = alice.create_group().await.unwrap();
    alice.invite(&group, &[user("bob")]).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(wait_joined(&bob).await, group);
    // Epoch 1 for bob; alice goes on to epoch 3.
    alice.invite(&group, &[user("carol")]).await.unwrap();
    alice.invite(&group, &[user("dave")]).await.unwrap();

    // Alice's app dies with her next commit (epoch 3 to 4) durable but not sent yet.
    alice.simulate_crash_before_commit_sent();
    assert!(alice.remove_users(&group, &[user("dave")]).await.is_err());
    alice.close().await;

    // Bob writes from epoch 1: 2 epochs back, which the hub still accepts.
    bob.send(&group, b"from the past").await.unwrap();
    bob.flush().await.unwrap();

    // Alice starts again: her commit goes out and is merged (epoch 4), then she reads bob's
    // message, queued before it.
    let alice = Client::open(t.client_config(), t.profile_path("alice-phone"))
        .await
        .unwrap();
    loop {
        let event = tokio::time::timeout(EVENT_TIMEOUT, alice.next_event())
            .await
            .expect("alice got bob's message in time")
            .unwrap();
        match event {
            Event::Message { sender, bytes, .. } => {
                assert_eq!(sender, client_id("bob", "phone"));
                assert_eq!(bytes, b"from the past");
                break;
            }
            Event::GroupError { reason, .. } => panic!("alice could not read it: {reason}"),
            _ => {}
        }
    }
    assert!(
        !members(&alice, &group)
            .await
            .contains(&client_id("dave", "phone"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoiner_killed_before_storing_its_accepted_external_join_keeps_it_on_restart() {
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;

    // Bob's app dies after the DS accepted his external commit, before he stored it.
    bob.simulate_crash_after_commit();
    assert!(bob.rejoin_group(&group).await.is_err());
    bob.close().await;
    let bob = Client::open(t.client_config(), t.profile_path("bob-phone"))
        .await
        .unwrap();

    // On restart he keeps the join the DS accepted (no second external commit): alice sees
    // one rejoin, bob one, and they talk in the new epoch.
    alice.send(&group, b"still with us?").await.unwrap();
    let mut rejoins = 0;
    loop {
        let event = tokio::time::timeout(EVENT_TIMEOUT, bob.next_event())
            .await
            .expect("bob got alice's message in time")
            .unwrap();
        match event {
            Event::Rejoined { .. } => rejoins += 1,
            Event::Message { bytes, .. } => {
                assert_eq!(bytes, b"still with us?");
                break;
            }
            Event::GroupError { reason, .. } => panic!("bob's group failed: {reason}"),
            _ => {}
        }
    }
    assert_eq!(rejoins, 1);
    bob.send(&group, b"yes").await.unwrap();
    let mut member_rejoins = 0;
    loop {
        match tokio::time::timeout(EVENT_TIMEOUT, alice.next_event())
            .await
            .expect("alice got bob's answer in time")
            .unwrap()
        {
            Event::MemberRejoined { member, .. } => {
                assert_eq!(member, client_id("bob", "phone"));
                member_rejoins += 1;
            }
            Event::Message { bytes, .. } => {
                assert_eq!(bytes, b"yes");
                break;
            }
            Event::GroupError { reason, .. } => panic!("alice's group failed: {reason}"),
            _ => {}
        }
    }
    assert_eq!(member_rejoins, 1);
}
