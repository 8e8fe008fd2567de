//! A host application in miniature: starts the engine the way Confluence starts Synchrony and
//! keeps it running with the supervisor library.
//!
//! Like Confluence it passes configuration as dotted keys in the child's environment, adds the
//! JVM arguments and the `synchrony.core sql` tail of its launcher, and sets
//! `synchrony.watch.pid` to its own pid. Everything else (port, database, keys) comes from this
//! process's own environment, which the engine inherits.
//!
//! Usage: `host_sim <engine binary>`. Prints the supervisor's status changes as JSON lines and
//! the engine's output; on SIGTERM it stops the engine and exits 0.
#![allow(clippy::unwrap_used)]

use synchrony::supervisor::{Supervisor, SupervisorConfig};
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() {
    let engine = std::env::args()
        .nth(1)
        .expect("usage: host_sim <engine binary>");
    let jvm = [
        "-Xss2048k",
        "-Xmx2g",
        "-classpath",
        "synchrony-standalone.jar:postgresql.jar",
        "synchrony.core",
        "sql",
    ];
    let mut config = SupervisorConfig::new(engine, jvm.iter().map(|a| a.to_string()).collect());
    config.env = vec![
        ("synchrony.watch.pid".into(), std::process::id().to_string()),
        ("synchrony.context.path".into(), "/synchrony".into()),
        ("synchrony.log.to.file".into(), "false".into()),
        ("synchrony.memory.max".into(), "2g".into()),
        ("synchrony.cluster.impl".into(), "hazelcast-btf".into()),
    ];
    config.heartbeat_interval = std::time::Duration::from_millis(500);
    let supervisor = Supervisor::start(config);
    let mut changes = supervisor.subscribe();
    let mut term = signal(SignalKind::terminate()).unwrap();
    loop {
        let status = changes.borrow_and_update().clone();
        let mut event = serde_json::to_value(&status).unwrap();
        event["event"] = "host-status".into();
        println!("{event}");
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = term.recv() => break,
        }
    }
    let last = supervisor.stop().await;
    let mut event = serde_json::to_value(&last).unwrap();
    event["event"] = "host-status".into();
    println!("{event}");
}
