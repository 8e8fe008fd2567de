//! What a document's root types hold, for the REST API.
//!
//! The Yjs encoding does not name a root's type: a root arrives from clients untyped, and each
//! client decides what it is by how it reads it (`ydoc.getText(...)`,
//! `ydoc.getXmlFragment(...)`). Reading a rich-text root (ProseMirror or Tiptap through
//! `y-prosemirror` keep a `Y.XmlFragment`) as text gives nothing, and writing strings into it
//! breaks every editor bound to it. So the REST API looks at what a root actually holds before
//! it reads or replaces it as text, and never types a root by asking for it.

use yrs::types::text::YChange;
use yrs::types::xml::{XmlFragment, XmlOut};
use yrs::{
    Any, Array, ArrayRef, GetString, Map, MapRef, Out, ReadTxn, Text, TextRef, XmlFragmentRef,
};

/// What a root holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// No root of that name.
    Absent,
    /// A root with nothing in it (or only deleted content): any type fits.
    Empty,
    Text,
    /// Rich text: `Y.XmlFragment` of elements and XML texts.
    XmlFragment,
    Map,
    Array,
}

impl RootKind {
    pub fn describe(self) -> &'static str {
        match self {
            RootKind::Absent => "absent",
            RootKind::Empty => "empty",
            RootKind::Text => "a Y.Text",
            RootKind::XmlFragment => "a rich-text Y.XmlFragment",
            RootKind::Map => "a Y.Map",
            RootKind::Array => "a Y.Array",
        }
    }

    /// Whether a plain-text reset may write into it.
    pub fn takes_text(self) -> bool {
        matches!(self, RootKind::Absent | RootKind::Empty | RootKind::Text)
    }
}

/// What the root `name` holds, judged by its content when no client typed it here.
pub fn kind<T: ReadTxn>(txn: &T, name: &str) -> RootKind {
    let Some(out) = txn.get(name) else {
        // `get` answers nothing for an absent root and for an XML hook; a hook is refused like
        // any other type that is not text.
        return match txn.root_refs().any(|(n, _)| n == name) {
            true => RootKind::Map,
            false => RootKind::Absent,
        };
    };
    match out {
        Out::YText(_) => RootKind::Text,
        Out::YXmlFragment(_) | Out::YXmlElement(_) | Out::YXmlText(_) => RootKind::XmlFragment,
        Out::YMap(_) => RootKind::Map,
        Out::YArray(_) => RootKind::Array,
        Out::UndefinedRef(branch) => {
            if MapRef::from(branch).len(txn) > 0 {
                return RootKind::Map;
            }
            let sequence = ArrayRef::from(branch);
            let mut kind = RootKind::Empty;
            for value in sequence.iter(txn) {
                match value {
                    // Text content is read as its characters.
                    Out::Any(Any::String(_)) => return RootKind::Text,
                    Out::YXmlElement(_) | Out::YXmlText(_) | Out::YXmlFragment(_) => {
                        kind = RootKind::XmlFragment
                    }
                    // Anything else in a sequence: an array of values or of shared types.
                    _ if kind == RootKind::Empty => kind = RootKind::Array,
                    _ => {}
                }
            }
            kind
        }
        _ => RootKind::Array,
    }
}

/// The root's content as plain text: a text's characters, or a rich-text fragment's text with
/// one line per top-level block. `None` for other kinds.
pub fn plain_text<T: ReadTxn>(txn: &T, name: &str) -> Option<String> {
    let branch = match txn.get(name)? {
        Out::YText(t) => return Some(t.get_string(txn)),
        Out::UndefinedRef(b) => b,
        Out::YXmlFragment(f) => return Some(fragment_text(&f, txn)),
        _ => return None,
    };
    match kind(txn, name) {
        RootKind::Text | RootKind::Empty => Some(TextRef::from(branch).get_string(txn)),
        RootKind::XmlFragment => Some(fragment_text(&XmlFragmentRef::from(branch), txn)),
        _ => None,
    }
}

/// The root's content as XML (Yjs's own serialization, `toString()` of a `Y.XmlFragment`).
/// `None` unless it is a fragment (or empty).
pub fn xml<T: ReadTxn>(txn: &T, name: &str) -> Option<String> {
    match kind(txn, name) {
        RootKind::Absent | RootKind::Empty => Some(String::new()),
        RootKind::XmlFragment => match txn.get(name)? {
            Out::YXmlFragment(f) => Some(f.get_string(txn)),
            Out::UndefinedRef(b) => Some(XmlFragmentRef::from(b).get_string(txn)),
            _ => None,
        },
        _ => None,
    }
}

