//! How deeply client data nests, measured without recursion.
//!
//! yrs decodes nested `Any` values (the arrays and maps inside a struct's content) recursively,
//! and it renders, deletes and garbage-collects nested shared types recursively. An update of
//! 200 KB can nest 50,000 levels; yrs then overflows its thread's stack, which aborts the whole
//! process (a stack overflow does not unwind, so `catch_unwind` cannot contain it). The engine
//! therefore measures input before yrs touches it:
//!
//! - [`scan_update`] reads a Yjs v1 update the way yrs's own decoder does (the same reads, so
//!   the same bytes are consumed and the same inputs fail), keeps explicit stacks instead of
//!   recursing, refuses `Any` values nested deeper than a limit, and lists every struct with what
//!   it is nested under. The engine resolves those parents against the document it already holds
//!   to bound the nesting of shared types (see `synchrony::nesting`).
//! - [`json_depth`] measures JSON text (awareness states) the same way.

use yrs::encoding::read::{Error as ReadError, Read};
use yrs::updates::decoder::{Decoder, DecoderV1};

/// The default bound on nesting, for both shared types and values inside content.
/// ProseMirror documents with lists in tables in lists stay far below it; yrs in a debug build
/// overflows a 2 MiB stack at about 1,000 levels.
pub const DEFAULT_MAX_NESTING: usize = 128;

/// The highest bound the engine accepts from configuration (8x below where yrs overflows).
pub const MAX_NESTING_CEILING: usize = 256;

/// An id of a Yjs struct: the client that made it and its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StructId {
    pub client: u64,
    pub clock: u32,
}

/// What an item is nested under, as its encoding says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// A root type, named.
    Root,
    /// The shared type that the item with this id holds.
    Item(StructId),
    /// The parent of its neighbours: yrs takes it from the left origin (or, lacking one, the
    /// right origin) when the item is integrated.
    Neighbours {
        origin: Option<StructId>,
        right_origin: Option<StructId>,
    },
}

/// One struct of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Struct {
    pub id: StructId,
    /// Clock values it covers.
    pub len: u32,
    /// None for garbage-collected ranges, which hold nothing and nest nothing.
    pub parent: Option<Parent>,
    /// The item's content is a shared type: its children are one level deeper.
    pub holds_type: bool,
}

/// Why an update was refused by the scan.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("malformed update: {0}")]
    Malformed(#[from] ReadError),
    #[error("a value in the update nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("unknown content type {0}")]
    UnknownContent(u8),
    #[error("unknown shared type {0}")]
    UnknownType(u8),
    #[error("malformed update: a count of {count} where {left} bytes are left")]
    Count { count: u64, left: usize },
    /// A clock range past 2^32: no client makes four billion changes, and yrs's arithmetic on
    /// such a range wraps (fuzzing found it indexing out of bounds and panicking).
    #[error("malformed update: a clock range of client {client} passes 2^32")]
    ClockOverflow { client: u64 },
    /// A client's structs listed again at a clock it has already covered in the same update.
    /// Encoders list each client once (merged updates may list one again, further on); yrs
    /// queues such repeats as they come, and integrating a struct over itself freed memory it
    /// then used (fuzzing found a heap use-after-free in its conflict resolution).
    #[error("malformed update: the structs of client {client} are listed again from clock {clock}, which they already cover")]
    Overlap { client: u64, clock: u32 },
    /// A subdocument (`Y.Doc` inside a shared type), which the engine does not support.
    #[error("subdocuments are not supported")]
    Subdocument,
}

/// Refuses a count of elements that cannot fit in what is left of the input, each element
/// taking at least `min_bytes`. yrs reserves memory for a count before it reads the elements:
/// a few bytes claiming 2^31 of them asked for tens of gigabytes.
pub fn check_count(count: u64, left: usize, min_bytes: usize) -> Result<(), ScanError> {
    if count.saturating_mul(min_bytes as u64) > left as u64 {
        return Err(ScanError::Count { count, left });
    }
    Ok(())
}

fn left(decoder: &mut DecoderV1) -> usize {
    decoder.read_to_end().map_or(0, |rest| rest.len())
}

// Struct and content tags, as yrs (and Yjs) encode them.
const GC: u8 = 0;
const SKIP: u8 = 10;
const HAS_ORIGIN: u8 = 0b1000_0000;
const HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
const HAS_PARENT_SUB: u8 = 0b0010_0000;
const CONTENT_DELETED: u8 = 1;
const CONTENT_JSON: u8 = 2;
const CONTENT_BINARY: u8 = 3;
const CONTENT_STRING: u8 = 4;
const CONTENT_EMBED: u8 = 5;
const CONTENT_FORMAT: u8 = 6;
const CONTENT_TYPE: u8 = 7;
const CONTENT_ANY: u8 = 8;
const CONTENT_DOC: u8 = 9;
// Shared type tags that carry a name.
const TYPE_XML_ELEMENT: u8 = 3;
const TYPE_WEAK: u8 = 7;
const TYPE_UNDEFINED: u8 = 15;

