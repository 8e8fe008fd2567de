//! `GET {ctx}/metrics`: the engine's figures in the Prometheus text format, encoded by the
//! Prometheus organisation's own client (`prometheus-client`).
//!
//! Events (updates received, connections closed, tokens refused) are counted where they happen;
//! states (connections, documents, the commit queue, storage, the cluster) are read when the
//! metrics are scraped, from the same sources as the health JSON, so scraping costs nothing
//! between scrapes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

/// Each peer link's traffic, counted by the link's reader and writer (kept across reconnects).
#[derive(Clone, Default)]
pub struct LinkMetrics {
    pub messages_sent: Family<PeerLabel, Counter>,
    pub bytes_sent: Family<PeerLabel, Counter>,
    pub messages_received: Family<PeerLabel, Counter>,
    pub bytes_received: Family<PeerLabel, Counter>,
    /// Times a link to the peer came up.
    pub ups: Family<PeerLabel, Counter>,
}

/// Every metric the engine exports.
pub struct Metrics {
    registry: Registry,
    /// Update-bearing messages (sync step 2 and update) received from clients.
    pub updates_received: Counter,
    pub update_bytes_received: Counter,
    /// Frames and bytes written to clients.
    pub frames_sent: Counter,
    pub bytes_sent: Counter,
    /// Times a client's queue overflowed (it was then resynced).
    pub lagged: Counter,
    /// WebSocket connections closed by the engine, by close code.
    pub closes: Family<CodeLabel, Counter>,
    /// Tokens refused, by error type (`jwt/expired`, `forbidden`, ...).
    pub auth_refusals: Family<TypeLabel, Counter>,
    connections: Gauge,
    documents_loaded: Gauge,
    document_loads: Counter,
    resident_bytes: Gauge,
    uncommitted_updates: Gauge,
    uncommitted_bytes: Gauge,
    storage_up: Gauge,
    ready: Gauge,
    cluster_members: Family<StateLabel, Gauge>,
    cluster_epoch: Gauge,
    /// Engines sharing this database but not this cluster.
    cluster_strangers: Gauge,
    /// 1 for each peer a link is up to (read at scrape time).
    cluster_links: Family<PeerLabel, Gauge>,
    pub links: LinkMetrics,
}

/// Registers the persister's figures.
fn register_commits(r: &mut Registry, commits: &crate::persist::CommitMetrics) {
    r.register(
        "commit_seconds",
        "Group commits: seconds from the first attempt to success, retries included",
        commits.seconds.clone(),
    );
    r.register(
        "committed_updates",
        "Updates committed to storage",
        commits.updates.clone(),
    );
    r.register(
        "storage_errors",
        "Group commit attempts that storage refused",
        commits.failures.clone(),
    );
}

