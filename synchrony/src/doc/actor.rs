//! The actor that owns one loaded document: its connections, its yrs document and awareness,
//! the updates it applies, refuses or hands to the persister, and its life from load to unload.

use super::*;

pub(super) struct Conn {
    pub(super) out: Outbound,
    /// Awareness client ids this connection controls; removed when it leaves.
    pub(super) awareness_ids: HashSet<ClientID>,
    pub(super) wants_ack: bool,
    pub(super) read_only: bool,
    /// A previous owner handing the state over: not refused under a lock.
    pub(super) handover: bool,
    pub(super) session: Option<serde_json::Value>,
    /// Update-bearing messages received from this connection.
    pub(super) received: u64,
    /// (document sequence that must be durable, received count it acknowledges).
    pub(super) pending_acks: VecDeque<(u64, u64)>,
    /// The last acknowledgement queued; re-sent on resync since the queue may have dropped it.
    pub(super) last_acked: u64,
    /// The count of the first update refused while the document was locked: no
    /// acknowledgement reaches it (the client would take its edit for stored) until a sync
    /// step 2 from the client, which holds everything it has that the document lacks, is in.
    pub(super) acks_held_from: Option<u64>,
    pub(super) resyncs: VecDeque<Instant>,
    /// Receives broadcasts (others' updates and awareness). A cluster route turns it off once
    /// its node's subscription carries them (see `cluster::relay`).
    pub(super) broadcasts: bool,
    /// Where they go when not to `out` (see [`JoinRequest::broadcast_to`]).
    pub(super) broadcast_to: Option<Outbound>,
}

impl Conn {
    /// Acknowledges, in one message, every update of this connection durable at `durable`.
    pub(super) fn ack_through(&mut self, durable: u64) {
        let mut acked = None;
        let held = self.acks_held_from;
        while self
            .pending_acks
            .front()
            .is_some_and(|(seq, n)| *seq <= durable && held.is_none_or(|h| *n < h))
        {
            acked = self.pending_acks.pop_front().map(|(_, n)| n);
        }
        if let Some(n) = acked {
            self.last_acked = n;
            self.out.push(&Bytes::from(ext::encode_persisted(n)));
        }
    }
}

/// Frames derived from the current document state, dropped on every change.
#[derive(Default)]
pub(super) struct StateCache {
    pub(super) full_state: Option<Bytes>,
    pub(super) step1: Option<Bytes>,
    /// The last diff computed, keyed by the state vector it answered.
    pub(super) last_diff: Option<(Vec<u8>, Bytes)>,
}

/// Why an update was not applied.
pub(super) enum Rejection {
    Invalid(String),
    /// Nested deeper than `synchrony.max.nesting.depth`.
    TooDeep(String),
    /// Holds a type under content the document lacks: the client should resync (1013).
    Unanchored(String),
    /// The persister's queue is full (storage has been failing): nothing more is accepted
    /// until it drains.
    StorageFull,
    TooLarge,
    /// yrs panicked or failed half-way: the in-memory document cannot be trusted.
    Poisoned(String),
}

impl From<NestingError> for Rejection {
    fn from(error: NestingError) -> Self {
        match error {
            NestingError::TooDeep { .. }
            | NestingError::Scan(synchrony_protocol::nesting::ScanError::TooDeep { .. }) => {
                Rejection::TooDeep(error.to_string())
            }
            NestingError::PendingType => Rejection::Unanchored(error.to_string()),
            other => Rejection::Invalid(other.to_string()),
        }
    }
}

pub(super) struct DocActor {
    pub(super) id: DocId,
    pub(super) generation: u64,
    pub(super) docs: Arc<Docs>,
    pub(super) awareness: Awareness,
    pub(super) conns: HashMap<u64, Conn>,
    pub(super) cache: StateCache,
    /// Approximate encoded size, for the document size limit.
    pub(super) approx_bytes: usize,
    /// How deeply the document's types nest; deeper updates are refused before yrs sees them.
    pub(super) nesting: NestingIndex,
    /// Which connection holds each awareness client id: nobody else may change or remove it.
    pub(super) awareness_owners: HashMap<ClientID, u64>,
    /// Sequence number of the last update handed to the persister.
    pub(super) submitted: u64,
    pub(super) durable: DurableWatch,
    pub(super) durable_rx: watch::Receiver<u64>,
    /// Log rows and bytes written since the last compaction.
    pub(super) log_rows: u64,
    pub(super) log_bytes: u64,
    /// Compact once this sequence number is durable.
    pub(super) compact_at: Option<u64>,
    pub(super) compacting: Arc<AtomicBool>,
    /// REST changes waiting for durability: (sequence, reply).
    pub(super) waiting: Vec<(u64, oneshot::Sender<Result<(), DocError>>)>,
    /// Set by a delete or a failed rebuild: the actor stops and handles nothing more.
    pub(super) stopped: bool,
    /// This document's share of the registry's resident total.
    pub(super) residency: Residency,
    /// Changes to the maintenance locks, watched while `refused_locked` is set.
    pub(super) locks_rx: watch::Receiver<u64>,
    /// An edit was refused because the document was locked: when the lock ends, every client
    /// is sent a sync step 1 so that what it kept comes in.
    pub(super) refused_locked: bool,
}

/// A document's share of the registry's resident total, given back when its actor ends however
/// it ends: a panicking actor used to leave its size counted against `synchrony.memory.max`.
pub(super) struct Residency {
    pub(super) docs: Arc<Docs>,
    pub(super) reported: u64,
}

impl Residency {
    pub(super) fn set(&mut self, bytes: u64) {
        if bytes > self.reported {
            self.docs
                .resident
                .fetch_add(bytes - self.reported, Ordering::Relaxed);
        } else {
            self.docs
                .resident
                .fetch_sub(self.reported - bytes, Ordering::Relaxed);
        }
        self.reported = bytes;
    }
}

impl Drop for Residency {
    fn drop(&mut self) {
        self.set(0);
    }
}

pub(super) fn frame(message: &Message) -> Bytes {
    Bytes::from(encode_message(message))
}

