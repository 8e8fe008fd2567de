//! The load harness runs every scenario briefly at tiny sizes against every server it compares
//! (the engine on SQLite and PostgreSQL, @y/websocket-server, Hocuspocus), so it cannot rot.
//! Its figures are printed, never asserted: performance is measured by `loadtest compare`.
#![allow(clippy::unwrap_used)]

use synchrony_tests::{postgres_admin_url, workspace_root};

/// A small trace in the editing-traces format: inserts and deletes at seeded positions.
fn tiny_trace(path: &std::path::Path) {
    use rand::{Rng, SeedableRng};
    let seed = 7;
    println!("tiny trace seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut text = String::new();
    let mut txns = Vec::new();
    for i in 0..200 {
        if !text.is_empty() && rng.random_bool(0.3) {
            let pos = rng.random_range(0..text.len());
            let del = (text.len() - pos).min(3);
            text.replace_range(pos..pos + del, "");
            txns.push(serde_json::json!({"patches": [[pos, del, ""]]}));
        } else {
            let pos = rng.random_range(0..=text.len());
            let ins = format!("w{i} ");
            text.insert_str(pos, &ins);
            txns.push(serde_json::json!({"patches": [[pos, 0, ins]]}));
        }
    }
    let trace = serde_json::json!({"startContent": "", "endContent": text, "txns": txns});
    std::fs::write(path, trace.to_string()).unwrap();
}

#[tokio::test]
async fn every_scenario_runs_against_every_server_at_tiny_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("tiny.json");
    tiny_trace(&trace);
    let out = dir.path().join("results");
    let bin = workspace_root().join("target/debug/loadtest");
    let run = tokio::process::Command::new(&bin)
        .args(["compare", "--profile", "tiny", "--engine"])
        .arg(synchrony_tests::engine_binary())
        .arg("--trace")
        .arg(&trace)
        .arg("--cold-trace")
        .arg(&trace)
        .arg("--out-dir")
        .arg(&out)
        .args(["--postgres-url", &postgres_admin_url()])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(300), run)
        .await
        .expect("loadtest compare --profile tiny finished within 300 s")
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --workspace --bins)", bin.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "loadtest compare failed:\n{stderr}"
    );

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let servers = results["servers"].as_array().unwrap();
    assert_eq!(
        servers.len(),
        4,
        "engine (SQLite, PostgreSQL), y-websocket, Hocuspocus"
    );
    for server in servers {
        let name = server["server"].as_str().unwrap();
        let fanout = &server["fanout"];
        assert!(
            fanout["latency"]["count"].as_u64().unwrap() > 0,
            "{name}: fanout measured nothing"
        );
        assert_eq!(
            fanout["missing_deliveries"], 0,
            "{name}: fanout lost deliveries"
        );
        assert_eq!(fanout["errors"], 0, "{name}: fanout errors");
        assert!(
            !server["sweep"].as_array().unwrap().is_empty(),
            "{name}: no sweep"
        );
        assert_eq!(
            server["idle"]["dropped"], 0,
            "{name}: idle connections dropped"
        );
        assert_eq!(
            server["join_storm"]["errors"], 0,
            "{name}: join storm errors"
        );
        assert_eq!(
            server["trace"]["clients_exact"], true,
            "{name}: trace content"
        );
        let engine = name.starts_with("synchrony");
        if engine {
            assert_eq!(
                server["trace"]["storage_exact"], true,
                "{name}: stored trace"
            );
            assert!(
                server["cold_load"]["median_ms"].as_f64().unwrap() > 0.0,
                "{name}: cold load"
            );
        }
    }
    for file in ["summary.md", "fanout-latency.svg", "join-storm.svg"] {
        assert!(out.join(file).exists(), "{file} written");
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| @hocuspocus/server"), "{summary}");
}

/// Runs `loadtest cluster` at tiny sizes (three nodes, 6 documents × 3 clients, 60 updates/s,
/// no single-node baseline) with `args` added; returns its exit status and its JSON result.
async fn loadtest_cluster(args: &[&str]) -> (std::process::ExitStatus, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cluster.json");
    let bin = workspace_root().join("target/debug/loadtest");
    let run = tokio::process::Command::new(&bin)
        .args(["cluster", "--nodes", "3", "--docs", "6", "--clients", "3"])
        .args(["--rate", "60", "--warmup-secs", "1", "--baseline", "false"])
        .args(args)
        .arg("--engine")
        .arg(synchrony_tests::engine_binary())
        .args(["--postgres-url", &postgres_admin_url()])
        .arg("--out")
        .arg(&out)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(300), run)
        .await
        .expect("loadtest cluster finished within 300 s")
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --workspace --bins)", bin.display()));
    println!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let result = std::fs::read(&out)
        .map(|bytes| serde_json::from_slice(&bytes).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (output.status, result)
}

/// `loadtest cluster` at tiny sizes: three nodes form a cluster, clients spread over them
/// exchange every edit, and after a node is killed every pair of clients exchanges edits again.
#[tokio::test]
async fn the_cluster_mode_runs_and_measures_a_failover() {
    let (status, result) = loadtest_cluster(&[
        "--duration-secs",
        "5",
        "--drain-secs",
        "3",
        "--kill-after-secs",
        "2",
    ])
    .await;
    assert!(status.success(), "loadtest cluster failed");
    assert_eq!(
        result["rounds"][0]["cluster"]["missing_deliveries"], 0,
        "{result}"
    );
    let failover = &result["failover"]["failover"];
    assert_eq!(failover["recovered"], failover["pairs"], "{result}");
}

/// `loadtest cluster --restart-after-secs`: under the fan-out load every node is stopped
/// (SIGTERM) and started again in turn. Each restart disconnects exactly the clients then on
/// that node, once each, with 1012, and no client of another node; every edit is delivered and
/// every edit typed is read back from storage through a fresh node. Reconnecting clients go to
/// the next node (the harness's default), so a client can meet a second restart later.
#[tokio::test]
async fn the_cluster_mode_restarts_every_node_in_turn_and_loses_nothing() {
    let (status, result) = loadtest_cluster(&[
        "--duration-secs",
        "30",
        "--drain-secs",
        "5",
        "--rounds",
        "0",
        "--kill-after-secs",
        "0",
        "--restart-after-secs",
        "2",
        "--restart-gap-secs",
        "2",
    ])
    .await;
    let rolling = &result["rolling_restart"];
    let restarts = rolling["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 3, "{rolling}");
    for r in restarts {
        assert_eq!(r["clean_exit"], true, "{r}");
        assert!(r["clients"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["disconnected_once"], r["clients"], "{r}");
        assert_eq!(r["others_disconnected"], 0, "{r}");
        assert_eq!(r["close_codes"]["1012"], r["clients"], "{r}");
    }
    assert_eq!(rolling["disconnects_before_first_restart"], 0, "{rolling}");
    assert_eq!(rolling["clients_gave_up"], 0, "{rolling}");
    assert_eq!(rolling["roll_within_load"], true, "{rolling}");
    assert_eq!(rolling["fanout"]["missing_deliveries"], 0, "{rolling}");
    assert_eq!(rolling["unseen"], serde_json::json!([]), "{rolling}");
    let storage = &rolling["storage"];
    assert!(storage["edits_typed"].as_u64().unwrap() > 0, "{storage}");
    assert_eq!(storage["edits_missing"], 0, "{storage}");
    assert_eq!(storage["edits_stored"], storage["edits_typed"], "{storage}");
    assert!(status.success(), "loadtest cluster judged the roll failed");
}