fn fragment_text<T: ReadTxn>(fragment: &XmlFragmentRef, txn: &T) -> String {
    let lines: Vec<String> = fragment
        .children(txn)
        .map(|child| node_text(&child, txn))
        .collect();
    lines.join("\n")
}

fn node_text<T: ReadTxn>(node: &XmlOut, txn: &T) -> String {
    match node {
        XmlOut::Element(element) => element
            .children(txn)
            .map(|child| node_text(&child, txn))
            .collect(),
        XmlOut::Fragment(fragment) => fragment
            .children(txn)
            .map(|child| node_text(&child, txn))
            .collect(),
        XmlOut::Text(text) => text
            .diff(txn, YChange::identity)
            .into_iter()
            .filter_map(|chunk| match chunk.insert {
                Out::Any(Any::String(s)) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use yrs::types::xml::{Xml, XmlElementPrelim, XmlTextPrelim};
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, StateVector, Transact, Update};

    /// `build`'s document as the engine sees it: decoded from an update, its roots untyped.
    fn received(build: impl FnOnce(&Doc)) -> Doc {
        let source = Doc::new();
        build(&source);
        let update = source
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let doc = Doc::new();
        doc.transact_mut()
            .apply_update(Update::decode_v1(&update).unwrap())
            .unwrap();
        doc
    }

    /// A page as y-prosemirror stores it: block elements holding XML texts, marks as formatting.
    fn page(doc: &Doc) {
        let fragment = doc.get_or_insert_xml_fragment("prosemirror");
        let mut txn = doc.transact_mut();
        let heading = fragment.push_back(&mut txn, XmlElementPrelim::empty("heading"));
        heading.insert_attribute(&mut txn, "level", "1");
        heading.push_back(&mut txn, XmlTextPrelim::new("Title"));
        let paragraph = fragment.push_back(&mut txn, XmlElementPrelim::empty("paragraph"));
        let text = paragraph.push_back(&mut txn, XmlTextPrelim::new("Hello "));
        let bold = yrs::types::Attrs::from([("bold".into(), Any::Map(Default::default()))]);
        text.insert_with_attributes(&mut txn, 6, "world", bold);
    }

    #[test]
    fn untyped_roots_are_known_by_what_they_hold() {
        let doc = received(|d| {
            page(d);
            d.get_or_insert_text("body")
                .insert(&mut d.transact_mut(), 0, "plain");
            d.get_or_insert_map("meta")
                .insert(&mut d.transact_mut(), "k", "v");
            d.get_or_insert_array("list")
                .insert(&mut d.transact_mut(), 0, 1);
            let gone = d.get_or_insert_text("gone");
            gone.insert(&mut d.transact_mut(), 0, "x");
            gone.remove_range(&mut d.transact_mut(), 0, 1);
        });
        let txn = doc.transact();
        assert_eq!(kind(&txn, "prosemirror"), RootKind::XmlFragment);
        assert_eq!(kind(&txn, "body"), RootKind::Text);
        assert_eq!(kind(&txn, "meta"), RootKind::Map);
        assert_eq!(kind(&txn, "list"), RootKind::Array);
        assert_eq!(kind(&txn, "gone"), RootKind::Empty);
        assert_eq!(kind(&txn, "nothing"), RootKind::Absent);
        assert!(!kind(&txn, "prosemirror").takes_text());
        assert!(kind(&txn, "gone").takes_text());
    }

    #[test]
    fn rich_text_reads_as_lines_and_as_xml() {
        let doc = received(page);
        let txn = doc.transact();
        assert_eq!(
            plain_text(&txn, "prosemirror").as_deref(),
            Some("Title\nHello world")
        );
        let xml = xml(&txn, "prosemirror").unwrap();
        assert!(
            xml.starts_with("<heading level=\"1\">Title</heading><paragraph>Hello "),
            "{xml}"
        );
        assert!(xml.contains("world"), "{xml}");
        assert_eq!(plain_text(&txn, "meta"), None);
    }

    #[test]
    fn reading_never_types_a_root() {
        let doc = received(page);
        let _ = plain_text(&doc.transact(), "prosemirror");
        let _ = kind(&doc.transact(), "prosemirror");
        assert!(matches!(
            doc.transact().get("prosemirror"),
            Some(Out::UndefinedRef(_))
        ));
    }
}
