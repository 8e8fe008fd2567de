//! Routes: how a client session reaches its document's owner, wherever it is.
//!
//! A session in a cluster joins a *route* instead of a document actor. To the session the route
//! looks exactly like an actor (it is handed the same [`DocLink`]); the route forwards to the
//! current owner, the local actor or a stream on the link to the owner's node ([`serve`] is the
//! owner's side of such a stream), and moves when the owner changes:
//!
//! 1. it leaves the old owner (a `Leave`, or a `Close` on the stream);
//! 2. it joins the new one and asks it for a resync: the full state, a sync step 1 (which the
//!    client answers with everything the new owner lacks, edits made during the move
//!    included) and the awareness states; it replays the client's own last awareness state;
//! 3. until the client's answer to that step 1 is durable, no persisted acknowledgement is
//!    passed on: the old owner may have died with edits it had not stored, and the answer is
//!    what brings them back. Acks are renumbered (`base` below) so the client's count of its
//!    own updates stays continuous across owners.
//!
//! Broadcasts (others' updates and awareness) do not pass through the route: a local actor
//! pushes them straight to the client's queue (`JoinRequest::broadcast_to`), and a remote owner
//! sends them once per node to the hub (`cluster::hub`), which hands them to every client of
//! the document there. What passes through is only what is meant for this client: the
//! handshake, acknowledgements (renumbered), resyncs and close requests.
//!
//! While no owner is reachable (the old one died and the view has not changed yet), the route
//! holds the client's sync messages (up to [`HOLD_BYTES`]) and hands them to the new owner after
//! the resync, so even a client that never answers a step 1 loses nothing it sent meanwhile. Past
//! the bound the client is closed with 1013 and resyncs when it reconnects. The awareness state
//! is kept too, to be replayed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use synchrony_protocol::ext::{decode_persisted, encode_persisted, MSG_PERSISTED};
use synchrony_protocol::peer::PeerMessage;
use synchrony_protocol::{decode_frame, encode_message, CloseCode, DocId, Message, SyncMessage};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};
use yrs::encoding::read::{Cursor, Read};

use super::link::{Link, ServedEvent, StreamEvent};
use super::{Cluster, View};
use crate::doc::{DocCommand, DocLink, JoinError, JoinRequest, Outbound, OutboundState};
use crate::placement::Owner;
use crate::session::JOIN_DEADLINE;

/// How often a route without an owner tries again.
const RETRY: Duration = Duration::from_millis(200);
/// Commands a route's mailbox holds (the session waits when it is full).
const ROUTE_MAILBOX: usize = 256;
/// Bytes of client updates a route holds while it has no owner.
pub const HOLD_BYTES: usize = 4 << 20;

/// A stream the peer opened, as the owner receives it.
pub(crate) struct Open {
    pub stream: u64,
    pub doc: String,
    pub read_only: bool,
    pub wants_ack: bool,
    pub session: String,
    pub handover: bool,
}