impl Metrics {
    /// `auth_refusals` is the gate's count of refused tokens, `commits` the persister's figures.
    pub fn new(
        auth_refusals: Family<TypeLabel, Counter>,
        commits: &crate::persist::CommitMetrics,
        docs: &crate::doc::DocMetrics,
    ) -> Self {
        let mut m = Metrics {
            updates_received: Counter::default(),
            update_bytes_received: Counter::default(),
            frames_sent: Counter::default(),
            bytes_sent: Counter::default(),
            lagged: Counter::default(),
            closes: Family::default(),
            auth_refusals,
            connections: Gauge::default(),
            documents_loaded: Gauge::default(),
            document_loads: Counter::default(),
            resident_bytes: Gauge::default(),
            uncommitted_updates: Gauge::default(),
            uncommitted_bytes: Gauge::default(),
            storage_up: Gauge::default(),
            ready: Gauge::default(),
            cluster_members: Family::default(),
            cluster_epoch: Gauge::default(),
            cluster_strangers: Gauge::default(),
            cluster_links: Family::default(),
            links: LinkMetrics::default(),
            registry: Registry::with_prefix("synchrony"),
        };
        let r = &mut m.registry;
        register_commits(r, commits);
        r.register(
            "document_load_seconds",
            "Seconds to load a document from storage",
            docs.load_seconds.clone(),
        );
        r.register(
            "broadcast_seconds",
            "Seconds from an update's arrival to its broadcast being queued for every other client",
            docs.broadcast_seconds.clone(),
        );
        r.register(
            "resyncs",
            "Full states sent to clients that fell behind or whose route moved",
            docs.resyncs.clone(),
        );
        r.register(
            "frames_sent",
            "WebSocket messages written to clients",
            m.frames_sent.clone(),
        );
        r.register(
            "bytes_sent",
            "Bytes of WebSocket messages written to clients",
            m.bytes_sent.clone(),
        );
        r.register(
            "lagged_clients",
            "Times a client's outbound queue overflowed (it was resynced)",
            m.lagged.clone(),
        );
        r.register(
            "updates_received",
            "Updates received from clients",
            m.updates_received.clone(),
        );
        r.register(
            "update_bytes_received",
            "Bytes of updates received from clients",
            m.update_bytes_received.clone(),
        );
        r.register(
            "connection_closes",
            "WebSocket connections the engine closed, by close code",
            m.closes.clone(),
        );
        r.register(
            "auth_refusals",
            "Tokens refused, by error type",
            m.auth_refusals.clone(),
        );
        r.register(
            "connections",
            "Open WebSocket sessions",
            m.connections.clone(),
        );
        r.register(
            "documents_loaded",
            "Documents in memory",
            m.documents_loaded.clone(),
        );
        r.register(
            "document_loads",
            "Documents loaded from storage since start",
            m.document_loads.clone(),
        );
        r.register(
            "resident_bytes",
            "Approximate bytes of the documents in memory",
            m.resident_bytes.clone(),
        );
        r.register(
            "uncommitted_updates",
            "Updates accepted and not yet committed to storage",
            m.uncommitted_updates.clone(),
        );
        r.register(
            "uncommitted_bytes",
            "Bytes of updates accepted and not yet committed to storage",
            m.uncommitted_bytes.clone(),
        );
        r.register(
            "storage_up",
            "1 while storage answers and commits succeed",
            m.storage_up.clone(),
        );
        r.register("ready", "1 once the node can serve", m.ready.clone());
        r.register(
            "cluster_members",
            "Cluster members this node sees, by state (alive, suspect, dead)",
            m.cluster_members.clone(),
        );
        r.register(
            "cluster_strangers",
            "Engines that share this database but not this cluster (cluster panic)",
            m.cluster_strangers.clone(),
        );
        r.register(
            "cluster_link_up",
            "1 for each peer this node has a link to",
            m.cluster_links.clone(),
        );
        r.register(
            "cluster_link_messages_sent",
            "Messages written to each peer",
            m.links.messages_sent.clone(),
        );
        r.register(
            "cluster_link_bytes_sent",
            "Bytes written to each peer",
            m.links.bytes_sent.clone(),
        );
        r.register(
            "cluster_link_messages_received",
            "Messages read from each peer",
            m.links.messages_received.clone(),
        );
        r.register(
            "cluster_link_bytes_received",
            "Bytes read from each peer",
            m.links.bytes_received.clone(),
        );
        r.register(
            "cluster_link_ups",
            "Times a link to each peer came up",
            m.links.ups.clone(),
        );
        r.register(
            "cluster_epoch",
            "This node's view epoch (bumped at each change of the live set)",
            m.cluster_epoch.clone(),
        );
        m
    }

