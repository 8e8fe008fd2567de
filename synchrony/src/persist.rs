//! Group commit: one task turns the stream of accepted updates into few, bounded transactions.
//!
//! Document actors hand over each update with a per-document sequence number. The persister
//! collects updates for at most the flush window (counted from the first update of a batch),
//! writes the batch in one transaction, then tells each document, through a `watch` channel,
//! the highest sequence number now durable. A failed write is retried with backoff and the
//! batch is kept: nothing accepted is dropped, and while storage is down the bounded queue
//! pushes back on the documents instead of growing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::store::{LogEntry, Store};

/// Updates waiting to be committed, at most.
const QUEUE_LEN: usize = 4096;
/// A batch is cut at this many bytes even inside the window.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Tells one document how far its updates are durable.
pub type DurableWatch = Arc<watch::Sender<u64>>;

enum Request {
    Append {
        entry: LogEntry,
        seq: u64,
        durable: DurableWatch,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// Cheap handle for submitting updates.
#[derive(Clone)]
pub struct Persister {
    tx: mpsc::Sender<Request>,
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
        tracker.spawn(run(store, window, rx, stop));
        Self { tx }
    }

    /// Queues one update; waits while the queue is full (back-pressure).
    pub async fn append(
        &self,
        entry: LogEntry,
        seq: u64,
        durable: DurableWatch,
    ) -> Result<(), PersisterStopped> {
        self.tx
            .send(Request::Append {
                entry,
                seq,
                durable,
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

#[derive(Default)]
struct Batch {
    entries: Vec<LogEntry>,
    bytes: usize,
    /// Highest sequence per document in this batch, keyed by the watch's address.
    durable: HashMap<usize, (DurableWatch, u64)>,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Batch {
    fn add(&mut self, request: Request) {
        match request {
            Request::Append {
                entry,
                seq,
                durable,
            } => {
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

    async fn commit(self, store: &Store) {
        let mut backoff = Duration::from_millis(50);
        while let Err(error) = store.append(&self.entries).await {
            tracing::error!(%error, updates = self.entries.len(), "group commit failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
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
) {
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
        batch.commit(&store).await;
    }
    // Stopping: everything that reached the queue is committed before the task ends.
    rx.close();
    let mut batch = Batch::default();
    while let Some(request) = rx.recv().await {
        batch.add(request);
    }
    if !batch.is_empty() {
        let updates = batch.entries.len();
        batch.commit(&store).await;
        tracing::info!(updates, "final group commit done");
    }
}
