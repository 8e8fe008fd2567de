//! A client that stops reading neither grows the engine's memory without bound nor slows the
//! others; when it reads again it is resynced to the current state (or closed with 1013).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use synchrony_tests::{EngineOptions, EngineProcess, Next, YClient};
use yrs::{Map, Transact};

fn value_of(client: &YClient) -> Option<String> {
    let map = client.doc.get_or_insert_map("big");
    let txn = client.doc.transact();
    map.get(&txn, "value").map(|v| v.to_string(&txn))
}

#[tokio::test]
async fn a_client_that_stops_reading_is_bounded_and_resynced() {
    let options = EngineOptions::default()
        .arg("--outbound-queue-bytes", 1 << 20)
        .arg("--outbound-queue-messages", 64)
        .arg("--max-resyncs-per-minute", 100);
    let engine = EngineProcess::start(&options).await;
    let doc = "app/slow";
    let mut slow = YClient::connect(&engine, doc, false).await; // sends step 1, then never reads
    let mut fast = YClient::synced(&engine, doc, false).await;
    let mut writer = YClient::synced(&engine, doc, true).await;
    let rss_before = engine.rss_kib();

    // 1,000 overwrites of one 64 KiB value: 64 MiB of fan-out, a small document (overwritten
    // values are garbage-collected), so growth in the engine can only come from queues.
    let payload = "p".repeat(64 * 1024);
    let map = writer.doc.get_or_insert_map("big");
    let mut max_rss = rss_before;
    for round in 0..1000u32 {
        let update = {
            let mut txn = writer.doc.transact_mut();
            map.insert(&mut txn, "value", format!("{round}:{payload}"));
            txn.encode_update_v1()
        };
        writer.send_update(update).await;
        if round % 50 == 49 {
            let sent = writer.sent;
            writer.wait_until("acks", |c| c.acked >= sent).await;
            fast.wait_until("the fast client to keep up", |c| {
                value_of(c).is_some_and(|v| v.starts_with(&format!("{round}:")))
            })
            .await;
            max_rss = max_rss.max(engine.rss_kib());
        }
    }
    let growth_mib = max_rss.saturating_sub(rss_before) / 1024;
    println!(
        "engine RSS: {} KiB before, {} KiB at most while a client did not read",
        rss_before, max_rss
    );
    // Measured: 30-40 MiB for the fan-out itself (persistence batches, compaction, allocator).
    // An unbounded queue would hold all 64 MiB for the slow client on top of that.
    assert!(
        growth_mib < 64,
        "engine RSS grew by {growth_mib} MiB while a client did not read"
    );

    // The slow client reads again: it is resynced to the final value, or told to retry later.
    let want = value_of(&writer);
    let deadline = tokio::time::Instant::now() + synchrony_tests::WAIT;
    loop {
        if value_of(&slow) == want {
            break;
        }
        match slow.pump_one(Duration::from_millis(500)).await {
            Next::Ended(code) => {
                assert_eq!(code, Some(1013), "slow client closed with {code:?}");
                break;
            }
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "slow client never caught up"
            ),
        }
    }
    let log = engine.log();
    assert!(
        log.contains("resyncing a lagging client") || log.contains("closing with 1013"),
        "the engine never noticed the slow client"
    );
}

/// A document larger than a client's outbound budget still reaches clients joining together:
/// their sync step 1 is queued ahead of the full state, and the state must not count as lag.
#[tokio::test]
async fn a_join_storm_on_a_document_larger_than_the_queue_budget() {
    let engine =
        EngineProcess::start(&EngineOptions::default().arg("--outbound-queue-bytes", 64 * 1024))
            .await;
    let mut writer = YClient::synced(&engine, "app/big", true).await;
    let chunk = "0123456789abcdef".repeat(4096); // 64 KiB
    for _ in 0..16 {
        writer.append(&chunk).await;
    }
    let want = writer.text();
    assert_eq!(want.len(), 1 << 20);
    // A chunk still arriving during the storm would be a second frame of the budget's size
    // behind a joiner's queued state: a lagging client by the queue's rule, which is not what
    // this test is about. Once every chunk is acknowledged the engine has applied them all.
    // (Waiting through a first reader does not do: it is a joiner too.)
    writer
        .wait_until("every chunk acknowledged", |c| c.acked_edits() == 16)
        .await;
    let joins = (0..20).map(|_| YClient::connect(&engine, "app/big", false));
    let mut clients = futures_util::future::join_all(joins).await;
    for (i, client) in clients.iter_mut().enumerate() {
        let deadline = tokio::time::Instant::now() + synchrony_tests::WAIT;
        while !client.synced {
            assert!(
                tokio::time::Instant::now() < deadline,
                "client {i} not synced"
            );
            if let Next::Ended(code) = client.pump_one(Duration::from_millis(200)).await {
                panic!(
                    "client {i} closed ({code:?}) before sync:\n{}",
                    engine.log()
                );
            }
        }
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .wait_until(&format!("client {i} to have the whole document"), |c| {
                c.text().len() == want.len()
            })
            .await;
    }
    assert!(
        !engine.log().contains("falling behind"),
        "no joining client counted as lagging:\n{}",
        engine.log()
    );
}

/// Joiners of a large document share one copy of its state: it goes out in fragments sliced from
/// one buffer, not copied into every connection's write buffer (which also kept that capacity
/// for as long as the connection lived).
#[tokio::test]
async fn joiners_of_a_large_document_share_one_copy_of_its_state() {
    const JOINERS: usize = 40;
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let mut writer = YClient::synced(&engine, "app/shared-state", false).await;
    let chunk = "0123456789abcdef".repeat(16 * 1024); // 256 KiB
    for _ in 0..16 {
        writer.append(&chunk).await;
    }
    let want = writer.text().len();
    // One joiner first, so the cached encoding of the state exists before measuring. Once it
    // has the whole text the engine has applied every chunk, so later joiners sync all of it.
    let mut first = YClient::synced(&engine, "app/shared-state", false).await;
    first
        .wait_until("the first joiner to have the whole document", |c| {
            c.text().len() == want
        })
        .await;
    let before = engine.rss_kib();
    let joins = (0..JOINERS).map(|_| YClient::synced(&engine, "app/shared-state", false));
    let clients = futures_util::future::join_all(joins).await;
    let after = engine.rss_kib();
    for (i, client) in clients.iter().enumerate() {
        assert_eq!(
            client.text().len(),
            want,
            "client {i} got the whole document"
        );
    }
    let grown_mib = after.saturating_sub(before) / 1024;
    println!(
        "engine RSS {before} KiB before {JOINERS} joins of a 4 MiB document, {after} KiB after"
    );
    // A copy per joiner would be 160 MiB.
    assert!(
        grown_mib < 60,
        "engine RSS grew by {grown_mib} MiB for {JOINERS} joiners of a 4 MiB document"
    );
}