    /// Reads the engine's state and encodes everything.
    pub fn render(&self, engine: &crate::Engine) -> String {
        use std::sync::atomic::Ordering;
        let gauge = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(
            &self.connections,
            engine.connections.load(Ordering::Relaxed),
        );
        gauge(&self.documents_loaded, engine.docs.loaded_count() as u64);
        let loads = engine.docs.load_count();
        self.document_loads
            .inc_by(loads.saturating_sub(self.document_loads.get()));
        gauge(&self.resident_bytes, engine.docs.resident_bytes());
        let (updates, bytes) = engine.docs.persister().queued();
        gauge(&self.uncommitted_updates, updates as u64);
        gauge(&self.uncommitted_bytes, bytes as u64);
        gauge(
            &self.storage_up,
            u64::from(engine.storage_problem().is_none()),
        );
        gauge(&self.ready, u64::from(engine.is_ready()));
        gauge(
            &self.cluster_strangers,
            engine.strangers.list().len() as u64,
        );
        if let Some(cluster) = engine.cluster.get() {
            let mut counts = std::collections::HashMap::new();
            for member in cluster.members() {
                use crate::cluster::membership::MemberState;
                let state = match member.state {
                    MemberState::Alive => "alive",
                    MemberState::Suspect => "suspect",
                    MemberState::Dead => "dead",
                };
                *counts.entry(state).or_insert(0u64) += 1;
            }
            for state in ["alive", "suspect", "dead"] {
                let n = counts.get(state).copied().unwrap_or(0);
                gauge(
                    &self.cluster_members.get_or_create(&StateLabel {
                        state: state.to_owned(),
                    }),
                    n,
                );
            }
            gauge(&self.cluster_epoch, cluster.view().epoch);
            self.cluster_links.clear();
            for peer in cluster.linked_peers() {
                self.cluster_links.get_or_create(&PeerLabel { peer }).set(1);
            }
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Pushes everything `GET {ctx}/metrics` shows to a statsD server every
/// `synchrony.metrics.statsd.interval.secs`, over UDP with the `cadence` client, when
/// `synchrony.metrics.statsd.host` is set. A sample `synchrony_name{label="v"}` becomes
/// `<prefix>.name.v`; counters (`_total`) and histogram counts (`_count`) go as statsD counts of
/// what they grew by since the last push, everything else (gauges, histogram sums) as gauges;
/// histogram buckets are left out.
pub fn push_statsd(engine: &std::sync::Arc<crate::Engine>) -> Result<(), String> {
    use cadence::prelude::*;
    use std::net::ToSocketAddrs;
    let config = &engine.config.statsd;
    let Some(host) = config.statsd_host.clone() else {
        return Ok(());
    };
    let target = (host.as_str(), config.statsd_port)
        .to_socket_addrs()
        .map_err(|e| format!("synchrony.metrics.statsd.host {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("synchrony.metrics.statsd.host {host:?} resolves to nothing"))?;
    let local = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = std::net::UdpSocket::bind(local).map_err(|e| format!("statsD socket: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("statsD socket: {e}"))?;
    let sink = cadence::BufferedUdpMetricSink::from(target, socket)
        .map_err(|e| format!("statsD sink: {e}"))?;
    let client = cadence::StatsdClient::from_sink(&config.statsd_prefix, sink);
    let every = std::time::Duration::from_secs(config.statsd_interval_secs);
    let (weak, cancel) = (std::sync::Arc::downgrade(engine), engine.cancel.clone());
    tracing::info!(%target, ?every, "pushing metrics to statsD");
    engine.tracker.spawn(async move {
        let mut last: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            let Some(engine) = weak.upgrade() else { return };
            let text = engine.metrics.render(&engine);
            drop(engine);
            let mut result = Ok(());
            for (key, value, counter) in statsd_samples(&text) {
                let sent = if counter {
                    let before = last.insert(key.clone(), value).unwrap_or(0.0);
                    // A counter that went down was reset (it never does here): count it anew.
                    let grew = if value >= before {
                        value - before
                    } else {
                        value
                    };
                    client.count(&key, grew.round() as i64).map(|_| ())
                } else {
                    client.gauge(&key, value).map(|_| ())
                };
                result = result.and(sent);
            }
            let result = result.and(client.flush());
            match (result, failing) {
                (Err(error), false) => {
                    tracing::warn!(%error, "pushing metrics to statsD failed; will keep trying");
                    failing = true;
                }
                (Ok(()), true) => {
                    tracing::info!("pushing metrics to statsD works again");
                    failing = false;
                }
                _ => {}
            }
        }
    });
    Ok(())
}

/// The samples of an exposition as statsD keys: (key, value, is a counter).
fn statsd_samples(text: &str) -> Vec<(String, f64, bool)> {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut samples = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        if name.ends_with("_bucket") || name.ends_with("_created") {
            continue;
        }
        let mut key = clean(name.strip_prefix("synchrony_").unwrap_or(name));
        // Label values in order: `a="x",b="y"` → `.x.y` (values hold no `",` here).
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            if let Some((_, v)) = pair.split_once('=') {
                key.push('.');
                key.push_str(&clean(v.trim_matches('"')));
            }
        }
        let counter = name.ends_with("_total") || name.ends_with("_count");
        samples.push((key, value, counter));
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_become_statsd_keys() {
        let text = "# TYPE synchrony_connections gauge\n\
                    synchrony_connections 3\n\
                    synchrony_connection_closes_total{code=\"1003\"} 2\n\
                    synchrony_commit_seconds_sum 0.25\n\
                    synchrony_commit_seconds_count 4\n\
                    synchrony_commit_seconds_bucket{le=\"0.001\"} 1\n\
                    synchrony_cluster_link_up{peer=\"node-a.1\"} 1\n\
                    # EOF\n";
        assert_eq!(
            statsd_samples(text),
            vec![
                ("connections".to_owned(), 3.0, false),
                ("connection_closes_total.1003".to_owned(), 2.0, true),
                ("commit_seconds_sum".to_owned(), 0.25, false),
                ("commit_seconds_count".to_owned(), 4.0, true),
                ("cluster_link_up.node-a_1".to_owned(), 1.0, false),
            ]
        );
    }
}