/// The owner's side of a stream: a connection of the local actor whose client is on another
/// node.
pub(crate) async fn serve(
    cluster: Arc<Cluster>,
    link: Arc<Link>,
    open: Open,
    mut events: mpsc::Receiver<ServedEvent>,
) {
    let stream = open.stream;
    let closing = |code: CloseCode, reason: String| PeerMessage::Close {
        stream,
        code: code.0,
        reason,
    };
    let doc = match DocId::parse(&open.doc) {
        Ok(doc) => doc,
        Err(error) => {
            link.send(closing(CloseCode::PROTOCOL_ERROR, error.to_string()))
                .await;
            link.forget_served(stream);
            return;
        }
    };
    let (out, mut out_rx, state) = Outbound::new(&cluster.limits);
    let conn_id = crate::session::next_conn_id();
    let request = JoinRequest {
        conn_id,
        out,
        wants_persisted_ack: open.wants_ack,
        read_only: open.read_only,
        session: serde_json::from_str(&open.session).ok(),
        broadcast_to: None,
        handover: open.handover,
    };
    let joined = timeout(JOIN_DEADLINE, cluster.docs.join(&doc, request))
        .await
        .unwrap_or(Err(JoinError::Timeout));
    let doc_link = match joined {
        Ok(doc_link) => doc_link,
        Err(error) => {
            link.send(closing(
                crate::session::join_error_code(&error),
                error.to_string(),
            ))
            .await;
            link.forget_served(stream);
            return;
        }
    };
    link.send(PeerMessage::Opened { stream }).await;
    let notified = state.notify.notified();
    tokio::pin!(notified);
    loop {
        tokio::select! {
            _ = &mut notified => {
                notified.set(state.notify.notified());
                if let Some((code, reason)) = state.take_close() {
                    link.send(closing(code, reason)).await;
                    break;
                }
                if state.take_lagged() {
                    state.discard_queued(&mut out_rx);
                    if !doc_link.send(DocCommand::Resync { conn_id }).await {
                        link.send(closing(CloseCode::SERVICE_RESTART, "document closed".into())).await;
                        break;
                    }
                }
            }
            frame = out_rx.recv() => {
                let Some(frame) = frame else {
                    let (code, reason) = state
                        .take_close()
                        .unwrap_or((CloseCode::SERVICE_RESTART, "document closed".into()));
                    link.send(closing(code, reason)).await;
                    break;
                };
                state.taken(frame.len());
                if !link.send(PeerMessage::Data { stream, frame: frame.to_vec() }).await {
                    break;
                }
            }
            event = events.recv() => match event {
                Some(ServedEvent::Frame(frame)) => match decode_frame(&frame) {
                    Ok(message) => {
                        let command = DocCommand::Message { conn_id, message, received: std::time::Instant::now() };
                        if !doc_link.send(command).await {
                            link.send(closing(CloseCode::SERVICE_RESTART, "document closed".into())).await;
                            break;
                        }
                    }
                    Err(error) => {
                        link.send(closing(error.close_code(), error.to_string())).await;
                        break;
                    }
                },
                Some(ServedEvent::Quiet) => {
                    if !doc_link.send(DocCommand::Quiet { conn_id }).await {
                        link.send(closing(CloseCode::SERVICE_RESTART, "document closed".into())).await;
                        break;
                    }
                }
                Some(ServedEvent::Resync) => {
                    if !doc_link.send(DocCommand::Resync { conn_id }).await {
                        link.send(closing(CloseCode::SERVICE_RESTART, "document closed".into())).await;
                        break;
                    }
                }
                Some(ServedEvent::Closed | ServedEvent::LinkLost) | None => break,
            },
        }
    }
    link.forget_served(stream);
    let tracker = cluster.tracker.clone();
    tracker.spawn(async move {
        let _ = doc_link.send(DocCommand::Leave { conn_id }).await;
    });
}

/// Which acknowledgements may reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    /// All of them (the first owner).
    Open,
    /// None yet: waiting for the client's answer to the new owner's step 1.
    Waiting,
    /// Those covering the client's update number `n` or later.
    At(u64),
}

enum Target {
    Local {
        link: DocLink,
        rx: mpsc::Receiver<Bytes>,
        state: Arc<OutboundState>,
    },
    Remote {
        node: String,
        link: Arc<Link>,
        stream: u64,
        rx: mpsc::Receiver<StreamEvent>,
        /// Carries broadcasts to this node's clients of the document.
        hub: Arc<super::hub::Hub>,
        /// The owner was asked to stop sending broadcasts on `stream`.
        quiet: bool,
    },
}

impl Target {
    fn node<'a>(&'a self, me: &'a str) -> &'a str {
        match self {
            Target::Local { .. } => me,
            Target::Remote { node, .. } => node,
        }
    }
}

