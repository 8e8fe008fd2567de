//! The peer protocol: what cluster nodes say to each other on the peer port
//! (`synchrony.cluster.base.port`).
//!
//! A link is one TCP connection carrying length-prefixed messages (a 4-byte big-endian length,
//! then the body; the engine frames them with `tokio_util`'s `LengthDelimitedCodec`). A body is
//! `varUint(tag)` followed by the message's fields, written with the same variable-length
//! integers and byte arrays as y-sync (`lib0` encoding), so one set of readers serves both.
//!
//! A link starts with a handshake (see `synchrony::cluster::handshake`): each side sends
//! [`Hello`] in the clear, then a Noise handshake keyed by the cluster secret seals the link;
//! every later message travels sealed, in chunks (`synchrony::cluster::sealed`). After it,
//! either side may open streams: one per relayed client session
//! ([`PeerMessage::Open`]), carrying y-sync frames both ways ([`PeerMessage::Data`]) until one
//! side closes it. Heartbeats carry what `GET {ctx}/v1/cluster` shows about a member.
//!
//! Unknown tags and trailing bytes are errors: a peer that speaks another version is refused at
//! the handshake, never half-understood.

use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;

/// The version this build speaks. A release that changes the peer protocol bumps it and keeps
/// speaking the version before (what it adds is sent only on links of the new version), so
/// nodes one version apart interoperate and a cluster upgrades one node at a time; the
/// handshake refuses peers further apart. The [`Hello`] encoding never changes.
///
/// Version 2 seals the link (Noise, keyed by the cluster secret) and compares the nodes'
/// databases; version 1 sent everything in the clear after an HMAC handshake, so nodes of
/// version 2 refuse it (an upgrade from version 1 restarts the whole cluster once).
pub const PEER_PROTOCOL_VERSION: u32 = 2;

/// The oldest version this build links with.
pub const PEER_PROTOCOL_FIRST: u32 = 2;

/// The version a link between nodes speaking `a` and `b` uses: the lower one, when they are at
/// most one version apart; None when they cannot talk.
pub fn link_version(a: u32, b: u32) -> Option<u32> {
    (a.abs_diff(b) <= 1 && a.min(b) >= PEER_PROTOCOL_FIRST).then(|| a.min(b))
}

/// Length of the random nonce in a [`Hello`].
pub const NONCE_BYTES: usize = 32;

/// What a node says about itself first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    /// The node's id (a UUID, fresh at every start).
    pub node: String,
    /// `cluster.name` / `cluster.group.name`: members of another cluster are refused.
    pub cluster: String,
    /// Random bytes the other side's proof must cover (no replay of an old handshake).
    pub nonce: Vec<u8>,
    /// Where other nodes reach its peer port.
    pub peer_addr: String,
    /// Where clients reach it (`http://host:port{ctx}`), for `GET {ctx}/v1/cluster`.
    pub http_url: String,
}

/// A member's figures, sent with every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct NodeStats {
    pub uptime_ms: u64,
    /// Documents loaded (owned) on the node.
    pub documents: u64,
    /// WebSocket sessions open on the node.
    pub connections: u64,
}

/// A heartbeat: the sender's figures and the peer addresses of the members it sees live, so
/// that a node given only one member's address finds the rest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    pub stats: NodeStats,
    pub known: Vec<String>,
}

