//! Work a single request can cause is bounded: a rich-text reset with tens of thousands of
//! attributes is refused before it is parsed, and concurrent version marks never pass the
//! per-page caps (checked in the insert itself), on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use synchrony_tests::{EngineOptions, EngineProcess, PgDatabase};

#[tokio::test]
async fn a_reset_with_thirty_two_thousand_attributes_is_refused_at_once() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let attrs: String = (0..32_000).map(|i| format!(" a{i}=\"{i}\"")).collect();
    let body = format!("<paragraph{attrs}>text</paragraph>");
    let started = Instant::now();
    let refused = engine
        .request(
            "PUT",
            "/v1/data/bounded/xml?reset=true&name=prosemirror&format=xml",
            None,
            body.as_bytes(),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.json()["type"], "invalid-xml");
    assert!(
        refused.text().contains("more than 64 attributes"),
        "{}",
        refused.text()
    );
    println!("a 32,000-attribute reset was refused in {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // An ordinary reset still works.
    let fine = engine
        .request(
            "PUT",
            "/v1/data/bounded/xml?reset=true&name=prosemirror&format=xml",
            None,
            b"<paragraph align=\"left\">text</paragraph>",
        )
        .await;
    assert_eq!(fine.status, 200, "{}", fine.text());
}

/// Marks twenty versions at once of a page whose quota holds exactly five.
async fn concurrent_marks_keep_the_quota(options: EngineOptions, what: &str) {
    // A page of a known size: one text of 10,000 characters.
    let text = "x".repeat(10_000);
    let probe = EngineProcess::start(&options).await;
    let put = probe
        .request(
            "PUT",
            "/v1/data/bounded/page?reset=true&name=content",
            None,
            text.as_bytes(),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let mark = probe
        .request(
            "POST",
            "/v1/data/bounded/page/versions",
            None,
            br#"{"label":"size"}"#,
        )
        .await;
    assert_eq!(mark.status, 201, "{}", mark.text());
    let size = mark.json()["version"]["bytes"].as_u64().unwrap();
    drop(probe);

    let quota = 5 * size + size / 2;
    let engine = EngineProcess::start(&options.clone().arg("--versions-max-bytes", quota)).await;
    let marks = (0..20).map(|i| {
        let engine = &engine;
        async move {
            let body = format!(r#"{{"label":"mark {i}"}}"#);
            engine
                .request(
                    "POST",
                    "/v1/data/bounded/page/versions",
                    None,
                    body.as_bytes(),
                )
                .await
        }
    });
    let answers = futures_util::future::join_all(marks).await;
    let created = answers.iter().filter(|a| a.status == 201).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.status == 409).collect();
    assert_eq!(
        created + refused.len(),
        20,
        "{what}: {:?}",
        answers.iter().map(|a| a.text()).collect::<Vec<_>>()
    );
    // One version was there already: four more fit.
    assert_eq!(
        created, 4,
        "{what}: {created} marks passed a quota that holds four more"
    );
    assert!(
        refused.iter().all(|a| a.json()["type"] == "versions-quota"),
        "{what}"
    );
    let counts = engine.get("/v1/history/count?doc=bounded/page").await;
    let counts: serde_json::Value = serde_json::from_str(&counts.1).unwrap();
    assert_eq!(counts["versions"], 5, "{what}: {counts}");
    assert!(
        counts["version_bytes"].as_u64().unwrap() <= quota,
        "{what}: {counts}"
    );
    assert_eq!(counts["version_bytes_max"].as_u64().unwrap(), quota);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_version_marks_never_pass_the_caps() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_marks_keep_the_quota(EngineOptions::sqlite(dir.path()), "SQLite").await;
    let db = PgDatabase::create().await;
    concurrent_marks_keep_the_quota(EngineOptions::postgres(&db.url), "PostgreSQL").await;
}
