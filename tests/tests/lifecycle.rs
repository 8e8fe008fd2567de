//! Document lifecycle and process lifecycle: single-flight loads, many clients on many
//! documents, unloading when idle, heartbeat, and a graceful shutdown that closes with 1012.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use synchrony_tests::{sqlite_url, Ended, EngineOptions, EngineProcess, YClient, WAIT};

#[tokio::test]
async fn simultaneous_first_joiners_cause_one_load() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let mut seed = YClient::synced(&engine, "app/other", false).await;
    seed.append("x").await;
    let loads_before = engine.health().await["document_loads_total"]
        .as_u64()
        .unwrap();
    let joins = (0..40).map(|_| YClient::connect(&engine, "app/storm", false));
    let mut clients = futures_util::future::join_all(joins).await;
    for c in &mut clients {
        c.wait_until("sync", |c| c.synced).await;
    }
    let loads_after = engine.health().await["document_loads_total"]
        .as_u64()
        .unwrap();
    assert_eq!(
        loads_after - loads_before,
        1,
        "40 joiners caused {} loads",
        loads_after - loads_before
    );
}

#[tokio::test]
async fn many_clients_on_many_documents_converge() {
    let seed: u64 = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (TEST_SEED={seed} reproduces)");
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let (docs, per_doc, edits) = (8, 5, 30);
    let mut tasks = Vec::new();
    for d in 0..docs {
        for c in 0..per_doc {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((d * 100 + c) as u64));
            let doc = format!("app/many-{d}");
            let ws = engine.ws_url(&doc, "");
            tasks.push(tokio::spawn(async move {
                let raw = synchrony_tests::RawClient::connect(&ws).await.unwrap();
                let mut client = YClient::from_raw(raw).await;
                client.wait_until("sync", |c| c.synced).await;
                for e in 0..edits {
                    client
                        .insert_at_random(&mut rng, &format!("[{d}.{c}.{e}]"))
                        .await;
                    if rng.random_bool(0.3) {
                        let _ = client.pump_one(std::time::Duration::from_millis(1)).await;
                    }
                }
                client
            }));
        }
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    for d in 0..docs {
        let group: Vec<usize> = (0..per_doc).map(|c| d * per_doc + c).collect();
        let expected_len: usize = (0..per_doc)
            .flat_map(|c| (0..edits).map(move |e| format!("[{d}.{c}.{e}]").len()))
            .sum();
        for &i in &group {
            clients[i]
                .wait_until("all edits of the document", |c| {
                    c.text().len() == expected_len
                })
                .await;
        }
        let first = clients[group[0]].text();
        for &i in &group {
            assert_eq!(
                clients[i].text(),
                first,
                "document {d} diverged (seed {seed})"
            );
        }
    }
}

#[tokio::test]
async fn idle_documents_unload_and_come_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    let engine =
        EngineProcess::start(&EngineOptions::sqlite(dir.path()).arg("--doc-idle-secs", 1)).await;
    let mut writer = YClient::synced(&engine, "app/idle", true).await;
    for i in 0..10 {
        writer.append(&format!("{i},")).await;
    }
    writer.wait_until("acks", |c| c.acked_edits() == 10).await;
    let text = writer.text();
    drop(writer);
    let deadline = tokio::time::Instant::now() + WAIT;
    while engine.health().await["documents_loaded"] != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "document never unloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Unloading compacts the log into the snapshot.
    let store = synchrony::store::Store::connect(&sqlite_url(dir.path()))
        .await
        .unwrap();
    let id = synchrony_protocol::DocId::parse("app/idle").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.log_len(&id).await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log not compacted after unload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let reader = YClient::synced(&engine, "app/idle", false).await;
    assert_eq!(reader.text(), text);
}

#[tokio::test]
async fn heartbeat_health_and_graceful_shutdown() {
    let mut engine = EngineProcess::start(&EngineOptions::default()).await;
    assert_eq!(engine.get("/heartbeat").await, (200, "OK".to_owned()));
    let health = engine.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["storage"]["backend"], "sqlite");
    assert_eq!(health["storage"]["status"], "ok");
    // No auth configured on loopback: open, and said loudly.
    assert_eq!(health["auth"], "open");
    assert!(engine.log().contains("WARN") && engine.log().contains("no authentication configured"));
    let mut client = YClient::synced(&engine, "app/term", true).await;
    assert_eq!(engine.health().await["connections"], 1);
    client.append("before shutdown").await;
    let status = engine.terminate().await;
    assert!(status.success(), "{status:?}");
    // The ack may arrive before the close frame; either way the close says "service restart".
    let mut ended = None;
    while ended.is_none() {
        match client.raw.next_event(WAIT).await {
            synchrony_tests::Next::Ended(code) => ended = Some(code),
            synchrony_tests::Next::Quiet => panic!("no close frame"),
            synchrony_tests::Next::Frame(_) => {}
        }
    }
    assert_eq!(ended, Some(Some(1012)));
}

