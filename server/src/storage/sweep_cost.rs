//! What one expiry sweep costs beside idle data (issue 16, item 3): a store holding 10,000
//! clients, each with a queue holding one (deduplicated) message and two KeyPackages, none
//! expired, against an empty store. The sweep must find nothing to remove and leave
//! everything; the time of one sweep (queue expiry and KeyPackage purge, as the server's
//! sweeper runs them) is printed for docs/BENCHMARKS.md, beside the time of one read of the
//! counts behind the /metrics storage gauges (`AdminStore::stats`), which does grow with the
//! data (the gauges' refresh spaces itself accordingly: `metrics::refresh_store_gauges`).

use std::time::{Duration, Instant};

use roost_protocol::MessageId;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use tls_codec::Serialize as _;

use super::Backend;
use super::redb::Store;
use super::suite::credential;
use crate::admin::store::AdminStore;
use crate::auth::AuthStore;
use crate::keypackage::KeyPackageStore;
use crate::queue::{Enqueued, QueueStore};

const CLIENTS: usize = 10_000;
const NOW_SECS: u64 = 2_000_000_000;
const NOW_MS: u64 = NOW_SECS * 1000;
/// The default message age limit (14 days).
const CUTOFF_MS: u64 = NOW_MS - 14 * 24 * 3600 * 1000;

/// Fills `store` with `clients` idle users of one client each (queue with one message, two
/// KeyPackages).
async fn fill(store: &Backend, clients: usize) {
    let payload = QueuePayload::GroupMessage(GroupMessage {
        group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
            .parse()
            .unwrap(),
        message: vec![1; 200].into(),
    })
    .tls_serialize_detached()
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..64 {
        let (store, payload) = (store.clone(), payload.clone());
        tasks.spawn(async move {
            for i in (chunk..clients).step_by(64) {
                let user = format!("idle{i}");
                store
                    .create_user(&user.parse().unwrap(), vec![1; 32], None)
                    .await
                    .unwrap();
                let name = format!("{user}@example.org/phone");
                let num = store.add_client(credential(&name)).await.unwrap();
                let kps = vec![(NOW_SECS + 86_400, vec![7; 300]); 2];
                store.add(num, kps, None, 10, None).await.unwrap();
                let id = MessageId((i as u128).to_be_bytes());
                let queued = store
                    .enqueue(&name.parse().unwrap(), id, NOW_MS, payload.clone(), 100)
                    .await
                    .unwrap()
                    .1;
                assert_eq!(queued, Enqueued::Queued(1));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// The median time of `rounds` sweeps; each must remove nothing.
async fn sweep(store: &Backend, rounds: usize) -> Duration {
    let mut times = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        assert_eq!(store.expire(CUTOFF_MS).await.unwrap(), 0);
        assert_eq!(store.purge_expired(NOW_SECS).await.unwrap(), 0);
        times.push(started.elapsed());
    }
    times.sort();
    times[rounds / 2]
}

/// The median time of `rounds` reads of the storage counts, which must show `clients`.
async fn stats(store: &Backend, rounds: usize, clients: u64) -> Duration {
    let mut times = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let stats = store.stats().await.unwrap();
        times.push(started.elapsed());
        assert_eq!((stats.users, stats.clients), (clients, clients));
        assert_eq!(stats.queued_messages, clients);
    }
    times.sort();
    times[rounds / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_beside_idle_data_removes_nothing_and_its_time_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        let (store, writer) = Store::open(&dir.path().join(name), "example.org", 1024).unwrap();
        (Backend::Redb(store), writer)
    };
    let (empty, _w1) = open("empty.redb");
    let (full, _w2) = open("full.redb");
    fill(&full, CLIENTS).await;
    let empty_time = sweep(&empty, 7).await;
    let full_time = sweep(&full, 7).await;
    let empty_stats = stats(&empty, 7, 0).await;
    let full_stats = stats(&full, 7, CLIENTS as u64).await;
    // Everything is still there.
    let (messages, _) = full.read_queue(1, 0, 10, 1 << 20, 0).await.unwrap();
    assert_eq!(messages.len(), 1);
    let last = format!("idle{}@example.org/phone", CLIENTS - 1);
    assert!(
        full.claim_one(&last.parse().unwrap(), NOW_SECS)
            .await
            .is_ok()
    );
    println!(
        "sweep (median of 7): empty store {:?}; {CLIENTS} idle queues and {} idle KeyPackages {:?}",
        empty_time,
        2 * CLIENTS,
        full_time
    );
    println!(
        "storage counts (median of 7): empty store {empty_stats:?}; {CLIENTS} users and clients {full_stats:?}"
    );
}
