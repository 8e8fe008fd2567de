//! Compaction never drops an update written by anyone: two engines write the same document in
//! the same database at once while one of them compacts aggressively; and, at the storage
//! layer, writers append while a compactor loops.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use synchrony::store::{LogEntry, Store};
use synchrony_protocol::DocId;
use synchrony_tests::{sqlite_url, stored_text, EngineOptions, EngineProcess, PgDatabase, YClient};
use yrs::{Text, Transact};

async fn two_engines_one_document(compacting: EngineOptions, plain: EngineOptions, url: &str) {
    let a = EngineProcess::start(&compacting.arg("--compact-after-updates", 5)).await;
    let b = EngineProcess::start(&plain).await;
    let doc = "app/shared";
    let write = |engine: &EngineProcess, tag: &'static str| {
        let ws = engine.ws_url(doc, "ack=persisted");
        async move {
            let raw = synchrony_tests::RawClient::connect(&ws).await.unwrap();
            let mut client = YClient::from_raw(raw).await;
            client.wait_until("sync", |c| c.synced).await;
            for i in 0..150 {
                client.append(&format!("{tag}{i};")).await;
                // Paced, so that compactions on A interleave with writes from both engines.
                let _ = client.pump_one(std::time::Duration::from_millis(3)).await;
            }
            client
                .wait_until("every edit acknowledged", |c| c.acked_edits() == 150)
                .await;
        }
    };
    tokio::join!(write(&a, "A"), write(&b, "B"));
    let compactions = a.log().matches("compacted").count();
    assert!(
        compactions >= 3,
        "only {compactions} compactions overlapped the writers"
    );
    drop(a);
    drop(b);
    let (text, _) = stored_text(url, doc).await;
    for tag in ["A", "B"] {
        for i in 0..150 {
            assert!(
                text.contains(&format!("{tag}{i};")),
                "update {tag}{i} lost by compaction"
            );
        }
    }
    let store = Store::connect(url).await.unwrap();
    assert!(
        store
            .load(&DocId::parse(doc).unwrap())
            .await
            .unwrap()
            .snapshot
            .is_some(),
        "nothing was compacted"
    );
}

#[tokio::test]
async fn postgres_two_engines_write_while_one_compacts() {
    let db = PgDatabase::create().await;
    two_engines_one_document(
        EngineOptions::postgres(&db.url),
        EngineOptions::postgres(&db.url),
        &db.url,
    )
    .await;
}

#[tokio::test]
async fn sqlite_two_engines_write_while_one_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    two_engines_one_document(
        EngineOptions::sqlite(dir.path()),
        EngineOptions::sqlite(dir.path()),
        &url,
    )
    .await;
}

