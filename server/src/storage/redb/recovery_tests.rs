//! The redb engine under a failing disk ([`super::fault::FaultyBackend`]): a write batch that
//! meets a full disk or a failed fsync fails with a typed error, the store reopens its database
//! by itself once the fault is gone, nothing acknowledged is lost and no batch is half stored.

use std::path::Path;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase};

use super::fault::Faults;
use super::tables::META;
use super::{Store, StoreError, faulty_opener};

#[derive(Debug, PartialEq)]
enum TestError {
    /// UNAVAILABLE on the wire: retry later.
    Unavailable,
    /// Any other storage error (INTERNAL on the wire).
    Other(String),
}

impl From<StoreError> for TestError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable | StoreError::Io(_) => TestError::Unavailable,
            err => TestError::Other(err.to_string()),
        }
    }
}

fn open(path: &Path, faults: &Faults) -> (Store, super::WriterHandle) {
    Store::open_with(
        faulty_opener(path, faults.clone(), 16 << 20),
        "example.org",
        16,
        Default::default(),
    )
    .unwrap()
}

/// One operation that writes two keys, `a{i}` and `b{i}`: both or neither may be stored.
async fn write_pair(store: &Store, i: u64) -> Result<(), TestError> {
    store
        .write(move |txn| {
            let mut meta = txn.open_table(META)?;
            meta.insert(format!("a{i}").as_str(), i)?;
            meta.insert(format!("b{i}").as_str(), i)?;
            Ok(Ok(()))
        })
        .await
}

/// Writes pairs `range` concurrently; returns (acknowledged, refused).
async fn write_pairs(store: &Store, range: std::ops::Range<u64>) -> (Vec<u64>, Vec<u64>) {
    let mut tasks = Vec::new();
    for i in range {
        let store = store.clone();
        tasks.push(tokio::spawn(
            async move { (i, write_pair(&store, i).await) },
        ));
    }
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            (i, Ok(())) => acked.push(i),
            (i, Err(TestError::Unavailable)) => refused.push(i),
            (i, Err(other)) => panic!("pair {i}: untyped failure {other:?}"),
        }
    }
    (acked, refused)
}