impl DocActor {
    pub(super) fn new(id: DocId, generation: u64, docs: Arc<Docs>) -> Self {
        let (durable, durable_rx) = watch::channel(0);
        let limit = docs.deps.limits.max_nesting_depth;
        let residency = Residency {
            docs: docs.clone(),
            reported: 0,
        };
        let locks_rx = docs.deps.locks.subscribe();
        Self {
            id,
            generation,
            docs,
            awareness: Awareness::new(yrs::Doc::new()),
            conns: HashMap::new(),
            cache: StateCache::default(),
            approx_bytes: 0,
            nesting: NestingIndex::new(limit),
            awareness_owners: HashMap::new(),
            submitted: 0,
            durable: Arc::new(durable),
            durable_rx,
            log_rows: 0,
            log_bytes: 0,
            compact_at: None,
            compacting: Arc::new(AtomicBool::new(false)),
            waiting: Vec::new(),
            stopped: false,
            residency,
            locks_rx,
            refused_locked: false,
        }
    }

    pub(super) fn deps(&self) -> &DocDeps {
        &self.docs.deps
    }

    /// Brings the registry's resident total up to date with this document's size.
    pub(super) fn account(&mut self) {
        self.residency.set(self.approx_bytes as u64);
    }

    /// Handles a command; a panic in it (yrs on client data, most likely) closes the connection
    /// that sent it and rebuilds the document from storage instead of ending the actor.
    pub(super) async fn handle_contained(&mut self, command: DocCommand) {
        use futures_util::FutureExt;
        let conn_id = match &command {
            DocCommand::Message { conn_id, .. }
            | DocCommand::Resync { conn_id }
            | DocCommand::Leave { conn_id } => Some(*conn_id),
            DocCommand::Join { request, .. } => Some(request.conn_id),
            _ => None,
        };
        if AssertUnwindSafe(self.handle(command))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(
                conn_id,
                "handling a command panicked; closing its connection and rebuilding the document"
            );
            if let Some(conn_id) = conn_id {
                self.close(conn_id, CloseCode::INTERNAL_ERROR, "internal error");
            }
            self.rebuild().await;
        }
    }

    /// Whether `extra` more bytes fit under the document size limit. The running estimate only
    /// grows with each update; near the limit it is replaced by the real encoded size, so that
    /// content deleted since makes room again (paste-and-delete cycles ended in a false 4413).
    pub(super) fn fits(&mut self, extra: usize) -> bool {
        let max = self.deps().limits.max_doc_bytes;
        if self.approx_bytes.saturating_add(extra) <= max {
            return true;
        }
        self.cache = StateCache::default();
        self.full_state();
        self.approx_bytes.saturating_add(extra) <= max
    }

    #[tracing::instrument(name = "doc", skip_all, fields(doc_id = %self.id))]
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<DocCommand>) {
        let loading = Instant::now();
        let loaded = self.load().await;
        self.deps()
            .metrics
            .load_seconds
            .observe(loading.elapsed().as_secs_f64());
        if let Err(error) = loaded {
            tracing::error!(%error, "loading failed");
            let answer = match error {
                StoreError::Corrupt { .. } => JoinError::LoadFailed,
                _ => JoinError::LoadUnavailable,
            };
            self.docs.forget(&self.id, self.generation);
            rx.close();
            while let Some(command) = rx.recv().await {
                if let DocCommand::Join { reply, .. } = command {
                    let _ = reply.send(Err(answer.clone()));
                }
            }
            return;
        }
        let idle = self.deps().timing.doc_idle();
        let cancel = self.deps().cancel.clone();
        // When the idle time runs out (None while clients are connected, or if it is unbounded),
        // and when to look next at whether to unload.
        let mut idle_until = Instant::now().checked_add(idle);
        let mut unload_at = self.next_look(idle_until, Instant::now());
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(command) => {
                        self.handle_contained(command).await;
                        self.account();
                        if self.stopped {
                            break;
                        }
                    }
                    None => break,
                },
                Ok(()) = self.durable_rx.changed() => self.on_durable(),
                Ok(()) = self.locks_rx.changed(), if self.refused_locked => self.on_unlocked(),
                _ = tokio::time::sleep_until(unload_at.unwrap_or_else(Instant::now)), if unload_at.is_some() => {
                    self.prune_closed();
                    let now = Instant::now();
                    let due = idle_until.is_some_and(|at| now >= at) || self.owned_elsewhere();
                    if due && self.conns.is_empty() && *self.durable_rx.borrow() >= self.submitted {
                        break;
                    }
                    // Not everything durable yet, or not idle long enough: look again (in a
                    // cluster every second, since the owner may move to another node meanwhile).
                    let soon = now + Duration::from_millis(100);
                    unload_at = if due {
                        Some(soon)
                    } else {
                        self.next_look(idle_until, now).map(|at| at.max(soon))
                    };
                    continue;
                }
                _ = cancel.cancelled() => break,
            }
            if !self.conns.is_empty() {
                unload_at = None;
                idle_until = None;
            } else if self.owned_elsewhere() {
                // Its clients have moved to the new owner: let go now (once durable) and hand
                // the state over, instead of waiting out the idle time.
                if idle_until.is_none() {
                    idle_until = Instant::now().checked_add(idle);
                }
                unload_at = Some(Instant::now());
            } else if unload_at.is_none() {
                idle_until = Instant::now().checked_add(idle);
                unload_at = self.next_look(idle_until, Instant::now());
            }
        }
        // Unloading or shutting down: leave the registry, then handle what is already in the
        // mailbox (updates are applied and persisted; new joiners are turned away to retry).
        self.docs.forget(&self.id, self.generation);
        rx.close();
        // Joiners retry against a new actor, which loads from storage: they are let go only
        // after what this one accepted is durable, or they would find a document without it.
        let mut joiners = Vec::new();
        while let Some(command) = rx.recv().await {
            match command {
                DocCommand::Join { reply, .. } => joiners.push(reply),
                // After a delete or a failed rebuild, everyone retries against a new actor.
                _ if self.stopped => {}
                other => self.handle_contained(other).await,
            }
        }
        if !joiners.is_empty() && !self.stopped && *self.durable_rx.borrow() < self.submitted {
            self.flush_within_deadline().await;
        }
        drop(joiners);
        // REST callers are answered once their change is durable. Ending with their replies
        // unsent would make them retry against the next actor: a text reset applied twice.
        if !self.waiting.is_empty() {
            self.flush_within_deadline().await;
            self.on_durable();
            // Still not durable (storage down): the changes stay queued and will be committed;
            // the callers hear "unavailable" now instead of nothing.
            for (_, reply) in self.waiting.drain(..) {
                let _ = reply.send(Err(DocError::Storage));
            }
        }
        for conn in self.conns.values() {
            let code = if cancel.is_cancelled() {
                CloseCode::SERVICE_RESTART
            } else {
                CloseCode::TRY_AGAIN_LATER
            };
            conn.out.state.request_close(code, "document unloaded");
        }
        // Another node owns the document now: what this actor accepted is durable, but the
        // owner may have loaded before it was (and an edit whose client has left reaches no one
        // through a resync). Hand the state over; the owner merges it.
        let durable = *self.durable_rx.borrow() >= self.submitted;
        if !cancel.is_cancelled() && !self.stopped && self.submitted > 0 && durable {
            if let Some(handoff) = self.deps().handoff.get().cloned() {
                if handoff.owned_elsewhere(&self.id) {
                    tracing::debug!("handing the document over to its new owner");
                    let state = self.full_state();
                    handoff.hand_over(&self.id, state);
                }
            }
        }
        if !cancel.is_cancelled() && self.log_rows > 0 {
            self.spawn_compaction();
        }
        self.approx_bytes = 0;
        self.account();
        tracing::debug!("document unloaded");
    }

    pub(super) async fn load(&mut self) -> Result<(), StoreError> {
        let stored = self.deps().store.load(&self.id).await?;
        self.docs.loads.fetch_add(1, Ordering::Relaxed);
        self.log_rows = stored.updates.len() as u64;
        self.log_bytes = stored.log_bytes() as u64;
        let doc = yrs::Doc::new();
        let mut nesting = NestingIndex::new(self.deps().limits.max_nesting_depth);
        {
            let mut txn = doc.transact_mut();
            for bytes in stored.snapshot.iter().chain(stored.updates.iter()) {
                // Stored before the nesting limit existed, or under a higher one: refuse to load
                // rather than let yrs overflow its stack.
                if let Err(error) = nesting.admit(bytes, &txn.state_vector()) {
                    return Err(StoreError::Corrupt {
                        doc: self.id.to_string(),
                        reason: error.to_string(),
                    });
                }
                let applied = catch_unwind(AssertUnwindSafe(|| {
                    Update::decode_v1(bytes)
                        .map_err(|e| e.to_string())
                        .and_then(|u| txn.apply_update(u).map_err(|e| e.to_string()))
                }));
                match applied {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => {
                        return Err(StoreError::Corrupt {
                            doc: self.id.to_string(),
                            reason,
                        })
                    }
                    Err(_) => {
                        return Err(StoreError::Corrupt {
                            doc: self.id.to_string(),
                            reason: "yrs panicked".into(),
                        })
                    }
                }
            }
            // Rows stored before pending structs were checked: refuse such a document with a
            // clear error rather than panic on every join.
            if txn.has_missing_updates()
                && catch_unwind(AssertUnwindSafe(|| check_pending(&txn))).is_err()
            {
                return Err(StoreError::Corrupt {
                    doc: self.id.to_string(),
                    reason: "its pending structs cannot be encoded".into(),
                });
            }
        }
        self.nesting = nesting;
        let old = std::mem::replace(&mut self.awareness, Awareness::new(doc));
        // A rebuild keeps the presence of connected clients.
        if let Ok(states) = old.update() {
            let _ = self.awareness.apply_update(states);
        }
        self.cache = StateCache::default();
        self.approx_bytes = self.full_state().len();
        self.account();
        tracing::debug!(
            bytes = self.approx_bytes,
            log_rows = self.log_rows,
            "document loaded"
        );
        Ok(())
    }

    pub(super) async fn handle(&mut self, command: DocCommand) {
        match command {
            DocCommand::Join { request, reply } => {
                let conn = Conn {
                    out: request.out,
                    awareness_ids: HashSet::new(),
                    // Refused updates are never durable, so read-only clients get no acks.
                    wants_ack: request.wants_persisted_ack && !request.read_only,
                    read_only: request.read_only,
                    handover: request.handover,
                    session: request.session,
                    received: 0,
                    pending_acks: VecDeque::new(),
                    last_acked: 0,
                    acks_held_from: None,
                    resyncs: VecDeque::new(),
                    broadcasts: true,
                    broadcast_to: request.broadcast_to,
                };
                // Registered before it is told, so that whatever happens next (a panic included)
                // can close it; taken back if the joiner is gone.
                self.conns.insert(request.conn_id, conn);
                if reply.send(Ok(())).is_err() {
                    self.conns.remove(&request.conn_id);
                    return;
                }
                // Present everyone already here, as y-websocket servers do.
                if self.awareness.iter().any(|(_, s)| s.data.is_some()) {
                    if let Ok(update) = self.awareness.update() {
                        if let Some(conn) = self.conns.get(&request.conn_id) {
                            conn.out.push(&frame(&Message::Awareness(update)));
                        }
                    }
                }
            }
            DocCommand::Message {
                conn_id,
                message,
                received,
            } => self.on_message(conn_id, message, received).await,
            DocCommand::Resync { conn_id } => self.resync(conn_id),
            DocCommand::Quiet { conn_id } => {
                if let Some(conn) = self.conns.get_mut(&conn_id) {
                    conn.broadcasts = false;
                }
            }
            DocCommand::Leave { conn_id } => self.leave(conn_id),
            DocCommand::Read {
                text_root,
                xml,
                reply,
            } => {
                let _ = reply.send(self.read(text_root.as_deref(), xml));
            }
            DocCommand::Apply { reply, .. }
            | DocCommand::ResetText { reply, .. }
            | DocCommand::Restore { reply, .. }
                if self.locked() =>
            {
                let _ = reply.send(Err(DocError::Locked));
            }
            DocCommand::Apply { update, reply } => match self.apply(&update) {
                Ok(outcome) => self.publish_and_answer(outcome, reply),
                Err(rejection) => {
                    let error = match rejection {
                        Rejection::TooLarge => DocError::TooLarge,
                        Rejection::StorageFull => DocError::Storage,
                        Rejection::Invalid(e)
                        | Rejection::TooDeep(e)
                        | Rejection::Unanchored(e) => DocError::InvalidUpdate(e),
                        Rejection::Poisoned(e) => {
                            tracing::error!(reason = %e, "yrs failed applying a REST update; rebuilding");
                            self.rebuild().await;
                            DocError::InvalidUpdate(e)
                        }
                    };
                    let _ = reply.send(Err(error));
                }
            },
            DocCommand::ResetText {
                root,
                content,
                reply,
            } => {
                use crate::roots::RootKind;
                let kind = crate::roots::kind(&self.awareness.doc().transact(), &root);
                let (fits_kind, what, size) = match &content {
                    ResetContent::Text(text) => (kind.takes_text(), "a text", text.len()),
                    ResetContent::Xml { bytes, .. } => (
                        matches!(
                            kind,
                            RootKind::Absent | RootKind::Empty | RootKind::XmlFragment
                        ),
                        "an XML",
                        *bytes,
                    ),
                };
                if !fits_kind {
                    // Strings written into a rich-text fragment (or elements into a text) break
                    // every editor bound to it.
                    let hint = match kind {
                        RootKind::XmlFragment => " (reset it with format=xml)",
                        _ => "",
                    };
                    let _ = reply.send(Err(DocError::WrongRoot(format!(
                        "root {root:?} is {}: {what} reset would corrupt it{hint}",
                        kind.describe()
                    ))));
                    return;
                }
                if !self.fits(size) {
                    let _ = reply.send(Err(DocError::TooLarge));
                    return;
                }
                // The reset's update holds the new content and the ranges it deletes, which
                // take fewer bytes than the state they delete (XML's markup more than pays for
                // the element structs); the room is cut to size at once.
                let bound = size + self.approx_bytes + 1024;
                let Some(reservation) = self.deps().persister.reserve(bound) else {
                    let _ = reply.send(Err(DocError::Storage));
                    return;
                };
                let (update, before) = {
                    let mut txn = self.awareness.doc().transact_mut();
                    match &content {
                        ResetContent::Text(text) => {
                            let root_text = txn.get_or_insert_text(root.as_str());
                            let len = root_text.len(&txn);
                            root_text.remove_range(&mut txn, 0, len);
                            root_text.insert(&mut txn, 0, text);
                        }
                        ResetContent::Xml { nodes, .. } => {
                            crate::roots::replace_fragment(&mut txn, &root, nodes);
                        }
                    }
                    (txn.encode_update_v1(), txn.before_state().clone())
                };
                // A root text's content sits at level 1, an XML reset's nodes no deeper than
                // the limit its parser enforced, and structs still waiting for them hold no
                // types (see `nesting`): recording cannot fail.
                self.publish_own_change(update, &before, reservation, reply);
            }
            DocCommand::Restore {
                version,
                bytes,
                reply,
            } => {
                if !self.fits(bytes) {
                    let _ = reply.send(Err(DocError::TooLarge));
                    return;
                }
                // The change deletes what is here and inserts the version's content: about the
                // version's size plus the deleted ranges.
                let bound = bytes + self.approx_bytes + 1024;
                let Some(reservation) = self.deps().persister.reserve(bound) else {
                    let _ = reply.send(Err(DocError::Storage));
                    return;
                };
                let (update, before) = {
                    let mut txn = self.awareness.doc().transact_mut();
                    if let Err(message) = crate::roots::restore(&mut txn, &version) {
                        drop(txn);
                        let _ = reply.send(Err(DocError::WrongRoot(message)));
                        return;
                    }
                    (txn.encode_update_v1(), txn.before_state().clone())
                };
                self.publish_own_change(update, &before, reservation, reply);
            }
            DocCommand::Delete {
                versions,
                reason,
                reply,
            } => {
                let result = self.delete(versions, reason).await;
                let _ = reply.send(result);
            }
        }
    }

    /// Records, broadcasts and persists a change the actor made itself (a reset, a restore),
    /// answering `reply` once it is durable. Its content came from a parser or a stored version
    /// that passed the nesting limit, so recording its nesting cannot fail.
    pub(super) fn publish_own_change(
        &mut self,
        update: Vec<u8>,
        before: &StateVector,
        mut reservation: crate::persist::Reservation,
        reply: oneshot::Sender<Result<(), DocError>>,
    ) {
        if let Err(error) = self.nesting.admit(&update, before) {
            tracing::error!(%error, "a change made here failed the nesting check");
        }
        reservation.shrink_to(update.len());
        self.cache = StateCache::default();
        self.approx_bytes += update.len();
        let outcome = Applied {
            broadcast: Some(update.clone()),
            echo: false,
            persist: Some((update, reservation)),
        };
        self.publish_and_answer(outcome, reply);
    }

    /// Publishes a REST change and answers its caller once everything up to it is durable.
    pub(super) fn publish_and_answer(
        &mut self,
        outcome: Applied,
        reply: oneshot::Sender<Result<(), DocError>>,
    ) {
        self.publish(outcome, None);
        self.waiting.push((self.submitted, reply));
        self.on_durable();
    }

    /// Fans an applied update out to every connection but its origin and hands it to the
    /// persister.
    pub(super) fn publish(&mut self, outcome: Applied, origin: Option<u64>) {
        if let Some(update) = outcome.broadcast {
            let f = frame(&Message::Sync(SyncMessage::Update(update)));
            self.broadcast(&f, if outcome.echo { None } else { origin });
        }
        if let Some((update, reservation)) = outcome.persist {
            self.persist(update, reservation);
        }
    }

    pub(super) fn read(&mut self, text_root: Option<&str>, xml: bool) -> DocRead {
        let mut read = read_state(self.awareness.doc(), text_root, xml);
        read.sessions = self
            .conns
            .values()
            .filter_map(|c| c.session.clone())
            .collect();
        read
    }

    /// Commits what is queued, removes the stored document, then closes every client with 4404.
    /// Until storage has deleted it, nobody is told it is gone: a failed delete leaves the
    /// document and its editors as they were.
    pub(super) async fn delete(&mut self, versions: bool, reason: &str) -> Result<(), DocError> {
        if !self.flush_within_deadline().await {
            return Err(DocError::Storage);
        }
        let deleted = tokio::time::timeout(
            STORAGE_DEADLINE,
            self.deps().store.delete_doc(&self.id, versions),
        );
        match deleted.await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "deleting the document failed; it stays");
                return Err(DocError::Storage);
            }
            Err(_) => {
                tracing::error!(
                    "deleting the document took longer than {STORAGE_DEADLINE:?}; it stays"
                );
                return Err(DocError::Storage);
            }
        }
        tracing::info!("document deleted");
        self.stopped = true;
        self.log_rows = 0;
        for (_, conn) in self.conns.drain() {
            conn.out
                .state
                .request_close(CloseCode::DOCUMENT_DELETED, reason);
        }
        for (_, reply) in self.waiting.drain(..) {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    pub(super) async fn on_message(
        &mut self,
        conn_id: u64,
        message: Message,
        received: std::time::Instant,
    ) {
        if !self.conns.contains_key(&conn_id) {
            return;
        }
        match message {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let diff = self.diff_for(&sv);
                let step1 = self.step1();
                if let Some(conn) = self.conns.get(&conn_id) {
                    // Answer, then ask the client for what it has that we miss (offline edits).
                    let _ = conn.out.push(&diff) && conn.out.push(&step1);
                }
            }
            Message::Sync(SyncMessage::SyncStep2(update)) => {
                self.on_update(conn_id, update, received, true).await;
            }
            Message::Sync(SyncMessage::Update(update)) => {
                self.on_update(conn_id, update, received, false).await;
            }
            Message::Awareness(update) => self.on_awareness(conn_id, update),
            Message::AwarenessQuery => {
                if let Ok(update) = self.awareness.update() {
                    let f = frame(&Message::Awareness(update));
                    if let Some(conn) = self.conns.get(&conn_id) {
                        conn.out.push(&f);
                    }
                }
            }
            // Clients have nothing to say in the auth sub-protocol; extensions never get here.
            Message::Auth(_) | Message::Custom(..) => {}
        }
    }

    pub(super) async fn on_update(
        &mut self,
        conn_id: u64,
        raw: Vec<u8>,
        received: std::time::Instant,
        step2: bool,
    ) {
        if self.conns.get(&conn_id).is_some_and(|c| c.read_only) {
            self.refuse(conn_id, &raw, "read-only access");
            return;
        }
        // Marked before the lock is looked at, so that a release landing during the refusal
        // still wakes the actor (a release already pending is not marked away).
        if !self.refused_locked {
            self.locks_rx.mark_unchanged();
        }
        let handover = self.conns.get(&conn_id).is_some_and(|c| c.handover);
        if self.locked() && !handover {
            let Some(holds) = self.refuse(conn_id, &raw, LOCKED_REASON) else {
                return;
            };
            self.refused_locked |= holds;
            // Counted like any update-bearing message, so that the client's count of its
            // messages and the engine's agree; an ack may cover it only if it held nothing.
            let submitted = self.submitted;
            if let Some(conn) = self.conns.get_mut(&conn_id) {
                conn.received += 1;
                if holds {
                    conn.acks_held_from.get_or_insert(conn.received);
                }
                if conn.wants_ack {
                    conn.pending_acks.push_back((submitted, conn.received));
                }
            }
            self.on_durable();
            return;
        }
        if self.refused_locked {
            // The lock ended and the actor has not heard yet.
            self.on_unlocked();
        }
        match self.apply(&raw) {
            Ok(outcome) => {
                let broadcast = outcome.broadcast.is_some();
                self.publish(outcome, Some(conn_id));
                if broadcast {
                    self.deps()
                        .metrics
                        .broadcast_seconds
                        .observe(received.elapsed().as_secs_f64());
                }
                let submitted = self.submitted;
                if let Some(conn) = self.conns.get_mut(&conn_id) {
                    conn.received += 1;
                    if conn.wants_ack {
                        conn.pending_acks.push_back((submitted, conn.received));
                    }
                    // The client's sync step 2 brings what was refused under a lock: once it
                    // is durable, acknowledgements may cover the refused updates again.
                    if step2 {
                        conn.acks_held_from = None;
                    }
                }
                self.on_durable();
            }
            Err(Rejection::Invalid(reason)) => {
                tracing::warn!(conn_id, %reason, "invalid update; closing the connection");
                self.close(conn_id, CloseCode::INVALID_PAYLOAD, "invalid update");
            }
            Err(Rejection::TooDeep(reason)) => {
                tracing::warn!(conn_id, %reason, "update nests too deeply; closing the connection");
                self.close(
                    conn_id,
                    CloseCode::INVALID_PAYLOAD,
                    "update nests too deeply",
                );
            }
            Err(Rejection::StorageFull) => {
                tracing::warn!(conn_id, "storage unavailable and the commit queue full; closing with 1013 (the client keeps its edit)");
                self.close(
                    conn_id,
                    CloseCode::TRY_AGAIN_LATER,
                    "storage unavailable; retry later",
                );
            }
            Err(Rejection::Unanchored(reason)) => {
                tracing::warn!(conn_id, %reason, "update depends on content the server lacks; closing with 1013 so the client resyncs");
                self.close(
                    conn_id,
                    CloseCode::TRY_AGAIN_LATER,
                    "update depends on content the server lacks; resync",
                );
            }
            Err(Rejection::TooLarge) => {
                tracing::warn!(
                    conn_id,
                    limit = self.deps().limits.max_doc_bytes,
                    "update would pass the document size limit"
                );
                self.close(conn_id, CloseCode::TOO_LARGE, "document size limit reached");
            }
            Err(Rejection::Poisoned(reason)) => {
                tracing::error!(conn_id, %reason, "yrs failed while applying an update; rebuilding the document from storage");
                self.close(conn_id, CloseCode::INVALID_PAYLOAD, "invalid update");
                self.rebuild().await;
            }
        }
    }

    /// Whether a maintenance lock holds the document still.
    pub(super) fn locked(&self) -> bool {
        self.deps().locks.is_locked(self.id.as_str())
    }

    /// The locks changed after an edit was refused: once none holds the document, ask every
    /// client for what it has that the document lacks (the refused edits).
    pub(super) fn on_unlocked(&mut self) {
        if self.locked() {
            return;
        }
        self.refused_locked = false;
        tracing::debug!("lock ended; asking clients for the edits it refused");
        let step1 = self.step1();
        for conn in self.conns.values().filter(|c| !c.read_only) {
            conn.out.push(&step1);
        }
    }

    /// Refuses an update that may not be applied (a read-only client's, or any while the
    /// document is locked). One that adds nothing (the step 2 every client sends after syncing)
    /// is ignored; anything else gets the permission-denied message with `reason`. Some(true)
    /// when the update held something; None when it was invalid and the client was closed.
    pub(super) fn refuse(&mut self, conn_id: u64, raw: &[u8], reason: &str) -> Option<bool> {
        let held = self.awareness.doc().transact().state_vector();
        if let Err(error) = self.nesting.check(raw, &held) {
            let reason = match Rejection::from(error) {
                // Valid, but built on content the document lacks (an earlier refused edit):
                // refused like any other.
                Rejection::Unanchored(_) => None,
                Rejection::TooDeep(_) => Some("update nests too deeply"),
                _ => Some("invalid update"),
            };
            if let Some(why) = reason {
                tracing::warn!(
                    conn_id,
                    why,
                    "invalid update refused; closing the connection"
                );
                self.close(conn_id, CloseCode::INVALID_PAYLOAD, why);
                return None;
            }
        }
        let adds_nothing = match catch_unwind(|| Update::decode_v1(raw)) {
            Ok(Ok(update)) => {
                let txn = self.awareness.doc().transact();
                let known = txn.state_vector();
                let deleted = txn.snapshot().delete_set;
                // Every inserted range must already be here. (`Update::state_vector` would not
                // do: it counts only blocks that start at clock 0, so an edit from a client
                // that had edited before looked like nothing and was dropped unannounced.)
                let inserts = update.insertions(true);
                inserts.iter().all(|(client, ranges)| {
                    ranges.iter().all(|range| range.end <= known.get(client))
                }) && update.delete_set().diff(&deleted).is_empty()
            }
            _ => false,
        };
        if !adds_nothing {
            tracing::debug!(conn_id, reason, "update refused");
            if let Some(conn) = self.conns.get(&conn_id) {
                conn.out.push(&frame(&Message::Auth(Some(reason.into()))));
            }
        }
        Some(!adds_nothing)
    }

    /// Applies a client's update. `persist` is what goes to the log: the update this
    /// transaction produced, or the raw bytes when some structs wait for missing predecessors
    /// (the transaction's update would leave them out).
    pub(super) fn apply(&mut self, raw: &[u8]) -> Result<Applied, Rejection> {
        if !self.fits(raw.len()) {
            return Err(Rejection::TooLarge);
        }
        // Before yrs decodes anything: it recurses on nested values and types.
        let held = self.awareness.doc().transact().state_vector();
        let admitted = self.nesting.check(raw, &held).map_err(Rejection::from)?;
        // Room in the persister's queue, before anything is accepted: nothing accepted may wait
        // for storage, and nothing may be accepted that cannot be committed.
        let mut reservation = self
            .deps()
            .persister
            .reserve(raw.len())
            .ok_or(Rejection::StorageFull)?;
        let update = match catch_unwind(|| Update::decode_v1(raw)) {
            Ok(Ok(update)) => update,
            Ok(Err(e)) => return Err(Rejection::Invalid(e.to_string())),
            Err(_) => return Err(Rejection::Invalid("update decoder panicked".into())),
        };
        let doc = self.awareness.doc();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut txn = doc.transact_mut();
            let had_pending = txn.has_missing_updates();
            txn.apply_update(update).map_err(|e| e.to_string())?;
            if let Some(marker) = &crate::testing::hooks().panic_on_update_with {
                if raw
                    .windows(marker.len().max(1))
                    .any(|w| w == marker.as_bytes())
                {
                    panic!("test hook: yrs failed half-way through an update");
                }
            }
            let changed = txn.before_state() != txn.after_state() || !txn.delete_set().is_empty();
            let encoded = changed.then(|| txn.encode_update_v1());
            let missing = txn.has_missing_updates();
            if missing {
                check_pending(&txn);
            }
            Ok::<_, String>((encoded, missing, had_pending))
        }));
        let (encoded, missing, had_pending) = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Rejection::Poisoned(e)),
            Err(_) => return Err(Rejection::Poisoned("yrs panicked".into())),
        };
        self.nesting.record(admitted);
        if encoded.is_some() {
            self.cache = StateCache::default();
        }
        // The raw update always fits the room reserved for it, and applying it again gives the
        // same state as the transaction's own encoding.
        let persist = match (&encoded, missing) {
            (Some(e), false) if reservation.grow_to(e.len()) => Some(e.clone()),
            (Some(_), _) | (None, true) => Some(raw.to_vec()),
            (None, false) => None,
        };
        if let Some(p) = &persist {
            self.approx_bytes += p.len();
        }
        let persist = persist.map(|p| (p, reservation));
        Ok(Applied {
            // Structs that waited for this update may have come from other connections: then
            // the transaction holds more than its origin sent, and the origin gets it too.
            echo: had_pending && encoded.is_some(),
            broadcast: encoded,
            persist,
        })
    }

    /// Hands an update to the persister, in the room reserved for it: never waits.
    pub(super) fn persist(&mut self, update: Vec<u8>, reservation: Reservation) {
        self.submitted += 1;
        self.log_rows += 1;
        self.log_bytes += update.len() as u64;
        let entry = LogEntry {
            doc: self.id.clone(),
            data: Bytes::from(update),
        };
        reservation.send(entry, self.submitted, self.durable.clone());
    }

    /// Waits (at most [`STORAGE_DEADLINE`]) until everything queued so far is committed; false
    /// if it was not.
    pub(super) async fn flush_within_deadline(&self) -> bool {
        match tokio::time::timeout(STORAGE_DEADLINE, self.deps().persister.flush()).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                tracing::error!("the persister has stopped");
                false
            }
            Err(_) => {
                tracing::warn!("storage did not commit within {STORAGE_DEADLINE:?}");
                false
            }
        }
    }

    /// Sends acknowledgements that became true and starts a compaction when the log is long.
    pub(super) fn on_durable(&mut self) {
        let durable = *self.durable_rx.borrow_and_update();
        for conn in self.conns.values_mut() {
            conn.ack_through(durable);
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(seq, _)| *seq <= durable);
        self.waiting = waiting;
        for (_, reply) in done {
            let _ = reply.send(Ok(()));
        }
        // Once the log is long enough, compact as soon as the row that made it so is durable
        // (compaction merges what the database holds, so it must be there).
        let c = &self.deps().compaction;
        if self.compact_at.is_none()
            && (self.log_rows >= c.compact_after_updates || self.log_bytes >= c.compact_after_bytes)
        {
            self.compact_at = Some(self.submitted);
        }
        if self.compact_at.is_some_and(|seq| durable >= seq) {
            self.spawn_compaction();
        }
    }

    pub(super) fn spawn_compaction(&mut self) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        // Rows submitted after the trigger point are not necessarily in this compaction.
        let merged_through = self.compact_at.take().unwrap_or(self.submitted);
        self.log_rows = self.submitted - merged_through;
        self.log_bytes = 0;
        let store = self.deps().store.clone();
        let id = self.id.clone();
        let flag = self.compacting.clone();
        self.deps().tracker.spawn(async move {
            match store.compact(&id).await {
                Ok(c) => tracing::debug!(doc_id = %id, merged = c.merged_rows, bytes = c.snapshot_bytes, "compacted"),
                Err(error) => tracing::warn!(doc_id = %id, %error, "compaction failed; will retry later"),
            }
            flag.store(false, Ordering::Release);
        });
    }

    pub(super) fn on_awareness(&mut self, conn_id: u64, mut update: AwarenessUpdate) {
        if let Some((code, reason)) = self.awareness_refusal(conn_id, &update) {
            tracing::warn!(
                conn_id,
                reason,
                "awareness update refused; closing the connection"
            );
            self.close(conn_id, code, reason);
            return;
        }
        // Another connection's states are its own: entries for them are dropped, so no client
        // can move, rename or remove someone else's presence.
        update.clients.retain(|id, _| {
            let foreign = self
                .awareness_owners
                .get(id)
                .is_some_and(|owner| *owner != conn_id);
            if foreign {
                tracing::debug!(
                    conn_id,
                    client_id = id.get(),
                    "awareness entry for another connection's client id ignored"
                );
            }
            !foreign
        });
        if update.clients.is_empty() {
            return;
        }
        match self.awareness.apply_update_summary(update.clone()) {
            Ok(Some(summary)) => {
                if let Some(conn) = self.conns.get_mut(&conn_id) {
                    for id in summary.added.iter().chain(&summary.updated) {
                        conn.awareness_ids.insert(*id);
                        self.awareness_owners.insert(*id, conn_id);
                    }
                    for id in &summary.removed {
                        conn.awareness_ids.remove(id);
                        self.awareness_owners.remove(id);
                    }
                }
                // To everyone, the sender too: y-websocket clients count it as a sign of life.
                self.broadcast(&frame(&Message::Awareness(update)), None);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(conn_id, %error, "awareness update rejected; closing the connection");
                self.close(
                    conn_id,
                    CloseCode::INVALID_PAYLOAD,
                    "invalid awareness update",
                );
            }
        }
    }

    /// Why an awareness update closes its connection, if it does: states that are not JSON
    /// (JavaScript clients JSON.parse every state, so one bad string would break all of them),
    /// nest too deeply, are too large, or would give the connection too many client ids.
    pub(super) fn awareness_refusal(
        &self,
        conn_id: u64,
        update: &AwarenessUpdate,
    ) -> Option<(CloseCode, &'static str)> {
        let depth = self.deps().limits.max_nesting_depth;
        for entry in update.clients.values() {
            if entry.json.len() > MAX_AWARENESS_STATE_BYTES {
                return Some((CloseCode::TOO_LARGE, "awareness state too large"));
            }
            if synchrony_protocol::nesting::json_depth(&entry.json) > depth {
                return Some((
                    CloseCode::INVALID_PAYLOAD,
                    "awareness state nests too deeply",
                ));
            }
            if serde_json::from_str::<serde::de::IgnoredAny>(&entry.json).is_err() {
                return Some((CloseCode::INVALID_PAYLOAD, "awareness state is not JSON"));
            }
        }
        let held = self.conns.get(&conn_id).map(|c| &c.awareness_ids)?;
        let new_ids = update
            .clients
            .keys()
            .filter(|id| !held.contains(id) && !self.awareness_owners.contains_key(id))
            .count();
        (held.len() + new_ids > MAX_AWARENESS_IDS).then_some((
            CloseCode::INVALID_PAYLOAD,
            "too many awareness client ids on one connection",
        ))
    }

    pub(super) fn leave(&mut self, conn_id: u64) {
        let Some(conn) = self.conns.remove(&conn_id) else {
            return;
        };
        for id in &conn.awareness_ids {
            if self.awareness_owners.get(id) == Some(&conn_id) {
                self.awareness_owners.remove(id);
            }
        }
        let ids: Vec<ClientID> = conn
            .awareness_ids
            .into_iter()
            .filter(|id| self.awareness.state::<serde::de::IgnoredAny>(*id).is_some())
            .collect();
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            self.awareness.remove_state(*id);
        }
        if let Ok(update) = self.awareness.update_with_clients(ids) {
            self.broadcast(&frame(&Message::Awareness(update)), None);
        }
    }

    pub(super) fn close(&mut self, conn_id: u64, code: CloseCode, reason: &str) {
        if let Some(conn) = self.conns.get(&conn_id) {
            conn.out.state.request_close(code, reason);
        }
        self.leave(conn_id);
    }

    pub(super) fn broadcast(&mut self, f: &Bytes, except: Option<u64>) {
        let mut gone = false;
        for (id, conn) in &self.conns {
            if Some(*id) != except && conn.broadcasts {
                conn.broadcast_to.as_ref().unwrap_or(&conn.out).push(f);
            }
            gone |= conn.out.is_closed();
        }
        if gone {
            self.prune_closed();
        }
    }

    /// Forgets connections whose session is gone without saying so (a joiner that gave up
    /// waiting just as it was admitted).
    pub(super) fn prune_closed(&mut self) {
        let closed: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.out.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for conn_id in closed {
            self.leave(conn_id);
        }
    }

    pub(super) fn resync(&mut self, conn_id: u64) {
        let limit = self.deps().limits.max_resyncs_per_minute;
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        while conn
            .resyncs
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            conn.resyncs.pop_front();
        }
        if conn.resyncs.len() >= limit {
            tracing::warn!(conn_id, "client keeps falling behind; closing with 1013");
            self.close(conn_id, CloseCode::TRY_AGAIN_LATER, "client too slow");
            return;
        }
        conn.resyncs.push_back(now);
        self.deps().metrics.resyncs.inc();
        tracing::debug!(conn_id, "resyncing a lagging client");
        let full = self.full_state();
        let step1 = self.step1();
        let awareness = self
            .awareness
            .update()
            .ok()
            .map(|u| frame(&Message::Awareness(u)));
        let durable = *self.durable_rx.borrow();
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        let ok = conn.out.push(&full)
            && conn.out.push(&step1)
            && awareness.is_none_or(|a| conn.out.push(&a));
        if ok {
            // The old queue may have held an ack; acks are cumulative, so re-send the latest.
            if conn.wants_ack && conn.last_acked > 0 {
                conn.out
                    .push(&Bytes::from(ext::encode_persisted(conn.last_acked)));
            }
            conn.ack_through(durable);
        }
    }

    /// After yrs failed mid-update the in-memory document is suspect: wait until every accepted
    /// update is durable, then reload from storage. Connected clients keep their state; they
    /// have seen only accepted updates, all of which are in storage.
    pub(super) async fn rebuild(&mut self) {
        // Reloading before everything accepted is durable would drop those updates from the
        // live document (they were broadcast, so nobody would send them again).
        let reason = if !self.flush_within_deadline().await {
            Some("storage did not commit what the document accepted".to_owned())
        } else {
            match tokio::time::timeout(STORAGE_DEADLINE, self.load()).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some(format!("loading took longer than {STORAGE_DEADLINE:?}")),
            }
        };
        if let Some(reason) = reason {
            // What is in memory cannot be trusted: serve nobody from it. Clients reconnect and
            // resync, sending what they hold; what was accepted is committed once storage can.
            tracing::error!(%reason, "rebuild failed; closing all connections (1013) and stopping");
            self.stopped = true;
            for conn in self.conns.values() {
                conn.out
                    .state
                    .request_close(CloseCode::TRY_AGAIN_LATER, "document unavailable; retry");
            }
            self.conns.clear();
            self.awareness_owners.clear();
        }
    }

    /// When a document without clients next looks whether to unload: when its idle time runs
    /// out, and in a cluster at least every [`IDLE_RECHECK`].
    pub(super) fn next_look(&self, idle_until: Option<Instant>, now: Instant) -> Option<Instant> {
        let recheck = self.deps().handoff.get().map(|_| now + IDLE_RECHECK);
        match (idle_until, recheck) {
            (Some(idle), Some(recheck)) => Some(idle.min(recheck)),
            (idle, recheck) => idle.or(recheck),
        }
    }

    pub(super) fn owned_elsewhere(&self) -> bool {
        self.deps()
            .handoff
            .get()
            .is_some_and(|h| h.owned_elsewhere(&self.id))
    }

    pub(super) fn full_state(&mut self) -> Bytes {
        if let Some(f) = &self.cache.full_state {
            return f.clone();
        }
        let update = self
            .awareness
            .doc()
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        self.approx_bytes = update.len();
        let f = frame(&Message::Sync(SyncMessage::SyncStep2(update)));
        self.cache.full_state = Some(f.clone());
        f
    }

    pub(super) fn step1(&mut self) -> Bytes {
        if let Some(f) = &self.cache.step1 {
            return f.clone();
        }
        let sv = self.awareness.doc().transact().state_vector();
        let f = frame(&Message::Sync(SyncMessage::SyncStep1(sv)));
        self.cache.step1 = Some(f.clone());
        f
    }

    /// Step 2 for a client at `sv`; the empty state vector (every new joiner) and a repeated
    /// one (a reconnect storm) are answered from the cache.
    pub(super) fn diff_for(&mut self, sv: &StateVector) -> Bytes {
        if sv.is_empty() {
            return self.full_state();
        }
        let key = sv.encode_v1();
        if let Some((cached, f)) = &self.cache.last_diff {
            if *cached == key {
                return f.clone();
            }
        }
        let update = self
            .awareness
            .doc()
            .transact()
            .encode_state_as_update_v1(sv);
        let f = frame(&Message::Sync(SyncMessage::SyncStep2(update)));
        self.cache.last_diff = Some((key, f.clone()));
        f
    }
}

/// Encodes what a document holds pending (structs waiting for predecessors). yrs merges its
/// pending update into every state it encodes, and for some malformed pending structs (fuzzing
/// found them) that merge panics: the document could then never be encoded again, for any
/// joiner, even after a reload from storage. Called under `catch_unwind` right after an update
/// leaves something pending, so that such an update is refused before it is kept; the encoding
/// against the full state vector holds little beyond the pending part.
pub(super) fn check_pending<T: ReadTxn>(txn: &T) {
    let _ = txn.encode_state_as_update_v1(&txn.state_vector());
}

pub(super) struct Applied {
    pub(super) broadcast: Option<Vec<u8>>,
    /// Send the broadcast to the origin as well.
    pub(super) echo: bool,
    /// What goes to the log, with the queue room reserved for it.
    pub(super) persist: Option<(Vec<u8>, Reservation)>,
}
