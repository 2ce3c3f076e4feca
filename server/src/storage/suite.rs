//! The store test suite, written against the service traits only, so that every storage
//! engine runs the same tests: redb, and PostgreSQL on a throwaway cluster started by the test
//! (roost_interop::postgres; the binaries of the Debian package postgresql-15).

use roost_protocol::messages::auth::ClientCredential;
use roost_protocol::messages::federation::Delivery;
use roost_protocol::messages::keypackage::KeyPackageKind;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use roost_protocol::{ClientId, MessageId, UserName};
use tls_codec::Serialize as _;

use crate::admin::store::{AdminStore, StoreStats};
use crate::auth::AuthStore;
use crate::delivery::receipt::{Answer, CounterRow, Receipt, ReceiptStore, SendCounter};
use crate::delivery::{FanOut, GroupState, GroupStore, GroupWrite};
use crate::error::ServiceError;
use crate::federation::outbox::OutboxStore;
use crate::keypackage::KeyPackageStore;
use crate::push::{PushJob, PushStore};
use crate::queue::{Enqueued, QueueStore};

pub(crate) fn credential(client: &str) -> ClientCredential {
    ClientCredential {
        client: client.parse().unwrap(),
        signature_key: vec![7; 32].into(),
        not_before: 1,
        not_after: 2,
        as_signature: vec![9; 64].into(),
    }
}

pub(crate) fn payload(n: u8) -> Vec<u8> {
    let group = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .unwrap();
    QueuePayload::GroupMessage(GroupMessage {
        group,
        message: vec![n].into(),
    })
    .tls_serialize_detached()
    .unwrap()
}

pub(crate) async fn auth<S: AuthStore>(store: &S) {
    let name = "alice".parse().unwrap();
    store.create_user(&name, vec![1; 32], None).await.unwrap();
    assert!(matches!(
        store.create_user(&name, vec![2; 32], None).await,
        Err(ServiceError::UserExists)
    ));
    assert_eq!(store.user_key(&name).await.unwrap(), Some(vec![1; 32]));
    assert_eq!(store.user_key(&"bob".parse().unwrap()).await.unwrap(), None);
    // Tokens: two uses allowed.
    for (user, ok) in [("t1", true), ("t2", true), ("t3", false)] {
        let result = store
            .create_user(
                &user.parse().unwrap(),
                vec![1; 32],
                Some(("hash".into(), 2)),
            )
            .await;
        assert_eq!(result.is_ok(), ok, "{user}");
    }

    let phone: ClientId = "alice@example.org/phone".parse().unwrap();
    let num = store
        .add_client(credential("alice@example.org/phone"))
        .await
        .unwrap();
    let laptop = store
        .add_client(credential("alice@example.org/laptop"))
        .await
        .unwrap();
    assert_ne!(num, laptop);
    assert!(matches!(
        store
            .add_client(credential("alice@example.org/phone"))
            .await,
        Err(ServiceError::ClientExists)
    ));
    assert_eq!(
        store
            .active_client(&phone)
            .await
            .unwrap()
            .unwrap()
            .client_num,
        num
    );
    let all = store.active_clients_of(&phone.user).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|c| c.credential.client.device.to_string())
            .collect::<Vec<_>>(),
        ["laptop", "phone"]
    );

    // Client numbers of many clients in one call, in the order asked.
    let laptop_id: ClientId = "alice@example.org/laptop".parse().unwrap();
    let nobody: ClientId = "nobody@example.org/x".parse().unwrap();
    assert_eq!(
        store
            .client_nums(vec![laptop_id.clone(), nobody.clone(), phone.clone()])
            .await
            .unwrap(),
        vec![Some(laptop), None, Some(num)]
    );
    let mut renewed = credential("alice@example.org/phone");
    renewed.not_after = 99;
    store.replace_credential(renewed.clone()).await.unwrap();
    assert_eq!(
        store
            .active_client(&phone)
            .await
            .unwrap()
            .unwrap()
            .credential,
        renewed
    );

    // Removal leaves a tombstone: gone, and the name stays used.
    assert_eq!(store.remove_client(&phone).await.unwrap(), num);
    assert_eq!(store.active_client(&phone).await.unwrap(), None);
    assert_eq!(
        store.client_nums(vec![phone.clone()]).await.unwrap(),
        vec![None]
    );
    assert!(matches!(
        store.remove_client(&phone).await,
        Err(ServiceError::ClientNotFound)
    ));
    assert!(matches!(
        store
            .add_client(credential("alice@example.org/phone"))
            .await,
        Err(ServiceError::ClientExists)
    ));
    assert!(matches!(
        store.replace_credential(renewed).await,
        Err(ServiceError::ClientNotFound)
    ));
}

/// The KeyPackages `n` claims of `client` get, in order.
async fn claims<S: KeyPackageStore>(
    store: &S,
    client: &ClientId,
    now: u64,
    n: usize,
) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let claimed = store.claim_one(client, now).await.unwrap();
        out.push(claimed.key_package.into_vec());
    }
    out
}

pub(crate) async fn key_packages<S: AuthStore + KeyPackageStore>(store: &S) {
    let client: ClientId = "kp@example.org/phone".parse().unwrap();
    let num = store
        .add_client(credential("kp@example.org/phone"))
        .await
        .unwrap();
    let now = 1000;
    let held = store
        .add(
            num,
            vec![(now + 10, vec![1]), (now - 1, vec![2]), (now + 10, vec![3])],
            Some((now + 10, vec![9])),
            5,
            None,
        )
        .await
        .unwrap();
    assert_eq!(held, 3);
    assert!(matches!(
        store
            .add(num, vec![(now + 10, vec![4]); 3], None, 5, None)
            .await,
        Err(ServiceError::LimitExceeded(_))
    ));
    assert_eq!(store.count(num, now).await.unwrap(), (2, true));
    // Oldest first, expired skipped, then the last resort, which stays.
    let order: Vec<(Vec<u8>, KeyPackageKind)> = {
        let mut out = Vec::new();
        for _ in 0..4 {
            let claimed = store.claim_one(&client, now).await.unwrap();
            out.push((claimed.key_package.into_vec(), claimed.kind));
        }
        out
    };
    assert_eq!(
        order,
        [
            (vec![1], KeyPackageKind::Ordinary),
            (vec![3], KeyPackageKind::Ordinary),
            (vec![9], KeyPackageKind::LastResort),
            (vec![9], KeyPackageKind::LastResort),
        ]
    );
    assert_eq!(store.count(num, now).await.unwrap(), (0, true));
    assert!(matches!(
        store.claim_one(&client, now + 100).await,
        Err(ServiceError::NoKeyPackage)
    ));
    assert_eq!(
        store.claim_for_user(&client.user, now).await.unwrap().len(),
        1
    );
    store
        .add(num, vec![(now + 1, vec![5])], None, 5, None)
        .await
        .unwrap();
    assert_eq!(store.purge_expired(now + 1).await.unwrap(), 1);
    assert_eq!(store.count(num, now).await.unwrap(), (0, true));

    // Many claims of one client with uploads in between: every KeyPackage handed out once, in
    // upload order, and what is held (the upload limit) counts only what is left.
    let many: ClientId = "kpmany@example.org/phone".parse().unwrap();
    let many_num = store
        .add_client(credential("kpmany@example.org/phone"))
        .await
        .unwrap();
    let mut uploaded = 0u32;
    let mut upload = |n: u32| {
        let kps: Vec<(u64, Vec<u8>)> = (uploaded + 1..=uploaded + n)
            .map(|i| (now + 10, i.to_be_bytes().to_vec()))
            .collect();
        uploaded += n;
        kps
    };
    let mut handed = Vec::new();
    for round in 0..4u64 {
        let held = store.add(many_num, upload(20), None, 30, None).await;
        assert_eq!(held.unwrap(), 20 + 3 * round);
        handed.extend(claims(store, &many, now, 17).await);
    }
    // 12 held: 20 more would be 32, over the limit of 30; 18 fit.
    assert!(matches!(
        store
            .add(many_num, vec![(now + 10, vec![0]); 20], None, 30, None)
            .await,
        Err(ServiceError::LimitExceeded(_))
    ));
    assert_eq!(
        store
            .add(many_num, upload(18), None, 30, None)
            .await
            .unwrap(),
        30
    );
    assert_eq!(store.count(many_num, now).await.unwrap(), (30, false));
    handed.extend(claims(store, &many, now, 30).await);
    let expected: Vec<Vec<u8>> = (1..=uploaded).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(handed, expected);
    assert!(matches!(
        store.claim_one(&many, now).await,
        Err(ServiceError::NoKeyPackage)
    ));
    assert_eq!(store.count(many_num, now).await.unwrap(), (0, false));
    // Nothing held expires: the handed-out ones are not counted again.
    assert_eq!(store.purge_expired(now + 10).await.unwrap(), 0);
}

