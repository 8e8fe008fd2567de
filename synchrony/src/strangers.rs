//! Cluster panic, done better: engines that share a database but not a cluster find each other.
//!
//! Synchrony calls it cluster panic: two nodes writing one database without seeing each other
//! (a wrong cluster secret, discovery that does not reach, a single node forgotten beside a
//! cluster). Synchrony stops serving. Here the CRDT and the shared update log make two owners of
//! a document lose nothing (each appends its edits; a load merges them all), so both keep
//! serving, and the engine says loudly what is wrong instead.
//!
//! Every engine writes a row of `node_heartbeats` every [`BEAT`] (its node id, cluster name,
//! addresses, time) and reads the rows of the others. A fresh row (younger than [`FRESH`]) of a
//! node that is not a live member of this node's cluster (for a standalone engine: any other
//! node) whose row keeps moving, for longer than [`GRACE`] (time for a joining member's links to
//! come up), makes that node
//! a stranger. While there are strangers, `GET {ctx}/v1/health` answers `degraded` (503) with the
//! reason, `GET {ctx}/v1/cluster` lists them, `synchrony_cluster_strangers` counts them, and an
//! ERROR line names them when they appear and every [`REPEAT`] after. A stopped engine deletes
//! its row; a killed one's row goes stale after [`FRESH`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::store::now_millis;
use crate::Engine;

/// How often an engine writes its row and reads the others'.
pub const BEAT: Duration = Duration::from_secs(2);
/// A row older than this is an engine that is gone.
pub const FRESH: Duration = Duration::from_secs(10);
/// How long a node must be outside the cluster before it counts as a stranger.
pub const GRACE: Duration = Duration::from_secs(6);
/// Every how many beats the rows of engines gone for an hour are deleted.
const STALE_SWEEP_BEATS: u64 = 300;
/// How often the ERROR line repeats while strangers remain.
pub const REPEAT: Duration = Duration::from_secs(60);

/// A node that shares this database but not this cluster.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stranger {
    pub node: String,
    /// Its cluster name (`cluster.name`); empty for a standalone engine.
    pub cluster: String,
    pub http_url: String,
    pub peer_addr: String,
    /// Milliseconds since its last heartbeat.
    pub last_beat_ms_ago: i64,
}

/// What this engine knows of strangers.
#[derive(Default)]
pub struct Strangers {
    list: Mutex<Vec<Stranger>>,
    /// Nodes outside the cluster: the heartbeat time first read from each, and since when it
    /// has been seen beating (a row that never moves is a killed engine's, not a stranger).
    outside: Mutex<HashMap<String, (i64, Option<Instant>)>>,
}

