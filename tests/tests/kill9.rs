//! `kill -9` of the engine while clients type, repeated with seeds: every edit a client had been
//! told was persisted is in storage afterwards, on both backends.
//!
//! The normal suite runs `SYNCHRONY_SOAK_TRIALS` trials per backend (default 3); the soak
//! command in the README runs 20 or more. `SYNCHRONY_TEST_SEED` replays one trial.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use synchrony_tests::{EngineOptions, EngineProcess, PgDatabase, YClient};
use yrs::updates::decoder::Decode;
use yrs::{GetString, Text, Transact};

/// The text of root `root` as storage holds it (snapshot plus log), read without an engine.
async fn stored_root(url: &str, doc: &str, root: &str) -> String {
    let store = synchrony::store::Store::connect(url).await.unwrap();
    let id = synchrony_protocol::DocId::parse(doc).unwrap();
    let stored = store.load(&id).await.unwrap();
    let merged = synchrony::store::merge(&id, stored.snapshot.as_deref(), &stored.updates).unwrap();
    let ydoc = yrs::Doc::new();
    let text = ydoc.get_or_insert_text(root);
    let mut txn = ydoc.transact_mut();
    txn.apply_update(yrs::Update::decode_v1(&merged).unwrap())
        .unwrap();
    text.get_string(&txn)
}

fn trials() -> u64 {
    std::env::var("SYNCHRONY_SOAK_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn seeds() -> Vec<u64> {
    match std::env::var("SYNCHRONY_TEST_SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => (0..trials()).map(|_| rand::random()).collect(),
    }
}

/// One trial: four clients insert markers at random places; the engine is killed at a random
/// moment; every acknowledged marker must be stored.
async fn trial(options: &EngineOptions, url: &str, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut engine = EngineProcess::start(options).await;
    let doc = format!("soak/doc-{seed}");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(YClient::synced(&engine, &doc, true).await);
    }
    // Counted from the first acknowledgement (so that every trial has some to check, however
    // slow the machine's first commit), the kill lands at a seeded moment while all type.
    let kill_after = rng.random_range(0..1300u64);
    let started = tokio::time::Instant::now();
    let mut first_ack: Option<tokio::time::Instant> = None;
    let mut round = 0;
    let mut killed: Option<tokio::time::Instant> = None;
    let mut open = [true; 4];
    // The clients type until the kill has closed every connection: it lands between two sends
    // of a round, with edits in flight. What a client counts as acknowledged is what the engine
    // told it before it died.
    while open.iter().any(|o| *o) {
        if first_ack.is_none() && clients.iter().any(|c| c.acked_edits() > 0) {
            first_ack = Some(tokio::time::Instant::now());
        }
        assert!(
            first_ack.is_some() || started.elapsed() < synchrony_tests::WAIT,
            "seed {seed}: nothing acknowledged within {:?}",
            synchrony_tests::WAIT
        );
        let due = first_ack.is_some_and(|at| at.elapsed().as_millis() >= u128::from(kill_after));
        if killed.is_none() && due {
            engine.signal(nix::sys::signal::Signal::SIGKILL);
            killed = Some(tokio::time::Instant::now());
        }
        if let Some(at) = killed {
            assert!(
                at.elapsed() < synchrony_tests::WAIT,
                "seed {seed}: connections still open after the kill"
            );
        }
        for (c, client) in clients.iter_mut().enumerate() {
            if !open[c] {
                continue;
            }
            // Each client writes its own text, so that markers never split one another.
            let marker = format!("<{c}.{round}>{}", "m".repeat(rng.random_range(0..40)));
            let update = {
                let text = client.doc.get_or_insert_text(format!("c{c}").as_str());
                let mut txn = client.doc.transact_mut();
                let len = text.len(&txn);
                text.insert(&mut txn, len, &marker);
                txn.encode_update_v1()
            };
            client.edits += 1;
            // Read what arrived (acks and others' edits) without waiting long.
            open[c] = client.try_send_update(update).await
                && !matches!(
                    client.pump_one(std::time::Duration::from_millis(2)).await,
                    synchrony_tests::Next::Ended(_)
                );
        }
        round += 1;
    }
    engine.kill9().await;
    let killed_after = killed.map(|at| at - started);
    let acked: Vec<(usize, u64)> = clients
        .iter()
        .enumerate()
        .map(|(c, client)| (c, client.acked_edits()))
        .collect();
    let mut checked = 0;
    for (c, edits) in acked {
        let stored = stored_root(url, &doc, &format!("c{c}")).await;
        for round in 0..edits {
            let marker = format!("<{c}.{round}>");
            assert!(
                stored.contains(&marker),
                "seed {seed}: acknowledged edit {marker} lost after kill -9"
            );
            checked += 1;
        }
    }
    eprintln!(
        "seed {seed}: killed {kill_after} ms after the first acknowledgement ({killed_after:?} in), {round} rounds, {checked} acknowledged edits all stored"
    );
    assert!(
        checked > 0,
        "seed {seed}: nothing was acknowledged before the kill"
    );
}

#[tokio::test]
async fn sqlite_kill9_under_load_loses_no_acknowledged_edit() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::sqlite(dir.path());
    let url = synchrony_tests::sqlite_url(dir.path());
    for seed in seeds() {
        trial(&options, &url, seed).await;
    }
}

#[tokio::test]
async fn postgres_kill9_under_load_loses_no_acknowledged_edit() {
    let db = PgDatabase::create().await;
    let options = EngineOptions::postgres(&db.url);
    for seed in seeds() {
        trial(&options, &db.url, seed).await;
    }
}
