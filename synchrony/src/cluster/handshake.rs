//! The peer link's handshake: who the other node is, proof that it holds the cluster secret,
//! and proof that it uses the same database.
//!
//! ```text
//! dialer                                   acceptor
//!   Hello(version, id, cluster, nonce_d) →                      (plain, at most 4 KiB each)
//!                                          ← Hello(version, id, cluster, nonce_a)  or  ← Refuse
//!   Noise NNpsk0 message 1: e, psk; sealed [store id, created] →
//!                           ← Noise message 2: e, ee; sealed [store id, created, verdict]
//!   sealed Heartbeat →                     (the acceptor registers the link only now)
//!                                          ← sealed Heartbeat
//! ```
//!
//! The hellos are plain so that a node of another cluster or protocol version is told why in
//! words; they are the Noise prologue, so a relay that alters one breaks the handshake (see
//! [`super::sealed`] for the channel and why Noise). The dialer's first message can only be
//! made with the cluster secret; the acceptor's answer covers both sides' fresh ephemeral keys.
//! The acceptor registers the link only once the dialer's first sealed message arrives, so a
//! replayed first message gets nowhere. A hello from another cluster or version is refused
//! before any key is used. Each side sends the identity of its database (a row the first
//! start writes, [`crate::store::StoreIdentity`]) sealed: nodes on different databases refuse
//! each other (and one of them stops serving, see `StoreCheck` in the cluster module).

use synchrony_protocol::peer::{link_version, Hello, NONCE_BYTES, PEER_PROTOCOL_VERSION};
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;

use crate::store::StoreIdentity;

/// The peer protocol version this node announces: the build's, unless a test build stands in
/// for another release (the cluster tests start nodes one and two versions apart with the
/// hidden `--test-peer-protocol-version`, read once at start).
pub fn announced_version() -> u32 {
    crate::testing::hooks()
        .peer_protocol_version
        .unwrap_or(PEER_PROTOCOL_VERSION)
}

/// Longest remote-supplied string a log line or a reply repeats.
const SHOWN: usize = 240;

/// A remote-supplied string as logs and replies show it: escaped, and cut to a few dozen
/// characters.
pub fn shown(remote: &str) -> String {
    let mut out: String = remote
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if remote.chars().count() > SHOWN {
        out.push('…');
    }
    out
}

/// The sealed payload of a handshake message: the sender's database identity and, from the
/// acceptor, its verdict (empty: accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub store: StoreIdentity,
    pub verdict: String,
}

impl Identity {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.write_string(&self.store.id);
        b.write_var(self.store.created_ms.max(0) as u64);
        b.write_string(&self.verdict);
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut c = Cursor::new(bytes);
        let bad = |e: yrs::encoding::read::Error| format!("malformed handshake payload: {e}");
        let id = c.read_string().map_err(bad)?.to_owned();
        let created: u64 = c.read_var().map_err(bad)?;
        let verdict = c.read_string().map_err(bad)?.to_owned();
        if c.next != bytes.len() {
            return Err("malformed handshake payload: trailing bytes".into());
        }
        Ok(Self {
            store: StoreIdentity {
                id,
                created_ms: created.min(i64::MAX as u64) as i64,
            },
            verdict,
        })
    }
}

/// Checks the other side's hello against ours; the error is the reason given in `Refuse`.
pub fn check_hello(mine: &Hello, theirs: &Hello) -> Result<(), String> {
    let first = synchrony_protocol::peer::PEER_PROTOCOL_FIRST;
    if theirs.version.min(mine.version) < first {
        return Err(format!(
            "peer protocol version {} cannot link with this node's {}: version {first} sealed \
             the peer channel, which earlier releases cannot speak (stop every node of the \
             earlier release, then start them all on this one)",
            theirs.version, mine.version
        ));
    }
    if link_version(mine.version, theirs.version).is_none() {
        return Err(format!(
            "peer protocol version {} cannot link with this node's {}: nodes interoperate only \
             one version apart (upgrade one release at a time)",
            theirs.version, mine.version
        ));
    }
    if theirs.cluster != mine.cluster {
        return Err(format!(
            "node of cluster \"{}\" is not a member of cluster \"{}\" (cluster.name)",
            shown(&theirs.cluster),
            shown(&mine.cluster)
        ));
    }
    if theirs.nonce.len() != NONCE_BYTES {
        return Err("malformed hello: bad nonce".into());
    }
    if theirs.node == mine.node {
        return Err("connected to itself".into());
    }
    if theirs.node.is_empty() || theirs.node.len() > 64 {
        return Err("malformed hello: bad node id".into());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hello(node: &str, cluster: &str) -> Hello {
        Hello {
            version: PEER_PROTOCOL_VERSION,
            node: node.into(),
            cluster: cluster.into(),
            nonce: vec![node.len() as u8; NONCE_BYTES],
            peer_addr: String::new(),
            http_url: String::new(),
        }
    }

    #[test]
    fn identities_round_trip_and_remote_strings_are_shown_escaped_and_short() {
        let id = Identity {
            store: StoreIdentity {
                id: "3f1c".into(),
                created_ms: 1_700_000_000_000,
            },
            verdict: String::new(),
        };
        assert_eq!(Identity::decode(&id.encode()), Ok(id.clone()));
        let mut long = id.encode();
        long.push(0);
        assert!(Identity::decode(&long).is_err());
        assert!(Identity::decode(&[200]).is_err());
        assert_eq!(shown("a\nb\u{1b}"), "a\\nb\\u{1b}");
        let huge = "x".repeat(10_000);
        assert_eq!(shown(&huge).chars().count(), SHOWN + 1);
    }

    #[test]
    fn hellos_of_other_clusters_versions_or_itself_are_refused() {
        let mine = hello("a", "prod");
        assert_eq!(check_hello(&mine, &hello("b", "prod")), Ok(()));
        assert!(check_hello(&mine, &hello("b", "staging"))
            .unwrap_err()
            .contains("cluster"));
        let mut old = hello("b", "prod");
        old.version = 0;
        assert!(check_hello(&mine, &old).unwrap_err().contains("version"));
        // Version 1 (before the sealed channel) is one apart but cannot link: say what to do.
        old.version = synchrony_protocol::peer::PEER_PROTOCOL_FIRST - 1;
        assert!(check_hello(&mine, &old)
            .unwrap_err()
            .contains("stop every node"));
        assert!(check_hello(&old, &mine)
            .unwrap_err()
            .contains("stop every node"));
        // One version apart links (at the lower); two apart does not.
        let mut next = hello("b", "prod");
        next.version = PEER_PROTOCOL_VERSION + 1;
        assert_eq!(check_hello(&mine, &next), Ok(()));
        assert_eq!(check_hello(&next, &mine), Ok(()));
        assert_eq!(
            link_version(next.version, mine.version),
            Some(PEER_PROTOCOL_VERSION)
        );
        next.version = PEER_PROTOCOL_VERSION + 2;
        assert!(check_hello(&mine, &next)
            .unwrap_err()
            .contains("one version apart"));
        assert!(check_hello(&mine, &hello("a", "prod"))
            .unwrap_err()
            .contains("itself"));
        let mut short = hello("b", "prod");
        short.nonce.pop();
        assert!(check_hello(&mine, &short).is_err());
    }
}
