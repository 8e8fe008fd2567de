//! The scenarios. Each is bounded in time and count, seeded, and reports what it measured.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use synchrony_protocol::{Message, SyncMessage};
use tokio::sync::Semaphore;
use yrs::{GetString, ReadTxn, Text, Transact};

use crate::probe::{Probes, Usages};
use crate::report::{histogram, Latency};
use crate::target::{apply, Conn, Kind, Target};

/// What every scenario needs.
pub struct Run {
    pub target: Target,
    pub server_pid: Option<u32>,
    pub seed: u64,
    pub progress: bool,
    /// Random, so that a rerun with the same seed against a server that kept the last run's
    /// documents starts on fresh ones: reused client ids would make its edits duplicates that
    /// the server rightly ignores, and old markers would pass for new deliveries.
    pub nonce: u32,
    /// Cluster nodes to spread clients over (client `i` joins node `i mod n`); empty: all on
    /// `target`.
    pub spread: Vec<Target>,
    /// The pids of those nodes, to read their CPU and memory.
    pub node_pids: Vec<u32>,
}

impl Run {
    pub fn new(target: Target, server_pid: Option<u32>, seed: u64) -> Self {
        Self {
            target,
            server_pid,
            seed,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            nonce: rand::random(),
            spread: Vec::new(),
            node_pids: Vec::new(),
        }
    }

    /// The servers clients are spread over, in order.
    fn targets(&self) -> Vec<Target> {
        if self.spread.is_empty() {
            vec![self.target.clone()]
        } else {
            self.spread.clone()
        }
    }

    /// The name of this run's document `what`.
    fn doc(&self, what: impl std::fmt::Display) -> String {
        format!("{what}-{}-{:08x}", self.seed, self.nonce)
    }
}

const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections opened at once while setting up.
const CONNECT_CONCURRENCY: usize = 128;

fn bar(run: &Run, len: u64, what: &str) -> indicatif::ProgressBar {
    if !run.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// Opens `count` connections (document of connection i: `doc_of(i)`), a bounded number at once.
async fn connect_all(
    run: &Run,
    count: usize,
    doc_of: impl Fn(usize) -> String,
) -> Result<Vec<Conn>> {
    let progress = bar(run, count as u64, "connecting");
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let targets = run.targets();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (target, doc, gate, progress) = (
            targets[i % targets.len()].clone(),
            doc_of(i),
            gate.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let conn = Conn::join(&target, &doc, None, JOIN_TIMEOUT).await;
            progress.inc(1);
            conn
        }));
    }
    let mut conns = Vec::with_capacity(count);
    for task in tasks {
        conns.push(task.await??);
    }
    progress.finish_and_clear();
    Ok(conns)
}

// ---------------------------------------------------------------------------------------------
// fanout

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct FanoutOptions {
    /// Documents.
    #[arg(long, default_value_t = 100)]
    pub docs: usize,
    /// Clients per document.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Updates per second, over all clients.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 5.0)]
    pub warmup_secs: f64,
    #[arg(long, default_value_t = 20.0)]
    pub duration_secs: f64,
    /// After the last edit, how long deliveries are still awaited.
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// When a client's connection drops: how many attempts (250 ms apart) go to its own server
    /// before it tries the others in turn. 1 models a load balancer that sends a reconnecting
    /// client to the next server; more, one with sticky sessions that waits for its server.
    #[arg(long, default_value_t = 1)]
    pub reconnect_home_attempts: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub options: FanoutOptions,
    pub connections: usize,
    pub connect_secs: f64,
    /// Edit → arrival at each other client of the document, for edits made after the warm-up.
    pub latency: Latency,
    pub updates_sent: u64,
    pub updates_in_per_sec: f64,
    pub messages_out_per_sec: f64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub missing_deliveries: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub usage: Usages,
    /// With a node killed during the run: how long until edits flowed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
    /// Every client's connections coming up and going down, in time order.
    #[serde(skip)]
    pub events: Vec<ConnEvent>,
    /// Per client: how many edits it typed (its last sequence number).
    #[serde(skip)]
    pub typed: Vec<u64>,
    /// (receiver, sender, sequence number) of every edit typed that a client of its document
    /// never saw, whenever it was typed (warm-up included).
    #[serde(skip)]
    pub unseen: Vec<(usize, usize, u64)>,
}

/// A fan-out client's connection coming up or going down.
#[derive(Debug, Clone, Copy)]
pub struct ConnEvent {
    /// µs since the load began (the first connections, made before it, are recorded as it
    /// begins).
    pub at_us: u64,
    pub client: usize,
    /// The server it was or is connected to: its index in [`Run::spread`] (0 without one).
    pub node: usize,
    /// None: connected. Some: disconnected, with the close code the server sent (None inside:
    /// no close frame came, as when the process died).
    pub down: Option<Option<u16>>,
}

