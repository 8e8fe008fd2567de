//! Group commit: one task turns the stream of accepted updates into few, bounded transactions.
//!
//! Document actors hand over each update with a per-document sequence number. The persister
//! collects updates for at most the flush window (counted from the first update of a batch),
//! writes the batch in one transaction, then tells each document, through a `watch` channel,
//! the highest sequence number now durable. A failed write is retried with backoff and the
//! batch is kept: nothing accepted is dropped. The queue is bounded in bytes as well as in
//! updates, so a commit that stalls for a second (an fsync on a busy disk) does not yet stop the
//! documents, while large updates cannot pile up without limit.
//!
//! Documents never wait for the queue: they [`Persister::reserve`] room before they accept an
//! update, and when there is none (storage has been down long enough to fill the queue) they
//! refuse the update instead (the client keeps it and sends it again later). Every commit's
//! outcome is published in [`StorageStatus`], which the heartbeat and health follow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::store::{LogEntry, Store};

/// Updates waiting to be committed, at most (a few seconds' worth at the rates `loadtest`
/// sustains)...
pub const QUEUE_LEN: usize = 65_536;
/// ...and their bytes, at most. One update larger than this takes the whole budget.
pub const QUEUE_BYTES: usize = 64 << 20;

/// Whether storage took the last thing asked of it, as commits and probes find out.
#[derive(Debug, Default)]
pub struct StorageStatus {
    ok: AtomicBool,
    /// Why the last failure happened, for health.
    problem: Mutex<Option<String>>,
}

impl StorageStatus {
    pub fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Acquire)
    }

    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }

    /// Records an outcome; returns whether the status changed.
    pub fn set(&self, outcome: Result<(), String>) -> bool {
        let ok = outcome.is_ok();
        if let Ok(mut problem) = self.problem.lock() {
            *problem = outcome.err();
        }
        self.ok.swap(ok, Ordering::AcqRel) != ok
    }
}

/// Room in the queue for one update, taken before the update is accepted.
pub struct Reservation {
    slot: mpsc::OwnedPermit<Request>,
    budget: OwnedSemaphorePermit,
    pool: Arc<Semaphore>,
}

