//! The sealed peer channel: after the handshake, every byte on a link is encrypted and
//! authenticated.
//!
//! # Why Noise
//!
//! The channel is the Noise protocol framework's `NNpsk0` pattern (X25519, ChaCha20-Poly1305,
//! SHA-256) as implemented by the `snow` crate, keyed by the cluster secret as the pre-shared
//! key. Noise fits a cluster whose only credential is a shared secret: TLS 1.3 would need a
//! certificate per node (or its PSK mode, which rustls does not offer), so operators would have
//! a PKI to run; Noise with a PSK keeps `cluster.authentication.secret` the one thing to
//! configure. What the pattern gives, with nothing hand-rolled:
//!
//! - **Only secret holders link.** The dialer's first message is authenticated under a key
//!   derived from the PSK; the acceptor's answer mixes both sides' fresh ephemeral keys, so
//!   neither an old handshake nor one made for another link completes.
//! - **Keys bound to the handshake.** The prologue is both [`Hello`]s exactly as they were sent
//!   (node ids, cluster name, versions, nonces): a relay that alters one breaks the handshake.
//!   Each direction has its own key, and every message carries an implicit counter, so nothing
//!   can be injected, replayed, reordered, dropped unnoticed or spliced from another link: the
//!   next message simply fails to authenticate and the link is dropped.
//! - **Forward secrecy.** The traffic keys come from ephemeral X25519 keys: a secret leaked
//!   later does not open a recorded capture.
//!
//! [`Hello`]: synchrony_protocol::peer::Hello
//!
//! # Framing
//!
//! A Noise message holds at most 65,535 bytes, and a peer message can be a whole document, so
//! messages travel in *chunks*: each sealed frame's plaintext is one header byte (the lane in
//! the low bits, [`LAST`] on a message's final chunk) and up to [`MAX_CHUNK`] bytes. Lane 0
//! carries membership (heartbeats, leaving), the others carry streams and forwarded requests
//! by their ids; the writer ([`Outbox`]) sends lane 0 first and takes one chunk from each busy
//! lane in turn, so a heartbeat never waits behind a document and one page's 64 MiB state does
//! not hold up another page's keystrokes. Messages of one stream always share a lane, so they
//! arrive in order.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use snow::{HandshakeState, StatelessTransportState};

/// The Noise protocol name: pattern, DH, cipher, hash.
pub const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_SHA256";
/// The longest Noise message (and so the longest sealed frame).
pub const MAX_FRAME: usize = 65_535;
const TAG: usize = 16;
/// The most message bytes one sealed frame carries.
pub const MAX_CHUNK: usize = MAX_FRAME - TAG - 1;
/// Lanes a link interleaves.
pub const LANES: usize = 8;
/// Header bit of a message's final chunk.
pub const LAST: u8 = 0x80;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The frame was not sealed by the other end of this link as its next message: altered,
    /// injected, replayed, reordered, or from another link.
    #[error(
        "a message failed authentication (altered, injected, replayed or reordered on the way)"
    )]
    Authentication,
    #[error("malformed sealed frame: {0}")]
    Malformed(&'static str),
    #[error("a message of over {0} bytes")]
    TooLarge(usize),
    #[error("the channel's message counter is exhausted")]
    Exhausted,
}

/// The pre-shared key: the cluster secret hashed to Noise's 32 bytes under a label of ours.
fn psk(secret: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"synchrony cluster psk v2\0");
    hash.update(secret);
    hash.finalize().into()
}

/// Both hellos as sent, length-prefixed: the handshake's prologue.
fn prologue(dialer_hello: &[u8], acceptor_hello: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(32 + dialer_hello.len() + acceptor_hello.len());
    p.extend_from_slice(b"synchrony-peer/2");
    for part in [dialer_hello, acceptor_hello] {
        p.extend_from_slice(&(part.len() as u64).to_be_bytes());
        p.extend_from_slice(part);
    }
    p
}

/// A handshake in progress, for the side that dialed (`initiator`) or accepted.
pub fn handshake(
    secret: &[u8],
    dialer_hello: &[u8],
    acceptor_hello: &[u8],
    initiator: bool,
) -> Result<HandshakeState, snow::Error> {
    let params = NOISE.parse()?;
    let key = psk(secret);
    let prologue = prologue(dialer_hello, acceptor_hello);
    let builder = snow::Builder::new(params)
        .psk(0, &key)?
        .prologue(&prologue)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
}

/// A finished handshake's keys, split into the two directions.
pub fn split(state: HandshakeState) -> Result<(Sealer, Opener), snow::Error> {
    let keys = Arc::new(state.into_stateless_transport_mode()?);
    Ok((
        Sealer {
            keys: keys.clone(),
            nonce: 0,
        },
        Opener {
            keys,
            nonce: 0,
            lanes: vec![Vec::new(); LANES],
            pending: 0,
            max_message: usize::MAX,
            plain: vec![0; MAX_FRAME],
        },
    ))
}