/// The name of fan-out document `d` in a run.
pub fn fanout_doc(run: &Run, d: usize) -> String {
    run.doc(format_args!("fanout-{d}"))
}

/// A node killed (`kill -9`) during a fan-out run.
#[derive(Debug, Clone, Copy)]
pub struct Kill {
    /// Seconds after the run's start.
    pub after_secs: f64,
    pub pid: u32,
}

/// For every pair of clients of one document (receiver, sender): the time from the kill to the
/// first edit the sender made after the kill arriving at the receiver.
#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub killed_at_secs: f64,
    pub pairs: u64,
    pub recovered: u64,
    pub time_to_recover: Latency,
}

/// Marks an edit: `\x01` + 12 hex digits of µs since the run began + 4 of the sender + 8 of its
/// sequence number + `\x02`. Every server forwards an update's inserted text verbatim, so
/// receivers find it in the raw frame without decoding.
const MARK_LEN: usize = 26;

fn mark(micros: u64, sender: usize, seq: u64) -> String {
    format!("\u{1}{micros:012x}{sender:04x}{seq:08x}\u{2}")
}

fn hex(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
}

/// The marks in a frame or text: (µs, sender, seq).
pub fn marks(frame: &[u8]) -> impl Iterator<Item = (u64, usize, u64)> + '_ {
    frame.windows(MARK_LEN).filter_map(|w| {
        if w[0] != 1 || w[MARK_LEN - 1] != 2 {
            return None;
        }
        Some((
            hex(&w[1..13])?,
            usize::try_from(hex(&w[13..17])?).ok()?,
            hex(&w[17..25])?,
        ))
    })
}

struct FanoutShared {
    epoch: Instant,
    warmup_us: u64,
    send_end_us: u64,
    histograms: Vec<Mutex<Histogram<u64>>>,
    sent_measured: AtomicU64,
    sent: AtomicU64,
    deliveries: AtomicU64,
    frames_measured: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    /// µs since the epoch when a node was killed (`u64::MAX`: not yet).
    kill_us: AtomicU64,
    /// Receiver-sender recovery times after the kill, µs.
    recoveries: Mutex<Vec<u64>>,
    events: Mutex<Vec<ConnEvent>>,
    /// Per client: its last edit's sequence number.
    typed: Vec<AtomicU64>,
}

impl FanoutShared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn event(&self, client: usize, node: usize, down: Option<Option<u16>>) {
        let at_us = self.now_us();
        if let Ok(mut events) = self.events.lock() {
            events.push(ConnEvent {
                at_us,
                client,
                node,
                down,
            });
        }
    }
}

pub async fn fanout(run: &Run, options: &FanoutOptions) -> Result<FanoutResult> {
    fanout_with_kill(run, options, None).await
}

/// [`fanout`], killing a server process (`kill -9`) at `kill.after_secs` and measuring how long
/// edits take to flow again between every pair of clients of a document.
pub async fn fanout_with_kill(
    run: &Run,
    options: &FanoutOptions,
    kill: Option<Kill>,
) -> Result<FanoutResult> {
    let (result, ()) = fanout_during(run, options, kill, |_| async {}).await?;
    Ok(result)
}

