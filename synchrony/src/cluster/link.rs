//! Peer links: accepting and dialing them, the handshake, and moving messages.
//!
//! One link per pair of nodes. Both nodes may dial at once; once both links are up, the one
//! dialed by the node with the smaller id is kept and the other closed (both sides apply the
//! same rule). A link carries streams opened by either side: the dialer numbers its streams
//! odd, the acceptor even, so a stream id says who opened it.
//!
//! Before the handshake completes a connection may send only small frames ([`HELLO_MAX`]),
//! must finish within `HANDSHAKE_DEADLINE`, and at most `MAX_HANDSHAKES` connections may be
//! in that state at once; refusals are logged with the remote address and what it claimed to
//! be, escaped and cut short, at most every 30 s per address. After it, everything is sealed
//! ([`super::sealed`]). The reader never waits on a stream: a stream whose consumer is full
//! is closed (the client retries, or the route resyncs), so one slow page cannot stall the
//! link's heartbeats or its other pages. The writer interleaves messages by lane and holds at
//! most [`LINK_BUDGET`] bytes; senders beyond it wait.

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

use super::handshake::{check_hello, shown, Identity};
use super::membership::MemberInfo;
use super::sealed::{self, Opener, Outbox, SealError, Sealer};
use super::Cluster;

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

