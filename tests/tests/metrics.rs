//! `GET {ctx}/metrics`, read by the official Prometheus client's parser: what happened shows
//! (updates, refusals, closes by code), states are current, and access follows
//! `synchrony.metrics.access`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use synchrony::auth::{mint_hs256, MintClaims};
use synchrony::gate::unix_now;
use synchrony_tests::{EngineOptions, EngineProcess, RawClient, YClient, WAIT};

const SECRET: &str = "metrics-test-secret-0123456789abcdef";

fn token(access: &[(&str, &str)]) -> String {
    let now = unix_now();
    let claims = MintClaims {
        iss: Some("host".into()),
        aud: None,
        sub: Some("ops".into()),
        iat: now,
        exp: now + 600,
        access: access
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        session: None,
    };
    mint_hs256(&claims, SECRET).unwrap()
}

/// The samples of an exposition, by name and labels, parsed by `prometheus_client`.
fn parse(text: &str) -> HashMap<(String, String), f64> {
    synchrony_tests::python_tool("metrics.py", &[], text)
        .lines()
        .map(|line| {
            let (name, labels, value): (String, serde_json::Value, f64) =
                serde_json::from_str(line).unwrap();
            ((name, labels.to_string()), value)
        })
        .collect()
}

fn sample(samples: &HashMap<(String, String), f64>, name: &str, labels: &str) -> f64 {
    *samples
        .get(&(name.to_owned(), labels.to_owned()))
        .unwrap_or_else(|| panic!("no sample {name}{labels}: {samples:?}"))
}

