//! Durability on SQLite and PostgreSQL: graceful restarts, SIGKILL during continuous editing
//! (every acknowledged edit survives), and compaction that keeps content identical.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use synchrony_tests::{
    sqlite_url, stored_text, EngineOptions, EngineProcess, PgDatabase, YClient, WAIT,
};

async fn graceful_restart(options: EngineOptions) {
    let mut engine = EngineProcess::start(&options).await;
    let mut writer = YClient::synced(&engine, "app/restart", true).await;
    for i in 0..50 {
        writer.append(&format!("line {i}\n")).await;
    }
    let expected = writer.text();
    writer
        .wait_until("all 50 acknowledged", |c| c.acked_edits() == 50)
        .await;
    let status = engine.terminate().await;
    assert!(status.success(), "exit {status:?}; log:\n{}", engine.log());
    assert!(engine.log().contains("every accepted update is committed"));

    let engine = EngineProcess::start(&options).await;
    let reader = YClient::synced(&engine, "app/restart", false).await;
    assert_eq!(reader.text(), expected);
}

#[tokio::test]
async fn sqlite_edits_survive_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    graceful_restart(EngineOptions::sqlite(dir.path())).await;
}

#[tokio::test]
async fn postgres_edits_survive_a_graceful_restart() {
    let db = PgDatabase::create().await;
    graceful_restart(EngineOptions::postgres(&db.url)).await;
}

/// Edits continuously, SIGKILLs the engine mid-stream, restarts it: every edit acknowledged as
/// persisted before the kill is there.
async fn sigkill_keeps_acknowledged_edits(options: EngineOptions) {
    let mut engine = EngineProcess::start(&options).await;
    let mut writer = YClient::synced(&engine, "app/crash", true).await;
    // Each edit is a distinct line; after the restart, line i must exist for every i <= acked.
    let mut i = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline || writer.acked_edits() < 20 {
        writer.append(&format!("<{i}>")).await;
        i += 1;
        // Keep reading so acks arrive while we write.
        let _ = writer.pump_one(Duration::from_millis(2)).await;
        assert!(i < 100_000, "no acks arrived");
    }
    engine.kill9().await;
    let acked = writer.acked_edits();
    assert!(acked >= 20, "only {acked} edits acknowledged");

    let engine = EngineProcess::start(&options).await;
    let reader = YClient::synced(&engine, "app/crash", false).await;
    let text = reader.text();
    for n in 0..acked {
        assert!(
            text.contains(&format!("<{n}>")),
            "acknowledged edit {n} of {acked} lost after SIGKILL"
        );
    }
    // Nothing is invented either: whatever is there is a prefix of what was sent, in order.
    let expected: String = (0..i).map(|n| format!("<{n}>")).collect();
    assert!(
        expected.starts_with(&text),
        "stored text is not a prefix of the edits"
    );
    drop(engine);
}

#[tokio::test]
async fn sqlite_sigkill_loses_no_acknowledged_edit() {
    let dir = tempfile::tempdir().unwrap();
    sigkill_keeps_acknowledged_edits(EngineOptions::sqlite(dir.path())).await;
}

#[tokio::test]
async fn postgres_sigkill_loses_no_acknowledged_edit() {
    let db = PgDatabase::create().await;
    sigkill_keeps_acknowledged_edits(EngineOptions::postgres(&db.url)).await;
}

/// With a low threshold the log stays bounded while editing, and the stored state (snapshot +
/// log) encodes exactly what the client holds.
async fn compaction_keeps_content(options: EngineOptions, url: &str) {
    let options = options.arg("--compact-after-updates", 25);
    let engine = EngineProcess::start(&options).await;
    let mut writer = YClient::synced(&engine, "app/compact", true).await;
    let store = synchrony::store::Store::connect(url).await.unwrap();
    let id = synchrony_protocol::DocId::parse("app/compact").unwrap();
    let mut max_log = 0;
    for round in 0..12 {
        for i in 0..25 {
            writer.append(&format!("r{round}i{i} ")).await;
        }
        let edits = writer.edits;
        writer
            .wait_until("acks", |c| c.acked_edits() == edits)
            .await;
        max_log = max_log.max(store.log_len(&id).await.unwrap());
    }
    // Compaction runs in the background; give it a bounded moment to finish the last round.
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.log_len(&id).await.unwrap() >= 25 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log never compacted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(max_log < 100, "log grew to {max_log} rows for 300 updates");
    let stored = store.load(&id).await.unwrap();
    assert!(stored.snapshot.is_some(), "no snapshot was written");
    let (text, sv) = stored_text(url, "app/compact").await;
    assert_eq!(text, writer.text());
    use yrs::{ReadTxn, Transact};
    let client_sv = yrs::updates::encoder::Encode::encode_v1(&writer.doc.transact().state_vector());
    assert_eq!(
        sv, client_sv,
        "stored state vector differs from the client's"
    );
}

#[tokio::test]
async fn sqlite_compaction_keeps_content_and_bounds_the_log() {
    let dir = tempfile::tempdir().unwrap();
    compaction_keeps_content(EngineOptions::sqlite(dir.path()), &sqlite_url(dir.path())).await;
}

#[tokio::test]
async fn postgres_compaction_keeps_content_and_bounds_the_log() {
    let db = PgDatabase::create().await;
    compaction_keeps_content(EngineOptions::postgres(&db.url), &db.url).await;
}
