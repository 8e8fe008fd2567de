//! The bounded queue of frames from a document (and the cluster) to one connection: the
//! sender side ([`Outbound`]) never waits; the session drains the receiver and reports what it
//! took back to the shared [`OutboundState`], which also carries close and lag requests.

use super::*;

/// Shared between a connection's session task and the actor that feeds it.
pub struct OutboundState {
    /// Bytes queued and not yet taken by the session.
    pub(super) queued_bytes: AtomicUsize,
    /// The budget for `queued_bytes` (`synchrony.outbound.queue.bytes`).
    pub(super) max_bytes: usize,
    /// Length of the one frame of at least `max_bytes` in the queue (0: none): a document's
    /// state may be larger than the budget and is allowed on top of it, once at a time.
    pub(super) oversized: AtomicUsize,
    /// Set by the actor when it dropped frames for this connection.
    pub(super) lagged: AtomicBool,
    /// A close the actor asks the session to perform.
    pub(super) close: Mutex<Option<(CloseCode, String)>>,
    /// Wakes the session for `lagged` or `close`.
    pub notify: Notify,
}

impl OutboundState {
    /// Accounts for a frame the session took off the queue.
    pub fn taken(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        if len >= self.max_bytes {
            self.oversized.store(0, Ordering::Release);
        }
    }

    /// The next frame already queued, if any, accounted for as taken.
    pub fn try_take(&self, rx: &mut mpsc::Receiver<Bytes>) -> Option<Bytes> {
        let frame = rx.try_recv().ok()?;
        self.taken(frame.len());
        Some(frame)
    }

    /// Empties a lagging connection's queue (the resync that follows brings the whole state),
    /// giving every frame's bytes back to the budget.
    pub fn discard_queued(&self, rx: &mut mpsc::Receiver<Bytes>) {
        while self.try_take(rx).is_some() {}
    }

    /// The close the actor asked for, if any.
    pub fn take_close(&self) -> Option<(CloseCode, String)> {
        self.close.lock().ok().and_then(|mut c| c.take())
    }

    /// Whether the actor dropped frames; clears the flag.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }

    pub(super) fn request_close(&self, code: CloseCode, reason: &str) {
        if let Ok(mut close) = self.close.lock() {
            close.get_or_insert((code, reason.to_owned()));
        }
        self.notify.notify_one();
    }
}

/// The actor's side of a connection's outbound queue.
#[derive(Clone)]
pub struct Outbound {
    pub(super) tx: mpsc::Sender<Bytes>,
    pub(super) state: Arc<OutboundState>,
    pub(super) max_bytes: usize,
}

impl Outbound {
    /// Whether the session has gone.
    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Creates the queue; the receiver belongs to the session.
    pub fn new(limits: &LimitsConfig) -> (Self, mpsc::Receiver<Bytes>, Arc<OutboundState>) {
        let (tx, rx) = mpsc::channel(limits.outbound_queue_messages.max(4));
        let state = Arc::new(OutboundState {
            queued_bytes: AtomicUsize::new(0),
            max_bytes: limits.outbound_queue_bytes,
            oversized: AtomicUsize::new(0),
            lagged: AtomicBool::new(false),
            close: Mutex::new(None),
            notify: Notify::new(),
        });
        let out = Self {
            tx,
            state: state.clone(),
            max_bytes: limits.outbound_queue_bytes,
        };
        (out, rx, state)
    }

    /// [`Outbound::push`], for a cluster route relaying the owner's frames.
    pub(crate) fn push_frame(&self, frame: &Bytes) -> bool {
        self.push(frame)
    }

    /// Asks the session to close its client.
    pub(crate) fn request_close(&self, code: CloseCode, reason: &str) {
        self.state.request_close(code, reason);
    }

    /// Queues a frame without waiting. Returns false (and marks the connection lagging) when
    /// the queue is over its bounds.
    pub(super) fn push(&self, frame: &Bytes) -> bool {
        if self.state.lagged.load(Ordering::Acquire) {
            return false;
        }
        let queued = self.state.queued_bytes.load(Ordering::Acquire);
        let oversized = self.state.oversized.load(Ordering::Acquire);
        // The budget bounds the backlog of ordinary frames. One frame at least as large as the
        // budget (a big document's state, sent on join or resync) is allowed on top of it, so
        // it reaches a client even with small messages queued around it; a second one while
        // the first is still queued means the client is not reading.
        let large = frame.len() >= self.max_bytes;
        let fits = if large {
            oversized == 0 && queued.saturating_sub(oversized) < self.max_bytes
        } else {
            queued.saturating_sub(oversized).saturating_add(frame.len()) <= self.max_bytes
        };
        if fits {
            // Counted before the frame is in the queue: counted after, the session could take
            // it (and subtract its length) first, and another producer (a cluster route pushes
            // beside the actor) would read the wrapped-around count.
            self.state
                .queued_bytes
                .fetch_add(frame.len(), Ordering::AcqRel);
            if large {
                self.state.oversized.store(frame.len(), Ordering::Release);
            }
            if self.tx.try_send(frame.clone()).is_ok() {
                return true;
            }
            self.state.taken(frame.len());
        }
        self.state.lagged.store(true, Ordering::Release);
        self.state.notify.notify_one();
        false
    }
}
