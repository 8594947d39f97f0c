//! Exact top-k from the int8 codes (`t_codes`, see [`crate::index::codes`]): every row's
//! distance is bounded from its record, the rows that can still be among the k nearest are
//! read back as float32 and scored, and the answer is the full scan's.
//!
//! The records are a quarter of the float32 bytes, and a query does not need them in process
//! memory: chunks that no connection of the process holds are streamed from SQLite a chunk
//! (or a piece of at most [`PIECE_BYTES`]) at a time through a reused buffer, on the calling
//! thread (and, for a long stream, on a second connection of its own: [`super::reader`]), and
//! each piece is bounded by the thread that read it while it is still in that core's cache;
//! rayon's workers bound the chunks already in memory meanwhile. This is what makes the first
//! query after opening cheap: it reads ~0.5 GB per million 512-d rows, where a
//! copy of the float32 vectors costs 2 GB of fresh pages (about 1.7 s on the benchmark machine).
//!
//! Where a stream goes through SQLite's pager (a short one, or a host that cannot map the
//! file), repeated queries are faster from memory, so each query after a connection's first
//! keeps a bounded share of the chunks it streams ([`KEEP_BYTES_PER_QUERY`]); after enough
//! queries every chunk is held and no query reads the database. A long stream read through
//! mapped connections is kept by no exact query: reading the file's pages again takes 1.2-1.6x
//! the time of chunks held in memory, and holds nothing.
//! The `int8` mode, which reads the same records, keeps all of them from its first query on.
//! Kept chunks are shared by the connections of a process (keyed by database file, table,
//! chunk id and version, like the float32 chunks), and exact queries use them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rusqlite::blob::Blob;

use super::reader::{self, Reader, ReaderView};
use super::store::Store;
use super::{err, IndexTab};
use crate::index::chunked::{SlotFilter, WeakPool};
use crate::index::codes::{record_bytes, BoundQuery, Bounded};
use crate::index::scan::{inv_norm, Scorer};
use crate::vector::codec;
use crate::vector::topk::{Hit, TopK};

/// One chunk's records, as read.
pub(super) struct CodeChunk {
    version: i64,
    bytes: Vec<u8>,
}

/// The chunks' records this connection holds, by chunk id, its piece buffers, and the
/// stored (id, version) list with the index generation it was read at (a query reads the list
/// again only when the generation moved, as the float32 image does).
#[derive(Default)]
pub(super) struct KeptCodes {
    chunks: HashMap<i64, Arc<CodeChunk>>,
    /// Reused piece buffers: this connection's and the second connection's.
    pieces: [Vec<u8>; 2],
    versions: Option<(i64, Versions)>,
    /// The second connection that reads part of a long stream.
    reader: Reader,
    /// A third, which this thread reads through where the second maps the file.
    own_reader: Reader,
    /// Whether a query of this connection (exact or `int8`) has streamed chunks before: until
    /// one has, an exact query keeps none (see [`KEEP_BYTES_PER_QUERY`]) and the second
    /// connections read large pages with `pread` (see `reader`).
    streamed: bool,
}

/// Every chunk's (id, version), ordered by id.
type Versions = Arc<[(i64, i64)]>;

thread_local! {
    /// Chunks kept by exact and int8 queries run on this thread. For tests and diagnostics.
    pub(super) static KEPT_ON_THIS_THREAD: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Candidates of the exact and int8 queries run on this thread, and how many of them were
    /// read back and scored (by either connection). For tests and diagnostics.
    pub(super) static RESCORED_ON_THIS_THREAD: std::cell::Cell<(u64, u64)> =
        const { std::cell::Cell::new((0, 0)) };
}

fn pool() -> &'static WeakPool<CodeChunk> {
    static POOL: OnceLock<WeakPool<CodeChunk>> = OnceLock::new();
    POOL.get_or_init(WeakPool::new)
}

/// Bytes of records a reading connection claims at a time (at least one chunk).
const STREAM_BATCH_BYTES: usize = 2 << 20;