/// One message on a link.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerMessage {
    Hello(Hello),
    /// Version 1's handshake proof; kept so that such a message is recognised and refused.
    Proof {
        mac: Vec<u8>,
    },
    /// The handshake failed; the reason is logged by both sides.
    Refuse {
        reason: String,
    },
    Heartbeat(Heartbeat),
    /// The sender is stopping: it has handed its documents over and leaves the cluster.
    Leaving,
    /// Opens stream `stream` (chosen by the opener, unique on the link per direction) for a
    /// client of the opener's, on a document the receiver owns.
    Open {
        stream: u64,
        doc: String,
        read_only: bool,
        wants_ack: bool,
        /// The token's `session` claim as JSON, or empty.
        session: String,
        /// Not a client: the previous owner handing the document's state over. A maintenance
        /// lock refuses clients' edits, not state moving between owners.
        handover: bool,
    },
    /// A y-sync frame: from the client (opener → owner) or for it (owner → opener).
    Data {
        stream: u64,
        frame: Vec<u8>,
    },
    /// The client's queue overflowed and was emptied: the owner sends the full state again.
    Resync {
        stream: u64,
    },
    /// From the owner: the stream's connection has joined the document.
    Opened {
        stream: u64,
    },
    /// From the opener: stop sending broadcasts on this stream (its node's subscription
    /// stream for the document carries them to every client there).
    Quiet {
        stream: u64,
    },
    /// The stream ends. From the owner: close the client with `code` and `reason`. From the
    /// opener: the client left (`code` 1000) or moves to another owner.
    Close {
        stream: u64,
        code: u16,
        reason: String,
    },
    /// A request of the REST document API, forwarded to the document's owner as it arrived
    /// (after the forwarding node checked nothing: the owner checks everything).
    HttpRequest {
        id: u64,
        exchange: HttpExchange,
    },
    /// The owner's answer to [`PeerMessage::HttpRequest`] `id`.
    HttpResponse {
        id: u64,
        exchange: HttpExchange,
    },
}

/// An HTTP request or response carried over a link. `head` is the method and URI of a
/// request, the status code of a response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpExchange {
    pub head: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("malformed peer message: {0}")]
    Malformed(String),
    #[error("unknown peer message type {0}")]
    UnknownTag(u64),
    #[error("{0} trailing bytes after a peer message")]
    Trailing(usize),
}

const HELLO: u64 = 1;
const PROOF: u64 = 2;
const REFUSE: u64 = 3;
const HEARTBEAT: u64 = 4;
const LEAVING: u64 = 5;
const OPEN: u64 = 10;
const DATA: u64 = 11;
const RESYNC: u64 = 12;
const CLOSE: u64 = 13;
const OPENED: u64 = 14;
const QUIET: u64 = 15;
const HTTP_REQUEST: u64 = 20;
const HTTP_RESPONSE: u64 = 21;

fn write_exchange(b: &mut Vec<u8>, id: u64, e: &HttpExchange) {
    b.write_var(id);
    b.write_string(&e.head);
    b.write_var(e.headers.len() as u64);
    for (name, value) in &e.headers {
        b.write_string(name);
        b.write_buf(value);
    }
    b.write_buf(&e.body);
}

fn read_exchange(c: &mut Cursor, len: usize) -> Result<(u64, HttpExchange), PeerError> {
    let bad = |e: yrs::encoding::read::Error| PeerError::Malformed(e.to_string());
    let id = c.read_var().map_err(bad)?;
    let head = c.read_string().map_err(bad)?.to_owned();
    let count: u64 = c.read_var().map_err(bad)?;
    // Each header takes at least two length bytes.
    if count.saturating_mul(2) > (len - c.next) as u64 {
        return Err(PeerError::Malformed(format!("{count} headers")));
    }
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = c.read_string().map_err(bad)?.to_owned();
        headers.push((name, c.read_buf().map_err(bad)?.to_vec()));
    }
    let body = c.read_buf().map_err(bad)?.to_vec();
    Ok((
        id,
        HttpExchange {
            head,
            headers,
            body,
        },
    ))
}

