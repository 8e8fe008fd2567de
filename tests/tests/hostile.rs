//! Hostile input that used to take the whole engine down: each is refused on its own connection
//! or request, and the other editors of the document carry on.
#![allow(clippy::unwrap_used)]

use synchrony::auth::{mint_hs256, MintClaims};
use synchrony::gate::unix_now;
use synchrony_protocol::{encode_message, Message, SyncMessage};
use synchrony_tests::{
    sqlite_url, stored_text, Ended, EngineOptions, EngineProcess, RawClient, YClient, WAIT,
};

/// One item in root array `a` whose content is an `Any` array nested `depth` levels (yrs
/// decodes it recursively: 50,000 levels in 100 KB overflowed the engine's stack).
fn nested_any_update(depth: usize) -> Vec<u8> {
    let mut b = vec![1u8, 1, 5, 0, 8, 1, 1, b'a', 1];
    for _ in 0..depth {
        b.extend([117, 1]);
    }
    b.extend([126, 0]);
    b
}

fn var_uint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `depth` Y.Arrays, each inside the previous one, under root array `a`, from client 6: about
/// 7 bytes a level. yrs integrates it, then recurses when it renders or deletes it.
fn nested_types_update(depth: usize) -> Vec<u8> {
    let mut b = vec![1u8];
    var_uint(depth as u64, &mut b);
    b.extend([6, 0]);
    for clock in 0..depth as u64 {
        b.push(7); // an item holding a type, no origins: its parent follows
        if clock == 0 {
            b.extend([1, 1, b'a']);
        } else {
            b.extend([0, 6]);
            var_uint(clock - 1, &mut b);
        }
        b.push(0); // Y.Array
    }
    b.push(0);
    b
}

fn deep_awareness(depth: usize) -> Vec<u8> {
    let json = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let mut clients = std::collections::HashMap::new();
    clients.insert(
        yrs::block::ClientID::new(99),
        yrs::sync::awareness::AwarenessUpdateEntry {
            clock: 1,
            json: json.into(),
        },
    );
    encode_message(&Message::Awareness(yrs::sync::AwarenessUpdate { clients }))
}

const SECRET: &str = "hostile-input-test-secret-0123456789";

fn token(doc: &str, access: &str) -> String {
    let now = unix_now();
    let claims = MintClaims {
        iss: None,
        aud: None,
        sub: Some("mallory".into()),
        iat: now,
        exp: now + 600,
        access: [(format!("/data/{doc}"), access.to_owned())].into(),
        session: None,
    };
    mint_hs256(&claims, SECRET).unwrap()
}

#[test]
fn the_handmade_updates_are_what_yrs_reads() {
    use yrs::updates::decoder::Decode;
    let small = nested_types_update(3);
    let doc = yrs::Doc::new();
    let mut txn = yrs::Transact::transact_mut(&doc);
    txn.apply_update(yrs::Update::decode_v1(&small).unwrap())
        .unwrap();
    assert!(!yrs::ReadTxn::has_missing_updates(&txn));
    assert!(yrs::Update::decode_v1(&nested_any_update(3)).is_ok());
}

