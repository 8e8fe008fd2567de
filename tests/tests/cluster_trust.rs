//! The cluster on a network nobody trusts: attacked from outside, as real processes.
//!
//! - A relay that holds no cluster secret sits between two nodes (one node's member list points
//!   at it, as a spoofed registry entry or DNS answer would), passes the handshake through, then
//!   injects, replays and reorders frames: no page changes, the link is dropped, and both nodes
//!   say why. Its capture holds no plaintext of a typed edit.
//! - Oversized and slow hellos and a thousand half-open handshakes on the peer port: memory and
//!   logs stay bounded and the real link is undisturbed.
//! - A node without the database URL does not start; one on another PostgreSQL database is
//!   refused by the cluster, says why, fails its heartbeat and serves no page.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use synchrony_protocol::peer::PeerMessage;
use synchrony_protocol::{encode_message, Message, SyncMessage};
use synchrony_tests::{
    run_engine_to_exit, EngineOptions, EngineProcess, PgDatabase, YClient, WAIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use yrs::{Text, Transact};

const SECRET: &str = "trust-test-cluster-secret-0123456789";

/// Peer addresses of a test's own: `127.<pid>.<k>.<i>:25500`.
fn peer_addresses(n: u8) -> Vec<String> {
    static NEXT: AtomicU8 = AtomicU8::new(100);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let p = (std::process::id() % 250) as u8 + 1;
    (1..=n).map(|i| format!("127.{p}.{k}.{i}:25500")).collect()
}

fn node(db: &str, name: &str, me: &str, members: &[String]) -> EngineOptions {
    let (ip, _) = me.rsplit_once(':').unwrap();
    EngineOptions::postgres(db)
        .arg("--cluster-join-type", "tcpip")
        .arg("--cluster-bind", ip)
        .arg("--cluster-join-tcpip-members", members.join(","))
        .arg("--cluster-authentication-secret", SECRET)
        .arg("--cluster-name", "trust")
        .arg("--node-name", name)
}

async fn cluster_json(node: &EngineProcess) -> serde_json::Value {
    let (status, body) = node.get("/v1/cluster").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    log: impl Fn() -> String,
    check: impl Fn() -> F,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {WAIT:?}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn live_count(node: &EngineProcess) -> usize {
    cluster_json(node).await["live"]
        .as_array()
        .map_or(0, Vec::len)
}

/// What the relay does to the next frame from the dialer after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    Inject = 1,
    Replay = 2,
    Reorder = 3,
}

/// A TCP relay that understands the peer port's length framing but holds no secret.
struct Relay {
    addr: SocketAddr,
    /// Every byte it carried, both ways.
    capture: Arc<Mutex<Vec<u8>>>,
    /// The tampering to do next (0: none); cleared once done.
    action: Arc<AtomicU8>,
    /// Frames it forwarded from dialers after their handshake.
    forwarded: Arc<AtomicUsize>,
    /// The frame injected (a plausible plaintext message carrying an edit).
    injection: Vec<u8>,
}

impl Relay {
    async fn start(target: String, injection: Vec<u8>) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            capture: Arc::default(),
            action: Arc::default(),
            forwarded: Arc::default(),
            injection,
        });
        let me = relay.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let (client_r, client_w) = client.into_split();
                let (server_r, server_w) = server.into_split();
                tokio::spawn(me.clone().forward(client_r, server_w, true));
                tokio::spawn(me.clone().forward(server_r, client_w, false));
            }
        });
        relay
    }

    async fn forward(
        self: Arc<Self>,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        from_dialer: bool,
    ) {
        let mut frames = 0usize;
        let mut held: Option<Vec<u8>> = None;
        loop {
            let mut len = [0u8; 4];
            if from.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut body = vec![0; u32::from_be_bytes(len) as usize];
            if from.read_exact(&mut body).await.is_err() {
                return;
            }
            let frame = [len.as_slice(), &body].concat();
            self.capture.lock().unwrap().extend_from_slice(&frame);
            frames += 1;
            // Frames 1-3 from the dialer are its hello, its Noise message and its first
            // sealed heartbeat: the handshake passes through untouched.
            let mut out = vec![frame.clone()];
            if from_dialer && frames > 3 {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
                if let Some(first) = held.take() {
                    out = vec![frame.clone(), first];
                } else {
                    match self.action.swap(0, Ordering::AcqRel) {
                        1 => {
                            let mut injected = (self.injection.len() as u32).to_be_bytes().to_vec();
                            injected.extend_from_slice(&self.injection);
                            out = vec![injected, frame.clone()];
                        }
                        2 => out = vec![frame.clone(), frame.clone()],
                        3 => {
                            held = Some(frame.clone());
                            out = Vec::new();
                        }
                        _ => {}
                    }
                }
            }
            for f in out {
                if to.write_all(&f).await.is_err() {
                    return;
                }
            }
        }
    }

    fn captured(&self) -> Vec<u8> {
        self.capture.lock().unwrap().clone()
    }
}