pub(crate) async fn queues<S: AuthStore + QueueStore>(store: &S) {
    let client: ClientId = "q@example.org/phone".parse().unwrap();
    let num = store
        .add_client(credential("q@example.org/phone"))
        .await
        .unwrap();
    for n in 1..=3u8 {
        let got = store
            .enqueue(
                &client,
                MessageId([n; 16]),
                100 * u64::from(n),
                payload(n),
                3,
            )
            .await
            .unwrap();
        assert_eq!(got, (num, Enqueued::Queued(u64::from(n))));
    }
    // Idempotent, then full.
    assert_eq!(
        store
            .enqueue(&client, MessageId([2; 16]), 0, payload(2), 3)
            .await
            .unwrap()
            .1,
        Enqueued::Duplicate(2)
    );
    assert_eq!(
        store
            .enqueue(&client, MessageId([4; 16]), 400, payload(4), 3)
            .await
            .unwrap()
            .1,
        Enqueued::Full
    );
    let (messages, head) = store.read_queue(num, 0, 10, 1 << 20, 0).await.unwrap();
    assert_eq!(
        (messages.iter().map(|m| m.seq).collect::<Vec<_>>(), head),
        (vec![1, 2, 3], 3)
    );
    assert_eq!(
        store.read_queue(num, 1, 1, 1 << 20, 0).await.unwrap().0[0].seq,
        2
    );
    // Age cut-off hides old messages; ack deletes.
    assert_eq!(
        store
            .read_queue(num, 0, 10, 1 << 20, 250)
            .await
            .unwrap()
            .0
            .len(),
        1
    );
    store.ack(num, 1).await.unwrap();
    assert_eq!(
        store
            .read_queue(num, 0, 10, 1 << 20, 0)
            .await
            .unwrap()
            .0
            .len(),
        2
    );
    assert_eq!(store.expire(250).await.unwrap(), 1);
    assert_eq!(
        store
            .read_queue(num, 0, 10, 1 << 20, 0)
            .await
            .unwrap()
            .0
            .len(),
        1
    );
    // Peer deliveries: idempotent, unknown recipients counted.
    let delivery = |recipients: &[&str], n: u8| Delivery {
        recipients: recipients.iter().map(|r| r.parse().unwrap()).collect(),
        id: MessageId([n; 16]),
        timestamp_ms: 0,
        payload: QueuePayload::Welcome(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![n].into(),
        }),
    };
    let (response, woken) = store
        .deliver(
            vec![
                delivery(&["q@example.org/phone", "nobody@example.org/x"], 50),
                delivery(&["nobody@example.org/y"], 51),
            ],
            10,
            500,
        )
        .await
        .unwrap();
    assert_eq!((response.accepted, response.unknown_recipients), (1, 2));
    let woken: Vec<(u64, u64)> = woken.iter().map(|(n, f)| (*n, f.seq)).collect();
    assert_eq!(woken, vec![(num, 4)]);
    let (response, _) = store
        .deliver(vec![delivery(&["q@example.org/phone"], 50)], 10, 500)
        .await
        .unwrap();
    assert_eq!(response.accepted, 0);
    // A removed client's queue is gone and cannot be acked.
    store.remove_client(&client).await.unwrap();
    assert!(
        store
            .read_queue(num, 0, 10, 1 << 20, 0)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert!(matches!(
        store.ack(num, 10).await,
        Err(ServiceError::ClientNotFound)
    ));
}

/// Creates a group `key` at epoch and version 0.
pub(crate) async fn new_group<S: GroupStore>(store: &S, key: &[u8]) {
    store
        .create_group(GroupState {
            key: key.to_vec(),
            epoch: 0,
            version: 0,
            snapshot: vec![1],
            chain: Default::default(),
        })
        .await
        .unwrap();
}

/// Adds `count` clients named `{prefix}{i}@example.org/phone` and creates group `[5, 5]`;
/// returns the clients' numbers, ascending.
pub(crate) async fn group_of<S: AuthStore + GroupStore>(
    store: &S,
    prefix: &str,
    count: usize,
) -> Vec<u64> {
    let mut nums = Vec::new();
    for i in 0..count {
        let name = format!("{prefix}{i}@example.org/phone");
        nums.push(store.add_client(credential(&name)).await.unwrap());
    }
    nums.sort_unstable();
    new_group(store, &[5, 5]).await;
    nums
}

/// The expiry sweep removes exactly what is older than the cutoff — queued messages (enqueued
/// one by one, delivered by a peer or fanned out by the DS; partly acked or not), dedup
/// records (also those whose messages were all acked) and KeyPackages, ordinary and last
/// resort — in several transactions when much expires at once, and leaves everything newer:
/// messages readable, queue depths right, dedup records still refusing repeats, KeyPackages
/// claimable.
pub(crate) async fn expiry<S: AuthStore + QueueStore + GroupStore + KeyPackageStore>(store: &S) {
    let mut clients = Vec::new();
    let mut nums = Vec::new();
    for name in ["e0", "e1", "e2"] {
        let full = format!("{name}@example.org/phone");
        nums.push(store.add_client(credential(&full)).await.unwrap());
        clients.push(full.parse::<ClientId>().unwrap());
    }
    let nums: &[u64] = &nums;
    let (old, new, cutoff) = (100, 10_000, 5_000);
    let group = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse::<roost_protocol::GroupId>()
        .unwrap();
    let message = |n: u8| {
        QueuePayload::GroupMessage(GroupMessage {
            group: group.clone(),
            message: vec![n].into(),
        })
    };
    let delivery = |to: &[usize], n: u8| Delivery {
        recipients: to.iter().map(|&i| clients[i].clone()).collect(),
        id: MessageId([n; 16]),
        timestamp_ms: 0,
        payload: message(n),
    };
    new_group(store, &[7, 7]).await;
    let fan_out = |n: u8, timestamp_ms: u64| async move {
        let write = GroupWrite {
            key: vec![7, 7],
            loaded: 0,
            state: None,
            receipt: None,
            lazy: false,
        };
        let mut local = nums.to_vec();
        local.sort_unstable();
        let fan = FanOut {
            local,
            remote: Default::default(),
            payload: message(n),
            timestamp_ms,
        };
        store.apply(write, vec![fan], 100).await.unwrap();
    };
    let seqs = |i: usize| {
        let num = nums[i];
        async move {
            let (messages, _) = store.read_queue(num, 0, 10_000, 1 << 24, 0).await.unwrap();
            messages.iter().map(|m| m.seq).collect::<Vec<_>>()
        }
    };
    // Old messages (queue seqs in the comments: e0, e1, e2).
    let one = |i: usize, n: u8, at: u64, depth: u64| {
        let client = clients[i].clone();
        async move {
            store
                .enqueue(&client, MessageId([n; 16]), at, payload(n), depth)
                .await
                .unwrap()
                .1
        }
    };
    assert_eq!(one(0, 1, old, 100).await, Enqueued::Queued(1));
    store
        .deliver(vec![delivery(&[0, 1, 2], 3)], 100, old)
        .await
        .unwrap(); // 2, 1, 1
    store
        .deliver(vec![delivery(&[2], 5)], 100, old)
        .await
        .unwrap(); // -, -, 2
    fan_out(6, old).await; // 3, 2, 3
    // New ones.
    assert_eq!(one(0, 2, new, 100).await, Enqueued::Queued(4));
    store
        .deliver(vec![delivery(&[0, 1, 2], 4)], 100, new)
        .await
        .unwrap(); // 5, 3, 4
    fan_out(7, new).await; // 6, 4, 5
    // e1 acks all its old ones; e2 the delivered ones (id 5's payload is then released, its
    // dedup record stays).
    store.ack(nums[1], 2).await.unwrap();
    store.ack(nums[2], 2).await.unwrap();

    // Left old: e0's 1, 2, 3 and e2's 3.
    assert_eq!(store.expire(cutoff).await.unwrap(), 4);
    assert_eq!(seqs(0).await, vec![4, 5, 6]);
    assert_eq!(seqs(1).await, vec![3, 4]);
    assert_eq!(seqs(2).await, vec![4, 5]);
    assert_eq!(store.expire(cutoff).await.unwrap(), 0);
    // Old dedup records are gone (the same ids queue again), new ones still refuse repeats.
    assert_eq!(one(0, 1, new + 1, 100).await, Enqueued::Queued(7));
    assert_eq!(one(0, 2, new + 1, 100).await, Enqueued::Duplicate(4));
    let (response, _) = store
        .deliver(vec![delivery(&[2], 5), delivery(&[1], 4)], 100, new + 1)
        .await
        .unwrap();
    assert_eq!(response.accepted, 1);
    assert_eq!(seqs(2).await, vec![4, 5, 6]);
    // Depths count what is left: e1 holds 2 (3, 4), e2 holds 3 (4, 5, 6).
    assert_eq!(one(1, 20, new + 2, 3).await, Enqueued::Queued(5));
    assert_eq!(one(1, 21, new + 2, 3).await, Enqueued::Full);
    assert_eq!(one(2, 20, new + 2, 3).await, Enqueued::Full);

    // Much expiring at once goes in several transactions, all of it.
    let many: Vec<Delivery> = (0..2_500u32)
        .map(|n| Delivery {
            recipients: vec![clients[0].clone(), clients[1].clone()],
            id: MessageId({
                let mut id = [0xee; 16];
                id[..4].copy_from_slice(&n.to_be_bytes());
                id
            }),
            timestamp_ms: 0,
            payload: message(9),
        })
        .collect();
    let (response, _) = store.deliver(many, 10_000, 20_000).await.unwrap();
    assert_eq!(response.accepted, 5_000);
    let held: usize = [
        seqs(0).await.len(),
        seqs(1).await.len(),
        seqs(2).await.len(),
    ]
    .iter()
    .sum();
    assert_eq!(held, 4 + 2_500 + 3 + 2_500 + 3);
    assert_eq!(store.expire(30_000).await.unwrap(), held as u64);
    for i in 0..3 {
        assert!(seqs(i).await.is_empty(), "queue {i} emptied");
    }
    // Every dedup record went with them.
    assert_eq!(one(0, 2, 30_001, 100).await, Enqueued::Queued(2_508));

    // KeyPackages: e0 holds a mix and replaces its last-resort one; e1 holds 2,500 that
    // expire at once and one that does not.
    let kp = |b: u8| vec![b; 8];
    store
        .add(
            nums[0],
            vec![(50, kp(1)), (200, kp(2)), (50, kp(3)), (300, kp(4))],
            Some((50, kp(9))),
            10,
            None,
        )
        .await
        .unwrap();
    store
        .add(nums[0], Vec::new(), Some((400, kp(10))), 10, None)
        .await
        .unwrap();
    let mut lots: Vec<(u64, Vec<u8>)> = (0..2_500).map(|_| (60, kp(5))).collect();
    lots.push((500, kp(6)));
    store
        .add(nums[1], lots, Some((60, kp(11))), 10_000, None)
        .await
        .unwrap();
    let claimed = store.claim_one(&clients[0], 10).await.unwrap();
    assert_eq!(claimed.key_package.as_slice(), kp(1).as_slice());
    // Expired at 100: e0's third, e1's 2,500 (and e1's last-resort one).
    assert_eq!(store.purge_expired(100).await.unwrap(), 2_501);
    assert_eq!(store.purge_expired(100).await.unwrap(), 0);
    assert_eq!(store.count(nums[0], 100).await.unwrap(), (2, true));
    assert_eq!(store.count(nums[1], 0).await.unwrap(), (1, false));
    let taken = |i: usize| {
        let client = clients[i].clone();
        async move {
            store
                .claim_one(&client, 100)
                .await
                .map(|c| (c.key_package.as_slice().to_vec(), c.kind))
        }
    };
    assert_eq!(taken(0).await.unwrap(), (kp(2), KeyPackageKind::Ordinary));
    assert_eq!(taken(0).await.unwrap(), (kp(4), KeyPackageKind::Ordinary));
    assert_eq!(
        taken(0).await.unwrap(),
        (kp(10), KeyPackageKind::LastResort)
    );
    assert_eq!(taken(1).await.unwrap(), (kp(6), KeyPackageKind::Ordinary));
    assert!(matches!(taken(1).await, Err(ServiceError::NoKeyPackage)));
    // The replacing last-resort one expires in its turn.
    assert_eq!(store.purge_expired(400).await.unwrap(), 0);
    assert!(matches!(taken(0).await, Err(ServiceError::NoKeyPackage)));
}

