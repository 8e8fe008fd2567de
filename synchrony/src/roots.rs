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

/// The branch of root `name`, whatever its type, without typing it.
fn branch<T: ReadTxn>(txn: &T, name: &str) -> Option<yrs::branch::BranchPtr> {
    use yrs::branch::{Branch, BranchPtr};
    fn of(shared: &impl AsRef<Branch>) -> BranchPtr {
        BranchPtr::from(shared.as_ref())
    }
    Some(match txn.get(name)? {
        Out::YText(t) => of(&t),
        Out::YXmlFragment(f) => of(&f),
        Out::YXmlElement(e) => of(&e),
        Out::YXmlText(t) => of(&t),
        Out::YMap(m) => of(&m),
        Out::YArray(a) => of(&a),
        Out::UndefinedRef(b) => b,
        _ => return None,
    })
}

/// What the root `name` holds, judged by its content: the type a root was given here (by a
/// reset, say) does not decide, since any client may fill it with something else.
pub fn kind<T: ReadTxn>(txn: &T, name: &str) -> RootKind {
    let Some(branch) = branch(txn, name) else {
        // `get` answers nothing for an absent root and for an XML hook; a hook is refused like
        // any other type that is not text.
        return match txn.root_refs().any(|(n, _)| n == name) {
            true => RootKind::Map,
            false => RootKind::Absent,
        };
    };
    if MapRef::from(branch).len(txn) > 0 {
        return RootKind::Map;
    }
    // Only text content (not strings in an array) reads as a string here.
    if !TextRef::from(branch).get_string(txn).is_empty() {
        return RootKind::Text;
    }
    let mut kind = RootKind::Empty;
    for value in ArrayRef::from(branch).iter(txn) {
        match value {
            Out::YXmlElement(_) | Out::YXmlText(_) | Out::YXmlFragment(_) => {
                return RootKind::XmlFragment
            }
            _ => kind = RootKind::Array,
        }
    }
    kind
}

/// The root's content as plain text: a text's characters, or a rich-text fragment's text with
/// one line per top-level block; empty for an absent or empty root. `None` for other kinds.
pub fn plain_text<T: ReadTxn>(txn: &T, name: &str) -> Option<String> {
    match kind(txn, name) {
        RootKind::Absent | RootKind::Empty => Some(String::new()),
        RootKind::Text => Some(TextRef::from(branch(txn, name)?).get_string(txn)),
        RootKind::XmlFragment => Some(fragment_text(
            &XmlFragmentRef::from(branch(txn, name)?),
            txn,
        )),
        _ => None,
    }
}

/// The root's content as XML (Yjs's own serialization, `toString()` of a `Y.XmlFragment`);
/// empty for an absent or empty root. `None` for other kinds.
pub fn xml<T: ReadTxn>(txn: &T, name: &str) -> Option<String> {
    match kind(txn, name) {
        RootKind::Absent | RootKind::Empty => Some(String::new()),
        RootKind::XmlFragment => Some(XmlFragmentRef::from(branch(txn, name)?).get_string(txn)),
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

/// Rich-text content to write: what a host's XML becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum XmlNode {
    /// A `Y.XmlElement` (a ProseMirror node: `paragraph`, `heading`, ...).
    Element {
        tag: String,
        attributes: Vec<(String, String)>,
        children: Vec<XmlNode>,
    },
    /// A `Y.XmlText`: runs of text, each with its marks (formatting attributes: mark name to an
    /// object of the mark's attributes, as y-prosemirror stores them).
    Text(Vec<(String, yrs::types::Attrs)>),
}

/// Parses the XML of a rich-text reset: any number of top-level nodes, in the form
/// `GET …?format=xml` gives (Yjs's own serialization). Elements named in `marks` are marks
/// around text (`<bold>`, `<link href="…">`), not nodes; they may hold only text and other
/// marks. Whitespace-only text between elements is layout and is dropped. Nesting deeper than
/// `max_depth` is refused.
pub fn parse_xml(
    body: &str,
    marks: &std::collections::HashSet<String>,
    max_depth: usize,
) -> Result<Vec<XmlNode>, String> {
    let body = body.trim_start_matches('\u{feff}').trim_start();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => match rest.find("?>") {
            Some(end) => &rest[end + 2..],
            None => return Err("the XML declaration is not closed".into()),
        },
        None => body,
    };
    count_attributes(body)?;
    let wrapped = format!("<synchrony-fragment>{body}</synchrony-fragment>");
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
    };
    let document = roxmltree::Document::parse_with_options(&wrapped, options)
        .map_err(|e| format!("not well-formed XML: {e}"))?;
    let parser = Parser { marks, max_depth };
    parser.children(document.root_element(), 1)
}

