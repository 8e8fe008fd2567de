//! Maintenance locks: Synchrony's `hub-lock-state` contract.
//!
//! A host holds documents still while it maintains them (`POST {ctx}/v1/hub-lock-state?lock-id=`
//! with `{"point-list":[ids]}` or `{"confluence-all":true}`, and a `timeout-ms`). While a
//! document is locked its clients stay connected and keep receiving, but every edit is refused:
//! a WebSocket update gets the y-protocols permission-denied message `hub.error/locked`, a REST
//! change gets 423 with the same type. A refused edit is not lost: the client keeps it, and when
//! the lock ends the document sends its clients a sync step 1, which they answer with what the
//! document lacks.
//!
//! Locks are rows in `doc_locks`, so they outlive a restart and every node of a cluster sees
//! them. Each node keeps the rows in memory ([`Locks`]) and reads them again every
//! [`REFRESH`]; the node that takes or releases a lock also tells every live member at once, and
//! answers only when they have confirmed. A lock ends when it is released or when its timeout
//! has passed, whichever is first.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::now_millis;

/// How often each node reads the lock table again (expiry is checked as often).
pub const REFRESH: Duration = Duration::from_secs(1);
/// Default lock timeout (Synchrony's `synchrony.eviction.content.lock.timeout.default.ms`).
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Longest lock a caller may take: a forgotten lock must not freeze a page for days.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// Documents one lock may name.
pub const MAX_POINTS: usize = 10_000;
/// The `doc_id` of an app-wide lock's row.
pub const ALL: &str = "*";

/// What a lock holds still.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every document.
    All,
    Docs(BTreeSet<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub scope: Scope,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
}

/// The locks this node enforces.
pub struct Locks {
    table: RwLock<HashMap<String, Held>>,
    /// Lets `is_locked` skip the table when nothing is locked (the common case, on every edit).
    any: AtomicBool,
    /// Bumped by every local change, so a refresh that read the table before it does not undo it.
    generation: AtomicU64,
    /// Bumped whenever the set of locks changes; documents that refused edits watch it.
    changed: watch::Sender<u64>,
}

impl Default for Locks {
    fn default() -> Self {
        Self {
            table: RwLock::new(HashMap::new()),
            any: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            changed: watch::channel(0).0,
        }
    }
}

impl Locks {
    /// Whether edits to `doc` are refused now.
    pub fn is_locked(&self, doc: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let now = now_millis();
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table.values().any(|held| {
            held.expires_at > now
                && match &held.scope {
                    Scope::All => true,
                    Scope::Docs(docs) => docs.contains(doc),
                }
        })
    }

