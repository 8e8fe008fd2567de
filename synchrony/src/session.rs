//! One WebSocket connection: frames in → decoded messages to the document actor; queued frames
//! out → the socket. Protocol errors close only this connection, with a close code and reason.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use synchrony_protocol::{decode_frame, CloseCode, DocId};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use crate::auth::{Access, Principal};
use crate::doc::{DocCommand, DocLink, JoinError, JoinRequest, Outbound};
use crate::upgrade::Socket as WebSocket;
use crate::Engine;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// How long a closing session waits for the client's close reply.
/// Short, so that a host's death still ends the engine within 2 s.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a joiner waits for its document (loading it from storage included) before it is
/// closed with 1013 and retries.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(15);

/// Frames already queued for a client are written together, up to about this many bytes.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// A message larger than this goes out in fragments of this size, each a slice of the one
/// buffer every recipient shares. Written whole, tungstenite would copy it into the
/// connection's write buffer and keep that capacity for as long as the connection lives.
const FRAGMENT_BYTES: usize = 64 * 1024;

/// Options a client chose in the query string.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct SessionParams {
    /// `ack=persisted`: send "persisted through N" extension messages.
    pub ack: Option<String>,
}

impl SessionParams {
    pub fn wants_persisted_ack(&self) -> bool {
        self.ack.as_deref() == Some("persisted")
    }
}

/// Counts open sessions for health and metrics.
pub struct SessionGuard(Arc<AtomicU64>);

