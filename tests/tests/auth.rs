//! Host integration: app registration, the token matrix on the WebSocket and on every REST
//! route, read-only connections, expiry mid-session, a host-like end-to-end flow with real
//! JavaScript editors, and secrets shared through the database.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use synchrony::auth::{mint_hs256, MintClaims};
use synchrony::gate::unix_now;
use synchrony_protocol::frame::decode_frame_any;
use synchrony_protocol::{Message, SyncMessage};
use synchrony_tests::{
    node, EngineOptions, EngineProcess, Next, PgDatabase, RawClient, YClient, WAIT,
};
use yrs::{Text, Transact};

const AUTH_TOKEN: &str = "host-registration-token";
const SERVICE: &str = "http://127.0.0.1/synchrony";
const APP: &str = "wiki";
const SECRET: &str = "wiki-secret-0123456789";

fn secured(options: EngineOptions) -> EngineOptions {
    options
        .arg("--service-authtoken", AUTH_TOKEN)
        .arg("--service-url", SERVICE)
}

async fn register(engine: &EngineProcess, secret: &str) -> u16 {
    let body = serde_json::json!({ "appid": APP, "secret": secret, "auth-token": AUTH_TOKEN });
    let response = synchrony_tests::http(
        engine.port,
        "POST",
        "/synchrony/v1/apps/secret",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    response.status
}

fn claims(access: &[(&str, &str)]) -> MintClaims {
    let now = unix_now();
    MintClaims {
        iss: Some(APP.into()),
        aud: Some(format!("{SERVICE}/v1")),
        sub: Some("alice".into()),
        iat: now,
        exp: now + 600,
        access: access
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        session: Some(serde_json::json!({ "name": "alice" })),
    }
}

fn token(access: &[(&str, &str)]) -> String {
    mint_hs256(&claims(access), SECRET).unwrap()
}

fn token_with(
    access: &[(&str, &str)],
    tweak: impl FnOnce(&mut MintClaims),
    secret: &str,
) -> String {
    let mut c = claims(access);
    tweak(&mut c);
    mint_hs256(&c, secret).unwrap()
}

/// The HTTP status and error type of a refused WebSocket upgrade (200 = accepted).
async fn ws_outcome(engine: &EngineProcess, doc: &str, token: Option<&str>) -> (u16, String) {
    let query = token.map(|t| format!("token={t}")).unwrap_or_default();
    match RawClient::connect(&engine.ws_url(doc, &query)).await {
        Ok(_) => (200, String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or(b"{}")).unwrap();
            (
                response.status().as_u16(),
                body["type"].as_str().unwrap_or("").to_owned(),
            )
        }
        Err(e) => panic!("unexpected upgrade failure {e}"),
    }
}