/// Reads a Yjs v1 update's structs and delete set; refuses `Any` values nested deeper than
/// `max_depth` and anything yrs's decoder would refuse as malformed.
pub fn scan_update(update: &[u8], max_depth: usize) -> Result<Vec<Struct>, ScanError> {
    let mut decoder = DecoderV1::from(update);
    let mut structs = Vec::new();
    let clients: u32 = decoder.read_var()?;
    // A client's run: its count, id and first clock, then at least one struct.
    check_count(clients.into(), left(&mut decoder), 3)?;
    // Where each client's listed structs end so far: a later run of the same client must start
    // at or after it.
    let mut ends: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    for _ in 0..clients {
        let count: u32 = decoder.read_var()?;
        let client = read_client(&mut decoder)?;
        let mut clock: u32 = decoder.read_var()?;
        if ends.get(&client).is_some_and(|&end| clock < end) {
            return Err(ScanError::Overlap { client, clock });
        }
        // A struct is its info byte and at least one more.
        check_count(count.into(), left(&mut decoder), 2)?;
        for _ in 0..count {
            let id = StructId { client, clock };
            let info = decoder.read_info()?;
            let scanned = match info {
                SKIP => {
                    let len: u32 = decoder.read_var()?;
                    (len != 0).then_some(Struct {
                        id,
                        len,
                        parent: None,
                        holds_type: false,
                    })
                }
                GC => {
                    let len = decoder.read_len()?;
                    (len != 0).then_some(Struct {
                        id,
                        len,
                        parent: None,
                        holds_type: false,
                    })
                }
                info => scan_item(&mut decoder, id, info, max_depth)?,
            };
            let Some(scanned) = scanned else {
                // yrs refuses empty GC and skip ranges and drops empty items.
                if matches!(info, SKIP | GC) {
                    return Err(ScanError::Malformed(ReadError::EndOfBuffer(0)));
                }
                continue;
            };
            clock = clock
                .checked_add(scanned.len)
                .ok_or(ScanError::ClockOverflow { client })?;
            if info != SKIP {
                structs.push(scanned);
            }
        }
        ends.insert(client, clock);
    }
    // The delete set: ranges only.
    let clients: u32 = decoder.read_var()?;
    check_count(clients.into(), left(&mut decoder), 2)?;
    for _ in 0..clients {
        let client = read_client(&mut decoder)?;
        let ranges: u32 = decoder.read_var()?;
        check_count(ranges.into(), left(&mut decoder), 2)?;
        for _ in 0..ranges {
            let clock = decoder.read_ds_clock()?;
            let len = decoder.read_ds_len()?;
            clock
                .checked_add(len)
                .ok_or(ScanError::ClockOverflow { client })?;
        }
    }
    // Bytes after the delete set are ignored, as yrs ignores them.
    Ok(structs)
}

/// Client ids are 53 bits. yrs keeps the low 53 bits of a longer one (and, built with debug
/// assertions, panics on it): the scan reads the same bytes and keeps the same bits, without
/// going through yrs's `ClientID` so that it never panics.
fn read_client(decoder: &mut DecoderV1) -> Result<u64, ReadError> {
    let client: u64 = decoder.read_var()?;
    Ok(client & ((1 << 53) - 1))
}

fn read_id(decoder: &mut DecoderV1) -> Result<StructId, ReadError> {
    let client = read_client(decoder)?;
    let clock: u32 = decoder.read_var()?;
    Ok(StructId { client, clock })
}

