//! Extension messages: ours, beyond y-protocols.
//!
//! Each is framed like any y-sync message whose type yrs does not know:
//! `varUint(type) • varByteArray(body)`, so yrs decodes it as `Message::Custom(type, body)`.
//! The engine sends them only to connections that opted in.

use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;

/// "Everything you sent on this connection up to your `n`-th document update is durable."
///
/// Body: `varUint(n)`. `n` counts the connection's own update-bearing messages (sync step 2 and
/// update), starting at 1. A client that holds the ack for `n` can lose its connection, the
/// engine, or both, and those edits are still stored.
pub const MSG_PERSISTED: u8 = 100;

/// Encodes a persisted acknowledgement frame.
pub fn encode_persisted(through: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(10);
    body.write_var(through);
    let mut frame = Vec::with_capacity(body.len() + 2);
    frame.write_var(MSG_PERSISTED);
    frame.write_buf(&body);
    frame
}

/// Decodes the body of a [`MSG_PERSISTED`] message (as yrs hands it out in `Message::Custom`).
pub fn decode_persisted(body: &[u8]) -> Option<u64> {
    let mut cursor = Cursor::new(body);
    let n: u64 = cursor.read_var().ok()?;
    (cursor.next == body.len()).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frame_any;
    use yrs::sync::Message;

    #[test]
    fn persisted_round_trip() {
        for n in [0u64, 1, 127, 128, 300, u32::MAX as u64 + 5] {
            let frame = encode_persisted(n);
            match decode_frame_any(&frame) {
                Ok(Message::Custom(MSG_PERSISTED, body)) => {
                    assert_eq!(decode_persisted(&body), Some(n))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(encode_persisted(300), vec![100, 2, 0xac, 0x02]);
    }

    #[test]
    fn persisted_rejects_trailing() {
        assert_eq!(decode_persisted(&[1, 2]), None);
        assert_eq!(decode_persisted(&[]), None);
    }
}
