//! The blob store of the PostgreSQL engine: every node of a domain reads and writes the same
//! blobs, and a user's quota is counted once for the domain (schema: migration 0004).
//!
//! - Bytes are rows of `blob_chunks` (`bytea`, [`CHUNK`] bytes each, the last one shorter),
//!   stored uncompressed (`STORAGE EXTERNAL`: ciphertext does not compress, and ranges read
//!   only the slices they need). An upload writes its chunks inside one transaction as they
//!   arrive (at most one chunk is held in memory) and commits them together with the `blobs`
//!   row that makes them visible. A partial upload is never visible: until the commit no other
//!   transaction sees its chunks, and a node that dies or an upload that fails leaves an
//!   aborted transaction, which PostgreSQL discards by itself (nothing to clean up).
//! - Quota: `blob_usage` holds the stored bytes per owner; the commit adds the blob's size
//!   only if the sum stays within the quota (one conditional upsert, serialised by the row's
//!   lock across nodes), otherwise the whole upload rolls back.
//! - Uploads run on a pool of their own, so long uploads never take the connections the
//!   other services need. Their transactions have no idle timeout: the service cuts a stalled
//!   sender (`blobs.stall_timeout_ms`), and a node that dies closes its connections.
//! - Downloads read one chunk per statement on a pooled connection taken for that statement
//!   only, a chunk or two ahead of the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use roost_protocol::UserId;
use roost_protocol::messages::blob::{BLOB_ADDRESS_LEN, BLOB_TOKEN_LEN};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_postgres::NoTls;

use super::{BlobMeta, BlobStore};
use crate::error::ServiceError;
use crate::storage::StoreError;

/// Bytes per chunk row.
const CHUNK: usize = 256 * 1024;
/// Chunks a download reads ahead of the stream.
const READ_AHEAD: usize = 2;
/// Expired blobs deleted per transaction.
const EXPIRE_BATCH: i64 = 64;

/// Blobs in the domain's PostgreSQL database; cheap to clone.
#[derive(Clone)]
pub(crate) struct PgBlobStore {
    pool: Pool,
}

fn db(err: tokio_postgres::Error) -> ServiceError {
    ServiceError::Store(err.into())
}

fn pool_error(err: deadpool_postgres::PoolError) -> ServiceError {
    ServiceError::Store(err.into())
}

fn to_i64(value: u64) -> Result<i64, ServiceError> {
    i64::try_from(value)
        .map_err(|_| ServiceError::Store(StoreError::Corrupt("number out of range")))
}

fn to_u64(value: i64) -> Result<u64, ServiceError> {
    u64::try_from(value).map_err(|_| ServiceError::Store(StoreError::Corrupt("blobs")))
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    idx: usize,
) -> Result<T, ServiceError> {
    row.try_get(idx)
        .map_err(|_| ServiceError::Store(StoreError::Corrupt("blobs")))
}

/// The metadata columns `owner, token, size, created_secs` from `first` on.
fn meta_from(row: &tokio_postgres::Row, first: usize) -> Result<BlobMeta, ServiceError> {
    let owner: String = column(row, first)?;
    let token: Vec<u8> = column(row, first + 1)?;
    let corrupt = || ServiceError::Store(StoreError::Corrupt("blobs"));
    Ok(BlobMeta {
        owner: owner.parse().map_err(|_| corrupt())?,
        token: <[u8; BLOB_TOKEN_LEN]>::try_from(token.as_slice()).map_err(|_| corrupt())?,
        size: to_u64(column(row, first + 2)?)?,
        created_secs: to_u64(column(row, first + 3)?)?,
    })
}