/// XML nodes (elements, texts, attributes' owners) one reset may hold.
pub const MAX_XML_NODES: u32 = 1_000_000;
/// Attributes one element may carry (the parser compares each with the others).
pub const MAX_XML_ATTRIBUTES_PER_ELEMENT: usize = 64;
/// Attributes one reset may carry in all.
pub const MAX_XML_ATTRIBUTES: usize = 200_000;

/// Counts attributes before anything is parsed: an `=` inside a tag and outside quotes begins
/// one (an upper bound, enough for the caps). Refuses an element with more than
/// [`MAX_XML_ATTRIBUTES_PER_ELEMENT`] and a body with more than [`MAX_XML_ATTRIBUTES`], in time
/// linear in the body.
fn count_attributes(body: &str) -> Result<(), String> {
    let (mut total, mut here) = (0usize, 0usize);
    let (mut in_tag, mut quote) = (false, None::<u8>);
    let bytes = body.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match (in_tag, quote, b) {
            (_, Some(q), _) if b == q => quote = None,
            (_, Some(_), _) => {}
            (false, None, b'<') => {
                // Comments, declarations and processing instructions hold no attributes.
                in_tag = !matches!(bytes.get(i + 1), Some(b'!' | b'?'));
                here = 0;
            }
            (true, None, b'"' | b'\'') => quote = Some(b),
            (true, None, b'>') => in_tag = false,
            (true, None, b'=') => {
                here += 1;
                total += 1;
                if here > MAX_XML_ATTRIBUTES_PER_ELEMENT {
                    return Err(format!(
                        "an element has more than {MAX_XML_ATTRIBUTES_PER_ELEMENT} attributes"
                    ));
                }
                if total > MAX_XML_ATTRIBUTES {
                    return Err(format!(
                        "the XML has more than {MAX_XML_ATTRIBUTES} attributes"
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn too_deep(max_depth: usize) -> String {
    format!("the XML nests deeper than {max_depth} levels (synchrony.max.nesting.depth)")
}

/// Layout: whitespace with a line break, as pretty-printing puts between and around elements.
fn layout(text: &str) -> bool {
    text.trim().is_empty() && text.contains('\n')
}

struct Parser<'a> {
    marks: &'a std::collections::HashSet<String>,
    max_depth: usize,
}

impl Parser<'_> {
    /// The nodes `node` holds, at nesting level `depth` (top-level nodes are at 1).
    fn children(&self, node: roxmltree::Node, depth: usize) -> Result<Vec<XmlNode>, String> {
        let mut nodes = Vec::new();
        let mut run: Vec<(String, yrs::types::Attrs)> = Vec::new();
        for child in node.children() {
            if let Some(text) = child.text().filter(|_| child.is_text()) {
                // Layout before the first text of a run is not content.
                if !(run.is_empty() && layout(text)) {
                    run.push((text.to_owned(), yrs::types::Attrs::new()));
                }
            } else if child.is_element() {
                if depth > self.max_depth {
                    return Err(too_deep(self.max_depth));
                }
                let tag = child.tag_name().name();
                if self.marks.contains(tag) {
                    // Marks make no nodes; their own nesting is bounded all the same.
                    self.marked(child, yrs::types::Attrs::new(), &mut run, 1)?;
                } else {
                    flush(&mut run, &mut nodes);
                    nodes.push(XmlNode::Element {
                        tag: tag.to_owned(),
                        attributes: child
                            .attributes()
                            .map(|a| (a.name().to_owned(), a.value().to_owned()))
                            .collect(),
                        children: self.children(child, depth + 1)?,
                    });
                }
            }
            // Comments and processing instructions carry nothing for the editor.
        }
        flush(&mut run, &mut nodes);
        Ok(nodes)
    }

    /// The text inside mark `node`, with `outer` marks and this one.
    fn marked(
        &self,
        node: roxmltree::Node,
        outer: yrs::types::Attrs,
        run: &mut Vec<(String, yrs::types::Attrs)>,
        depth: usize,
    ) -> Result<(), String> {
        if depth > self.max_depth {
            return Err(too_deep(self.max_depth));
        }
        let name = node.tag_name().name();
        let attributes: std::collections::HashMap<String, Any> = node
            .attributes()
            .map(|a| (a.name().to_owned(), Any::from(a.value())))
            .collect();
        let mut marks = outer;
        marks.insert(name.into(), Any::from(attributes));
        for child in node.children() {
            if let Some(text) = child.text().filter(|_| child.is_text()) {
                run.push((text.to_owned(), marks.clone()));
            } else if child.is_element() {
                let inner = child.tag_name().name();
                if !self.marks.contains(inner) {
                    return Err(format!(
                        "<{inner}> inside the mark <{name}>: marks hold only text and other marks"
                    ));
                }
                self.marked(child, marks.clone(), run, depth + 1)?;
            }
        }
        Ok(())
    }
}

/// Ends a run of inline content: one `Y.XmlText`, without the layout after its last text,
/// unless it is only whitespace.
fn flush(run: &mut Vec<(String, yrs::types::Attrs)>, nodes: &mut Vec<XmlNode>) {
    let mut runs = std::mem::take(run);
    while runs
        .last()
        .is_some_and(|(text, marks)| marks.is_empty() && layout(text))
    {
        runs.pop();
    }
    if runs.iter().any(|(text, _)| !text.trim().is_empty()) {
        nodes.push(XmlNode::Text(runs));
    }
}

/// Replaces the content of rich-text root `name` with `nodes`, in `txn`.
pub fn replace_fragment(txn: &mut yrs::TransactionMut, name: &str, nodes: &[XmlNode]) {
    use yrs::WriteTxn;
    let fragment = txn.get_or_insert_xml_fragment(name);
    let len = fragment.len(txn);
    fragment.remove_range(txn, 0, len);
    write(txn, &fragment, nodes);
}

fn write<P: XmlFragment>(txn: &mut yrs::TransactionMut, parent: &P, nodes: &[XmlNode]) {
    use yrs::types::xml::{Xml, XmlElementPrelim, XmlTextPrelim};
    for node in nodes {
        match node {
            XmlNode::Element {
                tag,
                attributes,
                children,
            } => {
                let element = parent.push_back(txn, XmlElementPrelim::empty(tag.as_str()));
                for (key, value) in attributes {
                    element.insert_attribute(txn, key.as_str(), value.as_str());
                }
                write(txn, &element, children);
            }
            XmlNode::Text(runs) => {
                let text = parent.push_back(txn, XmlTextPrelim::new(""));
                for (chunk, marks) in runs {
                    // With its marks given, even none, a run does not take on its predecessor's.
                    let at = text.len(txn);
                    text.insert_with_attributes(txn, at, chunk, marks.clone());
                }
            }
        }
    }
}

/// Makes every root of the document in `txn` hold what it held in `version` (a document read
/// back from a named version), in that one transaction: each root's current content is deleted
/// and a deep copy of the version's inserted, so that every editor sees the restore as an
/// ordinary change. Roots the version did not have (or had empty) are emptied. Refused, with
/// nothing changed, when a root now holds another type than it did in the version.
pub fn restore(txn: &mut yrs::TransactionMut, version: &yrs::Doc) -> Result<(), String> {
    use yrs::types::xml::XmlIn;
    use yrs::types::AsPrelim;
    use yrs::{Transact, WriteTxn};
    let vtxn = version.transact();
    let mut names: std::collections::BTreeSet<String> =
        vtxn.root_refs().map(|(name, _)| name.to_owned()).collect();
    names.extend(txn.root_refs().map(|(name, _)| name.to_owned()));
    let mut plan = Vec::with_capacity(names.len());
    for name in names {
        let then = kind(&vtxn, &name);
        let now = kind(txn, &name);
        let fits = matches!(then, RootKind::Absent | RootKind::Empty)
            || matches!(now, RootKind::Absent | RootKind::Empty)
            || now == then;
        if !fits {
            return Err(format!(
                "root {name:?} is {} now but was {} in the version",
                now.describe(),
                then.describe()
            ));
        }
        plan.push((name, then, now));
    }
    for (name, then, now) in plan {
        // Empty what is there now.
        match now {
            RootKind::Text => {
                let text = txn.get_or_insert_text(name.as_str());
                let len = text.len(txn);
                text.remove_range(txn, 0, len);
            }
            RootKind::XmlFragment => {
                let fragment = txn.get_or_insert_xml_fragment(name.as_str());
                let len = fragment.len(txn);
                fragment.remove_range(txn, 0, len);
            }
            RootKind::Map => txn.get_or_insert_map(name.as_str()).clear(txn),
            RootKind::Array => {
                let array = txn.get_or_insert_array(name.as_str());
                let len = array.len(txn);
                array.remove_range(txn, 0, len);
            }
            RootKind::Absent | RootKind::Empty => {}
        }
        // Copy in what the version held.
        match then {
            RootKind::Text => {
                let delta = vtxn
                    .get_text(name.as_str())
                    .map(|t| t.as_prelim(&vtxn).to_vec())
                    .unwrap_or_default();
                txn.get_or_insert_text(name.as_str())
                    .apply_delta(txn, delta);
            }
            RootKind::XmlFragment => {
                let Some(source) = vtxn.get_xml_fragment(name.as_str()) else {
                    continue;
                };
                let fragment = txn.get_or_insert_xml_fragment(name.as_str());
                for child in source.children(&vtxn) {
                    let copy = match child {
                        XmlOut::Element(e) => XmlIn::from(e.as_prelim(&vtxn)),
                        XmlOut::Fragment(f) => XmlIn::from(f.as_prelim(&vtxn)),
                        XmlOut::Text(t) => XmlIn::from(t.as_prelim(&vtxn)),
                    };
                    fragment.push_back(txn, copy);
                }
            }
            RootKind::Map => {
                let Some(source) = vtxn.get_map(name.as_str()) else {
                    continue;
                };
                let map = txn.get_or_insert_map(name.as_str());
                for (key, value) in source.iter(&vtxn) {
                    map.insert(txn, key, value.as_prelim(&vtxn));
                }
            }
            RootKind::Array => {
                let Some(source) = vtxn.get_array(name.as_str()) else {
                    continue;
                };
                let array = txn.get_or_insert_array(name.as_str());
                for value in source.iter(&vtxn) {
                    array.push_back(txn, value.as_prelim(&vtxn));
                }
            }
            RootKind::Absent | RootKind::Empty => {}
        }
    }
    Ok(())
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
        assert_eq!(plain_text(&txn, "meta"), None);
        assert_eq!(xml(&txn, "body"), None);
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
    }

    #[test]
    fn a_root_typed_here_is_still_judged_by_its_content() {
        // A text reset typed the empty root as text; then an editor filled it with a page.
        let doc = Doc::new();
        let _ = doc.get_or_insert_text("prosemirror");
        assert_eq!(kind(&doc.transact(), "prosemirror"), RootKind::Empty);
        let source = Doc::new();
        page(&source);
        let update = source
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        doc.transact_mut()
            .apply_update(Update::decode_v1(&update).unwrap())
            .unwrap();
        let txn = doc.transact();
        assert_eq!(kind(&txn, "prosemirror"), RootKind::XmlFragment);
        assert!(xml(&txn, "prosemirror").unwrap().starts_with("<heading"));
    }

    #[test]
    fn strings_in_an_array_are_not_text_and_absent_roots_read_empty() {
        let doc = received(|d| {
            d.get_or_insert_array("tags")
                .insert(&mut d.transact_mut(), 0, "draft");
        });
        let txn = doc.transact();
        assert_eq!(kind(&txn, "tags"), RootKind::Array);
        assert!(!kind(&txn, "tags").takes_text());
        assert_eq!(plain_text(&txn, "nothing").as_deref(), Some(""));
        assert_eq!(xml(&txn, "nothing").as_deref(), Some(""));
    }

    fn marks(names: &[&str]) -> std::collections::HashSet<String> {
        names.iter().map(|m| m.to_string()).collect()
    }

    #[test]
    fn xml_from_a_read_writes_back_the_same_page() {
        let doc = received(page);
        let xml = xml(&doc.transact(), "prosemirror").unwrap();
        let nodes = parse_xml(&xml, &marks(&["bold"]), 64).unwrap();
        let copy = Doc::new();
        replace_fragment(&mut copy.transact_mut(), "prosemirror", &nodes);
        assert_eq!(
            copy.get_or_insert_xml_fragment("prosemirror")
                .get_string(&copy.transact()),
            xml
        );
        // Without naming the mark, <bold> is an element: the host decides.
        let as_nodes = parse_xml(&xml, &marks(&[]), 64).unwrap();
        assert_ne!(as_nodes, nodes);
    }

    #[test]
    fn layout_whitespace_goes_and_text_between_marks_stays() {
        let nodes = parse_xml(
            "<?xml version=\"1.0\"?>\n<p>\n  <b>a</b> <i>b</i>\n</p>\n<!-- note -->\n<hr/>\n",
            &marks(&["b", "i"]),
            64,
        )
        .unwrap();
        assert_eq!(nodes.len(), 2, "{nodes:?}");
        let XmlNode::Element { children, .. } = &nodes[0] else {
            panic!("{nodes:?}")
        };
        let [XmlNode::Text(runs)] = &children[..] else {
            panic!("{children:?}")
        };
        let text: String = runs.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(text, "a b");
    }

    #[test]
    fn bad_xml_is_refused_with_the_reason() {
        let refused = |body: &str| parse_xml(body, &marks(&["b"]), 8).unwrap_err();
        assert!(refused("<p>open").contains("not well-formed"));
        assert!(refused("<!DOCTYPE p [<!ENTITY x \"y\">]><p>&x;</p>").contains("not well-formed"));
        assert!(refused("<p><b><p>x</p></b></p>").contains("marks hold only text"));
        let nested = |n: usize| "<d>".repeat(n) + &"</d>".repeat(n);
        assert!(parse_xml(&nested(8), &marks(&[]), 8).is_ok());
        assert!(refused(&nested(9)).contains("nests deeper than 8"));
        let marked =
            |n: usize| "<p>".to_owned() + &"<b>".repeat(n) + "x" + &"</b>".repeat(n) + "</p>";
        assert!(parse_xml(&marked(8), &marks(&["b"]), 8).is_ok());
        assert!(refused(&marked(9)).contains("nests deeper than 8"));
        assert!(parse_xml("", &marks(&[]), 8).unwrap().is_empty());
        // Attributes are capped per element and in all before the parser sees them.
        let attrs = |n: usize| (0..n).map(|i| format!(" a{i}=\"x=y\"")).collect::<String>();
        assert!(parse_xml(&format!("<p{}/>", attrs(64)), &marks(&[]), 8).is_ok());
        let many = parse_xml(&format!("<p{}/>", attrs(65)), &marks(&[]), 8).unwrap_err();
        assert!(many.contains("more than 64 attributes"), "{many}");
        let started = std::time::Instant::now();
        let huge = parse_xml(&format!("<p{}/>", attrs(32_000)), &marks(&[]), 8).unwrap_err();
        assert!(
            huge.contains("attributes") && started.elapsed() < std::time::Duration::from_secs(2)
        );
        let spread: String = (0..4_000).map(|_| format!("<p{}/>", attrs(60))).collect();
        assert!(parse_xml(&spread, &marks(&[]), 8)
            .unwrap_err()
            .contains("200000"));
    }
}
