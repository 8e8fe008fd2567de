//! Node-level fan-out: one subscription per (document, owner node).
//!
//! Without it, each client relayed to an owner gets every broadcast (others' updates and
//! awareness) on its own stream, so a broadcast crosses the link once per relayed client. A hub
//! is one more connection of the owner's actor, opened by the relaying node for all its clients
//! of the document: the owner sends each broadcast on it once, and the hub hands the same bytes
//! to every subscribed client. Each client's own stream then carries only what is meant for it
//! (the sync handshake, its acknowledgements, resyncs).
//!
//! A route switches to the hub without a gap: it subscribes first, and only once the hub's
//! connection has joined the document (the owner says `Opened`) does it ask the owner to stop
//! sending broadcasts on its own stream (`Quiet`). Until then a client may get a broadcast
//! twice, which Yjs ignores. If the hub's stream ends (the owner let go of the document, closed
//! the hub for lagging, or the link broke), every subscribed route finds its owner again and
//! resyncs. A hub with no subscribers left closes its stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use synchrony_protocol::peer::PeerMessage;
use synchrony_protocol::CloseCode;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::link::{Link, StreamEvent};
use super::Cluster;
use crate::doc::Outbound;

pub struct Hub {
    doc: String,
    link: Arc<Link>,
    stream: u64,
    subscribers: Mutex<HashMap<u64, Outbound>>,
    /// True once the hub's connection has joined the document at the owner.
    ready: watch::Sender<bool>,
    /// The hub's stream is gone (or closing): its subscribers must find the owner again.
    pub(crate) ended: CancellationToken,
}

impl Hub {
    /// Waits until the hub's connection has joined the document.
    pub(crate) async fn joined(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }
}

/// The hubs of a node, by (document, owner node).
#[derive(Default)]
pub struct Hubs {
    by_key: Mutex<HashMap<(String, String), Arc<Hub>>>,
}

impl Cluster {
    /// Subscribes a client (`out`) to the hub for `doc` at `link`'s node, creating it if needed.
    pub(crate) fn join_hub(
        self: &Arc<Self>,
        doc: &str,
        link: &Arc<Link>,
        conn_id: u64,
        out: Outbound,
    ) -> Arc<Hub> {
        let Ok(mut hubs) = self.hubs.by_key.lock() else {
            unreachable!("the hub registry lock is never held across a panic")
        };
        let key = (doc.to_owned(), link.node.clone());
        if let Some(hub) = hubs.get(&key) {
            if !hub.ended.is_cancelled() && Arc::ptr_eq(&hub.link, link) {
                if let Ok(mut subscribers) = hub.subscribers.lock() {
                    subscribers.insert(conn_id, out);
                }
                return hub.clone();
            }
        }
        let (stream, events) = link.open_stream();
        let hub = Arc::new(Hub {
            doc: doc.to_owned(),
            link: link.clone(),
            stream,
            subscribers: Mutex::new(HashMap::from([(conn_id, out)])),
            ready: watch::Sender::new(false),
            ended: self.cancel.child_token(),
        });
        hubs.insert(key, hub.clone());
        let (cluster, running) = (self.clone(), hub.clone());
        self.tracker
            .spawn(async move { run(cluster, running, events).await });
        hub
    }

    /// Takes a client off its hub; the last one out ends the hub.
    pub(crate) fn leave_hub(&self, hub: &Arc<Hub>, conn_id: u64) {
        let Ok(mut hubs) = self.hubs.by_key.lock() else {
            return;
        };
        let empty = hub.subscribers.lock().map_or(true, |mut s| {
            s.remove(&conn_id);
            s.is_empty()
        });
        if empty {
            let key = (hub.doc.clone(), hub.link.node.clone());
            if hubs.get(&key).is_some_and(|h| Arc::ptr_eq(h, hub)) {
                hubs.remove(&key);
            }
            hub.ended.cancel();
        }
    }

    fn forget_hub(&self, hub: &Arc<Hub>) {
        if let Ok(mut hubs) = self.hubs.by_key.lock() {
            let key = (hub.doc.clone(), hub.link.node.clone());
            if hubs.get(&key).is_some_and(|h| Arc::ptr_eq(h, hub)) {
                hubs.remove(&key);
            }
        }
    }
}

async fn run(cluster: Arc<Cluster>, hub: Arc<Hub>, mut events: mpsc::Receiver<StreamEvent>) {
    let open = PeerMessage::Open {
        stream: hub.stream,
        doc: hub.doc.clone(),
        read_only: true,
        wants_ack: false,
        session: String::new(),
        handover: false,
    };
    if hub.link.send(open).await {
        loop {
            tokio::select! {
                _ = hub.ended.cancelled() => {
                    hub.link
                        .send(PeerMessage::Close {
                            stream: hub.stream,
                            code: CloseCode::NORMAL.0,
                            reason: "no clients left".into(),
                        })
                        .await;
                    break;
                }
                event = events.recv() => match event {
                    Some(StreamEvent::Opened) => {
                        hub.ready.send_replace(true);
                    }
                    Some(StreamEvent::Frame(frame)) => {
                        let frame = Bytes::from(frame);
                        if let Ok(subscribers) = hub.subscribers.lock() {
                            for out in subscribers.values() {
                                out.push_frame(&frame);
                            }
                        }
                    }
                    Some(StreamEvent::Closed { .. } | StreamEvent::LinkLost) | None => break,
                },
            }
        }
    }
    hub.ended.cancel();
    hub.link.forget_opened(hub.stream);
    cluster.forget_hub(&hub);
}
