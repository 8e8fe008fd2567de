//! How deeply a document's shared types nest, tracked so that an update that would nest them
//! past the limit (`synchrony.max.nesting.depth`) is refused before yrs integrates it.
//!
//! yrs deletes, garbage-collects and renders nested types recursively: a document whose types
//! nest tens of thousands of levels overflows the stack of the thread that touches it, and a
//! stack overflow aborts the process. An update only says what each struct is nested under (a
//! root, the item holding a type, or its neighbours, whose parent yrs copies), so the depth of a
//! new struct depends on structs the document already holds. [`NestingIndex`] keeps, for every
//! struct the document has seen, its level (1 inside a root type, one more inside each nested
//! type), as clock ranges per client: runs of typing at one level take one entry.
//!
//! The estimate errs on the deep side: where two structs claim one id not yet in the document
//! the deeper level counts, and an item under neighbours takes the deeper of the two. Parts of
//! structs the document already holds are skipped, as yrs skips them.
//!
//! Structs whose parent is not known yet wait, as yrs keeps them pending, and are placed when
//! what they wait for arrives. A waiting struct may not hold a type: then whatever it waits for,
//! it lands at most one level below a type that was itself checked, so completing it can never
//! pass the limit (a chain of types parked under an id not yet written would otherwise be
//! integrated by yrs the moment anyone wrote that id). Honest clients send such an update only
//! when the server lost something they depend on; they are closed with 1013 and resync.

use std::collections::{BTreeMap, HashMap, VecDeque};

use synchrony_protocol::nesting::{scan_update, Parent, ScanError, Struct, StructId};
use yrs::block::ClientID;
use yrs::StateVector;

/// Structs waiting for a missing predecessor, at most. yrs holds such structs until the
/// predecessor arrives; honest clients leave few. Every update re-examines them.
const MAX_PENDING: usize = 4_096;

#[derive(Debug, thiserror::Error)]
pub enum NestingError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("the update would nest shared types deeper than {limit} levels")]
    TooDeep { limit: u32 },
    #[error("more than {MAX_PENDING} structs wait for predecessors the document does not have")]
    TooManyPending,
    #[error("the update nests a shared type under content the document does not have")]
    PendingType,
}

/// Levels of clock ranges, per client: start → (end, level), ranges disjoint.
#[derive(Debug, Default, Clone)]
struct Levels(HashMap<u64, BTreeMap<u32, (u32, u32)>>);

impl Levels {
    fn get(&self, id: StructId) -> Option<u32> {
        let ranges = self.0.get(&id.client)?;
        let (_, &(end, level)) = ranges.range(..=id.clock).next_back()?;
        (id.clock < end).then_some(level)
    }

    /// Records `level` for `[start, end)`; where a range already has a level, the deeper one
    /// stays. Neighbouring ranges of equal level are merged.
    fn raise(&mut self, client: u64, start: u32, end: u32, level: u32) {
        if start >= end {
            return;
        }
        let ranges = self.0.entry(client).or_default();
        let overlapping: Vec<(u32, (u32, u32))> = ranges
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v))
            .collect();
        let mut pieces: Vec<(u32, u32, u32)> = Vec::with_capacity(overlapping.len() * 2 + 2);
        let mut cursor = start;
        for (s, (e, l)) in overlapping.into_iter().rev() {
            ranges.remove(&s);
            if s < start {
                pieces.push((s, start, l));
            }
            let (from, to) = (s.max(start), e.min(end));
            if cursor < from {
                pieces.push((cursor, from, level));
            }
            pieces.push((from, to, l.max(level)));
            cursor = to;
            if e > end {
                pieces.push((end, e, l));
            }
        }
        if cursor < end {
            pieces.push((cursor, end, level));
        }
        for (s, e, l) in pieces {
            ranges.insert(s, (e, l));
        }
        // Merge runs of one level around what changed.
        let mut at = ranges.range(..start).next_back().map_or(start, |(s, _)| *s);
        while let Some((s, (e, l))) = ranges.range(at..).next().map(|(&s, &v)| (s, v)) {
            if s > end {
                break;
            }
            match ranges.get(&e).copied() {
                Some((next_end, next_level)) if next_level == l => {
                    ranges.remove(&e);
                    ranges.insert(s, (next_end, l));
                }
                _ => at = e,
            }
        }
    }

    fn absorb(&mut self, other: Levels) {
        for (client, ranges) in other.0 {
            for (start, (end, level)) in ranges {
                self.raise(client, start, end, level);
            }
        }
    }

    fn entries(&self) -> usize {
        self.0.values().map(BTreeMap::len).sum()
    }
}

/// An update [`NestingIndex::check`] found within the limits, ready to be recorded.
#[derive(Debug, Default)]
pub struct Admitted {
    added: Levels,
    /// The structs still waiting; None when the update had no structs (nothing changes).
    pending: Option<Vec<Struct>>,
}

/// The nesting of one document's shared types.
#[derive(Debug, Clone)]
pub struct NestingIndex {
    limit: u32,
    known: Levels,
    /// Structs whose parent is not known yet.
    pending: Vec<Struct>,
}