impl PeerMessage {
    /// The message body (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            PeerMessage::Hello(h) => {
                b.write_var(HELLO);
                b.write_var(h.version);
                b.write_string(&h.node);
                b.write_string(&h.cluster);
                b.write_buf(&h.nonce);
                b.write_string(&h.peer_addr);
                b.write_string(&h.http_url);
            }
            PeerMessage::Proof { mac } => {
                b.write_var(PROOF);
                b.write_buf(mac);
            }
            PeerMessage::Refuse { reason } => {
                b.write_var(REFUSE);
                b.write_string(reason);
            }
            PeerMessage::Heartbeat(h) => {
                b.write_var(HEARTBEAT);
                b.write_var(h.stats.uptime_ms);
                b.write_var(h.stats.documents);
                b.write_var(h.stats.connections);
                b.write_var(h.known.len() as u64);
                for addr in &h.known {
                    b.write_string(addr);
                }
            }
            PeerMessage::Leaving => b.write_var(LEAVING),
            PeerMessage::Open {
                stream,
                doc,
                read_only,
                wants_ack,
                session,
                handover,
            } => {
                b.write_var(OPEN);
                b.write_var(*stream);
                b.write_string(doc);
                b.write_u8(
                    u8::from(*read_only) | (u8::from(*wants_ack) << 1) | (u8::from(*handover) << 2),
                );
                b.write_string(session);
            }
            PeerMessage::Data { stream, frame } => {
                b.reserve(frame.len() + 16);
                b.write_var(DATA);
                b.write_var(*stream);
                b.write_buf(frame);
            }
            PeerMessage::Resync { stream } => {
                b.write_var(RESYNC);
                b.write_var(*stream);
            }
            PeerMessage::Opened { stream } => {
                b.write_var(OPENED);
                b.write_var(*stream);
            }
            PeerMessage::Quiet { stream } => {
                b.write_var(QUIET);
                b.write_var(*stream);
            }
            PeerMessage::Close {
                stream,
                code,
                reason,
            } => {
                b.write_var(CLOSE);
                b.write_var(*stream);
                b.write_var(*code);
                b.write_string(reason);
            }
            PeerMessage::HttpRequest { id, exchange } => {
                b.reserve(exchange.body.len() + 256);
                b.write_var(HTTP_REQUEST);
                write_exchange(&mut b, *id, exchange);
            }
            PeerMessage::HttpResponse { id, exchange } => {
                b.reserve(exchange.body.len() + 256);
                b.write_var(HTTP_RESPONSE);
                write_exchange(&mut b, *id, exchange);
            }
        }
        b
    }

    /// Reads one message body; refuses unknown tags and trailing bytes.
    pub fn decode(body: &[u8]) -> Result<Self, PeerError> {
        let mut c = Cursor::new(body);
        let bad = |e: yrs::encoding::read::Error| PeerError::Malformed(e.to_string());
        let tag: u64 = c.read_var().map_err(bad)?;
        let message = match tag {
            HELLO => PeerMessage::Hello(Hello {
                version: c.read_var().map_err(bad)?,
                node: c.read_string().map_err(bad)?.to_owned(),
                cluster: c.read_string().map_err(bad)?.to_owned(),
                nonce: c.read_buf().map_err(bad)?.to_vec(),
                peer_addr: c.read_string().map_err(bad)?.to_owned(),
                http_url: c.read_string().map_err(bad)?.to_owned(),
            }),
            PROOF => PeerMessage::Proof {
                mac: c.read_buf().map_err(bad)?.to_vec(),
            },
            REFUSE => PeerMessage::Refuse {
                reason: c.read_string().map_err(bad)?.to_owned(),
            },
            HEARTBEAT => {
                let stats = NodeStats {
                    uptime_ms: c.read_var().map_err(bad)?,
                    documents: c.read_var().map_err(bad)?,
                    connections: c.read_var().map_err(bad)?,
                };
                let count: u64 = c.read_var().map_err(bad)?;
                // Each address takes at least its length byte.
                if count > (body.len() - c.next) as u64 {
                    return Err(PeerError::Malformed(format!("{count} addresses")));
                }
                let mut known = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    known.push(c.read_string().map_err(bad)?.to_owned());
                }
                PeerMessage::Heartbeat(Heartbeat { stats, known })
            }
            LEAVING => PeerMessage::Leaving,
            OPEN => {
                let stream = c.read_var().map_err(bad)?;
                let doc = c.read_string().map_err(bad)?.to_owned();
                let flags = c.read_u8().map_err(bad)?;
                if flags > 7 {
                    return Err(PeerError::Malformed(format!("open flags {flags}")));
                }
                PeerMessage::Open {
                    stream,
                    doc,
                    read_only: flags & 1 != 0,
                    wants_ack: flags & 2 != 0,
                    session: c.read_string().map_err(bad)?.to_owned(),
                    handover: flags & 4 != 0,
                }
            }
            DATA => PeerMessage::Data {
                stream: c.read_var().map_err(bad)?,
                frame: c.read_buf().map_err(bad)?.to_vec(),
            },
            RESYNC => PeerMessage::Resync {
                stream: c.read_var().map_err(bad)?,
            },
            OPENED => PeerMessage::Opened {
                stream: c.read_var().map_err(bad)?,
            },
            QUIET => PeerMessage::Quiet {
                stream: c.read_var().map_err(bad)?,
            },
            CLOSE => PeerMessage::Close {
                stream: c.read_var().map_err(bad)?,
                code: c.read_var().map_err(bad)?,
                reason: c.read_string().map_err(bad)?.to_owned(),
            },
            HTTP_REQUEST => {
                let (id, exchange) = read_exchange(&mut c, body.len())?;
                PeerMessage::HttpRequest { id, exchange }
            }
            HTTP_RESPONSE => {
                let (id, exchange) = read_exchange(&mut c, body.len())?;
                PeerMessage::HttpResponse { id, exchange }
            }
            other => return Err(PeerError::UnknownTag(other)),
        };
        match body.len() - c.next {
            0 => Ok(message),
            n => Err(PeerError::Trailing(n)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn samples() -> Vec<PeerMessage> {
        vec![
            PeerMessage::Hello(Hello {
                version: PEER_PROTOCOL_VERSION,
                node: "5b0c…".into(),
                cluster: "Synchrony-Cluster".into(),
                nonce: vec![7; NONCE_BYTES],
                peer_addr: "127.0.0.2:25500".into(),
                http_url: "http://127.0.0.2:8091/synchrony".into(),
            }),
            PeerMessage::Proof { mac: vec![1; 32] },
            PeerMessage::Refuse {
                reason: "wrong secret".into(),
            },
            PeerMessage::Heartbeat(Heartbeat {
                stats: NodeStats {
                    uptime_ms: 1 << 40,
                    documents: 3,
                    connections: 300,
                },
                known: vec!["127.0.0.1:25500".into(), "[::1]:25501".into()],
            }),
            PeerMessage::Leaving,
            PeerMessage::Open {
                stream: 9,
                doc: "page-1".into(),
                read_only: true,
                wants_ack: true,
                session: r#"{"name":"a"}"#.into(),
                handover: true,
            },
            PeerMessage::Data {
                stream: u64::MAX,
                frame: vec![0, 2, 1, 0],
            },
            PeerMessage::Resync { stream: 1 },
            PeerMessage::Opened { stream: 5 },
            PeerMessage::Quiet { stream: 6 },
            PeerMessage::HttpRequest {
                id: 3,
                exchange: HttpExchange {
                    head: "PUT /synchrony/v1/data/p?reset=true".into(),
                    headers: vec![("authorization".into(), b"Bearer x".to_vec())],
                    body: b"hello".to_vec(),
                },
            },
            PeerMessage::HttpResponse {
                id: 3,
                exchange: HttpExchange {
                    head: "200".into(),
                    headers: vec![],
                    body: vec![],
                },
            },
            PeerMessage::Close {
                stream: 2,
                code: 4404,
                reason: "deleted".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples() {
            let body = message.encode();
            assert_eq!(PeerMessage::decode(&body).unwrap(), message);
            // Every truncation is an error, never a panic or a different message.
            for cut in 0..body.len() {
                assert!(
                    PeerMessage::decode(&body[..cut]).is_err(),
                    "{message:?} cut at {cut}"
                );
            }
            let mut longer = body.clone();
            longer.push(0);
            assert_eq!(PeerMessage::decode(&longer), Err(PeerError::Trailing(1)));
        }
    }

    #[test]
    fn unknown_tags_and_flags_are_refused() {
        assert_eq!(PeerMessage::decode(&[99]), Err(PeerError::UnknownTag(99)));
        let mut open = PeerMessage::Open {
            stream: 1,
            doc: "d".into(),
            read_only: false,
            wants_ack: false,
            session: String::new(),
            handover: false,
        }
        .encode();
        // The flags byte sits after the tag, the stream and the one-byte-long id.
        open[4] = 8;
        assert!(matches!(
            PeerMessage::decode(&open),
            Err(PeerError::Malformed(_))
        ));
    }
}
