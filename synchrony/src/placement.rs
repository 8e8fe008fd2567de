//! Which node owns a document: the one decision every entry point (WebSocket sessions, the REST
//! document API) asks for.
//!
//! A single node owns everything. In a cluster the owner is chosen by rendezvous (highest
//! random weight) hashing of the document id over the live members: each member scores
//! `SHA-256(member id ‖ 0 ‖ document id)` and the highest score owns it. Every node computes the
//! same owner from the same live set, with no coordination; when a member joins or leaves, only
//! the documents it wins or held move (about 1/N of them). SHA-256 rather than a faster hash
//! because the score must be the same on every node and every version of the engine forever.

use sha2::{Digest, Sha256};
use synchrony_protocol::DocId;

/// The owner of a document, as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node runs the document.
    Local,
    /// Another node does; its clients here are relayed to it.
    Remote { node: String },
}

pub trait Placement: Send + Sync {
    fn owner(&self, doc: &DocId) -> Owner;
}

/// The single-node placement: always this node.
#[derive(Debug, Default)]
pub struct SingleNode;

impl Placement for SingleNode {
    fn owner(&self, _doc: &DocId) -> Owner {
        Owner::Local
    }
}

fn score(member: &str, doc: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(member.as_bytes());
    hash.update([0]);
    hash.update(doc.as_bytes());
    hash.finalize().into()
}

/// The member of `live` that owns `doc` (None only for an empty set).
pub fn rendezvous<'a>(live: &'a [String], doc: &str) -> Option<&'a str> {
    live.iter()
        .map(|m| (score(m, doc), m))
        .max()
        .map(|(_, m)| m.as_str())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn the_score_is_fixed_forever() {
        // Nodes of different versions must agree: this value may never change.
        assert_eq!(
            hex::encode(&score("node-0", "page-1")[..8]),
            "1831067e4a7dfb21"
        );
        assert_eq!(rendezvous(&[], "d"), None);
        assert_eq!(rendezvous(&nodes(1), "d"), Some("node-0"));
    }

    #[test]
    fn spreads_evenly_and_moves_little() {
        let three = nodes(3);
        let four = nodes(4);
        let docs: Vec<String> = (0..3000).map(|i| format!("doc-{i}")).collect();
        let mut counts = [0usize; 3];
        let mut moved = 0;
        for doc in &docs {
            let before = rendezvous(&three, doc).unwrap();
            counts[three.iter().position(|m| m == before).unwrap()] += 1;
            let after = rendezvous(&four, doc).unwrap();
            if before != after {
                // Only to the newcomer, never between old members.
                assert_eq!(after, "node-3");
                moved += 1;
            }
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven: {counts:?}");
        }
        assert!((600..900).contains(&moved), "moved {moved} of 3000");
        // The order of the live list does not matter.
        let mut shuffled = three.clone();
        shuffled.reverse();
        for doc in &docs[..100] {
            assert_eq!(rendezvous(&three, doc), rendezvous(&shuffled, doc));
        }
    }
}