/// Waits (bounded, so a broken store fails the test instead of hanging it) until a write
/// succeeds again.
async fn wait_writable(store: &Store) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut probe = 1_000_000;
    loop {
        probe += 1;
        if write_pair(store, probe).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the store did not come back after the fault cleared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stored values of `a{i}` and `b{i}`.
fn pair_in(db: &Database, i: u64) -> (Option<u64>, Option<u64>) {
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    let get = |key: String| meta.get(key.as_str()).unwrap().map(|v| v.value());
    (get(format!("a{i}")), get(format!("b{i}")))
}

/// Every acknowledged pair is stored whole; a refused pair is stored whole or not at all.
fn check_file(path: &Path, acked: &[u64], refused: &[u64]) {
    let db = Database::builder()
        .set_check_integrity_on_open(true)
        .create(path)
        .unwrap();
    for &i in acked {
        assert_eq!(pair_in(&db, i), (Some(i), Some(i)), "acknowledged pair {i}");
    }
    for &i in refused {
        let pair = pair_in(&db, i);
        assert!(
            pair == (None, None) || pair == (Some(i), Some(i)),
            "pair {i} half stored: {pair:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_up_again_and_again_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let faults = Faults::new();
    let (store, writer) = open(&path, &faults);
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let mut next = 0u64;
    // The disk fills at different points of a batch: at its first write, a few pages in, and
    // late (some batches commit before the disk is full).
    for (cycle, fail_after) in [0u64, 1, 3, 8, 20].into_iter().enumerate() {
        let (ok, _) = write_pairs(&store, next..next + 10).await;
        assert_eq!(ok.len(), 10, "cycle {cycle}: writes before the fault");
        acked.extend(ok);
        next += 10;

        faults.fail_writes_after(fail_after);
        for _ in 0..50 {
            let (ok, no) = write_pairs(&store, next..next + 10).await;
            next += 10;
            acked.extend(ok);
            let full = !no.is_empty();
            refused.extend(no);
            if full {
                break;
            }
        }
        assert!(
            faults.injected() > 0,
            "cycle {cycle}: the disk never filled"
        );
        // While the disk stays full, the store says so and refuses at once.
        assert!(
            store.healthy().await.is_err(),
            "cycle {cycle}: healthy on a full disk"
        );
        assert_eq!(
            write_pair(&store, next).await,
            Err(TestError::Unavailable),
            "cycle {cycle}: a write on the full disk"
        );
        refused.push(next);
        next += 1;

        faults.clear();
        wait_writable(&store).await;
        store.healthy().await.unwrap();
        let (ok, _) = write_pairs(&store, next..next + 10).await;
        assert_eq!(ok.len(), 10, "cycle {cycle}: writes after recovery");
        acked.extend(ok);
        next += 10;
    }
    assert!(faults.injected() > 0);
    drop(store);
    writer.join();
    check_file(&path, &acked, &refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_is_answered_by_what_the_reopened_file_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let faults = Faults::new();
    let (store, writer) = open(&path, &faults);
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let mut next = 0u64;
    for cycle in 0..4 {
        let (ok, _) = write_pairs(&store, next..next + 10).await;
        assert_eq!(ok.len(), 10, "cycle {cycle}: writes before the fault");
        acked.extend(ok);
        next += 10;
        // One fsync fails: the batch's commit fails, the store reopens at once and tells its
        // callers whether the batch is in the reopened file.
        faults.fail_next_sync();
        let (ok, no) = write_pairs(&store, next..next + 20).await;
        next += 20;
        acked.extend(ok);
        refused.extend(no);
        wait_writable(&store).await;
    }
    assert_eq!(faults.injected(), 4);
    drop(store);
    writer.join();
    check_file(&path, &acked, &refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_whose_fsync_keeps_failing_is_unavailable_until_it_heals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let faults = Faults::new();
    let (store, writer) = open(&path, &faults);
    let (mut acked, _) = write_pairs(&store, 0..10).await;
    assert_eq!(acked.len(), 10);
    faults.fail_syncs_after(0);
    let (ok, mut refused) = write_pairs(&store, 10..30).await;
    assert!(
        ok.is_empty(),
        "acknowledged without a working fsync: {ok:?}"
    );
    assert!(store.healthy().await.is_err());
    // Still broken a while later: every write is refused, none acknowledged.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(write_pair(&store, 30).await, Err(TestError::Unavailable));
    refused.push(30);
    faults.clear();
    wait_writable(&store).await;
    store.healthy().await.unwrap();
    let (ok, _) = write_pairs(&store, 31..41).await;
    assert_eq!(ok.len(), 10);
    acked.extend(ok);
    drop(store);
    writer.join();
    check_file(&path, &acked, &refused);
}

/// One group's messages sent as the DS sends them (each submitted under the group's lock,
/// its durability awaited after the lock is released, so they share batches) while an fsync
/// fails: a message answered as durable is in every queue, one refused is in none, and every
/// queue holds the same messages in the order the lock gave them — also after the file is
/// opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_groups_messages_are_answered_only_once_durable() {
    use crate::storage::Backend;
    use crate::storage::suite::{group_of, send_into_one_group, tags_in};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let faults = Faults::new();
    let (store, writer) = open(&path, &faults);
    let backend = Backend::Redb(store.clone());
    let recipients = group_of(&backend, "f", 3).await;
    // Before the fault, while the disk is full, after it is freed.
    let before = send_into_one_group(&backend, &recipients, 0, 8, 5).await;
    faults.fail_writes_after(3);
    let during = send_into_one_group(&backend, &recipients, 1, 8, 5).await;
    assert!(faults.injected() > 0, "the disk filled up");
    faults.clear();
    wait_writable(&store).await;
    let after = send_into_one_group(&backend, &recipients, 2, 8, 5).await;
    assert!(before.iter().chain(&after).all(|(_, ok)| *ok));
    assert!(during.iter().any(|(_, ok)| !*ok), "{during:?}");
    let answered: Vec<[u8; 3]> = [before, during, after]
        .concat()
        .into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(t, _)| t)
        .collect();
    for &num in &recipients {
        assert_eq!(tags_in(&backend, num).await, answered, "queue {num}");
    }
    drop((backend, store));
    writer.join();
    let (store, _writer) = open(&path, &Faults::new());
    let backend = Backend::Redb(store);
    for &num in &recipients {
        assert_eq!(
            tags_in(&backend, num).await,
            answered,
            "queue {num} reopened"
        );
    }
}

/// A table of large values, for batches that must grow the file.
const BLOBS: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("test_blobs");

/// Stores `len` bytes under `i`: a batch whose transaction grows the file (the file has far
/// less room left than `len`).
async fn write_blob(store: &Store, i: u64, len: usize) -> Result<(), TestError> {
    store
        .write(move |txn| {
            let value = vec![i as u8; len];
            txn.open_table(BLOBS)?.insert(i, value.as_slice())?;
            Ok(Ok(()))
        })
        .await
}

/// The value stored under `i`, read through the store.
async fn blob_in(store: &Store, i: u64) -> Option<Vec<u8>> {
    store
        .read(move |txn| {
            let table = match txn.open_table(BLOBS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(err) => return Err(StoreError::from(err)),
            };
            Ok(table.get(i)?.map(|v| v.value().to_vec()))
        })
        .await
        .unwrap()
}

/// The file's length in bytes.
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

const BLOB_LEN: usize = 1 << 20;

/// What a batch that grows the file leaves when its fsyncs fail as `arm` sets them up: its
/// caller's answer, and the value it stored as the reopened store holds it. Every pair
/// acknowledged before it is still stored.
async fn grow_the_file_while(
    arm: impl FnOnce(&Faults),
) -> (Result<(), TestError>, Option<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let faults = Faults::new();
    let (store, writer) = open(&path, &faults);
    let (acked, _) = write_pairs(&store, 0..10).await;
    assert_eq!(acked.len(), 10);
    let before = file_len(&path);
    arm(&faults);
    let answer = write_blob(&store, 7, BLOB_LEN).await;
    assert!(
        file_len(&path) > before + BLOB_LEN as u64,
        "the batch did not grow the file"
    );
    faults.clear();
    wait_writable(&store).await;
    let stored = blob_in(&store, 7).await;
    drop(store);
    writer.join();
    check_file(&path, &acked, &[]);
    (answer, stored)
}

/// A batch whose commit's own fsync fails is in the file (as in the page cache) after the
/// reopen, also when its transaction grew the file: its caller is told UNAVAILABLE (the first
/// reopen fails as well), and the reopened store holds the batch whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_fsync_failed_is_in_the_file_also_when_it_grew_the_file() {
    let (answer, stored) = grow_the_file_while(Faults::fail_syncs_from_next_commit).await;
    assert_eq!(answer, Err(TestError::Unavailable));
    assert_eq!(stored, Some(vec![7; BLOB_LEN]));
}

/// What `fail_syncs_after(0)` does to the same batch: redb syncs the grown file inside the
/// transaction, before the commit writes anything, so that fsync's failure leaves nothing of
/// the batch in the file. Its caller is told UNAVAILABLE and the reopened store does not hold
/// it (which is why a test that needs the batch in the file fails the commit's own fsync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_grows_the_file_while_every_fsync_fails_is_not_stored() {
    let (answer, stored) = grow_the_file_while(|faults| faults.fail_syncs_after(0)).await;
    assert_eq!(answer, Err(TestError::Unavailable));
    assert_eq!(stored, None);
}

/// A group's state written as the DS writes it (deltas on a base, a new base now and then)
/// while the disk fails at different points of a write: every acknowledged state loads
/// exactly; a refused write leaves the state before it or, whole, the refused one (the DS
/// drops its cached state and goes on from what it loads); nothing in between. After the
/// file is opened again the group is the last state stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_deltas_and_bases_cut_off_by_failing_writes_leave_a_loadable_state() {
    use crate::delivery::{GroupState, GroupStore};
    use crate::error::ServiceError;
    use crate::storage::group_delta::{self, Chain};
    use crate::storage::suite::{base_state, next_snapshot, noise, state_write};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let faults = Faults::new();
    let (store, writer) = open(&path, &faults);
    let key = vec![8u8, 8];
    let mut snapshot = noise(3, 40_000);
    store
        .create_group(base_state(&key, &snapshot))
        .await
        .unwrap();
    let (mut version, mut chain, mut step) = (0u64, Chain::default(), 0u64);
    let (mut acked, mut refused) = (0, 0);
    // Loads the group, waiting (bounded) while the store reopens its file.
    async fn load(store: &Store, key: &[u8]) -> GroupState {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(state)) = store.load_group(key.to_vec()).await {
                return state;
            }
            assert!(Instant::now() < deadline, "the group does not load");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for fail_after in [0u64, 1, 2, 4, 7] {
        // A refused write's state: stored whole or not at all, known once the disk is back.
        let mut unsure = None;
        for phase in 0..3 {
            match phase {
                1 => faults.fail_writes_after(fail_after),
                2 => {
                    faults.clear();
                    wait_writable(&store).await;
                    // As the DS does after a failed write: go on from what loads.
                    let loaded = load(&store, &key).await;
                    if let Some((new, after)) = unsure.take()
                        && loaded.version == version + 1
                    {
                        (snapshot, chain, version) = (new, after, version + 1);
                    }
                    assert_eq!(loaded.version, version);
                    assert!(loaded.snapshot == snapshot, "step {step}: after the fault");
                    assert_eq!(loaded.chain, chain);
                }
                _ => {}
            }
            for _ in 0..10 {
                step += 1;
                let new = next_snapshot(&snapshot, step);
                let (form, after) = group_delta::next(&snapshot, &new, chain);
                let write = state_write(&key, version, step, (form, after));
                match store.apply(write, Vec::new(), 10).await {
                    Ok(_) => {
                        acked += 1;
                        (snapshot, chain, version) = (new, after, version + 1);
                        if phase != 1 {
                            let loaded = load(&store, &key).await;
                            assert_eq!((loaded.version, loaded.epoch), (version, step));
                            assert!(loaded.snapshot == snapshot, "step {step}: acknowledged");
                            assert_eq!(loaded.chain, chain);
                        }
                    }
                    Err(ServiceError::Store(_)) if phase == 1 => {
                        refused += 1;
                        unsure = Some((new, after));
                        break;
                    }
                    Err(other) => panic!("step {step}: {other:?}"),
                }
            }
        }
    }
    assert!(
        refused > 0 && acked > 50,
        "{acked} acknowledged, {refused} refused"
    );
    drop(store);
    writer.join();
    let (store, _writer) = open(&path, &Faults::new());
    let loaded = store.load_group(key.clone()).await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.chain), (version, chain));
    assert!(loaded.snapshot == snapshot, "reopened");
}