struct Attached {
    target: Target,
    /// The client's update count when it attached: the owner counts from zero.
    base: u64,
    floor: Floor,
}

/// What a route is told about the client.
struct Client {
    conn_id: u64,
    out: Outbound,
    read_only: bool,
    wants_ack: bool,
    session: Option<serde_json::Value>,
    /// Update-bearing messages the client has sent (sync step 2 and update).
    updates: u64,
    /// Its last awareness message, replayed to a new owner.
    awareness: Option<Message>,
    /// Its updates sent while no owner was attached, and their size.
    held: Vec<Message>,
    held_bytes: usize,
}

/// Joins `doc` through a route: the session gets a [`DocLink`] to it. The first attachment
/// happens before this returns, so a local owner's refusal reaches the session as usual.
pub async fn join(
    cluster: &Arc<Cluster>,
    doc: &DocId,
    request: JoinRequest,
) -> Result<DocLink, JoinError> {
    let mut client = Client {
        conn_id: request.conn_id,
        out: request.out,
        read_only: request.read_only,
        wants_ack: request.wants_persisted_ack,
        session: request.session,
        updates: 0,
        awareness: None,
        held: Vec::new(),
        held_bytes: 0,
    };
    let mut view_rx = cluster.subscribe();
    let view = view_rx.borrow_and_update().clone();
    let attached = match attach(cluster, doc, &view, &mut client, true).await {
        Ok(attached) => {
            tracing::debug!(doc = %doc, conn_id = client.conn_id, owner = attached.target.node(cluster.me()), epoch = view.epoch, live = view.live.len(), "route joined");
            Some(attached)
        }
        // The owner is another node this one cannot reach right now (it just died and is not
        // yet out of the view, or the link is being re-established): the client waits for an
        // owner as a moving route does, its messages held meanwhile.
        Err(JoinError::Timeout)
            if matches!(cluster.owner_in(&view, doc.as_str()), Owner::Remote { .. }) =>
        {
            None
        }
        Err(error) => return Err(error),
    };
    let (tx, rx) = mpsc::channel(ROUTE_MAILBOX);
    let route = Route {
        cluster: cluster.clone(),
        doc: doc.clone(),
        client,
        view_rx,
        commands: rx,
    };
    cluster.tracker.spawn(route.run(attached));
    Ok(DocLink::from_sender(tx))
}

async fn attach(
    cluster: &Arc<Cluster>,
    doc: &DocId,
    view: &View,
    client: &mut Client,
    first: bool,
) -> Result<Attached, JoinError> {
    let target = match cluster.owner_in(view, doc.as_str()) {
        Owner::Local => {
            let (out, rx, state) = Outbound::new(&cluster.limits);
            let request = JoinRequest {
                conn_id: client.conn_id,
                out,
                wants_persisted_ack: client.wants_ack,
                read_only: client.read_only,
                session: client.session.clone(),
                broadcast_to: Some(client.out.clone()),
                handover: false,
            };
            let link = timeout(JOIN_DEADLINE, cluster.docs.join(doc, request))
                .await
                .unwrap_or(Err(JoinError::Timeout))?;
            Target::Local { link, rx, state }
        }
        Owner::Remote { node } => {
            let link = cluster.links.get(&node).ok_or(JoinError::Timeout)?;
            let (stream, rx) = link.open_stream();
            let open = PeerMessage::Open {
                stream,
                doc: doc.as_str().to_owned(),
                read_only: client.read_only,
                wants_ack: client.wants_ack,
                session: client
                    .session
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                handover: false,
            };
            if !link.send(open).await {
                link.forget_opened(stream);
                return Err(JoinError::Timeout);
            }
            let hub = cluster.join_hub(doc.as_str(), &link, client.conn_id, client.out.clone());
            Target::Remote {
                node,
                link,
                stream,
                rx,
                hub,
                quiet: false,
            }
        }
    };
    // The owner counts from zero, starting with the held updates it is about to receive.
    let held_updates = client
        .held
        .iter()
        .filter(|m| {
            matches!(
                m,
                Message::Sync(SyncMessage::SyncStep2(_) | SyncMessage::Update(_))
            )
        })
        .count() as u64;
    let mut attached = Attached {
        target,
        base: client.updates - held_updates,
        floor: if first { Floor::Open } else { Floor::Waiting },
    };
    if !first {
        // The new owner sends the full state and a step 1; the client answers with what the
        // owner lacks.
        send_resync(&mut attached, client.conn_id).await;
        if let Some(awareness) = client.awareness.clone() {
            forward(&mut attached, client.conn_id, awareness).await;
        }
        for message in std::mem::take(&mut client.held) {
            forward(&mut attached, client.conn_id, message).await;
        }
        client.held_bytes = 0;
        tracing::debug!(doc = %doc, conn_id = client.conn_id, owner = attached.target.node(cluster.me()), epoch = view.epoch, "route moved");
    }
    Ok(attached)
}