/// Sends one group's messages as the DS does: `senders` tasks at once, each taking the
/// group's lock, submitting its message, releasing the lock and waiting until the message is
/// durable. A message's tag is (`node`, sender, number). Returns, per message in the order
/// the lock gave them, (its tag, whether it was answered as durable).
pub(crate) async fn send_into_one_group(
    store: &crate::storage::Backend,
    recipients: &[u64],
    node: u8,
    senders: u8,
    each: u8,
) -> Vec<([u8; 3], bool)> {
    use std::sync::Arc;
    let order: Arc<tokio::sync::Mutex<Vec<[u8; 3]>>> = Default::default();
    type Answered = std::sync::Mutex<Vec<([u8; 3], bool)>>;
    let answered: Arc<Answered> = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    for sender in 0..senders {
        let (store, order, answered) = (store.clone(), order.clone(), answered.clone());
        let recipients = recipients.to_vec();
        tasks.spawn(async move {
            for n in 0..each {
                let tag = [node, sender, n];
                let write = GroupWrite {
                    key: vec![5, 5],
                    loaded: 0,
                    state: None,
                    receipt: None,
                    lazy: false,
                };
                let fan = FanOut {
                    local: recipients.clone(),
                    remote: Default::default(),
                    payload: QueuePayload::GroupMessage(GroupMessage {
                        group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                            .parse()
                            .unwrap(),
                        message: tag.to_vec().into(),
                    }),
                    timestamp_ms: crate::unix_millis(),
                };
                let mut lock = order.lock().await;
                let applying = store.submit(write, vec![fan], 100_000).await;
                lock.push(tag);
                drop(lock);
                let durable = match applying {
                    Ok(applying) => applying.durable().await.is_ok(),
                    Err(_) => false,
                };
                answered.lock().unwrap().push((tag, durable));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let order = order.lock().await.clone();
    order
        .into_iter()
        .map(|tag| {
            let ok = answered.iter().any(|(t, ok)| *t == tag && *ok);
            (tag, ok)
        })
        .collect()
}

/// The tags of the group messages in a queue, in queue order.
pub(crate) async fn tags_in<S: QueueStore>(store: &S, num: u64) -> Vec<[u8; 3]> {
    let (messages, _) = store.read_queue(num, 0, 100_000, 1 << 26, 0).await.unwrap();
    messages
        .iter()
        .filter_map(|m| match &m.payload {
            QueuePayload::GroupMessage(g) => g.message.as_slice().try_into().ok(),
            _ => None,
        })
        .collect()
}

/// One group's messages sent by many at once, each sender waiting for durability only after
/// the group's lock is released (so they share the engine's batches): every recipient has
/// every message, in the order the lock gave them.
pub(crate) async fn one_group_in_order(store: &crate::storage::Backend) {
    let recipients = group_of(store, "o", 4).await;
    let sent = send_into_one_group(store, &recipients, 0, 16, 20).await;
    assert!(sent.iter().all(|(_, ok)| *ok), "every message answered");
    let order: Vec<[u8; 3]> = sent.into_iter().map(|(tag, _)| tag).collect();
    assert_eq!(order.len(), 16 * 20);
    for &num in &recipients {
        assert_eq!(tags_in(store, num).await, order, "queue {num}");
    }
}

/// Deterministic pseudo-random bytes (xorshift), a stand-in for a group snapshot.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A new group's state: `snapshot` as its base, at epoch and version 0.
pub(crate) fn base_state(key: &[u8], snapshot: &[u8]) -> GroupState {
    GroupState {
        key: key.to_vec(),
        epoch: 0,
        version: 0,
        snapshot: snapshot.to_vec(),
        chain: Default::default(),
    }
}

/// The write of a group's state of `loaded + 1` at `epoch`, stored as `form` (`chain` after
/// it), with no fan-out.
pub(crate) fn state_write(
    key: &[u8],
    loaded: u64,
    epoch: u64,
    (form, chain): (
        crate::storage::group_delta::Stored,
        crate::storage::group_delta::Chain,
    ),
) -> GroupWrite {
    GroupWrite {
        key: key.to_vec(),
        loaded,
        state: Some(GroupState {
            key: key.to_vec(),
            epoch,
            version: loaded + 1,
            snapshot: form.into_bytes(),
            chain,
        }),
        receipt: None,
        lazy: false,
    }
}

/// The snapshot after write `step` of [`group_deltas`]: a few bytes changed here and there,
/// sometimes bytes inserted (everything after them shifts), as a commit changes a tree.
pub(crate) fn next_snapshot(previous: &[u8], step: u64) -> Vec<u8> {
    let mut new = previous.to_vec();
    for n in 0..3 {
        let at = ((step * 7_919 + n * 3_331) as usize) % (new.len() - 40);
        new[at..at + 32].copy_from_slice(&noise(step * 3 + n, 32));
    }
    if step.is_multiple_of(5) {
        let at = (step as usize * 104_729) % new.len();
        new.splice(at..at, noise(step, 17));
    }
    new
}

/// A group's state written as the DS writes it, a delta or a new base as
/// [`group_delta::next`] decides, each write checked against the stored version: every load
/// gives exactly the snapshot last written, its epoch, version and chain; a write against an
/// old version writes nothing.
pub(crate) async fn group_deltas<S: GroupStore>(store: &S) {
    use crate::storage::group_delta::{self, Chain, Stored};
    let key = vec![4, 5, 6];
    let mut snapshot = noise(1, 20_000);
    store
        .create_group(base_state(&key, &snapshot))
        .await
        .unwrap();
    let mut chain = Chain::default();
    let (mut deltas, mut bases) = (0, 0);
    for version in 1..=150u64 {
        let new = next_snapshot(&snapshot, version);
        let (stored, after) = group_delta::next(&snapshot, &new, chain);
        match &stored {
            Stored::Full(_) => bases += 1,
            Stored::Delta(_) => deltas += 1,
        }
        if version % 10 == 0 {
            // Written against the version before last: refused, nothing written.
            let stale = Chain {
                deltas: chain.deltas + 1,
                bytes: chain.bytes + 8,
            };
            let write = state_write(&key, version - 2, 0, (Stored::Delta(vec![9; 8]), stale));
            let refused = store.apply(write, Vec::new(), 10).await;
            assert!(
                matches!(refused, Err(ServiceError::GroupMoved)),
                "{version}"
            );
        }
        let write = state_write(&key, version - 1, version * 2, (stored, after));
        store.apply(write, Vec::new(), 10).await.unwrap();
        (snapshot, chain) = (new, after);
        let loaded = store.load_group(key.clone()).await.unwrap().unwrap();
        assert_eq!(
            (loaded.epoch, loaded.version, loaded.chain),
            (version * 2, version, chain),
            "version {version}"
        );
        assert!(
            loaded.snapshot == snapshot,
            "version {version}: snapshot differs"
        );
    }
    // Mostly deltas, and new bases now and then.
    assert!(deltas > 100 && bases >= 2, "{deltas} deltas, {bases} bases");
}

pub(crate) async fn groups_and_outbox<S: AuthStore + QueueStore + GroupStore + OutboxStore>(
    store: &S,
) {
    let num = store
        .add_client(credential("g@example.org/phone"))
        .await
        .unwrap();
    let state = |epoch| GroupState {
        key: vec![1, 2, 3],
        epoch,
        version: epoch,
        snapshot: vec![epoch as u8; 10],
        chain: Default::default(),
    };
    let write = |loaded: u64, state: Option<GroupState>| GroupWrite {
        key: vec![1, 2, 3],
        loaded,
        state,
        receipt: None,
        lazy: false,
    };
    store.create_group(state(0)).await.unwrap();
    assert!(matches!(
        store.create_group(state(0)).await,
        Err(ServiceError::GroupExists)
    ));
    assert_eq!(
        store
            .load_group(vec![1, 2, 3])
            .await
            .unwrap()
            .unwrap()
            .snapshot,
        vec![0; 10]
    );
    assert!(store.load_group(vec![9]).await.unwrap().is_none());
    assert_eq!(store.group_version(vec![1, 2, 3]).await.unwrap(), Some(0));
    assert_eq!(store.group_version(vec![9]).await.unwrap(), None);

    let beta: roost_protocol::Domain = "beta.test".parse().unwrap();
    let remote: Vec<ClientId> = vec![
        "r@beta.test/phone".parse().unwrap(),
        "s@beta.test/laptop".parse().unwrap(),
    ];
    let fan = |n: u8| FanOut {
        // A client number without a queue stands for a client removed meanwhile.
        local: vec![num + 1000, num],
        remote: [(beta.clone(), remote.clone())].into_iter().collect(),
        payload: QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![n].into(),
        }),
        timestamp_ms: crate::unix_millis(),
    };
    // A write against a version that is not the stored one (another node moved the group on)
    // writes nothing: neither the state nor any queue or outbox entry.
    for stale in [write(1, Some(state(2))), write(5, None)] {
        assert!(matches!(
            store.apply(stale, vec![fan(1)], 10).await,
            Err(ServiceError::GroupMoved)
        ));
    }
    assert!(matches!(
        store
            .apply(
                GroupWrite {
                    key: vec![9],
                    loaded: 0,
                    state: None,
                    receipt: None,
                    lazy: false,
                },
                vec![fan(1)],
                10
            )
            .await,
        Err(ServiceError::GroupMoved)
    ));
    assert_eq!(store.read_queue(num, 0, 10, 1 << 20, 0).await.unwrap().1, 0);
    assert!(store.pending_domains().await.unwrap().is_empty());
    let result = store
        .apply(write(0, Some(state(1))), vec![fan(1), fan(2)], 10)
        .await
        .unwrap();
    // Unknown local recipients are skipped; remote ones are counted once in the outbox.
    assert_eq!(result.reached, vec![3, 3]);
    let seqs: Vec<(u64, u64)> = result.queues.iter().map(|(n, f)| (*n, f.seq)).collect();
    assert_eq!(seqs, vec![(num, 1), (num, 2)]);
    assert_eq!(
        store
            .load_group(vec![1, 2, 3])
            .await
            .unwrap()
            .unwrap()
            .epoch,
        1
    );
    assert_eq!(store.group_version(vec![1, 2, 3]).await.unwrap(), Some(1));
    // The version moved: the old one is refused, the new one accepted.
    assert!(matches!(
        store.apply(write(0, None), Vec::new(), 10).await,
        Err(ServiceError::GroupMoved)
    ));
    store.apply(write(1, None), Vec::new(), 10).await.unwrap();
    assert_eq!(
        store
            .read_queue(num, 0, 10, 1 << 20, 0)
            .await
            .unwrap()
            .0
            .len(),
        2
    );

    assert_eq!(store.pending_domains().await.unwrap(), vec![beta.clone()]);
    // One entry per message for the domain, naming both recipients, the payload once.
    let batch = store.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
    assert_eq!(batch.len(), 2);
    assert!(batch.iter().all(|(_, d)| d.recipients == remote));
    assert!(batch[0].0 < batch[1].0, "in order");
    assert_eq!(batch[0].1.payload, fan(1).payload);
    assert_eq!(batch[1].1.payload, fan(2).payload);
    // Batches are bounded by count and by bytes; the first entry always goes.
    assert_eq!(
        store
            .outbox_batch(&beta, 1, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.outbox_batch(&beta, 10, 1).await.unwrap().len(), 1);
    store.outbox_remove(&beta, vec![batch[0].0]).await.unwrap();
    assert_eq!(
        store
            .outbox_batch(&beta, 10, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    store.outbox_remove(&beta, vec![batch[1].0]).await.unwrap();
    assert!(store.pending_domains().await.unwrap().is_empty());

    // A message for more recipients of one domain than an entry names is split.
    let many: Vec<ClientId> = (0..1500)
        .map(|i| format!("u{i}@beta.test/d").parse().unwrap())
        .collect();
    let big = FanOut {
        local: Vec::new(),
        remote: [(beta.clone(), many.clone())].into_iter().collect(),
        payload: fan(3).payload,
        timestamp_ms: crate::unix_millis(),
    };
    let result = store.apply(write(1, None), vec![big], 10).await.unwrap();
    assert_eq!(result.reached, vec![1500]);
    let batch = store.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
    let sizes: Vec<usize> = batch.iter().map(|(_, d)| d.recipients.len()).collect();
    assert_eq!(sizes, vec![1024, 476]);
    let named: Vec<ClientId> = batch
        .iter()
        .flat_map(|(_, d)| d.recipients.clone())
        .collect();
    assert_eq!(named, many);
    let first_len = {
        use tls_codec::Size as _;
        batch[0].1.tls_serialized_len()
    };
    assert_eq!(
        store
            .outbox_batch(&beta, 10, first_len)
            .await
            .unwrap()
            .len(),
        1,
        "a byte budget of one entry holds one"
    );

    // Every destination with entries is listed once, in name order, however many entries
    // each holds.
    let domains: Vec<roost_protocol::Domain> = ["a.test", "gamma.test", "zeta.test"]
        .iter()
        .map(|d| d.parse().unwrap())
        .collect();
    for round in 0..3u8 {
        let fan = FanOut {
            local: Vec::new(),
            remote: domains
                .iter()
                .map(|d| (d.clone(), vec![format!("u@{d}/x").parse().unwrap()]))
                .collect(),
            payload: fan(10 + round).payload,
            timestamp_ms: crate::unix_millis(),
        };
        store.apply(write(1, None), vec![fan], 10).await.unwrap();
    }
    let mut expected = domains.clone();
    expected.push(beta.clone());
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(store.pending_domains().await.unwrap(), expected);
}

/// The group, members and payloads of the lazy fan-out tests.
mod lazy {
    use super::*;

    pub(super) const KEY: [u8; 2] = [4, 2];

    pub(super) fn message(group_byte: u8) -> QueuePayload {
        QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![group_byte].into(),
        })
    }

    pub(super) fn fan(local: &[u64], payload: QueuePayload) -> FanOut {
        FanOut {
            local: local.to_vec(),
            remote: Default::default(),
            payload,
            timestamp_ms: crate::unix_millis(),
        }
    }

    /// A commit (version `loaded` → `loaded + 1`) to `members` and a Welcome to `joiner`,
    /// fanned out lazily.
    pub(super) fn commit(loaded: u64) -> GroupWrite {
        GroupWrite {
            key: KEY.to_vec(),
            loaded,
            state: Some(GroupState {
                key: KEY.to_vec(),
                epoch: loaded + 1,
                version: loaded + 1,
                snapshot: vec![loaded as u8 + 1; 4],
                chain: Default::default(),
            }),
            receipt: None,
            lazy: true,
        }
    }

    /// A message fan-out (the state unchanged), written at once.
    pub(super) fn message_write(loaded: u64) -> GroupWrite {
        GroupWrite {
            key: KEY.to_vec(),
            loaded,
            state: None,
            receipt: None,
            lazy: false,
        }
    }

    pub(super) async fn payloads<S: QueueStore>(store: &S, num: u64) -> Vec<(u64, QueuePayload)> {
        let (messages, _) = store.read_queue(num, 0, 100, 1 << 20, 0).await.unwrap();
        messages.into_iter().map(|m| (m.seq, m.payload)).collect()
    }
}

/// Without a crash: a lazy commit is answered with every recipient counted and its entries
/// are queued before anything written after its answer (a message the committer sends next).
pub(crate) async fn lazy_fan_out<S: AuthStore + QueueStore + GroupStore>(store: &S) {
    let mut members = Vec::new();
    for name in ["la", "lb", "lc"] {
        members.push(
            store
                .add_client(credential(&format!("{name}@example.org/d")))
                .await
                .unwrap(),
        );
    }
    let joiner = store
        .add_client(credential("ld@example.org/d"))
        .await
        .unwrap();
    store
        .create_group(GroupState {
            key: lazy::KEY.to_vec(),
            epoch: 0,
            version: 0,
            snapshot: vec![0; 4],
            chain: Default::default(),
        })
        .await
        .unwrap();
    let result = store
        .apply(
            lazy::commit(0),
            vec![
                lazy::fan(&members, lazy::message(1)),
                lazy::fan(&[joiner], lazy::message(2)),
            ],
            10,
        )
        .await
        .unwrap();
    assert_eq!(result.reached, vec![3, 1]);
    let sent = store
        .apply(
            lazy::message_write(1),
            vec![lazy::fan(&members, lazy::message(3))],
            10,
        )
        .await
        .unwrap();
    let seqs: Vec<u64> = sent.queues.iter().map(|(_, f)| f.seq).collect();
    assert_eq!(seqs, vec![2, 2, 2], "the commit took seq 1 in every queue");
    for &num in &members {
        assert_eq!(
            lazy::payloads(store, num).await,
            vec![(1, lazy::message(1)), (2, lazy::message(3))]
        );
    }
    assert_eq!(
        lazy::payloads(store, joiner).await,
        vec![(1, lazy::message(2))]
    );
}

/// Before the crash: a lazy commit is acknowledged with nothing queued yet (the store holds
/// its pending record: the caller made sure it is not turned into entries). Returns the
/// members' and the joiner's queues.
pub(crate) async fn lazy_fan_out_before_crash<S: AuthStore + QueueStore + GroupStore>(
    store: &S,
) -> (Vec<u64>, u64) {
    let mut members = Vec::new();
    for name in ["ca", "cb", "cc"] {
        members.push(
            store
                .add_client(credential(&format!("{name}@example.org/d")))
                .await
                .unwrap(),
        );
    }
    let joiner = store
        .add_client(credential("cd@example.org/d"))
        .await
        .unwrap();
    store
        .create_group(GroupState {
            key: lazy::KEY.to_vec(),
            epoch: 0,
            version: 0,
            snapshot: vec![0; 4],
            chain: Default::default(),
        })
        .await
        .unwrap();
    let result = store
        .apply(
            lazy::commit(0),
            vec![
                lazy::fan(&members, lazy::message(1)),
                lazy::fan(&[joiner], lazy::message(2)),
            ],
            10,
        )
        .await
        .unwrap();
    assert_eq!(result.reached, vec![3, 1]);
    assert!(result.queues.is_empty(), "nothing queued before the answer");
    // The state is durable; the queues are still empty.
    assert_eq!(
        store.group_version(lazy::KEY.to_vec()).await.unwrap(),
        Some(1)
    );
    for &num in members.iter().chain([&joiner]) {
        assert_eq!(store.read_queue(num, 0, 10, 1 << 20, 0).await.unwrap().1, 0);
    }
    (members, joiner)
}

/// After the crash, on the reopened store: the commit is queued exactly once, before the
/// first message written after the restart, in every recipient's queue. With `at_open`, the
/// store queued it when it opened, before any write.
pub(crate) async fn lazy_fan_out_after_crash<S: QueueStore + GroupStore>(
    store: &S,
    (members, joiner): (Vec<u64>, u64),
    at_open: bool,
) {
    if at_open {
        for &num in &members {
            assert_eq!(
                lazy::payloads(store, num).await,
                vec![(1, lazy::message(1))],
                "queued at open: queue {num}"
            );
        }
    }
    let sent = store
        .apply(
            lazy::message_write(1),
            vec![lazy::fan(&members, lazy::message(3))],
            10,
        )
        .await
        .unwrap();
    let seqs: Vec<u64> = sent.queues.iter().map(|(_, f)| f.seq).collect();
    assert_eq!(seqs, vec![2, 2, 2], "the replayed commit took seq 1");
    for &num in &members {
        assert_eq!(
            lazy::payloads(store, num).await,
            vec![(1, lazy::message(1)), (2, lazy::message(3))],
            "queue {num}"
        );
    }
    assert_eq!(
        lazy::payloads(store, joiner).await,
        vec![(1, lazy::message(2))]
    );
}

/// A new client and a new group (key `key`, epoch 0, version 0); returns the client's number.
async fn client_and_group<S: AuthStore + GroupStore>(store: &S, client: &str, key: &[u8]) -> u64 {
    let num = store.add_client(credential(client)).await.unwrap();
    store
        .create_group(GroupState {
            key: key.to_vec(),
            epoch: 0,
            version: 0,
            snapshot: vec![0; 4],
            chain: Default::default(),
        })
        .await
        .unwrap();
    num
}

/// A one-byte group message `n` for the local client `num`.
fn message_to(num: u64, n: u8) -> FanOut {
    FanOut {
        local: vec![num],
        remote: Default::default(),
        timestamp_ms: crate::unix_millis(),
        payload: QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![n].into(),
        }),
    }
}

/// How many messages the queue of client `num` holds.
async fn held_by<S: QueueStore>(store: &S, num: u64) -> usize {
    store
        .read_queue(num, 0, 100, 1 << 20, 0)
        .await
        .unwrap()
        .0
        .len()
}

/// Receipts of accepted requests: written with the effect, found within their window, refusing
/// a second write of the same request (even two at once), replaced once out of the window,
/// never written by a refused write, pruned by age and count.
pub(crate) async fn receipts<
    S: AuthStore + QueueStore + GroupStore + ReceiptStore + KeyPackageStore,
>(
    store: &S,
) {
    let num = client_and_group(store, "r@example.org/phone", &[4, 5, 6]).await;
    let key = vec![4, 5, 6];
    let receipt = |tag: u8, answer: Answer, accepted_ms: u64, fresh_after_ms: u64| Receipt {
        key: [tag; 32],
        answer,
        accepted_ms,
        fresh_after_ms,
        counter: None,
    };
    let write = |loaded: u64, state: Option<GroupState>, receipt: Receipt| GroupWrite {
        key: key.clone(),
        loaded,
        state,
        receipt: Some(receipt),
        lazy: false,
    };
    let fan = |n: u8| message_to(num, n);
    let held = || held_by(store, num);
    // A message: its receipt answers how many it reached.
    let result = store
        .apply(
            write(0, None, receipt(1, Answer::Reached, 1_000, 500)),
            vec![fan(1)],
            10,
        )
        .await
        .unwrap();
    assert_eq!(result.reached, [1]);
    assert_eq!(store.receipt([1; 32], 500).await.unwrap(), Some(1));
    assert_eq!(store.receipt([2; 32], 0).await.unwrap(), None);
    // The same request again writes nothing.
    assert!(matches!(
        store
            .apply(
                write(0, None, receipt(1, Answer::Reached, 1_100, 500)),
                vec![fan(1)],
                10
            )
            .await,
        Err(ServiceError::GroupMoved)
    ));
    assert_eq!(held().await, 1);
    // Two copies at once: one is written.
    let (a, b) = tokio::join!(
        store.apply(
            write(0, None, receipt(3, Answer::Reached, 1_200, 500)),
            vec![fan(3)],
            10
        ),
        store.apply(
            write(0, None, receipt(3, Answer::Reached, 1_200, 500)),
            vec![fan(3)],
            10
        ),
    );
    assert_eq!(
        u8::from(a.is_ok()) + u8::from(b.is_ok()),
        1,
        "exactly one copy written"
    );
    assert_eq!(held().await, 2);
    // A state write records its fixed answer; a refused one (stale version) records nothing.
    let next = || GroupState {
        key: key.clone(),
        epoch: 1,
        version: 1,
        snapshot: vec![1; 4],
        chain: Default::default(),
    };
    assert!(matches!(
        store
            .apply(
                write(7, Some(next()), receipt(4, Answer::Value(9), 1_300, 500)),
                vec![],
                10
            )
            .await,
        Err(ServiceError::GroupMoved)
    ));
    assert_eq!(store.receipt([4; 32], 0).await.unwrap(), None);
    store
        .apply(
            write(0, Some(next()), receipt(4, Answer::Value(1), 1_300, 500)),
            vec![fan(4)],
            10,
        )
        .await
        .unwrap();
    assert_eq!(store.receipt([4; 32], 500).await.unwrap(), Some(1));
    // Out of its window, a receipt is not found and the request is written anew.
    assert_eq!(store.receipt([1; 32], 1_001).await.unwrap(), None);
    store
        .apply(
            write(1, None, receipt(1, Answer::Reached, 5_000, 1_001)),
            vec![fan(5)],
            10,
        )
        .await
        .unwrap();
    assert_eq!(held().await, 4);
    assert_eq!(store.receipt([1; 32], 4_000).await.unwrap(), Some(1));
    // Pruning: by age (receipts 3 at 1,200 and 4 at 1,300 are older than 1,250: 3 goes),
    // then by count (the oldest left, 4, goes; 1 at 5,000 stays).
    assert_eq!(store.prune_receipts(1_250, 10).await.unwrap(), 1);
    assert_eq!(store.receipt([3; 32], 0).await.unwrap(), None);
    assert_eq!(store.prune_receipts(0, 1).await.unwrap(), 1);
    assert_eq!(store.receipt([4; 32], 0).await.unwrap(), None);
    assert_eq!(store.receipt([1; 32], 0).await.unwrap(), Some(1));
    assert_eq!(store.prune_receipts(0, 1).await.unwrap(), 0);

    // A KeyPackage upload with a receipt is written once: the repeat answers what the first
    // one did and adds nothing; out of the window it is a new upload.
    let upload = |tag: u8, fresh_after_ms: u64| Receipt {
        key: [tag; 32],
        answer: Answer::Value(0),
        accepted_ms: 6_000,
        fresh_after_ms,
        counter: None,
    };
    let kps = || vec![(4_000_000_000, vec![1]), (4_000_000_000, vec![2])];
    assert_eq!(
        store
            .add(num, kps(), None, 10, Some(upload(9, 5_000)))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .add(num, kps(), None, 10, Some(upload(9, 5_000)))
            .await
            .unwrap(),
        2
    );
    assert_eq!(store.count(num, 0).await.unwrap().0, 2);
    assert_eq!(
        store
            .add(num, kps(), None, 10, Some(upload(9, 6_001)))
            .await
            .unwrap(),
        4
    );
    assert_eq!(store.count(num, 0).await.unwrap().0, 4);
}

/// Send counters: a counted message is written only with a counter above its sender's
/// stored one (in the same transaction as its receipt, which records its digest and answer);
/// senders are counted apart; pruning receipts keeps the counters.
pub(crate) async fn send_counters<S: AuthStore + QueueStore + GroupStore + ReceiptStore>(
    store: &S,
) {
    let num = client_and_group(store, "s@example.org/phone", &[7, 8, 9]).await;
    let key = vec![7, 8, 9];
    let (alice, bob) = ([0xa1; 32], [0xb0; 32]);
    let send = |tag: u8, member: [u8; 32], counter: u64| {
        let write = GroupWrite {
            key: key.clone(),
            loaded: 0,
            state: None,
            receipt: Some(Receipt {
                key: [tag; 32],
                answer: Answer::Reached,
                accepted_ms: 1_000,
                fresh_after_ms: 500,
                counter: Some(Box::new(SendCounter { member, counter })),
            }),
            lazy: false,
        };
        store.apply(write, vec![message_to(num, tag)], 10)
    };
    let held = || held_by(store, num);
    assert_eq!(store.send_counter(alice).await.unwrap(), None);
    assert_eq!(send(1, alice, 5).await.unwrap().reached, [1]);
    let row = |counter, tag| CounterRow {
        counter,
        key: [tag; 32],
        answer: 1,
    };
    assert_eq!(store.send_counter(alice).await.unwrap(), Some(row(5, 1)));
    // Another message with the same or a lower counter (an old copy of the sender's state)
    // writes nothing, not even its receipt.
    for (tag, counter) in [(2, 5), (3, 4), (4, 0)] {
        assert!(matches!(
            send(tag, alice, counter).await,
            Err(ServiceError::GroupMoved)
        ));
        assert_eq!(store.receipt([tag; 32], 0).await.unwrap(), None);
    }
    assert_eq!(held().await, 1);
    assert_eq!(store.send_counter(alice).await.unwrap(), Some(row(5, 1)));
    // Another sender counts on its own; a higher counter moves the sender's on.
    send(5, bob, 1).await.unwrap();
    send(6, alice, 9).await.unwrap();
    assert_eq!(store.send_counter(alice).await.unwrap(), Some(row(9, 6)));
    assert_eq!(store.send_counter(bob).await.unwrap(), Some(row(1, 5)));
    assert_eq!(held().await, 3);
    // Two messages with one counter at once: one is written.
    let (a, b) = tokio::join!(send(7, alice, 10), send(8, alice, 10));
    assert_eq!(
        u8::from(a.is_ok()) + u8::from(b.is_ok()),
        1,
        "exactly one written"
    );
    assert_eq!(held().await, 4);
    // Receipts go; counters stay.
    store.prune_receipts(10_000, 0).await.unwrap();
    assert_eq!(store.receipt([6; 32], 0).await.unwrap(), None);
    assert_eq!(
        store.send_counter(alice).await.unwrap().unwrap().counter,
        10
    );
    assert!(matches!(
        send(9, alice, 10).await,
        Err(ServiceError::GroupMoved)
    ));
}

/// Push registrations and the push outbox: one pending wake-up per client, coalescing after
/// the last one sent, claims leased, retries, and everything gone with the client.
pub(crate) async fn push<S: AuthStore + PushStore + AdminStore>(store: &S) {
    let name = "alice".parse().unwrap();
    store.create_user(&name, vec![1; 32], None).await.unwrap();
    let phone = store
        .add_client(credential("alice@example.org/phone"))
        .await
        .unwrap();
    let laptop = store
        .add_client(credential("alice@example.org/laptop"))
        .await
        .unwrap();
    // Only active clients register.
    assert!(matches!(
        store.put_push(phone + laptop + 100, vec![1]).await,
        Err(ServiceError::ClientNotFound)
    ));
    assert_eq!(store.next_push_due().await.unwrap(), None);
    // No registration: nothing scheduled.
    assert_eq!(
        store
            .schedule_push(vec![phone], 1_000, 60_000)
            .await
            .unwrap(),
        0
    );
    store.put_push(phone, vec![1, 2, 3]).await.unwrap();
    store.put_push(phone, vec![4, 5]).await.unwrap(); // replaces
    assert_eq!(
        store
            .schedule_push(vec![phone, laptop], 1_000, 60_000)
            .await
            .unwrap(),
        1
    );
    // A pending wake-up absorbs later messages.
    assert_eq!(
        store
            .schedule_push(vec![phone], 1_500, 60_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.next_push_due().await.unwrap(), Some(1_000));
    assert!(store.claim_push(999, 5_000, 10).await.unwrap().is_empty());
    let job = PushJob {
        client_num: phone,
        attempts: 0,
        sealed: Some(vec![4, 5]),
    };
    assert_eq!(store.claim_push(1_000, 5_000, 10).await.unwrap(), vec![job]);
    // Leased: not claimed again until the lease ends.
    assert!(store.claim_push(4_999, 9_000, 10).await.unwrap().is_empty());
    store.retry_push(phone, 6_000, 1).await.unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), Some(6_000));
    let claimed = store.claim_push(6_000, 9_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempts, 1);
    // Sent at 7,000: the next one is due no earlier than 67,000.
    store.finish_push(phone, Some(7_000), 67_000).await.unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), None);
    assert_eq!(
        store
            .schedule_push(vec![phone], 8_000, 60_000)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.next_push_due().await.unwrap(), Some(67_000));
    // Not sent (not needed): no interval starts.
    store.claim_push(67_000, 70_000, 10).await.unwrap();
    store.finish_push(phone, None, 68_000).await.unwrap();
    assert_eq!(
        store
            .schedule_push(vec![phone], 90_000, 60_000)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.next_push_due().await.unwrap(), Some(90_000));
    // A message while the wake-up is claimed (being sent): finishing it schedules the next.
    store.claim_push(90_000, 95_000, 10).await.unwrap();
    assert_eq!(
        store
            .schedule_push(vec![phone], 91_000, 60_000)
            .await
            .unwrap(),
        0
    );
    store
        .finish_push(phone, Some(92_000), 152_000)
        .await
        .unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), Some(152_000));
    store.claim_push(152_000, 155_000, 10).await.unwrap();
    store
        .finish_push(phone, Some(153_000), 213_000)
        .await
        .unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), None);
    store
        .schedule_push(vec![phone], 200_000, 60_000)
        .await
        .unwrap();

    // Unregistering takes the pending wake-up along; a retry does not bring it back.
    assert!(store.delete_push(phone).await.unwrap());
    assert!(!store.delete_push(phone).await.unwrap());
    store.retry_push(phone, 100_000, 2).await.unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), None);

    // Removing a client (or deactivating its user) deletes its registration and wake-up.
    store.put_push(phone, vec![6]).await.unwrap();
    store.put_push(laptop, vec![7]).await.unwrap();
    store
        .schedule_push(vec![phone, laptop], 1, 0)
        .await
        .unwrap();
    store
        .remove_client(&"alice@example.org/laptop".parse().unwrap())
        .await
        .unwrap();
    assert!(!store.delete_push(laptop).await.unwrap());
    let claimed = store.claim_push(1, 2, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.client_num).collect::<Vec<_>>(),
        [phone]
    );
    store.deactivate_user(&name).await.unwrap();
    assert_eq!(store.next_push_due().await.unwrap(), None);
    assert!(!store.delete_push(phone).await.unwrap());
}

