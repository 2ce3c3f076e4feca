//! Delivery Service end to end: real openmls clients against a real server over QUIC.

use openmls::prelude::OpenMlsProvider as _;
use roost_protocol::messages::delivery::*;
use roost_protocol::messages::queue::QueueFetchRequest;
use roost_protocol::{ErrorCode, ErrorDetail};

use crate::common::*;
use crate::mls_member::Member;

fn code(err: roost_client::transport::RequestError) -> ErrorCode {
    err.wire_error()
        .map(|e| e.code)
        .unwrap_or_else(|| panic!("not a server error: {err}"))
}

async fn queued(member: &Member) -> usize {
    member
        .conn
        .call(QueueFetchRequest {
            after_seq: member.seen,
            max_messages: 1000,
            max_bytes: 1 << 24,
        })
        .await
        .unwrap()
        .messages
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_grows_to_22_members_and_everyone_agrees_on_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // 22 registrations from one address.
    cfg.limits.registration_burst = 100;
    let server = start(cfg).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(1).await;
    assert_eq!(alice.epoch(), 0);

    let kps = alice.claim(&[bob.user_id()]).await;
    assert_eq!(alice.commit_and_merge(kps, &[]).await, 1);
    let got = bob.sync().await;
    assert!(got.joined);
    assert_eq!(bob.epoch(), 1);

    // Twenty more in one commit.
    let mut others = Vec::new();
    for i in 0..20 {
        let member = Member::new(&server, &format!("user{i}")).await;
        member.upload_key_packages(1).await;
        others.push(member);
    }
    let users: Vec<_> = others.iter().map(|m| m.user_id().clone()).collect();
    let kps = alice.claim(&users.iter().collect::<Vec<_>>()).await;
    assert_eq!(kps.len(), 20);
    assert_eq!(alice.commit_and_merge(kps, &[]).await, 2);
    let got = bob.sync().await;
    assert_eq!(got.commits, 1);
    assert_eq!(bob.epoch(), 2);
    for other in &mut others {
        let got = other.sync().await;
        assert!(got.joined);
        assert_eq!(other.epoch(), 2);
        assert_eq!(other.group().members().count(), 22);
    }
    // The DS's GroupInfo is of the same epoch.
    let info = bob
        .conn
        .call(FetchGroupInfoRequest { group: alice.gid() })
        .await
        .unwrap();
    assert_eq!(info.epoch, 2);

    // An application message reaches every member but the sender, once.
    let response = others[3].send(b"hello from user3").await.unwrap();
    assert_eq!(response.recipients, 21);
    assert_eq!(
        alice.sync().await.messages,
        vec![b"hello from user3".to_vec()]
    );
    assert_eq!(others[3].sync().await.messages.len(), 0);
    for (i, other) in others.iter_mut().enumerate() {
        if i != 3 {
            assert_eq!(
                other.sync().await.messages,
                vec![b"hello from user3".to_vec()]
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn messages_arrive_once_in_send_order_and_removed_members_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    let mut carol = Member::new(&server, "carol").await;
    bob.upload_key_packages(1).await;
    carol.upload_key_packages(1).await;
    alice.create_group(2).await;
    let kps = alice.claim(&[bob.user_id(), carol.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;
    carol.sync().await;

    for n in 0..5u8 {
        alice.send(&[b'a', n]).await.unwrap();
        bob.send(&[b'b', n]).await.unwrap();
    }
    let got = carol.sync().await.messages;
    let from_alice: Vec<_> = got.iter().filter(|m| m[0] == b'a').cloned().collect();
    let from_bob: Vec<_> = got.iter().filter(|m| m[0] == b'b').cloned().collect();
    assert_eq!(
        from_alice,
        (0..5u8).map(|n| vec![b'a', n]).collect::<Vec<_>>()
    );
    assert_eq!(
        from_bob,
        (0..5u8).map(|n| vec![b'b', n]).collect::<Vec<_>>()
    );
    assert_eq!(alice.sync().await.messages.len(), 5);
    assert_eq!(bob.sync().await.messages.len(), 5);

    // Alice removes bob: bob receives the commit that removes him, then nothing more.
    let bob_leaf = alice.leaf_of(bob.id());
    alice.commit_and_merge(vec![], &[bob_leaf]).await;
    let got = bob.sync().await;
    assert!(got.removed);
    carol.sync().await;
    alice.send(b"after").await.unwrap();
    assert_eq!(queued(&bob).await, 0);
    assert_eq!(carol.sync().await.messages, vec![b"after".to_vec()]);
    // Bob's sends are refused, and nothing is queued for anyone.
    let err = bob
        .conn
        .call(SendMessageRequest {
            group: alice.gid(),
            message: vec![0u8; 10].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::NOT_MEMBER);
    assert_eq!(queued(&carol).await, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_wins_per_epoch_and_the_loser_retries_on_the_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(3).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;

    // Both commit for epoch 1 at once.
    let a = alice.commit(vec![], &[]);
    let b = bob.commit(vec![], &[]);
    let (ra, rb) = tokio::join!(alice.send_commit(&a), bob.send_commit(&b));
    let (winner_alice, loser_err) = match (ra, rb) {
        (Ok(r), Err(e)) => {
            assert_eq!(r.epoch, 2);
            (true, e)
        }
        (Err(e), Ok(r)) => {
            assert_eq!(r.epoch, 2);
            (false, e)
        }
        other => panic!("exactly one commit must win: {other:?}"),
    };
    let wire = loser_err.wire_error().unwrap();
    assert_eq!(wire.code, ErrorCode::STALE_EPOCH);
    assert_eq!(wire.detail, ErrorDetail::StaleEpoch { current_epoch: 2 });
    let (winner, loser) = if winner_alice {
        (&mut alice, &mut bob)
    } else {
        (&mut bob, &mut alice)
    };
    winner.merge();
    loser.discard();
    assert_eq!(loser.sync().await.commits, 1);
    assert_eq!(loser.epoch(), 2);
    // The loser's retry on the new epoch succeeds.
    assert_eq!(loser.commit_and_merge(vec![], &[]).await, 3);
    assert_eq!(winner.sync().await.commits, 1);
    assert_eq!(winner.epoch(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_commits_change_nothing_and_enqueue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    let mut carol = Member::new(&server, "carol").await;
    bob.upload_key_packages(1).await;
    carol.upload_key_packages(2).await;
    alice.create_group(4).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;

    // A flipped byte in the commit's signature.
    let bundle = alice.commit(vec![], &[]);
    let mut tampered = bundle.commit.clone();
    let at = tampered.len() - 66 - 30;
    tampered[at] ^= 1;
    let err = alice
        .conn
        .call(CommitRequest {
            group: alice.gid(),
            commit: tampered.into(),
            welcome: None,
            group_info: bundle.group_info.clone().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::INVALID_COMMIT);
    // The same commit from a client that is not its sender (carol is not even a member).
    carol.group_id = Some(alice.gid());
    let err = carol.send_commit(&bundle).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::NOT_MEMBER);
    alice.discard();

    // An Add without its Welcome.
    let kps = alice.claim(&[carol.user_id()]).await;
    let mut add = alice.commit(kps, &[]);
    add.welcome = None;
    let err = alice.send_commit(&add).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::MISSING_WELCOME);
    alice.discard();

    // A commit for a future epoch: bob builds one, merges it locally without the DS, then
    // builds the next one (epoch 3 while the DS is at 2... is at 1).
    let first = bob.commit(vec![], &[]);
    bob.merge();
    let _ = first;
    let future = bob.commit(vec![], &[]);
    let err = bob.send_commit(&future).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::FUTURE_EPOCH);

    // Nothing was queued for anyone, and the group is still at epoch 1.
    assert_eq!(queued(&bob).await, 0);
    assert_eq!(queued(&carol).await, 0);
    let info = alice
        .conn
        .call(FetchGroupInfoRequest { group: alice.gid() })
        .await
        .unwrap();
    assert_eq!(info.epoch, 1);
    // A valid commit still applies.
    assert_eq!(alice.commit_and_merge(vec![], &[]).await, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_leave_is_committed_by_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    let mut carol = Member::new(&server, "carol").await;
    bob.upload_key_packages(1).await;
    carol.upload_key_packages(1).await;
    alice.create_group(5).await;
    let kps = alice.claim(&[bob.user_id(), carol.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;
    carol.sync().await;

    carol.leave().await.unwrap();
    assert_eq!(alice.sync().await.proposals, 1);
    assert_eq!(bob.sync().await.proposals, 1);
    // A commit that ignores the pending leave is refused.
    let ignoring = {
        let provider = &alice.provider;
        let group = alice.group.as_mut().unwrap();
        let bundle = group
            .commit_builder()
            .consume_proposal_store(false)
            .load_psks(provider.storage())
            .unwrap()
            .create_group_info(true)
            .build(
                openmls::prelude::OpenMlsProvider::rand(provider),
                openmls::prelude::OpenMlsProvider::crypto(provider),
                &alice.client.key,
                |_| true,
            )
            .unwrap()
            .stage_commit(provider)
            .unwrap();
        let (commit, _, group_info) = bundle.into_contents();
        crate::mls_member::Bundle {
            commit: openmls::prelude::tls_codec::Serialize::tls_serialize_detached(&commit)
                .unwrap(),
            welcome: None,
            group_info: openmls::prelude::tls_codec::Serialize::tls_serialize_detached(
                &openmls::prelude::MlsMessageOut::from(group_info.unwrap()),
            )
            .unwrap(),
        }
    };
    let err = alice.send_commit(&ignoring).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::MISSING_PROPOSALS);
    alice.discard();
    // Bob commits the pending leave.
    bob.commit_and_merge(vec![], &[]).await;
    assert_eq!(bob.group().members().count(), 2);
    assert!(carol.sync().await.removed);
    alice.sync().await;
    assert_eq!(alice.group().members().count(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_member_that_lost_its_state_rejoins_by_external_commit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(6).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;

    // Bob loses his MLS state (same device and key) and rejoins.
    bob.group = None;
    bob.provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let info = bob
        .conn
        .call(FetchGroupInfoRequest { group: alice.gid() })
        .await
        .unwrap();
    let bundle = crate::mls_member_external::external_commit(
        &mut bob,
        info.group_info.as_slice(),
        info.ratchet_tree.as_slice(),
    );
    let response = bob
        .conn
        .call(ExternalJoinRequest {
            group: alice.gid(),
            commit: bundle.commit.into(),
            group_info: bundle.group_info.into(),
        })
        .await
        .unwrap();
    assert_eq!(response.epoch, 2);
    assert_eq!(alice.sync().await.commits, 1);
    assert_eq!(
        alice.group().members().count(),
        2,
        "the old leaf was replaced"
    );
    alice.send(b"welcome back").await.unwrap();
    assert_eq!(bob.sync().await.messages, vec![b"welcome back".to_vec()]);

    // Someone who was never a member cannot fetch the GroupInfo.
    let mallory = Member::new(&server, "mallory").await;
    let err = mallory
        .conn
        .call(FetchGroupInfoRequest { group: alice.gid() })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::NOT_MEMBER);
    server.shutdown().await;
}

#[tokio::test]
async fn a_restart_in_the_middle_of_a_conversation_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let address = server.local_addr();
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(7).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    alice.send(b"before restart").await.unwrap();
    server.shutdown().await;

    let server = restart_on(config(dir.path()), address).await;
    for member in [&mut alice, &mut bob] {
        member.conn = connect(&server).await;
        login(&member.conn, &member.client).await;
    }
    let got = bob.sync().await;
    assert!(got.joined);
    assert_eq!(got.messages, vec![b"before restart".to_vec()]);
    // The group state survived: the next commit and message go through.
    assert_eq!(alice.commit_and_merge(vec![], &[]).await, 2);
    alice.send(b"after restart").await.unwrap();
    let got = bob.sync().await;
    assert_eq!(got.commits, 1);
    assert_eq!(got.messages, vec![b"after restart".to_vec()]);
    server.shutdown().await;
}

#[tokio::test]
async fn groups_are_created_only_for_this_domain_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    alice.create_group(8).await;
    let info = alice
        .conn
        .call(FetchGroupInfoRequest { group: alice.gid() })
        .await
        .unwrap();
    let err = alice
        .conn
        .call(CreateGroupRequest {
            group: alice.gid(),
            group_info: info.group_info.clone(),
            ratchet_tree: info.ratchet_tree.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::GROUP_EXISTS);
    let mut other = alice.gid();
    other.domain = "elsewhere.test".parse().unwrap();
    let err = alice
        .conn
        .call(CreateGroupRequest {
            group: other,
            group_info: info.group_info.clone(),
            ratchet_tree: info.ratchet_tree,
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::FORBIDDEN);
    let mut unknown = alice.gid();
    unknown.uuid = [99; 16];
    let err = alice
        .conn
        .call(FetchGroupInfoRequest { group: unknown })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::GROUP_NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_removed_through_the_as_gets_nothing_more_and_the_others_still_do() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    let mut carol = Member::new(&server, "carol").await;
    bob.upload_key_packages(1).await;
    carol.upload_key_packages(1).await;
    alice.create_group(10).await;
    let kps = alice.claim(&[bob.user_id(), carol.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;
    carol.sync().await;
    // A message of this epoch: the DS has resolved who gets it.
    assert_eq!(alice.send(b"first").await.unwrap().recipients, 2);
    assert_eq!(carol.sync().await.messages, vec![b"first".to_vec()]);
    assert_eq!(bob.sync().await.messages, vec![b"first".to_vec()]);

    // Carol's device is removed through the AS while her leaf stays in the tree.
    let remover = connect(&server).await;
    remover
        .call(remove_client_request(&carol.user, carol.id()))
        .await
        .unwrap();
    assert_eq!(alice.send(b"second").await.unwrap().recipients, 1);
    assert_eq!(bob.sync().await.messages, vec![b"second".to_vec()]);
    assert_eq!(bob.send(b"third").await.unwrap().recipients, 1);
    assert_eq!(alice.sync().await.messages, vec![b"third".to_vec()]);
    let err = carol
        .conn
        .call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::CLIENT_NOT_FOUND);

    // The commit that removes her leaf and the next epoch's messages go through.
    let carol_leaf = alice.leaf_of(carol.id());
    alice.commit_and_merge(vec![], &[carol_leaf]).await;
    assert_eq!(bob.sync().await.commits, 1);
    assert_eq!(alice.send(b"fourth").await.unwrap().recipients, 1);
    assert_eq!(bob.sync().await.messages, vec![b"fourth".to_vec()]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_member_added_by_a_commit_gets_the_next_message_and_may_send() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    let mut dave = Member::new(&server, "dave").await;
    bob.upload_key_packages(1).await;
    dave.upload_key_packages(1).await;
    alice.create_group(11).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;
    assert_eq!(alice.send(b"before dave").await.unwrap().recipients, 1);

    // Dave joins in the next epoch: the next message reaches him too, and he may send.
    let kps = alice.claim(&[dave.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    assert!(dave.sync().await.joined);
    assert_eq!(alice.send(b"welcome dave").await.unwrap().recipients, 2);
    assert_eq!(dave.sync().await.messages, vec![b"welcome dave".to_vec()]);
    let got = bob.sync().await;
    assert_eq!(got.commits, 1);
    assert_eq!(
        got.messages,
        vec![b"before dave".to_vec(), b"welcome dave".to_vec()]
    );
    assert_eq!(dave.send(b"hi all").await.unwrap().recipients, 2);
    assert_eq!(alice.sync().await.messages, vec![b"hi all".to_vec()]);
    assert_eq!(bob.sync().await.messages, vec![b"hi all".to_vec()]);

    // Bob is removed by the next commit: messages of that epoch no longer reach him.
    let bob_leaf = alice.leaf_of(bob.id());
    alice.commit_and_merge(vec![], &[bob_leaf]).await;
    assert!(bob.sync().await.removed);
    assert_eq!(alice.send(b"without bob").await.unwrap().recipients, 1);
    assert_eq!(queued(&bob).await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn groups_dropped_from_the_cache_reload_and_still_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // One cached group: using either group evicts the other.
    cfg.limits.max_cached_groups = 1;
    let server = start(cfg).await;
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    let mut carol = Member::new(&server, "carol").await;
    let mut dave = Member::new(&server, "dave").await;
    bob.upload_key_packages(1).await;
    dave.upload_key_packages(2).await;
    alice.create_group(12).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    bob.sync().await;
    carol.create_group(13).await;
    let kps = carol.claim(&[dave.user_id()]).await;
    carol.commit_and_merge(kps, &[]).await;
    dave.sync().await;

    for round in 0..3u8 {
        assert_eq!(alice.send(&[b'a', round]).await.unwrap().recipients, 1);
        assert_eq!(carol.send(&[b'c', round]).await.unwrap().recipients, 1);
        assert_eq!(bob.send(&[b'b', round]).await.unwrap().recipients, 1);
        assert_eq!(dave.send(&[b'd', round]).await.unwrap().recipients, 1);
    }
    let expect = |tag: u8| (0..3u8).map(|n| vec![tag, n]).collect::<Vec<_>>();
    assert_eq!(bob.sync().await.messages, expect(b'a'));
    assert_eq!(alice.sync().await.messages, expect(b'b'));
    assert_eq!(dave.sync().await.messages, expect(b'c'));
    assert_eq!(carol.sync().await.messages, expect(b'd'));

    // A commit on a reloaded group, then its messages.
    assert_eq!(carol.commit_and_merge(vec![], &[]).await, 2);
    assert_eq!(alice.commit_and_merge(vec![], &[]).await, 2);
    assert_eq!(carol.send(b"epoch 2").await.unwrap().recipients, 1);
    let got = dave.sync().await;
    assert_eq!((got.commits, got.messages), (1, vec![b"epoch 2".to_vec()]));
    assert_eq!(alice.send(b"epoch 2").await.unwrap().recipients, 1);
    let got = bob.sync().await;
    assert_eq!((got.commits, got.messages), (1, vec![b"epoch 2".to_vec()]));
    server.shutdown().await;
}

#[tokio::test]
async fn added_credentials_must_match_the_as_and_remote_members_wait_for_federation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut alice = Member::new(&server, "alice").await;
    let carol = Member::new(&server, "carol").await;
    alice.create_group(9).await;

    // A KeyPackage naming carol but made with another key (never went through the KS).
    let impostor = TestClient {
        id: carol.id().clone(),
        key: keypair(),
        credential: carol.client.credential.clone(),
    };
    let forged = key_package_of(&impostor);
    let bundle = alice.commit(vec![forged], &[]);
    let err = alice.send_commit(&bundle).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::INVALID_COMMIT);
    alice.discard();

    // A member of another domain: refused with a clear error until federation exists.
    let remote = TestClient {
        id: "dave@elsewhere.test/phone".parse().unwrap(),
        key: keypair(),
        credential: carol.client.credential.clone(),
    };
    let bundle = alice.commit(vec![key_package_of(&remote)], &[]);
    let err = alice.send_commit(&bundle).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::UNKNOWN_DOMAIN);
    alice.discard();

    // Nothing changed: the group is at epoch 0 and a valid commit applies.
    assert_eq!(alice.commit_and_merge(vec![], &[]).await, 1);
    assert_eq!(queued(&carol).await, 0);
    server.shutdown().await;
}

fn key_package_of(client: &TestClient) -> openmls::prelude::KeyPackage {
    use openmls::prelude::tls_codec::Deserialize as _;
    let bytes = key_package(client);
    openmls::prelude::KeyPackageIn::tls_deserialize_exact(bytes.as_slice())
        .unwrap()
        .validate(
            openmls_rust_crypto::OpenMlsRustCrypto::default().crypto(),
            openmls::prelude::ProtocolVersion::Mls10,
        )
        .unwrap()
}

/// The application messages (as sent) waiting in `member`'s queue after what it processed.
async fn queued_messages(member: &Member) -> Vec<Vec<u8>> {
    use roost_protocol::messages::queue::QueuePayload;
    member
        .conn
        .call(QueueFetchRequest {
            after_seq: member.seen,
            max_messages: 1000,
            max_bytes: 1 << 24,
        })
        .await
        .unwrap()
        .messages
        .into_iter()
        .filter_map(|m| match m.payload {
            QueuePayload::GroupMessage(g) => Some(g.message.into_vec()),
            QueuePayload::Welcome(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn a_message_of_an_older_epoch_reaches_only_members_of_that_epoch_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let address = server.local_addr();
    let mut alice = Member::new(&server, "alice").await;
    let mut bob = Member::new(&server, "bob").await;
    let mut dave = Member::new(&server, "dave").await;
    bob.upload_key_packages(1).await;
    dave.upload_key_packages(1).await;
    alice.create_group(14).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    assert!(bob.sync().await.joined);
    // Bob writes at epoch 1; before it reaches the DS, alice adds dave (epoch 2).
    let old = {
        let group = bob.group.as_mut().unwrap();
        let message = group
            .create_message(&bob.provider, &bob.client.key, b"epoch 1")
            .unwrap();
        use openmls::prelude::tls_codec::Serialize as _;
        message.tls_serialize_detached().unwrap()
    };
    let kps = alice.claim(&[dave.user_id()]).await;
    assert_eq!(alice.commit_and_merge(kps, &[]).await, 2);
    assert!(dave.sync().await.joined);

    // The recent joins are part of the durable group state: a restart keeps them.
    server.shutdown().await;
    let server = restart_on(config(dir.path()), address).await;
    for member in [&mut alice, &mut bob, &mut dave] {
        member.conn = connect(&server).await;
        login(&member.conn, &member.client).await;
    }
    let sent = bob
        .conn
        .call(SendMessageRequest {
            group: alice.gid(),
            message: old.clone().into(),
        })
        .await
        .unwrap();
    assert_eq!(sent.recipients, 1, "only alice was a member at epoch 1");
    assert_eq!(queued_messages(&alice).await, vec![old.clone()]);
    assert!(
        queued_messages(&dave).await.is_empty(),
        "dave joined at epoch 2 and cannot read a message of epoch 1"
    );
    // A message of the current epoch reaches everyone, dave included.
    bob.sync().await;
    assert_eq!(bob.send(b"epoch 2").await.unwrap().recipients, 2);
    assert_eq!(dave.sync().await.messages, vec![b"epoch 2".to_vec()]);
    server.shutdown().await;
}
