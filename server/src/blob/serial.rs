//! Work on an upload's chunks in order, on the blocking pool, while the stream is read on:
//! the chunks wait in a queue of at most [`QUEUED_CHUNKS`], and a job runs only while some
//! wait (when the queue is empty it waits [`LINGER`] for the next chunk, then ends, and the
//! next chunk starts another). An upload whose client is slow to send holds no thread, so
//! uploads cannot use up the blocking pool; one whose bytes keep coming is handled by one
//! job.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::QUEUED_CHUNKS;
use crate::error::ServiceError;

/// How long a job whose queue ran dry waits for the next chunk before it ends (a chunk of
/// 256 KiB arrives every ≈ 0.6 ms at 400 MiB/s).
const LINGER: Duration = Duration::from_millis(1);

/// What a [`Serial`] does with its state: each chunk in order, then once at the end.
pub(crate) trait Work: Send + 'static {
    /// Handles one chunk.
    fn chunk(&mut self, chunk: &[u8]) -> Result<(), ServiceError>;
    /// Runs once after the last chunk, when the work was [closed](Serial::close).
    fn last(&mut self) -> Result<(), ServiceError>;
}

struct Shared<W> {
    queue: VecDeque<(Bytes, OwnedSemaphorePermit)>,
    /// The state, while no job has it.
    work: Option<W>,
    closed: bool,
    /// Whether `last` ran.
    ended: bool,
    /// The first error (given to the next caller); `broken` stays set after it.
    failed: Option<ServiceError>,
    broken: bool,
    /// A job waits for the next chunk (on [`Inner::more`]).
    lingering: bool,
}

struct Inner<W> {
    state: Mutex<Shared<W>>,
    /// Signalled when a chunk is queued or the work closed while a job lingers.
    more: Condvar,
}

impl<W> Shared<W> {
    fn fail(&mut self, err: ServiceError) {
        self.queue.clear();
        self.failed = Some(err);
        self.broken = true;
    }

    /// The error to report once the work failed.
    fn error(&mut self) -> Option<ServiceError> {
        self.broken.then(|| self.failed.take().unwrap_or_else(gone))
    }
}

/// Chunks handled in order by jobs on the blocking pool (see the module docs).
pub(crate) struct Serial<W: Work> {
    shared: Arc<Inner<W>>,
    permits: Arc<Semaphore>,
    /// The job started last (it may have ended).
    job: Option<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn gone() -> ServiceError {
    ServiceError::Internal("an upload's worker is gone".into())
}

impl<W: Work> Serial<W> {
    pub(crate) fn new(work: W) -> Self {
        Self {
            shared: Arc::new(Inner {
                state: Mutex::new(Shared {
                    queue: VecDeque::new(),
                    work: Some(work),
                    closed: false,
                    ended: false,
                    failed: None,
                    broken: false,
                    lingering: false,
                }),
                more: Condvar::new(),
            }),
            permits: Arc::new(Semaphore::new(QUEUED_CHUNKS)),
            job: None,
        }
    }

    /// Queues a chunk (waiting while [`QUEUED_CHUNKS`] wait); an error of an earlier chunk is
    /// returned here.
    pub(crate) async fn push(&mut self, chunk: Bytes) -> Result<(), ServiceError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| gone())?;
        let owned = Arc::clone(&self.shared);
        let mut shared = lock(&owned.state);
        if let Some(err) = shared.error() {
            return Err(err);
        }
        if shared.closed {
            return Err(ServiceError::Internal("write after close".into()));
        }
        shared.queue.push_back((chunk, permit));
        if shared.lingering {
            owned.more.notify_one();
        }
        self.start(&owned, shared);
        Ok(())
    }

    /// No more chunks: `last` runs after those queued, without waiting for [`Serial::end`].
    pub(crate) fn close(&mut self) {
        let owned = Arc::clone(&self.shared);
        let mut shared = lock(&owned.state);
        if !shared.closed {
            shared.closed = true;
            if shared.lingering {
                owned.more.notify_one();
            }
            self.start(&owned, shared);
        }
    }

    /// Starts a job unless one runs (a job holds the state while it runs).
    fn start(&mut self, owned: &Arc<Inner<W>>, mut shared: MutexGuard<'_, Shared<W>>) {
        let Some(work) = shared.work.take() else {
            return;
        };
        drop(shared);
        let owned = Arc::clone(owned);
        self.job = Some(tokio::task::spawn_blocking(move || run(&owned, work)));
    }

    /// Waits for every queued chunk (and `last`, if closed); the state, or the first error.
    pub(crate) async fn end(mut self) -> Result<W, ServiceError> {
        self.close();
        // The job started last runs `last` (one running when `close` came finds the queue
        // empty and closed), or one is started here if the state was idle.
        if let Some(job) = self.job.take() {
            job.await.map_err(|_| gone())?;
        }
        let mut shared = lock(&self.shared.state);
        if let Some(err) = shared.error() {
            return Err(err);
        }
        if shared.ended {
            return shared.work.take().ok_or_else(gone);
        }
        Err(gone())
    }

    /// The job running now, if any: what must end before the upload's files are removed.
    pub(crate) fn take_job(&mut self) -> Option<JoinHandle<()>> {
        // The running job finds nothing more to do.
        lock(&self.shared.state).queue.clear();
        self.job.take()
    }
}