impl Reservation {
    /// Tries to hold room for `bytes` in all; false when the queue has no more.
    pub fn grow_to(&mut self, bytes: usize) -> bool {
        let want = budget_of(bytes) as usize;
        let have = self.budget.num_permits();
        if want <= have {
            return true;
        }
        match self
            .pool
            .clone()
            .try_acquire_many_owned((want - have) as u32)
        {
            Ok(more) => {
                self.budget.merge(more);
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back room beyond `bytes` (a reservation made with a generous bound).
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = budget_of(bytes) as usize;
        let have = self.budget.num_permits();
        if have > keep {
            drop(self.budget.split(have - keep));
        }
    }

    /// Queues the update; never waits.
    pub fn send(self, entry: LogEntry, seq: u64, durable: DurableWatch) {
        self.slot.send(Request::Append {
            entry,
            seq,
            durable,
            budget: self.budget,
        });
    }
}

/// An update's share of [`QUEUE_BYTES`].
fn budget_of(bytes: usize) -> u32 {
    bytes.clamp(1, QUEUE_BYTES) as u32
}
/// A batch is cut at this many bytes even inside the window.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Tells one document how far its updates are durable.
pub type DurableWatch = Arc<watch::Sender<u64>>;

enum Request {
    Append {
        entry: LogEntry,
        seq: u64,
        durable: DurableWatch,
        /// The entry's share of [`QUEUE_BYTES`], returned once it is committed.
        budget: OwnedSemaphorePermit,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// Cheap handle for submitting updates.
#[derive(Clone)]
pub struct Persister {
    tx: mpsc::Sender<Request>,
    /// Updates the writer has taken off the queue and is committing (retrying, when storage is
    /// down): still uncommitted, no longer in the channel.
    committing: Arc<std::sync::atomic::AtomicUsize>,
    budget: Arc<Semaphore>,
    status: Arc<StorageStatus>,
    metrics: CommitMetrics,
}

#[derive(Debug, thiserror::Error)]
#[error("the persister has stopped")]
pub struct PersisterStopped;

impl Persister {
    /// Starts the persister task. It runs until `stop` is cancelled, then commits everything
    /// still queued and exits.
    pub fn spawn(
        store: Store,
        window: Duration,
        stop: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        let status = Arc::new(StorageStatus::default());
        status.set(Ok(()));
        let metrics = CommitMetrics::default();
        let committing = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tracker.spawn(run(
            store,
            window,
            rx,
            stop,
            status.clone(),
            metrics.clone(),
            committing.clone(),
        ));
        Self {
            metrics,
            tx,
            committing,
            budget: Arc::new(Semaphore::new(QUEUE_BYTES)),
            status,
        }
    }

    /// What group commits took and how often they failed (exported by `crate::metrics`).
    pub fn metrics(&self) -> &CommitMetrics {
        &self.metrics
    }

    /// What commits found out about storage.
    pub fn status(&self) -> &Arc<StorageStatus> {
        &self.status
    }

    /// Room for an update of about `bytes`, or None when the queue is full (storage has been
    /// failing for a while) or the persister has stopped.
    pub fn reserve(&self, bytes: usize) -> Option<Reservation> {
        let budget = self
            .budget
            .clone()
            .try_acquire_many_owned(budget_of(bytes))
            .ok()?;
        let slot = self.tx.clone().try_reserve_owned().ok()?;
        Some(Reservation {
            slot,
            budget,
            pool: self.budget.clone(),
        })
    }

    /// Updates and bytes waiting to be committed (queued, or in the batch being committed).
    pub fn queued(&self) -> (usize, usize) {
        let committing = self.committing.load(std::sync::atomic::Ordering::Acquire);
        (
            QUEUE_LEN.saturating_sub(self.tx.capacity()) + committing,
            QUEUE_BYTES.saturating_sub(self.budget.available_permits()),
        )
    }

    /// Queues one update; waits while the queue is full (back-pressure).
    pub async fn append(
        &self,
        entry: LogEntry,
        seq: u64,
        durable: DurableWatch,
    ) -> Result<(), PersisterStopped> {
        let bytes = budget_of(entry.data.len());
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(bytes)
            .await
            .map_err(|_| PersisterStopped)?;
        self.tx
            .send(Request::Append {
                entry,
                seq,
                durable,
                budget,
            })
            .await
            .map_err(|_| PersisterStopped)
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<(), PersisterStopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Flush(tx))
            .await
            .map_err(|_| PersisterStopped)?;
        rx.await.map_err(|_| PersisterStopped)
    }
}

/// Figures of the group commits.
#[derive(Clone)]
pub struct CommitMetrics {
    /// Seconds from a batch's first attempt to its success (retries included).
    pub seconds: prometheus_client::metrics::histogram::Histogram,
    /// Updates committed.
    pub updates: prometheus_client::metrics::counter::Counter,
    /// Attempts that storage refused.
    pub failures: prometheus_client::metrics::counter::Counter,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        Self {
            // 0.5 ms to about 8 s.
            seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 15),
            ),
            updates: Default::default(),
            failures: Default::default(),
        }
    }
}

#[derive(Default)]
struct Batch {
    entries: Vec<LogEntry>,
    bytes: usize,
    /// Highest sequence per document in this batch, keyed by the watch's address.
    durable: HashMap<usize, (DurableWatch, u64)>,
    flushes: Vec<oneshot::Sender<()>>,
    /// Queue budget held by the entries, released when the batch is committed.
    budget: Vec<OwnedSemaphorePermit>,
}

impl Batch {
    fn add(&mut self, request: Request) {
        match request {
            Request::Append {
                entry,
                seq,
                durable,
                budget,
            } => {
                self.budget.push(budget);
                self.bytes += entry.data.len();
                self.entries.push(entry);
                let key = Arc::as_ptr(&durable) as usize;
                let slot = self.durable.entry(key).or_insert((durable, 0));
                slot.1 = slot.1.max(seq);
            }
            Request::Flush(done) => self.flushes.push(done),
        }
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.flushes.is_empty()
    }