/// An update that inserts `text` into the page's `content`, as a client would send it.
fn edit_update(text: &str) -> Vec<u8> {
    let doc = yrs::Doc::with_client_id(4242);
    let content = doc.get_or_insert_text("content");
    let mut txn = doc.transact_mut();
    content.insert(&mut txn, 0, text);
    txn.encode_update_v1()
}

/// Two nodes, `a` linked to `b` only through a relay; a page owned by `b` edited from `a`.
struct Pair {
    _db: PgDatabase,
    a: EngineProcess,
    b: EngineProcess,
    relay: Arc<Relay>,
    doc: String,
    client: YClient,
}

impl Pair {
    async fn start() -> Self {
        let db = PgDatabase::create().await;
        let addrs = peer_addresses(2);
        let injected = PeerMessage::Data {
            stream: 1,
            frame: encode_message(&Message::Sync(SyncMessage::Update(edit_update("INJECTED")))),
        }
        .encode();
        let relay = Relay::start(addrs[1].clone(), injected).await;
        // `a` sorts first, so the link it dials (through the relay) is the one both keep.
        let b = EngineProcess::start(&node(
            &db.url,
            "b-node",
            &addrs[1],
            &[relay.addr.to_string()],
        ))
        .await;
        let a = EngineProcess::start(&node(
            &db.url,
            "a-node",
            &addrs[0],
            &[relay.addr.to_string()],
        ))
        .await;
        for n in [&a, &b] {
            wait_for(
                "two live members",
                || n.log(),
                || async { live_count(n).await == 2 },
            )
            .await;
        }
        let mut doc = String::new();
        for i in 0.. {
            doc = format!("trust/page-{i}");
            let (_, body) = a.get(&format!("/v1/cluster/owner/{doc}")).await;
            if body.contains("\"owner\":\"b-node\"") {
                break;
            }
        }
        let client = YClient::synced(&a, &doc, true).await;
        Self {
            _db: db,
            a,
            b,
            relay,
            doc,
            client,
        }
    }

    fn logs(&self) -> String {
        format!("a:\n{}\nb:\n{}", self.a.log(), self.b.log())
    }