/// What a client that speaks our extensions (`ack=persisted`) sees: it is always upgraded, and a
/// refusal arrives in band as a close code and reason (0 = admitted: it was answered).
async fn ws_in_band(engine: &EngineProcess, doc: &str, token: Option<&str>) -> (u16, String) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let query = match token {
        Some(t) => format!("ack=persisted&token={t}"),
        None => "ack=persisted".to_owned(),
    };
    let mut raw = RawClient::connect(&engine.ws_url(doc, &query))
        .await
        .expect("a client asking for extensions is upgraded even when refused");
    let hello = Message::Sync(SyncMessage::SyncStep1(yrs::StateVector::default()));
    // A refused socket may already be closing; the answer below is what counts.
    let _ = raw
        .ws
        .send(WsMessage::Binary(
            synchrony_protocol::encode_message(&hello).into(),
        ))
        .await;
    loop {
        match tokio::time::timeout(WAIT, raw.ws.next()).await {
            Err(_) => panic!("no answer and no close within {WAIT:?}"),
            Ok(Some(Ok(WsMessage::Binary(_)))) => return (0, String::new()),
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Ok(Some(Ok(WsMessage::Close(None))) | Some(Err(_)) | None) => {
                panic!("connection ended without a close code")
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

#[tokio::test]
async fn the_token_matrix_on_the_websocket_and_rest() {
    let engine = EngineProcess::start(&secured(EngineOptions::default())).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let doc = "wiki/page-1";
    let full = [("/data/wiki/page-1", "full")];
    let now = unix_now();
    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("missing", None, 401, "jwt/missing"),
        ("malformed", Some("not.a.jwt".into()), 401, "jwt/malformed"),
        (
            "bad signature",
            Some(token_with(&full, |_| {}, "another-secret-0000")),
            401,
            "jwt/invalid-signature",
        ),
        (
            "unknown issuer",
            Some(token_with(&full, |c| c.iss = Some("nobody".into()), SECRET)),
            401,
            "jwt/unknown-iss",
        ),
        (
            "wrong audience",
            Some(token_with(
                &full,
                |c| c.aud = Some("http://evil/synchrony/v1".into()),
                SECRET,
            )),
            401,
            "jwt/invalid-aud",
        ),
        (
            "expired",
            Some(token_with(
                &full,
                |c| {
                    c.iat = now - 4000;
                    c.exp = now - 120
                },
                SECRET,
            )),
            401,
            "jwt/expired",
        ),
        (
            "not yet valid",
            Some(token_with(&full, |c| c.iat = now + 600, SECRET)),
            401,
            "jwt/not-yet-valid",
        ),
        (
            "wrong document",
            Some(token(&[("/data/wiki/page-2", "full")])),
            403,
            "forbidden",
        ),
        (
            "prefix grant",
            Some(token(&[("/data/wiki/*", "read")])),
            200,
            "",
        ),
        ("valid", Some(token(&full)), 200, ""),
    ];
    for (name, token, status, kind) in &cases {
        assert_eq!(
            ws_outcome(&engine, doc, token.as_deref()).await,
            (*status, kind.to_string()),
            "WebSocket: {name}"
        );
        let in_band = match status {
            200 => 0,
            401 => 4401,
            _ => 4403,
        };
        assert_eq!(
            ws_in_band(&engine, doc, token.as_deref()).await,
            (in_band, kind.to_string()),
            "WebSocket with extensions: {name}"
        );
        let rest = engine
            .request("GET", &format!("/v1/data/{doc}"), token.as_deref(), b"")
            .await;
        assert_eq!(rest.status, *status, "REST: {name}: {}", rest.text());
        if *status != 200 {
            assert_eq!(rest.json()["type"], *kind, "REST: {name}");
        }
    }
}

#[tokio::test]
async fn admin_and_document_tokens_on_every_rest_route() {
    let engine = EngineProcess::start(&secured(EngineOptions::default())).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let doc = "wiki/page-1";
    let admin = token(&[("admin", "admin")]);
    let full = token(&[("/data/wiki/page-1", "full")]);
    let read = token(&[("/data/wiki/page-1", "read")]);
    let other = token(&[("/data/wiki/page-2", "full")]);
    let put = engine
        .request(
            "PUT",
            &format!("/v1/data/{doc}?reset=true&name=content"),
            Some(&admin),
            b"base",
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());

    let update = {
        let d = yrs::Doc::new();
        let t = d.get_or_insert_text("other");
        let mut txn = d.transact_mut();
        t.insert(&mut txn, 0, "x");
        txn.encode_update_v1()
    };
    let reset = format!("/v1/data/{doc}?reset=true&name=content");
    let path = format!("/v1/data/{doc}");
    // (method, path, body, [admin, full, read, other])
    let routes: Vec<(&str, &str, &[u8], [u16; 4])> = vec![
        ("GET", &path, b"", [200, 200, 200, 403]),
        ("PUT", &path, &update, [200, 200, 403, 403]),
        ("PUT", &reset, b"changed", [200, 200, 403, 403]),
        ("GET", "/v1/data?prefix=wiki/", b"", [200, 403, 403, 403]),
        ("DELETE", &path, b"", [403, 403, 403, 403]), // admin's DELETE runs last, below
    ];
    for (method, route, body, expected) in routes {
        for (who, (token, want)) in [&admin, &full, &read, &other]
            .into_iter()
            .zip(expected)
            .enumerate()
        {
            if method == "DELETE" && who == 0 {
                continue;
            }
            let before = engine
                .request("GET", &format!("{path}?format=update"), Some(&admin), b"")
                .await
                .body;
            let response = engine.request(method, route, Some(token), body).await;
            assert_eq!(
                response.status,
                want,
                "{method} {route} as token #{who}: {}",
                response.text()
            );
            if want == 403 {
                assert_eq!(response.json()["type"], "forbidden");
                let after = engine
                    .request("GET", &format!("{path}?format=update"), Some(&admin), b"")
                    .await
                    .body;
                assert_eq!(
                    before, after,
                    "{method} {route} as token #{who} changed the document"
                );
            }
        }
    }
    let deleted = engine.request("DELETE", &path, Some(&admin), b"").await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    let list = engine
        .request("GET", "/v1/data?prefix=wiki/", Some(&admin), b"")
        .await
        .json();
    assert_eq!(list["documents"], serde_json::json!([]));
}

#[tokio::test]
async fn rest_reads_and_writes_in_every_format_with_clear_errors() {
    let options = secured(EngineOptions::default()).arg("--max-doc-bytes", 100_000);
    let engine = EngineProcess::start(&options).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let admin = token(&[("admin", "admin")]);
    let path = "/v1/data/wiki/formats";
    let mut editor = YClient::synced(&engine, &format!("wiki/formats?token={admin}"), false).await;
    editor.append("typed").await;

    let update = {
        let d = yrs::Doc::new();
        let m = d.get_or_insert_map("meta");
        let mut txn = d.transact_mut();
        yrs::Map::insert(&m, &mut txn, "title", "Formats");
        txn.encode_update_v1()
    };
    let put = engine.request("PUT", path, Some(&admin), &update).await;
    assert_eq!(put.status, 200, "{}", put.text());
    let head = put.json()["head"].as_u64().unwrap();
    assert!(head > 0);
    editor
        .wait_until("the REST update to reach the editor", |c| {
            let meta = c.doc.get_or_insert_map("meta");
            yrs::Map::get(&meta, &c.doc.transact(), "title").is_some()
        })
        .await;

    let json = engine.request("GET", path, Some(&admin), b"").await.json();
    assert_eq!(json["state"]["content"], "typed");
    assert_eq!(json["state"]["meta"]["title"], "Formats");
    assert!(json["head"].as_u64().unwrap() >= head);
    let text = engine
        .request(
            "GET",
            &format!("{path}?format=text&name=content"),
            Some(&admin),
            b"",
        )
        .await;
    assert_eq!(text.text(), "typed");
    assert!(text.header("x-synchrony-head").is_some());
    let binary = engine
        .request("GET", &format!("{path}?format=update"), Some(&admin), b"")
        .await;
    let d = yrs::Doc::new();
    d.transact_mut()
        .apply_update(yrs::updates::decoder::Decode::decode_v1(&binary.body).unwrap())
        .unwrap();
    assert_eq!(
        yrs::GetString::get_string(&d.get_or_insert_text("content"), &d.transact()),
        "typed"
    );

    for (method, route, body, status, kind) in [
        (
            "PUT",
            path.to_owned(),
            b"\x01\x02garbage".to_vec(),
            400,
            "invalid-update",
        ),
        ("PUT", path.to_owned(), Vec::new(), 400, "invalid-update"),
        (
            "PUT",
            format!("{path}?reset=true"),
            b"x".to_vec(),
            400,
            "invalid-request",
        ),
        (
            "PUT",
            format!("{path}?reset=true&name=content"),
            vec![0xff, 0xfe],
            400,
            "invalid-request",
        ),
        (
            "GET",
            format!("{path}?format=xml"),
            Vec::new(),
            400,
            "invalid-request",
        ),
        (
            "GET",
            "/v1/data/a%20b".to_owned(),
            Vec::new(),
            400,
            "invalid-document-id",
        ),
        (
            "GET",
            "/v1/data?prefix=%25".to_owned(),
            Vec::new(),
            400,
            "invalid-request",
        ),
    ] {
        let response = engine.request(method, &route, Some(&admin), &body).await;
        assert_eq!(
            (
                response.status,
                response.json()["type"].as_str().unwrap().to_owned()
            ),
            (status, kind.to_owned()),
            "{method} {route}"
        );
    }
    let text = engine
        .request(
            "GET",
            &format!("{path}?format=text&name=content"),
            Some(&admin),
            b"",
        )
        .await;
    assert_eq!(text.text(), "typed", "a refused write changed the document");
    let reset = format!("{path}?reset=true&name=content");
    let too_big = engine
        .request("PUT", &reset, Some(&admin), &vec![b'x'; 200_000])
        .await;
    assert_eq!(
        (too_big.status, too_big.json()["type"].as_str()),
        (413, Some("too-large"))
    );
    // The third transport: an x-token header.
    let text_path = format!("/synchrony{path}?format=text&name=content");
    let via_header =
        synchrony_tests::http(engine.port, "GET", &text_path, &[("x-token", &admin)], b"").await;
    assert_eq!(
        via_header.text(),
        "typed",
        "the oversized reset changed the document"
    );
}

#[tokio::test]
async fn read_only_connections_sync_but_cannot_write() {
    let engine = EngineProcess::start(&secured(EngineOptions::default())).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let doc = "wiki/read-only";
    let writer_token = token(&[("/data/wiki/read-only", "full")]);
    let reader_token = token(&[("/data/wiki/read-only", "read")]);
    let mut writer = YClient::synced(&engine, &format!("{doc}?token={writer_token}"), true).await;
    writer.append("written;").await;
    let mut reader = YClient::synced(&engine, &format!("{doc}?token={reader_token}"), true).await;
    reader
        .wait_until("the writer's text", |c| c.text() == "written;")
        .await;

    // The reader edits locally and sends it: refused with permission denied, stored nowhere.
    let update = {
        let text = reader.doc.get_or_insert_text("content");
        let mut txn = reader.doc.transact_mut();
        text.insert(&mut txn, 0, "READER");
        txn.encode_update_v1()
    };
    reader
        .raw
        .send_message(&Message::Sync(SyncMessage::Update(update)))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no permission-denied message"
        );
        if let Next::Frame(bytes) = reader.raw.next_event(Duration::from_millis(200)).await {
            if let Ok(Message::Auth(Some(reason))) = decode_frame_any(&bytes) {
                assert!(reason.contains("read-only"), "{reason}");
                break;
            }
        }
    }
    // The reader still receives edits; nobody else ever sees its text.
    writer.append("more;").await;
    writer.wait_until("acks", |c| c.acked_edits() == 2).await;
    let admin = token(&[("admin", "admin")]);
    let stored = engine
        .request(
            "GET",
            &format!("/v1/data/{doc}?format=text&name=content"),
            Some(&admin),
            b"",
        )
        .await;
    assert_eq!(stored.text(), "written;more;");
    writer.drain(Duration::from_millis(200)).await;
    assert_eq!(writer.text(), "written;more;");
    assert_eq!(
        reader.acked, 0,
        "a read-only client is never told its edits are durable"
    );
}

