//! One WebSocket binary frame ↔ one y-sync message.
//!
//! `y-websocket` reads exactly one message per frame, so the engine sends one per frame and
//! expects the same from clients: bytes after the first message are a protocol error rather
//! than something to guess about.

use yrs::encoding::read::{Cursor, Error as ReadError, Read};
use yrs::sync::protocol::{MSG_AUTH, MSG_AWARENESS, MSG_QUERY_AWARENESS, MSG_SYNC};
use yrs::sync::Message;
use yrs::updates::decoder::{Decode, Decoder, DecoderV1};
use yrs::updates::encoder::Encode;

use crate::close::CloseCode;

/// Why a frame could not be turned into a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unknown message type {0}")]
    UnknownType(u64),
    #[error("malformed message: {0}")]
    Malformed(#[from] ReadError),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

impl FrameError {
    /// The close code a server answers this error with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::UnknownType(_) => CloseCode::UNSUPPORTED_DATA,
            FrameError::Empty | FrameError::Malformed(_) | FrameError::TrailingBytes(_) => {
                CloseCode::PROTOCOL_ERROR
            }
        }
    }
}

/// Decodes a frame sent by a client: only the four y-protocols message types are accepted.
pub fn decode_frame(frame: &[u8]) -> Result<Message, FrameError> {
    let mut cursor = Cursor::new(frame);
    let tag: u64 = cursor.read_var().map_err(|_| FrameError::Empty)?;
    match u8::try_from(tag) {
        Ok(MSG_SYNC | MSG_AWARENESS | MSG_AUTH | MSG_QUERY_AWARENESS) => decode_frame_any(frame),
        _ => Err(FrameError::UnknownType(tag)),
    }
}

/// Decodes any frame, extension types included (as `Message::Custom`). Used by clients and tests.
pub fn decode_frame_any(frame: &[u8]) -> Result<Message, FrameError> {
    if frame.is_empty() {
        return Err(FrameError::Empty);
    }
    check_counts(frame)?;
    let mut decoder = DecoderV1::from(frame);
    let message = Message::decode(&mut decoder)?;
    let rest = decoder.read_to_end().map(|r| r.len()).unwrap_or(0);
    if rest != 0 {
        return Err(FrameError::TrailingBytes(rest));
    }
    Ok(message)
}

/// Refuses a state vector or an awareness update whose entry count cannot fit in its payload:
/// yrs reserves memory for the count before reading the entries, so a ten-byte frame claiming
/// 2^31 of them asked for tens of gigabytes.
fn check_counts(frame: &[u8]) -> Result<(), FrameError> {
    use crate::nesting::check_count;
    let malformed = |_| FrameError::Malformed(ReadError::UnexpectedValue);
    // Every number is read with the width yrs reads it with: an overlong varint must mean
    // the same thing here as there.
    let mut cursor = Cursor::new(frame);
    let (body, min_bytes, count_is_u32) = match cursor.read_var::<u8>()? {
        // Sync step 1: its state vector; entries are a client and a clock.
        MSG_SYNC => match cursor.read_var::<u8>()? {
            0 => (cursor.read_buf()?, 2, true),
            _ => return Ok(()),
        },
        // Awareness: entries are a client, a clock and a JSON string.
        MSG_AWARENESS => (cursor.read_buf()?, 3, false),
        _ => return Ok(()),
    };
    let mut inner = Cursor::new(body);
    let count: u64 = if count_is_u32 {
        inner.read_var::<u32>()?.into()
    } else {
        inner.read_var::<usize>()? as u64
    };
    let left = body.len() - inner.next;
    check_count(count, left, min_bytes).map_err(malformed)
}

/// Encodes one message as one frame.
pub fn encode_message(message: &Message) -> Vec<u8> {
    message.encode_v1()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use yrs::sync::SyncMessage;
    use yrs::StateVector;

    #[test]
    fn rejects_empty_unknown_and_trailing() {
        assert!(matches!(decode_frame(&[]), Err(FrameError::Empty)));
        assert!(matches!(
            decode_frame(&[7, 0]),
            Err(FrameError::UnknownType(7))
        ));
        assert!(matches!(
            decode_frame(&[100, 1, 1]),
            Err(FrameError::UnknownType(100))
        ));
        // Sync step 1 with an empty state vector, then a stray byte.
        assert!(matches!(
            decode_frame(&[0, 0, 1, 0, 9]),
            Err(FrameError::TrailingBytes(1))
        ));
        // Length prefix larger than the frame.
        assert!(matches!(
            decode_frame(&[0, 2, 50, 1]),
            Err(FrameError::Malformed(_))
        ));
        // Unknown sync sub-type.
        assert!(matches!(
            decode_frame(&[0, 9, 0]),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(
            decode_frame(&[7]).unwrap_err().close_code(),
            CloseCode::UNSUPPORTED_DATA
        );
        assert_eq!(
            decode_frame(&[0, 9]).unwrap_err().close_code(),
            CloseCode::PROTOCOL_ERROR
        );
    }

    #[test]
    fn counts_that_cannot_fit_their_payload_are_refused_before_yrs_reserves_for_them() {
        // Sync step 1 whose state vector claims 2^31 entries in 5 bytes.
        let step1 = [0, 0, 5, 0x80, 0x80, 0x80, 0x80, 0x08];
        assert!(matches!(
            decode_frame(&step1),
            Err(FrameError::Malformed(_))
        ));
        // Awareness claiming 1,000 clients in 3 bytes.
        let awareness = [1, 3, 0xe8, 0x07, 0];
        assert!(matches!(
            decode_frame(&awareness),
            Err(FrameError::Malformed(_))
        ));
        // An honest state vector of two clients passes.
        let mut sv = StateVector::default();
        sv.set_max(yrs::block::ClientID::new(1), 5);
        sv.set_max(yrs::block::ClientID::new(300), 70_000);
        let m = Message::Sync(SyncMessage::SyncStep1(sv));
        assert_eq!(decode_frame(&encode_message(&m)).ok(), Some(m));
    }

    #[test]
    fn round_trip() {
        let messages = [
            Message::Sync(SyncMessage::SyncStep1(StateVector::default())),
            Message::Sync(SyncMessage::SyncStep2(vec![0, 0])),
            Message::Sync(SyncMessage::Update(vec![1, 2, 3])),
            Message::AwarenessQuery,
            Message::Auth(Some("no".into())),
        ];
        for m in messages {
            assert_eq!(decode_frame(&encode_message(&m)).ok(), Some(m));
        }
    }
}