impl PgBlobStore {
    /// A pool of `pool_size` connections to `url` for blob transfers (connections are made
    /// when first needed; the schema is the storage engine's, migrated before this runs).
    pub(crate) fn new(url: &str, pool_size: u32, timeout: Duration) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|_| {
            StoreError::Mismatch("storage.url is not a valid connection string".into())
        })?;
        let ms = timeout.as_millis();
        config
            .connect_timeout(timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(timeout)
            .application_name("roost-blobs")
            // Each statement is short; an upload's transaction lasts as long as its stream.
            .options(format!(
                "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout=0"
            ));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size as usize)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| StoreError::Database(err.to_string().into()))?;
        Ok(Self { pool })
    }

    async fn client(&self) -> Result<Object, ServiceError> {
        self.pool.get().await.map_err(pool_error)
    }
}

/// An upload: a connection inside the transaction that writes its chunks. Dropped before
/// [`BlobStore::commit`] finished, the connection is closed instead of going back to the
/// pool, and PostgreSQL rolls the transaction back.
pub(crate) struct PgUpload {
    client: Option<Object>,
    data_id: i64,
    next_seq: i64,
    /// Bytes of the chunk being filled.
    pending: Vec<u8>,
    /// What the blob is committed with.
    meta: BlobMeta,
}

impl Drop for PgUpload {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

impl PgUpload {
    fn client(&self) -> Result<&Object, ServiceError> {
        self.client
            .as_ref()
            .ok_or_else(|| ServiceError::Internal("blob upload used after its end".into()))
    }

    /// Writes the filled chunk.
    async fn flush(&mut self) -> Result<(), ServiceError> {
        let client = self.client()?;
        let insert = client
            .prepare_cached("INSERT INTO blob_chunks (data_id, seq, bytes) VALUES ($1, $2, $3)")
            .await
            .map_err(db)?;
        client
            .execute(&insert, &[&self.data_id, &self.next_seq, &self.pending])
            .await
            .map_err(db)?;
        self.next_seq += 1;
        self.pending.clear();
        Ok(())
    }
}

impl BlobStore for PgBlobStore {
    type Upload = PgUpload;
    type Reader = PgReader;

    async fn begin(&self, meta: BlobMeta) -> Result<PgUpload, ServiceError> {
        let client = self.client().await?;
        let mut upload = PgUpload {
            client: None,
            data_id: 0,
            next_seq: 0,
            pending: Vec::with_capacity(CHUNK),
            meta,
        };
        client.batch_execute("BEGIN").await.map_err(db)?;
        // From here on a failure drops the connection (rolling back).
        upload.client = Some(client);
        let row = upload
            .client()?
            .query_one("SELECT nextval('blob_data_seq')", &[])
            .await
            .map_err(db)?;
        upload.data_id = column(&row, 0)?;
        Ok(upload)
    }

    async fn write(&self, upload: &mut PgUpload, chunk: Bytes) -> Result<(), ServiceError> {
        let mut bytes = &chunk[..];
        while !bytes.is_empty() {
            let room = CHUNK - upload.pending.len();
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            upload.pending.extend_from_slice(now);
            bytes = later;
            if upload.pending.len() == CHUNK {
                upload.flush().await?;
            }
        }
        Ok(())
    }

    /// The last chunk is written in the commit's transaction.
    fn close(&self, _upload: &mut PgUpload) {}