/// Most bytes of records read at a time (rounded down to a multiple of 8 rows): each piece is
/// bounded right after it is read, while it is in the reading core's cache. A chunk no larger
/// (the default 128 rows at 512 dims is 68 KB) is read whole.
const PIECE_BYTES: usize = 256 << 10;

/// Streams shorter than this are read by one connection (a second one costs a read
/// transaction, a scan of `t_chunks` and a thread). Measured in stop 30 (first queries of new
/// processes, 512 dims, 4 KiB pages, medians of 9): with 10.6 MB of codes 15 ms with or
/// without it, with 21 MB 18 ms with it and 24 ms without, with 43 MB 31 and 38 ms.
const READER_MIN_BYTES: usize = 16 << 20;

/// Fewer candidates than this are rescored on one connection.
const RESCORE_SPLIT_MIN: usize = 32;

/// Bytes of streamed chunks an exact query keeps in memory for the next queries, where it
/// streams through SQLite's pager. None are kept by a connection's first exact query (a
/// one-off query, the sqlite3 shell or a script, would never use them, and their fresh pages,
/// ~8,200 faults, cost the first query 13-18 ms), nor by a query that streams through mapped
/// connections (`reader`): those read the file's pages again in 1.2-1.6x the time of chunks
/// held in memory, while keeping costs each of the next ~16 queries 10-20 ms (more where fresh
/// pages need reclaim) and the process 0.53 GB per million 512-d rows.
///
/// Measured in stop 33 (1M x 512, random data, new processes, three each, medians per
/// process): with 4 KiB pages queries 2-20 took 46-49 ms keeping none against 57-91 keeping 32
/// MB each (worst queries 89-129 ms), and queries 21-40 47-51 against 31-33 once all was kept;
/// with 64 KiB pages (mapped from the second query on when keeping none) 37-45 against 50-56
/// (one process with a cold page cache: 70), and 38-43 against 31-33. Measured in stop 31
/// (first queries of new processes, 1M x 512, medians of 9): with 64 KiB pages 68 ms keeping
/// none against 81 ms keeping 32 MB (random data), 66 against 84 (clustered).
const KEEP_BYTES_PER_QUERY: usize = 32 << 20;

/// Largest k answered from the codes; a larger k scans the float32 image (rescoring k rows
/// one blob read at a time would cost more than the scan).
pub(super) const CODES_MAX_K: usize = 1024;

/// Most candidates rescored; with more (bounds too loose for the data) the query scans the
/// float32 image instead.
const RESCORE_MAX: usize = 16_384;

/// Kept chunks bounded per task.
const MEMORY_GROUP: usize = 64;