async fn send_resync(attached: &mut Attached, conn_id: u64) -> bool {
    match &attached.target {
        Target::Local { link, .. } => link.send(DocCommand::Resync { conn_id }).await,
        Target::Remote { link, stream, .. } => {
            link.send(PeerMessage::Resync { stream: *stream }).await
        }
    }
}

async fn forward(attached: &mut Attached, conn_id: u64, message: Message) -> bool {
    match &attached.target {
        Target::Local { link, .. } => {
            let received = std::time::Instant::now();
            link.send(DocCommand::Message {
                conn_id,
                message,
                received,
            })
            .await
        }
        Target::Remote { link, stream, .. } => {
            link.send(PeerMessage::Data {
                stream: *stream,
                frame: encode_message(&message),
            })
            .await
        }
    }
}

fn detach(cluster: &Cluster, attached: Attached, conn_id: u64) {
    match attached.target {
        Target::Local { link, .. } => {
            cluster.tracker.spawn(async move {
                let _ = link.send(DocCommand::Leave { conn_id }).await;
            });
        }
        Target::Remote {
            link, stream, hub, ..
        } => {
            cluster.leave_hub(&hub, conn_id);
            link.forget_opened(stream);
            if !link.try_send(PeerMessage::Close {
                stream,
                code: CloseCode::NORMAL.0,
                reason: "left".into(),
            }) {
                cluster.tracker.spawn(async move {
                    link.send(PeerMessage::Close {
                        stream,
                        code: CloseCode::NORMAL.0,
                        reason: "left".into(),
                    })
                    .await;
                });
            }
        }
    }
}

/// The `n` of a persisted acknowledgement frame.
fn persisted_ack(frame: &[u8]) -> Option<u64> {
    if frame.first() != Some(&MSG_PERSISTED) {
        return None;
    }
    let mut cursor = Cursor::new(frame);
    let tag: u64 = cursor.read_var().ok()?;
    let n = decode_persisted(cursor.read_buf().ok()?)?;
    (tag == u64::from(MSG_PERSISTED) && cursor.next == frame.len()).then_some(n)
}

/// What happened on the target.
enum Heard {
    Frame(Bytes),
    /// The owner asks for the client to be closed.
    Close(CloseCode, String),
    /// The owner is gone or moving: find the owner again.
    Lost,
    Lagged,
}

