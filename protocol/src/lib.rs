//! Wire formats of the synchrony engine. No I/O happens here.
//!
//! # Layout
//!
//! - [`frame`]: one WebSocket binary frame ↔ one y-sync [`Message`] (reusing `yrs::sync`), with
//!   strict checks (unknown message types and trailing bytes are errors, not silently skipped).
//! - [`ext`]: our extension messages. They are sent only to clients that asked for them, so a
//!   stock `y-websocket` client never sees an unknown message type.
//! - [`close`]: WebSocket close codes and which of them a client may retry.
//! - [`doc_id`]: document id validation, applied before an id reaches storage or logs.
//! - [`nesting`]: how deeply updates and JSON nest, measured without recursion, so that input
//!   that would overflow a stack in yrs is refused first.
//! - [`peer`]: the messages cluster nodes exchange on the peer port.

pub mod close;
pub mod doc_id;
pub mod ext;
pub mod frame;
pub mod nesting;
pub mod peer;

pub use close::CloseCode;
pub use doc_id::{DocId, DocIdError};
pub use frame::{decode_frame, encode_message, FrameError};
pub use yrs::sync::{Awareness, AwarenessUpdate, Message, SyncMessage};
