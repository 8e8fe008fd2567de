//! Documents: one actor task owns each loaded document.
//!
//! [`Docs`] is the registry. The first joiner of a document spawns its `DocActor` (`actor`); later
//! joiners find the same actor, so N simultaneous first joiners cause one load (the actor loads
//! before it reads its mailbox). Every change to a document goes through its actor: the actor
//! applies it, encodes the resulting update once and hands the same bytes to every connection
//! and to the persister.
//!
//! Connections receive frames through a bounded [`Outbound`] queue. The actor never waits on a
//! connection: when a queue is full the connection is marked lagging, its queue is dropped, and
//! once the connection asks for it, it is resynced from the document's full state (cached, so a
//! storm of joiners or laggards costs one encoding).
//!
//! Layout: this file holds the registry ([`Docs`]), what documents depend on ([`DocDeps`]) and
//! the ports the cluster implements ([`Handoff`]); `command` the mailbox's vocabulary;
//! `outbound` the per-connection queue; `actor` the actor itself (load, apply or refuse, acks,
//! unload and hand-over); `read` what the REST API reads of a document or a version.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use synchrony_protocol::{encode_message, ext, CloseCode, DocId, Message, SyncMessage};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use yrs::block::ClientID;
use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Array, GetString, Map, ReadTxn, StateVector, Text, Transact, Update, WriteTxn};

use crate::config::{CompactionConfig, LimitsConfig, TimingConfig};
use crate::nesting::{NestingError, NestingIndex};
use crate::persist::{DurableWatch, Persister, Reservation};
use crate::store::{LogEntry, Store, StoreError};

mod actor;
mod command;
mod outbound;
mod read;

use actor::*;

pub use command::*;
pub use outbound::*;
pub use read::*;

/// Commands a document's mailbox holds, at most.
const MAILBOX_LEN: usize = 256;

/// How long a REST request waits for its document, and for its change to be durable.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// How often a document with no clients looks whether another node owns it now (then it hands
/// its state over and unloads without waiting out `doc-idle-secs`).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// How long a document waits for storage where it must (a delete, a rebuild, an unload with
/// REST callers waiting) before it gives up with "storage unavailable".
pub const STORAGE_DEADLINE: Duration = Duration::from_secs(5);

/// Awareness client ids one connection may hold states for (a y-websocket client uses one).
pub const MAX_AWARENESS_IDS: usize = 8;
/// Largest awareness state (its JSON text) a connection may publish.
pub const MAX_AWARENESS_STATE_BYTES: usize = 64 * 1024;

/// What the rest of the engine needs to run documents.
/// Where a document goes when another node owns it now (set by the cluster).
pub trait Handoff: Send + Sync {
    /// Whether another node owns `doc` in this node's current view.
    fn owned_elsewhere(&self, doc: &DocId) -> bool;
    /// Gives `state` (a sync step 2 frame with the whole document) to the owner, which merges
    /// it like any client's step 2.
    fn hand_over(&self, doc: &DocId, state: Bytes);
}

#[derive(Clone)]
pub struct DocDeps {
    /// Set once the node joins a cluster.
    pub handoff: Arc<std::sync::OnceLock<Arc<dyn Handoff>>>,
    pub store: Store,
    pub persister: Persister,
    pub limits: LimitsConfig,
    pub timing: TimingConfig,
    pub compaction: CompactionConfig,
    /// Bound on the encoded size of all loaded documents (`synchrony.memory.max`).
    pub memory_max: u64,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// Maintenance locks (`{ctx}/v1/hub-lock-state`): locked documents refuse edits.
    pub locks: Arc<crate::locks::Locks>,
    pub metrics: Arc<DocMetrics>,
}

/// What documents count for `GET {ctx}/metrics`.
pub struct DocMetrics {
    /// Seconds to load a document from storage.
    pub load_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Seconds from an update's frame arriving to its broadcast being queued for every other
    /// client (mailbox wait, checks, integration and fan-out).
    pub broadcast_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Full states sent to clients that fell behind (or whose route moved).
    pub resyncs: prometheus_client::metrics::counter::Counter,
}

impl Default for DocMetrics {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        Self {
            // 0.5 ms to about 8 s.
            load_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            // 50 µs to about 1.6 s.
            broadcast_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            resyncs: Default::default(),
        }
    }
}