    /// Notified whenever a lock is taken, released or expires.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Takes (or renews, with a new scope and timeout) lock `id`.
    pub fn insert(&self, id: &str, held: Held) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.edit(|table| table.insert(id.to_owned(), held.clone()).as_ref() != Some(&held));
    }

    /// Releases lock `id`; false if it was not held.
    pub fn remove(&self, id: &str) -> bool {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut removed = false;
        self.edit(|table| {
            removed = table.remove(id).is_some();
            removed
        });
        removed
    }

    /// The live locks, by id.
    pub fn snapshot(&self) -> Vec<(String, Held)> {
        let now = now_millis();
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let mut locks: Vec<_> = table
            .iter()
            .filter(|(_, held)| held.expires_at > now)
            .map(|(id, held)| (id.clone(), held.clone()))
            .collect();
        locks.sort_by(|a, b| a.0.cmp(&b.0));
        locks
    }

    /// The value to pass to [`Locks::replace`] with rows read after this call.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces the table with what storage holds (rows read after `generation` was taken);
    /// ignored if a local change happened since. Also drops expired locks.
    pub fn replace(&self, generation: u64, rows: Vec<(String, String, i64)>) {
        let now = now_millis();
        let mut fresh: HashMap<String, Held> = HashMap::new();
        for (id, doc, expires_at) in rows {
            if expires_at <= now {
                continue;
            }
            let held = fresh.entry(id).or_insert_with(|| Held {
                scope: Scope::Docs(BTreeSet::new()),
                expires_at,
            });
            held.expires_at = held.expires_at.max(expires_at);
            if doc == ALL {
                held.scope = Scope::All;
            } else if let Scope::Docs(docs) = &mut held.scope {
                docs.insert(doc);
            }
        }
        self.edit(|table| {
            if self.generation.load(Ordering::Acquire) != generation {
                return false;
            }
            // Compared before anything is dropped: a lock that expired is a change too.
            let changed = *table != fresh;
            *table = fresh;
            changed
        });
    }

    /// Drops expired locks (between refreshes, so that expiry is not late by a failed read).
    pub fn expire(&self) {
        let now = now_millis();
        self.edit(|table| {
            let before = table.len();
            table.retain(|_, held| held.expires_at > now);
            table.len() != before
        });
    }

    /// Runs `change` on the table; when it reports a change, tells the watchers.
    fn edit(&self, change: impl FnOnce(&mut HashMap<String, Held>) -> bool) {
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        let changed = change(&mut table);
        self.any.store(!table.is_empty(), Ordering::Release);
        drop(table);
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn docs(ids: &[&str]) -> Scope {
        Scope::Docs(ids.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_lock_holds_its_documents_until_released_or_expired() {
        let locks = Locks::default();
        let mut changes = locks.subscribe();
        assert!(!locks.is_locked("a/1"));
        let later = now_millis() + 60_000;
        locks.insert(
            "l1",
            Held {
                scope: docs(&["a/1"]),
                expires_at: later,
            },
        );
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert!(locks.is_locked("a/1"));
        assert!(!locks.is_locked("a/2"));
        assert!(locks.remove("l1"));
        assert!(!locks.remove("l1"));
        assert!(!locks.is_locked("a/1"));
        assert!(changes.has_changed().unwrap());

        locks.insert(
            "past",
            Held {
                scope: Scope::All,
                expires_at: now_millis() - 1,
            },
        );
        assert!(!locks.is_locked("a/1"), "an expired lock holds nothing");
        changes.mark_unchanged();
        locks.expire();
        assert!(locks.snapshot().is_empty());
        assert!(changes.has_changed().unwrap(), "expiry is announced");

        // Expiry noticed by a refresh (storage no longer returns the row) is announced too.
        let soon = now_millis() + 50;
        locks.insert(
            "short",
            Held {
                scope: Scope::All,
                expires_at: soon,
            },
        );
        changes.mark_unchanged();
        std::thread::sleep(std::time::Duration::from_millis(60));
        locks.replace(locks.generation(), Vec::new());
        assert!(
            changes.has_changed().unwrap(),
            "a refresh announces an expiry"
        );
    }

    #[test]
    fn a_refresh_builds_the_table_and_never_undoes_a_newer_local_change() {
        let locks = Locks::default();
        let later = now_millis() + 60_000;
        let generation = locks.generation();
        locks.replace(
            generation,
            vec![
                ("l1".into(), "a/1".into(), later),
                ("l1".into(), "a/2".into(), later),
                ("l2".into(), ALL.into(), later),
                ("old".into(), "a/3".into(), now_millis() - 1),
            ],
        );
        let snapshot = locks.snapshot();
        assert_eq!(snapshot.len(), 2);
        assert_eq!(snapshot[0].1.scope, docs(&["a/1", "a/2"]));
        assert_eq!(snapshot[1].1.scope, Scope::All);

        // A refresh that read storage before a local release must not bring the lock back.
        let stale = locks.generation();
        assert!(locks.remove("l2"));
        locks.replace(stale, vec![("l2".into(), ALL.into(), later)]);
        assert!(!locks.is_locked("b/1"));
    }
}