    async fn commit(self, store: &Store, status: &StorageStatus, metrics: &CommitMetrics) {
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        while let Err(error) = store.append(&self.entries).await {
            metrics.failures.inc();
            if status.set(Err(error.to_string())) {
                tracing::error!(%error, updates = self.entries.len(), "group commit failed: storage unavailable; retrying (the updates stay queued and unacknowledged)");
            } else {
                tracing::debug!(%error, "group commit failed again; retrying");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        if !self.entries.is_empty() {
            metrics.seconds.observe(started.elapsed().as_secs_f64());
            metrics.updates.inc_by(self.entries.len() as u64);
        }
        if status.set(Ok(())) {
            tracing::info!(
                updates = self.entries.len(),
                "group commit succeeded: storage available again"
            );
        }
        for (durable, seq) in self.durable.into_values() {
            durable.send_modify(|through| *through = (*through).max(seq));
        }
        for done in self.flushes {
            let _ = done.send(());
        }
    }
}

async fn run(
    store: Store,
    window: Duration,
    mut rx: mpsc::Receiver<Request>,
    stop: CancellationToken,
    status: Arc<StorageStatus>,
    metrics: CommitMetrics,
    committing: Arc<std::sync::atomic::AtomicUsize>,
) {
    let commit = async |batch: Batch| {
        committing.store(batch.entries.len(), std::sync::atomic::Ordering::Release);
        batch.commit(&store, &status, &metrics).await;
        committing.store(0, std::sync::atomic::Ordering::Release);
    };
    loop {
        let first = tokio::select! {
            request = rx.recv() => request,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut batch = Batch::default();
        batch.add(first);
        let deadline = Instant::now() + window;
        while batch.bytes < MAX_BATCH_BYTES {
            tokio::select! {
                request = rx.recv() => match request {
                    Some(request) => batch.add(request),
                    None => break,
                },
                _ = sleep_until(deadline) => break,
                _ = stop.cancelled() => break,
            }
        }
        commit(batch).await;
    }
    // Stopping: everything that reached the queue is committed before the task ends.
    rx.close();
    let mut batch = Batch::default();
    while let Some(request) = rx.recv().await {
        batch.add(request);
    }
    if !batch.is_empty() {
        let updates = batch.entries.len();
        commit(batch).await;
        tracing::info!(updates, "final group commit done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchrony_protocol::DocId;

    #[tokio::test]
    async fn updates_beyond_the_byte_budget_are_all_committed() {
        let (_dir, store) = crate::store::temp_sqlite().await;
        let (stop, tracker) = (
            CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
        );
        let persister = Persister::spawn(store.clone(), Duration::from_millis(5), stop, &tracker);
        let doc = DocId::parse("budget").expect("id");
        let durable: DurableWatch = Arc::new(watch::channel(0).0);
        // One update larger than the whole budget, then more than the budget in smaller ones:
        // each append must wait for earlier commits, never forever.
        let sizes = [
            QUEUE_BYTES + 1,
            QUEUE_BYTES / 3,
            QUEUE_BYTES / 3,
            QUEUE_BYTES / 3,
            10,
        ];
        let appends = async {
            for (seq, size) in sizes.iter().enumerate() {
                let entry = LogEntry {
                    doc: doc.clone(),
                    data: bytes::Bytes::from(vec![7u8; *size]),
                };
                persister
                    .append(entry, seq as u64 + 1, durable.clone())
                    .await
                    .expect("append");
            }
            persister.flush().await.expect("flush");
        };
        tokio::time::timeout(Duration::from_secs(60), appends)
            .await
            .expect("an append waited for budget that never came back");
        assert_eq!(*durable.borrow(), sizes.len() as u64);
        let stored = store.load(&doc).await.expect("load");
        let lens: Vec<usize> = stored.updates.iter().map(Vec::len).collect();
        assert_eq!(lens, sizes);
    }
}