impl SessionGuard {
    /// Counts a session, unless `max` are open already.
    pub fn try_new(counter: Arc<AtomicU64>, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max as u64).then_some(n + 1)
            })
            .ok()?;
        Some(Self(counter))
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection id, unique in this process.
pub fn next_conn_id() -> u64 {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

/// The close code a refused join answers with.
pub fn join_error_code(error: &JoinError) -> CloseCode {
    match error {
        JoinError::ShuttingDown => CloseCode::SERVICE_RESTART,
        JoinError::Busy
        | JoinError::StorageUnavailable
        | JoinError::LoadUnavailable
        | JoinError::Timeout
        | JoinError::NotJoined => CloseCode::TRY_AGAIN_LATER,
        JoinError::LoadFailed => CloseCode::INTERNAL_ERROR,
    }
}

fn close_frame(code: CloseCode, reason: impl Into<String>) -> WsMessage {
    let reason: String = reason.into();
    WsMessage::Close(Some(CloseFrame {
        code: code.0.into(),
        reason: reason.into(),
    }))
}

/// Feeds one binary message to the sink, fragmented when it is large (see [`FRAGMENT_BYTES`]).
async fn feed_binary(
    sink: &mut SplitSink<WebSocket, WsMessage>,
    data: Bytes,
) -> Result<(), WsError> {
    if data.len() <= FRAGMENT_BYTES {
        return sink.feed(WsMessage::Binary(data)).await;
    }
    let mut start = 0;
    while start < data.len() {
        let end = (start + FRAGMENT_BYTES).min(data.len());
        let opcode = if start == 0 {
            Data::Binary
        } else {
            Data::Continue
        };
        let fragment = Frame::message(
            data.slice(start..end),
            OpCode::Data(opcode),
            end == data.len(),
        );
        sink.feed(WsMessage::Frame(fragment)).await?;
        start = end;
    }
    Ok(())
}

#[tracing::instrument(name = "session", skip_all, fields(doc_id = %doc, conn_id))]
pub async fn run(
    engine: Arc<Engine>,
    socket: WebSocket,
    doc: DocId,
    params: SessionParams,
    principal: Principal,
    access: Access,
    _guard: SessionGuard,
) {
    let conn_id = next_conn_id();
    tracing::Span::current().record("conn_id", conn_id);
    let (mut sink, mut stream) = socket.split();
    let timing = &engine.config.timing;
    let write_timeout = timing.write_timeout();

    let (out, mut out_rx, state) = Outbound::new(&engine.config.limits);
    let request = JoinRequest {
        conn_id,
        out,
        wants_persisted_ack: params.wants_persisted_ack(),
        read_only: access == Access::Read,
        session: principal.session.clone(),
        broadcast_to: None,
        handover: false,
    };
    let joined = timeout(JOIN_DEADLINE, engine.join(&doc, request))
        .await
        .unwrap_or(Err(JoinError::Timeout));
    let link = match joined {
        Ok(link) => link,
        Err(e) => {
            let code = join_error_code(&e);
            let _ = timeout(write_timeout, sink.send(close_frame(code, e.to_string()))).await;
            return;
        }
    };

    let cancel = engine.cancel.clone();
    let mut ping = tokio::time::interval(timing.ping_interval());
    ping.tick().await;
    let mut last_seen = Instant::now();
    // The token's expiry ends the session (4401: the client fetches a new token).
    let expires = principal.expires_at.map(|exp| {
        let left = exp.saturating_sub(crate::gate::unix_now());
        Instant::now().checked_add(Duration::from_secs(left))
    });
    let expires = expires.flatten();
    // The futures that outlive one turn of the loop are made once, not on every frame: under load
    // a session turns once per message, and re-registering these showed in profiles.
    let shutdown = cancel.cancelled();
    tokio::pin!(shutdown);
    let notified = state.notify.notified();
    tokio::pin!(notified);
    // Never fires when the token has no expiry (the branch is disabled).
    let expiry = tokio::time::sleep_until(expires.unwrap_or_else(Instant::now));
    tokio::pin!(expiry);
    // Commands the document's full mailbox could not take yet. While any wait, the socket is
    // not read (the client is slowed down) but pings, token expiry and shutdown go on.
    let mut pending: VecDeque<DocCommand> = VecDeque::new();
    let close: Option<(CloseCode, String)> = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break Some((CloseCode::SERVICE_RESTART, "server shutting down".into())),
            _ = &mut notified => {
                // `notify_one` keeps a permit, so nothing signalled before this re-arm is lost.
                notified.set(state.notify.notified());
                if let Some(close) = state.take_close() {
                    break Some(close);
                }
                if state.take_lagged() {
                    engine.metrics.lagged.inc();
                    // Drop the stale queue; the resync brings the full state instead.
                    state.discard_queued(&mut out_rx);
                    // One resync waiting is enough: it brings the whole state.
                    let waiting = pending.iter().any(|c| matches!(c, DocCommand::Resync { .. }));
                    if !waiting && !forward(&link, &mut pending, DocCommand::Resync { conn_id }) {
                        break Some((CloseCode::SERVICE_RESTART, "document closed".into()));
                    }
                }
            }
            permit = link.reserve(), if !pending.is_empty() => {
                let (Some(permit), Some(command)) = (permit, pending.pop_front()) else {
                    break Some((CloseCode::SERVICE_RESTART, "document closed".into()));
                };
                permit.send(command);
            }
            frame = out_rx.recv() => {
                let Some(frame) = frame else {
                    break Some(state.take_close().unwrap_or((CloseCode::SERVICE_RESTART, "document closed".into())));
                };
                state.taken(frame.len());
                // Whatever else is already queued goes out with it: one write for a backlog
                // instead of one per frame (sends dominate the engine's CPU under load).
                let batch = async {
                    let (mut frames, mut bytes) = (1, frame.len());
                    feed_binary(&mut sink, frame).await?;
                    while bytes < WRITE_BATCH_BYTES {
                        let Some(next) = state.try_take(&mut out_rx) else { break };
                        frames += 1;
                        bytes += next.len();
                        feed_binary(&mut sink, next).await?;
                    }
                    sink.flush().await.map(|()| (frames, bytes))
                };
                match timeout(write_timeout, batch).await {
                    Ok(Ok((frames, bytes))) => {
                        engine.metrics.frames_sent.inc_by(frames);
                        engine.metrics.bytes_sent.inc_by(bytes as u64);
                    }
                    Ok(Err(_)) => break None,
                    Err(_) => {
                        tracing::info!("client accepts no data; dropping the connection");
                        break None;
                    }
                }
            }
            incoming = stream.next(), if pending.is_empty() => {
                last_seen = Instant::now();
                match incoming {
                    Some(Ok(WsMessage::Binary(data))) => match handle_frame(&data) {
                        Ok(message) => {
                            if let synchrony_protocol::Message::Sync(
                                synchrony_protocol::SyncMessage::SyncStep2(update)
                                | synchrony_protocol::SyncMessage::Update(update),
                            ) = &message
                            {
                                engine.metrics.updates_received.inc();
                                engine.metrics.update_bytes_received.inc_by(update.len() as u64);
                            }
                            let command = DocCommand::Message { conn_id, message, received: std::time::Instant::now() };
                            if !forward(&link, &mut pending, command) {
                                break Some((CloseCode::SERVICE_RESTART, "document closed".into()));
                            }
                        }
                        Err((code, reason)) => {
                            tracing::warn!(code = code.0, %reason, "bad frame; closing the connection");
                            break Some((code, reason));
                        }
                    },
                    Some(Ok(WsMessage::Text(_))) => {
                        tracing::warn!("text frame; closing the connection");
                        break Some((CloseCode::UNSUPPORTED_DATA, "text frames are not part of the protocol".into()));
                    }
                    // Fragments arrive reassembled; raw frames are never read.
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                    Some(Ok(WsMessage::Close(_))) | None => break None,
                    Some(Err(WsError::Capacity(error))) => {
                        tracing::warn!(%error, "frame over the size limit; closing the connection");
                        break Some((CloseCode::TOO_LARGE, "frame too large".into()));
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%error, "socket error");
                        break None;
                    }
                }
            }
            _ = &mut expiry, if expires.is_some() => {
                break Some((CloseCode::UNAUTHENTICATED, "token expired".into()));
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > timing.idle_timeout() {
                    break Some((CloseCode::GOING_AWAY, "idle timeout".into()));
                }
                if timeout(write_timeout, sink.send(WsMessage::Ping(Bytes::new()))).await.map_or(true, |r| r.is_err()) {
                    break None;
                }
            }
        }
    };
    // The leave may wait for room in the mailbox; the closing handshake does not wait for it.
    tokio::spawn(async move {
        let _ = link.send(DocCommand::Leave { conn_id }).await;
    });
    if let Some((code, reason)) = close {
        tracing::debug!(code = code.0, %reason, "closing the connection");
        engine
            .metrics
            .closes
            .get_or_create(&crate::metrics::CodeLabel { code: code.0 })
            .inc();
        close_with_handshake(&mut sink, &mut stream, code, reason, write_timeout).await;
    }
}