async fn hear(target: &mut Target) -> Heard {
    match target {
        Target::Local { rx, state, .. } => {
            tokio::select! {
                biased;
                _ = state.notify.notified() => {
                    if let Some((code, reason)) = state.take_close() {
                        return Heard::Close(code, reason);
                    }
                    if state.take_lagged() {
                        state.discard_queued(rx);
                        return Heard::Lagged;
                    }
                    // A spurious wake: nothing to do, the caller loops.
                    Heard::Frame(Bytes::new())
                }
                frame = rx.recv() => match frame {
                    Some(frame) => {
                        state.taken(frame.len());
                        Heard::Frame(frame)
                    }
                    None => match state.take_close() {
                        Some((code, reason)) => Heard::Close(code, reason),
                        None => Heard::Lost,
                    },
                },
            }
        }
        Target::Remote {
            rx,
            hub,
            quiet,
            link,
            stream,
            ..
        } => tokio::select! {
            event = rx.recv() => match event {
                Some(StreamEvent::Frame(frame)) => Heard::Frame(Bytes::from(frame)),
                Some(StreamEvent::Opened) => Heard::Frame(Bytes::new()),
                Some(StreamEvent::Closed { code, reason }) => Heard::Close(CloseCode(code), reason),
                Some(StreamEvent::LinkLost) | None => Heard::Lost,
            },
            // The hub went away: broadcasts no longer reach this client. Find the owner again.
            _ = hub.ended.cancelled() => Heard::Lost,
            // The hub carries broadcasts now: the owner may stop sending them here.
            _ = hub.joined(), if !*quiet => {
                *quiet = true;
                link.send(PeerMessage::Quiet { stream: *stream }).await;
                Heard::Frame(Bytes::new())
            }
        },
    }
}

struct Route {
    cluster: Arc<Cluster>,
    doc: DocId,
    client: Client,
    view_rx: watch::Receiver<View>,
    commands: mpsc::Receiver<DocCommand>,
}

