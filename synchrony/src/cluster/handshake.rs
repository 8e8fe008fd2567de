//! The peer link's handshake: who the other node is, and proof that it holds the cluster secret.
//!
//! ```text
//! dialer                                   acceptor
//!   Hello(version, id, cluster, nonce_d) →
//!                                          ← Hello(version, id, cluster, nonce_a)
//!                                          ← Proof(HMAC(secret, "accept" ‖ transcript))
//!   Proof(HMAC(secret, "dial" ‖ transcript)) →
//!                                          ← Heartbeat (accepted)   or   ← Refuse(reason)
//! ```
//!
//! The transcript is both hellos as sent (length-prefixed), so each proof covers the other
//! side's fresh nonce: an old proof cannot be replayed, a proof made as acceptor cannot pass as
//! a dialer's, and the secret itself never crosses the wire. MACs are compared in constant time
//! (`hmac`'s `verify_slice`). A hello from another cluster or protocol version is refused before
//! any proof is made. Every refusal is logged by the side that refuses and, through the
//! `Refuse` message, by the other.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use synchrony_protocol::peer::{link_version, Hello, NONCE_BYTES, PEER_PROTOCOL_VERSION};

/// The peer protocol version this node announces: the build's, unless
/// `SYNCHRONY_TEST_PEER_PROTOCOL_VERSION` stands in for another build's (the cluster tests use
/// it to start nodes one and two versions apart).
pub fn announced_version() -> u32 {
    std::env::var("SYNCHRONY_TEST_PEER_PROTOCOL_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PEER_PROTOCOL_VERSION)
}

type HmacSha256 = Hmac<Sha256>;

/// Which side of the link a proof is made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"synchrony-peer/dial",
            Role::Acceptor => b"synchrony-peer/accept",
        }
    }
}

fn mac(secret: &[u8], role: Role, dialer_hello: &[u8], acceptor_hello: &[u8]) -> HmacSha256 {
    // An HMAC key may have any length: `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(role.label());
    for part in [dialer_hello, acceptor_hello] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac
}

/// The proof `role` sends, over both hellos as encoded on the wire.
pub fn prove(secret: &[u8], role: Role, dialer_hello: &[u8], acceptor_hello: &[u8]) -> Vec<u8> {
    mac(secret, role, dialer_hello, acceptor_hello)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Whether `proof` is what `role` holding `secret` would send.
pub fn verify(
    secret: &[u8],
    role: Role,
    dialer_hello: &[u8],
    acceptor_hello: &[u8],
    proof: &[u8],
) -> bool {
    mac(secret, role, dialer_hello, acceptor_hello)
        .verify_slice(proof)
        .is_ok()
}

/// Checks the other side's hello against ours; the error is the reason given in `Refuse`.
pub fn check_hello(mine: &Hello, theirs: &Hello) -> Result<(), String> {
    if link_version(mine.version, theirs.version).is_none() {
        return Err(format!(
            "peer protocol version {} cannot link with this node's {}: nodes interoperate only \
             one version apart (upgrade one release at a time)",
            theirs.version, mine.version
        ));
    }
    if theirs.cluster != mine.cluster {
        return Err(format!(
            "node of cluster {:?} is not a member of cluster {:?} (cluster.name)",
            theirs.cluster, mine.cluster
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
    fn proofs_bind_secret_role_and_both_hellos() {
        let (d, a) = (b"dialer hello".as_slice(), b"acceptor hello".as_slice());
        let secret = b"0123456789abcdef";
        let proof = prove(secret, Role::Acceptor, d, a);
        assert!(verify(secret, Role::Acceptor, d, a, &proof));
        assert!(
            !verify(b"0123456789abcdeX", Role::Acceptor, d, a, &proof),
            "other secret"
        );
        assert!(!verify(secret, Role::Dialer, d, a, &proof), "other role");
        assert!(
            !verify(secret, Role::Acceptor, a, d, &proof),
            "hellos swapped"
        );
        assert!(
            !verify(secret, Role::Acceptor, d, b"acceptor hellO", &proof),
            "other nonce"
        );
        assert!(
            !verify(secret, Role::Acceptor, d, a, &proof[..31]),
            "truncated"
        );
        assert!(!verify(secret, Role::Acceptor, d, a, &[]), "empty");
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
