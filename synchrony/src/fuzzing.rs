//! The checks the fuzz targets run (`tests/fuzz`, `tests/fuzz.sh`), here so that every input a
//! fuzzer ever found is replayed by a normal `cargo test` on stable
//! (`tests/tests/fuzz_regressions.rs` runs them over `tests/fuzz/regressions/`).
//!
//! Each check panics when the engine misbehaves on its input: a crash, a false refusal of input
//! yrs accepts, or a document that stops converging for an honest client. Where the engine runs
//! yrs under `catch_unwind` (decoding a frame, applying an update, every command of a document),
//! the checks do too: a yrs panic there is contained in production, and counts as a finding
//! only if it escapes. Fuzz targets call [`contain_panics_as_the_engine_does`] first, since
//! libFuzzer's own hook aborts on every panic, caught or not.

/// Lets panics that are caught be caught (libFuzzer's hook aborts on every panic); one that
/// escapes a check still aborts the run.
pub fn contain_panics_as_the_engine_does() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use synchrony_protocol::nesting::{json_depth, scan_update, ScanError, DEFAULT_MAX_NESTING};
use synchrony_protocol::{decode_frame, encode_message, DocId, Message, SyncMessage};
use tokio::sync::oneshot;
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact, Update};

use crate::doc::{DocCommand, Docs, JoinRequest, Outbound};
use crate::nesting::NestingIndex;

/// A client frame: decoding never panics, and what decodes re-encodes to the same bytes.
pub fn frame(data: &[u8]) {
    // The session decodes under `catch_unwind`.
    let decoded = std::panic::catch_unwind(|| decode_frame(data));
    if let Ok(Ok(message)) = decoded {
        let again = encode_message(&message);
        assert_eq!(
            decode_frame(&again).ok(),
            Some(message),
            "a decoded frame did not survive re-encoding"
        );
    }
}

/// An update: the scan and the nesting index never panic; an update they admit is decoded and
/// applied by yrs without overflowing anything; and the scan never refuses, as malformed, an
/// update yrs accepts.
pub fn update(data: &[u8]) {
    match scan_update(data, DEFAULT_MAX_NESTING) {
        Ok(_) => {
            let index = NestingIndex::new(DEFAULT_MAX_NESTING);
            let doc = yrs::Doc::new();
            let held = doc.transact().state_vector();
            if index.check(data, &held).is_ok() {
                // The document decodes and applies under `catch_unwind` (a panic there closes
                // the client and rebuilds the document).
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if let Ok(update) = Update::decode_v1(data) {
                        let mut txn = doc.transact_mut();
                        let _ = txn.apply_update(update);
                    }
                }));
            }
        }
        // Refused for depth, for a count yrs would reserve memory for, or for a shape yrs
        // mishandles: yrs must not even be asked (it would recurse, try to allocate gigabytes,
        // use freed memory or leak).
        Err(
            ScanError::TooDeep { .. }
            | ScanError::Count { .. }
            | ScanError::ClockOverflow { .. }
            | ScanError::Overlap { .. }
            | ScanError::Subdocument,
        ) => {}
        // Refused as malformed: every value before the flaw was within the depth bound, so
        // yrs may read as far, and it must refuse too.
        Err(error) => {
            let accepted = std::panic::catch_unwind(|| Update::decode_v1(data).is_ok());
            assert!(
                !accepted.unwrap_or(false),
                "the scan refused an update yrs accepts: {error}"
            );
        }
    }
}

/// Awareness JSON: the depth measure never panics, and JSON within the bound parses without
/// overflowing.
pub fn awareness_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if json_depth(text) <= DEFAULT_MAX_NESTING {
        let _ = serde_json::from_str::<serde::de::IgnoredAny>(text);
        let _ = serde_json::from_str::<serde_json::Value>(text);
    }
}