/// How long a whole handshake may take.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// The largest frame before the handshake completes: a hello or a Noise handshake message.
pub const HELLO_MAX: usize = 4096;
/// Connections on the peer port that have not finished their handshake; more are closed at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Messages queued for a link's writer.
const LINK_QUEUE: usize = 1024;
/// Bytes queued for a link's writer and not yet written; senders beyond it wait (one message
/// larger than this goes alone).
pub const LINK_BUDGET: usize = 32 << 20;
/// Bytes the writer seals before it flushes.
const FLUSH_BYTES: usize = 256 << 10;
/// Messages queued for one stream's consumer.
pub(crate) const STREAM_QUEUE: usize = 256;
/// Longest wait between dial attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A failing address is logged at WARN at most this often.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(30);
/// How long before an address that answered as this node itself is dialed again.
const ITSELF_RETRY: Duration = Duration::from_secs(30);
/// Handshakes one remote address may have in progress at once (of [`MAX_HANDSHAKES`]).
const HANDSHAKES_PER_ADDRESS: usize = 8;
/// Handshake slots kept for addresses of known members, beyond [`MAX_HANDSHAKES`].
const MEMBER_HANDSHAKES: usize = 16;
/// The first hello must arrive this soon after the connection opens (dialers send it at once).
const FIRST_HELLO: Duration = Duration::from_secs(2);
/// Refusals logged as WARN per [`WARN_EVERY`] in all; the rest are counted and summed up.
const LOUD_REFUSALS: u32 = 20;

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
    tx: mpsc::Sender<Outgoing>,
    /// Bytes queued for the writer ([`LINK_BUDGET`]).
    budget: Arc<tokio::sync::Semaphore>,
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

    /// Queues a message, waiting while the link's byte budget is spent; false once the link
    /// is closed.
    pub(crate) async fn send(&self, message: PeerMessage) -> bool {
        let lane = lane(&message);
        let bytes = Bytes::from(message.encode());
        let want = bytes.len().clamp(1, LINK_BUDGET) as u32;
        tokio::select! {
            sent = async {
                let Ok(permit) = self.budget.clone().acquire_many_owned(want).await else {
                    return false;
                };
                let out = Outgoing { lane, bytes, permit: Some(permit), then_close: false };
                self.tx.send(out).await.is_ok()
            } => sent,
            _ = self.closed.cancelled() => false,
        }
    }

    /// Queues a message without waiting (closes sent from paths that cannot wait); false when
    /// the link is closed or its budget spent.
    pub(crate) fn try_send(&self, message: PeerMessage) -> bool {
        self.queue_now(message, false)
    }

    fn queue_now(&self, message: PeerMessage, then_close: bool) -> bool {
        let lane = lane(&message);
        let bytes = Bytes::from(message.encode());
        let want = bytes.len().clamp(1, LINK_BUDGET) as u32;
        let Ok(permit) = self.budget.clone().try_acquire_many_owned(want) else {
            return false;
        };
        let out = Outgoing {
            lane,
            bytes,
            permit: Some(permit),
            then_close,
        };
        self.tx.try_send(out).is_ok()
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

/// A message for the writer: its lane, its bytes, the budget it holds until written.
pub(crate) struct Outgoing {
    lane: u8,
    bytes: Bytes,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Close the link once this is written (a refusal sent before hanging up).
    then_close: bool,
}

/// The lane a message travels on (see [`sealed`]): membership on 0, a stream's messages and a
/// request's on the lane of their id, so they keep their order.
fn lane(message: &PeerMessage) -> u8 {
    let by_id = |id: u64| 1 + (id % (sealed::LANES as u64 - 1)) as u8;
    match message {
        PeerMessage::Hello(_)
        | PeerMessage::Proof { .. }
        | PeerMessage::Refuse { .. }
        | PeerMessage::Heartbeat(_)
        | PeerMessage::Leaving => 0,
        PeerMessage::Open { stream, .. }
        | PeerMessage::Data { stream, .. }
        | PeerMessage::Resync { stream }
        | PeerMessage::Opened { stream }
        | PeerMessage::Quiet { stream }
        | PeerMessage::Close { stream, .. } => by_id(*stream),
        PeerMessage::HttpRequest { id, .. } | PeerMessage::HttpResponse { id, .. } => by_id(*id),
    }
}

/// A fresh connection's framing: small frames only until the handshake completes.
fn wire(stream: TcpStream) -> Wire {
    let _ = stream.set_nodelay(true);
    Framed::new(
        stream,
        LengthDelimitedCodec::builder()
            .max_frame_length(HELLO_MAX)
            .new_codec(),
    )
}

/// Once sealed, a frame is one Noise message.
fn seal_wire(wire: &mut Wire) {
    wire.codec_mut().set_max_frame_length(sealed::MAX_FRAME);
}

async fn send_plain(wire: &mut Wire, message: &PeerMessage) -> Result<(), String> {
    wire.send(Bytes::from(message.encode()))
        .await
        .map_err(|e| format!("write failed: {e}"))
}

/// Seals and sends one whole message (during the handshake, before the writer runs).
async fn send_sealed(
    wire: &mut Wire,
    sealer: &mut Sealer,
    message: &PeerMessage,
) -> Result<(), String> {
    let mut outbox = Outbox::default();
    outbox.push(0, Bytes::from(message.encode()), ());
    while let Some(chunk) = outbox.next_chunk() {
        let frame = sealer
            .seal(chunk.lane, chunk.last, &chunk.bytes)
            .map_err(|e| e.to_string())?;
        wire.feed(frame)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
    }
    SinkExt::<Bytes>::flush(wire)
        .await
        .map_err(|e| format!("write failed: {e}"))
}

async fn receive(wire: &mut Wire) -> Result<Bytes, String> {
    match wire.next().await {
        None => Err("closed by the peer during the handshake".into()),
        Some(Err(e)) => Err(format!("read failed: {}", shown(&e.to_string()))),
        Some(Ok(body)) => Ok(body.freeze()),
    }
}

fn expect_hello(body: &[u8]) -> Result<Hello, String> {
    match PeerMessage::decode(body) {
        Ok(PeerMessage::Hello(hello)) => Ok(hello),
        Ok(PeerMessage::Refuse { reason }) => {
            Err(format!("refused by the peer: {}", shown(&reason)))
        }
        Ok(_) => Err("expected a hello".into()),
        Err(e) => Err(shown(&e.to_string())),
    }
}

/// Reads the next sealed message of the handshake.
async fn receive_sealed(wire: &mut Wire, opener: &mut Opener) -> Result<PeerMessage, String> {
    loop {
        let frame = receive(wire).await?;
        match opener.open(&frame) {
            Ok(None) => continue,
            Ok(Some(body)) => return PeerMessage::decode(&body).map_err(|e| e.to_string()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

const ITSELF: &str = "connected to itself";

const WRONG_SECRET: &str = "the handshake does not authenticate: the nodes have different \
     cluster.authentication.secret (or something on the way altered the handshake)";

/// Why a handshake ended without a link, and who the other side claimed to be.
struct Refusal {
    reason: String,
    node: Option<String>,
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Self { reason, node: None }
    }
}

/// Logs refusals at most every [`WARN_EVERY`] per remote address and kind of refusal (debug
/// in between), and at most [`LOUD_REFUSALS`] WARN lines per [`WARN_EVERY`] in all (those held
/// back are counted in one line). The kind is the reason's first 16 letters, which never hold
/// remote content (remote numbers and names come later, or are not letters).
#[derive(Default)]
struct RefusalLog(Mutex<RefusalWindow>);

#[derive(Default)]
struct RefusalWindow {
    last: HashMap<(std::net::IpAddr, String), Instant>,
    started: Option<Instant>,
    loud: u32,
    held_back: u64,
}

fn refusal_kind(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .take(16)
        .collect()
}

impl RefusalLog {
    fn log(&self, remote: std::net::SocketAddr, refusal: &Refusal) {
        let node = refusal
            .node
            .as_deref()
            .map(shown)
            .unwrap_or_else(|| "?".into());
        let mut summary = None;
        let loud = self.0.lock().is_ok_and(|mut w| {
            let now = Instant::now();
            if w.started.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                summary = Some(std::mem::take(&mut w.held_back)).filter(|n| *n > 0);
                w.started = Some(now);
                w.loud = 0;
                w.last.retain(|_, at| at.elapsed() < WARN_EVERY);
            }
            let key = (remote.ip(), refusal_kind(&refusal.reason));
            let repeat = w.last.get(&key).is_some_and(|at| at.elapsed() < WARN_EVERY);
            if repeat {
                return false;
            }
            if w.loud >= LOUD_REFUSALS || w.last.len() >= 4096 {
                w.held_back += 1;
                return false;
            }
            w.last.insert(key, now);
            w.loud += 1;
            true
        });
        if let Some(n) = summary {
            tracing::warn!(
                refusals = n,
                "peer links refused in the last 30 s were not logged one by one (too many)"
            );
        }
        if loud {
            tracing::warn!(%remote, %node, reason = %refusal.reason, "refused a peer link (repeats from this address are logged at debug for 30 s)");
        } else {
            tracing::debug!(%remote, %node, reason = %refusal.reason, "refused a peer link");
        }
    }
}

/// Handshakes in progress per remote address, so that one address cannot hold every slot.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<std::net::IpAddr, usize>>);

/// One handshake of one address, counted until dropped.
struct AddressSlot(Arc<PerAddress>, std::net::IpAddr);

impl PerAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut counts = self.0.lock().ok()?;
        let n = counts.entry(ip).or_default();
        if *n >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.0 .0.lock() {
            if let Some(n) = counts.get_mut(&self.1) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.1);
                }
            }
        }
    }
}