impl IndexTab {
    fn kept_codes(&self) -> std::sync::MutexGuard<'_, KeptCodes> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exact k nearest rows from the codes, or `None` when the bounds leave too many
    /// candidates (the caller then scans the float32 image). With `approximate = Some(n)` (the
    /// `int8` mode), the candidates are instead the n rows of smallest estimated distance, and
    /// every chunk streamed is kept (the mode is for repeated fast queries).
    pub(super) fn search_codes(
        &self,
        query: &[f32],
        k: usize,
        approximate: Option<usize>,
        filter: Option<&SlotFilter>,
    ) -> rusqlite::Result<Option<Vec<(i64, f64, f64)>>> {
        let metric = self.decl.metric;
        let scorer =
            Scorer::new(query, metric).map_err(|e| err(self.name(), format!("MATCH: {e}")))?;
        if k == 0 {
            return Ok(Some(Vec::new()));
        }
        if approximate.is_some_and(|n| n > RESCORE_MAX) {
            return Ok(None);
        }
        let accumulator = || match approximate {
            None => Bounded::new(k),
            Some(n) => Bounded::approximate(n.max(k)),
        };
        let capacity = self.store.capacity;
        let chunk_bytes = self.store.codes_bytes();
        let mut guard = self.kept_codes();
        // Fields borrowed apart: the second connection (in `reader`) is used until the end.
        let kept = &mut *guard;
        let generation = self.store.generation()?;
        let stored = match &kept.versions {
            Some((g, list)) if *g == generation => list.clone(),
            _ => {
                let list: Versions = self.store.chunk_versions()?.into();
                kept.versions = Some((generation, list.clone()));
                list
            }
        };
        let mut held: HashMap<i64, Arc<CodeChunk>> = HashMap::with_capacity(stored.len());
        let mut memory: Vec<(usize, i64, Arc<CodeChunk>)> = Vec::new();
        let mut stream: Vec<(usize, i64, i64)> = Vec::new();
        for (pos, &(id, version)) in stored.iter().enumerate() {
            let own = kept.chunks.remove(&id).filter(|c| c.version == version);
            let found = own.or_else(|| {
                let scope = self.scope.as_ref()?;
                pool()
                    .get(&(scope.clone(), id, version))
                    .filter(|c| c.bytes.len() == chunk_bytes)
            });
            if let Some(c) = &found {
                held.insert(id, c.clone());
            }
            if filter.is_some_and(|f| !f.contains_key(&id)) {
                continue;
            }
            match found {
                Some(c) => memory.push((pos, id, c)),
                None => stream.push((pos, id, version)),
            }
        }
        kept.chunks.clear();

        let bound = BoundQuery::new(query, metric);
        // The smallest k-th upper bound any task has found: a cutoff for all of them.
        let ceiling = AtomicU64::new(f64::INFINITY.to_bits());
        let merged = Mutex::new(accumulator());
        // Lowers the cutoff to `t`, a task's k-th smallest upper bound, if that is lower.
        let tighten = |t: f64| {
            let _ = ceiling.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (t < f64::from_bits(old)).then_some(t.to_bits())
            });
        };
        // Bounds the records of chunk `id` (at `pos`) from its slot `first` on.
        let scan_at = |local: &mut Bounded, pos: usize, id: i64, first: usize, records: &[u8]| {
            let allowed = match filter {
                None => None,
                Some(f) => match f.get(&id) {
                    None => return,
                    Some(bits) => Some(&bits[first / 8..]),
                },
            };
            let cut = f64::from_bits(ceiling.load(Ordering::Relaxed));
            let key_base = ((pos as i64) << 24) + first as i64;
            local.scan(&bound, records, capacity - first, allowed, key_base, cut);
            tighten(local.threshold());
        };
        let finish = |local: Bounded| {
            merged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .merge(local);
        };
        // Held chunks are bounded on rayon's workers while the stream is read; on a worker
        // already (or a one-thread pool), on this thread.
        let inline = rayon::current_num_threads() < 2 || rayon::current_thread_index().is_some();
        // A long stream is read by two connections, this one and a second one on another
        // thread (see `reader`), each taking the next batch in turn.
        // Not for a writer in a rollback journal: spilling its page cache mid-query needs an
        // EXCLUSIVE lock, which the second connection's read lock would hold off until the
        // busy timeout ran out (WAL spills into the log and needs none).
        let long = stream.len() * chunk_bytes >= READER_MIN_BYTES
            && rayon::current_num_threads() >= 2
            && (!self.writing() || self.store.wal()?);
        let reader = if long {
            kept.reader.get(self.db, &self.store.schema, kept.streamed)
        } else {
            None
        };
        // Where the second connection maps the file (small pages), this thread reads through
        // a mapped connection of its own too (see `reader`): its chunks go back to the query's
        // connection like the other's.
        let own_view = match reader {
            Some((_, true)) => kept
                .own_reader
                .get(self.db, &self.store.schema, kept.streamed)
                .filter(|(_, mapped)| *mapped)
                .and_then(|(conn, _)| ReaderView::begin(conn, &self.store.table).ok()),
            _ => None,
        };
        let reader = reader.map(|(conn, _)| conn);
        // Chunks read into copies of their own, to keep (both connections add to it).
        let fresh: Mutex<Vec<(i64, Arc<CodeChunk>)>> = Mutex::new(Vec::new());
        let keep_left = AtomicUsize::new(match approximate {
            // The first query keeps nothing, nor one that streams through mapped connections.
            None if !kept.streamed || own_view.is_some() => 0,
            None => KEEP_BYTES_PER_QUERY,
            Some(_) => usize::MAX,
        });
        // Whether the next chunk read is kept (within the query's share).
        let take_keep = || {
            keep_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(chunk_bytes)
                })
                .is_ok()
        };
        let record_size = record_bytes(self.decl.dims);
        let piece_rows = (PIECE_BYTES / record_size.max(1)).max(8) / 8 * 8;
        // Reads the records of chunk `id` (at `pos`) from `records`, a piece at a time, and
        // bounds each piece into `local` as soon as it is read, while it is still in this
        // core's cache: into a copy of its own when the query keeps the chunk, else through
        // `piece`, a buffer the reading thread reuses.
        let stream_chunk = |local: &mut Bounded,
                            records: &Blob<'_>,
                            pos: usize,
                            id: i64,
                            version: i64,
                            piece: &mut Vec<u8>|
         -> rusqlite::Result<()> {
            let keep = take_keep();
            let mut own = if keep {
                vec![0u8; chunk_bytes]
            } else {
                piece.resize(piece_rows * record_size, 0);
                Vec::new()
            };
            let mut first = 0;
            while first < capacity {
                let rows = piece_rows.min(capacity - first);
                let at = first * record_size;
                let part = if keep {
                    &mut own[at..at + rows * record_size]
                } else {
                    &mut piece[..rows * record_size]
                };
                if let Err(e) = records.read_at_exact(part, at) {
                    if keep {
                        keep_left.fetch_add(chunk_bytes, Ordering::Relaxed);
                    }
                    return Err(e);
                }
                scan_at(local, pos, id, first, part);
                first += rows;
            }
            if keep {
                let c = Arc::new(CodeChunk {
                    version,
                    bytes: own,
                });
                fresh
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((id, c));
            }
            Ok(())
        };
        let per_batch = (STREAM_BATCH_BYTES / chunk_bytes.max(1)).max(1);
        let batches: Vec<&[(usize, i64, i64)]> = stream.chunks(per_batch).collect();
        let next = AtomicUsize::new(0);
        // Chunks read whole by the second (and third) connections.
        let chunks_read = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let claim = || {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            batches.get(next.fetch_add(1, Ordering::Relaxed)).copied()
        };
        // Chunks the second connection did not read (another version in its snapshot, or a
        // failed read): this connection reads them last.
        let left: Mutex<Vec<(usize, i64, i64)>> = Mutex::new(Vec::new());
        let mut failure: Option<rusqlite::Error> = None;
        let [mut own_piece, mut their_piece] = std::mem::take(&mut kept.pieces);
        let (view, own_broken) = rayon::in_place_scope(|s| {
            for group in memory.chunks(MEMORY_GROUP) {
                let work = move || {
                    let mut local = accumulator();
                    for (pos, id, c) in group {
                        scan_at(&mut local, *pos, *id, 0, &c.bytes);
                    }
                    finish(local);
                };
                if inline {
                    work();
                } else {
                    s.spawn(move |_| work());
                }
            }
            let mut blob: Option<Blob<'_>> = None;
            let mut local = accumulator();
            // This connection's reads of one batch.
            let mut own_batch = |local: &mut Bounded,
                                 batch: &[(usize, i64, i64)],
                                 piece: &mut Vec<u8>|
             -> rusqlite::Result<()> {
                for &(pos, id, version) in batch {
                    self.open_codes(&mut blob, id)?;
                    let records = blob.as_ref().expect("opened");
                    stream_chunk(local, records, pos, id, version, piece)?;
                }
                Ok(())
            };
            // A second connection's reads: batches in turn until none is left or a read
            // fails (then `true`). What its snapshot does not hold at the query's version, or
            // failed to read, goes to `left`.
            let read_with =
                |view: &ReaderView<'_>, local: &mut Bounded, piece: &mut Vec<u8>| -> bool {
                    let mut blob: Option<Blob<'_>> = None;
                    let mut broken = false;
                    while let Some(batch) = claim() {
                        let mut missed = Vec::new();
                        for &(pos, id, version) in batch {
                            // After a failed read, the rest goes back too. Each chunk is
                            // bounded apart and counted only once read whole, so that a chunk
                            // that fails half-way is bounded once, by the query's connection.
                            if !broken {
                                let mut part = accumulator();
                                let read = open_held(view, &mut blob, id, version, chunk_bytes)
                                    .and_then(|held| {
                                        let Some(records) = blob.as_ref().filter(|_| held) else {
                                            return Ok(false);
                                        };
                                        stream_chunk(&mut part, records, pos, id, version, piece)
                                            .map(|()| true)
                                    });
                                match read {
                                    Ok(true) => {
                                        chunks_read.fetch_add(1, Ordering::Relaxed);
                                        local.merge(part);
                                        tighten(local.threshold());
                                        continue;
                                    }
                                    Ok(false) => {}
                                    Err(_) => broken = true,
                                }
                            }
                            missed.push((pos, id, version));
                        }
                        if !missed.is_empty() {
                            left.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .extend(missed);
                        }
                        if broken {
                            break;
                        }
                    }
                    broken
                };
            let (view, own_broken) = std::thread::scope(|threads| {
                let helper = reader.map(|conn| {
                    let table = self.store.table.as_str();
                    let (read_with, their_piece) = (&read_with, &mut their_piece);
                    threads.spawn(move || {
                        let view = ReaderView::begin(conn, table).ok()?;
                        let mut local = accumulator();
                        let broken = read_with(&view, &mut local, their_piece);
                        finish(local);
                        // Kept open for the rescoring.
                        (!broken).then_some(view)
                    })
                });
                let own_broken = own_view
                    .as_ref()
                    .is_some_and(|v| read_with(v, &mut local, &mut own_piece));
                // Batches nobody has claimed (all of them without a mapped connection).
                while let Some(batch) = claim() {
                    if let Err(e) = own_batch(&mut local, batch, &mut own_piece) {
                        failure = Some(e);
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                let view =
                    helper.and_then(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                (view, own_broken)
            });
            // The second connections have ended: what they left is read here.
            if failure.is_none() {
                let left = std::mem::take(&mut *left.lock().unwrap_or_else(|p| p.into_inner()));
                if let Err(e) = own_batch(&mut local, &left, &mut own_piece) {
                    failure = Some(e);
                }
            }
            finish(local);
            (view, own_broken)
        });
        // The piece buffers are kept for the next query.
        kept.pieces = [own_piece, their_piece];
        reader::count_reads(chunks_read.into_inner(), 0);
        if let Some(e) = failure {
            kept.chunks = held;
            return Err(e);
        }
        let fresh = fresh.into_inner().unwrap_or_else(|p| p.into_inner());
        // Only the chunks read by this query are new to the pool; the others came from it or
        // were published when they were read.
        if let Some(scope) = &self.scope {
            pool().publish(
                fresh
                    .iter()
                    .map(|(id, c)| ((scope.clone(), *id, c.version), c)),
            );
        }
        KEPT_ON_THIS_THREAD.with(|n| n.set(n.get() + fresh.len() as u64));
        held.extend(fresh);
        kept.chunks = held;
        kept.streamed |= !stream.is_empty();

        let candidates = merged
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_candidates();
        if candidates.len() > RESCORE_MAX {
            return Ok(None);
        }
        let own_view = own_view.filter(|_| !own_broken);
        self.rescore(&scorer, &stored, &candidates, k, [view, own_view])
            .map(Some)
    }

    /// Points `blob` (one reused handle) at chunk `id`'s records, checking their length.
    fn open_codes<'a>(&'a self, blob: &mut Option<Blob<'a>>, id: i64) -> rusqlite::Result<()> {
        match blob {
            Some(b) => b.reopen(id)?,
            None => *blob = Some(self.store.blob("codes", "codes", id, true)?),
        }
        let len = blob.as_ref().expect("opened").len();
        let want = self.store.codes_bytes();
        if len != want {
            return Err(err(
                self.name(),
                format!(
                    "chunk {id} has {len} bytes of codes, expected {want} (run 'integrity-check')"
                ),
            ));
        }
        Ok(())
    }

    /// Scores the candidates ((lower bound, `(position in stored) << 24 | slot`), nearest
    /// bound first) with their float32 vectors: the k nearest, as the full scan ranks them.
    /// Once k rows are scored, a candidate whose lower bound exceeds the k-th distance cannot
    /// be among the k nearest, and nor can any after it: the reading stops there. With the
    /// second connection's view (`views[0]`), the candidates are dealt out in turn and half
    /// are read on another thread (each candidate is a blob seek and a walk along its chunk's
    /// overflow pages); the two share the lower of their k-th distances. This thread's half is
    /// read through `views[1]` when there is one (a mapped connection), else through the
    /// query's connection, which also reads whatever the views' snapshots do not hold.
    fn rescore(
        &self,
        scorer: &Scorer<'_>,
        stored: &[(i64, i64)],
        candidates: &[(f64, i64)],
        k: usize,
        views: [Option<ReaderView<'_>>; 2],
    ) -> rusqlite::Result<Vec<(i64, f64, f64)>> {
        let dims = self.decl.dims;
        let [view, own_view] = views;
        let view = view.filter(|_| candidates.len() >= RESCORE_SPLIT_MIN);
        let split = view.is_some();
        let cut = Cut::default();
        let (mut top, mut missed, mut read) =
            std::thread::scope(|threads| -> rusqlite::Result<_> {
                let cut = &cut;
                // The view ends its read transaction when the thread drops it.
                let helper = view.map(|view| {
                    threads.spawn(move || -> rusqlite::Result<_> {
                        let theirs = candidates.iter().skip(1).step_by(2);
                        rescore_part(&view, dims, scorer, stored, theirs, k, cut)
                    })
                });
                let mine = || candidates.iter().step_by(if split { 2 } else { 1 });
                // A failed read through the mapped connection: the query's connection reads them.
                let own = own_view
                    .as_ref()
                    .and_then(|v| rescore_part(v, dims, scorer, stored, mine(), k, cut).ok());
                let Rescored {
                    mut top,
                    mut missed,
                    read,
                } = match own {
                    Some(part) => part,
                    None => rescore_part(&self.store, dims, scorer, stored, mine(), k, cut)?,
                };
                match helper.map(|h| h.join()) {
                    None => Ok((top, missed, read)),
                    Some(Ok(Ok(part))) => {
                        reader::count_reads(0, part.read as u64);
                        top.merge(part.top);
                        missed.extend(part.missed);
                        Ok((top, missed, read + part.read))
                    }
                    // A failed read on the second connection: this one reads its share.
                    Some(Ok(Err(_))) => {
                        missed.extend(candidates.iter().skip(1).step_by(2));
                        Ok((top, missed, read))
                    }
                    Some(Err(p)) => std::panic::resume_unwind(p),
                }
            })?;
        if !missed.is_empty() {
            // From two lists, each in order: the reading stops at the first bound past the cut.
            missed.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let part = rescore_part(&self.store, dims, scorer, stored, missed.iter(), k, &cut)?;
            top.merge(part.top);
            read += part.read;
        }
        RESCORED_ON_THIS_THREAD.with(|n| {
            let (c, r) = n.get();
            n.set((c + candidates.len() as u64, r + read as u64));
        });
        Ok(scorer.results(top))
    }
}

