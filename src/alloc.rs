//! archaeclip's global allocator: the system allocator, plus, while a training run is active, a
//! cache of large freed blocks that later allocations of the same size reuse.
//!
//! Why: glibc serves a block above its mmap threshold (which grows to at most 32 MiB) with a
//! fresh `mmap` and unmaps it again on free, so every use of such a block pays a page fault and
//! the kernel's zeroing of each of its pages. A training step repeats the same shapes op after
//! op and step after step: at batch 64 a ViT-B/32 layer's MLP activations and their gradients
//! are 39 MB each, and a step allocated and freed gigabytes of them, page-faulted afresh each
//! time (BENCHMARKS.md, stop 25). Here a freed block of [`BIG`] bytes or more is kept (up to
//! [`CAP`] bytes in all, the oldest given back first) and handed to the next allocation of the
//! same size and alignment, its pages still mapped.
//!
//! Outside training nothing is cached: a [`Scope`] turns the cache on, and when the last one
//! ends every cached block goes back to the system, so a host process (a Datasette server, say)
//! does not keep a finished run's memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks of at least this many bytes are cached: glibc's largest mmap threshold. Below it,
/// glibc's heap keeps and reuses freed blocks itself once the threshold has grown to their size
/// (caching from 4 MiB up changed no page fault count at batch 32 and added 0.3 GB of peak
/// RSS). Few enough that a linear search costs nothing next to using them.
pub const BIG: usize = 32 << 20;
/// At most this many bytes are kept at once.
pub const CAP: usize = 2 << 30;
/// At most this many blocks are kept at once (the list lives in a fixed array: the allocator
/// must not allocate while it holds its lock).
const SLOTS: usize = 128;

/// A freed block: its address, size and alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    at: usize,
    size: usize,
    align: usize,
}

/// The cached blocks, oldest first.
struct Cache {
    blocks: [Block; SLOTS],
    len: usize,
    bytes: usize,
}

impl Cache {
    const fn new() -> Cache {
        Cache {
            blocks: [Block {
                at: 0,
                size: 0,
                align: 0,
            }; SLOTS],
            len: 0,
            bytes: 0,
        }
    }

    /// The most recently freed block of exactly this size and alignment, taken out.
    fn take(&mut self, size: usize, align: usize) -> Option<usize> {
        let i = (0..self.len)
            .rev()
            .find(|&i| self.blocks[i].size == size && self.blocks[i].align == align)?;
        let b = self.remove(i);
        Some(b.at)
    }

    fn remove(&mut self, i: usize) -> Block {
        let b = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= b.size;
        b
    }

    /// Keeps `block`, first giving back (through `free`) the oldest blocks it needs room from.
    /// A block larger than [`CAP`] is not kept.
    fn put(&mut self, block: Block, mut free: impl FnMut(Block)) {
        if block.size > CAP {
            free(block);
            return;
        }
        while self.len == SLOTS || self.bytes + block.size > CAP {
            free(self.remove(0));
        }
        self.blocks[self.len] = block;
        self.len += 1;
        self.bytes += block.size;
    }

    /// Gives back every block.
    fn clear(&mut self, mut free: impl FnMut(Block)) {
        while self.len > 0 {
            free(self.remove(self.len - 1));
        }
    }
}

/// The cache and the count of active scopes that turns it on.
struct Pool {
    cache: Mutex<Cache>,
    scopes: AtomicUsize,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            cache: Mutex::new(Cache::new()),
            scopes: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Nothing panics while the lock is held, but a poisoned lock must not turn every later
        // allocation into an abort.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self) {
        self.scopes.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a scope; the last one gives every cached block to `free`. The count is read under
    /// the lock by [`Pool::keep`], so no block is added once this has cleared the cache.
    fn leave(&self, free: impl FnMut(Block)) {
        let mut c = self.lock();
        if self.scopes.fetch_sub(1, Ordering::SeqCst) == 1 {
            c.clear(free);
        }
    }

    /// A cached block for `layout`, taken out, if a scope is active.
    fn reuse(&self, layout: Layout) -> Option<*mut u8> {
        if layout.size() < BIG || self.scopes.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let at = self.lock().take(layout.size(), layout.align())?;
        Some(at as *mut u8)
    }

    /// Keeps a freed block if a scope is active and it is large enough; false if not kept (the
    /// caller frees it). Blocks pushed out to make room go to `free`, after the lock is released
    /// (all but a rare ninth and later, freed while it is held).
    fn keep(&self, ptr: *mut u8, layout: Layout, free: impl Fn(Block)) -> bool {
        if layout.size() < BIG {
            return false;
        }
        let mut c = self.lock();
        if self.scopes.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let block = Block {
            at: ptr as usize,
            size: layout.size(),
            align: layout.align(),
        };
        let mut evicted = [block; 8];
        let mut n = 0;
        c.put(block, |b| {
            if n < evicted.len() {
                evicted[n] = b;
                n += 1;
            } else {
                free(b);
            }
        });
        drop(c);
        evicted[..n].iter().copied().for_each(free);
        true
    }
}

static POOL: Pool = Pool::new();

/// Gives a block back to the system.
fn release(b: Block) {
    // SAFETY: every cached block was allocated by `System` with this size and alignment.
    unsafe {
        System.dealloc(
            b.at as *mut u8,
            Layout::from_size_align_unchecked(b.size, b.align),
        )
    }
}