#[tokio::test]
async fn deeply_nested_input_is_refused_everywhere_and_hurts_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::sqlite(dir.path()).arg("--jwt-secret", SECRET);
    let engine = EngineProcess::start(&options).await;
    let doc = "app/deep";
    let full = token(doc, "full");
    let read = token(doc, "read");
    let doc_with = |t: &str| format!("{doc}?token={t}");
    let mut bystander = YClient::synced(&engine, &doc_with(&full), true).await;
    let mut watcher = YClient::synced(&engine, &doc_with(&full), false).await;
    bystander.append("base;").await;

    let any = nested_any_update(100_000);
    let types = nested_types_update(40_000);
    assert!(any.len() < 300_000 && types.len() < 300_000);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "an update nesting values",
            &full,
            encode_message(&Message::Sync(SyncMessage::Update(any.clone()))),
        ),
        (
            "an update nesting types",
            &full,
            encode_message(&Message::Sync(SyncMessage::Update(types.clone()))),
        ),
        (
            "a step 2 nesting types",
            &full,
            encode_message(&Message::Sync(SyncMessage::SyncStep2(types.clone()))),
        ),
        (
            "a read-only client's step 2 nesting values",
            &read,
            encode_message(&Message::Sync(SyncMessage::SyncStep2(any.clone()))),
        ),
        (
            "an awareness state nesting JSON",
            &full,
            deep_awareness(20_000),
        ),
    ];
    for (i, (name, token, frame)) in cases.into_iter().enumerate() {
        let mut bad = RawClient::connect(&engine.ws_url(&doc_with(token), ""))
            .await
            .unwrap();
        bad.send(frame).await;
        match bad.ended(WAIT).await {
            Ended::Closed { code, reason } => {
                assert_eq!(code, 1007, "{name}: closed with {code} ({reason})");
                assert!(reason.contains("nests too deeply"), "{name}: {reason}");
            }
            Ended::Dropped => panic!("{name}: dropped without a close frame (engine alive?)"),
        }
        let marker = format!("ok{i};");
        bystander.append(&marker).await;
        watcher
            .wait_until(&format!("the edit after {name}"), |w| {
                w.text().ends_with(&marker)
            })
            .await;
    }

    // The REST API refuses the same bodies with 400 and renders the document afterwards.
    let admin = {
        let now = unix_now();
        let claims = MintClaims {
            iss: None,
            aud: None,
            sub: None,
            iat: now,
            exp: now + 600,
            access: [("admin".to_owned(), "admin".to_owned())].into(),
            session: None,
        };
        mint_hs256(&claims, SECRET).unwrap()
    };
    for (name, body) in [("values", &any), ("types", &types)] {
        let response = engine
            .request("PUT", &format!("/v1/data/{doc}"), Some(&admin), body)
            .await;
        assert_eq!(response.status, 400, "{name}: {}", response.text());
        assert!(
            response.text().contains("deeper than"),
            "{name}: {}",
            response.text()
        );
        assert_eq!(
            response.json()["type"],
            "invalid-update",
            "{name}: {}",
            response.text()
        );
    }
    let rendered = engine
        .request("GET", &format!("/v1/data/{doc}"), Some(&admin), b"")
        .await;
    assert_eq!(rendered.status, 200, "{}", rendered.text());

    let edits = bystander.edits;
    bystander
        .wait_until("acks", |c| c.acked_edits() == edits)
        .await;
    let (stored, _) = stored_text(&sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, bystander.text());
    assert_eq!(stored, watcher.text());
    assert!(engine.log().contains("nests too deeply"));
}

fn awareness(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    let clients = entries
        .iter()
        .map(|(id, clock, json)| {
            (
                yrs::block::ClientID::new(*id),
                yrs::sync::awareness::AwarenessUpdateEntry {
                    clock: *clock,
                    json: (*json).into(),
                },
            )
        })
        .collect();
    encode_message(&Message::Awareness(yrs::sync::AwarenessUpdate { clients }))
}

/// All awareness states the engine holds, as an `AwarenessQuery` answer shows them.
async fn states(engine: &EngineProcess, doc: &str) -> std::collections::HashMap<u64, String> {
    let mut probe = RawClient::connect(&engine.ws_url(doc, "")).await.unwrap();
    probe.send_message(&Message::AwarenessQuery).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no awareness answer"
        );
        let Some(frame) = probe
            .next_binary(std::time::Duration::from_millis(500))
            .await
        else {
            continue;
        };
        if let Ok(Message::Awareness(update)) = synchrony_protocol::frame::decode_frame_any(&frame)
        {
            return update
                .clients
                .into_iter()
                .map(|(id, e)| (id.get(), e.json.to_string()))
                .collect();
        }
    }
}