#[tokio::test]
async fn a_token_expiring_mid_session_closes_with_4401() {
    let engine =
        EngineProcess::start(&secured(EngineOptions::default()).arg("--jwt-leeway-secs", 0)).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let short = token_with(
        &[("/data/wiki/expiring", "full")],
        |c| c.exp = unix_now() + 2,
        SECRET,
    );
    let mut client = YClient::synced(&engine, &format!("wiki/expiring?token={short}"), false).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match client.pump_one(Duration::from_millis(200)).await {
            Next::Ended(code) => {
                assert_eq!(code, Some(4401));
                break;
            }
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "still open after expiry"
            ),
        }
    }
}

#[tokio::test]
async fn host_flow_with_javascript_editors() {
    let engine = EngineProcess::start(&secured(EngineOptions::default())).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let doc = "wiki/confluence-42";
    let editor = |name: &str| {
        let mut c = claims(&[("/data/wiki/confluence-42", "full")]);
        c.sub = Some(name.into());
        c.session = Some(serde_json::json!({ "name": name }));
        mint_hs256(&c, SECRET).unwrap()
    };
    let admin = token(&[("admin", "admin")]);
    let result = node(
        "host",
        &engine,
        doc,
        &[&editor("ada"), &editor("bob"), &admin],
    )
    .await;
    assert_eq!(
        result["names"], "ada,bob",
        "the draft lists who is connected"
    );
    assert!(result["head"].as_u64().unwrap() > 0);
    let after = engine
        .request("GET", &format!("/v1/data/{doc}"), Some(&admin), b"")
        .await
        .json();
    assert_eq!(
        after["state"],
        serde_json::json!({}),
        "the deleted document came back: {after}"
    );
    let list = engine
        .request("GET", "/v1/data?prefix=wiki/", Some(&admin), b"")
        .await
        .json();
    assert_eq!(list["documents"], serde_json::json!([]));
}

