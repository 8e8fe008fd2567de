//! Decodes and re-encodes frames produced by the real `yjs`/`y-protocols` JavaScript encoder
//! (`tests/js/golden.mjs` wrote `golden.json`). Byte equality in both directions proves wire
//! compatibility with stock y-websocket clients.

use synchrony_protocol::{decode_frame, encode_message, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Transact, Update};

struct Vector {
    name: String,
    bytes: Vec<u8>,
    fields: serde_json::Value,
}

fn vectors() -> Vec<Vector> {
    let json: serde_json::Value =
        serde_json::from_str(include_str!("golden.json")).expect("golden.json is JSON");
    json["vectors"]
        .as_array()
        .expect("vectors array")
        .iter()
        .map(|v| Vector {
            name: v["name"].as_str().expect("name").to_owned(),
            bytes: hex::decode(v["hex"].as_str().expect("hex")).expect("hex decodes"),
            fields: v.clone(),
        })
        .collect()
}

fn field_bytes(v: &Vector, key: &str) -> Vec<u8> {
    hex::decode(
        v.fields[key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no {key}", v.name)),
    )
    .expect("hex")
}

#[test]
fn every_vector_round_trips_byte_for_byte() {
    let vectors = vectors();
    assert_eq!(vectors.len(), 9, "golden.json lost vectors");
    for v in &vectors {
        // Clients never send the extension; the client-side decoder reads it.
        let message = if v.name == "persisted_ack" {
            synchrony_protocol::frame::decode_frame_any(&v.bytes)
        } else {
            decode_frame(&v.bytes)
        }
        .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(
            encode_message(&message),
            v.bytes,
            "{} re-encodes differently",
            v.name
        );
    }
}

#[test]
fn vectors_carry_the_expected_content() {
    for v in vectors() {
        let message = synchrony_protocol::frame::decode_frame_any(&v.bytes).expect("decodes");
        match (v.name.as_str(), message) {
            ("sync_step1_empty", Message::Sync(SyncMessage::SyncStep1(sv))) => {
                assert!(sv.is_empty())
            }
            ("sync_step1_doc", Message::Sync(SyncMessage::SyncStep1(sv))) => {
                assert_eq!(
                    yrs::updates::encoder::Encode::encode_v1(&sv),
                    field_bytes(&v, "state_vector_hex")
                );
            }
            ("sync_step2_doc", Message::Sync(SyncMessage::SyncStep2(update)))
            | ("sync_update", Message::Sync(SyncMessage::Update(update))) => {
                assert_eq!(update, field_bytes(&v, "update_hex"));
                let doc = yrs::Doc::new();
                let text = doc.get_or_insert_text("content");
                let mut txn = doc.transact_mut();
                txn.apply_update(Update::decode_v1(&update).expect("update decodes"))
                    .expect("applies");
                assert!(!txn.has_missing_updates());
                assert_eq!(text.get_string(&txn), "éllo wörld ✓");
            }
            ("awareness_update", Message::Awareness(update)) => {
                let id = v.fields["client_id"].as_u64().expect("client_id");
                let entry = &update.clients[&yrs::block::ClientID::new(id)];
                assert_eq!(&*entry.json, v.fields["state"].as_str().expect("state"));
                assert_eq!(entry.clock, 1);
            }
            ("awareness_removal", Message::Awareness(update)) => {
                let id = v.fields["client_id"].as_u64().expect("client_id");
                let entry = &update.clients[&yrs::block::ClientID::new(id)];
                assert_eq!(&*entry.json, "null");
                assert_eq!(entry.clock, 2);
            }
            ("query_awareness", Message::AwarenessQuery) => {}
            ("auth_permission_denied", Message::Auth(Some(reason))) => {
                assert_eq!(reason, v.fields["reason"].as_str().expect("reason"));
            }
            ("persisted_ack", Message::Custom(tag, body)) => {
                assert_eq!(tag, synchrony_protocol::ext::MSG_PERSISTED);
                assert_eq!(
                    synchrony_protocol::ext::decode_persisted(&body),
                    v.fields["through"].as_u64()
                );
                assert_eq!(synchrony_protocol::ext::encode_persisted(300), v.bytes);
            }
            (name, other) => panic!("{name}: unexpected message {other:?}"),
        }
    }
}