#[tokio::test]
async fn metrics_show_what_happened_and_follow_the_access_setting() {
    let engine = EngineProcess::start(&EngineOptions::default().arg("--jwt-secret", SECRET)).await;
    let doc = "ops/page";
    let editor_token = token(&[("/data/ops/page", "full")]);
    let mut editor = YClient::synced(&engine, &format!("{doc}?token={editor_token}"), true).await;
    editor.append("hello").await;
    editor
        .wait_until("the edit to be durable", |c| c.acked_edits() == 1)
        .await;
    // A refused token and a connection closed for a text frame.
    let refused = engine
        .request("GET", &format!("/v1/data/{doc}"), Some("not.a.jwt"), b"")
        .await;
    assert_eq!(refused.status, 401);
    let mut rude = RawClient::connect(&engine.ws_url(doc, &format!("token={editor_token}")))
        .await
        .unwrap();
    {
        use futures_util::SinkExt;
        rude.ws
            .send(tokio_tungstenite::tungstenite::Message::Text("hi".into()))
            .await
            .unwrap();
    }
    let _ = rude.ended(WAIT).await;

    // From loopback (the default access) no token is needed. The closed session leaves the
    // count as its task ends, just after the client saw the close.
    let deadline = tokio::time::Instant::now() + WAIT;
    let samples = loop {
        let (status, text) = engine.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        let samples = parse(&text);
        let settled = samples.get(&("synchrony_connections".into(), "{}".into())) == Some(&1.0);
        if settled || tokio::time::Instant::now() > deadline {
            break samples;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(sample(&samples, "synchrony_connections", "{}"), 1.0);
    assert!(sample(&samples, "synchrony_updates_received_total", "{}") >= 1.0);
    assert!(sample(&samples, "synchrony_update_bytes_received_total", "{}") >= 5.0);
    assert!(sample(&samples, "synchrony_documents_loaded", "{}") >= 1.0);
    assert!(sample(&samples, "synchrony_document_loads_total", "{}") >= 1.0);
    assert_eq!(sample(&samples, "synchrony_storage_up", "{}"), 1.0);
    // The acknowledged edit was committed, timed, without a storage error.
    assert!(sample(&samples, "synchrony_committed_updates_total", "{}") >= 1.0);
    assert!(sample(&samples, "synchrony_commit_seconds_count", "{}") >= 1.0);
    assert!(sample(&samples, "synchrony_commit_seconds_sum", "{}") > 0.0);
    assert_eq!(
        sample(&samples, "synchrony_storage_errors_total", "{}"),
        0.0
    );
    assert_eq!(sample(&samples, "synchrony_ready", "{}"), 1.0);
    // The document's load and the edit's way to the other clients were timed; what went out
    // was counted, and nobody fell behind.
    assert!(sample(&samples, "synchrony_document_load_seconds_count", "{}") >= 1.0);
    assert_eq!(
        sample(&samples, "synchrony_broadcast_seconds_count", "{}"),
        1.0
    );
    assert!(sample(&samples, "synchrony_broadcast_seconds_sum", "{}") > 0.0);
    assert!(sample(&samples, "synchrony_frames_sent_total", "{}") >= 2.0);
    assert!(sample(&samples, "synchrony_bytes_sent_total", "{}") >= 5.0);
    assert_eq!(sample(&samples, "synchrony_resyncs_total", "{}"), 0.0);
    assert_eq!(
        sample(&samples, "synchrony_lagged_clients_total", "{}"),
        0.0
    );
    assert_eq!(
        sample(
            &samples,
            "synchrony_auth_refusals_total",
            r#"{"type":"jwt/malformed"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            "synchrony_connection_closes_total",
            r#"{"code":"1003"}"#
        ),
        1.0
    );
    drop(editor);

    // With access `token`, an admin token is needed even from loopback.
    let guarded = EngineProcess::start(
        &EngineOptions::default()
            .arg("--jwt-secret", SECRET)
            .arg("--metrics-access", "token"),
    )
    .await;
    let bare = guarded.request("GET", "/metrics", None, b"").await;
    assert_eq!(bare.status, 401, "{}", bare.text());
    let editor = guarded
        .request("GET", "/metrics", Some(&editor_token), b"")
        .await;
    assert_eq!(editor.status, 403, "{}", editor.text());
    let admin = guarded
        .request("GET", "/metrics", Some(&token(&[("admin", "admin")])), b"")
        .await;
    assert_eq!(admin.status, 200, "{}", admin.text());
    assert!(parse(&admin.text()).contains_key(&("synchrony_ready".into(), "{}".into())));
}

/// Every HTTP request carries an id: the caller's `x-request-id` or a fresh UUID, echoed in the
/// response and named by the log lines the request causes.
#[tokio::test]
async fn every_request_has_an_id_that_is_echoed_and_logged() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let given = synchrony_tests::http(
        engine.port,
        "GET",
        "/synchrony/v1/health",
        &[("x-request-id", "trace-me-4711")],
        b"",
    )
    .await;
    assert_eq!(given.status, 200);
    assert_eq!(given.header("x-request-id"), Some("trace-me-4711"));
    let fresh = synchrony_tests::http(engine.port, "GET", "/synchrony/heartbeat", &[], b"").await;
    let id = fresh
        .header("x-request-id")
        .expect("a generated request id");
    // A UUID: 36 characters, hex digits and four dashes.
    assert!(
        id.len() == 36 && id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
        "{id}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(engine.log().contains("trace-me-4711") && engine.log().contains(id)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request ids are not in the log:\n{}",
            engine.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// With `synchrony.metrics.statsd.host` set, the metrics are pushed over UDP in the statsD line
/// format: counters as what they grew by, gauges as values.
#[tokio::test]
async fn metrics_are_pushed_to_statsd() {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let engine = EngineProcess::start(
        &EngineOptions::default()
            .arg("--metrics-statsd-host", "127.0.0.1")
            .arg("--metrics-statsd-port", port)
            .arg("--metrics-statsd-prefix", "wiki.synchrony")
            .arg("--metrics-statsd-interval-secs", 1),
    )
    .await;
    let mut editor = YClient::synced(&engine, "ops/statsd", true).await;
    editor.append("pushed").await;
    editor
        .wait_until("the edit to be durable", |c| c.acked_edits() == 1)
        .await;
    // Counts arrive as increments: their sum over the pushes is the total the endpoint shows
    // (the client's sync step 2 and its edit).
    let (_, text) = engine.get("/metrics").await;
    let total: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("synchrony_updates_received_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no updates_received_total in {text}"));
    assert!(total >= 1);
    let mut updates = 0;
    let mut connections_seen = false;
    let mut buffer = [0u8; 65_536];
    let deadline = tokio::time::Instant::now() + WAIT;
    while updates < total || !connections_seen {
        let received = tokio::time::timeout_at(deadline, socket.recv(&mut buffer))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no statsD lines for updates and connections within {WAIT:?}; engine log:\n{}",
                    engine.log()
                )
            })
            .unwrap();
        for line in String::from_utf8_lossy(&buffer[..received]).lines() {
            if let Some(n) = line.strip_prefix("wiki.synchrony.updates_received_total:") {
                updates += n.trim_end_matches("|c").parse::<u64>().unwrap();
            }
            if line == "wiki.synchrony.connections:1|g" {
                connections_seen = true;
            }
        }
    }
    assert_eq!(updates, total);
}