/// Seals this side's frames, in order.
pub struct Sealer {
    keys: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    /// One sealed frame carrying `chunk` (at most [`MAX_CHUNK`] bytes) on `lane`.
    pub fn seal(&mut self, lane: u8, last: bool, chunk: &[u8]) -> Result<Bytes, SealError> {
        if chunk.len() > MAX_CHUNK || usize::from(lane) >= LANES {
            return Err(SealError::Malformed("chunk too large or bad lane"));
        }
        if self.nonce == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let mut plain = Vec::with_capacity(chunk.len() + 1);
        plain.push(lane | if last { LAST } else { 0 });
        plain.extend_from_slice(chunk);
        let mut sealed = vec![0; plain.len() + TAG];
        let n = self
            .keys
            .write_message(self.nonce, &plain, &mut sealed)
            .map_err(|_| SealError::Malformed("cannot seal"))?;
        sealed.truncate(n);
        self.nonce += 1;
        Ok(Bytes::from(sealed))
    }
}

/// Opens the other side's frames, in order, and puts messages back together.
pub struct Opener {
    keys: Arc<StatelessTransportState>,
    nonce: u64,
    lanes: Vec<Vec<u8>>,
    /// Bytes held in unfinished messages, over all lanes.
    pending: usize,
    max_message: usize,
    plain: Vec<u8>,
}

impl Opener {
    /// Messages longer than `max` bytes are refused (and so are unfinished ones that together
    /// hold more than twice that).
    pub fn with_max_message(mut self, max: usize) -> Self {
        self.max_message = max;
        self
    }

    /// Opens the next frame: a whole message when it was the message's last chunk.
    pub fn open(&mut self, frame: &[u8]) -> Result<Option<Vec<u8>>, SealError> {
        if frame.len() > MAX_FRAME || frame.len() <= TAG {
            return Err(SealError::Malformed("bad frame length"));
        }
        if self.nonce == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let n = self
            .keys
            .read_message(self.nonce, frame, &mut self.plain)
            .map_err(|_| SealError::Authentication)?;
        self.nonce += 1;
        let (&header, chunk) = self.plain[..n]
            .split_first()
            .ok_or(SealError::Malformed("empty chunk"))?;
        let lane = usize::from(header & !LAST);
        let buffer = self
            .lanes
            .get_mut(lane)
            .ok_or(SealError::Malformed("bad lane"))?;
        if buffer.len() + chunk.len() > self.max_message {
            return Err(SealError::TooLarge(self.max_message));
        }
        self.pending += chunk.len();
        if self.pending > self.max_message.saturating_mul(2) {
            return Err(SealError::TooLarge(self.max_message));
        }
        if header & LAST == 0 {
            buffer.extend_from_slice(chunk);
            return Ok(None);
        }
        let mut message = std::mem::take(buffer);
        message.extend_from_slice(chunk);
        self.pending -= message.len();
        Ok(Some(message))
    }
}

/// What a link's writer has to send: whole messages queued per lane, taken out a chunk at a
/// time. `T` rides along with each message until its last chunk is taken (the link's byte
/// budget permit, released once the message is written).
pub struct Outbox<T> {
    lanes: Vec<VecDeque<(Bytes, T)>>,
    /// The data lane whose turn is next.
    turn: usize,
    bytes: usize,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Self {
            lanes: (0..LANES).map(|_| VecDeque::new()).collect(),
            turn: 1,
            bytes: 0,
        }
    }
}

/// One chunk to seal: its lane, whether it ends its message, its bytes, and the message's
/// companion once the message is done.
pub struct Chunk<T> {
    pub lane: u8,
    pub last: bool,
    pub bytes: Bytes,
    pub done: Option<T>,
}

