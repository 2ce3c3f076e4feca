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
use crate::delivery::receipt::{Answer, Receipt, ReceiptStore};
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

fn payload(n: u8) -> Vec<u8> {
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

/// Receipts of accepted requests: written with the effect, found within their window, refusing
/// a second write of the same request (even two at once), replaced once out of the window,
/// never written by a refused write, pruned by age and count.
pub(crate) async fn receipts<
    S: AuthStore + QueueStore + GroupStore + ReceiptStore + KeyPackageStore,
>(
    store: &S,
) {
    let num = store
        .add_client(credential("r@example.org/phone"))
        .await
        .unwrap();
    let key = vec![4, 5, 6];
    store
        .create_group(GroupState {
            key: key.clone(),
            epoch: 0,
            version: 0,
            snapshot: vec![0; 4],
        })
        .await
        .unwrap();
    let receipt = |tag: u8, answer: Answer, accepted_ms: u64, fresh_after_ms: u64| Receipt {
        key: [tag; 32],
        answer,
        accepted_ms,
        fresh_after_ms,
    };
    let write = |loaded: u64, state: Option<GroupState>, receipt: Receipt| GroupWrite {
        key: key.clone(),
        loaded,
        state,
        receipt: Some(receipt),
        lazy: false,
    };
    let fan = |n: u8| FanOut {
        local: vec![num],
        remote: Default::default(),
        timestamp_ms: crate::unix_millis(),
        payload: QueuePayload::GroupMessage(GroupMessage {
            group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
                .parse()
                .unwrap(),
            message: vec![n].into(),
        }),
    };
    let held = || async {
        store
            .read_queue(num, 0, 100, 1 << 20, 0)
            .await
            .unwrap()
            .0
            .len()
    };
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
    async fn admin() {
        let (_dir, store) = open();
        super::admin(&store).await;
    }

    #[tokio::test]
    async fn lazy_fan_out() {
        let (_dir, store) = open();
        super::lazy_fan_out(&store).await;
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
            "admin",
            "push",
            "push_recovery",
        ] {
            let url = cluster.create_database(part).unwrap();
            let (store, closer) = open(&url).await;
            match part {
                "auth" => super::auth(&store).await,
                "key_packages" => super::key_packages(&store).await,
                "queues" => super::queues(&store).await,
                "receipts" => super::receipts(&store).await,
                "admin" => super::admin(&store).await,
                "push" => super::push(&store).await,
                "push_recovery" => super::push_recovery(&store).await,
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
