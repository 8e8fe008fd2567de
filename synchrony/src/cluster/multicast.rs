//! Membership by multicast (`cluster.join.type=multicast`): nodes on one network find each
//! other with no member list, as Hazelcast's multicast join lets Synchrony's nodes do.
//!
//! Every [`ANNOUNCE`] each node sends one datagram to `cluster.join.multicast.group` (default
//! 224.2.2.3, Hazelcast's) on `cluster.join.multicast.port` (54328) with time-to-live
//! `cluster.join.multicast.ttl` (1: the local network), from the interface
//! `cluster.interfaces` names (the system's choice when unset). The datagram says who the node
//! is and where its peer port is:
//!
//! ```text
//! "SYNMC1" | len+cluster name | len+node id | len+peer address | u64 ms | HMAC-SHA256
//! ```
//!
//! The HMAC, keyed with `cluster.authentication.secret`, covers everything before it, so only
//! members can make a node dial somewhere; an announcement of another cluster, with a bad MAC,
//! or older than [`MAX_AGE`] (a replay) is dropped. A node dials every member it hears; the
//! link's own handshake then authenticates both sides as with `tcpip`, and liveness is the
//! links', as there.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Cluster;

/// How often a node announces itself.
pub const ANNOUNCE: Duration = Duration::from_secs(1);
/// Announcements older than this (by the sender's clock) are dropped.
const MAX_AGE: Duration = Duration::from_secs(30);
const MAGIC: &[u8] = b"SYNMC1";
const MAC_BYTES: usize = 32;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 1024;

/// Where and how announcements go.
#[derive(Debug, Clone)]
pub struct MulticastSettings {
    pub group: Ipv4Addr,
    pub port: u16,
    pub ttl: u32,
    /// The interface to send from and listen on (its address); unspecified: the system's.
    pub interface: Ipv4Addr,
}

/// An announcement as read.
#[derive(Debug, PartialEq, Eq)]
struct Announcement {
    cluster: String,
    node: String,
    peer_addr: String,
    sent_ms: u64,
}

fn put(out: &mut Vec<u8>, field: &str) {
    out.push(field.len().min(255) as u8);
    out.extend_from_slice(&field.as_bytes()[..field.len().min(255)]);
}

fn encode(secret: &[u8], a: &Announcement) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    put(&mut out, &a.cluster);
    put(&mut out, &a.node);
    put(&mut out, &a.peer_addr);
    out.extend_from_slice(&a.sent_ms.to_be_bytes());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// Reads an announcement whose MAC `secret` verifies; None for anything else.
fn decode(secret: &[u8], datagram: &[u8]) -> Option<Announcement> {
    let body_len = datagram.len().checked_sub(MAC_BYTES)?;
    let (body, tag) = datagram.split_at(body_len);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(body);
    mac.verify_slice(tag).ok()?;
    let mut rest = body.strip_prefix(MAGIC)?;
    let mut field = || -> Option<String> {
        let (&len, tail) = rest.split_first()?;
        let (text, tail) = tail.split_at_checked(len as usize)?;
        rest = tail;
        String::from_utf8(text.to_vec()).ok()
    };
    let (cluster, node, peer_addr) = (field()?, field()?, field()?);
    let sent_ms = u64::from_be_bytes(rest.try_into().ok()?);
    Some(Announcement {
        cluster,
        node,
        peer_addr,
        sent_ms,
    })
}

/// Opens the multicast socket: bound to the group's port (shared, so that several nodes of one
/// machine can listen), joined to the group on the interface, sending with the TTL.
fn open(settings: &MulticastSettings) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, settings.port)).into())?;
    socket.join_multicast_v4(&settings.group, &settings.interface)?;
    socket.set_multicast_ttl_v4(settings.ttl)?;
    socket.set_multicast_loop_v4(true)?;
    if !settings.interface.is_unspecified() {
        socket.set_multicast_if_v4(&settings.interface)?;
    }
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Announces this node and dials the members it hears, until the node stops.
pub(crate) async fn run(cluster: Arc<Cluster>, settings: MulticastSettings) {
    // The interface may not be up yet at boot: keep trying.
    let socket = loop {
        match open(&settings) {
            Ok(socket) => break socket,
            Err(error) => {
                tracing::warn!(%error, group = %settings.group, port = settings.port, "cannot join the multicast group (cluster.join.multicast.*, cluster.interfaces); retrying in 5 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = cluster.cancel.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(group = %settings.group, port = settings.port, ttl = settings.ttl, interface = %settings.interface, "announcing on multicast");
    let target = SocketAddr::V4(SocketAddrV4::new(settings.group, settings.port));
    let secret = cluster.settings.secret.clone();
    let mut every = tokio::time::interval(ANNOUNCE);
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut warned = false;
    let mut warned_own_addr = false;
    loop {
        tokio::select! {
            _ = cluster.cancel.cancelled() => return,
            _ = every.tick() => {
                if cluster.leaving.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let datagram = encode(&secret, &Announcement {
                    cluster: cluster.settings.name.clone(),
                    node: cluster.me().to_owned(),
                    peer_addr: cluster.settings.peer_addr.clone(),
                    sent_ms: crate::util::clock::unix_ms().unsigned_abs(),
                });
                match socket.send_to(&datagram, target).await {
                    Ok(_) => warned = false,
                    Err(error) if !warned => {
                        tracing::warn!(%error, "cannot send the multicast announcement; retrying");
                        warned = true;
                    }
                    Err(_) => {}
                }
            }
            received = socket.recv_from(&mut buffer) => {
                let Ok((len, from)) = received else { continue };
                let Some(heard) = decode(&secret, &buffer[..len]) else {
                    tracing::debug!(%from, "multicast datagram that is not a member's announcement ignored");
                    continue;
                };
                let age = crate::util::clock::unix_ms().unsigned_abs().abs_diff(heard.sent_ms);
                if heard.cluster != cluster.settings.name || age > MAX_AGE.as_millis() as u64 {
                    continue;
                }
                if heard.node != cluster.me() {
                    if heard.peer_addr == cluster.settings.peer_addr {
                        if !std::mem::replace(&mut warned_own_addr, true) {
                            tracing::warn!(node = %heard.node, addr = %heard.peer_addr, "another member announces this node's own peer address; set cluster.bind to each node's network address");
                        }
                        continue;
                    }
                    cluster.dial(heard.peer_addr);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_and_need_the_secret() {
        let a = Announcement {
            cluster: "wiki".into(),
            node: "n1".into(),
            peer_addr: "10.0.0.1:25500".into(),
            sent_ms: 1_700_000_000_000,
        };
        let datagram = encode(b"secret-one", &a);
        assert_eq!(decode(b"secret-one", &datagram), Some(a));
        assert_eq!(decode(b"secret-two", &datagram), None, "another secret");
        let mut tampered = datagram.clone();
        tampered[8] ^= 1;
        assert_eq!(decode(b"secret-one", &tampered), None, "a changed byte");
        assert_eq!(decode(b"secret-one", &datagram[..20]), None, "truncated");
        assert_eq!(decode(b"secret-one", b""), None);
    }
}