impl NestingIndex {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.min(u32::MAX as usize) as u32,
            known: Levels::default(),
            pending: Vec::new(),
        }
    }

    /// Range entries held (for tests and diagnostics).
    pub fn entries(&self) -> usize {
        self.known.entries()
    }

    /// Checks an update and records its structs when it is within the limits; records nothing
    /// when it is refused.
    pub fn admit(&mut self, update: &[u8], held: &StateVector) -> Result<(), NestingError> {
        let admitted = self.check(update, held)?;
        self.record(admitted);
        Ok(())
    }

    /// Checks an update without recording it: [`NestingIndex::record`] does, once the update
    /// has been applied. `held` is the document's state vector: what yrs has integrated.
    pub fn check(&self, update: &[u8], held: &StateVector) -> Result<Admitted, NestingError> {
        let structs = scan_update(update, self.limit as usize)?;
        let fresh = structs.into_iter().filter_map(|mut s| {
            // yrs skips what it holds: so does the index (a resent range costs nothing).
            let have = held.get(&ClientID::new(s.id.client));
            let end = s.id.clock.saturating_add(s.len);
            if end <= have {
                return None;
            }
            if s.id.clock < have {
                s.len = end - have;
                s.id.clock = have;
            }
            Some(s)
        });
        let candidates: Vec<Struct> = self.pending.iter().copied().chain(fresh).collect();
        if candidates.is_empty() {
            return Ok(Admitted::default());
        }
        let (added, unresolved) = self.resolve(&candidates)?;
        if unresolved.iter().any(|s| s.holds_type) {
            return Err(NestingError::PendingType);
        }
        if unresolved.len() > MAX_PENDING {
            return Err(NestingError::TooManyPending);
        }
        Ok(Admitted {
            added,
            pending: Some(unresolved),
        })
    }

    /// Records what [`NestingIndex::check`] found.
    pub fn record(&mut self, admitted: Admitted) {
        self.known.absorb(admitted.added);
        if let Some(pending) = admitted.pending {
            self.pending = pending;
        }
    }

    /// Levels of the `candidates` that can be placed, and those that cannot yet.
    fn resolve(&self, candidates: &[Struct]) -> Result<(Levels, Vec<Struct>), NestingError> {
        let mut added = Levels::default();
        // Per client and clock: candidates waiting for that id.
        let mut waiting: HashMap<u64, BTreeMap<u32, Vec<usize>>> = HashMap::new();
        let mut missing = vec![0u8; candidates.len()];
        let mut ready: VecDeque<usize> = VecDeque::new();
        for (i, s) in candidates.iter().enumerate() {
            for dep in dependencies(s).into_iter().flatten() {
                if self.level_of(&added, dep).is_none() {
                    waiting
                        .entry(dep.client)
                        .or_default()
                        .entry(dep.clock)
                        .or_default()
                        .push(i);
                    missing[i] += 1;
                }
            }
            if missing[i] == 0 {
                ready.push_back(i);
            }
        }
        while let Some(i) = ready.pop_front() {
            let s = candidates[i];
            let level = match s.parent {
                None => 0,
                Some(Parent::Root) => 1,
                Some(Parent::Item(id)) => self.level_of(&added, id).unwrap_or(0) + 1,
                Some(Parent::Neighbours {
                    origin,
                    right_origin,
                }) => [origin, right_origin]
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.level_of(&added, id))
                    .max()
                    .unwrap_or(0),
            };
            // A type at the limit would put its children past it.
            if level > self.limit || (s.holds_type && level >= self.limit) {
                return Err(NestingError::TooDeep { limit: self.limit });
            }
            let end = s.id.clock.saturating_add(s.len);
            added.raise(s.id.client, s.id.clock, end, level);
            if let Some(waiters) = waiting.get_mut(&s.id.client) {
                let woken: Vec<u32> = waiters.range(s.id.clock..end).map(|(c, _)| *c).collect();
                for clock in woken {
                    for w in waiters.remove(&clock).unwrap_or_default() {
                        missing[w] -= 1;
                        if missing[w] == 0 {
                            ready.push_back(w);
                        }
                    }
                }
            }
        }
        let unresolved = candidates
            .iter()
            .zip(&missing)
            .filter(|(_, m)| **m > 0)
            .map(|(s, _)| *s)
            .collect();
        Ok((added, unresolved))
    }

    fn level_of(&self, added: &Levels, id: StructId) -> Option<u32> {
        match (self.known.get(id), added.get(id)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The ids a struct's level depends on.
fn dependencies(s: &Struct) -> [Option<StructId>; 2] {
    match s.parent {
        None | Some(Parent::Root) => [None, None],
        Some(Parent::Item(id)) => [Some(id), None],
        Some(Parent::Neighbours {
            origin,
            right_origin,
        }) => [origin, right_origin],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{
        Array, ArrayPrelim, Doc, Map, MapPrelim, ReadTxn, StateVector, Text, Transact, Update,
        XmlElementPrelim, XmlFragment,
    };

    fn sv0() -> StateVector {
        StateVector::default()
    }

    /// An update nesting arrays `depth` levels under root array `a` (the root is level 1).
    fn nested_arrays(client: u64, depth: usize) -> Vec<u8> {
        let doc = Doc::with_client_id(client);
        let root = doc.get_or_insert_array("a");
        let mut txn = doc.transact_mut();
        let mut cur = root.insert(&mut txn, 0, ArrayPrelim::default());
        for _ in 1..depth {
            cur = cur.insert(&mut txn, 0, ArrayPrelim::default());
        }
        txn.encode_update_v1()
    }

    #[test]
    fn nesting_up_to_the_limit_is_admitted_and_past_it_refused() {
        // `depth` nested arrays under a root: the innermost array's children are at level
        // depth + 1, so a limit of depth + 1 admits it.
        let mut index = NestingIndex::new(11);
        index.admit(&nested_arrays(1, 10), &sv0()).unwrap();
        let mut index = NestingIndex::new(10);
        assert!(matches!(
            index.admit(&nested_arrays(1, 10), &sv0()),
            Err(NestingError::TooDeep { limit: 10 })
        ));
        assert_eq!(index.entries(), 0, "a refused update leaves nothing behind");
        // Far past any stack, in one small update: refused without recursion.
        let deep = nested_arrays(2, 30_000);
        assert!(deep.len() < 300_000);
        assert!(matches!(
            NestingIndex::new(128).admit(&deep, &sv0()),
            Err(NestingError::TooDeep { .. })
        ));
    }

    #[test]
    fn depth_built_one_update_at_a_time_counts() {
        let doc = Doc::with_client_id(3);
        let root = doc.get_or_insert_map("m");
        let mut index = NestingIndex::new(20);
        let mut cur = {
            let mut txn = doc.transact_mut();
            let m = root.insert(&mut txn, "k", MapPrelim::default());
            index.admit(&txn.encode_update_v1(), &sv0()).unwrap();
            m
        };
        let mut refused_at = None;
        for level in 2..40 {
            let mut txn = doc.transact_mut();
            let before = txn.state_vector();
            cur = cur.insert(&mut txn, "k", MapPrelim::default());
            if index.admit(&txn.encode_diff_v1(&before), &before).is_err() {
                refused_at = Some(level);
                break;
            }
        }
        assert_eq!(
            refused_at,
            Some(20),
            "the 20th nested map would hold level 21"
        );
    }

    #[test]
    fn structs_arriving_before_their_parents_wait_and_types_may_not() {
        let doc = Doc::with_client_id(9);
        let root = doc.get_or_insert_array("a");
        let (outer, values, types) = {
            let mut txn = doc.transact_mut();
            let inner = root.insert(&mut txn, 0, ArrayPrelim::default());
            let outer = txn.encode_update_v1();
            let before = txn.state_vector();
            inner.push_back(&mut txn, "value");
            inner.push_back(&mut txn, 2);
            let values = txn.encode_diff_v1(&before);
            let before = txn.state_vector();
            inner.insert(&mut txn, 0, ArrayPrelim::default());
            (outer, values, txn.encode_diff_v1(&before))
        };
        // Values may wait for the array that holds them, and are placed once it comes.
        let mut index = NestingIndex::new(50);
        index.admit(&values, &sv0()).unwrap();
        assert!(!index.pending.is_empty());
        // A type may not wait: a chain of them parked under an id nobody wrote yet would be
        // integrated by yrs the moment someone wrote it, however deep it went.
        assert!(matches!(
            index.admit(&types, &sv0()),
            Err(NestingError::PendingType)
        ));
        index.admit(&outer, &sv0()).unwrap();
        assert!(index.pending.is_empty());
        assert_eq!(
            index.known.get(StructId {
                client: 9,
                clock: 1
            }),
            Some(2)
        );
    }

    #[test]
    fn everyday_documents_take_few_entries() {
        let doc = Doc::with_client_id(5);
        let text = doc.get_or_insert_text("content");
        let xml = doc.get_or_insert_xml_fragment("prosemirror");
        let mut index = NestingIndex::new(128);
        for i in 0..2_000u32 {
            let mut txn = doc.transact_mut();
            let before = txn.state_vector();
            let len = text.len(&txn);
            text.insert(&mut txn, (i * 7) % (len + 1), "ab");
            if i % 100 == 0 {
                let p = xml.push_back(&mut txn, XmlElementPrelim::empty("p"));
                p.push_back(&mut txn, yrs::XmlTextPrelim::new("paragraph"));
            }
            if i % 10 == 0 {
                text.remove_range(&mut txn, 0, 1);
            }
            index.admit(&txn.encode_diff_v1(&before), &before).unwrap();
        }
        assert!(index.entries() < 200, "{} entries", index.entries());
        // A whole-state update (a load) gives the same picture.
        let mut fresh = NestingIndex::new(128);
        let state = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        fresh.admit(&state, &sv0()).unwrap();
        assert!(Update::decode_v1(&state).is_ok());
        assert!(fresh.pending.is_empty());
    }
}
