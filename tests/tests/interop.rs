//! Real JavaScript clients (npm `yjs` + `y-websocket` on Node with `ws`) against the engine.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use synchrony_tests::{node, EngineOptions, EngineProcess, YClient};

#[tokio::test]
async fn y_websocket_clients_converge_share_presence_and_bring_offline_edits() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let result = node("converge", &engine, "app/interop-1", &["4"]).await;
    assert_eq!(result["ok"], true);
    let text = result["text"].as_str().unwrap();
    assert!(text.starts_with("OFFLINE;"), "{text}");
    // Round 19's inserts are the last text edits, so every client's (the leaver's too) is intact,
    // and every client's own map key holds its last round.
    for i in 0..4 {
        assert!(
            text.contains(&format!("c{i}r19;")),
            "c{i}'s last edit is missing: {text}"
        );
        assert_eq!(result["map"][format!("own-{i}")], 19, "{}", result["map"]);
    }
    assert_eq!(result["map"]["offline"], true);

    // What the JavaScript clients agreed on is what a fresh client (and storage) sees.
    let reader = YClient::synced(&engine, "app/interop-1", false).await;
    assert_eq!(reader.text(), text);
}

#[tokio::test]
async fn a_state_sent_in_fragments_reaches_a_stock_client_whole() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let mut writer = YClient::synced(&engine, "app/interop-large", true).await;
    // 1.5 MB: two dozen 64 KiB fragments, the last one partial.
    let text: String = (0..150_000).map(|i| format!("{:09}|", i * 7)).collect();
    writer.append(&text).await;
    writer
        .wait_until("the text to be durable", |c| c.acked_edits() == 1)
        .await;
    let result = node("large", &engine, "app/interop-large", &[]).await;
    let fnv1a = text.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    assert_eq!(result["length"], text.len());
    assert_eq!(
        result["fnv1a"], fnv1a,
        "the synced text differs from the written one"
    );
}

#[tokio::test]
async fn stock_clients_never_see_extension_messages() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    // An opted-in client on the same document receives acks meanwhile.
    let mut acker = YClient::synced(&engine, "app/interop-ext", true).await;
    let stock = node("stock", &engine, "app/interop-ext", &[]);
    let acks = async {
        for i in 0..5 {
            acker.append(&format!("{i}")).await;
        }
        acker
            .wait_until("acks for every edit", |c| c.acked_edits() == 5)
            .await;
        acker.drain(Duration::from_millis(100)).await;
    };
    let (result, ()) = tokio::join!(stock, acks);
    let types: Vec<u64> = result["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert!(types.iter().all(|t| *t <= 3), "stock client saw {types:?}");
    assert_eq!(acker.acked_edits(), 5);
}

/// A rich-text page (a `Y.XmlFragment` as y-prosemirror writes it, made by real Yjs clients)
/// reads back through REST as Yjs's XML and as plain text; a text reset aimed at it is refused
/// with 400 while its editors are connected, and the page comes through untouched.
#[tokio::test]
async fn a_rich_text_page_is_read_as_xml_and_never_reset_as_text() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let result = node("richtext", &engine, "app/page-7", &[]).await;
    assert_eq!(result["ok"], true);
    assert_eq!(result["engine_xml"], result["yjs_xml"], "{result}");
    assert_eq!(result["engine_text"], "Title\nHello world", "{result}");
    assert_eq!(result["refused"], 400, "{result}");
    assert_eq!(result["refusal"]["type"], "wrong-root-type", "{result}");
    let message = result["refusal"]["message"].as_str().unwrap();
    assert!(message.contains("rich-text Y.XmlFragment"), "{message}");
    assert_eq!(result["xml_of_text_root"], 400, "{result}");
    assert_eq!(result["after"], result["yjs_xml"], "{result}");
    assert_eq!(result["non_elements"], 0, "{result}");
}

/// A real y-prosemirror page is read through REST as XML, replaced from edited XML while two
/// editors are connected, and read back by y-prosemirror's own conversion into a valid
/// ProseMirror document with its marks; every wrong reset is refused and changes nothing.
#[tokio::test]
async fn a_y_prosemirror_page_is_replaced_from_xml_while_editors_watch() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let result = node("prosemirror", &engine, "app/page-8", &[]).await;
    assert_eq!(result["ok"], true);
    assert_eq!(result["engine_xml"], result["made"], "{result}");
    assert_eq!(result["engine_text"], "Draft\nSome bold words", "{result}");
    assert_eq!(
        result["text_content"], "FinalSome bold wordsSee this page",
        "{result}"
    );
    let blocks = result["doc"]["content"].as_array().unwrap();
    assert_eq!(blocks.len(), 3, "{result}");
    assert_eq!(blocks[0]["type"], "heading");
    let bold = &blocks[1]["content"][1];
    assert_eq!(bold["text"], "bold");
    assert_eq!(bold["marks"][0]["type"], "strong", "{result}");
    let link = &blocks[2]["content"][1];
    assert_eq!(link["text"], "this ");
    assert_eq!(link["marks"][0]["type"], "link", "{result}");
    assert_eq!(
        link["marks"][0]["attrs"]["href"], "https://example.com/a?b=1&c=2",
        "{result}"
    );
    let page = &blocks[2]["content"][2];
    assert_eq!(page["text"], "page");
    assert_eq!(page["marks"].as_array().unwrap().len(), 2, "{result}");
    assert_eq!(result["after"], result["after_reset"], "{result}");
    let refusals = &result["refusals"];
    assert_eq!(refusals["text_into_rich_text"][0], 400, "{result}");
    assert_eq!(refusals["text_into_rich_text"][1], "wrong-root-type");
    assert_eq!(refusals["xml_into_text"][0], 400, "{result}");
    assert_eq!(refusals["xml_into_text"][1], "wrong-root-type");
    assert_eq!(refusals["malformed"][0], 400, "{result}");
    assert_eq!(refusals["malformed"][1], "invalid-xml");
    assert_eq!(refusals["node_in_mark"][0], 400, "{result}");
    let message = refusals["node_in_mark"][1].as_str().unwrap();
    assert!(message.contains("marks hold only text"), "{message}");
}