    async fn text_on_b(&self) -> String {
        let (status, body) = self
            .b
            .get(&format!("/v1/data/{}?format=text&name=content", self.doc))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Types `text` on `a`'s client and waits until the owner `b` holds it.
    async fn type_and_wait(&mut self, text: &str) {
        self.client.append(text).await;
        let expected = self.client.text();
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.text_on_b().await != expected {
            let _ = self.client.pump_one(Duration::from_millis(50)).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "b never got {text:?}:\n{}",
                self.logs()
            );
        }
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_secret_can_neither_read_nor_alter_the_link() {
    for tamper in [Tamper::Inject, Tamper::Replay, Tamper::Reorder] {
        let mut pair = Pair::start().await;
        let marker = format!("secret-edit-{}", rand::random::<u64>());
        pair.type_and_wait(&marker).await;
        assert!(
            pair.relay.forwarded.load(Ordering::Relaxed) > 0,
            "the link does not go through the relay:\n{}",
            pair.logs()
        );
        // Nothing typed crosses in the clear.
        let capture = pair.relay.captured();
        assert!(
            !capture
                .windows(marker.len())
                .any(|w| w == marker.as_bytes()),
            "the relay read a typed edit in its capture"
        );
        let before = count(&pair.b.log(), "altered or injected traffic");
        pair.relay.action.store(tamper as u8, Ordering::Release);
        // Traffic for the relay to tamper with: keep typing until the receiving node notices.
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut n = 0;
        while count(&pair.b.log(), "altered or injected traffic") == before {
            n += 1;
            pair.client.append(&format!(" {n}")).await;
            let _ = pair.client.pump_one(Duration::from_millis(50)).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "{tamper:?}: b did not notice:\n{}",
                pair.logs()
            );
        }
        // The dialer hears why from the other end.
        wait_for(
            &format!("{tamper:?}: a logs why the link closed"),
            || pair.logs(),
            || async {
                pair.a.log().contains("peer closed the link")
                    && pair.a.log().contains("failed authentication")
            },
        )
        .await;
        // The link comes back (through the relay), the page converges, and nothing was injected.
        for n in [&pair.a, &pair.b] {
            wait_for(
                "the link back",
                || n.log(),
                || async { live_count(n).await == 2 },
            )
            .await;
        }
        pair.type_and_wait(" after").await;
        let text = pair.text_on_b().await;
        assert!(
            !text.contains("INJECTED"),
            "{tamper:?}: injected text reached the page: {text}"
        );
        assert!(
            text.contains(&marker) && text.ends_with(" after"),
            "{tamper:?}: {text}"
        );
        assert_eq!(pair.client.text(), text);
        println!("{tamper:?}: refused and logged on both nodes; page intact");
    }
}

/// Opens a connection to the peer port and sends `bytes`; returns it still open.
async fn knock(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    stream
}

/// Whether the node closed `stream` within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_before_authentication_grows() {
    let db = PgDatabase::create().await;
    let addrs = peer_addresses(2);
    let a = EngineProcess::start(&node(&db.url, "a-node", &addrs[0], &addrs)).await;
    let b = EngineProcess::start(&node(&db.url, "b-node", &addrs[1], &addrs)).await;
    for n in [&a, &b] {
        wait_for(
            "two live members",
            || n.log(),
            || async { live_count(n).await == 2 },
        )
        .await;
    }
    let epoch = cluster_json(&a).await["epoch"].as_u64().unwrap();
    let rss_before = a.rss_kib();
    let log_before = a.log().len();