impl DocDeps {
    /// Dependencies for documents on `store` with `config`'s limits and timers, a persister of
    /// their own and no engine around them: for tests and fuzzing.
    pub fn standalone(store: Store, config: &crate::config::ServeConfig) -> Self {
        let tracker = TaskTracker::new();
        let persister = Persister::spawn(
            store.clone(),
            config.timing.flush_window(),
            CancellationToken::new(),
            &tracker,
        );
        Self {
            handoff: Arc::default(),
            store,
            persister,
            limits: config.limits.clone(),
            timing: config.timing.clone(),
            compaction: config.compaction.clone(),
            memory_max: config.managed.memory_max,
            locks: Arc::default(),
            metrics: Arc::default(),
            cancel: CancellationToken::new(),
            tracker,
        }
    }
}

#[derive(Clone)]
struct DocHandle {
    tx: mpsc::Sender<DocCommand>,
    generation: u64,
}

/// The registry of loaded documents.
pub struct Docs {
    loaded: Mutex<HashMap<DocId, DocHandle>>,
    next_generation: AtomicU64,
    deps: DocDeps,
    /// Loads from storage, for observability and the single-flight test.
    loads: AtomicU64,
    /// Encoded size of all loaded documents, as their actors report it.
    resident: AtomicU64,
}

/// Where a connection's traffic for a document goes.
#[derive(Clone)]
pub struct DocLink {
    tx: mpsc::Sender<DocCommand>,
}

impl DocLink {
    /// A link whose commands go to `tx` (a cluster route stands in for the actor).
    pub(crate) fn from_sender(tx: mpsc::Sender<DocCommand>) -> Self {
        Self { tx }
    }

    /// Forwards a command; false when the document actor is gone.
    pub async fn send(&self, command: DocCommand) -> bool {
        self.tx.send(command).await.is_ok()
    }

    /// Forwards a command without waiting: Err(Some(command)) when the mailbox is full,
    /// Err(None) when the actor is gone.
    pub fn try_send(&self, command: DocCommand) -> Result<(), Option<DocCommand>> {
        self.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(command) => Some(command),
            mpsc::error::TrySendError::Closed(_) => None,
        })
    }

    /// Waits for room in the mailbox; None when the actor is gone.
    pub async fn reserve(&self) -> Option<mpsc::Permit<'_, DocCommand>> {
        self.tx.reserve().await.ok()
    }
}

impl Docs {
    pub fn new(deps: DocDeps) -> Arc<Self> {
        Arc::new(Self {
            loaded: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            deps,
            loads: AtomicU64::new(0),
            resident: AtomicU64::new(0),
        })
    }

    /// What documents run with.
    pub fn deps(&self) -> &DocDeps {
        &self.deps
    }

    /// Whether `doc` is loaded here (someone has it open, or had it lately).
    pub fn is_loaded(&self, doc: &DocId) -> bool {
        self.loaded
            .lock()
            .map(|m| m.get(doc).is_some_and(|h| !h.tx.is_closed()))
            .unwrap_or(false)
    }