/// Wake-ups lost between a queue commit and the push outbox (the node stopped): the recovery
/// sweep schedules one for a registered client whose queue holds an entry that no scheduled
/// wake-up covered, respecting the coalescing interval, and only once.
pub(crate) async fn push_recovery<S: AuthStore + QueueStore + PushStore>(store: &S) {
    let phone_id: ClientId = "rita@example.org/phone".parse().unwrap();
    let laptop_id: ClientId = "rita@example.org/laptop".parse().unwrap();
    let phone = store
        .add_client(credential("rita@example.org/phone"))
        .await
        .unwrap();
    store
        .add_client(credential("rita@example.org/laptop"))
        .await
        .unwrap();
    store.put_push(phone, vec![1]).await.unwrap();
    let enqueue = |client: &ClientId, n: u8, at: u64| {
        let client = client.clone();
        async move {
            let (_, got) = store
                .enqueue(&client, MessageId([n; 16]), at, payload(n), 100)
                .await
                .unwrap();
            assert!(matches!(got, Enqueued::Queued(_)));
        }
    };
    // Nothing queued: nothing to recover.
    assert_eq!(store.recover_push(10_000, 1, 60_000).await.unwrap(), 0);
    // Queued at 1,000 for both; the laptop has no registration. Hand-overs lost.
    enqueue(&phone_id, 1, 1_000).await;
    enqueue(&laptop_id, 2, 1_000).await;
    // Entries newer than the cutoff are left to their hand-over (it may be in flight).
    assert_eq!(store.recover_push(999, 1_100, 60_000).await.unwrap(), 0);
    assert_eq!(store.next_push_due().await.unwrap(), None);
    assert_eq!(store.recover_push(2_000, 2_100, 60_000).await.unwrap(), 1);
    assert_eq!(store.next_push_due().await.unwrap(), Some(2_100));
    // Pending: not twice.
    assert_eq!(store.recover_push(2_000, 2_200, 60_000).await.unwrap(), 0);
    let claimed = store.claim_push(2_100, 5_000, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.client_num).collect::<Vec<_>>(),
        [phone]
    );
    store.finish_push(phone, Some(2_300), 62_300).await.unwrap();
    // Sent: the entry (still queued, never fetched) wakes nobody again.
    assert_eq!(store.recover_push(50_000, 50_100, 60_000).await.unwrap(), 0);

    // A hand-over that arrived covers its entries, whatever became of its wake-up.
    enqueue(&phone_id, 3, 60_000).await;
    assert_eq!(
        store
            .schedule_push(vec![phone], 60_100, 60_000)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.next_push_due().await.unwrap(), Some(62_300));
    store.claim_push(62_300, 65_000, 10).await.unwrap();
    store.finish_push(phone, None, 62_400).await.unwrap(); // not needed
    assert_eq!(store.recover_push(70_000, 70_100, 60_000).await.unwrap(), 0);

    // Lost again: scheduled no earlier than an interval after the last one sent.
    enqueue(&phone_id, 4, 80_000).await;
    assert_eq!(store.recover_push(90_000, 90_100, 60_000).await.unwrap(), 1);
    assert_eq!(store.next_push_due().await.unwrap(), Some(90_100));
    store.claim_push(90_100, 95_000, 10).await.unwrap();
    store
        .finish_push(phone, Some(90_200), 150_200)
        .await
        .unwrap();
    enqueue(&phone_id, 5, 100_000).await;
    assert_eq!(
        store.recover_push(110_000, 110_100, 60_000).await.unwrap(),
        1
    );
    assert_eq!(store.next_push_due().await.unwrap(), Some(150_200));

    // Unregistered: the marker goes too; a new registration is judged afresh.
    assert!(store.delete_push(phone).await.unwrap());
    assert_eq!(
        store.recover_push(200_000, 200_100, 60_000).await.unwrap(),
        0
    );
    store.put_push(phone, vec![2]).await.unwrap();
    assert_eq!(
        store.recover_push(200_000, 200_100, 60_000).await.unwrap(),
        1
    );
}