/// Accepts a socket only to close it with `code`: how clients that cannot read an HTTP status
/// (browsers) learn why they were refused.
pub async fn refuse(engine: Arc<Engine>, socket: WebSocket, code: CloseCode, reason: &str) {
    let (mut sink, mut stream) = socket.split();
    let write_timeout = engine.config.timing.write_timeout();
    close_with_handshake(
        &mut sink,
        &mut stream,
        code,
        reason.to_owned(),
        write_timeout,
    )
    .await;
}

/// Sends a close frame, then completes the closing handshake: dropping the socket with unread
/// data would reset the connection, and a client reading late would lose the close code with it.
async fn close_with_handshake(
    sink: &mut SplitSink<WebSocket, WsMessage>,
    stream: &mut SplitStream<WebSocket>,
    code: CloseCode,
    reason: String,
    write_timeout: Duration,
) {
    if timeout(write_timeout, sink.send(close_frame(code, reason)))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        let _ = timeout(CLOSE_HANDSHAKE_TIMEOUT, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, WsMessage::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Hands a command to the document, or keeps it in `pending` when the mailbox is full; false
/// when the document is gone.
fn forward(link: &DocLink, pending: &mut VecDeque<DocCommand>, command: DocCommand) -> bool {
    if !pending.is_empty() {
        pending.push_back(command);
        return true;
    }
    match link.try_send(command) {
        Ok(()) => true,
        Err(Some(command)) => {
            pending.push_back(command);
            true
        }
        Err(None) => false,
    }
}

fn handle_frame(data: &[u8]) -> Result<synchrony_protocol::Message, (CloseCode, String)> {
    // yrs decoders are written to fail with errors, but a client must never be able to take the
    // process down: contain anything that slips through.
    match std::panic::catch_unwind(|| decode_frame(data)) {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(e)) => Err((e.close_code(), e.to_string())),
        Err(_) => Err((CloseCode::PROTOCOL_ERROR, "undecodable frame".into())),
    }
}