/// [`fanout_with_kill`], running `during` beside the load: it is started with the load's epoch
/// (the instant event times count from) as soon as the clients are connected, and awaited after
/// the last delivery; its output is handed back with the result.
pub async fn fanout_during<T, F, Fut>(
    run: &Run,
    options: &FanoutOptions,
    kill: Option<Kill>,
    during: F,
) -> Result<(FanoutResult, T)>
where
    F: FnOnce(Instant) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    if options.docs == 0 || options.clients < 2 || options.rate <= 0.0 {
        bail!("fanout needs at least 1 document, 2 clients per document and a positive rate");
    }
    let total = options.docs * options.clients;
    let started = Instant::now();
    let conns = connect_all(run, total, |i| fanout_doc(run, i / options.clients)).await?;
    let connect_secs = started.elapsed().as_secs_f64();

    let shared = Arc::new(FanoutShared {
        epoch: Instant::now(),
        warmup_us: (options.warmup_secs * 1e6) as u64,
        send_end_us: ((options.warmup_secs + options.duration_secs) * 1e6) as u64,
        histograms: (0..16).map(|_| Mutex::new(histogram())).collect(),
        sent_measured: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        frames_measured: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        kill_us: AtomicU64::new(u64::MAX),
        recoveries: Mutex::new(Vec::new()),
        events: Mutex::new(Vec::with_capacity(total * 2)),
        typed: (0..total).map(|_| AtomicU64::new(0)).collect(),
    });
    let beside = tokio::spawn(during(shared.epoch));
    let period = Duration::from_secs_f64(total as f64 / options.rate);
    let end =
        Duration::from_secs_f64(options.warmup_secs + options.duration_secs + options.drain_secs);
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.seed);
    let mut tasks = Vec::with_capacity(total);
    let targets = Arc::new(run.targets());
    for (i, conn) in conns.into_iter().enumerate() {
        let phase = period.mul_f64(rng.random::<f64>());
        let shared = shared.clone();
        let clients = options.clients;
        let home = Home {
            targets: targets.clone(),
            index: i % targets.len(),
            attempts: options.reconnect_home_attempts.max(1),
        };
        shared.event(i, home.index, None);
        tasks.push(tokio::spawn(fanout_client(
            conn, home, i, clients, phase, period, end, shared,
        )));
    }
    let killer = kill.map(|kill| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let at = shared.epoch + Duration::from_secs_f64(kill.after_secs);
            tokio::time::sleep_until(at.into()).await;
            shared.kill_us.store(shared.now_us(), Relaxed);
            if let Ok(pid) = i32::try_from(kill.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        })
    });
    let progress = bar(run, end.as_secs(), "fanout");
    let ticker = {
        let (progress, epoch) = (progress.clone(), shared.epoch);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                progress.set_position(epoch.elapsed().as_secs());
            }
        })
    };
    // Server and harness usage over the measured period only.
    let at =
        |secs: f64| tokio::time::Instant::from_std(shared.epoch + Duration::from_secs_f64(secs));
    tokio::time::sleep_until(at(options.warmup_secs)).await;
    let probes = Probes::start(run.server_pid, &run.node_pids);
    tokio::time::sleep_until(at(options.warmup_secs + options.duration_secs)).await;
    let usage = probes.finish();
    let mut seens = Vec::with_capacity(total);
    for task in tasks {
        seens.push(task.await?);
    }
    if let Some(killer) = killer {
        killer.await?;
    }
    let beside = beside.await?;
    ticker.abort();
    progress.finish_and_clear();
    let failover = kill.map(|kill| {
        let recoveries = shared
            .recoveries
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        let mut h = histogram();
        for us in &recoveries {
            let _ = h.record((*us).max(1));
        }
        Failover {
            killed_at_secs: kill.after_secs,
            pairs: (total * (options.clients - 1)) as u64,
            recovered: recoveries.len() as u64,
            time_to_recover: Latency::of(&h),
        }
    });

    let mut merged = histogram();
    for h in &shared.histograms {
        if let Ok(h) = h.lock() {
            let _ = merged.add(&*h);
        }
    }
    let sent_measured = shared.sent_measured.load(Relaxed);
    let expected = sent_measured * (options.clients as u64 - 1);
    let deliveries = shared.deliveries.load(Relaxed);
    let mut events = shared
        .events
        .lock()
        .map(|mut e| std::mem::take(&mut *e))
        .unwrap_or_default();
    events.sort_by_key(|e| e.at_us);
    let typed: Vec<u64> = shared.typed.iter().map(|t| t.load(Relaxed)).collect();
    let mut unseen = Vec::new();
    for (receiver, seen) in seens.iter().enumerate() {
        let first = receiver - receiver % options.clients;
        for (sender, below) in seen.below.iter().enumerate() {
            if sender == seen.me {
                continue;
            }
            for seq in *below..=typed[first + sender] {
                if !seen.ahead[sender].contains(&seq) {
                    unseen.push((receiver, first + sender, seq));
                }
            }
        }
    }
    let result = FanoutResult {
        options: options.clone(),
        connections: total,
        connect_secs,
        latency: Latency::of(&merged),
        updates_sent: shared.sent.load(Relaxed),
        updates_in_per_sec: sent_measured as f64 / options.duration_secs,
        messages_out_per_sec: shared.frames_measured.load(Relaxed) as f64 / options.duration_secs,
        expected_deliveries: expected,
        deliveries,
        missing_deliveries: expected.saturating_sub(deliveries),
        errors: shared.errors.load(Relaxed),
        reconnects: shared.reconnects.load(Relaxed),
        usage,
        failover,
        events,
        typed,
        unseen,
    };
    Ok((result, beside))
}

/// The servers a client may use: its own first, the others if its own goes away (as a load
/// balancer would send a reconnecting client elsewhere).
struct Home {
    targets: Arc<Vec<Target>>,
    index: usize,
    /// Attempts on its own server before the others.
    attempts: usize,
}

