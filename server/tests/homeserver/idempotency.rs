//! Idempotent submission: a repeat of an accepted SendMessage or Commit (the same bytes, e.g.
//! a retry after a lost answer) gets the original answer and is delivered once; a repeat of a
//! refused one is judged afresh; a repeat out of `receipt_window_secs` is judged as new; a
//! restart of the server forgets nothing. SendCounted refuses a used send counter and
//! recognises the sender's last accepted message at any time.

use roost_protocol::ErrorCode;
use roost_protocol::messages::delivery::CommitRequest;
use roost_protocol::messages::queue::QueueFetchRequest;

use crate::common::*;
use crate::mls_member::{Bundle, Member};

fn code(err: roost_client::transport::RequestError) -> ErrorCode {
    err.wire_error()
        .map(|e| e.code)
        .unwrap_or_else(|| panic!("not a server error: {err}"))
}

/// Entries in `member`'s queue it has not processed yet.
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

/// alice and bob in alice's group at epoch 1.
async fn pair(server: &roost_server::Server) -> (Member, Member) {
    let mut alice = Member::new(server, "alice").await;
    let mut bob = Member::new(server, "bob").await;
    bob.upload_key_packages(1).await;
    alice.create_group(1).await;
    let kps = alice.claim(&[bob.user_id()]).await;
    alice.commit_and_merge(kps, &[]).await;
    assert!(bob.sync().await.joined);
    (alice, bob)
}