    async fn commit(
        &self,
        mut upload: PgUpload,
        address: [u8; BLOB_ADDRESS_LEN],
        quota: u64,
    ) -> Result<BlobMeta, ServiceError> {
        if !upload.pending.is_empty() {
            upload.flush().await?;
        }
        let meta = upload.meta.clone();
        let client = upload.client()?;
        let owner = meta.owner.to_string();
        let size = to_i64(meta.size)?;
        // Inserted, or the same bytes are stored already: whoever holds them may read them,
        // and the upload renews the blob's life (the uploader is told it lives `expiry_secs`
        // from now; the first uploader keeps owning its quota). One statement, so a sweep
        // deleting the old row meanwhile cannot make this upload lose its blob.
        let row = client
            .query_one(
                "INSERT INTO blobs (address, data_id, chunk_size, owner, token, size, created_secs)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (address) DO UPDATE
                     SET created_secs = GREATEST(blobs.created_secs, EXCLUDED.created_secs)
                 RETURNING data_id, owner, token, size, created_secs",
                &[
                    &address.as_slice(),
                    &upload.data_id,
                    &(CHUNK as i32),
                    &owner,
                    &meta.token.as_slice(),
                    &size,
                    &to_i64(meta.created_secs)?,
                ],
            )
            .await
            .map_err(db)?;
        if column::<i64>(&row, 0)? != upload.data_id {
            // This upload's chunks are not needed: remove them with the renewal's commit.
            let existing = meta_from(&row, 1)?;
            client
                .execute(
                    "DELETE FROM blob_chunks WHERE data_id = $1",
                    &[&upload.data_id],
                )
                .await
                .map_err(db)?;
            client.batch_execute("COMMIT").await.map_err(db)?;
            upload.client = None;
            return Ok(existing);
        }
        let counted = client
            .execute(
                "INSERT INTO blob_usage (owner, bytes) SELECT $1::TEXT, $2::BIGINT WHERE $2::BIGINT <= $3::BIGINT
                 ON CONFLICT (owner) DO UPDATE SET bytes = blob_usage.bytes + EXCLUDED.bytes
                 WHERE blob_usage.bytes + EXCLUDED.bytes <= $3::BIGINT",
                &[&owner, &size, &to_i64(quota)?],
            )
            .await
            .map_err(db)?;
        if counted == 0 {
            client.batch_execute("ROLLBACK").await.map_err(db)?;
            upload.client = None;
            return Err(ServiceError::BlobQuotaExceeded);
        }
        client.batch_execute("COMMIT").await.map_err(db)?;
        // Committed: the connection may serve again.
        upload.client = None;
        Ok(meta)
    }

    async fn open(
        &self,
        address: &[u8; BLOB_ADDRESS_LEN],
        offset: u64,
    ) -> Result<Option<(BlobMeta, PgReader)>, ServiceError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT data_id, chunk_size, owner, token, size, created_secs
                 FROM blobs WHERE address = $1",
                &[&address.as_slice()],
            )
            .await
            .map_err(db)?;
        drop(client);
        let Some(row) = row else {
            return Ok(None);
        };
        let data_id: i64 = column(&row, 0)?;
        let chunk_size: i32 = column(&row, 1)?;
        let meta = meta_from(&row, 2)?;
        let chunk_size = u64::try_from(chunk_size)
            .ok()
            .filter(|c| *c > 0)
            .ok_or(ServiceError::Store(StoreError::Corrupt("blobs")))?;
        // Nothing is read before the caller reads: a refused download (a wrong token, a range
        // past the end) costs no chunk.
        let chunks = (offset < meta.size).then(|| Chunks {
            pool: self.pool.clone(),
            data_id,
            chunk_size,
            offset,
            size: meta.size,
        });
        Ok(Some((
            meta,
            PgReader {
                chunks,
                rx: None,
                current: Vec::new(),
                pos: 0,
            },
        )))
    }

    async fn usage(&self, owner: &UserId) -> Result<u64, ServiceError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT bytes FROM blob_usage WHERE owner = $1",
                &[&owner.to_string()],
            )
            .await
            .map_err(db)?;
        match row {
            Some(row) => to_u64(column(&row, 0)?),
            None => Ok(0),
        }
    }

    async fn expire(&self, created_before_secs: u64) -> Result<u64, ServiceError> {
        let cutoff = to_i64(created_before_secs)?;
        let mut removed = 0;
        loop {
            let mut client = self.client().await?;
            let txn = client.transaction().await.map_err(db)?;
            let rows = txn
                .query(
                    "DELETE FROM blobs WHERE address IN (
                         SELECT address FROM blobs WHERE created_secs < $1
                         ORDER BY created_secs LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING data_id, owner, size",
                    &[&cutoff, &EXPIRE_BATCH],
                )
                .await
                .map_err(db)?;
            let mut data_ids = Vec::with_capacity(rows.len());
            let mut freed: std::collections::BTreeMap<String, i64> = Default::default();
            for row in &rows {
                data_ids.push(column::<i64>(row, 0)?);
                *freed.entry(column(row, 1)?).or_default() += column::<i64>(row, 2)?;
            }
            txn.execute(
                "DELETE FROM blob_chunks WHERE data_id = ANY($1)",
                &[&data_ids],
            )
            .await
            .map_err(db)?;
            // Owners in a fixed order: two nodes sweeping at once cannot deadlock.
            for (owner, bytes) in &freed {
                txn.execute(
                    "UPDATE blob_usage SET bytes = GREATEST(bytes - $2, 0) WHERE owner = $1",
                    &[owner, bytes],
                )
                .await
                .map_err(db)?;
            }
            txn.commit().await.map_err(db)?;
            removed += rows.len() as u64;
            if (rows.len() as i64) < EXPIRE_BATCH {
                return Ok(removed);
            }
        }
    }
}