/// Administration: listing, deactivation (clients, queues and KeyPackages gone in one
/// transaction, the name kept taken), token uses and the counts of `roost admin stats`.
pub(crate) async fn admin<S>(store: &S)
where
    S: AuthStore + KeyPackageStore + QueueStore + GroupStore + AdminStore,
{
    let (alice, bob): (UserName, UserName) = ("alice".parse().unwrap(), "bob".parse().unwrap());
    assert_eq!(store.stats().await.unwrap(), StoreStats::default());
    store.create_user(&bob, vec![2; 32], None).await.unwrap();
    store
        .create_user(&alice, vec![1; 32], Some(("tokenhash".into(), 5)))
        .await
        .unwrap();
    let mut nums = Vec::new();
    for device in ["phone", "laptop", "tablet"] {
        let client = format!("alice@example.org/{device}");
        nums.push(store.add_client(credential(&client)).await.unwrap());
    }
    let bob_phone: ClientId = "bob@example.org/phone".parse().unwrap();
    let bob_num = store
        .add_client(credential("bob@example.org/phone"))
        .await
        .unwrap();
    store
        .remove_client(&"alice@example.org/tablet".parse().unwrap())
        .await
        .unwrap();
    for (n, num) in [nums[0], nums[0], nums[1], bob_num].into_iter().enumerate() {
        let n = u8::try_from(n).unwrap();
        store
            .add(num, vec![(u64::MAX, vec![n])], None, 10, None)
            .await
            .unwrap();
    }
    let alice_phone: ClientId = "alice@example.org/phone".parse().unwrap();
    for n in 1..=3u8 {
        store
            .enqueue(&alice_phone, MessageId([n; 16]), 1, payload(n), 10)
            .await
            .unwrap();
    }
    store
        .enqueue(&bob_phone, MessageId([9; 16]), 1, payload(9), 10)
        .await
        .unwrap();
    store
        .create_group(GroupState {
            key: vec![4, 2],
            epoch: 0,
            version: 0,
            snapshot: vec![1],
            chain: Default::default(),
        })
        .await
        .unwrap();
    let beta: roost_protocol::Domain = "beta.test".parse().unwrap();
    let to_beta = |n: u8| FanOut {
        local: Vec::new(),
        remote: [(beta.clone(), vec!["r@beta.test/phone".parse().unwrap()])]
            .into_iter()
            .collect(),
        payload: QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![n].into(),
        }),
        timestamp_ms: crate::unix_millis(),
    };
    let next = GroupState {
        key: vec![4, 2],
        epoch: 1,
        version: 1,
        snapshot: vec![2],
        chain: Default::default(),
    };
    let write = GroupWrite {
        key: vec![4, 2],
        loaded: 0,
        state: Some(next),
        receipt: None,
        lazy: false,
    };
    store
        .apply(write, vec![to_beta(1), to_beta(2)], 10)
        .await
        .unwrap();
    let users = store.users().await.unwrap();
    let listed: Vec<(&str, u64, bool)> = users
        .iter()
        .map(|u| (u.name.as_str(), u.clients, u.deactivated))
        .collect();
    assert_eq!(listed, vec![("alice", 2, false), ("bob", 1, false)]);
    assert_eq!(store.user(&alice).await.unwrap().unwrap(), users[0]);
    assert!(users[0].created_ms > 0);
    assert_eq!(store.user(&"carol".parse().unwrap()).await.unwrap(), None);
    assert_eq!(
        store.token_uses().await.unwrap(),
        vec![("tokenhash".to_owned(), 1)]
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.users, stats.deactivated_users, stats.clients),
        (2, 0, 3)
    );
    assert_eq!((stats.groups, stats.queued_messages), (1, 4));
    assert_eq!(stats.outbox, vec![("beta.test".to_owned(), 2)]);

    // Deactivation: every active client goes with its queue and KeyPackages, in one go.
    let mut removed = store.deactivate_user(&alice).await.unwrap();
    removed.sort_unstable();
    let mut expected = vec![nums[0], nums[1]];
    expected.sort_unstable();
    assert_eq!(removed, expected);
    assert!(
        store
            .active_clients_of(&alice_phone.user)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.count(nums[0], 0).await.unwrap(), (0, false));
    assert_eq!(store.count(nums[1], 0).await.unwrap(), (0, false));
    assert_eq!(store.count(bob_num, 0).await.unwrap(), (1, false));
    assert!(
        !matches!(
            store
                .enqueue(&alice_phone, MessageId([7; 16]), 1, payload(7), 10)
                .await,
            Ok((_, Enqueued::Queued(_)))
        ),
        "a deactivated user's queue takes nothing"
    );
    // The name stays taken and no user signature can verify any more.
    assert!(matches!(
        store.create_user(&alice, vec![3; 32], None).await,
        Err(ServiceError::UserExists)
    ));
    assert_eq!(store.user_key(&alice).await.unwrap(), Some(Vec::new()));
    assert!(store.user(&alice).await.unwrap().unwrap().deactivated);
    assert!(store.deactivate_user(&alice).await.unwrap().is_empty());
    assert!(matches!(
        store.deactivate_user(&"carol".parse().unwrap()).await,
        Err(ServiceError::UserNotFound)
    ));
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.users, stats.deactivated_users, stats.clients),
        (2, 1, 1)
    );
    assert_eq!((stats.groups, stats.queued_messages), (1, 1));
}