pub(crate) async fn accept_loop(cluster: Arc<Cluster>, listener: TcpListener) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let member_handshakes = Arc::new(tokio::sync::Semaphore::new(MEMBER_HANDSHAKES));
    let per_address = Arc::new(PerAddress::default());
    let refusals = Arc::new(RefusalLog::default());
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
        // Dropping the socket closes it: past a cap nothing is read. A known member's address
        // may use the slots kept for members when the others are taken.
        let Some(address_slot) = per_address.take(remote.ip()) else {
            refusals.log(
                remote,
                &Refusal::from(format!(
                    "too many handshakes from this address ({HANDSHAKES_PER_ADDRESS})"
                )),
            );
            continue;
        };
        let slot = handshakes.clone().try_acquire_owned().or_else(|full| {
            if cluster.is_member_ip(remote.ip()) {
                member_handshakes.clone().try_acquire_owned()
            } else {
                Err(full)
            }
        });
        let Ok(slot) = slot else {
            refusals.log(
                remote,
                &Refusal::from(format!(
                    "{MAX_HANDSHAKES} handshakes are already in progress"
                )),
            );
            continue;
        };
        let cluster = cluster.clone();
        let tracker = cluster.tracker.clone();
        let refusals = refusals.clone();
        tracker.spawn(async move {
            let mut wire = wire(stream);
            let handshake = timeout(
                HANDSHAKE_DEADLINE,
                accept_handshake(&cluster, &mut wire, remote),
            );
            let outcome = match handshake.await {
                Err(_) => Err(Refusal::from(format!(
                    "no handshake within {HANDSHAKE_DEADLINE:?}"
                ))),
                Ok(outcome) => outcome,
            };
            drop(slot);
            drop(address_slot);
            match outcome {
                Ok((hello, sealer, opener)) => {
                    run_link(cluster, wire, hello, false, sealer, opener).await
                }
                Err(refusal) if refusal.reason == ITSELF => {}
                Err(refusal) => refusals.log(remote, &refusal),
            }
        });
    }
}

