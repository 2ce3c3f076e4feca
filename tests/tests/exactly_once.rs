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
        let mut h = Harness::start(HarnessConfig::new(&roost, dir.path(), 1))
            .await
            .unwrap();
        let profiles = dir.path().join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        let mut config = h.client_config(0).unwrap();
        config.outbox_retry = Duration::from_millis(200);
        config.listen_retry = Duration::from_millis(200);
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
