//! Malformed frames and updates: each closes only its own connection with its close code; the
//! other clients of the document carry on, and nothing of the bad input is stored.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use synchrony_protocol::{encode_message, AwarenessUpdate, Message, SyncMessage};
use synchrony_tests::{
    sqlite_url, stored_text, Ended, EngineOptions, EngineProcess, RawClient, YClient, WAIT,
};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::awareness::AwarenessUpdateEntry;

const FRAME_LIMIT: usize = 64 * 1024;

enum Input {
    Binary(Vec<u8>),
    Text(&'static str),
}

fn awareness_with(json: &str) -> Vec<u8> {
    let mut clients = HashMap::new();
    clients.insert(
        yrs::block::ClientID::new(77),
        AwarenessUpdateEntry {
            clock: 1,
            json: Arc::from(json),
        },
    );
    encode_message(&Message::Awareness(AwarenessUpdate { clients }))
}

fn cases() -> Vec<(&'static str, Input, u16)> {
    let mut trailing = encode_message(&Message::Sync(SyncMessage::SyncStep1(Default::default())));
    trailing.push(0);
    vec![
        ("empty frame", Input::Binary(vec![]), 1002),
        ("unknown message type", Input::Binary(vec![7, 0]), 1003),
        (
            "extension type from a client",
            Input::Binary(vec![100, 1, 1]),
            1003,
        ),
        (
            "truncated sync message",
            Input::Binary(vec![0, 1, 5, 1]),
            1002,
        ),
        ("bad sync sub-type", Input::Binary(vec![0, 9, 0]), 1002),
        ("trailing bytes", Input::Binary(trailing), 1002),
        ("malformed awareness", Input::Binary(vec![1, 3, 1, 2]), 1002),
        ("text frame", Input::Text("hello"), 1003),
        (
            "undecodable update",
            Input::Binary(vec![0, 2, 4, 0xff, 0xff, 0xff, 0xff]),
            1007,
        ),
        (
            "undecodable step 2",
            Input::Binary(vec![0, 1, 3, 5, 200, 1]),
            1007,
        ),
        (
            "awareness state that is not JSON",
            Input::Binary(awareness_with("{not json")),
            1007,
        ),
        (
            "frame over the limit",
            Input::Binary(vec![0; FRAME_LIMIT + 1]),
            4413,
        ),
    ]
}

#[tokio::test]
async fn each_bad_frame_gets_its_close_code_and_hurts_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::sqlite(dir.path()).arg("--max-frame-bytes", FRAME_LIMIT);
    let engine = EngineProcess::start(&options).await;
    let doc = "app/bad-input";
    let mut bystander = YClient::synced(&engine, doc, true).await;
    let mut watcher = YClient::synced(&engine, doc, false).await;
    bystander.append("base;").await;

    for (i, (name, input, want)) in cases().into_iter().enumerate() {
        let mut bad = RawClient::connect(&engine.ws_url(doc, "")).await.unwrap();
        match input {
            Input::Binary(bytes) => bad.ws.send(WsMessage::Binary(bytes.into())).await.unwrap(),
            Input::Text(text) => bad.ws.send(WsMessage::Text(text.into())).await.unwrap(),
        }
        match bad.ended(WAIT).await {
            Ended::Closed { code, reason } => {
                assert_eq!(
                    code, want,
                    "{name}: closed with {code} ({reason}), expected {want}"
                );
                assert!(!reason.is_empty(), "{name}: close without a reason");
            }
            Ended::Dropped => panic!("{name}: dropped without a close frame"),
        }
        // The others are unaffected: an edit still travels between them.
        let marker = format!("ok{i};");
        bystander.append(&marker).await;
        watcher
            .wait_until(&format!("the edit after '{name}'"), |w| {
                w.text().ends_with(&marker)
            })
            .await;
    }
    let edits = bystander.edits;
    bystander
        .wait_until("acks", |c| c.acked_edits() == edits)
        .await;
    assert!(
        engine.log().contains("WARN"),
        "bad input is logged as a warning"
    );
    assert!(
        engine.log().contains("doc_id=app/bad-input") || engine.log().contains("app/bad-input")
    );