async fn resend(member: &Member, bundle: &Bundle) -> Result<u64, ErrorCode> {
    member
        .send_commit(bundle)
        .await
        .map(|r| r.epoch)
        .map_err(code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_message_gets_the_original_answer_and_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (mut alice, mut bob) = pair(&server).await;
    let message = alice.encrypt(b"only once");
    let first = alice.send_bytes(&message).await.unwrap();
    let again = alice.send_bytes(&message).await.unwrap();
    assert_eq!(first.recipients, 1);
    assert_eq!(again.recipients, first.recipients, "the original answer");
    assert_eq!(queued(&bob).await, 1, "enqueued once");
    assert_eq!(bob.sync().await.messages, [b"only once".to_vec()]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_message_gets_its_original_answer_after_its_sender_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (mut alice, mut bob) = pair(&server).await;
    let message = bob.encrypt(b"before I go");
    let first = bob.send_bytes(&message).await.unwrap();
    assert_eq!(first.recipients, 1);
    assert_eq!(alice.sync().await.messages, [b"before I go".to_vec()]);
    let bob_leaf = alice.leaf_of(bob.id());
    alice.commit_and_merge(vec![], &[bob_leaf]).await;
    // bob is no longer in the group: his repeat (an answer he lost) still gets the original
    // answer, a new message of his is refused.
    let again = bob.send_bytes(&message).await.unwrap();
    assert_eq!(again.recipients, first.recipients, "the original answer");
    let new = bob.encrypt(b"after");
    assert_eq!(
        code(bob.send_bytes(&new).await.unwrap_err()),
        ErrorCode::NOT_MEMBER
    );
    assert!(
        alice.sync().await.messages.is_empty(),
        "the repeat was delivered again"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_commit_is_accepted_with_its_epoch_and_a_refused_one_is_judged_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (mut alice, mut bob) = pair(&server).await;
    let mut carol = Member::new(&server, "carol").await;
    carol.upload_key_packages(1).await;
    let kps = alice.claim(&[carol.user_id()]).await;
    let bundle = alice.commit(kps, &[]);
    // Refused (the Welcome is missing): nothing is remembered, the same commit is judged
    // afresh and accepted once the Welcome comes with it.
    let without = alice.conn.call(CommitRequest {
        group: alice.gid(),
        commit: bundle.commit.clone().into(),
        welcome: None,
        group_info: bundle.group_info.clone().into(),
    });
    assert_eq!(code(without.await.unwrap_err()), ErrorCode::MISSING_WELCOME);
    assert_eq!(resend(&alice, &bundle).await, Ok(2));
    // The group is at epoch 2 by this very commit: its repeat is accepted, not STALE_EPOCH.
    assert_eq!(resend(&alice, &bundle).await, Ok(2));
    assert_eq!(resend(&alice, &bundle).await, Ok(2));
    alice.merge();
    assert_eq!(queued(&bob).await, 1, "bob got the commit once");
    assert_eq!(bob.sync().await.commits, 1);
    assert_eq!(queued(&carol).await, 1, "carol got the Welcome once");
    assert!(carol.sync().await.joined);
    // The group goes on at epoch 2.
    bob.send(b"hi").await.unwrap();
    assert_eq!(carol.sync().await.messages, [b"hi".to_vec()]);
    assert_eq!(alice.sync().await.messages, [b"hi".to_vec()]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_the_window_is_judged_as_new() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.receipt_window_secs = 1;
    let clock = ManualClock::new();
    let server = start_with_clock(cfg, &clock).await;
    let (mut alice, bob) = pair(&server).await;
    let bundle = alice.commit(Vec::new(), &[]);
    assert_eq!(resend(&alice, &bundle).await, Ok(2));
    assert_eq!(resend(&alice, &bundle).await, Ok(2));
    alice.merge();
    let message = alice.encrypt(b"m");
    alice.send_bytes(&message).await.unwrap();
    alice.send_bytes(&message).await.unwrap();
    assert_eq!(
        queued(&bob).await,
        2,
        "the commit and the message, once each"
    );
    clock.advance(std::time::Duration::from_millis(1_200));
    // Forgotten: the commit is judged on the group's state (its epoch is closed), the
    // message is delivered again (the receiver's MLS state refuses the copy).
    assert_eq!(resend(&alice, &bundle).await, Err(ErrorCode::STALE_EPOCH));
    alice.send_bytes(&message).await.unwrap();
    assert_eq!(queued(&bob).await, 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_a_server_restart_is_still_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (mut alice, mut bob) = pair(&server).await;
    let bundle = alice.commit(Vec::new(), &[]);
    assert_eq!(resend(&alice, &bundle).await, Ok(2));
    let address = server.local_addr();
    // The answer is lost with the server.
    server.shutdown().await;
    let server = restart_on(config(dir.path()), address).await;
    for member in [&mut alice, &mut bob] {
        member.conn = connect(&server).await;
        login(&member.conn, &member.client).await;
    }
    assert_eq!(resend(&alice, &bundle).await, Ok(2));
    alice.merge();
    let message = alice.encrypt(b"after restart");
    assert_eq!(alice.send_bytes(&message).await.unwrap().recipients, 1);
    assert_eq!(alice.send_bytes(&message).await.unwrap().recipients, 1);
    assert_eq!(
        queued(&bob).await,
        2,
        "the commit and the message, once each"
    );
    let got = bob.sync().await;
    assert_eq!(
        (got.commits, got.messages),
        (1, vec![b"after restart".to_vec()])
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_package_upload_adds_nothing() {
    use roost_protocol::messages::keypackage::{KeyPackageCountRequest, UploadKeyPackagesRequest};
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let upload = UploadKeyPackagesRequest {
        key_packages: vec![key_package(&phone), key_package(&phone)],
        last_resort: None,
    };
    assert_eq!(conn.call(upload.clone()).await.unwrap().remaining, 2);
    // The answer was lost; the same upload again: the original answer, nothing added.
    assert_eq!(conn.call(upload).await.unwrap().remaining, 2);
    assert_eq!(
        conn.call(KeyPackageCountRequest {})
            .await
            .unwrap()
            .remaining,
        2
    );
    // Other KeyPackages are another upload.
    let more = UploadKeyPackagesRequest {
        key_packages: vec![key_package(&phone)],
        last_resort: None,
    };
    assert_eq!(conn.call(more).await.unwrap().remaining, 3);
    server.shutdown().await;
}

/// Sends `message` as SendCounted with `counter`.
async fn counted(
    member: &Member,
    counter: u64,
    message: &[u8],
) -> Result<
    roost_protocol::messages::delivery::SendMessageResponse,
    roost_client::transport::RequestError,
> {
    member
        .conn
        .call(roost_protocol::messages::delivery::SendCountedRequest {
            group: member.gid(),
            counter,
            message: message.to_vec().into(),
        })
        .await
}

/// SendCounted: a counter not above the sender's highest accepted one is refused with
/// SEND_COUNTER_USED (carrying that highest) and enqueues nothing; the repeat of the message
/// that carried the highest is answered as it was even after the receipt window; another
/// sender counts on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_counters_refuse_a_used_counter_and_recognise_the_last_message_at_any_time() {
    use roost_protocol::ErrorDetail;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.receipt_window_secs = 1;
    let clock = ManualClock::new();
    let server = start_with_clock(cfg, &clock).await;
    let (mut alice, mut bob) = pair(&server).await;
    let first = alice.encrypt(b"first");
    assert_eq!(counted(&alice, 5, &first).await.unwrap().recipients, 1);
    // Another message with a used counter (a restored copy of alice's state).
    for counter in [5, 4, 0] {
        let other = alice.encrypt(b"other");
        let err = counted(&alice, counter, &other).await.unwrap_err();
        let wire = err.wire_error().unwrap();
        assert_eq!(wire.code, ErrorCode::SEND_COUNTER_USED);
        assert_eq!(
            wire.detail,
            ErrorDetail::SendCounterUsed { highest_counter: 5 }
        );
    }
    assert_eq!(queued(&bob).await, 1, "only the first message");
    // Past the receipt window, the repeat of the last accepted message is still recognised.
    clock.advance(std::time::Duration::from_millis(1_500));
    assert_eq!(counted(&alice, 5, &first).await.unwrap().recipients, 1);
    assert_eq!(queued(&bob).await, 1, "not enqueued again");
    // bob counts on his own; alice goes on above her highest.
    let from_bob = bob.encrypt(b"from bob");
    counted(&bob, 1, &from_bob).await.unwrap();
    let second = alice.encrypt(b"second");
    counted(&alice, 6, &second).await.unwrap();
    assert_eq!(queued(&bob).await, 2);
    assert_eq!(
        bob.sync().await.messages,
        [b"first".to_vec(), b"second".to_vec()]
    );
    assert_eq!(alice.sync().await.messages, [b"from bob".to_vec()]);
    server.shutdown().await;
}
