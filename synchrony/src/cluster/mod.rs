//! The standalone cluster: nodes that share one database, find each other, and split the
//! documents between them.
//!
//! # Design
//!
//! - **Agreement rests on real systems.** PostgreSQL holds every document (an append-only log
//!   plus snapshots); nothing about a document lives only in a node's memory once it is
//!   acknowledged. Membership needs no agreement at all: each node computes the owner of a
//!   document by rendezvous hashing ([`crate::placement`]) over the members *it* sees live, and
//!   two nodes that briefly disagree both run the document. Both persist to the same log and a
//!   load merges everything, so a double owner loses nothing (the CRDT commutes); it only costs
//!   clients a short period in which edits reach them through one owner and not the other.
//! - **Peer links** ([`link`]): one TCP connection per pair of nodes on
//!   `synchrony.cluster.base.port`, length-framed [`synchrony_protocol::peer`] messages, a
//!   versioned handshake with a challenge-response MAC over the cluster secret
//!   ([`handshake`]). Each link carries heartbeats and any number of *streams*, one per relayed
//!   client session. Writes go through a bounded queue; a full queue slows the sender down.
//! - **Membership** ([`membership`]) is a no-I/O core fed link events and time: a member is
//!   live while its link is up and it was heard within the failure timeout; a broken link gets
//!   a short grace. Addresses come from `cluster.join.tcpip.members` and from heartbeats (each
//!   lists the members its sender sees), so one reachable seed is enough.
//! - **Routes** ([`relay`]): in a cluster every client session talks to a *route* instead of a
//!   document actor directly. The route attaches to the document's owner: the local actor, or
//!   a stream to the owner's node. When the view changes and the owner moves, the route
//!   attaches to the new owner and resyncs in both directions (the new owner sends the full
//!   state and a sync step 1, which the client answers with whatever the owner lacks). The
//!   client's socket never closes. Persisted acknowledgements are renumbered so that they keep
//!   their meaning across owners: after a move, no ack is passed on until the client's answer
//!   to the new owner's step 1 (which carries everything the client holds) is durable.
//! - **Hubs** ([`hub`]): broadcasts reach a node's relayed clients of a document through one
//!   subscription per (document, owner node), so each crosses the link once per node, not once
//!   per client.
//! - **Hand-over**: a document whose owner is now another node unloads once its clients have
//!   moved and sends its state to the owner; a node stopping with SIGTERM leaves its own view
//!   first so that all its documents do so before it drains.
//!
//! # Failures
//!
//! | what | what happens |
//! | --- | --- |
//! | a node is killed | its links break; after the link grace (1 s) it is dead; routes on other nodes move to the new owners and resync; its own clients reconnect through the load balancer |
//! | a link resets | the member is suspect for the grace; if the link is back within it, nothing moves |
//! | a node hangs | no heartbeat for the failure timeout (3 s): dead, as above |
//! | a node stops (SIGTERM) | it says `Leaving`, so peers move its documents at once, then it drains |
//! | views differ | two owners for a while; both persist; routes converge as views do |
//! | wrong secret, cluster or version | the link is refused, both sides log why |

pub mod handshake;
pub mod hub;
pub mod link;
pub mod membership;
pub mod multicast;
pub mod registry;
pub mod relay;
pub mod rest;
pub mod sealed;
pub mod status;

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use synchrony_protocol::peer::{Hello, NodeStats, NONCE_BYTES};
use synchrony_protocol::DocId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::LimitsConfig;
use crate::doc::Docs;
use crate::placement::{rendezvous, Owner, Placement};
use membership::{MemberInfo, MemberView, Membership, Timeouts};

/// What a node needs to know to take part.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_id: String,
    /// `cluster.name`: links between different names are refused.
    pub name: String,
    pub secret: Vec<u8>,
    /// Peer addresses to dial (`cluster.join.tcpip.members`).
    pub seeds: Vec<String>,
    /// Where others reach this node's peer port.
    pub peer_addr: String,
    /// Where clients reach this node.
    pub http_url: String,
    pub timeouts: Timeouts,
    /// The Redis registry, for `cluster.join.type=redis`.
    pub redis_url: Option<String>,
    /// Announcements, for `cluster.join.type=multicast`.
    pub multicast: Option<multicast::MulticastSettings>,
    /// The database this node uses: peers must show the same.
    pub store: crate::store::StoreIdentity,
}