    // A hello announcing 8 MiB, and four announcing 60 MiB frames: closed before anything is
    // read past the cap.
    let mut big = knock(&addrs[0], &(8u32 << 20).to_be_bytes()).await;
    let _ = big.write_all(&vec![b'x'; 1 << 20]).await;
    assert!(
        closed_within(&mut big, WAIT).await,
        "an 8 MiB hello was not refused"
    );
    let mut huge = Vec::new();
    for _ in 0..4 {
        huge.push(knock(&addrs[0], &(60u32 << 20).to_be_bytes()).await);
    }
    for s in &mut huge {
        assert!(
            closed_within(s, WAIT).await,
            "a 60 MiB frame announcement was not refused"
        );
    }
    // A thousand half-open handshakes: past the cap they are closed at once, the rest at the
    // handshake deadline.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(knock(&addrs[0], &[]).await);
    }
    let mut closed_at_once = 0;
    for s in idle.iter_mut().skip(100) {
        if closed_within(s, Duration::from_millis(500)).await {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 800,
        "only {closed_at_once} of the connections past the cap were closed at once"
    );
    let started = tokio::time::Instant::now();
    for s in &mut idle {
        assert!(
            closed_within(s, WAIT).await,
            "a half-open handshake outlived the deadline"
        );
    }
    println!(
        "every half-open handshake closed {:?} after the last was checked",
        started.elapsed()
    );
    // A slow hello (a byte at a time): cut off at the deadline.
    let mut slow = knock(&addrs[0], &[0, 0]).await;
    assert!(
        closed_within(&mut slow, Duration::from_secs(8)).await,
        "a slow hello was not cut off"
    );

    let rss_after = a.rss_kib();
    // Test engines log at debug; an operator's (info and above) is what must stay short.
    let log = a.log();
    let loud: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .collect();
    let longest = loud.iter().map(|l| l.len()).max().unwrap_or(0);
    println!(
        "RSS {rss_before} → {rss_after} KiB; {} lines at info and above for ~1,000 refused connections, the longest {longest} bytes",
        loud.len()
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert!(
        loud.len() <= 10 && longest < 1024,
        "the refusals were logged too loudly:\n{}",
        loud.join("\n")
    );
    // The real link never noticed.
    assert_eq!(
        cluster_json(&a).await["epoch"].as_u64().unwrap(),
        epoch,
        "{}",
        a.log()
    );
    assert_eq!(live_count(&b).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_another_store_neither_joins_nor_serves() {
    // Without the database URL a cluster node does not start at all.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let (code, log) = run_engine_to_exit(&[
        "serve",
        "--port",
        "0",
        "--data-dir",
        &data_dir,
        "--cluster-join-type",
        "tcpip",
        "--cluster-join-tcpip-members",
        "127.0.0.1:25500",
        "--cluster-authentication-secret",
        SECRET,
    ])
    .await;
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("storage is SQLite") && log.contains("synchrony.database.url"),
        "{log}"
    );

    // On another PostgreSQL database: refused by the cluster, and it stops serving.
    let db = PgDatabase::create().await;
    let other = PgDatabase::create().await;
    let addrs = peer_addresses(3);
    let a = EngineProcess::start(&node(&db.url, "a-node", &addrs[0], &addrs)).await;
    let b = EngineProcess::start(&node(&db.url, "b-node", &addrs[1], &addrs)).await;
    for n in [&a, &b] {
        wait_for(
            "two live members",
            || n.log(),
            || async { live_count(n).await == 2 },
        )
        .await;
    }
    let stray = EngineProcess::start(&node(&other.url, "stray-node", &addrs[2], &addrs)).await;
    wait_for(
        "the stray node refusing and failing its heartbeat",
        || stray.log(),
        || async { stray.get("/heartbeat").await.0 == 503 },
    )
    .await;
    assert!(
        stray.log().contains("uses another database"),
        "{}",
        stray.log()
    );
    for n in [&a, &b] {
        wait_for(
            "the members logging the refusal",
            || n.log(),
            || async {
                n.log()
                    .contains("refused a cluster member on another database")
            },
        )
        .await;
        assert_eq!(n.get("/heartbeat").await.0, 200, "{}", n.log());
        assert_eq!(live_count(n).await, 2, "{}", n.log());
    }
    let health = stray.health().await;
    assert!(
        health["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not the cluster's"),
        "{health}"
    );
    // It serves no page: editors are turned away, REST too.
    let refused = synchrony_tests::RawClient::connect(&stray.ws_url("trust/any", "")).await;
    assert!(refused.is_err(), "the stray node admitted an editor");
    let (status, _) = stray.get("/v1/data/trust/any").await;
    assert_eq!(status, 503);
}

const JWT: &str = "trust-test-jwt-secret-0123456789abcdef";

fn token(access: &[(&str, &str)]) -> String {
    let now = synchrony::gate::unix_now();
    let claims = synchrony::auth::MintClaims {
        iss: Some("test".into()),
        aud: None,
        sub: Some("editor".into()),
        iat: now,
        exp: now + 3600,
        access: access
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        session: None,
    };
    synchrony::auth::mint_hs256(&claims, JWT).unwrap()
}

