//! The persistent outgoing queue (issue #14): messages are queued while the homeserver is
//! unreachable, delivered in order and exactly once across lost answers, server restarts and
//! app restarts; receivers never show a copy twice; a member whose state fell behind (an old
//! profile copy, offline longer than the queue keeps messages) rejoins by itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use roost_client::transport::{ConnectConfig, TrustConfig};
use roost_client::{Client, ClientConfig, Event, MessageId, OutgoingState};
use roost_protocol::{ClientId, GroupId};
use roost_server::Server;
use roost_server::config::Config;
use rustls::pki_types::CertificateDer;

use crate::common::{DOMAIN, EVENT_TIMEOUT, client_id, user, wait_for, wait_joined};

/// A homeserver that can be stopped and started again on the same address and data.
struct Hub {
    server: Option<Server>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    certificate: CertificateDer<'static>,
    adjust: fn(&mut Config),
}

async fn start_at(listen: SocketAddr, data_dir: PathBuf, adjust: fn(&mut Config)) -> Server {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut config = Config {
            domain: DOMAIN.into(),
            listen,
            data_dir: data_dir.clone(),
            ..Config::default()
        };
        adjust(&mut config);
        match Server::start(config.validate().unwrap()).await {
            Ok(server) => return server,
            // The stopped instance may still be letting go of the port.
            Err(err) if Instant::now() < deadline => {
                eprintln!("restart failed, retrying: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("cannot start the homeserver: {err}"),
        }
    }
}

impl Hub {
    async fn start(adjust: fn(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Restarted on the same port: one no client socket can take meanwhile.
        let server = start_at(
            roost_server::testing::restartable_addr().unwrap(),
            dir.path().join("server"),
            adjust,
        )
        .await;
        Self {
            addr: server.local_addr(),
            certificate: server.certificate().clone(),
            server: Some(server),
            dir,
            adjust,
        }
    }

    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        let server = start_at(self.addr, self.dir.path().join("server"), self.adjust).await;
        self.server = Some(server);
    }

    fn config(&self) -> ClientConfig {
        let trust = TrustConfig::PinnedCertificates(vec![self.certificate.clone()]);
        let mut connect = ConnectConfig::new(self.addr, DOMAIN, trust);
        // The server is down on purpose here: notice it quickly (loopback answers in
        // microseconds when it is up).
        connect.connect_timeout = Duration::from_secs(2);
        let mut config = ClientConfig::new(connect);
        config.key_package_target = 3;
        config.key_package_low_water = 2;
        config.outbox_retry = Duration::from_millis(100);
        config.listen_retry = Duration::from_millis(100);
        config
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.redb"))
    }

    async fn register(&self, name: &str) -> Client {
        self.register_with(name, self.config()).await
    }

    async fn register_with(&self, name: &str, config: ClientConfig) -> Client {
        Client::register(
            config,
            self.path(name),
            user(name),
            "phone".parse().unwrap(),
        )
        .await
        .unwrap()
    }

    async fn open(&self, name: &str) -> Client {
        Client::open(self.config(), self.path(name)).await.unwrap()
    }
}

/// `creator` makes a group and invites the others; returns it once all have joined.
async fn group_of(creator: &Client, others: &[&Client]) -> GroupId {
    let group = creator.create_group().await.unwrap();
    let users: Vec<_> = others.iter().map(|c| c.user_id().clone()).collect();
    creator.invite(&group, &users).await.unwrap();
    for other in others {
        assert_eq!(wait_joined(other).await, group);
    }
    group
}

/// Waits until every one of `ids` was reported sent; fails on a failure event.
async fn wait_sent(client: &Client, ids: &[MessageId]) {
    let mut left: Vec<MessageId> = ids.to_vec();
    while !left.is_empty() {
        let event = wait_for(client, "outgoing", |e| matches!(e, Event::Outgoing { .. })).await;
        let Event::Outgoing { id, state, .. } = event else {
            unreachable!()
        };
        assert_eq!(state, OutgoingState::Sent, "message {id}");
        left.retain(|l| *l != id);
    }
}

/// The next `n` messages `client` receives, in order. Any group error fails the test (a
/// copy delivered twice used to surface as one).
async fn messages(client: &Client, n: usize) -> Vec<(ClientId, String)> {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let mut out = Vec::new();
    while out.len() < n {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("{}: only {out:?} in time", client.client_id()))
            .unwrap();
        match event {
            Event::Message { sender, bytes, .. } => {
                out.push((sender, String::from_utf8(bytes).unwrap()));
            }
            Event::GroupError { reason, .. } => panic!("group error: {reason}"),
            _ => {}
        }
    }
    out
}