async fn accept_handshake(
    cluster: &Cluster,
    wire: &mut Wire,
    remote: std::net::SocketAddr,
) -> Result<(Hello, Sealer, Opener), Refusal> {
    let theirs_bytes = timeout(FIRST_HELLO, receive(wire))
        .await
        .map_err(|_| Refusal::from(format!("no hello within {FIRST_HELLO:?}")))??;
    let theirs = expect_hello(&theirs_bytes)?;
    let node = Some(theirs.node.clone());
    let refused = |reason: String| Refusal {
        reason,
        node: node.clone(),
    };
    let mine = cluster.hello();
    if theirs.node == mine.node {
        // This node dialed one of its own addresses: our hello tells the dialer so.
        let _ = send_plain(wire, &PeerMessage::Hello(mine)).await;
        return Err(refused(ITSELF.into()));
    }
    if let Err(reason) = check_hello(&mine, &theirs) {
        let _ = send_plain(
            wire,
            &PeerMessage::Refuse {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(refused(reason));
    }
    let mine_bytes = PeerMessage::Hello(mine).encode();
    let mut noise = sealed::handshake(&cluster.settings.secret, &theirs_bytes, &mine_bytes, false)
        .map_err(|e| refused(e.to_string()))?;
    wire.send(Bytes::from(mine_bytes))
        .await
        .map_err(|e| refused(format!("write failed: {e}")))?;
    let first = receive(wire).await.map_err(&refused)?;
    let mut payload = vec![0; sealed::MAX_FRAME];
    let n = match noise.read_message(&first, &mut payload) {
        Ok(n) => n,
        Err(_) => {
            if let Ok(PeerMessage::Refuse { reason }) = PeerMessage::decode(&first) {
                return Err(refused(format!("refused by the peer: {}", shown(&reason))));
            }
            let _ = send_plain(
                wire,
                &PeerMessage::Refuse {
                    reason: WRONG_SECRET.into(),
                },
            )
            .await;
            return Err(refused(WRONG_SECRET.into()));
        }
    };
    let their_identity = Identity::decode(&payload[..n]).map_err(&refused)?;
    let verdict = cluster.check_store(&theirs.node, &remote.to_string(), &their_identity.store);
    let answer = Identity {
        store: cluster.settings.store.clone(),
        verdict: verdict.clone().err().unwrap_or_default(),
    };
    let mut message = vec![0; sealed::MAX_FRAME];
    let n = noise
        .write_message(&answer.encode(), &mut message)
        .map_err(|e| refused(e.to_string()))?;
    message.truncate(n);
    wire.send(Bytes::from(message))
        .await
        .map_err(|e| refused(format!("write failed: {e}")))?;
    verdict.map_err(&refused)?;
    let (mut sealer, opener) = sealed::split(noise).map_err(|e| refused(e.to_string()))?;
    let mut opener = opener.with_max_message(max_message(&cluster.limits));
    seal_wire(wire);
    // The dialer's first sealed message proves it derived the same keys now (a replayed first
    // handshake message would get no further).
    match receive_sealed(wire, &mut opener).await.map_err(&refused)? {
        PeerMessage::Heartbeat(_) => {}
        PeerMessage::Refuse { reason } => {
            return Err(refused(format!("refused by the peer: {}", shown(&reason))))
        }
        _ => return Err(refused("expected a heartbeat".into())),
    }
    send_sealed(wire, &mut sealer, &heartbeat(cluster))
        .await
        .map_err(&refused)?;
    Ok((theirs, sealer, opener))
}

enum Dialed {
    /// The link's wire, the peer's hello and the sealed channel's two ends (boxed: they are
    /// large and this is moved once per dial).
    Linked(Box<(Wire, Hello, Sealer, Opener)>),
    /// The address is this node's own.
    Itself,
}

async fn dial_handshake(cluster: &Cluster, addr: &str) -> Result<Dialed, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let mut wire = wire(stream);
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
        let _ = send_plain(
            &mut wire,
            &PeerMessage::Refuse {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(reason);
    }
    let who = format!("node {} at {addr}", shown(&theirs.node));
    let mut noise = sealed::handshake(&cluster.settings.secret, &mine_bytes, &theirs_bytes, true)
        .map_err(|e| e.to_string())?;
    let ours = Identity {
        store: cluster.settings.store.clone(),
        verdict: String::new(),
    };
    let mut message = vec![0; sealed::MAX_FRAME];
    let n = noise
        .write_message(&ours.encode(), &mut message)
        .map_err(|e| e.to_string())?;
    message.truncate(n);
    wire.send(Bytes::from(message))
        .await
        .map_err(|e| e.to_string())?;
    let answer = receive(&mut wire).await?;
    let mut payload = vec![0; sealed::MAX_FRAME];
    let n = match noise.read_message(&answer, &mut payload) {
        Ok(n) => n,
        Err(_) => {
            return Err(match PeerMessage::decode(&answer) {
                Ok(PeerMessage::Refuse { reason }) => {
                    format!("refused by {who}: {}", shown(&reason))
                }
                _ => format!("{WRONG_SECRET} ({who})"),
            })
        }
    };
    let theirs_identity = Identity::decode(&payload[..n])?;
    let mine_verdict = cluster.check_store(&theirs.node, addr, &theirs_identity.store);
    if !theirs_identity.verdict.is_empty() {
        return Err(format!(
            "refused by {who}: {}",
            shown(&theirs_identity.verdict)
        ));
    }
    let (mut sealer, opener) = sealed::split(noise).map_err(|e| e.to_string())?;
    let opener = opener.with_max_message(max_message(&cluster.limits));
    seal_wire(&mut wire);
    if let Err(reason) = mine_verdict {
        let _ = send_sealed(
            &mut wire,
            &mut sealer,
            &PeerMessage::Refuse {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(reason);
    }
    send_sealed(&mut wire, &mut sealer, &heartbeat(cluster)).await?;
    Ok(Dialed::Linked(Box::new((wire, theirs, sealer, opener))))
}

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
        let dialed = timeout(HANDSHAKE_DEADLINE, dial_handshake(&cluster, &addr))
            .await
            .unwrap_or_else(|_| Err(format!("no handshake within {HANDSHAKE_DEADLINE:?}")));
        match dialed {
            Ok(Dialed::Itself) => {
                // Said by an unauthenticated hello, which anyone on the path can echo: never a
                // reason to stop dialing for good. Asked again rarely, and given up like any
                // address that is not configured.
                tracing::debug!(%addr, "member address answers as this node's own");
                let since = *failing_since.get_or_insert_with(Instant::now);
                if !seed && since.elapsed() >= super::membership::FORGET_AFTER {
                    cluster.forget_address(&addr);
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(ITSELF_RETRY) => {}
                    _ = cluster.cancel.cancelled() => return,
                }
            }
            Ok(Dialed::Linked(linked)) => {
                let (wire, hello, sealer, opener) = *linked;
                if let Ok(mut aliases) = cluster.links.aliases.lock() {
                    aliases.insert(addr.clone(), hello.node.clone());
                }
                backoff = Duration::from_millis(100);
                warned = None;
                failing_since = None;
                run_link(cluster.clone(), wire, hello, true, sealer, opener).await;
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
async fn run_link(
    cluster: Arc<Cluster>,
    wire: Wire,
    hello: Hello,
    we_dialed: bool,
    sealer: Sealer,
    opener: Opener,
) {
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
        budget: Arc::new(tokio::sync::Semaphore::new(LINK_BUDGET)),
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
    tracing::info!(peer = %hello.node, addr = %hello.peer_addr, we_dialed, version, "peer link up (sealed)");
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
        tokio::spawn(async move { write_loop(cluster, link, sink, rx, sealer).await })
    };
    let mut writer = writer;
    let drain = read_loop(&cluster, &link, stream, opener).await;
    // A refusal the reader queued goes out before the link closes.
    let finished = drain && timeout(Duration::from_secs(1), &mut writer).await.is_ok();
    link.closed.cancel();
    if !finished {
        let _ = writer.await;
    }
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
    mut rx: mpsc::Receiver<Outgoing>,
    mut sealer: Sealer,
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
    let mut outbox: Outbox<(Option<tokio::sync::OwnedSemaphorePermit>, bool)> = Outbox::default();
    let mut next_beat = tokio::time::Instant::now() + timeouts.heartbeat;
    let mut closing = false;
    loop {
        while let Ok(out) = rx.try_recv() {
            outbox.push(out.lane, out.bytes, (out.permit, out.then_close));
        }
        if outbox.is_empty() {
            if closing {
                break;
            }
            tokio::select! {
                _ = link.closed.cancelled() => break,
                out = rx.recv() => match out {
                    Some(out) => outbox.push(out.lane, out.bytes, (out.permit, out.then_close)),
                    None => break,
                },
                _ = tokio::time::sleep_until(next_beat) => {}
            }
        }
        if tokio::time::Instant::now() >= next_beat {
            outbox.push(0, Bytes::from(heartbeat(&cluster).encode()), (None, false));
            next_beat = tokio::time::Instant::now() + timeouts.heartbeat;
        }
        let write = async {
            let (mut bytes, mut messages) = (0usize, 0u64);
            while bytes < FLUSH_BYTES {
                let Some(chunk) = outbox.next_chunk() else {
                    break;
                };
                let frame = sealer
                    .seal(chunk.lane, chunk.last, &chunk.bytes)
                    .map_err(std::io::Error::other)?;
                bytes += frame.len();
                sink.feed(frame).await?;
                if let Some((_permit, then_close)) = chunk.done {
                    messages += 1;
                    closing |= then_close;
                }
            }
            sink.flush().await.map(|()| (bytes, messages))
        };
        match timeout(timeouts.failure, write).await {
            Ok(Ok((bytes, messages))) => {
                messages_sent.inc_by(messages);
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

/// Reads until the link breaks; true when it queued a last message for the writer to send.
async fn read_loop(
    cluster: &Arc<Cluster>,
    link: &Arc<Link>,
    mut stream: SplitStream<Wire>,
    mut opener: Opener,
) -> bool {
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
            _ = link.closed.cancelled() => return false,
            next = timeout(failure, stream.next()) => next,
        };
        let frame = match next {
            Err(_) => {
                tracing::warn!(peer = %link.node, ?failure, "nothing heard from peer; closing the link");
                return false;
            }
            Ok(None) => return false,
            Ok(Some(Err(error))) => {
                tracing::debug!(peer = %link.node, %error, "peer link read failed");
                return false;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        bytes_received.inc_by(frame.len() as u64);
        let body = match opener.open(&frame) {
            Ok(None) => continue,
            Ok(Some(body)) => body,
            Err(error @ SealError::Authentication) => {
                tracing::warn!(peer = %link.node, addr = %link.info.peer_addr, %error, "closing the peer link: something between the nodes altered or injected traffic");
                link.queue_now(
                    PeerMessage::Refuse {
                        reason: format!("{error}; the link is closed"),
                    },
                    true,
                );
                return true;
            }
            Err(error) => {
                tracing::warn!(peer = %link.node, %error, "bad sealed frame; closing the link");
                return false;
            }
        };
        messages_received.inc();
        let message = match PeerMessage::decode(&body) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(peer = %link.node, %error, "bad peer message; closing the link");
                return false;
            }
        };
        if !dispatch(cluster, link, message) {
            return false;
        }
    }
}

/// Hands a served stream (a client of the peer's on a document of ours) its event. A stream
/// whose consumer is behind is closed with 1013 instead of holding up the link: its client
/// reconnects.
fn served_event(link: &Link, stream: u64, event: ServedEvent) {
    let tx = link
        .served
        .lock()
        .ok()
        .and_then(|m| m.get(&stream).cloned());
    let Some(tx) = tx else { return };
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(event) {
        link.forget_served(stream);
        tracing::warn!(peer = %link.node, stream, "a relayed client is sending faster than its document takes it; closing its stream");
        link.try_send(PeerMessage::Close {
            stream,
            code: synchrony_protocol::CloseCode::TRY_AGAIN_LATER.0,
            reason: "the document is busy; try again".into(),
        });
    }
}

/// Hands a stream we opened its event. A consumer that is behind loses the stream (its route
/// resyncs with the owner, a hub is rebuilt) instead of holding up the link.
fn opened_event(link: &Link, stream: u64, event: StreamEvent, remove: bool) {
    let tx = link.opened.lock().ok().and_then(|mut m| {
        if remove {
            m.remove(&stream)
        } else {
            m.get(&stream).cloned()
        }
    });
    let Some(tx) = tx else { return };
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(event) {
        link.forget_opened(stream);
        tracing::debug!(peer = %link.node, stream, "a stream's consumer is behind; dropping the stream");
        link.try_send(PeerMessage::Close {
            stream,
            code: synchrony_protocol::CloseCode::NORMAL.0,
            reason: "consumer behind".into(),
        });
    }
}

/// Acts on one message. Never waits: the link's other streams and its heartbeats come next.
fn dispatch(cluster: &Arc<Cluster>, link: &Arc<Link>, message: PeerMessage) -> bool {
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
            handover,
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
                handover,
            };
            let (cluster, link) = (cluster.clone(), link.clone());
            let tracker = cluster.tracker.clone();
            tracker.spawn(async move { super::relay::serve(cluster, link, open, rx).await });
        }
        PeerMessage::Data { stream, frame } => {
            if link.is_ours(stream) {
                opened_event(link, stream, StreamEvent::Frame(frame), false);
            } else {
                served_event(link, stream, ServedEvent::Frame(frame));
            }
        }
        PeerMessage::Resync { stream } => served_event(link, stream, ServedEvent::Resync),
        PeerMessage::Quiet { stream } => served_event(link, stream, ServedEvent::Quiet),
        PeerMessage::Opened { stream } => opened_event(link, stream, StreamEvent::Opened, false),
        PeerMessage::Close {
            stream,
            code,
            reason,
        } => {
            if link.is_ours(stream) {
                opened_event(link, stream, StreamEvent::Closed { code, reason }, true);
            } else {
                let tx = link.served.lock().ok().and_then(|mut m| m.remove(&stream));
                if let Some(tx) = tx {
                    // A full queue: dropping the sender ends the stream all the same.
                    let _ = tx.try_send(ServedEvent::Closed);
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
        PeerMessage::Refuse { reason } => {
            tracing::warn!(peer = %link.node, reason = %shown(&reason), "peer closed the link");
            return false;
        }
        PeerMessage::Hello(_) | PeerMessage::Proof { .. } => {
            tracing::warn!(peer = %link.node, "handshake message on an established link; closing it");
            return false;
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_kind_holds_no_remote_content() {
        // Remote numbers and names do not make new kinds, so they cannot make new WARN lines.
        assert_eq!(
            refusal_kind("12 trailing bytes"),
            refusal_kind("99999 trailing bytes")
        );
        assert_eq!(
            refusal_kind(r#"node of cluster "a" is not a member"#),
            refusal_kind(r#"node of cluster "zz" is not a member"#)
        );
        assert_ne!(
            refusal_kind("no hello within 2s"),
            refusal_kind("wrong secret")
        );
    }

    #[test]
    fn refusals_past_the_loud_budget_are_held_back_and_counted() {
        let log = RefusalLog::default();
        for i in 0..(LOUD_REFUSALS as u16 + 30) {
            let remote = std::net::SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 1));
            log.log(remote, &Refusal::from("wrong secret".to_owned()));
        }
        let w = log.0.lock().unwrap();
        assert_eq!(w.loud, LOUD_REFUSALS);
        assert_eq!(w.held_back, 30);
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_handshakes() {
        let per = Arc::new(PerAddress::default());
        let ip: std::net::IpAddr = [192, 0, 2, 1].into();
        let slots: Vec<_> = (0..HANDSHAKES_PER_ADDRESS)
            .map(|_| per.take(ip).unwrap())
            .collect();
        assert!(per.take(ip).is_none());
        assert!(per.take([192, 0, 2, 2].into()).is_some());
        drop(slots);
        assert!(per.take(ip).is_some());
        assert!(
            per.0.lock().unwrap().is_empty(),
            "counts are forgotten at zero"
        );
    }
}
