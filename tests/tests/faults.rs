//! Faults of real components while editors work: storage refusing a change, stopping, filling.
#![allow(clippy::unwrap_used)]

use synchrony_tests::{EngineOptions, EngineProcess, PgDatabase, YClient, WAIT};

async fn sql(url: &str, statement: &str) {
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
}

/// A delete that storage refuses leaves the document and its editors as they were: nobody is
/// told 4404 until the rows are gone.
#[tokio::test]
async fn a_delete_storage_refuses_leaves_editors_connected() {
    sqlx::any::install_default_drivers();
    let db = PgDatabase::create().await;
    let engine = EngineProcess::start(&EngineOptions::postgres(&db.url)).await;
    let doc = "app/undeletable";
    let mut a = YClient::synced(&engine, doc, true).await;
    let mut b = YClient::synced(&engine, doc, false).await;
    a.append("kept;").await;
    a.wait_until("ack", |c| c.acked_edits() == 1).await;
    sql(
        &db.url,
        "CREATE FUNCTION refuse_delete() RETURNS trigger AS $$ \
         BEGIN RAISE EXCEPTION 'deletes refused by the test'; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse BEFORE DELETE ON doc_updates \
         FOR EACH ROW EXECUTE FUNCTION refuse_delete();",
    )
    .await;
    let refused = engine
        .request("DELETE", &format!("/v1/data/{doc}"), None, b"")
        .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    a.append("after;").await;
    b.wait_until("the edit after the refused delete", |c| {
        c.text() == "kept;after;"
    })
    .await;

    sql(&db.url, "DROP TRIGGER refuse ON doc_updates;").await;
    let deleted = engine
        .request("DELETE", &format!("/v1/data/{doc}"), None, b"")
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    for client in [&mut a, &mut b] {
        match client.raw.ended(WAIT).await {
            synchrony_tests::Ended::Closed { code, .. } => assert_eq!(code, 4404),
            other => panic!("{other:?}"),
        }
    }
}