impl Strangers {
    /// The strangers now.
    pub fn list(&self) -> Vec<Stranger> {
        self.list.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Why the engine is degraded, if strangers make it so.
    pub fn problem(&self) -> Option<String> {
        let list = self.list();
        if list.is_empty() {
            return None;
        }
        let names: Vec<String> = list.iter().map(describe).collect();
        Some(format!(
            "cluster panic: {} share this database without sharing this cluster ({}); all keep serving, see GET {{ctx}}/v1/cluster",
            if list.len() == 1 { "1 other node".to_owned() } else { format!("{} other nodes", list.len()) },
            names.join(", ")
        ))
    }

    /// Takes the fresh rows of other nodes (with their heartbeat time) and which of them are
    /// members; true when the set of strangers changed.
    fn update(&self, others: Vec<(Stranger, bool, i64)>, now: Instant) -> bool {
        let mut outside = self.outside.lock().unwrap_or_else(|p| p.into_inner());
        let mut strangers = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (node, member, beat_at) in others {
            if member {
                continue;
            }
            seen.insert(node.node.clone());
            let (first_beat, beating) = outside.entry(node.node.clone()).or_insert((beat_at, None));
            if beat_at > *first_beat && beating.is_none() {
                *beating = Some(now);
            }
            if beating.is_some_and(|since| now.duration_since(since) >= GRACE) {
                strangers.push(node);
            }
        }
        outside.retain(|node, _| seen.contains(node));
        strangers.sort_by(|a, b| a.node.cmp(&b.node));
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let changed = list
            .iter()
            .map(|s| &s.node)
            .ne(strangers.iter().map(|s| &s.node));
        *list = strangers;
        changed
    }
}

fn describe(s: &Stranger) -> String {
    match s.cluster.as_str() {
        "" => format!("{} (standalone, {})", s.node, s.http_url),
        cluster => format!("{} (cluster {cluster:?}, {})", s.node, s.http_url),
    }
}

/// Starts the heartbeat of this engine as `node` (its cluster node id, or a standalone id),
/// reachable at `http_url`.
pub fn start(engine: &Arc<Engine>, node: String, http_url: String) {
    let (weak, cancel) = (Arc::downgrade(engine), engine.cancel.clone());
    let store = engine.store.clone();
    engine.tracker.spawn(async move {
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<Instant> = None;
        let mut beats: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => break,
            }
            let Some(engine) = weak.upgrade() else { break };
            // A node leaving the cluster is no stranger to anyone: its row goes now.
            if engine.cluster.get().is_some_and(|c| c.is_leaving()) {
                break;
            }
            let (cluster, peer_addr) = match engine.cluster.get() {
                Some(c) => (c.settings.name.clone(), c.settings.peer_addr.clone()),
                None => (String::new(), String::new()),
            };
            let now = now_millis();
            // Bounded, and given up at shutdown: storage that hangs must not hold a stop.
            beats += 1;
            let beat = async {
                store
                    .beat(&node, &cluster, &http_url, &peer_addr, now)
                    .await?;
                // Rows of engines gone for an hour, now and then (a write each beat is waste).
                if beats % STALE_SWEEP_BEATS == 1 {
                    store.forget_stale_beats(now - 3_600_000).await?;
                }
                store.heartbeats(now - FRESH.as_millis() as i64).await
            };
            let rows = tokio::select! {
                result = tokio::time::timeout(BEAT, beat) => match result {
                    Ok(Ok(rows)) => rows,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "node heartbeat failed; trying again");
                        continue;
                    }
                    Err(_) => {
                        tracing::debug!("node heartbeat took longer than a beat; trying again");
                        continue;
                    }
                },
                _ = cancel.cancelled() => break,
            };
            let live: Vec<String> = engine
                .cluster
                .get()
                .map(|c| c.view().live.to_vec())
                .unwrap_or_default();
            let others = rows
                .into_iter()
                .filter(|r| r.0 != node)
                .map(|(id, cluster, http_url, peer_addr, beat_at)| {
                    let member = live.contains(&id);
                    let stranger = Stranger {
                        node: id,
                        cluster,
                        http_url,
                        peer_addr,
                        last_beat_ms_ago: (now - beat_at).max(0),
                    };
                    (stranger, member, beat_at)
                })
                .collect();
            let strangers = &engine.strangers;
            let changed = strangers.update(others, Instant::now());
            match strangers.problem() {
                Some(problem) if changed || last_error.is_none_or(|at| at.elapsed() >= REPEAT) => {
                    tracing::error!("{problem}");
                    last_error = Some(Instant::now());
                }
                None if changed => {
                    tracing::info!("no more strangers share this database");
                    last_error = None;
                }
                _ => {}
            }
        }
        // A clean stop: the others need not wait for the row to go stale.
        match tokio::time::timeout(BEAT, store.forget_beat(&node)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "removing this node's heartbeat failed"),
            Err(_) => {
                tracing::debug!("removing this node's heartbeat took too long; it goes stale")
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(id: &str) -> Stranger {
        Stranger {
            node: id.into(),
            cluster: "c".into(),
            http_url: "http://x".into(),
            peer_addr: "y".into(),
            last_beat_ms_ago: 0,
        }
    }

    #[test]
    fn a_beating_node_outside_the_cluster_becomes_a_stranger_after_the_grace() {
        let s = Strangers::default();
        let t0 = Instant::now();
        assert!(!s.update(vec![(node("a"), false, 100), (node("b"), true, 100)], t0));
        // Its row moves: it is alive, and the grace starts.
        assert!(!s.update(
            vec![(node("a"), false, 200), (node("b"), true, 200)],
            t0 + BEAT
        ));
        assert!(
            s.problem().is_none(),
            "within the grace: joining members are not strangers"
        );
        assert!(s.update(vec![(node("a"), false, 300)], t0 + BEAT + GRACE));
        assert_eq!(s.list(), vec![node("a")]);
        assert!(s.problem().unwrap().contains("a (cluster \"c\""));
        // It joins the cluster: no longer a stranger, and it starts over if it leaves.
        assert!(s.update(vec![(node("a"), true, 400)], t0 + GRACE * 2));
        assert!(s.list().is_empty());
        assert!(!s.update(vec![(node("a"), false, 500)], t0 + GRACE * 3));
        assert!(s.list().is_empty());
    }

    #[test]
    fn a_row_that_never_moves_is_a_killed_engine_not_a_stranger() {
        let s = Strangers::default();
        let t0 = Instant::now();
        for i in 0..10 {
            s.update(vec![(node("dead"), false, 100)], t0 + BEAT * i);
        }
        assert!(s.list().is_empty());
    }
}