/// The smallest k-th distance either rescoring thread has found (f64 bits; infinity until one
/// has scored k rows): no row with a larger lower bound can be among the k nearest.
struct Cut(AtomicU64);

impl Default for Cut {
    fn default() -> Cut {
        Cut(AtomicU64::new(f64::INFINITY.to_bits()))
    }
}

impl Cut {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Lowers the cut to `t` if that is lower.
    fn lower(&self, t: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (t < f64::from_bits(old)).then_some(t.to_bits())
            });
    }
}

/// Where candidates' vectors and rowids are read from: the query's connection, or the second
/// one for the chunks its snapshot holds at the same version.
trait Rows {
    fn holds(&self, id: i64, version: i64) -> bool;
    fn open(&self, suffix: &str, column: &str, id: i64) -> rusqlite::Result<Blob<'_>>;
}

impl Rows for Store {
    fn holds(&self, _: i64, _: i64) -> bool {
        true
    }
    fn open(&self, suffix: &str, column: &str, id: i64) -> rusqlite::Result<Blob<'_>> {
        self.blob(suffix, column, id, true)
    }
}

impl Rows for ReaderView<'_> {
    fn holds(&self, id: i64, version: i64) -> bool {
        ReaderView::holds(self, id, version)
    }
    fn open(&self, suffix: &str, column: &str, id: i64) -> rusqlite::Result<Blob<'_>> {
        self.blob(suffix, column, id)
    }
}

