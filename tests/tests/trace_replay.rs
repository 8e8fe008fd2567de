//! Replays a real recorded editing session (`../shared/data/traces/friendsforever_flat.json.gz`,
//! from josephg/editing-traces, CC BY 4.0) through the engine, one update per transaction, and
//! checks that a fresh client and storage both end with the trace's `endContent`.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::PathBuf;

use synchrony_tests::{
    sqlite_url, stored_text, workspace_root, EngineOptions, EngineProcess, YClient,
};
use yrs::{Text, Transact};

fn trace(name: &str) -> Option<serde_json::Value> {
    let path: PathBuf = workspace_root().join("../shared/data/traces").join(name);
    let Ok(file) = std::fs::File::open(&path) else {
        println!("SKIPPED: trace {} is absent", path.display());
        return None;
    };
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .unwrap();
    Some(serde_json::from_str(&json).unwrap())
}

#[tokio::test]
async fn friendsforever_trace_replays_to_its_end_content() {
    let Some(trace) = trace("friendsforever_flat.json.gz") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(&EngineOptions::sqlite(dir.path())).await;
    let doc = "traces/friendsforever";
    let mut writer = YClient::synced(&engine, doc, true).await;
    let text = writer.doc.get_or_insert_text("content");
    let txns = trace["txns"].as_array().unwrap();
    for (n, txn) in txns.iter().enumerate() {
        let update = {
            let mut t = writer.doc.transact_mut();
            for patch in txn["patches"].as_array().unwrap() {
                // Positions count code points; the trace is ASCII, so they are byte offsets too.
                let pos = patch[0].as_u64().unwrap() as u32;
                let del = patch[1].as_u64().unwrap() as u32;
                let ins = patch[2].as_str().unwrap();
                if del > 0 {
                    text.remove_range(&mut t, pos, del);
                }
                if !ins.is_empty() {
                    text.insert(&mut t, pos, ins);
                }
            }
            t.encode_update_v1()
        };
        writer.edits += 1;
        writer.send_update(update).await;
        if n % 500 == 0 {
            let _ = writer.pump_one(std::time::Duration::from_millis(1)).await;
        }
    }
    let end = trace["endContent"].as_str().unwrap();
    assert_eq!(writer.text(), end, "local replay diverged from the trace");
    let edits = writer.edits;
    writer
        .wait_until("every transaction persisted", |c| c.acked_edits() == edits)
        .await;

    let reader = YClient::synced(&engine, doc, false).await;
    assert_eq!(reader.text(), end);
    let (stored, _) = stored_text(&sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, end);
    println!("replayed {} transactions", txns.len());
}