/// One document, shared by every run of [`session`] in a process.
struct Bench {
    runtime: tokio::runtime::Runtime,
    docs: Arc<Docs>,
    _dir: tempfile::TempDir,
}

fn bench() -> &'static Bench {
    static BENCH: std::sync::OnceLock<Bench> = std::sync::OnceLock::new();
    BENCH.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/fuzz.db?mode=rwc", dir.path().display());
        let docs = runtime.block_on(async {
            let store = crate::store::Store::connect(&url).await.expect("sqlite");
            store.migrate().await.expect("migrate");
            let mut config = crate::config::ServeConfig::default();
            config.timing.flush_window_ms = 1;
            Docs::new(crate::doc::DocDeps::standalone(store, &config))
        });
        Bench {
            runtime,
            docs,
            _dir: dir,
        }
    })
}

/// Splits fuzz input into frames: each is a length byte and that many bytes.
fn frames(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        out.push(&tail[..n]);
        rest = &tail[n..];
    }
    out
}

/// A whole session: arbitrary frames from one client against a live document while an honest
/// client edits it. The honest client's edits must reach the document and come back to it, and
/// the document must stay readable, whatever the other one sent.
pub fn session(data: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let bench = bench();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let doc = DocId::parse(&format!("fuzz/{n}")).expect("id");
    let docs = bench.docs.clone();
    bench.runtime.block_on(async move {
        let limits = crate::config::ServeConfig::default().limits;
        let join = |conn_id: u64, out: Outbound| JoinRequest {
            conn_id,
            out,
            wants_persisted_ack: true,
            read_only: false,
            session: None,
            broadcast_to: None,
            handover: false,
        };
        let (bad_out, _bad_rx, _bad_state) = Outbound::new(&limits);
        let (good_out, mut good_rx, _good_state) = Outbound::new(&limits);
        let (bad_id, good_id) = (n * 2, n * 2 + 1);
        let Ok(bad) = docs.join(&doc, join(bad_id, bad_out)).await else {
            return;
        };
        let good = docs
            .join(&doc, join(good_id, good_out))
            .await
            .expect("the honest client joins");
        for f in frames(data) {
            if let Ok(message) = decode_frame(f) {
                if !bad
                    .send(DocCommand::Message {
                        conn_id: bad_id,
                        message,
                        received: std::time::Instant::now(),
                    })
                    .await
                {
                    break;
                }
            }
        }
        // The honest client writes, then must find its text in the document.
        // A 53-bit client id no fuzzer input is likely to name.
        let client = yrs::Doc::with_client_id((1 << 52) + (n % (1 << 40)));
        let text = client.get_or_insert_text("honest");
        let edit = {
            let mut txn = client.transact_mut();
            text.insert(&mut txn, 0, "still here");
            txn.encode_update_v1()
        };
        let message = Message::Sync(SyncMessage::Update(edit));
        assert!(
            good.send(DocCommand::Message {
                conn_id: good_id,
                message,
                received: std::time::Instant::now(),
            })
            .await,
            "the document went away under the honest client"
        );
        let (reply, answer) = oneshot::channel();
        assert!(
            good.send(DocCommand::Read {
                text_root: Some("honest".into()),
                xml: false,
                reply,
            })
            .await
        );
        let read = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the document answers")
            .expect("the document answers");
        assert_eq!(read.text, Some(Ok("still here".to_owned())));
        let state = yrs::Doc::new();
        state
            .transact_mut()
            .apply_update(Update::decode_v1(&read.update).expect("the state decodes"))
            .expect("the state applies");
        let txn = state.transact();
        let honest = txn.get_text("honest").map(|t| t.get_string(&txn));
        assert_eq!(honest.as_deref(), Some("still here"));
        while good_rx.try_recv().is_ok() {}
        let _ = bad.send(DocCommand::Leave { conn_id: bad_id }).await;
        let _ = good.send(DocCommand::Leave { conn_id: good_id }).await;
    });
}