/// What one connection's share of the rescoring found.
struct Rescored {
    /// The k nearest of the rows read.
    top: TopK,
    /// The candidates of chunks that the connection does not hold (at the query's version).
    missed: Vec<(f64, i64)>,
    /// Rows read.
    read: usize,
}

/// Scores candidates (nearest lower bound first) read from `rows`, until a lower bound passes
/// `cut` or the k-th distance of those read.
fn rescore_part<'c, R: Rows>(
    rows: &R,
    dims: usize,
    scorer: &Scorer<'_>,
    stored: &[(i64, i64)],
    candidates: impl Iterator<Item = &'c (f64, i64)>,
    k: usize,
    cut: &Cut,
) -> rusqlite::Result<Rescored> {
    let mut top = TopK::new(k);
    let mut missed = Vec::new();
    let mut read = 0;
    let mut vectors: Option<Blob<'_>> = None;
    let mut rowids: Option<Blob<'_>> = None;
    let mut open: Option<(i64, bool)> = None;
    let mut bytes = vec![0u8; dims * 4];
    let mut row = vec![0f32; dims];
    let mut rowid = [0u8; 8];
    for &(lower, key) in candidates {
        if lower > top.threshold().min(cut.get()) {
            break;
        }
        let (pos, slot) = ((key >> 24) as usize, (key & 0xFF_FFFF) as usize);
        let (id, version) = stored[pos];
        if open.map(|o| o.0) != Some(id) {
            let held = rows.holds(id, version);
            if held {
                for (handle, suffix, column) in [
                    (&mut vectors, "vectors", "vectors"),
                    (&mut rowids, "slots", "rowids"),
                ] {
                    match handle {
                        Some(b) => b.reopen(id)?,
                        None => *handle = Some(rows.open(suffix, column, id)?),
                    }
                }
            }
            open = Some((id, held));
        }
        if open.is_some_and(|o| !o.1) {
            missed.push((lower, key));
            continue;
        }
        let v = vectors.as_ref().expect("opened");
        v.read_at_exact(&mut bytes, slot * dims * 4)?;
        rowids
            .as_ref()
            .expect("opened")
            .read_at_exact(&mut rowid, slot * 8)?;
        read += 1;
        codec::f32_from_le(&bytes, &mut row);
        if let Some(distance) = scorer.distance(&row, inv_norm(&row)) {
            top.push(Hit {
                distance,
                id: i64::from_le_bytes(rowid),
            });
            cut.lower(top.threshold());
        }
    }
    Ok(Rescored { top, missed, read })
}

/// Points the second connection's reused blob handle at chunk `id`'s records when its snapshot
/// holds `version` of the chunk, with `bytes` of them (`Ok(false)` when not).
fn open_held<'v>(
    view: &'v ReaderView<'_>,
    blob: &mut Option<Blob<'v>>,
    id: i64,
    version: i64,
    bytes: usize,
) -> rusqlite::Result<bool> {
    if !view.holds(id, version) {
        return Ok(false);
    }
    match blob {
        Some(b) => b.reopen(id)?,
        None => *blob = Some(view.blob("codes", "codes", id)?),
    }
    Ok(blob.as_ref().expect("opened").len() == bytes)
}