#[tokio::test]
async fn awareness_is_bounded_per_connection_and_nobody_can_touch_anothers() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let doc = "app/presence";
    let mut alice = RawClient::connect(&engine.ws_url(doc, "")).await.unwrap();
    alice
        .send(awareness(&[(1, 1, r#"{"name":"alice"}"#)]))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while states(&engine, doc).await.get(&1).map(String::as_str) != Some(r#"{"name":"alice"}"#) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice's state never arrived"
        );
    }

    // Mallory renames alice, then removes her, with higher clocks: both ignored.
    let mut mallory = RawClient::connect(&engine.ws_url(doc, "")).await.unwrap();
    mallory
        .send(awareness(&[
            (1, 5, r#"{"name":"mallory"}"#),
            (2, 1, r#"{"name":"m"}"#),
        ]))
        .await;
    mallory.send(awareness(&[(1, 6, "null")])).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = states(&engine, doc).await;
        if now.get(&2).map(String::as_str) == Some(r#"{"name":"m"}"#) {
            assert_eq!(
                now.get(&1).map(String::as_str),
                Some(r#"{"name":"alice"}"#),
                "{now:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mallory's own state never arrived"
        );
    }

    // Too many client ids on one connection, and an oversized state: closed.
    let many: Vec<(u64, u32, &str)> = (100..109).map(|id| (id, 1, "{}")).collect();
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(70_000));
    for (name, frame, want) in [
        ("nine client ids", awareness(&many), 1007),
        ("a 70 KB state", awareness(&[(200, 1, big.as_str())]), 4413),
    ] {
        let mut bad = RawClient::connect(&engine.ws_url(doc, "")).await.unwrap();
        bad.send(frame).await;
        match bad.ended(WAIT).await {
            Ended::Closed { code, reason } => assert_eq!(code, want, "{name}: {reason}"),
            Ended::Dropped => panic!("{name}: dropped"),
        }
    }
    let now = states(&engine, doc).await;
    assert!(
        !now.contains_key(&100) && !now.contains_key(&200),
        "{now:?}"
    );
    assert_eq!(now.get(&1).map(String::as_str), Some(r#"{"name":"alice"}"#));
    drop(alice);
}

async fn ws_with_origin(engine: &EngineProcess, doc: &str, origin: &str) -> Result<(), String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = engine.ws_url(doc, "").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Origin", origin.parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn register(
    engine: &EngineProcess,
    headers: &[(&str, &str)],
) -> synchrony_tests::HttpResponse {
    let body = serde_json::json!({ "appid": "owned", "secret": "0123456789abcdef0123", "auth-token": null });
    synchrony_tests::http(
        engine.port,
        "POST",
        "/synchrony/v1/apps/secret",
        headers,
        body.to_string().as_bytes(),
    )
    .await
}

/// An engine without authentication serves loopback pages and non-browser clients only: a page
/// from elsewhere can neither edit nor register the first app (and so own the engine).
#[tokio::test]
async fn pages_from_other_origins_cannot_use_an_open_engine() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let evil = "https://evil.example";
    let refused = ws_with_origin(&engine, "app/page", evil).await.unwrap_err();
    assert!(refused.contains("403"), "{refused}");
    ws_with_origin(&engine, "app/page", "http://localhost:5173")
        .await
        .unwrap();
    let same = format!("http://127.0.0.1:{}", engine.port);
    ws_with_origin(&engine, "app/page", &same).await.unwrap();
    let read = synchrony_tests::http(
        engine.port,
        "GET",
        "/synchrony/v1/data/app/page",
        &[("Origin", evil)],
        b"",
    )
    .await;
    assert_eq!(read.status, 403, "{}", read.text());
    assert_eq!(read.json()["type"], "origin-not-allowed");

    // Cross-site registration: a form post (no JSON) and a page's JSON post are both refused.
    let form = register(&engine, &[("Content-Type", "text/plain"), ("Origin", evil)]).await;
    assert_eq!(form.status, 403, "{}", form.text());
    let plain = register(&engine, &[("Content-Type", "text/plain")]).await;
    assert_eq!(plain.status, 400, "{}", plain.text());
    let page = register(
        &engine,
        &[("Content-Type", "application/json"), ("Origin", evil)],
    )
    .await;
    assert_eq!(page.status, 403, "{}", page.text());
    assert_eq!(engine.health().await["auth"], "open");
    // Confluence's own flow: JSON, no Origin, a null auth-token while none is configured.
    let host = register(&engine, &[("Content-Type", "application/json")]).await;
    assert_eq!(host.status, 200, "{}", host.text());
    assert_eq!(engine.health().await["auth"], "tokens");
}

#[tokio::test]
async fn a_configured_origin_list_applies_with_tokens_too() {
    let engine = EngineProcess::start(
        &EngineOptions::default()
            .arg("--jwt-secret", SECRET)
            .arg("--allowed-origins", "https://wiki.example.com"),
    )
    .await;
    let doc = "app/listed";
    let url_doc = format!("{doc}?token={}", token(doc, "full"));
    let refused = ws_with_origin(&engine, &url_doc, "https://evil.example")
        .await
        .unwrap_err();
    assert!(refused.contains("403"), "{refused}");
    ws_with_origin(&engine, &url_doc, "https://wiki.example.com")
        .await
        .unwrap();
}

/// A client that never finishes its request headers is disconnected after the header-read
/// timeout (10 s) instead of holding its socket forever.
#[tokio::test]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", engine.port))
        .await
        .unwrap();
    slow.write_all(b"GET /synchrony/heartbeat HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(WAIT, slow.read(&mut buf)).await;
    let n = read
        .expect("the slow client was never cut off")
        .unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
        "unexpected answer {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Cut at the header-read timeout (10 s): not before, and not long after.
    let cut = started.elapsed();
    assert!(
        cut >= std::time::Duration::from_secs(9) && cut < std::time::Duration::from_secs(20),
        "cut off after {cut:?}, not at the 10 s header timeout"
    );
    assert_eq!(engine.get("/heartbeat").await.0, 200);
}

/// Past `synchrony.max.connections` editors are refused (503, or 1013 in band) while the
/// heartbeat and health keep answering; a slot freed is usable again.
#[tokio::test]
async fn the_connection_cap_refuses_editors_but_not_the_heartbeat() {
    let engine = EngineProcess::start(&EngineOptions::default().arg("--max-connections", 3)).await;
    let doc = "app/capped";
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(YClient::synced(&engine, doc, false).await);
    }
    let refused = RawClient::connect(&engine.ws_url(doc, ""))
        .await
        .err()
        .unwrap();
    assert!(refused.to_string().contains("503"), "{refused}");
    let mut in_band = RawClient::connect(&engine.ws_url(doc, "ack=persisted"))
        .await
        .unwrap();
    match in_band.ended(WAIT).await {
        Ended::Closed { code, .. } => assert_eq!(code, 1013),
        Ended::Dropped => panic!("dropped without 1013"),
    }
    assert_eq!(engine.get("/heartbeat").await.0, 200);
    assert_eq!(engine.health().await["connections"], 3);
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if RawClient::connect(&engine.ws_url(doc, "")).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed slot never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Registration bodies are read before the caller is known, so they are small: a large one is
/// refused without buffering it.
#[tokio::test]
async fn a_large_registration_body_is_refused_before_auth() {
    let engine = EngineProcess::start(
        &EngineOptions::default().arg("--service-authtoken", "registration-token-0123"),
    )
    .await;
    let post = |body: String| {
        let port = engine.port;
        async move {
            synchrony_tests::http(
                port,
                "POST",
                "/synchrony/v1/apps/secret",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await
        }
    };
    // 16 KiB is the bound: one byte over is refused, a body under it reaches the token check.
    let sized = |n: usize| {
        let frame = r#"{"appid":"a","secret":"","auth-token":"wrong"}"#.len();
        format!(
            r#"{{"appid":"a","secret":"{}","auth-token":"wrong"}}"#,
            "s".repeat(n - frame)
        )
    };
    let over = post(sized(16 * 1024 + 1)).await;
    assert_eq!(over.status, 413, "{}", over.text());
    // Under it the body is read and judged (here: its secret is too long to register).
    let under = post(sized(16 * 1024 - 1)).await;
    assert_eq!(under.status, 400, "{}", under.text());
    assert_eq!(under.json()["type"], "invalid-request", "{}", under.text());
    let big = post(format!(
        r#"{{"appid":"a","secret":"{}"}}"#,
        "s".repeat(100_000)
    ))
    .await;
    assert_eq!(big.status, 413, "{}", big.text());
    // Unread: a body announced at 10 MiB is refused after its head and 64 KiB of it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", engine.port))
        .await
        .unwrap();
    let head = "POST /synchrony/v1/apps/secret HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(&vec![b' '; 64 << 10]).await;
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(WAIT, stream.read(&mut answer))
        .await
        .expect("answered before the body was sent")
        .unwrap();
    let line = String::from_utf8_lossy(&answer[..n]);
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
}

/// Floods of health requests and of tokens naming random apps need no database: health reports
/// the last probe, and issuers are looked up in the table of apps read at most every 5 s (the
/// last one read keeps serving while storage is down). Shown with storage stopped: the answers
/// are the same as with it up.
#[tokio::test]
async fn floods_before_authentication_do_not_need_the_database() {
    let Some(pg) = synchrony_tests::PrivatePostgres::start().await else {
        synchrony_tests::skip(
            synchrony_tests::Lacking::PostgresBinaries,
            "Debian's postgresql is not installed",
        );
        return;
    };
    let engine = EngineProcess::start(
        &EngineOptions::postgres(&pg.url()).arg("--service-authtoken", "registration-token-0123"),
    )
    .await;
    let body = serde_json::json!({ "appid": "wiki", "secret": "wiki-secret-0123456789", "auth-token": "registration-token-0123" });
    let registered = synchrony_tests::http(
        engine.port,
        "POST",
        "/synchrony/v1/apps/secret",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(registered.status, 200, "{}", registered.text());
    pg.stop_server().await;
    // Health answers from the last storage probe: once a probe has failed, it says so at once.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = engine.get("/v1/health").await;
        if status == 503 {
            assert!(body.contains("storage"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never noticed the stopped database: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for i in 0..200 {
        let now = unix_now();
        let claims = MintClaims {
            iss: Some(format!("random-app-{i}")),
            aud: None,
            sub: None,
            iat: now,
            exp: now + 60,
            access: [("admin".to_owned(), "admin".to_owned())].into(),
            session: None,
        };
        let forged = mint_hs256(&claims, "guessed-secret-guessed-secret-00").unwrap();
        let r = engine
            .request("GET", "/v1/data/app/x", Some(&forged), b"")
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.json()["type"], "jwt/unknown-iss", "{}", r.text());
        let (status, body) = engine.get("/v1/health").await;
        assert_eq!(status, 503, "{body}");
    }
}

#[tokio::test]
async fn an_update_repeating_a_clients_structs_is_refused_before_yrs_sees_it() {
    // The fuzzed input on which yrs used freed memory: client 1's struct listed three times.
    let found = std::fs::read(
        synchrony_tests::workspace_root()
            .join("tests/fuzz/regressions/update/yrs-use-after-free-in-resolve-conflict"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(&EngineOptions::sqlite(dir.path())).await;
    let doc = "app/repeats";
    let mut bystander = YClient::synced(&engine, doc, true).await;
    let mut watcher = YClient::synced(&engine, doc, false).await;
    for (i, frame) in [
        Message::Sync(SyncMessage::Update(found.clone())),
        Message::Sync(SyncMessage::SyncStep2(found.clone())),
    ]
    .iter()
    .enumerate()
    {
        let mut bad = RawClient::connect(&engine.ws_url(doc, "")).await.unwrap();
        bad.send(encode_message(frame)).await;
        match bad.ended(WAIT).await {
            Ended::Closed { code, reason } => {
                assert_eq!(code, 1007, "closed with {code} ({reason})");
                assert_eq!(reason, "invalid update");
            }
            Ended::Dropped => panic!("dropped without a close frame (engine alive?)"),
        }
        let marker = format!("ok{i};");
        bystander.append(&marker).await;
        watcher
            .wait_until("the edit after the refused update", |w| {
                w.text().ends_with(&marker)
            })
            .await;
    }
    let put = engine
        .request("PUT", &format!("/v1/data/{doc}"), None, &found)
        .await;
    assert_eq!(put.status, 400, "{}", put.text());
    // The refusal names the client and the clock its structs are listed again from.
    let said = put.text();
    assert!(
        said.contains("the structs of client ") && said.contains(" are listed again from clock "),
        "{said}"
    );
}
