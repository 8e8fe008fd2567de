//! The server under test and one client connection to it, in each server's dialect: the engine
//! (`{base}/v1/ws/{doc}`), the reference y-websocket server (`{base}/{doc}`) and Hocuspocus (one
//! URL; every frame starts with the document name, and an auth message comes first).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use synchrony_protocol::frame::decode_frame_any;
use synchrony_protocol::{encode_message, Message, SyncMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::encoding::write::Write;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, StateVector, Transact, Update};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Sink = SplitSink<Socket, WsMessage>;
pub type Stream = SplitStream<Socket>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// This engine: `{url}/v1/ws/{doc}`, plus its REST API for checks.
    Synchrony,
    /// The reference server (`@y/websocket-server`): `{url}/{doc}`.
    YWebsocket,
    /// Hocuspocus: one URL, the document name first in every frame.
    Hocuspocus,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: Kind,
    /// `ws://127.0.0.1:8091/synchrony` for the engine, `ws://127.0.0.1:1234` for the others.
    pub base: String,
    pub token: Option<String>,
}

impl Target {
    pub fn new(kind: Kind, base: &str, token: Option<String>) -> Result<Self> {
        if !(base.starts_with("ws://127.") || base.starts_with("ws://[::1]")) {
            bail!("{base}: the load harness only targets loopback (ws://127.x.x.x or ws://[::1])");
        }
        Ok(Self {
            kind,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn url(&self, doc: &str) -> String {
        let mut url = match self.kind {
            Kind::Synchrony => format!("{}/v1/ws/{doc}", self.base),
            Kind::YWebsocket => format!("{}/{doc}", self.base),
            Kind::Hocuspocus => self.base.clone(),
        };
        if let (Some(token), Kind::Synchrony) = (&self.token, self.kind) {
            url.push_str("?token=");
            url.push_str(token);
        }
        url
    }

    /// The engine's HTTP base (`http://…/synchrony`), for REST checks.
    pub fn http_base(&self) -> Option<String> {
        (self.kind == Kind::Synchrony).then(|| self.base.replacen("ws://", "http://", 1))
    }

    /// Encodes one y-websocket message in this server's framing.
    pub fn frame(&self, doc: &str, message: &Message) -> Vec<u8> {
        let body = encode_message(message);
        match self.kind {
            Kind::Hocuspocus => {
                let mut out = Vec::with_capacity(doc.len() + 2 + body.len());
                out.write_string(doc);
                out.extend_from_slice(&body);
                out
            }
            _ => body,
        }
    }

    /// Decodes one frame from the server; None for messages the harness does not use.
    pub fn decode(&self, frame: &[u8]) -> Result<Option<Message>> {
        let body = match self.kind {
            Kind::Hocuspocus => skip_name(frame)?,
            _ => frame,
        };
        // Only sync messages matter to the harness; awareness, auth and the servers' own
        // extensions (Hocuspocus's authenticated and sync-status messages) are skipped.
        match body.first() {
            Some(0) => Ok(Some(decode_frame_any(body)?)),
            // Hocuspocus answers a step 1 with SyncReply (4): a sync message all the same.
            Some(4) if self.kind == Kind::Hocuspocus => {
                let mut copy = body.to_vec();
                copy[0] = 0;
                Ok(Some(decode_frame_any(&copy)?))
            }
            _ => Ok(None),
        }
    }
}

/// A synced connection to one document.
pub struct Conn {
    pub sink: Sink,
    pub stream: Stream,
    pub target: Target,
    pub doc: String,
    /// The document as the server sent it (when the caller keeps one).
    pub bytes_in: u64,
    /// The close code the server sent, once it closed the connection (0: a close frame without
    /// a code).
    pub close_code: Option<u16>,
}

/// Small socket buffers: the harness holds thousands of connections.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(256 << 20))
        .max_frame_size(Some(256 << 20))
}

impl Conn {
    /// Connects and completes the y-sync handshake. `local` is the client's document: its state
    /// goes to the server in step 1/2 and the server's state is applied to it; None means the
    /// client keeps no document (it only sends its state vector as empty and drops step 2).
    pub async fn join(
        target: &Target,
        doc: &str,
        local: Option<&yrs::Doc>,
        within: Duration,
    ) -> Result<Self> {
        let url = target.url(doc);
        let (ws, _) = tokio::time::timeout(
            within,
            tokio_tungstenite::connect_async_with_config(&url, Some(ws_config()), true),
        )
        .await
        .map_err(|_| anyhow!("connect to {url}: timed out after {within:?}"))?
        .with_context(|| format!("connect to {url}"))?;
        let (sink, stream) = ws.split();
        let mut conn = Conn {
            sink,
            stream,
            target: target.clone(),
            doc: doc.to_owned(),
            bytes_in: 0,
            close_code: None,
        };
        if target.kind == Kind::Hocuspocus {
            // Auth (2), token subtype (0), token; Hocuspocus holds everything else until then.
            let mut auth = Vec::new();
            auth.write_string(doc);
            auth.write_var(2u32);
            auth.write_var(0u32);
            auth.write_string(target.token.as_deref().unwrap_or(""));
            conn.send_raw(auth).await?;
        }
        let sv = local
            .map(|d| d.transact().state_vector())
            .unwrap_or_default();
        conn.send(&Message::Sync(SyncMessage::SyncStep1(sv)))
            .await?;
        tokio::time::timeout(within, conn.until_synced(local))
            .await
            .map_err(|_| anyhow!("{doc}: not synced within {within:?}"))??;
        Ok(conn)
    }

    async fn until_synced(&mut self, local: Option<&yrs::Doc>) -> Result<()> {
        loop {
            let Some(frame) = self.next_frame().await? else {
                bail!("{}: connection closed before sync", self.doc);
            };
            match self.target.decode(&frame)? {
                Some(Message::Sync(SyncMessage::SyncStep1(sv))) => {
                    let diff = match local {
                        Some(d) => d.transact().encode_state_as_update_v1(&sv),
                        None => yrs::Doc::new()
                            .transact()
                            .encode_state_as_update_v1(&StateVector::default()),
                    };
                    self.send(&Message::Sync(SyncMessage::SyncStep2(diff)))
                        .await?;
                }
                Some(Message::Sync(SyncMessage::SyncStep2(update))) => {
                    if let Some(d) = local {
                        apply(d, &update)?;
                    }
                    return Ok(());
                }
                Some(Message::Sync(SyncMessage::Update(update))) => {
                    if let Some(d) = local {
                        apply(d, &update)?;
                    }
                }
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, message: &Message) -> Result<()> {
        let frame = self.target.frame(&self.doc, message);
        self.send_raw(frame).await
    }

    pub async fn send_raw(&mut self, frame: Vec<u8>) -> Result<()> {
        self.sink
            .send(WsMessage::Binary(frame.into()))
            .await
            .with_context(|| format!("{}: send", self.doc))
    }

    /// The next binary frame; None when the connection closed.
    pub async fn next_frame(&mut self) -> Result<Option<Vec<u8>>> {
        while let Some(message) = self.stream.next().await {
            match message.with_context(|| format!("{}: receive", self.doc))? {
                WsMessage::Binary(b) => {
                    self.bytes_in += b.len() as u64;
                    return Ok(Some(b.to_vec()));
                }
                WsMessage::Close(frame) => {
                    self.close_code = Some(frame.map_or(0, |f| u16::from(f.code)));
                    return Ok(None);
                }
                _ => {}
            }
        }
        Ok(None)
    }

    pub async fn close(mut self) {
        self.finish().await;
    }

    /// Closes the socket, answering the server's close frame if one came (as a browser does
    /// at once; a server waits for that answer before it lets the socket go).
    pub async fn finish(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.sink.close()).await;
    }
}

/// The rest of a Hocuspocus frame after its document name (a lib0 varString).
fn skip_name(frame: &[u8]) -> Result<&[u8]> {
    let mut len: usize = 0;
    for (i, byte) in frame.iter().enumerate().take(5) {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return frame
                .get(i + 1 + len..)
                .ok_or_else(|| anyhow!("hocuspocus frame shorter than its document name"));
        }
    }
    bail!("hocuspocus frame without a document name")
}

pub fn apply(doc: &yrs::Doc, update: &[u8]) -> Result<()> {
    let update = Update::decode_v1(update).map_err(|e| anyhow!("undecodable update: {e}"))?;
    doc.transact_mut()
        .apply_update(update)
        .map_err(|e| anyhow!("update does not apply: {e}"))
}
