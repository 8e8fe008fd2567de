//! Which node owns a document. A single node owns everything; the cluster replaces this with
//! rendezvous hashing over live members, and sessions of non-owners relay to the owner.

use synchrony_protocol::DocId;

/// The owner of a document, as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node runs the document.
    Local,
    /// Another node does; its clients here must be relayed to it.
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