/// How long a peer's report of another database counts (its dial loop renews it every few
/// seconds while the refusal lasts).
const STORE_REPORT_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Peers that showed another database at link-up, and when.
#[derive(Default)]
pub(crate) struct StoreCheck {
    others: std::collections::HashMap<String, (crate::store::StoreIdentity, String, Instant)>,
    logged: std::collections::HashMap<String, Instant>,
}

/// A node's view of the cluster: the live members, and a counter bumped at each change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub epoch: u64,
    pub live: Arc<Vec<String>>,
}

pub struct Cluster {
    pub settings: ClusterSettings,
    /// Each link's traffic, for `GET {ctx}/metrics`.
    pub(crate) link_metrics: crate::metrics::LinkMetrics,
    membership: Mutex<Membership>,
    view: watch::Sender<View>,
    links: link::Links,
    hubs: hub::Hubs,
    /// Peer addresses being dialed (seeds and those heard of).
    dialing: Mutex<BTreeSet<String>>,
    pub(crate) docs: Arc<Docs>,
    pub(crate) limits: LimitsConfig,
    connections: Arc<AtomicU64>,
    started: Instant,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// This node's HTTP router, for REST requests forwarded by other nodes.
    pub(crate) router: std::sync::OnceLock<axum::Router>,
    /// Set by [`Cluster::leave`]: this node no longer counts itself as a possible owner.
    leaving: std::sync::atomic::AtomicBool,
    /// Bumped at every change of the published view.
    epoch: AtomicU64,
    /// What peers on other databases showed.
    stores: Mutex<StoreCheck>,
}

impl Cluster {
    pub fn new(
        settings: ClusterSettings,
        docs: Arc<Docs>,
        limits: LimitsConfig,
        connections: Arc<AtomicU64>,
        cancel: CancellationToken,
        tracker: TaskTracker,
        link_metrics: crate::metrics::LinkMetrics,
    ) -> Arc<Self> {
        let membership = Membership::new(
            settings.node_id.clone(),
            MemberInfo {
                peer_addr: settings.peer_addr.clone(),
                http_url: settings.http_url.clone(),
            },
            settings.timeouts,
        );
        let view = View {
            epoch: 1,
            live: Arc::new(membership.live().to_vec()),
        };
        Arc::new(Self {
            settings,
            membership: Mutex::new(membership),
            view: watch::Sender::new(view),
            links: link::Links::default(),
            hubs: hub::Hubs::default(),
            dialing: Mutex::new(BTreeSet::new()),
            docs,
            limits,
            connections,
            started: Instant::now(),
            cancel,
            tracker,
            router: std::sync::OnceLock::new(),
            leaving: std::sync::atomic::AtomicBool::new(false),
            epoch: AtomicU64::new(1),
            link_metrics,
            stores: Mutex::default(),
        })
    }

    /// Whether this node is leaving the cluster (a clean stop has begun).
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The peers this node has a link up to.
    pub fn linked_peers(&self) -> Vec<String> {
        self.links.nodes()
    }

    pub fn me(&self) -> &str {
        &self.settings.node_id
    }

    /// The current view, and a receiver that wakes at each change.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    /// The owner of `doc` in `view`.
    pub fn owner_in(&self, view: &View, doc: &str) -> Owner {
        match rendezvous(&view.live, doc) {
            Some(node) if node != self.me() => Owner::Remote {
                node: node.to_owned(),
            },
            _ => Owner::Local,
        }
    }

    /// Runs `change` on the membership core and publishes the view if the live set changed.
    fn update_membership(&self, change: impl FnOnce(&mut Membership, Instant) -> bool) {
        let Ok(mut membership) = self.membership.lock() else {
            return;
        };
        if change(&mut membership, Instant::now()) {
            self.publish(&membership);
        }
    }

    /// Publishes the live members as the view (without this node once it is leaving).
    fn publish(&self, membership: &Membership) {
        let leaving = self.leaving.load(std::sync::atomic::Ordering::Acquire);
        let live: Vec<String> = membership
            .live()
            .iter()
            .filter(|id| !(leaving && *id == self.me()))
            .cloned()
            .collect();
        let view = View {
            epoch: self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1,
            live: Arc::new(live),
        };
        tracing::info!(epoch = view.epoch, live = ?view.live, "cluster view changed");
        self.view.send_replace(view);
    }