#[allow(clippy::too_many_arguments)]
async fn fanout_client(
    mut conn: Conn,
    home: Home,
    index: usize,
    clients: usize,
    phase: Duration,
    period: Duration,
    end: Duration,
    shared: Arc<FanoutShared>,
) -> Seen {
    let me = index % clients;
    let doc = yrs::Doc::with_client_id(index as u64 + 1);
    let text = doc.get_or_insert_text("content");
    let mut seen = Seen {
        me,
        below: vec![1u64; clients],
        ahead: vec![std::collections::BTreeSet::new(); clients],
        recovered: vec![false; clients],
    };
    let mut seq = 0u64;
    let mut node = home.index;
    let mut tick = tokio::time::interval_at((shared.epoch + phase).into(), period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::Instant::from_std(shared.epoch + end);
    let histogram = &shared.histograms[index % shared.histograms.len()];
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick(), if shared.now_us() < shared.send_end_us => {
                seq += 1;
                let now = shared.now_us();
                let update = {
                    let mut t = doc.transact_mut();
                    let len = text.len(&t);
                    text.insert(&mut t, len, &mark(now, me, seq));
                    t.encode_update_v1()
                };
                shared.typed[index].store(seq, Relaxed);
                if conn.send(&Message::Sync(SyncMessage::Update(update))).await.is_err() {
                    if !rejoin(&mut conn, &mut node, index, &home, &doc, &mut seen, &shared).await {
                        break;
                    }
                    continue;
                }
                shared.sent.fetch_add(1, Relaxed);
                if now >= shared.warmup_us {
                    shared.sent_measured.fetch_add(1, Relaxed);
                }
            }
            frame = conn.next_frame() => {
                let now = shared.now_us();
                // Past the end nothing counts: what the servers do as everyone leaves (a
                // document handing its state over, say) is no delivery.
                if now >= end.as_micros() as u64 {
                    break;
                }
                let frame = match frame {
                    Ok(Some(frame)) => frame,
                    _ => {
                        if !rejoin(&mut conn, &mut node, index, &home, &doc, &mut seen, &shared).await {
                            break;
                        }
                        continue;
                    }
                };
                if (shared.warmup_us..shared.send_end_us).contains(&now) {
                    shared.frames_measured.fetch_add(1, Relaxed);
                }
                // A server may ask for what it lacks at any time (a cluster node that took the
                // document over does): answer as y-websocket clients do.
                if home.targets[0].kind != Kind::Hocuspocus && frame.starts_with(&[0, 0]) {
                    if let Ok(Some(Message::Sync(SyncMessage::SyncStep1(sv)))) =
                        conn.target.decode(&frame)
                    {
                        let diff = doc.transact().encode_state_as_update_v1(&sv);
                        if conn.send(&Message::Sync(SyncMessage::SyncStep2(diff))).await.is_err() {
                            shared.errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                seen.observe(marks(&frame), now, &shared, histogram);
            }
        }
    }
    conn.close().await;
    seen
}

/// What one fan-out client has received from each sender of its document. A sender's edits
/// are numbered from 1 without gaps, but may arrive out of order (a cluster node relays some on
/// a client's own stream and others through its node's hub): each is counted once, whenever it
/// arrives.
struct Seen {
    me: usize,
    /// Per sender: every edit below this number has arrived.
    below: Vec<u64>,
    /// Per sender: edits at or above `below` that arrived early.
    ahead: Vec<std::collections::BTreeSet<u64>>,
    recovered: Vec<bool>,
}

impl Seen {
    /// Counts the marks of others' edits newly seen in a frame, or in the text a reconnected
    /// client synced (whose marks no frame brought it).
    fn observe(
        &mut self,
        found: impl Iterator<Item = (u64, usize, u64)>,
        now: u64,
        shared: &FanoutShared,
        histogram: &Mutex<Histogram<u64>>,
    ) {
        let mut found: Vec<_> = found.collect();
        found.sort_by_key(|&(_, sender, s)| (sender, s));
        for (sent_at, sender, s) in found {
            if sender == self.me || sender >= self.below.len() || s < self.below[sender] {
                continue;
            }
            if !self.ahead[sender].insert(s) {
                continue;
            }
            while self.ahead[sender].remove(&self.below[sender]) {
                self.below[sender] += 1;
            }
            let killed = shared.kill_us.load(Relaxed);
            if sent_at >= killed && !self.recovered[sender] {
                self.recovered[sender] = true;
                if let Ok(mut r) = shared.recoveries.lock() {
                    r.push(now.saturating_sub(killed));
                }
            }
            if sent_at >= shared.warmup_us {
                shared.deliveries.fetch_add(1, Relaxed);
                if let Ok(mut h) = histogram.lock() {
                    let _ = h.record(now.saturating_sub(sent_at).max(1));
                }
            }
        }
    }
}

/// After client `index`'s connection (to server `node`) dropped: records it, connects again
/// (see [`reconnect`]) and counts the edits the sync brought. False when the client gave up.
async fn rejoin(
    conn: &mut Conn,
    node: &mut usize,
    index: usize,
    home: &Home,
    doc: &yrs::Doc,
    seen: &mut Seen,
    shared: &FanoutShared,
) -> bool {
    shared.errors.fetch_add(1, Relaxed);
    shared.event(index, *node, Some(conn.close_code));
    conn.finish().await;
    let Some((fresh, to)) = reconnect(home, &conn.doc, doc, shared).await else {
        return false;
    };
    (*conn, *node) = (fresh, to);
    shared.event(index, to, None);
    let synced = doc
        .get_or_insert_text("content")
        .get_string(&doc.transact());
    let histogram = &shared.histograms[index % shared.histograms.len()];
    seen.observe(marks(synced.as_bytes()), shared.now_us(), shared, histogram);
    true
}

/// Connects again, to the client's own server first and then to the others in turn; returns
/// the connection and the index of the server that took it.
async fn reconnect(
    home: &Home,
    doc_name: &str,
    doc: &yrs::Doc,
    shared: &FanoutShared,
) -> Option<(Conn, usize)> {
    // About 10 s, as a y-websocket client would keep trying (a node's death takes a second or
    // two to be noticed).
    for attempt in 0..40usize {
        tokio::time::sleep(Duration::from_millis(250)).await;
        shared.reconnects.fetch_add(1, Relaxed);
        let node = match attempt.checked_sub(home.attempts) {
            None => home.index,
            Some(past) => (home.index + 1 + past) % home.targets.len(),
        };
        if let Ok(conn) = Conn::join(&home.targets[node], doc_name, Some(doc), JOIN_TIMEOUT).await {
            return Some((conn, node));
        }
        shared.errors.fetch_add(1, Relaxed);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// idle

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct IdleOptions {
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections per document.
    #[arg(long, default_value_t = 10)]
    pub per_doc: usize,
    /// How long the connections sit idle while CPU is measured.
    #[arg(long, default_value_t = 10.0)]
    pub hold_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub options: IdleOptions,
    pub connect_secs: f64,
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_after_bytes: Option<u64>,
    pub server_bytes_per_connection: Option<f64>,
    pub dropped: u64,
    pub usage: Usages,
}

pub async fn idle(run: &Run, options: &IdleOptions) -> Result<IdleResult> {
    let per_doc = options.per_doc.max(1);
    let before = run.server_pid.and_then(crate::probe::rss_bytes);
    let started = Instant::now();
    let conns = connect_all(run, options.connections, |i| {
        run.doc(format_args!("idle-{}", i / per_doc))
    })
    .await?;
    let connect_secs = started.elapsed().as_secs_f64();
    let dropped = Arc::new(AtomicU64::new(0));
    let hold = Duration::from_secs_f64(options.hold_secs);
    // Every connection keeps reading (answering pings) while idle.
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let dropped = dropped.clone();
            tokio::spawn(async move {
                let ended = tokio::time::timeout(hold, async {
                    while let Ok(Some(_)) = conn.next_frame().await {}
                })
                .await;
                if ended.is_ok() {
                    dropped.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();
    // Let the connection burst settle before measuring.
    tokio::time::sleep(Duration::from_millis(500).min(hold / 4)).await;
    let probes = Probes::start(run.server_pid, &run.node_pids);
    let progress = bar(run, options.hold_secs as u64, "idle");
    let held = Instant::now();
    while held.elapsed() < hold.mul_f64(0.7) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress.set_position(held.elapsed().as_secs());
    }
    let after = run.server_pid.and_then(crate::probe::rss_bytes);
    let usage = probes.finish();
    for task in tasks {
        task.await?;
    }
    progress.finish_and_clear();
    Ok(IdleResult {
        options: options.clone(),
        connect_secs,
        server_rss_before_bytes: before,
        server_rss_after_bytes: after,
        server_bytes_per_connection: before
            .zip(after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / options.connections.max(1) as f64),
        dropped: dropped.load(Relaxed),
        usage,
    })
}

// ---------------------------------------------------------------------------------------------
// join storm

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct JoinStormOptions {
    /// Clients joining at once.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Size of the document's text, in bytes.
    #[arg(long, default_value_t = 5_000_000)]
    pub doc_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct JoinStormResult {
    pub options: JoinStormOptions,
    /// Time from the storm's start until each client was synced.
    pub time_to_sync: Latency,
    pub all_synced_secs: f64,
    /// Bytes each synced client received (the document's state as the server sent it).
    pub bytes_per_client: u64,
    pub errors: u64,
    pub usage: Usages,
}

/// Writes a text of `bytes` bytes into `doc_name` in 64 KiB edits and waits until a fresh client
/// sees all of it. The writer stays connected (returned): servers without storage drop a
/// document when its last client leaves.
async fn seed_document(run: &Run, doc_name: &str, bytes: usize) -> Result<Conn> {
    let local = yrs::Doc::with_client_id(u64::from(u32::MAX) + run.seed % 1000);
    let text = local.get_or_insert_text("content");
    let mut writer = Conn::join(&run.target, doc_name, Some(&local), JOIN_TIMEOUT).await?;
    let chunk: String = "lorem ipsum dolor sit amet, ".repeat(2400)[..65_536].to_owned();
    let mut written = text.len(&local.transact()) as usize;
    while written < bytes {
        let piece = &chunk[..(bytes - written).min(chunk.len())];
        let update = {
            let mut t = local.transact_mut();
            let len = text.len(&t);
            text.insert(&mut t, len, piece);
            t.encode_update_v1()
        };
        writer
            .send(&Message::Sync(SyncMessage::Update(update)))
            .await?;
        written += piece.len();
    }
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let check = yrs::Doc::new();
        let checker = Conn::join(&run.target, doc_name, Some(&check), JOIN_TIMEOUT).await?;
        let have = check.get_or_insert_text("content").len(&check.transact()) as usize;
        checker.close().await;
        if have >= bytes {
            break;
        }
        if Instant::now() > deadline {
            bail!("the server holds {have} of {bytes} bytes of {doc_name} after {JOIN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(writer)
}

pub async fn join_storm(run: &Run, options: &JoinStormOptions) -> Result<JoinStormResult> {
    let doc_name = run.doc("storm");
    let writer = seed_document(run, &doc_name, options.doc_bytes).await?;
    let probes = Probes::start(run.server_pid, &run.node_pids);
    let start = Instant::now();
    let tasks: Vec<_> = (0..options.clients)
        .map(|_| {
            let (target, doc_name) = (run.target.clone(), doc_name.clone());
            tokio::spawn(async move {
                let conn = Conn::join(&target, &doc_name, None, JOIN_TIMEOUT).await;
                (start.elapsed(), conn)
            })
        })
        .collect();
    let mut h = histogram();
    let mut errors = 0;
    let mut conns = Vec::new();
    for task in tasks {
        let (took, conn) = task.await?;
        match conn {
            // A client that did not receive the whole document was not synced.
            Ok(conn) if conn.bytes_in >= options.doc_bytes as u64 => {
                let _ = h.record((took.as_micros() as u64).max(1));
                conns.push(conn);
            }
            Ok(_) | Err(_) => errors += 1,
        }
    }
    let all_synced_secs = if h.is_empty() {
        start.elapsed().as_secs_f64()
    } else {
        h.max() as f64 / 1e6
    };
    let usage = probes.finish();
    let bytes_per_client =
        conns.iter().map(|c| c.bytes_in).sum::<u64>() / conns.len().max(1) as u64;
    for conn in conns {
        conn.close().await;
    }
    writer.close().await;
    Ok(JoinStormResult {
        options: options.clone(),
        time_to_sync: Latency::of(&h),
        all_synced_secs,
        bytes_per_client,
        errors,
        usage,
    })
}

// ---------------------------------------------------------------------------------------------
// trace

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct TraceOptions {
    /// An editing trace (`.json` or `.json.gz`, josephg/editing-traces format).
    #[arg(long)]
    pub trace: std::path::PathBuf,
    /// Connections the trace's transactions are dealt to, round-robin.
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TraceResult {
    pub options: TraceOptions,
    pub transactions: usize,
    pub total_secs: f64,
    pub updates_per_sec: f64,
    /// Every client ended with the trace's `endContent`.
    pub clients_exact: bool,
    /// The engine's stored text equals `endContent` (None: the server has no API to ask).
    pub storage_exact: Option<bool>,
    pub usage: Usages,
}

/// Bound on one trace replay.
const TRACE_TIMEOUT: Duration = Duration::from_secs(600);

/// The client id that authors a replayed trace.
const AUTHOR: yrs::block::ClientID = yrs::block::ClientID::new(7);

/// A trace: its transactions as (position, deleted, inserted) patches, and the final text.
pub struct Trace {
    pub txns: Vec<Vec<(u32, u32, String)>>,
    pub end: String,
}

pub fn load_trace(path: &Path) -> Result<Trace> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("trace {}", path.display()))?;
    let mut json = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut json)?;
    } else {
        std::io::BufReader::new(file).read_to_string(&mut json)?;
    }
    let value: serde_json::Value = serde_json::from_str(&json)?;
    let bad = || anyhow::anyhow!("{}: not an editing trace", path.display());
    let txns = value["txns"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|t| {
            t["patches"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|p| {
                    Ok((
                        p[0].as_u64().ok_or_else(bad)? as u32,
                        p[1].as_u64().ok_or_else(bad)? as u32,
                        p[2].as_str().ok_or_else(bad)?.to_owned(),
                    ))
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let end = value["endContent"].as_str().ok_or_else(bad)?.to_owned();
    Ok(Trace { txns, end })
}

/// The trace as one Yjs update per transaction made by one author, the author's clock after
/// each, and the author's document.
pub fn trace_updates(trace: &Trace) -> Result<(Vec<Vec<u8>>, Vec<u32>, yrs::Doc)> {
    let author = yrs::Doc::with_client_id(AUTHOR.get());
    let text = author.get_or_insert_text("content");
    let mut updates = Vec::with_capacity(trace.txns.len());
    let mut clocks = Vec::with_capacity(trace.txns.len());
    for txn in &trace.txns {
        let mut t = author.transact_mut();
        for (pos, del, ins) in txn {
            // Positions count code points; yrs counts UTF-8 bytes by default, which equals it for
            // the ASCII traces this harness ships with.
            if *del > 0 {
                text.remove_range(&mut t, *pos, *del);
            }
            if !ins.is_empty() {
                text.insert(&mut t, *pos, ins);
            }
        }
        updates.push(t.encode_update_v1());
        clocks.push(t.after_state().get(&AUTHOR));
    }
    if text.get_string(&author.transact()) != trace.end {
        bail!("replaying the trace locally does not give its endContent (not an ASCII trace?)");
    }
    Ok((updates, clocks, author))
}

pub async fn trace(run: &Run, options: &TraceOptions) -> Result<TraceResult> {
    let trace = load_trace(&options.trace)?;
    let (updates, clocks, author) = trace_updates(&trace)?;
    let final_clock = author.transact().state_vector().get(&AUTHOR);
    let clocks = Arc::new(clocks);
    let end = Arc::new(trace.end.clone());
    let doc_name = run.doc("trace");
    let k = options.clients.max(1);
    let updates = Arc::new(updates);
    let mut clients = Vec::with_capacity(k);
    for _ in 0..k {
        let local = yrs::Doc::new();
        let conn = Conn::join(&run.target, &doc_name, Some(&local), JOIN_TIMEOUT).await?;
        clients.push((conn, local));
    }
    let probes = Probes::start(run.server_pid, &run.node_pids);
    let progress = bar(run, updates.len() as u64, "trace");
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (conn, local))| {
            let (updates, clocks, end, progress) = (
                updates.clone(),
                clocks.clone(),
                end.clone(),
                progress.clone(),
            );
            tokio::spawn(trace_client(
                conn,
                local,
                i,
                k,
                updates,
                clocks,
                final_clock,
                end,
                progress,
            ))
        })
        .collect();
    let mut exact = true;
    for task in tasks {
        let text = task.await??;
        exact &= text == trace.end;
    }
    let total = start.elapsed().as_secs_f64();
    let usage = probes.finish();
    progress.finish_and_clear();
    let storage_exact = match run.target.http_base() {
        Some(base) => {
            let url = format!("{base}/v1/data/{doc_name}?format=text&name=content");
            let (status, body) =
                crate::http::request("GET", &url, run.target.token.as_deref(), &[]).await?;
            Some(status == 200 && body == trace.end.as_bytes())
        }
        None => None,
    };
    Ok(TraceResult {
        options: options.clone(),
        transactions: updates.len(),
        total_secs: total,
        updates_per_sec: updates.len() as f64 / total,
        clients_exact: exact,
        storage_exact,
        usage,
    })
}

/// Sends every k-th update, each once it has everything before it (the clients take turns, so
/// no update reaches anyone ahead of its predecessors), applies everything it receives, and
/// returns its text once it has the whole trace.
#[allow(clippy::too_many_arguments)]
async fn trace_client(
    conn: Conn,
    local: yrs::Doc,
    index: usize,
    k: usize,
    updates: Arc<Vec<Vec<u8>>>,
    clocks: Arc<Vec<u32>>,
    final_clock: u32,
    end: Arc<String>,
    progress: indicatif::ProgressBar,
) -> Result<String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let Conn {
        mut sink,
        mut stream,
        target,
        doc,
        ..
    } = conn;
    let mut mine = updates.iter().enumerate().skip(index).step_by(k);
    let mut next = mine.next();
    let clock = |d: &yrs::Doc| d.transact().state_vector().get(&AUTHOR);
    // Deletions do not move the clock: once it is complete, the text must match too, or stay
    // unchanged for a while (then it is reported as differing).
    let end = end.as_str();
    let done = |d: &yrs::Doc| {
        clock(d) >= final_clock && d.get_or_insert_text("content").get_string(&d.transact()) == end
    };
    let deadline = tokio::time::Instant::now() + TRACE_TIMEOUT;
    while next.is_some() || !done(&local) {
        tokio::select! {
            biased;
            incoming = stream.next() => {
                match incoming {
                    Some(Ok(WsMessage::Binary(frame))) => {
                        if let Some(Message::Sync(SyncMessage::Update(u) | SyncMessage::SyncStep2(u))) = target.decode(&frame)? {
                            apply(&local, &u)?;
                        }
                    }
                    Some(Ok(WsMessage::Close(_))) | None => bail!("{doc}: connection closed during the trace"),
                    Some(Err(e)) => bail!("{doc}: {e}"),
                    Some(Ok(_)) => {}
                }
            }
            sent = async {
                match next {
                    Some((i, update)) if i == 0 || clock(&local) >= clocks[i - 1] => {
                        let frame = target.frame(&doc, &Message::Sync(SyncMessage::Update(update.clone())));
                        sink.send(WsMessage::Binary(frame.into())).await
                    }
                    _ => std::future::pending().await,
                }
            } => {
                sent?;
                if let Some((_, update)) = next {
                    apply(&local, update)?;
                    progress.inc(1);
                }
                next = mine.next();
            }
            _ = tokio::time::sleep(Duration::from_secs(5)), if next.is_none() && clock(&local) >= final_clock => break,
            _ = tokio::time::sleep(Duration::from_secs(5)), if next.is_none() && clock(&local) >= final_clock => break,
            _ = tokio::time::sleep_until(deadline) => bail!("{doc}: trace not complete in time (client {index} has clock {} of {final_clock})", clock(&local)),
        }
    }
    let text = local
        .get_or_insert_text("content")
        .get_string(&local.transact());
    let _ = sink.close().await;
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// cold load

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct ColdLoadOptions {
    /// The trace whose final state is the document.
    #[arg(long)]
    pub trace: std::path::PathBuf,
    /// Cold loads measured (the document unloads between them).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ColdLoadResult {
    pub options: ColdLoadOptions,
    pub state_bytes: usize,
    pub loads_ms: Vec<f64>,
    pub median_ms: f64,
    pub min_ms: f64,
}

/// Stores the trace's final state through the engine's REST API, then repeatedly waits until the
/// engine has unloaded it and times a client's join (load from storage + sync).
pub async fn cold_load(run: &Run, options: &ColdLoadOptions) -> Result<ColdLoadResult> {
    let Some(base) = run.target.http_base() else {
        bail!("cold-load needs the engine's REST API (the other servers keep documents only in memory)");
    };
    let trace = load_trace(&options.trace)?;
    let (_, _, author) = trace_updates(&trace)?;
    let state = author
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    let doc_name = run.doc("cold");
    let token = run.target.token.as_deref();
    let (status, body) =
        crate::http::request("PUT", &format!("{base}/v1/data/{doc_name}"), token, &state).await?;
    if status != 200 {
        bail!(
            "storing the document: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let mut loads = Vec::with_capacity(options.repeat);
    for _ in 0..options.repeat.max(1) {
        wait_unloaded(&base).await?;
        let start = Instant::now();
        let conn = Conn::join(&run.target, &doc_name, None, JOIN_TIMEOUT).await?;
        loads.push(start.elapsed().as_secs_f64() * 1000.0);
        conn.close().await;
    }
    let mut sorted = loads.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(ColdLoadResult {
        options: options.clone(),
        state_bytes: state.len(),
        median_ms: sorted[sorted.len() / 2],
        min_ms: sorted[0],
        loads_ms: loads,
    })
}

/// Waits (up to 120 s) until the engine holds no document in memory.
async fn wait_unloaded(base: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) =
            crate::http::request("GET", &format!("{base}/v1/health"), None, &[]).await?;
        let health: serde_json::Value = serde_json::from_slice(&body)?;
        if health["documents_loaded"].as_u64() == Some(0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the engine kept documents loaded for 120 s: start it with a short --doc-idle-secs"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