    // Storage holds exactly what the good client wrote.
    let (stored, _) = stored_text(&sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, bystander.text());
    assert_eq!(stored, watcher.text());
}

#[tokio::test]
async fn an_update_past_the_document_size_limit_is_refused_with_4413() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::sqlite(dir.path()).arg("--max-doc-bytes", 200_000);
    let engine = EngineProcess::start(&options).await;
    let doc = "app/too-big";
    let mut writer = YClient::synced(&engine, doc, true).await;
    let mut other = YClient::synced(&engine, doc, false).await;
    let chunk = "x".repeat(40_000);
    let mut accepted = 0;
    // Each chunk is either acknowledged as stored (accepted) or answered with a close (refused):
    // silence counts as neither.
    let code = loop {
        writer.append(&chunk).await;
        let edits = writer.edits;
        let deadline = tokio::time::Instant::now() + synchrony_tests::WAIT;
        let refused = loop {
            if writer.acked_edits() == edits {
                break None;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chunk {} was neither acknowledged nor refused",
                accepted + 1
            );
            if let synchrony_tests::Next::Ended(code) =
                writer.pump_one(Duration::from_millis(200)).await
            {
                break Some(code);
            }
        };
        match refused {
            Some(code) => break code,
            None => accepted += 1,
        }
        assert!(accepted < 20, "the size limit never applied");
    };
    assert_eq!(code, Some(4413));
    // 200,000 bytes hold four 40,000-byte chunks with their encoding, not five.
    assert_eq!(
        accepted, 4,
        "accepted {accepted} chunks under a 200,000-byte limit"
    );
    // The other client still works, and storage holds exactly the accepted chunks and its edit.
    let mut third = YClient::synced(&engine, doc, true).await;
    third.append("still fine").await;
    third
        .wait_until("its edit acknowledged", |c| c.acked_edits() == 1)
        .await;
    other
        .wait_until("the edit after the refusal", |c| {
            c.text().ends_with("still fine")
        })
        .await;
    let (stored, _) = stored_text(&sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, format!("{}still fine", chunk.repeat(accepted)));
    assert_eq!(other.text(), stored);
}

#[tokio::test]
async fn a_bad_document_id_is_refused_before_the_upgrade() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    for bad in ["a%20b", "a/../b", "a//b", &"x".repeat(300)] {
        let err = RawClient::connect(&engine.ws_url(bad, ""))
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(err.to_string().contains("400"), "{bad}: {err}");
    }
    let (status, body) = engine.get("/v1/ws/a%20b").await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid-document-id"), "{body}");
    assert_eq!(engine.health().await["documents_loaded"], 0);
}

#[tokio::test]
async fn a_request_that_is_not_a_websocket_upgrade_is_refused_with_a_reason() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let (status, body) = engine.get("/v1/ws/app/plain-get").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("websocket-upgrade") && body.contains("Connection"),
        "{body}"
    );
    let old_version = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "8"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let response = synchrony_tests::http(
        engine.port,
        "GET",
        "/synchrony/v1/ws/app/old-version",
        &old_version,
        &[],
    )
    .await;
    assert_eq!(response.status, 426, "{}", response.text());
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
    assert_eq!(engine.health().await["documents_loaded"], 0);
}

/// The size estimate follows deletions: pasting and deleting a large block again and again
/// never ends in a 4413 (the estimate used to only grow until it passed the limit for good).
#[tokio::test]
async fn paste_and_delete_cycles_stay_under_the_size_limit() {
    use yrs::{Text, Transact};
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::sqlite(dir.path()).arg("--max-doc-bytes", 200_000);
    let engine = EngineProcess::start(&options).await;
    let doc = "app/paste-delete";
    let mut writer = YClient::synced(&engine, doc, true).await;
    let mut reader = YClient::synced(&engine, doc, false).await;
    let block = "p".repeat(80_000);
    for cycle in 0..8 {
        writer.append(&block).await;
        let update = {
            let text = writer.doc.get_or_insert_text("content");
            let mut txn = writer.doc.transact_mut();
            let len = text.len(&txn);
            text.remove_range(&mut txn, 0, len);
            txn.encode_update_v1()
        };
        writer.send_update(update).await;
        let sent = writer.sent;
        writer
            .wait_until(&format!("cycle {cycle} acknowledged"), |c| c.acked >= sent)
            .await;
    }
    writer.append("still editing").await;
    reader
        .wait_until("the edit after eight cycles", |c| {
            c.text() == "still editing"
        })
        .await;
}