/// While one is alive, large freed blocks are kept for reuse. Held by a training run.
pub struct Scope(());

impl Scope {
    pub fn enter() -> Scope {
        POOL.enter();
        Scope(())
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        POOL.leave(release);
    }
}

/// The allocator (see the module's documentation).
pub struct Allocator;

// SAFETY: every block comes from `System` with the layout it is later freed with: a reused
// block was allocated by `System` with the same size and alignment as the request it serves,
// and `realloc` hands the block to `System`, which needs nothing but the pointer and layout.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match POOL.reuse(layout) {
            Some(p) => p,
            None => System.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match POOL.reuse(layout) {
            Some(p) => {
                // Writing zeros over mapped pages is several times faster here than faulting
                // in fresh (zeroed) ones.
                std::ptr::write_bytes(p, 0, layout.size());
                p
            }
            None => System.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !POOL.keep(ptr, layout, release) {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        System.realloc(ptr, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(at: usize, size: usize) -> Block {
        Block { at, size, align: 8 }
    }

    #[test]
    fn cache_reuses_the_latest_block_of_the_same_size_and_alignment() {
        let mut c = Cache::new();
        let mut freed = Vec::new();
        c.put(block(1, BIG), |b| freed.push(b));
        c.put(block(2, 2 * BIG), |b| freed.push(b));
        c.put(block(3, BIG), |b| freed.push(b));
        assert_eq!(c.bytes, 4 * BIG);
        assert_eq!(c.take(BIG, 16), None, "alignment differs");
        assert_eq!(c.take(3 * BIG, 8), None, "no block of that size");
        assert_eq!(c.take(BIG, 8), Some(3));
        assert_eq!(c.take(BIG, 8), Some(1));
        assert_eq!(c.take(BIG, 8), None);
        assert_eq!((c.len, c.bytes), (1, 2 * BIG));
        assert!(freed.is_empty());
    }

    #[test]
    fn cache_gives_back_the_oldest_blocks_past_its_cap() {
        let mut c = Cache::new();
        let mut freed = Vec::new();
        let quarter = CAP / 4;
        for at in 1..=4 {
            c.put(block(at, quarter), |b| freed.push(b));
        }
        assert!(freed.is_empty());
        c.put(block(5, quarter + 1), |b| freed.push(b));
        assert_eq!(freed, [block(1, quarter), block(2, quarter)]);
        assert!(c.bytes <= CAP);
        c.put(block(6, CAP + 1), |b| freed.push(b));
        assert_eq!(freed.last(), Some(&block(6, CAP + 1)), "too big to keep");
        c.clear(|b| freed.push(b));
        assert_eq!((c.len, c.bytes, freed.len()), (0, 0, 6));
    }

    #[test]
    fn cache_holds_at_most_its_slots() {
        let mut c = Cache::new();
        let mut freed = 0;
        for at in 0..SLOTS + 3 {
            c.put(block(at + 1, 1), |_| freed += 1);
        }
        assert_eq!((c.len, freed), (SLOTS, 3));
        assert_eq!(c.blocks[0].at, 4, "the oldest went first");
    }

    #[test]
    fn a_pool_keeps_blocks_only_inside_scopes_and_gives_them_all_back_after_the_last() {
        let pool = Pool::new();
        let freed = std::cell::RefCell::new(Vec::new());
        let free = |b: Block| freed.borrow_mut().push(b.at);
        let layout = Layout::from_size_align(BIG, 64).unwrap();
        let small = Layout::from_size_align(BIG - 1, 64).unwrap();
        let p = |at: usize| at as *mut u8;
        assert!(!pool.keep(p(1), layout, free), "no scope: not kept");
        pool.enter();
        pool.enter();
        assert!(!pool.keep(p(2), small, free), "too small to keep");
        assert!(pool.keep(p(3), layout, free));
        assert!(pool.keep(p(4), layout, free));
        assert_eq!(pool.reuse(layout), Some(p(4)));
        assert_eq!(pool.reuse(small), None);
        assert!(pool.keep(p(5), layout, free));
        pool.leave(free);
        assert!(freed.borrow().is_empty(), "one scope is still active");
        assert_eq!(pool.lock().len, 2);
        pool.leave(free);
        assert_eq!(
            *freed.borrow(),
            [5, 3],
            "the last scope gives back every block"
        );
        let c = pool.lock();
        assert_eq!((c.len, c.bytes), (0, 0));
        drop(c);
        assert!(!pool.keep(p(6), layout, free), "no scope: not kept");
        assert_eq!(pool.reuse(layout), None);
    }

    #[test]
    fn a_scope_reuses_freed_blocks_and_zeroes_them_when_asked() {
        // A size no other test allocates, so that a test running alongside cannot take it.
        let len = (BIG + 4096 * 7) / 4;
        let _scope = Scope::enter();
        let mut v = vec![1.5f32; len];
        v[len - 1] = 2.5;
        let at = v.as_ptr() as usize;
        drop(v);
        let w: Vec<f32> = Vec::with_capacity(len);
        assert_eq!(w.as_ptr() as usize, at, "the freed block is reused");
        drop(w);
        let z = vec![0f32; len];
        assert_eq!(z.as_ptr() as usize, at);
        assert!(
            z.iter().all(|&x| x == 0.0),
            "alloc_zeroed zeroes a reused block"
        );
    }
}