mod redb_backend {
    use crate::storage::Backend;
    use crate::storage::redb::Store;

    fn open() -> (tempfile::TempDir, Backend) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _writer) = Store::open(&dir.path().join("db.redb"), "example.org", 64).unwrap();
        (dir, Backend::Redb(store))
    }

    #[tokio::test]
    async fn auth() {
        let (_dir, store) = open();
        super::auth(&store).await;
    }

    #[tokio::test]
    async fn key_packages() {
        let (_dir, store) = open();
        super::key_packages(&store).await;
    }

    #[tokio::test]
    async fn groups_and_outbox() {
        let (_dir, store) = open();
        super::groups_and_outbox(&store).await;
    }

    #[tokio::test]
    async fn queues() {
        let (_dir, store) = open();
        super::queues(&store).await;
    }

    #[tokio::test]
    async fn receipts() {
        let (_dir, store) = open();
        super::receipts(&store).await;
    }

    #[tokio::test]
    async fn send_counters() {
        let (_dir, store) = open();
        super::send_counters(&store).await;
    }

    #[tokio::test]
    async fn admin() {
        let (_dir, store) = open();
        super::admin(&store).await;
    }

    #[tokio::test]
    async fn lazy_fan_out() {
        let (_dir, store) = open();
        super::lazy_fan_out(&store).await;
    }

    #[tokio::test]
    async fn group_deltas() {
        let (_dir, store) = open();
        super::group_deltas(&store).await;
    }

    /// The process dies after the transaction that accepted a commit and before the batch
    /// that queues it: what is on disk then is that transaction (redb keeps nothing else),
    /// which is what closing the store with the pending record held leaves.
    #[tokio::test]
    async fn a_lazy_fan_out_cut_off_by_a_crash_is_queued_once_and_first_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (store, writer) = Store::open(&path, "example.org", 64).unwrap();
        store.hold_pending(true);
        let backend = Backend::Redb(store);
        let queues = super::lazy_fan_out_before_crash(&backend).await;
        drop(backend);
        writer.join();
        let (store, _writer) = Store::open(&path, "example.org", 64).unwrap();
        super::lazy_fan_out_after_crash(&Backend::Redb(store), queues, true).await;
    }

    #[tokio::test]
    async fn push() {
        let (_dir, store) = open();
        super::push(&store).await;
    }

    #[tokio::test]
    async fn expiry() {
        let (_dir, store) = open();
        super::expiry(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_group_in_order() {
        let (_dir, store) = open();
        super::one_group_in_order(&store).await;
    }

    #[tokio::test]
    async fn push_recovery() {
        let (_dir, store) = open();
        super::push_recovery(&store).await;
    }
}

/// The same suite on PostgreSQL: one cluster, a database per part.
pub(crate) mod postgres_backend {
    use std::time::Duration;

    use crate::bus::BusSink;
    use crate::storage::Backend;
    use crate::storage::postgres::{Options, PgCloser, PgStore};

    /// A node over the database at `url` (each call is another node: its own pool and id),
    /// with `timeout` for waits, statements and (times three) outbox leases.
    pub(crate) async fn connect(url: &str, timeout: Duration) -> (PgStore, PgCloser) {
        let sink = BusSink {
            queues: Default::default(),
            revoked: Default::default(),
            nodes_gone: Default::default(),
        };
        let options = Options {
            url,
            pool_size: 8,
            timeout,
            domain: "example.org",
            as_public_key: &[7; 32],
        };
        PgStore::connect(options, sink).await.unwrap()
    }

    pub(crate) async fn open(url: &str) -> (Backend, PgCloser) {
        let (store, closer) = connect(url, Duration::from_secs(10)).await;
        (Backend::Postgres(store), closer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_part() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        for part in [
            "auth",
            "key_packages",
            "queues",
            "groups_and_outbox",
            "receipts",
            "send_counters",
            "admin",
            "push",
            "expiry",
            "one_group_in_order",
            "push_recovery",
            "group_deltas",
        ] {
            let url = cluster.create_database(part).unwrap();
            let (store, closer) = open(&url).await;
            match part {
                "auth" => super::auth(&store).await,
                "key_packages" => super::key_packages(&store).await,
                "queues" => super::queues(&store).await,
                "receipts" => super::receipts(&store).await,
                "send_counters" => super::send_counters(&store).await,
                "admin" => super::admin(&store).await,
                "push" => super::push(&store).await,
                "expiry" => super::expiry(&store).await,
                "one_group_in_order" => super::one_group_in_order(&store).await,
                "push_recovery" => super::push_recovery(&store).await,
                "group_deltas" => super::group_deltas(&store).await,
                _ => super::groups_and_outbox(&store).await,
            }
            drop(store);
            closer.join();
        }
        let url = cluster.create_database("lazy").unwrap();
        let (store, closer) = open(&url).await;
        super::lazy_fan_out(&store).await;
        drop(store);
        closer.join();
    }

    /// A node dies after the transaction that accepted a commit and before it queued the
    /// commit's pending fan-out (held back here, which is what the database holds then): the
    /// next node to start queues it before it serves, exactly once and ahead of what follows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lazy_fan_out_cut_off_by_a_dead_node_is_queued_once_by_the_next() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("crash").unwrap();
        let (dying, closer) = connect(&url, Duration::from_secs(10)).await;
        dying.hold_pending(true);
        let queues = super::lazy_fan_out_before_crash(&Backend::Postgres(dying)).await;
        closer.join();
        let (next, closer) = open(&url).await;
        super::lazy_fan_out_after_crash(&next, queues, true).await;
        drop(next);
        closer.join();
    }

    /// One group's messages sent at once through two nodes of one database (each node with
    /// its own lock, as two DS processes have): every recipient has them in the same order,
    /// and each node's messages in the order its lock gave them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_group_through_two_nodes_in_one_order() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("order").unwrap();
        let (a, closer_a) = open(&url).await;
        let (b, closer_b) = open(&url).await;
        let recipients = super::group_of(&a, "n", 4).await;
        let (on_a, on_b) = tokio::join!(
            super::send_into_one_group(&a, &recipients, 0, 8, 15),
            super::send_into_one_group(&b, &recipients, 1, 8, 15)
        );
        assert!(on_a.iter().chain(&on_b).all(|(_, ok)| *ok));
        let first = super::tags_in(&a, recipients[0]).await;
        assert_eq!(first.len(), 2 * 8 * 15);
        for &num in &recipients[1..] {
            assert_eq!(super::tags_in(&b, num).await, first, "queue {num}");
        }
        for (node, sent) in [(0, on_a), (1, on_b)] {
            let queued: Vec<[u8; 3]> = first.iter().filter(|t| t[0] == node).copied().collect();
            let locked: Vec<[u8; 3]> = sent.into_iter().map(|(t, _)| t).collect();
            assert_eq!(queued, locked, "node {node}'s order");
        }
        drop((a, b));
        closer_a.join();
        closer_b.join();
    }

    /// Node A accepted a commit and has not queued its fan-out yet; a message of the group
    /// written on node B meanwhile queues A's pending fan-out first: the commit comes before
    /// the message in every queue, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_on_another_node_is_queued_after_a_pending_commit() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("nodes").unwrap();
        let (a, closer_a) = connect(&url, Duration::from_secs(10)).await;
        let (b, closer_b) = open(&url).await;
        a.hold_pending(true);
        let queues = super::lazy_fan_out_before_crash(&Backend::Postgres(a.clone())).await;
        super::lazy_fan_out_after_crash(&b, queues, false).await;
        drop((a, b));
        closer_a.join();
        closer_b.join();
    }
}
