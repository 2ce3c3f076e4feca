//! One suite for every [`BlobStore`]: the file store and the PostgreSQL store give the same
//! answers (visibility only at commit, offsets, deduplication, the quota at commit, expiry).

use bytes::Bytes;
use roost_protocol::UserId;
use roost_protocol::messages::blob::{BLOB_ADDRESS_LEN, BLOB_TOKEN_LEN};
use tokio::io::AsyncReadExt;

use super::{BlobMeta, BlobStore};
use crate::error::ServiceError;

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn meta(owner: &str, size: usize, token: u8, created_secs: u64) -> BlobMeta {
    BlobMeta {
        owner: owner.parse().unwrap(),
        token: [token; BLOB_TOKEN_LEN],
        size: size as u64,
        created_secs,
    }
}

/// Writes `data` in uneven chunks (crossing any chunking the store does).
async fn write_all<S: BlobStore>(store: &S, upload: &mut S::Upload, data: &[u8]) {
    for chunk in data.chunks(100_002) {
        store
            .write(upload, Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
}

async fn store_blob<S: BlobStore>(
    store: &S,
    address: u8,
    data: &[u8],
    meta: BlobMeta,
    quota: u64,
) -> Result<BlobMeta, ServiceError> {
    let mut upload = store.begin(meta).await.unwrap();
    write_all(store, &mut upload, data).await;
    store
        .commit(upload, [address; BLOB_ADDRESS_LEN], quota)
        .await
}

async fn read_from<S: BlobStore>(store: &S, address: u8, offset: u64) -> Option<Vec<u8>> {
    let (meta, mut reader) = store
        .open(&[address; BLOB_ADDRESS_LEN], offset)
        .await
        .unwrap()?;
    let mut out = Vec::new();
    let want = meta.size.saturating_sub(offset);
    (&mut reader)
        .take(want)
        .read_to_end(&mut out)
        .await
        .unwrap();
    Some(out)
}

pub(super) async fn run<S: BlobStore>(store: &S) {
    let alice: UserId = "alice@example.org".parse().unwrap();
    let bob: UserId = "bob@example.org".parse().unwrap();
    const QUOTA: u64 = 2_000_000;

    // Nothing of an upload is visible before its commit, nor after it was dropped.
    let big = bytes(1_234_567, 1);
    let mut upload = store
        .begin(meta("alice@example.org", big.len(), 1, 100))
        .await
        .unwrap();
    write_all(store, &mut upload, &big).await;
    assert_eq!(read_from(store, 1, 0).await, None);
    drop(upload);
    assert_eq!(read_from(store, 1, 0).await, None);
    assert_eq!(store.usage(&alice).await.unwrap(), 0);

    // Committed: whole, and from any offset up to the end.
    let first = meta("alice@example.org", big.len(), 1, 100);
    let stored = store_blob(store, 1, &big, first.clone(), QUOTA)
        .await
        .unwrap();
    assert_eq!(stored, first);
    assert!(read_from(store, 1, 0).await.unwrap() == big);
    for offset in [
        1usize,
        262_143,
        262_144,
        262_145,
        1_000_000,
        big.len() - 1,
        big.len(),
    ] {
        let tail = read_from(store, 1, offset as u64).await.unwrap();
        assert!(tail == big[offset..], "offset {offset}");
    }
    let (found, _) = store
        .open(&[1; BLOB_ADDRESS_LEN], 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, first);
    assert_eq!(store.usage(&alice).await.unwrap(), big.len() as u64);

    // The same address again: the stored blob's metadata, counted once, its life renewed
    // from the new upload's time (an older upload time never shortens it).
    let again = store_blob(
        store,
        1,
        &big,
        meta("bob@example.org", big.len(), 9, 200),
        QUOTA,
    )
    .await
    .unwrap();
    let renewed = BlobMeta {
        created_secs: 200,
        ..first.clone()
    };
    assert_eq!(again, renewed);
    assert_eq!(store.usage(&bob).await.unwrap(), 0);
    let older = store_blob(
        store,
        1,
        &big,
        meta("bob@example.org", big.len(), 9, 150),
        QUOTA,
    )
    .await
    .unwrap();
    assert_eq!(older, renewed);
    let (found, _) = store
        .open(&[1; BLOB_ADDRESS_LEN], 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, renewed);
    assert!(read_from(store, 1, 0).await.unwrap() == big);

    // Past the quota at commit: refused, nothing stored, nothing counted.
    let more = bytes(QUOTA as usize - big.len() + 1, 2);
    let refused = store_blob(
        store,
        2,
        &more,
        meta("alice@example.org", more.len(), 2, 150),
        QUOTA,
    )
    .await;
    assert!(matches!(refused, Err(ServiceError::BlobQuotaExceeded)));
    assert_eq!(read_from(store, 2, 0).await, None);
    assert_eq!(store.usage(&alice).await.unwrap(), big.len() as u64);

    // Empty and small blobs; another owner's quota is their own.
    store_blob(store, 3, &[], meta("bob@example.org", 0, 3, 300), QUOTA)
        .await
        .unwrap();
    assert_eq!(read_from(store, 3, 0).await.unwrap(), Vec::<u8>::new());
    let small = bytes(10, 4);
    store_blob(store, 4, &small, meta("bob@example.org", 10, 4, 300), QUOTA)
        .await
        .unwrap();
    assert_eq!(store.usage(&bob).await.unwrap(), 10);

    // Expiry: what was uploaded (or renewed) before the cutoff goes, with its quota.
    assert_eq!(store.expire(200).await.unwrap(), 0, "renewed at 200");
    assert_eq!(store.expire(201).await.unwrap(), 1);
    assert_eq!(read_from(store, 1, 0).await, None);
    assert_eq!(store.usage(&alice).await.unwrap(), 0);
    assert!(read_from(store, 4, 0).await.unwrap() == small);
    assert_eq!(store.expire(200).await.unwrap(), 0);
    assert_eq!(store.expire(301).await.unwrap(), 2);
    assert_eq!(store.usage(&bob).await.unwrap(), 0);
}

#[tokio::test]
async fn file_store() {
    let dir = tempfile::tempdir().unwrap();
    // Expiry buckets of one second: the suite's cutoffs are exact.
    let store = super::files::FileStore::open(dir.path(), 64).unwrap();
    run(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store() {
    let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
    let url = cluster.create_database("blobs").unwrap();
    // The engine migrates the schema the blob store uses.
    let options = crate::storage::postgres::Options {
        url: &url,
        pool_size: 4,
        timeout: std::time::Duration::from_secs(10),
        domain: "example.org",
        as_public_key: &[7; 32],
    };
    let sink = crate::bus::BusSink {
        queues: Default::default(),
        revoked: Default::default(),
        nodes_gone: Default::default(),
    };
    let (_engine, closer) = crate::storage::postgres::PgStore::connect(options, sink)
        .await
        .unwrap();
    let store =
        super::postgres::PgBlobStore::new(&url, 4, std::time::Duration::from_secs(10)).unwrap();
    run(&store).await;
    closer.join();
}