    /// This node's figures, for heartbeats and `GET {ctx}/v1/cluster`.
    pub fn stats(&self) -> NodeStats {
        NodeStats {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            documents: self.docs.loaded_count() as u64,
            connections: self.connections.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Every member this node knows, itself first.
    pub fn members(&self) -> Vec<MemberView> {
        let stats = self.stats();
        self.membership
            .lock()
            .map(|m| m.members(Instant::now(), stats))
            .unwrap_or_default()
    }

    /// Peer addresses of the live members, for heartbeats.
    /// Whether `ip` is the address of a member this node knows or of a configured member: such
    /// a peer may use the handshake slots kept for members.
    pub(crate) fn is_member_ip(&self, ip: std::net::IpAddr) -> bool {
        let members = self.members();
        members
            .iter()
            .map(|m| m.info.peer_addr.as_str())
            .chain(self.settings.seeds.iter().map(String::as_str))
            .any(|a| {
                a.parse::<std::net::SocketAddr>()
                    .is_ok_and(|s| s.ip() == ip)
            })
    }

    fn known_addresses(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .filter(|m| m.state != membership::MemberState::Dead)
            .map(|m| m.info.peer_addr)
            .collect()
    }

    /// Compares a peer's database with this node's at link-up: the reason to refuse the link
    /// when they differ (logged at ERROR, at most every 30 s per peer).
    pub(crate) fn check_store(
        &self,
        node: &str,
        addr: &str,
        theirs: &crate::store::StoreIdentity,
    ) -> Result<(), String> {
        let mine = &self.settings.store;
        let Ok(mut check) = self.stores.lock() else {
            return Ok(());
        };
        if theirs.id == mine.id {
            check.others.remove(node);
            return Ok(());
        }
        let now = Instant::now();
        check
            .others
            .insert(node.to_owned(), (theirs.clone(), addr.to_owned(), now));
        let reason = format!(
            "node {} at {} uses another database (store {} created at {} ms) than this node \
             (store {} created at {} ms): every node of a cluster must use the same \
             synchrony.database.url",
            handshake::shown(node),
            handshake::shown(addr),
            handshake::shown(&theirs.id),
            theirs.created_ms,
            mine.id,
            mine.created_ms
        );
        if check
            .logged
            .get(node)
            .is_none_or(|at| at.elapsed() >= link::WARN_EVERY)
        {
            if check.logged.len() > 1024 {
                check.logged.clear();
            }
            check.logged.insert(node.to_owned(), now);
            tracing::error!("refused a cluster member on another database: {reason}");
        }
        Err(reason)
    }

    /// Why this node must stop serving, if its database is not the cluster's: more peers showed
    /// another database than share this one, or as many, and this node's database is the newer
    /// (a node started against a fresh, empty database is the odd one out).
    pub fn store_problem(&self) -> Option<String> {
        let mine = &self.settings.store;
        let Ok(mut check) = self.stores.lock() else {
            return None;
        };
        check
            .others
            .retain(|_, (_, _, at)| at.elapsed() < STORE_REPORT_TTL);
        if check.others.is_empty() {
            return None;
        }
        let other = check.others.len();
        let same = self.view().live.iter().filter(|n| *n != self.me()).count();
        let newer = check
            .others
            .values()
            .all(|(theirs, _, _)| (mine.created_ms, &mine.id) > (theirs.created_ms, &theirs.id));
        if other > same || (other == same && newer) {
            Some(format!(
                "this node's database (store {}) is not the cluster's: {other} member(s) use \
                 another one; set synchrony.database.url to the cluster's database",
                mine.id
            ))
        } else {
            None
        }
    }

    fn hello(&self) -> Hello {
        let mut nonce = vec![0u8; NONCE_BYTES];
        rand::fill(&mut nonce[..]);
        Hello {
            version: handshake::announced_version(),
            node: self.settings.node_id.clone(),
            cluster: self.settings.name.clone(),
            nonce,
            peer_addr: self.settings.peer_addr.clone(),
            http_url: self.settings.http_url.clone(),
        }
    }

    /// Starts accepting links on `listener`, dialing the seeds and running the failure
    /// detector's clock.
    pub fn start(self: &Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        self.tracker
            .spawn(async move { link::accept_loop(me, listener).await });
        for seed in self.settings.seeds.clone() {
            self.dial(seed);
        }
        if let Some(url) = self.settings.redis_url.clone() {
            let me = self.clone();
            self.tracker
                .spawn(async move { registry::run(me, url).await });
        }
        if let Some(settings) = self.settings.multicast.clone() {
            let me = self.clone();
            self.tracker
                .spawn(async move { multicast::run(me, settings).await });
        }
        let me = self.clone();
        self.tracker.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = every.tick() => me.update_membership(|m, now| m.tick(now)),
                    _ = me.cancel.cancelled() => return,
                }
            }
        });
    }

    /// Keeps a link to `addr` from now on (a seed, or an address a heartbeat named).
    fn dial(self: &Arc<Self>, addr: String) {
        if addr == self.settings.peer_addr {
            return;
        }
        let new = self
            .dialing
            .lock()
            .map(|mut d| d.insert(addr.clone()))
            .unwrap_or(false);
        if new {
            let me = self.clone();
            self.tracker
                .spawn(async move { link::dial_loop(me, addr).await });
        }
    }

    /// Stops treating `addr` as one to keep dialing (see `link::dial_loop`).
    fn forget_address(&self, addr: &str) {
        if let Ok(mut dialing) = self.dialing.lock() {
            dialing.remove(addr);
        }
    }

    /// Leaves the cluster before a clean stop: takes this node out of its own view (its
    /// routes move to the other owners, its documents hand their state over as their clients
    /// go), tells every peer (they move at once) and leaves the Redis registry. Returns once
    /// every document has been handed over, or after `within`.
    pub async fn leave(&self, within: std::time::Duration) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Release);
        if let Ok(membership) = self.membership.lock() {
            self.publish(&membership);
        }
        if let Some(url) = &self.settings.redis_url {
            registry::deregister(self, url).await;
        }
        self.links.broadcast_leaving().await;
        if self.view().live.is_empty() {
            return; // the last member: nobody to hand over to
        }
        let deadline = tokio::time::Instant::now() + within;
        while self.docs.loaded_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let left = self.docs.loaded_count();
        if left > 0 {
            tracing::warn!(documents = left, "not every document was handed over before the stop; their new owners read them from storage");
        } else {
            tracing::info!("every document handed over; stopping");
        }
    }
}