/// An update yrs fails on half-way (applied inside its transaction, then a panic: a hidden test
/// flag stands in for a yrs bug) leaves the document suspect: its sender is closed with 1007,
/// the document is rebuilt from storage, and the others keep editing. Nothing of the failed
/// update remains; everything acknowledged does.
#[tokio::test]
async fn an_update_yrs_fails_on_half_way_rebuilds_the_document_from_storage() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::sqlite(dir.path()).arg("--test-panic-on-update-with", "POISON");
    let engine = EngineProcess::start(&options).await;
    let doc = "app/rebuilt";
    let mut a = YClient::synced(&engine, doc, true).await;
    let mut b = YClient::synced(&engine, doc, true).await;
    a.append("kept;").await;
    a.wait_until("kept acknowledged", |c| c.acked_edits() == 1)
        .await;
    b.wait_until("kept arrives", |c| c.text() == "kept;").await;
    b.append("POISON;").await;
    match b.raw.ended(WAIT).await {
        Ended::Closed { code, .. } => assert_eq!(code, 1007),
        Ended::Dropped => panic!("dropped without a close frame"),
    }
    // The rebuild keeps a's connection; its next edit is applied, broadcast and acknowledged.
    a.append("after;").await;
    a.wait_until("after acknowledged", |c| c.acked_edits() == 2)
        .await;
    let fresh = YClient::synced(&engine, doc, false).await;
    assert_eq!(fresh.text(), "kept;after;");
    let (stored, _) = stored_text(&sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, "kept;after;");
    assert!(
        engine
            .log()
            .contains("rebuilding the document from storage"),
        "{}",
        engine.log()
    );
}

/// Subdocuments are refused end to end (the engine neither loads nor syncs them, and their
/// structs leaked memory in yrs): an update holding one closes its WebSocket with 1007 and gets
/// 400 through REST; the bystander and storage are untouched.
#[tokio::test]
async fn an_update_holding_a_subdocument_is_refused_on_the_socket_and_through_rest() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(&EngineOptions::sqlite(dir.path())).await;
    let doc = "app/with-a-subdocument";
    let mut bystander = YClient::synced(&engine, doc, true).await;
    bystander.append("kept;").await;
    bystander.wait_until("ack", |c| c.acked_edits() == 1).await;
    let update = {
        use yrs::Transact;
        let d = yrs::Doc::new();
        let map = d.get_or_insert_map("m");
        let mut txn = d.transact_mut();
        yrs::Map::insert(&map, &mut txn, "sub", yrs::Doc::new());
        txn.encode_update_v1()
    };
    let mut sender = YClient::synced(&engine, doc, false).await;
    sender
        .raw
        .send_message(&Message::Sync(SyncMessage::Update(update.clone())))
        .await;
    match sender.raw.ended(WAIT).await {
        Ended::Closed { code, reason } => {
            assert_eq!(code, 1007, "{reason}");
        }
        Ended::Dropped => panic!("dropped without a close frame"),
    }
    let put = engine
        .request("PUT", &format!("/v1/data/{doc}"), None, &update)
        .await;
    assert_eq!(put.status, 400, "{}", put.text());
    assert!(
        put.text().contains("subdocuments are not supported"),
        "{}",
        put.text()
    );
    bystander.append("after;").await;
    bystander.wait_until("ack", |c| c.acked_edits() == 2).await;
    let (stored, _) = stored_text(&sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, "kept;after;");
}
