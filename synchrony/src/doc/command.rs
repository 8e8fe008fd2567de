//! The vocabulary of a document's mailbox: joining ([`JoinRequest`], [`JoinError`]), the
//! commands ([`DocCommand`]) and what they answer ([`DocRead`], [`DocError`]).

use super::*;

/// A connection joining a document.
#[derive(Clone)]
pub struct JoinRequest {
    pub conn_id: u64,
    pub out: Outbound,
    /// The client asked for "persisted through N" acknowledgements.
    pub wants_persisted_ack: bool,
    /// The token grants read access only: updates are refused.
    pub read_only: bool,
    /// The token's `session` claim (name, avatar), shown to hosts as who is connected.
    pub session: Option<serde_json::Value>,
    /// Where broadcasts (others' updates and awareness) go, if not to `out`: a cluster route
    /// attached to a local actor has them pushed straight to its client, and keeps `out` for
    /// what is meant for this connection alone (the handshake, acknowledgements, resyncs).
    pub broadcast_to: Option<Outbound>,
    /// The previous owner handing the state over (a cluster hand-over), not a client: a
    /// maintenance lock does not refuse it.
    pub handover: bool,
}

pub enum DocCommand {
    Join {
        request: JoinRequest,
        reply: oneshot::Sender<Result<(), JoinError>>,
    },
    /// A decoded message from a connection, and when its frame arrived.
    Message {
        conn_id: u64,
        message: Message,
        received: std::time::Instant,
    },
    /// The connection's session emptied its queue after lagging: send it the full state.
    Resync {
        conn_id: u64,
    },
    /// Stop sending the connection broadcasts: another connection of its node carries them.
    Quiet {
        conn_id: u64,
    },
    Leave {
        conn_id: u64,
    },
    /// The document's state, for the REST API.
    Read {
        /// Also return the text of this root.
        text_root: Option<String>,
        /// As XML (a rich-text root) rather than plain text.
        xml: bool,
        reply: oneshot::Sender<DocRead>,
    },
    /// Applies an update from outside the editor; answered once it is durable.
    Apply {
        update: Vec<u8>,
        reply: oneshot::Sender<Result<(), DocError>>,
    },
    /// Replaces the content of a text or rich-text root in one transaction; answered once
    /// durable.
    ResetText {
        root: String,
        content: ResetContent,
        reply: oneshot::Sender<Result<(), DocError>>,
    },
    /// Makes the document hold what `state` (a named version's) holds, in one transaction that
    /// editors see as an ordinary change; answered once durable.
    Restore {
        /// The version's content, decoded off the document's task ([`decode_version`]).
        version: yrs::Doc,
        /// Its stored size.
        bytes: usize,
        reply: oneshot::Sender<Result<(), DocError>>,
    },
    /// Deletes the document and its history (with `versions`, its named versions too); its
    /// clients are closed with 4404 and `reason`.
    Delete {
        versions: bool,
        reason: &'static str,
        reply: oneshot::Sender<Result<(), DocError>>,
    },
}

/// A document's state as the REST API shows it.
#[derive(Debug, Clone)]
pub struct DocRead {
    /// The whole state as a Yjs v1 update.
    pub update: Vec<u8>,
    /// Each root type as JSON (texts as strings, maps as objects, arrays as arrays).
    pub json: serde_json::Value,
    /// The text (or XML) of the requested root, or why that root has none.
    pub text: Option<Result<String, String>>,
    /// The `session` claims of connected clients.
    pub sessions: Vec<serde_json::Value>,
}

/// What a reset writes.
#[derive(Debug, Clone)]
pub enum ResetContent {
    /// Into a text root.
    Text(String),
    /// Into a rich-text (`Y.XmlFragment`) root; `bytes` is the size of the XML it came from.
    Xml {
        nodes: Vec<crate::roots::XmlNode>,
        bytes: usize,
    },
}

/// Why a REST change was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DocError {
    #[error("invalid update: {0}")]
    InvalidUpdate(String),
    #[error("the document would pass the size limit")]
    TooLarge,
    #[error("storage failed")]
    Storage,
    /// A change meant for one type of root aimed at a root of another.
    #[error("{0}")]
    WrongRoot(String),
    /// A maintenance lock holds the document (`{ctx}/v1/hub-lock-state`).
    #[error("the document is locked for maintenance; edits are refused until the lock ends")]
    Locked,
}

/// The permission-denied reason a client's edit to a locked document gets (Synchrony's error
/// type, then words for people).
pub const LOCKED_REASON: &str = "hub.error/locked: the document is locked for maintenance";

#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    #[error("server busy (memory bound reached or document being deleted); try again")]
    Busy,
    /// What storage holds for the document cannot be read back (corrupt): retrying will not
    /// help until an operator looks.
    #[error("document could not be loaded")]
    LoadFailed,
    /// Storage did not answer the load (down, or slower than the deadline): try again.
    #[error("storage unavailable: the document could not be read; try again")]
    LoadUnavailable,
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("storage unavailable and the commit queue full; try again")]
    StorageUnavailable,
    #[error("the document did not answer in time; try again")]
    Timeout,
    #[error("the node has not joined its cluster yet; try again")]
    NotJoined,
}