impl Route {
    async fn run(mut self, attached: Option<Attached>) {
        let mut attached = attached;
        // Since when the route has had no owner (it gives up after JOIN_DEADLINE).
        let mut orphaned: Option<Instant> = attached.is_none().then(Instant::now);
        let mut retry = tokio::time::interval(RETRY);
        let conn_id = self.client.conn_id;
        loop {
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    None | Some(DocCommand::Leave { .. }) => break,
                    Some(DocCommand::Message { message, .. }) => {
                        let updates = matches!(
                            message,
                            Message::Sync(SyncMessage::SyncStep2(_) | SyncMessage::Update(_))
                        );
                        if updates {
                            self.client.updates += 1;
                        }
                        if matches!(message, Message::Awareness(_)) {
                            self.client.awareness = Some(message.clone());
                        }
                        match attached.as_mut() {
                            Some(a) => {
                                if a.floor == Floor::Waiting
                                    && matches!(message, Message::Sync(SyncMessage::SyncStep2(_)))
                                {
                                    a.floor = Floor::At(self.client.updates);
                                }
                                if !forward(a, conn_id, message).await {
                                    attached = None;
                                    orphaned.get_or_insert_with(Instant::now);
                                }
                            }
                            // Held while no owner is attached; past the bound, closed.
                            None if matches!(message, Message::Sync(_)) && !self.hold(message) => {
                                tracing::warn!(doc = %self.doc, "client sent more than the route holds while the owner moves; closing it");
                                self.client.out.request_close(CloseCode::TRY_AGAIN_LATER, "document owner moving");
                                break;
                            }
                            None => {}
                        }
                    }
                    Some(DocCommand::Resync { .. }) => {
                        if let Some(a) = attached.as_mut() {
                            send_resync(a, conn_id).await;
                        }
                    }
                    Some(_) => {}
                },
                changed = self.view_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let view = self.view_rx.borrow_and_update().clone();
                    let owner = match self.cluster.owner_in(&view, self.doc.as_str()) {
                        Owner::Local => self.cluster.me().to_owned(),
                        Owner::Remote { node } => node,
                    };
                    let moved = attached
                        .as_ref()
                        .is_none_or(|a| a.target.node(self.cluster.me()) != owner);
                    if moved {
                        if let Some(old) = attached.take() {
                            detach(&self.cluster, old, conn_id);
                        }
                        orphaned.get_or_insert_with(Instant::now);
                        attached = self.reattach(&view).await;
                        if attached.is_some() {
                            orphaned = None;
                        }
                    }
                }
                heard = async {
                    match attached.as_mut() {
                        Some(a) => hear(&mut a.target).await,
                        None => std::future::pending().await,
                    }
                } => match heard {
                    Heard::Frame(frame) if frame.is_empty() => {}
                    Heard::Frame(frame) => {
                        if let Some(a) = attached.as_ref() {
                            self.deliver(a, frame);
                        }
                    }
                    Heard::Lagged => {
                        if let Some(a) = attached.as_mut() {
                            send_resync(a, conn_id).await;
                        }
                    }
                    Heard::Close(code, reason) => {
                        tracing::debug!(doc = %self.doc, conn_id, code = code.0, %reason, "route's owner closed it");
                        if code == CloseCode::SERVICE_RESTART && !self.cluster.cancel.is_cancelled() {
                            // The owner stops or lets go of the document: find it again.
                            if let Some(old) = attached.take() {
                                detach(&self.cluster, old, conn_id);
                            }
                            orphaned.get_or_insert_with(Instant::now);
                        } else {
                            self.client.out.request_close(code, &reason);
                            break;
                        }
                    }
                    Heard::Lost => {
                        tracing::debug!(doc = %self.doc, conn_id, "route lost its owner or hub");
                        if let Some(old) = attached.take() {
                            detach(&self.cluster, old, conn_id);
                        }
                        orphaned.get_or_insert_with(Instant::now);
                    }
                },
                _ = retry.tick(), if attached.is_none() => {
                    if self.cluster.cancel.is_cancelled() {
                        self.client.out.request_close(CloseCode::SERVICE_RESTART, "server shutting down");
                        break;
                    }
                    if orphaned.is_some_and(|since| since.elapsed() > JOIN_DEADLINE) {
                        tracing::warn!(doc = %self.doc, "no owner reachable for the document; closing the client");
                        self.client.out.request_close(CloseCode::TRY_AGAIN_LATER, "document owner unreachable");
                        break;
                    }
                    let view = self.view_rx.borrow().clone();
                    attached = self.reattach(&view).await;
                    if attached.is_some() {
                        orphaned = None;
                    }
                }
            }
        }
        if let Some(a) = attached {
            detach(&self.cluster, a, conn_id);
        }
    }

    /// Keeps a sync message (an update, or a joining client's step 1) until an owner is
    /// attached; false past [`HOLD_BYTES`].
    fn hold(&mut self, message: Message) -> bool {
        let size = match &message {
            Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u)) => u.len(),
            _ => 0,
        };
        if self.client.held_bytes + size > HOLD_BYTES {
            return false;
        }
        self.client.held_bytes += size;
        self.client.held.push(message);
        true
    }

    async fn reattach(&mut self, view: &View) -> Option<Attached> {
        match attach(&self.cluster, &self.doc, view, &mut self.client, false).await {
            Ok(a) => Some(a),
            Err(error) => {
                tracing::debug!(doc = %self.doc, %error, "no owner to attach to yet");
                None
            }
        }
    }

    /// Passes a frame from the owner to the client, renumbering acknowledgements.
    fn deliver(&self, attached: &Attached, frame: Bytes) {
        if let Some(n) = persisted_ack(&frame) {
            let through = attached.base + n;
            let allowed = match attached.floor {
                Floor::Open => true,
                Floor::Waiting => false,
                Floor::At(floor) => through >= floor,
            };
            if allowed {
                self.client
                    .out
                    .push_frame(&Bytes::from(encode_persisted(through)));
            }
            return;
        }
        self.client.out.push_frame(&frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_recognised_exactly() {
        assert_eq!(persisted_ack(&encode_persisted(300)), Some(300));
        assert_eq!(persisted_ack(&[0, 0, 1, 0]), None);
        let mut trailing = encode_persisted(1);
        trailing.push(0);
        assert_eq!(persisted_ack(&trailing), None);
    }
}