/// Four writers append distinct single-character updates while a compactor runs in a loop.
async fn appends_race_compaction(url: &str) {
    let store = Store::connect(url).await.unwrap();
    store.migrate().await.unwrap();
    let doc = DocId::parse("race/doc").unwrap();
    let store = Arc::new(store);
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let store = store.clone();
            let doc = doc.clone();
            tokio::spawn(async move {
                // Each writer is its own Yjs client; its updates chain on its own earlier ones.
                let ydoc = yrs::Doc::with_client_id(w + 1);
                let text = ydoc.get_or_insert_text("content");
                for i in 0..100 {
                    let update = {
                        let mut txn = ydoc.transact_mut();
                        text.push(&mut txn, &format!("<{w}.{i}>"));
                        txn.encode_update_v1()
                    };
                    let entry = LogEntry {
                        doc: doc.clone(),
                        data: update.into(),
                    };
                    store.append(&[entry]).await.unwrap();
                }
            })
        })
        .collect();
    let compactor = {
        let store = store.clone();
        let doc = doc.clone();
        tokio::spawn(async move {
            let mut compactions = 0;
            for _ in 0..200 {
                match store.compact(&doc).await {
                    Ok(c) if c.merged_rows > 0 => compactions += 1,
                    Ok(_) => {}
                    // A conflicting compaction or lock is allowed to fail; it must not lose data.
                    Err(e) => eprintln!("compaction attempt failed (allowed): {e}"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            compactions
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let compactions = compactor.await.unwrap();
    assert!(
        compactions > 1,
        "the compactor never overlapped the writers"
    );
    let (text, _) = stored_text(url, "race/doc").await;
    for w in 0..4 {
        for i in 0..100 {
            assert!(
                text.contains(&format!("<{w}.{i}>")),
                "update <{w}.{i}> lost"
            );
        }
    }
}

#[tokio::test]
async fn postgres_appends_race_compaction() {
    let db = PgDatabase::create().await;
    appends_race_compaction(&db.url).await;
}

#[tokio::test]
async fn sqlite_appends_race_compaction() {
    let dir = tempfile::tempdir().unwrap();
    appends_race_compaction(&format!("{}?mode=rwc", sqlite_url(dir.path()))).await;
}

/// Loads run while writers append and a compactor loops: every load holds every update that was
/// committed before the load began. (Reading the snapshot and the log in two statements let a
/// compaction commit in between: the load then had neither the old rows nor the new snapshot.)
async fn loads_race_compaction(url: &str) {
    let store = Arc::new(Store::connect(url).await.unwrap());
    store.migrate().await.unwrap();
    let doc = DocId::parse("race/load").unwrap();
    let committed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let writer = {
        let (store, doc, committed) = (store.clone(), doc.clone(), committed.clone());
        tokio::spawn(async move {
            let ydoc = yrs::Doc::with_client_id(42);
            let text = ydoc.get_or_insert_text("content");
            for i in 0..400 {
                let marker = format!("<{i}>");
                let update = {
                    let mut txn = ydoc.transact_mut();
                    text.push(&mut txn, &marker);
                    txn.encode_update_v1()
                };
                let entry = LogEntry {
                    doc: doc.clone(),
                    data: update.into(),
                };
                store.append(&[entry]).await.unwrap();
                committed.lock().unwrap().push(marker);
            }
        })
    };
    let compactions = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let compactor = {
        let (store, doc, compactions) = (store.clone(), doc.clone(), compactions.clone());
        tokio::spawn(async move {
            let mut merged = 0;
            while merged < 40 {
                if let Ok(c) = store.compact(&doc).await {
                    merged += u64::from(c.merged_rows > 0);
                    compactions.store(merged, std::sync::atomic::Ordering::Release);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let compacted = || compactions.load(std::sync::atomic::Ordering::Acquire);
    let compacted_before = compacted();
    // Loads that found both a snapshot and log rows: a compaction had run and appends followed.
    let mut mixed = 0;
    let mut loads = 0;
    while !writer.is_finished() || loads < 50 {
        let before: Vec<String> = committed.lock().unwrap().clone();
        let stored = store.load(&doc).await.unwrap();
        mixed += usize::from(stored.snapshot.is_some() && !stored.updates.is_empty());
        let merged =
            synchrony::store::merge(&doc, stored.snapshot.as_deref(), &stored.updates).unwrap();
        let ydoc = yrs::Doc::new();
        let text = ydoc.get_or_insert_text("content");
        let mut txn = ydoc.transact_mut();
        txn.apply_update(yrs::updates::decoder::Decode::decode_v1(&merged).unwrap())
            .unwrap();
        let seen = yrs::GetString::get_string(&text, &txn);
        for marker in &before {
            assert!(
                seen.contains(marker.as_str()),
                "load {loads} lacks {marker}, committed before it began"
            );
        }
        loads += 1;
    }
    // The race was run: compactions committed while the loads went on.
    let during = compacted() - compacted_before;
    println!("{loads} loads; {during} compactions merged rows meanwhile; {mixed} loads saw a snapshot and log rows");
    assert!(
        during >= 2,
        "only {during} compactions ran during {loads} loads"
    );
    assert!(mixed > 0, "no load found a snapshot with log rows after it");
    writer.await.unwrap();
    compactor.abort();
}

#[tokio::test]
async fn postgres_loads_race_compaction() {
    let db = PgDatabase::create().await;
    loads_race_compaction(&db.url).await;
}

#[tokio::test]
async fn sqlite_loads_race_compaction() {
    let dir = tempfile::tempdir().unwrap();
    loads_race_compaction(&format!("{}?mode=rwc", sqlite_url(dir.path()))).await;
}