#[tokio::test]
async fn app_secrets_live_in_the_database() {
    let db = PgDatabase::create().await;
    let options = secured(EngineOptions::postgres(&db.url));
    let mut a = EngineProcess::start(&options).await;
    assert_eq!(register(&a, SECRET).await, 200);
    let doc_token = token(&[("/data/wiki/shared", "full")]);
    assert_eq!(ws_outcome(&a, "wiki/shared", Some(&doc_token)).await.0, 200);
    assert!(a.terminate().await.success());

    // After a restart, and on a second engine on the same database, the app is known.
    let a = EngineProcess::start(&options).await;
    let b = EngineProcess::start(&options).await;
    for engine in [&a, &b] {
        assert_eq!(
            ws_outcome(engine, "wiki/shared", Some(&doc_token)).await.0,
            200
        );
    }
    // Rotating the secret on one engine: the old token is refused there at once, and on the
    // other once its short cache expires.
    let rotated = "wiki-secret-rotated-999";
    assert_eq!(register(&b, rotated).await, 200);
    assert_eq!(
        ws_outcome(&b, "wiki/shared", Some(&doc_token)).await,
        (401, "jwt/invalid-signature".into())
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while ws_outcome(&a, "wiki/shared", Some(&doc_token)).await.0 == 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "engine A still accepts the rotated-out secret"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let new_token = token_with(&[("/data/wiki/shared", "full")], |_| {}, rotated);
    assert_eq!(ws_outcome(&a, "wiki/shared", Some(&new_token)).await.0, 200);
    // Registration itself needs the host's token.
    let body = serde_json::json!({ "appid": "intruder", "secret": "0123456789abcdef", "auth-token": "guess" });
    let json = [("Content-Type", "application/json")];
    let refused = synchrony_tests::http(
        a.port,
        "POST",
        "/synchrony/v1/apps/secret",
        &json,
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["type"], "auth-token/invalid");
}

#[tokio::test]
async fn synchrony_token_mints_for_registered_apps_and_configured_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let engine = EngineProcess::start(&secured(EngineOptions::sqlite(dir.path()))).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let mint = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "--app-id",
            APP,
            "--data-dir",
            data,
            "--service-url",
            SERVICE,
        ];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, out, err) = synchrony_tests::run_cli(&refs).await;
            assert_eq!(code, Some(0), "{err}");
            out.trim().to_owned()
        }
    };
    // The secret is read from the database the engine registered it in.
    let full = mint(&["--doc", "wiki/cli", "--name", "Ada"]).await;
    assert_eq!(ws_outcome(&engine, "wiki/cli", Some(&full)).await.0, 200);
    let read = mint(&["--doc", "wiki/cli", "--access", "read"]).await;
    let put = engine
        .request(
            "PUT",
            "/v1/data/wiki/cli?reset=true&name=content",
            Some(&read),
            b"no",
        )
        .await;
    assert_eq!(put.status, 403);
    let admin = mint(&["--admin"]).await;
    assert_eq!(
        engine
            .request("GET", "/v1/data", Some(&admin), b"")
            .await
            .status,
        200
    );
    let short = mint(&["--doc", "wiki/cli", "--ttl-secs", "1"]).await;
    assert!(!short.is_empty());

    const LONG: &str = "a-static-secret-of-32-bytes-or-more";
    for (args, needle) in [
        (vec!["token", "--doc", "x"], "no signing key"),
        (
            vec!["token", "--doc", "x", "--jwt-secret", "  "],
            "no signing key",
        ),
        (
            vec!["token", "--doc", "x", "--admin", "--jwt-secret", LONG],
            "either --admin or",
        ),
        (vec!["token", "--doc", "a b", "--jwt-secret", LONG], "--doc"),
        (
            vec!["token", "--doc", "x", "--jwt-secret", "short"],
            "synchrony.jwt.secret: is 5 bytes; a secret must be at least 32 bytes",
        ),
        (
            vec![
                "token",
                "--doc",
                "x",
                "--app-id",
                "unknown",
                "--data-dir",
                data,
            ],
            "not registered",
        ),
    ] {
        let (code, _, err) = synchrony_tests::run_cli(&args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Runs `tests/py/jwe.py` (jwcrypto) with `args`, `input` on its stdin.
fn jose(args: &[&str], input: &str) -> String {
    synchrony_tests::python_tool("jwe.py", args, input)
        .trim()
        .to_owned()
}

/// Confluence's editor tokens: the HS256 token wrapped in a JWE (RSA-OAEP-256, A256GCM, cty
/// JWT) by jwcrypto, decrypted with `jwt.private.key` in each of its forms; every way such a
/// token can be wrong is refused with its reason.
#[tokio::test]
async fn encrypted_editor_tokens_minted_by_jwcrypto() {
    let keys = tempfile::tempdir().unwrap();
    let dir = keys.path().to_str().unwrap();
    jose(&["keygen", dir], "");
    let other = tempfile::tempdir().unwrap();
    jose(&["keygen", other.path().to_str().unwrap()], "");
    let read = |name: &str| std::fs::read_to_string(keys.path().join(name)).unwrap();
    let public = keys.path().join("public.pem");
    let public = public.to_str().unwrap();
    let doc = "wiki/encrypted";
    let full = [("/data/wiki/encrypted", "full")];
    let wrap = |jwt: &str| jose(&["wrap", public], jwt);

    for form in ["private.b64", "private.pem", "private-rsa.pem"] {
        let engine = EngineProcess::start(
            &secured(EngineOptions::default()).arg("--jwt-private-key", read(form)),
        )
        .await;
        assert_eq!(register(&engine, SECRET).await, 200);
        let jwe = wrap(&token(&full));
        assert_eq!(jwe.split('.').count(), 5, "{jwe}");
        assert_eq!(
            ws_outcome(&engine, doc, Some(&jwe)).await,
            (200, String::new()),
            "{form}"
        );
        let put = engine
            .request(
                "PUT",
                &format!("/v1/data/{doc}?reset=true&name=content"),
                Some(&jwe),
                b"from a JWE",
            )
            .await;
        assert_eq!(put.status, 200, "{form}: {}", put.text());
        let get = synchrony_tests::http(
            engine.port,
            "GET",
            &format!("/synchrony/v1/data/{doc}?format=text&name=content"),
            &[("x-token", jwe.as_str())],
            b"",
        )
        .await;
        assert_eq!(get.status, 200, "{form}: {}", get.text());
        assert_eq!(get.text(), "from a JWE", "{form}");
        // An editor with the encrypted token syncs and edits.
        let mut editor = YClient::from_raw(
            RawClient::connect(&engine.ws_url(doc, &format!("token={jwe}")))
                .await
                .unwrap(),
        )
        .await;
        editor
            .wait_until("the document's text", |c| c.text() == "from a JWE")
            .await;
    }

    let engine = EngineProcess::start(
        &secured(EngineOptions::default()).arg("--jwt-private-key", read("private.b64")),
    )
    .await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let valid = wrap(&token(&full));
    let mut tampered: Vec<String> = valid.split('.').map(str::to_owned).collect();
    let flipped = if tampered[3].starts_with('A') {
        "B"
    } else {
        "A"
    };
    tampered[3].replace_range(0..1, flipped);
    let other_public = other.path().join("public.pem");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "encrypted to another key",
            jose(&["wrap", other_public.to_str().unwrap()], &token(&full)),
            "does not decrypt",
        ),
        (
            "tampered ciphertext",
            tampered.join("."),
            "does not decrypt",
        ),
        (
            "RSA-OAEP with SHA-1",
            jose(&["wrap", public, "RSA-OAEP", "A256GCM"], &token(&full)),
            "alg \"RSA-OAEP\" is not accepted",
        ),
        (
            "A128GCM",
            jose(&["wrap", public, "RSA-OAEP-256", "A128GCM"], &token(&full)),
            "enc \"A128GCM\" is not accepted",
        ),
        (
            "a forged token inside",
            wrap(&token_with(&full, |_| {}, "another-secret-0000")),
            "signature does not verify",
        ),
        ("five dots of nothing", "a.b.c.d.e".into(), "not base64url"),
    ];
    for (name, jwe, reason) in &cases {
        let rest = engine
            .request("GET", &format!("/v1/data/{doc}"), Some(jwe), b"")
            .await;
        assert_eq!(rest.status, 401, "{name}: {}", rest.text());
        let message = rest.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(reason), "{name}: {message}");
        let (status, _) = ws_outcome(&engine, doc, Some(jwe)).await;
        assert_eq!(status, 401, "WebSocket: {name}");
    }
    assert_eq!(
        engine
            .request("GET", &format!("/v1/data/{doc}"), Some(&valid), b"")
            .await
            .status,
        200
    );

    // Without the private key an encrypted token is refused with the reason.
    let plain = EngineProcess::start(&secured(EngineOptions::default())).await;
    assert_eq!(register(&plain, SECRET).await, 200);
    let rest = plain
        .request("GET", &format!("/v1/data/{doc}"), Some(&valid), b"")
        .await;
    assert_eq!(rest.status, 401, "{}", rest.text());
    assert_eq!(rest.json()["type"], "jwt/undecryptable");
    assert!(
        rest.text().contains("no jwt.private.key"),
        "{}",
        rest.text()
    );

    // A key that is not one is a configuration error naming the key.
    let (code, stderr) = synchrony_tests::run_engine_to_exit(&[
        "--port",
        "0",
        "--jwt-private-key",
        &read("public.pem"),
    ])
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("jwt.private.key"), "{stderr}");
}