    pub fn loaded_count(&self) -> usize {
        self.loaded.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn load_count(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// The persister documents hand their updates to.
    pub fn persister(&self) -> &Persister {
        &self.deps.persister
    }

    /// Encoded bytes of all loaded documents.
    pub fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// Joins a connection to a document, loading it if needed.
    pub async fn join(
        self: &Arc<Self>,
        doc: &DocId,
        request: JoinRequest,
    ) -> Result<DocLink, JoinError> {
        // Nothing a joiner wrote could be accepted: say so now rather than let it edit in vain.
        if self.deps.persister.reserve(1).is_none() {
            return Err(JoinError::StorageUnavailable);
        }
        loop {
            if self.deps.cancel.is_cancelled() {
                return Err(JoinError::ShuttingDown);
            }
            let handle = self.handle(doc)?;
            let (reply, answer) = oneshot::channel();
            let join = DocCommand::Join {
                request: request.clone(),
                reply,
            };
            if handle.tx.send(join).await.is_err() {
                // The actor is unloading; once it is forgotten the next handle is a new actor.
                self.forget(doc, handle.generation);
                continue;
            }
            match answer.await {
                Ok(Ok(())) => return Ok(DocLink { tx: handle.tx }),
                Ok(Err(e)) => return Err(e),
                // Dropped unanswered: the actor unloaded with our request in its mailbox.
                Err(_) if self.deps.cancel.is_cancelled() => return Err(JoinError::ShuttingDown),
                Err(_) => {}
            }
        }
    }

    /// Sends a REST command to the document's actor (loading it if needed) and awaits the
    /// answer, for at most [`REQUEST_DEADLINE`] (a change not yet durable then is still
    /// committed once storage takes it; the caller hears 503 and may send it again).
    pub async fn request<T>(
        self: &Arc<Self>,
        doc: &DocId,
        make: impl Fn(oneshot::Sender<T>) -> DocCommand,
    ) -> Result<T, JoinError> {
        tokio::time::timeout(REQUEST_DEADLINE, self.request_unbounded(doc, make))
            .await
            .unwrap_or(Err(JoinError::Timeout))
    }

    async fn request_unbounded<T>(
        self: &Arc<Self>,
        doc: &DocId,
        make: impl Fn(oneshot::Sender<T>) -> DocCommand,
    ) -> Result<T, JoinError> {
        for _ in 0..100 {
            if self.deps.cancel.is_cancelled() {
                return Err(JoinError::ShuttingDown);
            }
            let handle = self.handle(doc)?;
            let (reply, answer) = oneshot::channel();
            if handle.tx.send(make(reply)).await.is_err() {
                self.forget(doc, handle.generation);
                continue;
            }
            match answer.await {
                Ok(value) => return Ok(value),
                // Dropped by a live actor: handling it failed (and the document was rebuilt).
                // Sending it again could fail the same way.
                Err(_) if !handle.tx.is_closed() => return Err(JoinError::Busy),
                // The actor went away with our command (unloaded, deleted or failed to load).
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        Err(JoinError::Busy)
    }

    fn handle(self: &Arc<Self>, doc: &DocId) -> Result<DocHandle, JoinError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = loaded.get(doc) {
            if !handle.tx.is_closed() {
                return Ok(handle.clone());
            }
        }
        // Past the memory bound, documents already loaded carry on; new ones wait.
        if self.resident_bytes() >= self.deps.memory_max {
            tracing::warn!(doc_id = %doc, resident = self.resident_bytes(), "memory bound (synchrony.memory.max) reached; refusing to load");
            return Err(JoinError::Busy);
        }
        let (tx, rx) = mpsc::channel(MAILBOX_LEN);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let handle = DocHandle { tx, generation };
        loaded.insert(doc.clone(), handle.clone());
        let actor = DocActor::new(doc.clone(), generation, self.clone());
        self.deps.tracker.spawn(actor.run(rx));
        Ok(handle)
    }

    /// Removes the registry entry of one actor generation (never a newer one).
    fn forget(&self, doc: &DocId, generation: u64) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.get(doc).is_some_and(|h| h.generation == generation) {
            loaded.remove(doc);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn docs() -> (tempfile::TempDir, Arc<Docs>) {
        let (dir, store) = crate::store::temp_sqlite().await;
        let config = crate::config::ServeConfig::default();
        (dir, Docs::new(DocDeps::standalone(store, &config)))
    }

    /// A cluster route pushes into a client's queue beside the document actor. The count of
    /// queued bytes must never wrap around while the session takes frames: it did when frames
    /// were counted after they were queued, and the next push overflowed (a panic in the actor,
    /// the client closed with 1011).
    #[test]
    fn two_producers_and_a_consumer_keep_the_queue_count_exact() {
        let config = crate::config::ServeConfig::default();
        let (out, mut rx, state) = Outbound::new(&config.limits);
        let producers: Vec<_> = (0..2)
            .map(|_| {
                let out = out.clone();
                std::thread::spawn(move || {
                    let frame = Bytes::from(vec![7u8; 100]);
                    let mut sent = 0;
                    while sent < 300_000 {
                        if out.push(&frame) {
                            sent += 1;
                        } else {
                            std::thread::yield_now();
                            out.state.lagged.store(false, Ordering::Release);
                        }
                    }
                })
            })
            .collect();
        let consumer = std::thread::spawn(move || {
            let mut taken = 0;
            while taken < 600_000 {
                match rx.try_recv() {
                    Ok(frame) => {
                        state.taken(frame.len());
                        taken += 1;
                    }
                    Err(_) => std::thread::yield_now(),
                }
            }
            state
        });
        for producer in producers {
            producer.join().expect("no producer panicked");
        }
        let state = consumer.join().expect("the consumer finished");
        assert_eq!(state.queued_bytes.load(Ordering::Acquire), 0);
    }

    /// A maintenance lock refuses clients' edits, not state moving between owners: a previous
    /// owner's hand-over (its whole state as a sync step 2) is merged while the page is locked.
    /// Refused, the new owner would go on without what the old one accepted after it loaded.
    #[tokio::test]
    async fn a_locked_document_takes_a_hand_over_and_refuses_a_client() {
        let (_dir, docs) = docs().await;
        docs.deps.locks.insert(
            "maintenance",
            crate::locks::Held {
                scope: crate::locks::Scope::All,
                expires_at: crate::store::now_millis() + 600_000,
            },
        );
        let id = DocId::parse("locked/page").unwrap();
        let limits = crate::config::ServeConfig::default().limits;
        let state_with = |client: u64, s: &str| {
            let doc = yrs::Doc::with_client_id(client);
            let text = doc.get_or_insert_text("t");
            text.insert(&mut doc.transact_mut(), 0, s);
            let update = doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            update
        };
        let cases = [
            (
                1,
                false,
                Message::Sync(SyncMessage::Update(state_with(11, "client "))),
            ),
            (
                2,
                true,
                Message::Sync(SyncMessage::SyncStep2(state_with(12, "handed over"))),
            ),
        ];
        for (conn_id, handover, message) in cases {
            let (out, mut rx, _state) = Outbound::new(&limits);
            let request = JoinRequest {
                conn_id,
                out,
                wants_persisted_ack: false,
                read_only: false,
                session: None,
                broadcast_to: None,
                handover,
            };
            let handle = docs.join(&id, request).await.expect("joins");
            let received = std::time::Instant::now();
            assert!(
                handle
                    .send(DocCommand::Message {
                        conn_id,
                        message,
                        received
                    })
                    .await
            );
            let (reply, answer) = oneshot::channel();
            let read = DocCommand::Read {
                text_root: Some("t".into()),
                xml: false,
                reply,
            };
            assert!(handle.send(read).await);
            let read = answer.await.expect("the document answers");
            let expected = if handover { "handed over" } else { "" };
            assert_eq!(
                read.text,
                Some(Ok(expected.to_owned())),
                "handover: {handover}"
            );
            // The client heard why its edit was refused; the hand-over heard nothing of it.
            let mut refused = false;
            while let Ok(frame) = rx.try_recv() {
                refused |= String::from_utf8_lossy(&frame).contains("hub.error/locked");
            }
            assert_eq!(refused, !handover, "handover: {handover}");
        }
    }

    /// Every way a session takes frames off its queue gives their bytes back: a lagging
    /// connection's discarded backlog too (a missed `taken` would shrink its budget for good).
    #[test]
    fn frames_taken_or_discarded_give_their_bytes_back() {
        let config = crate::config::ServeConfig::default();
        let (out, mut rx, state) = Outbound::new(&config.limits);
        for _ in 0..3 {
            assert!(out.push(&Bytes::from(vec![1u8; 1000])));
        }
        assert_eq!(state.queued_bytes.load(Ordering::Acquire), 3000);
        assert_eq!(state.try_take(&mut rx).map(|f| f.len()), Some(1000));
        assert_eq!(state.queued_bytes.load(Ordering::Acquire), 2000);
        state.discard_queued(&mut rx);
        assert_eq!(state.queued_bytes.load(Ordering::Acquire), 0);
        assert!(state.try_take(&mut rx).is_none());
    }

    #[tokio::test]
    async fn a_document_that_ends_in_a_panic_gives_back_its_resident_bytes() {
        let (_dir, docs) = docs().await;
        let actor = DocActor::new(DocId::parse("p").unwrap(), 1, docs.clone());
        let task = tokio::spawn(async move {
            let mut actor = actor;
            actor.approx_bytes = 12_345;
            actor.account();
            assert_eq!(actor.docs.resident_bytes(), 12_345);
            panic!("yrs misbehaved");
        });
        assert!(task.await.is_err());
        assert_eq!(
            docs.resident_bytes(),
            0,
            "the panicked actor's size still counts"
        );
    }
}