/// The bytes this node has sent to `peer` over its link, from its metrics.
async fn link_bytes_sent(node: &EngineProcess, peer: &str) -> u64 {
    let admin = token(&[("admin", "admin")]);
    let response = node.request("GET", "/metrics", Some(&admin), b"").await;
    assert_eq!(response.status, 200, "{}", response.text());
    let needle = format!("synchrony_cluster_link_bytes_sent_total{{peer=\"{peer}\"}} ");
    response
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_page_owned_elsewhere_is_refused_before_its_body_is_read() {
    let db = PgDatabase::create().await;
    let addrs = peer_addresses(2);
    let a =
        EngineProcess::start(&node(&db.url, "a-node", &addrs[0], &addrs).arg("--jwt-secret", JWT))
            .await;
    let b =
        EngineProcess::start(&node(&db.url, "b-node", &addrs[1], &addrs).arg("--jwt-secret", JWT))
            .await;
    for n in [&a, &b] {
        wait_for(
            "two live members",
            || n.log(),
            || async { live_count(n).await == 2 },
        )
        .await;
    }
    let admin = token(&[("admin", "admin")]);
    let mut doc = String::new();
    for i in 0.. {
        doc = format!("trust/rest-{i}");
        let owner = a
            .request(
                "GET",
                &format!("/v1/cluster/owner/{doc}"),
                Some(&admin),
                b"",
            )
            .await;
        if owner.text().contains("\"owner\":\"b-node\"") {
            break;
        }
    }
    let path = format!("/v1/data/{doc}");
    let before = link_bytes_sent(&a, "b-node").await;
    let other_page = token(&[("/data/trust/elsewhere", "full")]);
    let read_only = token(&[(&format!("/data/{doc}"), "read")]);
    for (what, token, status) in [
        ("no token", None, "401"),
        (
            "a bad signature",
            Some(format!("{}x", token(&[("/data/trust/*", "full")]))),
            "401",
        ),
        ("another page's token", Some(other_page), "403"),
        ("a read-only token", Some(read_only), "403"),
    ] {
        let line = synchrony_tests::put_head(&a, &path, token.as_deref(), 40 << 20).await;
        assert!(
            line.contains(status),
            "{what}: a 40 MiB PUT to a non-owner answered {line:?}, not {status}"
        );
    }
    // Heartbeats cross meanwhile (a few hundred bytes a beat); the 40 MiB bodies did not.
    let after = link_bytes_sent(&a, "b-node").await;
    println!(
        "link bytes during four refused 40 MiB PUTs: {}",
        after - before
    );
    assert!(
        after - before < 256 << 10,
        "{} bytes crossed the link",
        after - before
    );
    // A writer's request is carried to the owner as before.
    let writer = token(&[(&format!("/data/{doc}"), "full")]);
    let reset = a
        .request(
            "PUT",
            &format!("{path}?reset=true&name=content"),
            Some(&writer),
            b"carried",
        )
        .await;
    assert_eq!(reset.status, 200, "{}", reset.text());
    let read = b
        .request(
            "GET",
            &format!("{path}?format=text&name=content"),
            Some(&writer),
            b"",
        )
        .await;
    assert_eq!(read.text(), "carried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_behind_a_proxy_need_an_admin_token_and_cluster_status_prints_them() {
    let db = PgDatabase::create().await;
    let addrs = peer_addresses(2);
    let a =
        EngineProcess::start(&node(&db.url, "a-node", &addrs[0], &addrs).arg("--jwt-secret", JWT))
            .await;
    let b = EngineProcess::start(
        &node(&db.url, "b-node", &addrs[1], &addrs)
            .arg("--jwt-secret", JWT)
            .arg("--trusted-proxies", "127.0.0.1,10.9.0.0/16"),
    )
    .await;
    for n in [&a, &b] {
        wait_for(
            "two live members",
            || n.log(),
            || async { live_count(n).await == 2 },
        )
        .await;
    }
    let admin = token(&[("admin", "admin")]);
    let editor = token(&[("/data/trust/*", "full")]);
    let get = |node: &EngineProcess, path: &str, headers: Vec<(String, String)>| {
        let port = node.port;
        let path = format!("/synchrony{path}");
        async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            synchrony_tests::http(port, "GET", &path, &headers, &[]).await
        }
    };
    let forwarded = |client: &str| vec![("X-Forwarded-For".to_owned(), client.to_owned())];
    let with_token = |client: &str, t: &str| {
        vec![
            ("X-Forwarded-For".to_owned(), client.to_owned()),
            ("Authorization".to_owned(), format!("Bearer {t}")),
        ]
    };
    for path in ["/metrics", "/v1/cluster", "/v1/cluster/owner/trust/page"] {
        // This machine's own unproxied caller (a local Prometheus, the CLI) is let in.
        assert_eq!(
            get(&a, path, vec![]).await.status,
            200,
            "{path} from loopback"
        );
        // Through a proxy on the same host everyone is loopback: not believed.
        let refused = get(&a, path, forwarded("203.0.113.7")).await;
        assert_eq!(
            refused.status,
            401,
            "{path} proxied, no token: {}",
            refused.text()
        );
        assert_eq!(
            get(&a, path, with_token("203.0.113.7", &editor))
                .await
                .status,
            403,
            "{path}, editor token"
        );
        assert_eq!(
            get(&a, path, with_token("203.0.113.7", &admin))
                .await
                .status,
            200,
            "{path}, admin token"
        );
        // A proxy the operator trusts: its X-Forwarded-For decides.
        assert_eq!(
            get(&b, path, forwarded("127.0.0.1")).await.status,
            200,
            "{path} via a trusted proxy for loopback"
        );
        assert_eq!(
            get(&b, path, forwarded("203.0.113.7")).await.status,
            401,
            "{path} via a trusted proxy for outside"
        );
        assert_eq!(
            get(&b, path, forwarded("203.0.113.7, 10.9.1.2"))
                .await
                .status,
            401,
            "{path}: chain of trusted proxies"
        );
    }
    // Health tells an outsider up or down, and an insider everything.
    let outside = get(&a, "/v1/health", forwarded("203.0.113.7")).await;
    assert_eq!(outside.status, 200);
    assert_eq!(outside.json(), serde_json::json!({"status": "ok"}));
    let inside = get(&a, "/v1/health", with_token("203.0.113.7", &admin))
        .await
        .json();
    assert_eq!(inside["cluster"]["node"], "a-node", "{inside}");

    // `synchrony cluster status`, the Runbook's first step, as an operator runs it.
    let url = format!("http://127.0.0.1:{}/synchrony", a.port);
    let (code, table, stderr) =
        synchrony_tests::run_cli(&["cluster", "status", "--url", &url]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        table.contains("cluster trust") && table.contains("*a-node") && table.contains(" b-node"),
        "{table}"
    );
    assert!(
        table.lines().filter(|l| l.contains("alive")).count() == 2,
        "{table}"
    );
    let (code, json, stderr) = synchrony_tests::run_cli(&[
        "cluster", "status", "--url", &url, "--json", "--token", &admin,
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let view: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(view["self"], "a-node");
    assert_eq!(view["live"].as_array().unwrap().len(), 2, "{view}");
    let (code, _, stderr) =
        synchrony_tests::run_cli(&["cluster", "status", "--url", "http://127.0.0.1:1/synchrony"])
            .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot connect to 127.0.0.1:1"), "{stderr}");
    // The rolling restart's gate: settled at two live members, never at three.
    let (code, table, stderr) =
        synchrony_tests::run_cli(&["cluster", "status", "--url", &url, "--wait-live", "2"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(table.contains("live 2"), "{table}");
    let (code, _, stderr) = synchrony_tests::run_cli(&[
        "cluster",
        "status",
        "--url",
        &url,
        "--wait-live",
        "3",
        "--wait-secs",
        "2",
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("did not settle within 2s: 2 live members of 3"),
        "{stderr}"
    );
}

/// A page id whose owner is `owner` (its node name), asked of `node`.
async fn page_owned_by(node: &EngineProcess, prefix: &str, owner: &str) -> String {
    for i in 0..200 {
        let doc = format!("{prefix}-{i}");
        let (status, body) = node.get(&format!("/v1/cluster/owner/{doc}")).await;
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        if answer["owner"] == owner {
            return doc;
        }
    }
    panic!("no page of 200 is owned by {owner}");
}

/// How long one edit typed on `from` takes to show on `to`.
async fn crossing(from: &mut YClient, to: &mut YClient, marker: &str) -> Duration {
    let started = tokio::time::Instant::now();
    from.append(marker).await;
    to.wait_until(marker, |c| c.text().contains(marker)).await;
    started.elapsed()
}

/// One stream never stalls a link. While a page's load is held up in PostgreSQL (its table
/// locked) and a client floods another page, both owned across the link, a third page's edits
/// keep crossing that link well inside the failure timeout, no member is suspected and the
/// view's epoch stays as it was; the held page then loads and syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_load_and_a_flooding_client_leave_the_link_and_other_pages_alone() {
    let db = PgDatabase::create().await;
    let addrs = peer_addresses(2);
    let a = EngineProcess::start(&node(&db.url, "a", &addrs[0], &addrs)).await;
    let b = EngineProcess::start(&node(&db.url, "b", &addrs[1], &addrs)).await;
    let logs = || format!("a:\n{}\nb:\n{}", a.log(), b.log());
    wait_for("two live members on each node", &logs, || async {
        live_count(&a).await == 2 && live_count(&b).await == 2
    })
    .await;
    // Every page below is owned by a and reached from b, so all of them cross the one link.
    let quiet = page_owned_by(&b, "fair/quiet", "a").await;
    let held = page_owned_by(&b, "fair/held", "a").await;
    let flooded = page_owned_by(&b, "fair/flood", "a").await;
    let mut typist = YClient::synced(&b, &quiet, false).await;
    let mut reader = YClient::synced(&a, &quiet, false).await;
    let mut before = Vec::new();
    for i in 0..10 {
        before.push(crossing(&mut typist, &mut reader, &format!("[before {i}]")).await);
    }
    let mut flooder = YClient::synced(&b, &flooded, false).await;
    let epochs = (
        cluster_json(&a).await["epoch"].clone(),
        cluster_json(&b).await["epoch"].clone(),
    );

    // Hold up every page load: a load reads doc_snapshots, which this transaction locks.
    let mut lock = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE doc_snapshots IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .unwrap();
    let held_url = b.ws_url(&held, "");
    let held_client = tokio::spawn(async move {
        let mut client = synchrony_tests::RawClient::connect(&held_url)
            .await
            .unwrap();
        let step1 = Message::Sync(SyncMessage::SyncStep1(yrs::StateVector::default()));
        client.send_message(&step1).await;
        // Its first answer is the owner's sync step 1 or 2: the page loaded.
        client.next_binary(WAIT * 2).await.is_some()
    });
    // The flood: 1 KiB edits as fast as b takes them, never reading (bounded in count and time).
    let flood = tokio::spawn(async move {
        let chunk = "f".repeat(1024);
        let mut sent = 0u32;
        let pressing = async {
            while sent < 20_000 {
                let update = {
                    let text = flooder.doc.get_or_insert_text("content");
                    let mut txn = flooder.doc.transact_mut();
                    text.insert(&mut txn, 0, &chunk);
                    txn.encode_update_v1()
                };
                let message = Message::Sync(SyncMessage::Update(update));
                if !flooder.raw.try_send(&message).await {
                    break; // b closed it (its queue is full): the flood is over
                }
                sent += 1;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), pressing).await;
        sent
    });
    // For longer than the failure timeout (3 s), the quiet page's edits keep crossing.
    let mut during = Vec::new();
    let stall_ends = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut i = 0;
    while tokio::time::Instant::now() < stall_ends {
        during.push(crossing(&mut typist, &mut reader, &format!("[during {i}]")).await);
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !held_client.is_finished(),
        "the held page loaded while its table was locked"
    );
    for node in [&a, &b] {
        let view = cluster_json(node).await;
        let members = view["members"].as_array().unwrap();
        assert!(
            members.iter().all(|m| m["state"] == "alive"),
            "a member was suspected while one load was held and one page flooded: {view}"
        );
    }
    let now = (
        cluster_json(&a).await["epoch"].clone(),
        cluster_json(&b).await["epoch"].clone(),
    );
    assert_eq!(
        now, epochs,
        "the view changed under a held load and a flood"
    );
    sqlx::raw_sql("COMMIT").execute(&mut lock).await.unwrap();
    assert!(
        held_client.await.unwrap(),
        "the held page never synced once its table was free"
    );
    let flooded_edits = flood.await.unwrap();
    during.sort_unstable();
    let slowest = *during.last().unwrap();
    println!(
        "quiet page across the link: before {:?} (slowest), during a held load and a flood of {flooded_edits} KiB edits {:?} (median of {}), {slowest:?} (slowest)",
        before.iter().max().unwrap(),
        during[during.len() / 2],
        during.len()
    );
    // A stalled link would hold the quiet page's edits until the table is free (8 s) and its
    // heartbeats past the failure timeout (3 s).
    assert!(
        slowest < Duration::from_secs(3),
        "an edit to the quiet page took {slowest:?} to cross while another page was held and one flooded:\n{}",
        logs()
    );
}