/// What a route needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Needs {
    Read,
    Full,
    Admin,
}

/// A REST call with an optional token; `outside` adds an `X-Forwarded-For` of another machine,
/// as a request through a proxy carries, so the engine does not count it as its own machine's.
async fn call(
    engine: &EngineProcess,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    outside: bool,
) -> synchrony_tests::HttpResponse {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    if outside {
        headers.push(("X-Forwarded-For", "203.0.113.9"));
    }
    headers.push(("Content-Type", "application/json"));
    synchrony_tests::http_to(
        "127.0.0.1",
        engine.port,
        method,
        &format!("/synchrony{path}"),
        &headers,
        body,
    )
    .await
}

/// Everything a refused call must leave as it was, read with the admin token: the page's
/// content, its versions, its stored rows, the locks and the document list.
async fn fingerprint(engine: &EngineProcess, admin: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for path in [
        "/v1/data/wiki/page-1?format=update",
        "/v1/data/wiki/page-1/versions",
        "/v1/history/count?doc=wiki/page-1",
        "/v1/hub-lock-state",
        "/v1/data?prefix=wiki/",
    ] {
        let r = call(engine, "GET", path, Some(admin), b"", false).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        seen.push(format!("{path}: {:?}", r.body));
    }
    seen
}

/// Every REST route meets every wrong token: none, a bad signature, an expired one, another
/// page's, a read-only one where a change is asked, a page's where an admin is needed; each is
/// refused with its status and type, and nothing (content, versions, stored rows, locks, the
/// document list) changes. The operator routes are asked from outside (through a proxy), where
/// they need an admin token. Read routes answer a read-only token.
#[tokio::test]
async fn every_rest_route_refuses_every_wrong_token_and_changes_nothing() {
    let engine = EngineProcess::start(&secured(EngineOptions::default())).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let admin = token(&[("admin", "admin")]);
    let page = [("/data/wiki/page-1", "full")];
    let setup = [
        (
            "PUT",
            "/v1/data/wiki/page-1?reset=true&name=content",
            &b"base"[..],
        ),
        (
            "POST",
            "/v1/data/wiki/page-1/versions",
            br#"{"label":"v1"}"#,
        ),
        (
            "PUT",
            "/v1/data/wiki/page-1?reset=true&name=content",
            b"after the version",
        ),
        (
            "POST",
            "/v1/hub-lock-state?lock-id=6f1c2a52-0c1e-4d52-9d1b-1e9a3f0c0001",
            br#"{"point-list":["wiki/other"],"timeout-ms":600000}"#,
        ),
    ];
    for (method, path, body) in setup {
        let r = call(&engine, method, path, Some(&admin), body, false).await;
        assert!(r.status < 300, "{method} {path}: {}", r.text());
    }
    let now = unix_now();
    let wrong: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "bad signature",
            Some(token_with(&page, |_| {}, "another-secret-0000")),
        ),
        (
            "expired",
            Some(token_with(
                &page,
                |c| {
                    c.iat = now - 4000;
                    c.exp = now - 120;
                },
                SECRET,
            )),
        ),
        (
            "another page's",
            Some(token(&[("/data/wiki/page-2", "full")])),
        ),
        ("read-only", Some(token(&[("/data/wiki/page-1", "read")]))),
        ("the page's, not admin", Some(token(&page))),
    ];
    let lock = "/v1/hub-lock-state?lock-id=6f1c2a52-0c1e-4d52-9d1b-1e9a3f0c0001";
    let new_lock = "/v1/hub-lock-state?lock-id=6f1c2a52-0c1e-4d52-9d1b-1e9a3f0c0002";
    // (method, path, body, needs, asked from outside)
    let routes: Vec<(&str, &str, &[u8], Needs, bool)> = vec![
        ("GET", "/v1/data/wiki/page-1", b"", Needs::Read, false),
        (
            "PUT",
            "/v1/data/wiki/page-1?reset=true&name=content",
            b"changed",
            Needs::Full,
            false,
        ),
        (
            "POST",
            "/v1/data/wiki/page-1/versions",
            br#"{"label":"v2"}"#,
            Needs::Full,
            false,
        ),
        (
            "GET",
            "/v1/data/wiki/page-1/versions",
            b"",
            Needs::Read,
            false,
        ),
        (
            "GET",
            "/v1/data/wiki/page-1/versions/1",
            b"",
            Needs::Read,
            false,
        ),
        (
            "POST",
            "/v1/data/wiki/page-1/versions/1/restore",
            b"",
            Needs::Full,
            false,
        ),
        (
            "DELETE",
            "/v1/data/wiki/page-1/versions/1",
            b"",
            Needs::Admin,
            false,
        ),
        ("DELETE", "/v1/data/wiki/page-1", b"", Needs::Admin, false),
        ("GET", "/v1/data?prefix=wiki/", b"", Needs::Admin, false),
        ("GET", "/v1/hub-lock-state", b"", Needs::Admin, false),
        (
            "POST",
            new_lock,
            br#"{"point-list":["wiki/page-1"]}"#,
            Needs::Admin,
            false,
        ),
        ("DELETE", lock, b"", Needs::Admin, false),
        (
            "POST",
            "/v1/history/evict/soft?threshold-hours=0",
            b"",
            Needs::Admin,
            false,
        ),
        (
            "POST",
            "/v1/history/evict/hard?threshold-hours=0",
            b"",
            Needs::Admin,
            false,
        ),
        (
            "GET",
            "/v1/history/count?doc=wiki/page-1",
            b"",
            Needs::Admin,
            false,
        ),
        ("GET", "/v1/cluster", b"", Needs::Admin, true),
        (
            "GET",
            "/v1/cluster/owner/wiki/page-1",
            b"",
            Needs::Admin,
            true,
        ),
        ("GET", "/metrics", b"", Needs::Admin, true),
    ];
    let before = fingerprint(&engine, &admin).await;
    let mut refusals = 0;
    for (method, path, body, needs, outside) in &routes {
        for (who, token) in &wrong {
            let allowed = matches!(
                (*who, needs),
                ("read-only", Needs::Read) | ("the page's, not admin", Needs::Read | Needs::Full)
            );
            if allowed && *needs != Needs::Read {
                continue; // a change it may make; the refusals are what this test is about
            }
            let r = call(&engine, method, path, token.as_deref(), body, *outside).await;
            let want: (u16, &str) = match *who {
                _ if allowed => (200, ""),
                "no token" => (401, "jwt/missing"),
                "bad signature" => (401, "jwt/invalid-signature"),
                "expired" => (401, "jwt/expired"),
                _ => (403, "forbidden"),
            };
            assert_eq!(
                r.status,
                want.0,
                "{method} {path} with {who} token: {}",
                r.text()
            );
            if want.0 != 200 {
                assert_eq!(
                    r.json()["type"],
                    want.1,
                    "{method} {path} with {who} token: {}",
                    r.text()
                );
                refusals += 1;
            }
            assert_eq!(
                fingerprint(&engine, &admin).await,
                before,
                "{method} {path} with {who} token changed something"
            );
        }
    }
    // From outside, health tells a caller without an admin token only up or down.
    for (who, token) in &wrong {
        let r = call(&engine, "GET", "/v1/health", token.as_deref(), b"", true).await;
        assert_eq!(r.status, 200, "{who}: {}", r.text());
        assert_eq!(
            r.json(),
            serde_json::json!({"status": "ok"}),
            "health with {who} token"
        );
    }
    let r = call(&engine, "GET", "/v1/health", Some(&admin), b"", true).await;
    assert!(r.json()["storage"].is_object(), "{}", r.text());
    println!(
        "{refusals} refusals over {} routes, none changed anything",
        routes.len()
    );
}

