//! Keeps the contiguous copy of a SELECT's vectors between queries, valid while the database is
//! unchanged. A copy is made on a statement's second use at the same database state, not its
//! first: a statement used once (each new filter is a new statement) is streamed, which costs
//! one pass over the rows and no memory, while building a copy costs that pass plus fresh memory
//! for every vector (on the machines measured here, faulting in 2 GB took as long as reading it). Validity is a [`DbStamp`] taken by the SQL layer: this connection's total change
//! count plus every attached schema's `PRAGMA data_version` (which moves when another connection
//! commits). Any write, from here or elsewhere, changes the stamp and the copy is rebuilt.

use std::sync::Arc;

use crate::index::VectorSet;

/// What the database looked like when a copy was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbStamp {
    /// `sqlite3_total_changes()` of the connection: moves on this connection's writes.
    pub total_changes: i64,
    /// (schema name, file name, data_version, schema_version) of each attached database.
    pub schemas: Vec<(String, String, i64, i64)>,
}

struct Entry {
    sql: String,
    stamp: DbStamp,
    set: Arc<VectorSet>,
}

/// A small most-recently-used list of copies, one per distinct SELECT text, and of the
/// statements seen once.
pub struct ScanCache {
    capacity: usize,
    entries: Vec<Entry>,
    seen: Vec<(String, DbStamp)>,
}

/// What to do for a statement.
pub enum Lookup {
    /// Scan this copy.
    Copy(Arc<VectorSet>),
    /// Seen once before at this state: build a copy (and keep it).
    Build,
    /// First use at this state: stream it.
    Stream,
}

/// How many once-seen statements are remembered.
const SEEN_CAPACITY: usize = 16;

/// How many distinct SELECTs a connection keeps copies of.
pub const DEFAULT_CAPACITY: usize = 2;

impl Default for ScanCache {
    fn default() -> Self {
        ScanCache::new(DEFAULT_CAPACITY)
    }
}

impl ScanCache {
    pub fn new(capacity: usize) -> ScanCache {
        ScanCache {
            capacity,
            entries: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Decides how to run `sql` at `stamp`, and remembers that it was asked.
    pub fn lookup(&mut self, sql: &str, stamp: &DbStamp) -> Lookup {
        if let Some(set) = self.get(sql, stamp) {
            return Lookup::Copy(set);
        }
        if let Some(pos) = self.seen.iter().position(|(s, _)| s == sql) {
            let (_, seen_at) = self.seen.remove(pos);
            if seen_at == *stamp {
                return Lookup::Build;
            }
        }
        self.seen.insert(0, (sql.to_owned(), stamp.clone()));
        self.seen.truncate(SEEN_CAPACITY);
        Lookup::Stream
    }

    /// The copy for `sql` if it was made at `stamp`; a stale copy is dropped at once so its
    /// memory is free before the rebuild allocates.
    pub fn get(&mut self, sql: &str, stamp: &DbStamp) -> Option<Arc<VectorSet>> {
        let pos = self.entries.iter().position(|e| e.sql == sql)?;
        if self.entries[pos].stamp != *stamp {
            self.entries.remove(pos);
            return None;
        }
        let entry = self.entries.remove(pos);
        let set = entry.set.clone();
        self.entries.insert(0, entry);
        Some(set)
    }

    pub fn put(&mut self, sql: &str, stamp: DbStamp, set: Arc<VectorSet>) {
        if self.capacity == 0 {
            return;
        }
        self.entries.retain(|e| e.sql != sql);
        self.entries.insert(
            0,
            Entry {
                sql: sql.to_owned(),
                stamp,
                set,
            },
        );
        self.entries.truncate(self.capacity);
    }

    /// Drops every copy made at a stamp other than `stamp` (called before a rebuild, so that
    /// stale copies of other SELECTs do not hold memory meanwhile).
    pub fn evict_stale(&mut self, stamp: &DbStamp) {
        self.entries.retain(|e| e.stamp == *stamp);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(n: i64) -> DbStamp {
        DbStamp {
            total_changes: n,
            schemas: vec![("main".into(), "".into(), 1, 1)],
        }
    }

    #[test]
    fn a_copy_is_built_on_the_second_use_at_the_same_state() {
        let mut c = ScanCache::new(2);
        assert!(matches!(c.lookup("a", &stamp(1)), Lookup::Stream));
        assert!(
            matches!(c.lookup("a", &stamp(2)), Lookup::Stream),
            "the database changed"
        );
        assert!(matches!(c.lookup("a", &stamp(2)), Lookup::Build));
        c.put("a", stamp(2), Arc::default());
        assert!(matches!(c.lookup("a", &stamp(2)), Lookup::Copy(_)));
        assert!(matches!(c.lookup("a", &stamp(3)), Lookup::Stream));
    }

    #[test]
    fn stale_copies_are_dropped_and_capacity_is_kept() {
        let mut c = ScanCache::new(2);
        c.put("a", stamp(1), Arc::new(VectorSet::default()));
        assert!(c.get("a", &stamp(1)).is_some());
        assert!(c.get("a", &stamp(2)).is_none());
        assert!(c.is_empty());
        c.put("a", stamp(2), Arc::default());
        c.put("b", stamp(2), Arc::default());
        c.put("c", stamp(2), Arc::default());
        assert_eq!(c.len(), 2);
        assert!(c.get("a", &stamp(2)).is_none());
        c.evict_stale(&stamp(3));
        assert!(c.is_empty());
    }
}