#[tokio::test]
async fn silent_connections_time_out_and_live_ones_stay() {
    let options = EngineOptions::default()
        .arg("--ping-interval-secs", 1)
        .arg("--idle-timeout-secs", 2);
    let engine = EngineProcess::start(&options).await;
    let mut silent = synchrony_tests::RawClient::connect(&engine.ws_url("app/idle-conn", ""))
        .await
        .unwrap();
    let mut live = YClient::synced(&engine, "app/idle-conn", false).await;
    // The live client reads (and so answers pings); the silent one reads nothing for 4 s.
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        if let synchrony_tests::Next::Ended(code) =
            live.pump_one(std::time::Duration::from_millis(100)).await
        {
            panic!("a live connection was closed ({code:?})");
        }
    }
    // Reading this late, the client may first fail to flush pongs into the closed socket and see
    // a reset instead of the close frame; the engine's log says what it sent.
    match silent.ended(WAIT).await {
        Ended::Closed { code, reason } => {
            assert_eq!((code, reason.as_str()), (1001, "idle timeout"))
        }
        Ended::Dropped => {}
    }
    // Connection ids follow the order in which sessions start, not the order of the upgrades, so
    // the log cannot say which line is the silent client's. The live client is still open, so
    // exactly one idle close means the silent one was closed.
    let log = engine.log();
    let idle_closes = log
        .lines()
        .filter(|l| l.contains("closing the connection code=1001 reason=idle timeout"))
        .count();
    assert_eq!(
        idle_closes, 1,
        "the engine should have closed exactly the silent connection for idleness:\n{log}"
    );
    // The live connection still edits: a newcomer's sync holds its edit.
    live.append("still here").await;
    let mut reader = YClient::synced(&engine, "app/idle-conn", false).await;
    reader
        .wait_until("the live client's edit", |r| {
            r.text().ends_with("still here")
        })
        .await;
}

#[tokio::test]
async fn the_memory_bound_refuses_new_documents_until_others_unload() {
    let options = EngineOptions::default()
        .arg("--memory-max", "100k")
        .arg("--doc-idle-secs", 1);
    let engine = EngineProcess::start(&options).await;
    let big = "x".repeat(150_000);
    let put = engine
        .request(
            "PUT",
            "/v1/data/app/big?reset=true&name=content",
            None,
            big.as_bytes(),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let health = engine.health().await;
    assert!(
        health["resident_bytes"].as_u64().unwrap() >= 150_000,
        "{health}"
    );
    // A document not loaded yet is refused, transiently.
    let refused = engine.request("GET", "/v1/data/app/other", None, b"").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let mut ws = synchrony_tests::RawClient::connect(&engine.ws_url("app/other", ""))
        .await
        .unwrap();
    assert_eq!(
        ws.ended(WAIT).await,
        Ended::Closed {
            code: 1013,
            reason: JOIN_BUSY.into()
        }
    );
    // The loaded one still works; once it unloads, the other loads.
    assert_eq!(
        engine
            .request(
                "GET",
                "/v1/data/app/big?format=text&name=content",
                None,
                b""
            )
            .await
            .text()
            .len(),
        150_000
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = engine.request("GET", "/v1/data/app/other", None, b"").await;
        if r.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never loaded after the big document unloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

const JOIN_BUSY: &str = "server busy (memory bound reached or document being deleted); try again";

/// One author's updates dealt to two connections out of order (as a trace replayed through
/// several connections does): the engine holds the early one until its predecessor arrives, and
/// then both connections must get everything, the one that sent the predecessor included.
#[tokio::test]
async fn updates_ahead_of_their_predecessors_reach_every_client() {
    use yrs::{GetString, Text, Transact};
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let author = yrs::Doc::with_client_id(99);
    let text = author.get_or_insert_text("content");
    let mut updates = Vec::new();
    for word in ["one ", "two ", "three "] {
        let mut t = author.transact_mut();
        let len = text.len(&t);
        text.insert(&mut t, len, word);
        updates.push(t.encode_update_v1());
    }
    let mut a = YClient::synced(&engine, "app/out-of-order", false).await;
    let mut b = YClient::synced(&engine, "app/out-of-order", false).await;
    // b sends the second and third before a sends the first they depend on.
    b.send_update(updates[1].clone()).await;
    b.send_update(updates[2].clone()).await;
    a.drain(std::time::Duration::from_millis(200)).await;
    a.send_update(updates[0].clone()).await;
    let want = "one two three ";
    for (name, client) in [("a", &mut a), ("b", &mut b)] {
        client
            .wait_until(&format!("{name} to have the whole text"), |c| {
                c.doc
                    .get_or_insert_text("content")
                    .get_string(&c.doc.transact())
                    == want
            })
            .await;
    }
    let mut fresh = YClient::synced(&engine, "app/out-of-order", false).await;
    fresh
        .wait_until("a fresh client to have it", |c| c.text() == want)
        .await;
}
