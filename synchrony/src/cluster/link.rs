//! Peer links: accepting and dialing them, the handshake, and moving messages.
//!
//! One link per pair of nodes. Both nodes may dial at once; once both links are up, the one
//! dialed by the node with the smaller id is kept and the other closed (both sides apply the
//! same rule). A link carries streams opened by either side: the dialer numbers its streams
//! odd, the acceptor even, so a stream id says who opened it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use synchrony_protocol::peer::{Heartbeat, Hello, HttpExchange, PeerMessage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::handshake::{check_hello, prove, verify, Role};
use super::membership::MemberInfo;
use super::Cluster;

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

/// How long a handshake may take, each way.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Messages queued for a link's writer; a full queue makes senders wait.
const LINK_QUEUE: usize = 1024;
/// Messages queued for one stream's consumer.
pub(crate) const STREAM_QUEUE: usize = 256;
/// Longest wait between dial attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A failing address is logged at WARN at most this often.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// What a route hears on a stream it opened.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    Frame(Vec<u8>),
    /// The owner's connection for the stream has joined the document.
    Opened,
    /// The owner closed the stream: close the client with this code, or move.
    Closed {
        code: u16,
        reason: String,
    },
    LinkLost,
}

/// What the owner's side of a stream hears from the opener.
#[derive(Debug)]
pub(crate) enum ServedEvent {
    Frame(Vec<u8>),
    Resync,
    /// Broadcasts reach the opener's clients another way: stop sending them here.
    Quiet,
    Closed,
    LinkLost,
}

pub struct Link {
    pub node: String,
    /// The peer protocol version this link speaks: the lower of the two nodes' (see
    /// `protocol::peer::link_version`). A message a later version adds goes only on links of
    /// that version or above.
    pub version: u32,
    pub info: MemberInfo,
    /// Node id of the side that dialed.
    dialer: String,
    we_dialed: bool,
    tx: mpsc::Sender<PeerMessage>,
    pub(crate) closed: CancellationToken,
    next_stream: AtomicU64,
    opened: Mutex<HashMap<u64, mpsc::Sender<StreamEvent>>>,
    served: Mutex<HashMap<u64, mpsc::Sender<ServedEvent>>>,
    /// Forwarded REST requests waiting for the owner's response.
    requests: Mutex<HashMap<u64, oneshot::Sender<HttpExchange>>>,
    next_request: AtomicU64,
}

impl Link {
    /// A request id and where its response will arrive.
    pub(crate) fn expect_response(&self) -> (u64, oneshot::Receiver<HttpExchange>) {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut requests) = self.requests.lock() {
            requests.insert(id, tx);
        }
        if self.closed.is_cancelled() {
            self.fail_streams();
        }
        (id, rx)
    }

    pub(crate) fn forget_request(&self, id: u64) {
        if let Ok(mut requests) = self.requests.lock() {
            requests.remove(&id);
        }
    }

    /// Queues a message; false once the link is closed.
    pub(crate) async fn send(&self, message: PeerMessage) -> bool {
        tokio::select! {
            sent = self.tx.send(message) => sent.is_ok(),
            _ = self.closed.cancelled() => false,
        }
    }

    /// Queues a message without waiting (for closes sent from `Drop`-like paths).
    pub(crate) fn try_send(&self, message: PeerMessage) -> bool {
        self.tx.try_send(message).is_ok()
    }

    /// A new stream id of ours and the receiver of what the owner sends on it.
    pub(crate) fn open_stream(&self) -> (u64, mpsc::Receiver<StreamEvent>) {
        let n = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let id = 2 * n + u64::from(self.we_dialed);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        if let Ok(mut opened) = self.opened.lock() {
            opened.insert(id, tx);
        }
        if self.closed.is_cancelled() {
            // Closed while registering: the receiver must still learn it.
            self.fail_streams();
        }
        (id, rx)
    }

    pub(crate) fn forget_opened(&self, id: u64) {
        if let Ok(mut opened) = self.opened.lock() {
            opened.remove(&id);
        }
    }

    pub(crate) fn forget_served(&self, id: u64) {
        if let Ok(mut served) = self.served.lock() {
            served.remove(&id);
        }
    }

    fn is_ours(&self, stream: u64) -> bool {
        (stream % 2 == 1) == self.we_dialed
    }

    /// Every stream learns that the link is gone.
    fn fail_streams(&self) {
        let opened: Vec<_> = self
            .opened
            .lock()
            .map(|mut m| m.drain().map(|(_, tx)| tx).collect())
            .unwrap_or_default();
        for tx in opened {
            let _ = tx.try_send(StreamEvent::LinkLost);
        }
        let served: Vec<_> = self
            .served
            .lock()
            .map(|mut m| m.drain().map(|(_, tx)| tx).collect())
            .unwrap_or_default();
        for tx in served {
            let _ = tx.try_send(ServedEvent::LinkLost);
        }
        // Dropping the senders answers every waiting request with an error.
        if let Ok(mut requests) = self.requests.lock() {
            requests.clear();
        }
    }
}

