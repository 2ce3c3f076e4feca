//! Exactly once across a real crash: the homeserver is a `roost serve` process. It accepts a
//! message, the answer never reaches the sender, the receiver has the message; then the
//! homeserver is killed with SIGKILL and started again on the same data directory. The
//! sender's retry (the same bytes) is answered from the receipt written in the transaction
//! that accepted the message: the receiver has it once, the sender sees it sent once.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use roost_client::{Event, OutgoingState};
use roost_interop::harness::{Harness, HarnessConfig};
use roost_interop::member::{Member, texts};

#[test]
fn a_message_whose_answer_was_lost_is_answered_from_its_receipt_after_sigkill() {
    let roost = common::roost();
    common::runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (mut h, profiles, config) = start(&roost, dir.path()).await;
        let alice = Member::register(config.clone(), &profiles, "alice@alpha.test", "phone")
            .await
            .unwrap();
        let bob = Member::register(config, &profiles, "bob@alpha.test", "phone")
            .await
            .unwrap();
        let group = alice.client().create_group().await.unwrap();
        alice
            .client()
            .invite(&group, std::slice::from_ref(bob.user()))
            .await
            .unwrap();
        bob.wait_joined(Some(&group)).await.unwrap();

        // From here on the homeserver handles each of alice's sends, but every answer is lost
        // on the way back.
        alice.client().simulate_lost_answers(u32::MAX);
        let id = alice.client().send(&group, b"once").await.unwrap();
        bob.wait_messages(&group, 1).await.unwrap();
        assert_eq!(texts(&bob.events(), &group), ["once"]);
        // alice never heard that it was taken: it is still queued, not reported sent.
        let queued = alice.client().outbox().await.unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].id, id);
        let sent = |events: &[Event]| {
            events
                .iter()
                .filter(|e| matches!(e, Event::Outgoing { id: i, .. } if *i == id))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert!(sent(&alice.events()).is_empty());

        // The homeserver dies (SIGKILL) and comes back on the same data; answers get through
        // again. alice's background sender repeats the same bytes.
        h.kill(0).unwrap();
        alice.client().simulate_lost_answers(0);
        h.restart(0).await.unwrap();
        alice
            .wait_event(
                "sent",
                |e| matches!(e, Event::Outgoing { id: i, .. } if *i == id),
            )
            .await
            .unwrap();
        assert!(alice.client().outbox().await.unwrap().is_empty());

        // Exactly once: bob's next message is the next one alice sends.
        alice.client().send(&group, b"after").await.unwrap();
        bob.wait_messages(&group, 2).await.unwrap();
        assert_eq!(texts(&bob.events(), &group), ["once", "after"]);
        let outcomes = sent(&alice.events());
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        assert!(matches!(
            &outcomes[0],
            Event::Outgoing {
                state: OutgoingState::Sent,
                ..
            }
        ));
        alice.close().await;
        bob.close().await;
        h.shutdown().await.unwrap();
    });
}

/// A group's state is stored as a base and a delta per commit (server `storage::group_delta`).
/// The homeserver is killed with SIGKILL after several commits stored as deltas, started
/// again, and killed again after more: each time the DS loads the group from its base and
/// deltas, accepts the next commits (which it validates against that state: a wrong tree
/// would refuse them) and delivers to exactly the members the clients see.
#[test]
fn a_group_stored_as_deltas_goes_on_after_sigkill() {
    let roost = common::roost();
    common::runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (mut h, profiles, config) = start(&roost, dir.path()).await;
        let mut members = Vec::new();
        for name in ["alice", "bob", "carol", "dave", "erin", "frank"] {
            let user = format!("{name}@alpha.test");
            members.push(
                Member::register(config.clone(), &profiles, &user, "phone")
                    .await
                    .unwrap(),
            );
        }
        let [alice, bob, carol, dave, erin, frank] = &members[..] else {
            unreachable!()
        };
        let group = alice.client().create_group().await.unwrap();
        // Commits before the first crash: adds, a remove.
        for member in [bob, carol, dave] {
            alice
                .client()
                .invite(&group, std::slice::from_ref(member.user()))
                .await
                .unwrap();
            member.wait_joined(Some(&group)).await.unwrap();
        }
        alice
            .client()
            .remove_users(&group, std::slice::from_ref(carol.user()))
            .await
            .unwrap();
        bob.wait_members(&group, &[alice.id(), bob.id(), dave.id()])
            .await
            .unwrap();

        h.kill(0).unwrap();
        h.restart(0).await.unwrap();
        // The reloaded group takes a commit by another member and one by alice.
        retried(|| {
            bob.client()
                .invite(&group, std::slice::from_ref(erin.user()))
        })
        .await;
        erin.wait_joined(Some(&group)).await.unwrap();
        retried(|| {
            alice
                .client()
                .remove_users(&group, std::slice::from_ref(dave.user()))
        })
        .await;
        let now = [alice.id(), bob.id(), erin.id()];
        for member in [alice, bob, erin] {
            member.wait_members(&group, &now).await.unwrap();
        }

        h.kill(0).unwrap();
        h.restart(0).await.unwrap();
        retried(|| {
            alice
                .client()
                .invite(&group, std::slice::from_ref(frank.user()))
        })
        .await;
        frank.wait_joined(Some(&group)).await.unwrap();
        // erin sends once her state has the commit that added frank (a message of the epoch
        // before goes to that epoch's members).
        let now = [alice.id(), bob.id(), erin.id(), frank.id()];
        erin.wait_members(&group, &now).await.unwrap();
        erin.client().send(&group, b"after").await.unwrap();
        for member in [alice, bob, frank] {
            member.wait_messages(&group, 1).await.unwrap();
            assert_eq!(texts(&member.events(), &group), ["after"]);
        }
        // carol and dave, removed before, got nothing.
        assert!(texts(&carol.events(), &group).is_empty());
        assert!(texts(&dave.events(), &group).is_empty());
        for member in members {
            member.close().await;
        }
        h.shutdown().await.unwrap();
    });
}

/// Runs a request made right after a restart: the client's connection to the killed server
/// is gone, and a request on it fails before it reaches anyone (transient); it is made again
/// on a new connection.
async fn retried<T, F, Fut>(op: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, roost_client::ClientError>>,
{
    for _ in 0..50 {
        match op().await {
            Ok(value) => return value,
            Err(roost_client::ClientError::Request(err)) if err.is_transient() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
    panic!("no answer after the restart")
}

/// One homeserver in `dir`, the folder for the clients' profiles, and a client configuration
/// that retries sending and listening soon after the server comes back.
async fn start(
    roost: &std::path::Path,
    dir: &std::path::Path,
) -> (Harness, std::path::PathBuf, roost_client::ClientConfig) {
    let h = Harness::start(HarnessConfig::new(roost, dir, 1))
        .await
        .unwrap();
    let profiles = dir.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let mut config = h.client_config(0).unwrap();
    config.outbox_retry = Duration::from_millis(200);
    config.listen_retry = Duration::from_millis(200);
    (h, profiles, config)
}