/// `synchrony.metrics.access` in each of its modes, asked from this machine and from outside
/// (through a proxy), with no token, a page's token and an admin token.
#[tokio::test]
async fn metrics_answer_each_access_mode_as_documented() {
    let admin = token(&[("admin", "admin")]);
    let page = token(&[("/data/wiki/page-1", "full")]);
    // (mode, [local none, outside none, outside page, outside admin, local admin])
    let modes = [
        ("open", [200, 200, 200, 200, 200]),
        ("loopback", [200, 401, 403, 200, 200]),
        ("token", [401, 401, 403, 200, 200]),
    ];
    for (mode, want) in modes {
        let engine =
            EngineProcess::start(&secured(EngineOptions::default()).arg("--metrics-access", mode))
                .await;
        assert_eq!(register(&engine, SECRET).await, 200);
        let asks = [
            (None, false),
            (None, true),
            (Some(page.as_str()), true),
            (Some(admin.as_str()), true),
            (Some(admin.as_str()), false),
        ];
        for ((token, outside), status) in asks.into_iter().zip(want) {
            let r = call(&engine, "GET", "/metrics", token, b"", outside).await;
            assert_eq!(
                r.status,
                status,
                "metrics in {mode} mode, token {token:?}, outside {outside}: {}",
                r.text()
            );
            if status == 200 {
                assert!(r.text().contains("synchrony_"), "{}", r.text());
            }
        }
    }
}

