//! Replays real recorded editing sessions (`../shared/data/traces/`, from josephg/editing-traces,
//! CC BY 4.0) through the engine, one update per transaction, and checks that a fresh client and
//! storage both end with the trace's `endContent`. Timings are printed, never asserted.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use synchrony_tests::{
    sqlite_url, stored_text, workspace_root, EngineOptions, EngineProcess, PgDatabase, YClient,
};
use yrs::{Text, Transact};

fn trace(name: &str) -> Option<serde_json::Value> {
    let path: PathBuf = workspace_root().join("../shared/data/traces").join(name);
    let Ok(file) = std::fs::File::open(&path) else {
        synchrony_tests::skip(
            synchrony_tests::Lacking::Traces,
            &format!("{} is absent", path.display()),
        );
        return None;
    };
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .unwrap();
    Some(serde_json::from_str(&json).unwrap())
}

/// Replays `trace` into `doc` through `engine` and returns the expected final text.
async fn replay(engine: &EngineProcess, doc: &str, trace: &serde_json::Value) -> String {
    let mut writer = YClient::synced(engine, doc, true).await;
    let text = writer.doc.get_or_insert_text("content");
    let txns = trace["txns"].as_array().unwrap();
    let started = Instant::now();
    for (n, txn) in txns.iter().enumerate() {
        let update = {
            let mut t = writer.doc.transact_mut();
            for patch in txn["patches"].as_array().unwrap() {
                // Positions count code points; these traces are ASCII, so they are offsets too.
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
    let end = trace["endContent"].as_str().unwrap().to_owned();
    assert_eq!(writer.text(), end, "local replay diverged from the trace");
    let edits = writer.edits;
    writer
        .wait_until("every transaction persisted", |c| c.acked_edits() == edits)
        .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{doc}: {} transactions persisted in {secs:.2} s ({:.0}/s)",
        txns.len(),
        txns.len() as f64 / secs
    );
    end
}

#[tokio::test]
async fn friendsforever_trace_replays_to_its_end_content() {
    let Some(trace) = trace("friendsforever_flat.json.gz") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(&EngineOptions::sqlite(dir.path())).await;
    let doc = "traces/friendsforever";
    let end = replay(&engine, doc, &trace).await;
    let reader = YClient::synced(&engine, doc, false).await;
    assert_eq!(reader.text(), end);
    let (stored, _) = stored_text(&sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, end);
}

/// The 260,000-edit paper trace on PostgreSQL; then a new engine loads it cold (snapshot plus
/// whatever log the last compaction left) for a first client.
#[tokio::test]
async fn automerge_paper_trace_replays_and_loads_cold_from_postgres() {
    let Some(trace) = trace("automerge-paper.json.gz") else {
        return;
    };
    let db = PgDatabase::create().await;
    let options = EngineOptions::postgres(&db.url);
    let doc = "traces/automerge-paper";
    let end = {
        let mut engine = EngineProcess::start(&options).await;
        let end = replay(&engine, doc, &trace).await;
        assert!(engine.terminate().await.success());
        end
    };
    let (stored, _) = stored_text(&db.url, doc).await;
    assert_eq!(stored, end, "storage differs from the trace");

    let engine = EngineProcess::start(&options).await;
    let started = Instant::now();
    let reader = YClient::synced(&engine, doc, false).await;
    println!(
        "cold load + first sync: {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(reader.text(), end);
}