impl<T> Outbox<T> {
    pub fn push(&mut self, lane: u8, message: Bytes, with: T) {
        let lane = usize::from(lane) % LANES;
        self.bytes += message.len();
        self.lanes[lane].push_back((message, with));
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// Bytes queued and not yet taken.
    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// The next chunk: lane 0 first, then one chunk from each busy lane in turn.
    pub fn next_chunk(&mut self) -> Option<Chunk<T>> {
        let lane = if self.lanes[0].is_empty() {
            let busy = (0..LANES - 1)
                .map(|i| 1 + (self.turn - 1 + i) % (LANES - 1))
                .find(|&l| !self.lanes[l].is_empty())?;
            self.turn = 1 + busy % (LANES - 1);
            busy
        } else {
            0
        };
        let queue = &mut self.lanes[lane];
        let (message, _) = queue.front_mut()?;
        let take = message.len().min(MAX_CHUNK);
        let bytes = message.split_to(take);
        self.bytes -= take;
        let last = message.is_empty();
        let done = if last {
            queue.pop_front().map(|(_, with)| with)
        } else {
            None
        };
        Some(Chunk {
            lane: lane as u8,
            last,
            bytes,
            done,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// One side's two ends of the channel.
    type Ends = (Sealer, Opener);

    fn pair(secret: &[u8], other_secret: &[u8]) -> Result<(Ends, Ends), String> {
        let (d, a) = (b"dialer hello".as_slice(), b"acceptor hello".as_slice());
        let mut dialer = handshake(secret, d, a, true).unwrap();
        let mut acceptor = handshake(other_secret, d, a, false).unwrap();
        let mut buf = vec![0; MAX_FRAME];
        let mut payload = vec![0; MAX_FRAME];
        let n = dialer.write_message(b"store-1", &mut buf).unwrap();
        let m = acceptor
            .read_message(&buf[..n], &mut payload)
            .map_err(|e| e.to_string())?;
        assert_eq!(&payload[..m], b"store-1");
        let n = acceptor.write_message(b"store-2", &mut buf).unwrap();
        let m = dialer
            .read_message(&buf[..n], &mut payload)
            .map_err(|e| e.to_string())?;
        assert_eq!(&payload[..m], b"store-2");
        Ok((split(dialer).unwrap(), split(acceptor).unwrap()))
    }

    #[test]
    fn a_different_secret_fails_the_handshake() {
        assert!(pair(b"0123456789abcdef", b"0123456789abcdeX").is_err());
    }

    #[test]
    fn messages_cross_in_chunks_and_tampering_is_caught() {
        let ((mut d_seal, _), (_, mut a_open)) =
            pair(b"0123456789abcdef", b"0123456789abcdef").unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut outbox = Outbox::default();
        outbox.push(1, Bytes::from(big.clone()), ());
        let mut frames = Vec::new();
        while let Some(chunk) = outbox.next_chunk() {
            frames.push(d_seal.seal(chunk.lane, chunk.last, &chunk.bytes).unwrap());
        }
        assert_eq!(frames.len(), 4, "200,000 bytes in chunks of {MAX_CHUNK}");
        // The plaintext is nowhere in what crosses the wire.
        assert!(!frames
            .iter()
            .any(|f| f.windows(16).any(|w| w == &big[1000..1016])));
        let mut opened = None;
        for frame in &frames {
            if let Some(message) = a_open.open(frame).unwrap() {
                opened = Some(message);
            }
        }
        assert_eq!(opened.unwrap(), big);
        // A replayed frame, a flipped bit, a frame out of order: each fails.
        let next = d_seal.seal(2, true, b"next").unwrap();
        let after = d_seal.seal(2, true, b"after").unwrap();
        assert_eq!(a_open.open(&frames[0]), Err(SealError::Authentication));
        let mut flipped = next.to_vec();
        flipped[3] ^= 1;
        assert_eq!(a_open.open(&flipped), Err(SealError::Authentication));
        assert_eq!(a_open.open(&after), Err(SealError::Authentication));
        assert_eq!(a_open.open(&next).unwrap().unwrap(), b"next");
        assert_eq!(a_open.open(&after).unwrap().unwrap(), b"after");
    }

    #[test]
    fn frames_of_another_link_do_not_open() {
        let ((mut seal_1, _), _) = pair(b"0123456789abcdef", b"0123456789abcdef").unwrap();
        let (_, (_, mut open_2)) = pair(b"0123456789abcdef", b"0123456789abcdef").unwrap();
        let frame = seal_1.seal(1, true, b"hello").unwrap();
        assert_eq!(open_2.open(&frame), Err(SealError::Authentication));
    }

    #[test]
    fn oversized_messages_are_refused_before_they_are_held() {
        let ((mut seal, _), (_, open)) = pair(b"0123456789abcdef", b"0123456789abcdef").unwrap();
        let mut open = open.with_max_message(100_000);
        let chunk = vec![7; MAX_CHUNK];
        assert_eq!(open.open(&seal.seal(1, false, &chunk).unwrap()), Ok(None));
        assert_eq!(
            open.open(&seal.seal(1, false, &chunk).unwrap()),
            Err(SealError::TooLarge(100_000))
        );
    }

    #[test]
    fn the_outbox_sends_membership_first_and_interleaves_lanes() {
        let mut outbox = Outbox::default();
        outbox.push(1, Bytes::from(vec![1; 3 * MAX_CHUNK]), "big");
        outbox.push(2, Bytes::from_static(b"keystroke"), "small");
        let first = outbox.next_chunk().unwrap();
        assert_eq!((first.lane, first.last), (1, false));
        outbox.push(0, Bytes::from_static(b"heartbeat"), "beat");
        let order: Vec<(u8, bool, Option<&str>)> = std::iter::from_fn(|| outbox.next_chunk())
            .map(|c| (c.lane, c.last, c.done))
            .collect();
        assert_eq!(
            order,
            vec![
                (0, true, Some("beat")),
                (2, true, Some("small")),
                (1, false, None),
                (1, true, Some("big")),
            ]
        );
        assert!(outbox.is_empty());
        assert_eq!(outbox.queued_bytes(), 0);
    }
}