/// A REST change's body is read only once its token is known to allow it: a 40 MiB `PUT` (the
/// head and 64 KiB of it sent) without a token, with another page's token and with a read-only
/// token is answered at once, without waiting for the rest; the page is unchanged.
#[tokio::test]
async fn rest_bodies_are_read_only_after_the_token_allows_the_change() {
    let engine = EngineProcess::start(&secured(EngineOptions::default())).await;
    assert_eq!(register(&engine, SECRET).await, 200);
    let path = "/v1/data/wiki/page-1?reset=true&name=content";
    let other = token(&[("/data/wiki/page-2", "full")]);
    let read = token(&[("/data/wiki/page-1", "read")]);
    for (who, token, status) in [
        ("no token", None, "401"),
        ("another page's token", Some(other.as_str()), "403"),
        ("a read-only token", Some(read.as_str()), "403"),
    ] {
        let line = synchrony_tests::put_head(&engine, path, token, 40 << 20).await;
        assert!(line.contains(status), "{who}: {line}");
    }
    let admin = token(&[("admin", "admin")]);
    let page = engine
        .request(
            "GET",
            "/v1/data/wiki/page-1?format=text&name=content",
            Some(&admin),
            b"",
        )
        .await;
    assert_eq!(page.text(), "", "{}", page.text());
}