/// One item, read as `yrs::Update::decode_block` reads it. None for an item with no content.
fn scan_item(
    decoder: &mut DecoderV1,
    id: StructId,
    info: u8,
    max_depth: usize,
) -> Result<Option<Struct>, ScanError> {
    let neighbours = info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) != 0;
    let origin = (info & HAS_ORIGIN != 0)
        .then(|| read_id(decoder))
        .transpose()?;
    let right_origin = (info & HAS_RIGHT_ORIGIN != 0)
        .then(|| read_id(decoder))
        .transpose()?;
    let parent = if neighbours {
        Parent::Neighbours {
            origin,
            right_origin,
        }
    } else {
        let parent = if decoder.read_parent_info()? {
            decoder.read_string()?;
            Parent::Root
        } else {
            Parent::Item(read_id(decoder)?)
        };
        if info & HAS_PARENT_SUB != 0 {
            decoder.read_string()?;
        }
        parent
    };
    let mut holds_type = false;
    let len = match info & 0b1111 {
        CONTENT_DELETED => decoder.read_len()?,
        CONTENT_JSON => {
            // yrs reads one string more than the count says.
            let count = decoder.read_len()?;
            check_count(u64::from(count) + 1, left(decoder), 1)?;
            for _ in 0..=count {
                decoder.read_string()?;
            }
            count.wrapping_add(1)
        }
        CONTENT_BINARY => {
            decoder.read_buf()?;
            1
        }
        CONTENT_STRING => decoder.read_string()?.encode_utf16().count() as u32,
        CONTENT_EMBED => {
            decoder.read_string()?;
            1
        }
        CONTENT_FORMAT => {
            decoder.read_string()?;
            decoder.read_string()?;
            1
        }
        CONTENT_TYPE => {
            holds_type = true;
            match decoder.read_type_ref()? {
                TYPE_XML_ELEMENT => {
                    decoder.read_string()?;
                }
                // Weak links are a yrs feature the engine does not enable: yrs refuses them.
                TYPE_WEAK => return Err(ScanError::UnknownType(TYPE_WEAK)),
                0..=6 | 9 | TYPE_UNDEFINED => {}
                other => return Err(ScanError::UnknownType(other)),
            }
            1
        }
        CONTENT_ANY => {
            let count = decoder.read_len()?;
            check_count(count.into(), left(decoder), 1)?;
            for _ in 0..count {
                skip_any(decoder, max_depth)?;
            }
            count
        }
        // Subdocuments: the engine neither loads nor syncs them separately, and yrs's handling
        // of one decoded from a client leaked every struct around it (a reference cycle
        // through the subdocument, found by fuzzing): refused.
        CONTENT_DOC => return Err(ScanError::Subdocument),
        other => return Err(ScanError::UnknownContent(other)),
    };
    Ok((len != 0).then_some(Struct {
        id,
        len,
        parent: Some(parent),
        holds_type,
    }))
}

/// Skips one lib0 `Any` value, refusing nesting deeper than `max_depth` (a top-level array or
/// map is depth 1). The stack holds how many values each open array or map still contains.
fn skip_any(reader: &mut DecoderV1, max_depth: usize) -> Result<(), ScanError> {
    // (values left, whether each value is preceded by a key)
    let mut open: Vec<(u64, bool)> = Vec::new();
    let mut left_at_top = 1u64;
    loop {
        // Find the next value to read: pop finished containers.
        let keyed = loop {
            match open.last_mut() {
                Some((0, _)) => {
                    open.pop();
                }
                Some((left, keyed)) => {
                    *left -= 1;
                    break *keyed;
                }
                None if left_at_top == 0 => return Ok(()),
                None => {
                    left_at_top -= 1;
                    break false;
                }
            }
        };
        if keyed {
            reader.read_string()?;
        }
        match reader.read_u8()? {
            127 | 126 | 121 | 120 => {}
            125 => {
                reader.read_var::<i64>()?;
            }
            124 => {
                reader.read_exact(4)?;
            }
            123 | 122 => {
                reader.read_exact(8)?;
            }
            119 => {
                reader.read_string()?;
            }
            116 => {
                reader.read_buf()?;
            }
            tag @ (117 | 118) => {
                // yrs reads the count as a usize.
                let count = reader.read_var::<usize>()? as u64;
                // An array value is at least its tag; a map entry a key length and a tag.
                check_count(count, left(reader), if tag == 118 { 2 } else { 1 })?;
                if open.len() + 1 > max_depth {
                    return Err(ScanError::TooDeep { limit: max_depth });
                }
                open.push((count, tag == 118));
            }
            _ => return Err(ScanError::Malformed(ReadError::UnexpectedValue)),
        }
    }
}