/// The next message `client` gets is a last one `sender` sends now: no copy of an earlier
/// message came in between.
async fn nothing_more(client: &Client, sender: &Client, group: &GroupId) {
    sender.send(group, b"end").await.unwrap();
    let got = messages(client, 1).await;
    assert_eq!(
        got,
        vec![(sender.client_id().clone(), "end".to_owned())],
        "a message arrived twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_answer_is_lost_arrives_once_and_is_reported_sent() {
    let hub = Hub::start(|_| {}).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;

    // The hub takes the message, but its answer never reaches alice: the SDK sends the same
    // bytes again and the hub answers from its receipt.
    alice.simulate_lost_answers(1);
    let id = alice.send(&group, b"once").await.unwrap();
    assert_eq!(alice.outbox().await.unwrap()[0].id, id);
    wait_sent(&alice, &[id]).await;
    assert!(alice.outbox().await.unwrap().is_empty());
    assert_eq!(
        messages(&bob, 1).await,
        vec![(client_id("alice", "phone"), "once".to_owned())]
    );
    nothing_more(&bob, &alice, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_the_hub_delivers_twice_is_shown_once_without_an_error() {
    // Receipts kept for one second only: a retry after that is judged afresh and fanned out
    // again, so bob's queue holds the same ciphertext twice.
    let hub = Hub::start(|c| c.limits.receipt_window_secs = 1).await;
    let mut config = hub.config();
    config.outbox_retry = Duration::from_millis(2500);
    let alice = hub.register_with("alice", config).await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;

    // Four lost answers: the first try and its immediate resend, twice (before and after
    // reconnecting), so the next try comes after `outbox_retry`, past the receipt window.
    alice.simulate_lost_answers(4);
    let started = Instant::now();
    let id = alice.send(&group, b"twice on the wire").await.unwrap();
    assert_eq!(
        messages(&bob, 1).await,
        vec![(client_id("alice", "phone"), "twice on the wire".to_owned())]
    );
    wait_sent(&alice, &[id]).await;
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "sent within the receipt window: no second copy was made"
    );
    nothing_more(&bob, &alice, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_while_the_server_is_down_go_out_in_order_once() {
    let mut hub = Hub::start(|_| {}).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;

    hub.stop().await;
    let mut ids = Vec::new();
    for text in [&b"one"[..], b"two", b"three"] {
        ids.push(alice.send(&group, text).await.unwrap());
    }
    let queued = alice.outbox().await.unwrap();
    assert_eq!(queued.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert!(queued.iter().all(|m| m.state == OutgoingState::Queued));
    assert!(alice.flush().await.is_err(), "flush with the server down");

    hub.restart().await;
    alice.flush().await.unwrap();
    wait_sent(&alice, &ids).await;
    let texts: Vec<String> = messages(&bob, 3)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    nothing_more(&bob, &alice, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sends_the_outgoing_queue_too() {
    let mut hub = Hub::start(|_| {}).await;
    // The background sender retries only once an hour here: what goes out is sync's doing.
    let mut config = hub.config();
    config.outbox_retry = Duration::from_secs(3600);
    let alice = hub.register_with("alice", config).await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;

    hub.stop().await;
    let id = alice.send(&group, b"queued").await.unwrap();
    assert!(alice.flush().await.is_err(), "flush with the server down");
    // Past the background sender's own attempt (connect timeout 2 s): it now waits an hour.
    tokio::time::sleep(Duration::from_secs(3)).await;
    hub.restart().await;
    assert_eq!(alice.outbox().await.unwrap().len(), 1);
    alice.sync().await.unwrap();
    assert!(
        alice.outbox().await.unwrap().is_empty(),
        "sync sent nothing"
    );
    wait_sent(&alice, &[id]).await;
    assert_eq!(messages(&bob, 1).await[0].1, "queued");
    nothing_more(&bob, &alice, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_restarted_with_messages_queued_sends_them_in_order_once() {
    let mut hub = Hub::start(|_| {}).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;

    hub.stop().await;
    let mut ids = Vec::new();
    for text in [&b"first"[..], b"second", b"third"] {
        ids.push(alice.send(&group, text).await.unwrap());
    }
    alice.close().await;
    hub.restart().await;

    // The app starts again: the queue goes out by itself.
    let alice = hub.open("alice").await;
    wait_sent(&alice, &ids).await;
    let alice_id = client_id("alice", "phone");
    assert_eq!(
        messages(&bob, 3).await,
        vec![
            (alice_id.clone(), "first".to_owned()),
            (alice_id.clone(), "second".to_owned()),
            (alice_id, "third".to_owned()),
        ]
    );
    nothing_more(&bob, &alice, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_after_accepting_and_before_answering_delivers_once() {
    let mut hub = Hub::start(|_| {}).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;

    // The hub accepts (durably: bob gets it), every answer is lost, then the hub goes down.
    alice.simulate_lost_answers(u32::MAX);
    let id = alice.send(&group, b"accepted, unanswered").await.unwrap();
    assert_eq!(messages(&bob, 1).await[0].1, "accepted, unanswered");
    hub.stop().await;
    alice.simulate_lost_answers(0);
    assert_eq!(alice.outbox().await.unwrap()[0].id, id, "still queued");
    hub.restart().await;

    // The restarted hub recognises the same bytes from its durable receipt.
    wait_sent(&alice, &[id]).await;
    nothing_more(&bob, &alice, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_from_ten_clients_across_five_restarts_arrive_once_in_order() {
    const CLIENTS: usize = 10;
    const EACH: usize = 100;
    let mut hub = Hub::start(|_| {}).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(std::sync::Arc::new(hub.register(&format!("c{i}")).await));
    }
    let others: Vec<&Client> = clients[1..].iter().map(|c| c.as_ref()).collect();
    let group = group_of(&clients[0], &others).await;

    // Every client queues its 100 messages; delivery runs in the background while the
    // homeserver restarts five times.
    let mut readers = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        for n in 0..EACH {
            client
                .send(&group, format!("c{i}-{n:03}").as_bytes())
                .await
                .unwrap();
        }
        let client = client.clone();
        readers.push(tokio::spawn(async move {
            let mut got: Vec<(ClientId, String)> = Vec::new();
            let mut sent = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
            while got.len() < (CLIENTS - 1) * EACH || sent < EACH {
                let event = tokio::time::timeout_at(deadline, client.next_event())
                    .await
                    .unwrap_or_else(|_| panic!("c{i}: {} messages, {sent} sent in time", got.len()))
                    .unwrap();
                match event {
                    Event::Message { sender, bytes, .. } => {
                        got.push((sender, String::from_utf8(bytes).unwrap()));
                    }
                    Event::Outgoing { state, .. } => {
                        assert_eq!(state, OutgoingState::Sent);
                        sent += 1;
                    }
                    Event::GroupError { reason, .. } => panic!("c{i}: group error: {reason}"),
                    _ => {}
                }
            }
            got
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        hub.restart().await;
    }
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.await.unwrap();
        let mut by_sender: BTreeMap<ClientId, Vec<String>> = BTreeMap::new();
        for (sender, text) in got {
            by_sender.entry(sender).or_default().push(text);
        }
        assert_eq!(by_sender.len(), CLIENTS - 1, "c{i}");
        for (sender, texts) in by_sender {
            let j = sender.user.name.as_str().trim_start_matches('c').to_owned();
            let expected: Vec<String> = (0..EACH).map(|n| format!("c{j}-{n:03}")).collect();
            assert_eq!(texts, expected, "c{i} from {sender}");
        }
        assert!(clients[i].outbox().await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restored_from_an_old_profile_copy_rejoins_by_itself() {
    let hub = Hub::start(|_| {}).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let carol = hub.register("carol").await;
    let group = group_of(&alice, &[&bob]).await;

    // A copy of bob's profile, taken while his app is closed.
    bob.close().await;
    let backup = hub.dir.path().join("bob-backup.redb");
    std::fs::copy(hub.path("bob"), &backup).unwrap();
    let bob = hub.open("bob").await;

    // The group moves on three epochs (more than the hub accepts old messages for); bob
    // follows and acknowledges everything.
    alice.invite(&group, &[user("carol")]).await.unwrap();
    assert_eq!(wait_joined(&carol).await, group);
    alice.remove_users(&group, &[user("carol")]).await.unwrap();
    alice.invite(&group, &[user("carol")]).await.unwrap();
    alice.send(&group, b"while bob is current").await.unwrap();
    assert_eq!(messages(&bob, 1).await[0].1, "while bob is current");
    bob.close().await;

    // bob's device is restored from the old copy: its state is three epochs behind and what
    // it missed is gone from its queue.
    std::fs::copy(&backup, hub.path("bob")).unwrap();
    let bob = hub.open("bob").await;
    let id = bob.send(&group, b"I am back").await.unwrap();

    // bob's message is refused for its epoch, the SDK finds nothing to catch up on, rejoins
    // and sends it at the new epoch: one Rejoined for bob, one MemberRejoined for the others.
    let rejoined = |e: &Event| matches!(e, Event::MemberRejoined { .. });
    let event = wait_for(&alice, "member rejoined", rejoined).await;
    assert_eq!(
        event,
        Event::MemberRejoined {
            group: group.clone(),
            member: client_id("bob", "phone")
        }
    );
    assert_eq!(messages(&alice, 1).await[0].1, "I am back");
    alice.send(&group, b"welcome back").await.unwrap();
    let (mut rejoins, mut sent) = (0, false);
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, bob.next_event())
            .await
            .unwrap()
            .unwrap();
        match event {
            Event::Rejoined { group: g } => {
                assert_eq!(g, group);
                rejoins += 1;
            }
            Event::Outgoing {
                id: sent_id, state, ..
            } => {
                assert_eq!((sent_id, state), (id, OutgoingState::Sent));
                sent = true;
            }
            Event::Message { bytes, .. } => {
                assert_eq!(bytes, b"welcome back");
                break;
            }
            Event::GroupError { reason, .. } => panic!("group error: {reason}"),
            _ => {}
        }
    }
    assert_eq!((rejoins, sent), (1, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_restored_in_the_same_epoch_does_not_reuse_a_generation_and_its_message_arrives_once()
 {
    let hub = Hub::start(|_| {}).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;
    alice.send(&group, b"hello bob").await.unwrap();
    assert_eq!(messages(&bob, 1).await[0].1, "hello bob");

    // A copy of bob's profile, taken while his app is closed.
    bob.close().await;
    let backup = hub.dir.path().join("bob-backup.redb");
    std::fs::copy(hub.path("bob"), &backup).unwrap();
    let bob = hub.open("bob").await;

    // bob sends two more messages in the same epoch: they use up the ratchet generations
    // (and send counters) the copy still holds as unused.
    let sent = [
        bob.send(&group, b"one").await.unwrap(),
        bob.send(&group, b"two").await.unwrap(),
    ];
    wait_sent(&bob, &sent).await;
    bob.close().await;

    // The copy is restored; the group is still in that epoch, which the hub accepts.
    std::fs::copy(&backup, hub.path("bob")).unwrap();
    let bob = hub.open("bob").await;
    let id = bob.send(&group, b"three").await.unwrap();

    // The hub refuses the reused counter; bob's SDK gives the group a fresh epoch and sends
    // the message again, encrypted anew: alice reads it, once, after the first two.
    let bob_id = client_id("bob", "phone");
    assert_eq!(
        messages(&alice, 3).await,
        ["one", "two", "three"].map(|t| (bob_id.clone(), t.to_owned()))
    );
    let mut outcomes = Vec::new();
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while outcomes.is_empty() {
        match tokio::time::timeout_at(deadline, bob.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Outgoing {
                id: sent_id, state, ..
            } => outcomes.push((sent_id, state)),
            Event::GroupError { reason, .. } => panic!("group error: {reason}"),
            _ => {}
        }
    }
    assert_eq!(outcomes, [(id, OutgoingState::Sent)]);
    assert!(bob.outbox().await.unwrap().is_empty());

    // The conversation goes on both ways, with no copy in between.
    alice.send(&group, b"got all three").await.unwrap();
    assert_eq!(messages(&bob, 1).await[0].1, "got all three");
    nothing_more(&alice, &bob, &group).await;
    nothing_more(&bob, &alice, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_restored_copy_sends_again_after_the_receipt_window_are_shown_once() {
    // A one-second receipt window stands for the 24 h default.
    let mut hub = Hub::start(|c| c.limits.receipt_window_secs = 1).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let group = group_of(&alice, &[&bob]).await;

    // bob queues two messages while the hub is down; a copy of his profile is taken with
    // them still queued.
    hub.stop().await;
    let ids = [
        bob.send(&group, b"one").await.unwrap(),
        bob.send(&group, b"two").await.unwrap(),
    ];
    bob.close().await;
    let backup = hub.dir.path().join("bob-backup.redb");
    std::fs::copy(hub.path("bob"), &backup).unwrap();
    hub.restart().await;
    let bob = hub.open("bob").await;
    wait_sent(&bob, &ids).await;
    let bob_id = client_id("bob", "phone");
    assert_eq!(
        messages(&alice, 2).await,
        ["one", "two"].map(|t| (bob_id.clone(), t.to_owned()))
    );
    bob.close().await;

    // Restored after the hub forgot its receipts: the copy's first message is refused
    // (its counter is used), so the SDK encrypts both again and sends them; they reach alice
    // a second time as new ciphertexts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::fs::copy(&backup, hub.path("bob")).unwrap();
    let bob = hub.open("bob").await;
    wait_sent(&bob, &ids).await;
    assert!(bob.outbox().await.unwrap().is_empty());

    // alice's SDK knows their ids: nothing is shown twice, and the conversation goes on.
    nothing_more(&alice, &bob, &group).await;
    alice.send(&group, b"still here").await.unwrap();
    assert_eq!(messages(&bob, 1).await[0].1, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_longer_than_the_queue_keeps_messages_rejoins_by_itself() {
    let hub = Hub::start(|c| c.limits.max_message_age_secs = 1).await;
    let alice = hub.register("alice").await;
    let bob = hub.register("bob").await;
    let carol = hub.register("carol").await;
    let group = group_of(&alice, &[&bob]).await;

    bob.close().await;
    alice.invite(&group, &[user("carol")]).await.unwrap();
    assert_eq!(wait_joined(&carol).await, group);
    alice.send(&group, b"bob never sees this").await.unwrap();
    alice.flush().await.unwrap();
    // Past the queue's age limit: the commit that bob needs is no longer served.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let bob = hub.open("bob").await;
    // The first message of the current epoch shows bob he fell behind: he rejoins.
    alice.send(&group, b"are you there?").await.unwrap();
    let event = wait_for(&bob, "rejoined", |e| matches!(e, Event::Rejoined { .. })).await;
    assert_eq!(event.group(), &group);
    let event = wait_for(&alice, "member rejoined", |e| {
        matches!(e, Event::MemberRejoined { .. })
    })
    .await;
    assert_eq!(
        event,
        Event::MemberRejoined {
            group: group.clone(),
            member: client_id("bob", "phone")
        }
    );
    alice.send(&group, b"now you can read").await.unwrap();
    assert_eq!(messages(&bob, 1).await[0].1, "now you can read");
    bob.send(&group, b"yes").await.unwrap();
    let texts: Vec<String> = messages(&carol, 4)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        texts,
        [
            "bob never sees this",
            "are you there?",
            "now you can read",
            "yes"
        ]
    );
}