/// Reads a blob's chunks from `offset` on and sends them to a [`PgReader`].
struct Chunks {
    pool: Pool,
    data_id: i64,
    chunk_size: u64,
    offset: u64,
    size: u64,
}

impl Chunks {
    async fn send(self, tx: tokio::sync::mpsc::Sender<io::Result<Vec<u8>>>) {
        let mut seq = self.offset / self.chunk_size;
        let mut skip = self.offset % self.chunk_size;
        while seq.saturating_mul(self.chunk_size) < self.size {
            let chunk = self.chunk(seq, skip).await;
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                // The download ended (or cannot go on).
                return;
            }
            seq += 1;
            skip = 0;
        }
    }

    async fn chunk(&self, seq: u64, skip: u64) -> io::Result<Vec<u8>> {
        let broken = |what: String| io::Error::other(what);
        let client = self
            .pool
            .get()
            .await
            .map_err(|err| broken(format!("blob chunk: {err}")))?;
        let seq = i64::try_from(seq).map_err(|_| broken("chunk number".into()))?;
        let row = client
            .query_opt(
                "SELECT bytes FROM blob_chunks WHERE data_id = $1 AND seq = $2",
                &[&self.data_id, &seq],
            )
            .await
            .map_err(|err| broken(format!("blob chunk: {err}")))?
            // Expired and deleted while it was read.
            .ok_or_else(|| broken("blob chunk missing".into()))?;
        let mut bytes: Vec<u8> = row
            .try_get(0)
            .map_err(|_| broken("blob chunk unreadable".into()))?;
        let skip = usize::try_from(skip).unwrap_or(usize::MAX).min(bytes.len());
        bytes.drain(..skip);
        Ok(bytes)
    }
}

/// The bytes of a stored blob, from the offset it was opened at. The chunks are read by a
/// task started at the first read.
pub(crate) struct PgReader {
    /// The chunks to read, until the first read starts their task.
    chunks: Option<Chunks>,
    /// The task's chunks (`None` before the first read, and for an empty range).
    rx: Option<tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>>,
    current: Vec<u8>,
    pos: usize,
}

impl AsyncRead for PgReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(chunks) = this.chunks.take() {
            let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
            tokio::spawn(chunks.send(tx));
            this.rx = Some(rx);
        }
        while this.pos >= this.current.len() {
            let Some(rx) = this.rx.as_mut() else {
                // An empty range.
                return Poll::Ready(Ok(()));
            };
            match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                // Every chunk was read: end of the blob.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err)),
                Poll::Ready(Some(Ok(chunk))) => {
                    this.current = chunk;
                    this.pos = 0;
                }
            }
        }
        let left = this.current.get(this.pos..).unwrap_or_default();
        let n = left.len().min(buf.remaining());
        buf.put_slice(left.get(..n).unwrap_or_default());
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}