/// The links of a node, by peer id.
#[derive(Default)]
pub struct Links {
    by_node: Mutex<HashMap<String, Arc<Link>>>,
    /// Dial addresses and the node each turned out to be.
    aliases: Mutex<HashMap<String, String>>,
}

impl Links {
    /// The nodes a link is up to.
    pub(crate) fn nodes(&self) -> Vec<String> {
        let Ok(map) = self.by_node.lock() else {
            return Vec::new();
        };
        let mut nodes: Vec<String> = map
            .iter()
            .filter(|(_, l)| !l.closed.is_cancelled())
            .map(|(node, _)| node.clone())
            .collect();
        nodes.sort();
        nodes
    }

    pub(crate) fn get(&self, node: &str) -> Option<Arc<Link>> {
        self.by_node
            .lock()
            .ok()?
            .get(node)
            .filter(|l| !l.closed.is_cancelled())
            .cloned()
    }

    /// Registers a new link unless a better one to the same node is up.
    fn register(&self, me: &str, link: &Arc<Link>) -> bool {
        let Ok(mut map) = self.by_node.lock() else {
            return false;
        };
        if let Some(existing) = map.get(&link.node) {
            if !existing.closed.is_cancelled() && existing.dialer != link.dialer {
                let preferred = me.min(link.node.as_str());
                if existing.dialer == preferred {
                    return false;
                }
            }
            // A link dialed by the same side again (the old one is dead but not yet noticed),
            // or the other side's duplicate that loses to this one.
            existing.closed.cancel();
        }
        map.insert(link.node.clone(), link.clone());
        true
    }

    /// Removes `link` if it is still the registered one.
    fn remove(&self, link: &Arc<Link>) -> bool {
        let Ok(mut map) = self.by_node.lock() else {
            return false;
        };
        if map.get(&link.node).is_some_and(|l| Arc::ptr_eq(l, link)) {
            map.remove(&link.node);
            true
        } else {
            false
        }
    }

    fn covers(&self, addr: &str) -> bool {
        let alias = self.aliases.lock().ok().and_then(|a| a.get(addr).cloned());
        let Ok(map) = self.by_node.lock() else {
            return false;
        };
        map.values().any(|l| {
            !l.closed.is_cancelled()
                && (l.info.peer_addr == addr || alias.as_deref() == Some(&l.node))
        })
    }

    pub(crate) async fn broadcast_leaving(&self) {
        let links: Vec<_> = self
            .by_node
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for link in links {
            let _ = timeout(Duration::from_secs(1), link.send(PeerMessage::Leaving)).await;
        }
    }
}

/// The largest message on a link: a document's whole state (up to `synchrony.max.doc.bytes`)
/// on a stream, or a forwarded REST response rendering it as JSON (larger than its encoding).
pub(crate) fn max_message(limits: &crate::config::LimitsConfig) -> usize {
    limits
        .max_doc_bytes
        .max(limits.max_frame_bytes)
        .saturating_mul(4)
        .saturating_add(1 << 20)
        .min(u32::MAX as usize)
}

fn wire(stream: TcpStream, cluster: &Cluster) -> Wire {
    let _ = stream.set_nodelay(true);
    Framed::new(
        stream,
        LengthDelimitedCodec::builder()
            .max_frame_length(max_message(&cluster.limits))
            .new_codec(),
    )
}

