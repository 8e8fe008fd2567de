//! Reading a document for the REST API: its state, its roots as JSON, one root's text or XML,
//! and a stored version decoded into a document of its own.

use super::*;

/// What the REST API shows of a document (no sessions): its state as an update, its roots as
/// JSON and, when asked, one root's text or XML (or why it has none).
pub fn read_state(ydoc: &yrs::Doc, text_root: Option<&str>, xml: bool) -> DocRead {
    let txn = ydoc.transact();
    let text = text_root.map(|name| {
        let found = if xml {
            crate::roots::xml(&txn, name)
        } else {
            crate::roots::plain_text(&txn, name)
        };
        found.ok_or_else(|| {
            let kind = crate::roots::kind(&txn, name).describe();
            match xml {
                true => format!("root {name:?} is {kind}, not rich text: it has no XML"),
                false => format!("root {name:?} is {kind}, not text"),
            }
        })
    });
    let mut json = serde_json::Map::new();
    for (name, value) in txn.root_refs() {
        json.insert(name.to_owned(), root_json(&value, &txn));
    }
    DocRead {
        update: txn.encode_state_as_update_v1(&StateVector::default()),
        json: serde_json::Value::Object(json),
        text,
        sessions: Vec::new(),
    }
}

/// JSON for a root type. Roots that arrived only through updates have no declared type yet;
/// their content decides (a map if it has keys, else text if it reads as text, else an array).
fn root_json<T: ReadTxn>(value: &yrs::Out, txn: &T) -> serde_json::Value {
    use yrs::types::ToJson;
    let any = match value {
        yrs::Out::UndefinedRef(branch) => {
            let map = yrs::MapRef::from(*branch);
            let text = yrs::TextRef::from(*branch);
            let array = yrs::ArrayRef::from(*branch);
            if map.len(txn) > 0 {
                map.to_json(txn)
            } else if !text.get_string(txn).is_empty() || array.len(txn) == 0 {
                yrs::Any::from(text.get_string(txn))
            } else {
                array.to_json(txn)
            }
        }
        other => other.to_json(txn),
    };
    serde_json::to_value(&any).unwrap_or(serde_json::Value::Null)
}

/// A stored version's state as a document of its own, for [`DocCommand::Restore`]: decoded and
/// applied on a blocking thread, so a large version never holds up the page's own task.
pub async fn decode_version(state: Vec<u8>) -> Result<yrs::Doc, DocError> {
    let decoded = tokio::task::spawn_blocking(move || {
        let version = yrs::Doc::new();
        let applied = catch_unwind(|| Update::decode_v1(&state))
            .map_err(|_| "the stored version could not be decoded".to_owned())
            .and_then(|decoded| decoded.map_err(|e| e.to_string()))
            .and_then(|update| {
                version
                    .transact_mut()
                    .apply_update(update)
                    .map_err(|e| e.to_string())
            });
        applied.map(|()| version)
    })
    .await
    .unwrap_or_else(|_| Err("the stored version could not be decoded".to_owned()));
    decoded.map_err(|error| {
        tracing::error!(%error, "a stored version is unreadable");
        DocError::InvalidUpdate(error)
    })
}
