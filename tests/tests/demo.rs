//! The demo editor page the engine serves at `{ctx}/demo/` (its behaviour in a browser is tested
//! by `client-js/test/demo.e2e.test.mjs`).
#![allow(clippy::unwrap_used)]

use std::io::Read;

use synchrony_tests::{http, EngineOptions, EngineProcess};

/// The engine's log once it has logged its readiness (the ready line on stdout comes first).
async fn ready_log(engine: &EngineProcess) -> String {
    let deadline = tokio::time::Instant::now() + synchrony_tests::WAIT;
    loop {
        let log = engine.log();
        if log.contains("synchrony: ready") {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ready in the log:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_demo_page_is_served_under_the_context_path() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let log = ready_log(&engine).await;
    assert!(
        log.contains(&format!(
            "demo=http://127.0.0.1:{}/synchrony/demo/",
            engine.port
        )),
        "the log names the demo URL:\n{log}"
    );

    let redirect = http(engine.port, "GET", "/synchrony/demo", &[], &[]).await;
    assert_eq!(redirect.status, 308);
    assert_eq!(redirect.header("location"), Some("demo/"));

    let page = http(engine.port, "GET", "/synchrony/demo/", &[], &[]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page
        .text()
        .contains("<script type=\"module\" src=\"demo.js\">"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("connect-src 'self'"), "{csp}");

    let script = http(engine.port, "GET", "/synchrony/demo/demo.js", &[], &[]).await;
    assert_eq!(script.status, 200);
    assert_eq!(
        script.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(script.header("content-encoding"), None);
    assert!(script.body.len() > 10_000, "a real bundle");

    // Compressed for browsers, byte for byte the same once inflated.
    let gzipped = http(
        engine.port,
        "GET",
        "/synchrony/demo/demo.js",
        &[("Accept-Encoding", "gzip, deflate, br")],
        &[],
    )
    .await;
    assert_eq!(gzipped.header("content-encoding"), Some("gzip"));
    assert!(gzipped.body.len() < script.body.len() / 2);
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(gzipped.body.as_slice())
        .read_to_end(&mut inflated)
        .unwrap();
    assert_eq!(inflated, script.body);

    // Revalidation answers 304 without a body.
    let etag = script.header("etag").unwrap().to_owned();
    let again = http(
        engine.port,
        "GET",
        "/synchrony/demo/demo.js",
        &[("If-None-Match", &etag)],
        &[],
    )
    .await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    let css = http(engine.port, "GET", "/synchrony/demo/demo.css", &[], &[]).await;
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));

    let missing = http(engine.port, "GET", "/synchrony/demo/secrets.txt", &[], &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["type"], "not-found");
    let outside = http(engine.port, "GET", "/demo/", &[], &[]).await;
    assert_eq!(outside.status, 404, "only under the context path");
}

#[tokio::test]
async fn another_context_path_and_switching_the_demo_off() {
    let engine =
        EngineProcess::start(&EngineOptions::default().arg("--context-path", "/wiki/sync")).await;
    let page = http(engine.port, "GET", "/wiki/sync/demo/", &[], &[]).await;
    assert_eq!(page.status, 200);
    let redirect = http(engine.port, "GET", "/wiki/sync/demo", &[], &[]).await;
    assert_eq!(redirect.header("location"), Some("demo/"));

    let engine =
        EngineProcess::start(&EngineOptions::default().arg("--demo-enabled", "false")).await;
    let page = http(engine.port, "GET", "/synchrony/demo/", &[], &[]).await;
    assert_eq!(page.status, 404);
    assert!(
        !ready_log(&engine).await.contains("demo="),
        "no demo URL is printed"
    );
    let (status, _) = engine.get("/heartbeat").await;
    assert_eq!(status, 200, "the rest of the engine serves as before");
}