async fn send(wire: &mut Wire, message: &PeerMessage) -> Result<(), String> {
    wire.send(Bytes::from(message.encode()))
        .await
        .map_err(|e| format!("write failed: {e}"))
}

/// The next message body within the handshake deadline.
async fn receive(wire: &mut Wire) -> Result<Vec<u8>, String> {
    match timeout(HANDSHAKE_DEADLINE, wire.next()).await {
        Err(_) => Err(format!("no answer within {HANDSHAKE_DEADLINE:?}")),
        Ok(None) => Err("closed by the peer during the handshake".into()),
        Ok(Some(Err(e))) => Err(format!("read failed: {e}")),
        Ok(Some(Ok(body))) => Ok(body.to_vec()),
    }
}

fn expect_hello(body: &[u8]) -> Result<Hello, String> {
    match PeerMessage::decode(body) {
        Ok(PeerMessage::Hello(hello)) => Ok(hello),
        Ok(PeerMessage::Refuse { reason }) => Err(format!("refused by the peer: {reason}")),
        Ok(other) => Err(format!("expected a hello, got {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn expect_proof(body: &[u8]) -> Result<Vec<u8>, String> {
    match PeerMessage::decode(body) {
        Ok(PeerMessage::Proof { mac }) => Ok(mac),
        Ok(PeerMessage::Refuse { reason }) => Err(format!("refused by the peer: {reason}")),
        Ok(_) => Err("expected a proof".into()),
        Err(e) => Err(e.to_string()),
    }
}

const ITSELF: &str = "connected to itself";

const WRONG_SECRET: &str =
    "the handshake proof does not match: the nodes have different cluster.authentication.secret";

pub(crate) async fn accept_loop(cluster: Arc<Cluster>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = cluster.cancel.cancelled() => return,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "peer port accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cluster = cluster.clone();
        let tracker = cluster.tracker.clone();
        tracker.spawn(async move {
            let mut wire = wire(stream, &cluster);
            match accept_handshake(&cluster, &mut wire).await {
                Ok(hello) => run_link(cluster, wire, hello, false).await,
                Err(reason) if reason == ITSELF => {}
                Err(reason) => {
                    tracing::warn!(%remote, %reason, "refused a peer link");
                }
            }
        });
    }
}

async fn accept_handshake(cluster: &Cluster, wire: &mut Wire) -> Result<Hello, String> {
    let theirs_bytes = receive(wire).await?;
    let theirs = expect_hello(&theirs_bytes)?;
    let mine = cluster.hello();
    if theirs.node == mine.node {
        // This node dialed one of its own addresses: our hello tells the dialer so.
        let _ = send(wire, &PeerMessage::Hello(mine)).await;
        return Err(ITSELF.into());
    }
    if let Err(reason) = check_hello(&mine, &theirs) {
        let _ = send(
            wire,
            &PeerMessage::Refuse {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(format!("{reason} (node {})", theirs.node));
    }
    let mine_bytes = PeerMessage::Hello(mine).encode();
    let secret = &cluster.settings.secret;
    let proof = prove(secret, Role::Acceptor, &theirs_bytes, &mine_bytes);
    wire.feed(Bytes::from(mine_bytes.clone()))
        .await
        .map_err(|e| e.to_string())?;
    send(wire, &PeerMessage::Proof { mac: proof }).await?;
    let their_proof = expect_proof(&receive(wire).await?)?;
    if !verify(
        secret,
        Role::Dialer,
        &theirs_bytes,
        &mine_bytes,
        &their_proof,
    ) {
        let _ = send(
            wire,
            &PeerMessage::Refuse {
                reason: WRONG_SECRET.into(),
            },
        )
        .await;
        return Err(format!(
            "{WRONG_SECRET} (node {} at {})",
            theirs.node, theirs.peer_addr
        ));
    }
    send(wire, &heartbeat(cluster)).await?;
    Ok(theirs)
}

enum Dialed {
    Linked(Box<Wire>, Hello),
    /// The address is this node's own.
    Itself,
}

async fn dial_handshake(cluster: &Cluster, addr: &str) -> Result<Dialed, String> {
    let stream = timeout(HANDSHAKE_DEADLINE, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect failed: {e}"))?;
    let mut wire = wire(stream, cluster);
    let mine = cluster.hello();
    let mine_bytes = PeerMessage::Hello(mine.clone()).encode();
    wire.send(Bytes::from(mine_bytes.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let theirs_bytes = receive(&mut wire).await?;
    let theirs = expect_hello(&theirs_bytes)?;
    if theirs.node == mine.node {
        return Ok(Dialed::Itself);
    }
    if let Err(reason) = check_hello(&mine, &theirs) {
        let _ = send(
            &mut wire,
            &PeerMessage::Refuse {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(reason);
    }
    let secret = &cluster.settings.secret;
    let their_proof = expect_proof(&receive(&mut wire).await?)?;
    if !verify(
        secret,
        Role::Acceptor,
        &mine_bytes,
        &theirs_bytes,
        &their_proof,
    ) {
        let _ = send(
            &mut wire,
            &PeerMessage::Refuse {
                reason: WRONG_SECRET.into(),
            },
        )
        .await;
        return Err(format!("{WRONG_SECRET} (node {})", theirs.node));
    }
    let proof = prove(secret, Role::Dialer, &mine_bytes, &theirs_bytes);
    send(&mut wire, &PeerMessage::Proof { mac: proof }).await?;
    // The acceptor's first heartbeat says it accepted our proof.
    match PeerMessage::decode(&receive(&mut wire).await?) {
        Ok(PeerMessage::Heartbeat(_)) => Ok(Dialed::Linked(Box::new(wire), theirs)),
        Ok(PeerMessage::Refuse { reason }) => Err(format!("refused by the peer: {reason}")),
        Ok(other) => Err(format!("expected acceptance, got {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Keeps a link to `addr` up for as long as the node runs.
pub(crate) async fn dial_loop(cluster: Arc<Cluster>, addr: String) {
    let mut backoff = Duration::from_millis(100);
    let mut warned: Option<Instant> = None;
    // An address only heard of (not configured) is given up after failing this long; a
    // heartbeat naming it again starts a new loop.
    let seed = cluster.settings.seeds.contains(&addr);
    let mut failing_since: Option<Instant> = None;
    let pause = cluster.settings.timeouts.heartbeat;
    loop {
        if cluster.cancel.is_cancelled() {
            return;
        }
        if cluster.links.covers(&addr) {
            tokio::select! {
                _ = tokio::time::sleep(pause) => continue,
                _ = cluster.cancel.cancelled() => return,
            }
        }
        match dial_handshake(&cluster, &addr).await {
            Ok(Dialed::Itself) => {
                tracing::debug!(%addr, "member address is this node's own");
                return;
            }
            Ok(Dialed::Linked(wire, hello)) => {
                if let Ok(mut aliases) = cluster.links.aliases.lock() {
                    aliases.insert(addr.clone(), hello.node.clone());
                }
                backoff = Duration::from_millis(100);
                warned = None;
                failing_since = None;
                run_link(cluster.clone(), *wire, hello, true).await;
            }
            Err(reason) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if !seed && since.elapsed() >= super::membership::FORGET_AFTER {
                    tracing::info!(%addr, "giving up on a member address that stopped answering");
                    cluster.forget_address(&addr);
                    return;
                }
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    tracing::warn!(%addr, %reason, "cannot link to cluster member; retrying");
                    warned = Some(Instant::now());
                } else {
                    tracing::debug!(%addr, %reason, "cannot link to cluster member");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cluster.cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn heartbeat(cluster: &Cluster) -> PeerMessage {
    PeerMessage::Heartbeat(Heartbeat {
        stats: cluster.stats(),
        known: cluster.known_addresses(),
    })
}

/// Serves an authenticated link until it breaks or the node stops.
async fn run_link(cluster: Arc<Cluster>, wire: Wire, hello: Hello, we_dialed: bool) {
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    let me = cluster.me().to_owned();
    let version = synchrony_protocol::peer::link_version(
        super::handshake::announced_version(),
        hello.version,
    )
    .unwrap_or(synchrony_protocol::peer::PEER_PROTOCOL_FIRST);
    let link = Arc::new(Link {
        node: hello.node.clone(),
        version,
        info: MemberInfo {
            peer_addr: hello.peer_addr.clone(),
            http_url: hello.http_url.clone(),
        },
        dialer: if we_dialed {
            me.clone()
        } else {
            hello.node.clone()
        },
        we_dialed,
        tx,
        closed: cluster.cancel.child_token(),
        next_stream: AtomicU64::new(1),
        opened: Mutex::new(HashMap::new()),
        served: Mutex::new(HashMap::new()),
        requests: Mutex::new(HashMap::new()),
        next_request: AtomicU64::new(1),
    });
    if !cluster.links.register(&me, &link) {
        tracing::debug!(peer = %hello.node, "a link to this member exists already; closing the duplicate");
        return;
    }
    tracing::info!(peer = %hello.node, addr = %hello.peer_addr, we_dialed, version, "peer link up");
    cluster
        .link_metrics
        .ups
        .get_or_create(&crate::metrics::PeerLabel {
            peer: hello.node.clone(),
        })
        .inc();
    let info = link.info.clone();
    cluster.update_membership(|m, now| m.linked(&hello.node, info, now));
    let (sink, stream) = wire.split();
    let writer = {
        let (cluster, link) = (cluster.clone(), link.clone());
        tokio::spawn(async move { write_loop(cluster, link, sink, rx).await })
    };
    read_loop(&cluster, &link, stream).await;
    link.closed.cancel();
    let _ = writer.await;
    if cluster.links.remove(&link) {
        cluster.update_membership(|m, now| m.unlinked(&link.node, now));
        tracing::info!(peer = %link.node, "peer link down");
    }
    link.fail_streams();
}

async fn write_loop(
    cluster: Arc<Cluster>,
    link: Arc<Link>,
    mut sink: SplitSink<Wire, Bytes>,
    mut rx: mpsc::Receiver<PeerMessage>,
) {
    let timeouts = cluster.settings.timeouts;
    let peer = crate::metrics::PeerLabel {
        peer: link.node.clone(),
    };
    let (messages_sent, bytes_sent) = (
        cluster
            .link_metrics
            .messages_sent
            .get_or_create(&peer)
            .clone(),
        cluster.link_metrics.bytes_sent.get_or_create(&peer).clone(),
    );
    let mut beat = tokio::time::interval(timeouts.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = tokio::select! {
            _ = link.closed.cancelled() => break,
            message = rx.recv() => {
                let Some(first) = message else { break };
                let mut batch = vec![first];
                while batch.len() < 64 {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                batch
            }
            _ = beat.tick() => vec![heartbeat(&cluster)],
        };
        let write = async {
            let mut bytes = 0;
            for message in &batch {
                let encoded = Bytes::from(message.encode());
                bytes += encoded.len();
                sink.feed(encoded).await?;
            }
            sink.flush().await.map(|()| bytes)
        };
        match timeout(timeouts.failure, write).await {
            Ok(Ok(bytes)) => {
                messages_sent.inc_by(batch.len() as u64);
                bytes_sent.inc_by(bytes as u64);
            }
            Ok(Err(error)) => {
                tracing::debug!(peer = %link.node, %error, "peer link write failed");
                break;
            }
            Err(_) => {
                tracing::warn!(peer = %link.node, "peer accepts no data; closing the link");
                break;
            }
        }
    }
    link.closed.cancel();
}

async fn read_loop(cluster: &Arc<Cluster>, link: &Arc<Link>, mut stream: SplitStream<Wire>) {
    let failure = cluster.settings.timeouts.failure;
    let peer = crate::metrics::PeerLabel {
        peer: link.node.clone(),
    };
    let (messages_received, bytes_received) = (
        cluster
            .link_metrics
            .messages_received
            .get_or_create(&peer)
            .clone(),
        cluster
            .link_metrics
            .bytes_received
            .get_or_create(&peer)
            .clone(),
    );
    loop {
        let next = tokio::select! {
            _ = link.closed.cancelled() => return,
            next = timeout(failure, stream.next()) => next,
        };
        let body = match next {
            Err(_) => {
                tracing::warn!(peer = %link.node, ?failure, "nothing heard from peer; closing the link");
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(error))) => {
                tracing::debug!(peer = %link.node, %error, "peer link read failed");
                return;
            }
            Ok(Some(Ok(body))) => body,
        };
        messages_received.inc();
        bytes_received.inc_by(body.len() as u64);
        let message = match PeerMessage::decode(&body) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(peer = %link.node, %error, "bad peer message; closing the link");
                return;
            }
        };
        if !dispatch(cluster, link, message).await {
            return;
        }
    }
}

async fn served_event(link: &Link, stream: u64, event: ServedEvent) {
    let tx = link
        .served
        .lock()
        .ok()
        .and_then(|m| m.get(&stream).cloned());
    if let Some(tx) = tx {
        let _ = tx.send(event).await;
    }
}

async fn dispatch(cluster: &Arc<Cluster>, link: &Arc<Link>, message: PeerMessage) -> bool {
    match message {
        PeerMessage::Heartbeat(beat) => {
            cluster.update_membership(|m, now| m.heard(&link.node, Some(beat.stats), now));
            for addr in beat.known {
                cluster.dial(addr);
            }
        }
        PeerMessage::Leaving => {
            tracing::info!(peer = %link.node, "peer is leaving the cluster");
            cluster.update_membership(|m, now| m.leaving(&link.node, now));
        }
        PeerMessage::Open {
            stream,
            doc,
            read_only,
            wants_ack,
            session,
        } => {
            if link.is_ours(stream) {
                tracing::warn!(peer = %link.node, stream, "peer opened a stream with our numbering");
                return false;
            }
            let (tx, rx) = mpsc::channel(STREAM_QUEUE);
            if let Ok(mut served) = link.served.lock() {
                served.insert(stream, tx);
            }
            let open = super::relay::Open {
                stream,
                doc,
                read_only,
                wants_ack,
                session,
            };
            let (cluster, link) = (cluster.clone(), link.clone());
            let tracker = cluster.tracker.clone();
            tracker.spawn(async move { super::relay::serve(cluster, link, open, rx).await });
        }
        PeerMessage::Data { stream, frame } => {
            if link.is_ours(stream) {
                let tx = link
                    .opened
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&stream).cloned());
                if let Some(tx) = tx {
                    let _ = tx.send(StreamEvent::Frame(frame)).await;
                }
            } else {
                let tx = link
                    .served
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&stream).cloned());
                if let Some(tx) = tx {
                    let _ = tx.send(ServedEvent::Frame(frame)).await;
                }
            }
        }
        PeerMessage::Resync { stream } => served_event(link, stream, ServedEvent::Resync).await,
        PeerMessage::Quiet { stream } => served_event(link, stream, ServedEvent::Quiet).await,
        PeerMessage::Opened { stream } => {
            let tx = link
                .opened
                .lock()
                .ok()
                .and_then(|m| m.get(&stream).cloned());
            if let Some(tx) = tx {
                let _ = tx.send(StreamEvent::Opened).await;
            }
        }
        PeerMessage::Close {
            stream,
            code,
            reason,
        } => {
            if link.is_ours(stream) {
                let tx = link.opened.lock().ok().and_then(|mut m| m.remove(&stream));
                if let Some(tx) = tx {
                    let _ = tx.send(StreamEvent::Closed { code, reason }).await;
                }
            } else {
                let tx = link.served.lock().ok().and_then(|mut m| m.remove(&stream));
                if let Some(tx) = tx {
                    let _ = tx.send(ServedEvent::Closed).await;
                }
            }
        }
        PeerMessage::HttpRequest { id, exchange } => {
            let (cluster, link) = (cluster.clone(), link.clone());
            let tracker = cluster.tracker.clone();
            tracker.spawn(async move { super::rest::answer(cluster, link, id, exchange).await });
        }
        PeerMessage::HttpResponse { id, exchange } => {
            let waiting = link.requests.lock().ok().and_then(|mut r| r.remove(&id));
            if let Some(tx) = waiting {
                let _ = tx.send(exchange);
            }
        }
        PeerMessage::Hello(_) | PeerMessage::Proof { .. } | PeerMessage::Refuse { .. } => {
            tracing::warn!(peer = %link.node, "handshake message on an established link; closing it");
            return false;
        }
    }
    true
}