/// One job: the queued chunks in order, then `last` if closed; gives the state back when the
/// queue stayed empty for [`LINGER`] (or keeps nothing after an error: the upload is over).
fn run<W: Work>(inner: &Inner<W>, mut work: W) {
    let mut guard = lock(&inner.state);
    loop {
        if let Some((chunk, permit)) = guard.queue.pop_front() {
            drop(guard);
            let done = work.chunk(&chunk);
            drop(chunk);
            drop(permit);
            guard = lock(&inner.state);
            if let Err(err) = done {
                guard.fail(err);
                return;
            }
            continue;
        }
        if guard.closed && !guard.ended {
            drop(guard);
            let done = work.last();
            guard = lock(&inner.state);
            guard.ended = true;
            match done {
                Ok(()) => guard.work = Some(work),
                Err(err) => guard.fail(err),
            }
            return;
        }
        if !guard.closed && !guard.broken {
            // The next chunk is usually on its way: wait a moment rather than end the job.
            guard.lingering = true;
            let (woken, waited) = inner
                .more
                .wait_timeout_while(guard, LINGER, |s| s.queue.is_empty() && !s.closed)
                .unwrap_or_else(PoisonError::into_inner);
            guard = woken;
            guard.lingering = false;
            if !waited.timed_out() {
                continue;
            }
        }
        guard.work = Some(work);
        return;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Records the bytes it is given; fails on the chunk numbered `fail_at`.
    #[derive(Default)]
    struct Record {
        seen: Vec<u8>,
        chunks: usize,
        lasts: usize,
        fail_at: Option<usize>,
    }

    impl Work for Record {
        fn chunk(&mut self, chunk: &[u8]) -> Result<(), ServiceError> {
            if self.fail_at == Some(self.chunks) {
                return Err(ServiceError::Internal("disk on fire".into()));
            }
            self.chunks += 1;
            self.seen.extend_from_slice(chunk);
            Ok(())
        }

        fn last(&mut self) -> Result<(), ServiceError> {
            self.lasts += 1;
            Ok(())
        }
    }

    #[test]
    fn uploads_waiting_for_bytes_hold_no_blocking_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Sixteen uploads, each with a chunk written, wait for their clients' next bytes.
            let mut open = Vec::new();
            for i in 0..16u8 {
                let mut serial = Serial::new(Record::default());
                serial.push(Bytes::from(vec![i; 3])).await.unwrap();
                open.push(serial);
            }
            // The pool's two threads are free for other work meanwhile.
            let other =
                tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(|| 42))
                    .await;
            assert_eq!(
                other.expect("blocking pool held by idle uploads").unwrap(),
                42
            );
            for (i, serial) in open.into_iter().enumerate() {
                let record = serial.end().await.unwrap();
                assert_eq!(record.seen, vec![i as u8; 3]);
                assert_eq!(record.lasts, 1);
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_are_handled_in_order_and_last_runs_once_after_them() {
        let mut serial = Serial::new(Record::default());
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let bytes = i.to_be_bytes();
            expected.extend_from_slice(&bytes);
            serial.push(Bytes::copy_from_slice(&bytes)).await.unwrap();
            if i % 50 == 0 {
                // Let the queue run dry now and then, so jobs end and start again.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        serial.close();
        let record = serial.end().await.unwrap();
        assert_eq!(record.seen, expected);
        assert_eq!(record.chunks, 200);
        assert_eq!(record.lasts, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_chunk_fails_the_later_calls_and_stops_the_work() {
        let mut serial = Serial::new(Record {
            fail_at: Some(3),
            ..Record::default()
        });
        let mut failed = None;
        for i in 0..100u8 {
            if let Err(err) = serial.push(Bytes::from(vec![i])).await {
                failed = Some(err);
                break;
            }
            tokio::task::yield_now().await;
        }
        // At most QUEUED_CHUNKS chunks wait unhandled, so the failure of the fourth comes
        // before the pushes run out, and the next push reports it.
        let err = failed.expect("no push saw the failure");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        let end = serial.end().await;
        assert!(end.is_err(), "the end of failed work succeeded");
    }
}