/// The deepest nesting of arrays and objects in JSON text, measured without parsing it (strings
/// are skipped, escapes included). Malformed text gets some answer; the JSON parser that runs
/// afterwards refuses it.
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'"' => {
                while let Some(c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{
        Any, Array, ArrayPrelim, Doc, GetString, Map, MapPrelim, Text, Transact, Update,
        XmlElementPrelim, XmlFragment, XmlTextPrelim,
    };

    /// An update inserting into root array `a` one `Any` array nested `depth` levels.
    pub(crate) fn nested_any(depth: usize) -> Vec<u8> {
        let mut b = vec![1u8, 1, 5, 0, CONTENT_ANY, 1, 1, b'a', 1];
        for _ in 0..depth {
            b.extend([117, 1]);
        }
        b.extend([126, 0]);
        b
    }

    #[test]
    fn any_nesting_is_bounded_without_recursion() {
        let ok = nested_any(10);
        assert_eq!(scan_update(&ok, 10).unwrap().len(), 1);
        assert!(
            Update::decode_v1(&ok).is_ok(),
            "the handmade update is valid"
        );
        assert!(matches!(
            scan_update(&ok, 9),
            Err(ScanError::TooDeep { limit: 9 })
        ));
        // Far deeper than any stack: refused, not overflowed.
        assert!(matches!(
            scan_update(&nested_any(1_000_000), 128),
            Err(ScanError::TooDeep { .. })
        ));
    }

    #[test]
    fn real_updates_scan_to_their_structs() {
        let doc = Doc::with_client_id(7);
        let text = doc.get_or_insert_text("t");
        let map = doc.get_or_insert_map("m");
        let array = doc.get_or_insert_array("a");
        let xml = doc.get_or_insert_xml_fragment("x");
        let update = {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 0, "héllo 👋");
            text.insert(&mut txn, 1, "xy");
            let inner = map.insert(&mut txn, "k", MapPrelim::default());
            inner.insert(&mut txn, "n", Any::from(vec![Any::from(1.5), Any::Null]));
            let nested = array.insert(&mut txn, 0, ArrayPrelim::default());
            nested.push_back(&mut txn, "deep");
            array.push_back(&mut txn, Any::Buffer(vec![1, 2].into()));
            let p = xml.push_back(&mut txn, XmlElementPrelim::empty("p"));
            p.push_back(&mut txn, XmlTextPrelim::new("para"));
            text.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        let structs = scan_update(&update, 128).unwrap();
        let decoded = Update::decode_v1(&update).unwrap();
        let clock: u32 = structs.iter().map(|s| s.len).sum();
        assert_eq!(
            decoded.state_vector().get(&yrs::block::ClientID::new(7)),
            clock
        );
        assert_eq!(structs.iter().filter(|s| s.holds_type).count(), 4);
        assert!(structs
            .iter()
            .any(|s| matches!(s.parent, Some(Parent::Item(_)))));
        // Truncations and stray bytes are refused, as yrs refuses them.
        for cut in 1..update.len() {
            assert!(scan_update(&update[..cut], 128).is_err(), "cut at {cut}");
        }
        // Bytes after the delete set are ignored, as yrs ignores them.
        let mut longer = update.clone();
        longer.push(0);
        assert!(scan_update(&longer, 128).is_ok());
        assert!(Update::decode_v1(&longer).is_ok());
    }

    /// Two runs of client 1's structs, each one character inserted into root text `t`, the
    /// second starting at `second_clock`.
    fn two_runs(second_clock: u8) -> Vec<u8> {
        let run = |clock: u8, ch: u8| [1, 1, clock, CONTENT_STRING, 1, 1, b't', 1, ch];
        let mut b = vec![2u8];
        b.extend(run(0, b'a'));
        b.extend(run(second_clock, b'b'));
        b.push(0);
        b
    }

    #[test]
    fn a_client_listed_again_must_move_forward() {
        // A later run that continues the first (as merged updates may list a client again) is
        // read as yrs reads it.
        let forward = two_runs(1);
        assert_eq!(scan_update(&forward, 128).unwrap().len(), 2);
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        doc.transact_mut()
            .apply_update(Update::decode_v1(&forward).unwrap())
            .unwrap();
        // Both characters, each inserted with no neighbours.
        assert_eq!(text.get_string(&doc.transact()).len(), 2);
        // One that goes over clocks already listed is refused before yrs sees it.
        assert!(matches!(
            scan_update(&two_runs(0), 128),
            Err(ScanError::Overlap {
                client: 1,
                clock: 0
            })
        ));
        // The fuzzing input that made yrs use freed memory: the same struct three times.
        let found = include_bytes!(
            "../../tests/fuzz/regressions/update/yrs-use-after-free-in-resolve-conflict"
        );
        assert!(matches!(
            scan_update(found, 128),
            Err(ScanError::Overlap { client: 1, .. })
        ));
    }

    #[test]
    fn subdocuments_are_refused() {
        // The fuzzed input on which yrs leaked every struct around a subdocument.
        let found =
            include_bytes!("../../tests/fuzz/regressions/update/yrs-leak-through-a-subdocument");
        assert!(Update::decode_v1(found).is_ok(), "yrs reads it");
        assert!(matches!(
            scan_update(found, 128),
            Err(ScanError::Subdocument)
        ));
    }

    #[test]
    fn json_depth_skips_strings() {
        assert_eq!(json_depth("{}"), 1);
        assert_eq!(json_depth(r#"{"a":[1,{"b":"[[[[\"]]"}]}"#), 3);
        assert_eq!(json_depth(&"[".repeat(100_000)), 100_000);
        assert_eq!(json_depth("null"), 0);
    }
}