/// Hands a document this node no longer owns to its owner: a stream that carries the whole
/// state as a sync step 2 and closes.
pub struct ClusterHandoff(pub std::sync::Weak<Cluster>);

impl crate::doc::Handoff for ClusterHandoff {
    fn owned_elsewhere(&self, doc: &DocId) -> bool {
        self.0.upgrade().is_some_and(|cluster| {
            let view = cluster.view();
            matches!(cluster.owner_in(&view, doc.as_str()), Owner::Remote { .. })
        })
    }

    fn hand_over(&self, doc: &DocId, state: bytes::Bytes) {
        let Some(cluster) = self.0.upgrade() else {
            return;
        };
        let Owner::Remote { node } = cluster.owner_in(&cluster.view(), doc.as_str()) else {
            return;
        };
        let Some(link) = cluster.links.get(&node) else {
            tracing::warn!(doc = %doc, owner = %node, "no link to the new owner; it reads the document from storage");
            return;
        };
        let doc = doc.as_str().to_owned();
        cluster.tracker.spawn(async move {
            let (stream, _answers) = link.open_stream();
            let sent = link
                .send(synchrony_protocol::peer::PeerMessage::Open {
                    stream,
                    doc,
                    read_only: false,
                    wants_ack: false,
                    session: String::new(),
                    handover: true,
                })
                .await
                && link
                    .send(synchrony_protocol::peer::PeerMessage::Data {
                        stream,
                        frame: state.to_vec(),
                    })
                    .await
                && link
                    .send(synchrony_protocol::peer::PeerMessage::Close {
                        stream,
                        code: synchrony_protocol::CloseCode::NORMAL.0,
                        reason: "handed over".into(),
                    })
                    .await;
            link.forget_opened(stream);
            if !sent {
                tracing::warn!(owner = %link.node, "the hand-over did not reach the new owner; it reads the document from storage");
            }
        });
    }
}

/// Placement over the cluster's current view.
pub struct ClusterPlacement(pub Arc<Cluster>);

impl Placement for ClusterPlacement {
    fn owner(&self, doc: &DocId) -> Owner {
        let view = self.0.view();
        self.0.owner_in(&view, doc.as_str())
    }
}
