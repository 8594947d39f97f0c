//! Training data: (image, caption) pairs streamed from a source (the SQL layer reads them from
//! a SELECT), shuffled through a bounded buffer, decoded and tokenized in parallel on a
//! background thread while the previous batch computes. Only the encoded bytes of the shuffle
//! buffer and two batches of pixels are ever in memory.

use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::clip::preprocess::{pixels_from_bytes, PreprocessConfig};
use crate::clip::tokenizer::ClipTokenizer;
use crate::error::{Error, Result};

/// One row of the statement, as read (values that could not be used carry why).
pub struct RawPair {
    /// 1-based position in the statement's results.
    pub row: u64,
    pub image: std::result::Result<Vec<u8>, String>,
    pub caption: std::result::Result<String, String>,
}

/// Which statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Train,
    Validation,
}

/// Where pairs come from (the SQL layer: a SELECT of `image, caption`).
pub trait PairSource {
    /// Rows the statement yields (for sizing the schedule).
    fn count(&mut self, stream: Stream) -> Result<u64>;
    /// (Re)starts the statement from its first row.
    fn start(&mut self, stream: Stream) -> Result<()>;
    /// The next row, `None` at the end. `Err(Error::Interrupted)` when SQLite was interrupted.
    fn next(&mut self, stream: Stream) -> Result<Option<RawPair>>;
    /// Whether SQLite's interrupt was raised (Ctrl-C in the shell).
    fn interrupted(&mut self) -> bool;
}

/// SplitMix64: a tiny, fixed PRNG, so that the same seed shuffles the same way in every build
/// (a resumed run replays the order of the interrupted one; `rand`'s generators may change
/// between versions).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// One pass over the training statement, in shuffle-buffer order.
pub struct EpochReader {
    buffer: Vec<RawPair>,
    capacity: usize,
    rng: Option<Rng>,
    exhausted: bool,
}

impl EpochReader {
    /// `rng: None` reads in the statement's order.
    pub fn new(capacity: usize, rng: Option<Rng>) -> EpochReader {
        EpochReader {
            buffer: Vec::new(),
            capacity,
            rng,
            exhausted: false,
        }
    }

    pub fn next(&mut self, source: &mut dyn PairSource) -> Result<Option<RawPair>> {
        let Some(rng) = &mut self.rng else {
            return source.next(Stream::Train);
        };
        while !self.exhausted && self.buffer.len() < self.capacity {
            match source.next(Stream::Train)? {
                Some(p) => self.buffer.push(p),
                None => self.exhausted = true,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let j = rng.below(self.buffer.len());
        Ok(Some(self.buffer.swap_remove(j)))
    }

    /// Up to `n` pairs (fewer at the end of the epoch).
    pub fn take(&mut self, source: &mut dyn PairSource, n: usize) -> Result<Vec<RawPair>> {
        take(n, || self.next(source))
    }
}

/// Up to `n` items of `next`, fewer when it runs out.
pub fn take(n: usize, mut next: impl FnMut() -> Result<Option<RawPair>>) -> Result<Vec<RawPair>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match next()? {
            Some(p) => out.push(p),
            None => break,
        }
    }
    Ok(out)
}

/// A pair ready for the model.
pub struct Prepared {
    pub row: u64,
    /// Preprocessed pixels (3 x size x size).
    pub pixels: Vec<f32>,
    pub ids: Vec<u32>,
}

/// A row that could not be used, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub row: u64,
    pub error: String,
}

/// The prepared pairs of a batch and the rows skipped.
#[derive(Default)]
pub struct Batch {
    pub pairs: Vec<Prepared>,
    pub skipped: Vec<Skipped>,
}

/// What decoding needs, shared with the background thread.
pub struct Preparer {
    pub tokenizer: Arc<ClipTokenizer>,
    pub preprocess: Arc<PreprocessConfig>,
}

impl Preparer {
    /// Decodes, preprocesses and tokenizes in parallel.
    pub fn prepare(&self, raw: Vec<RawPair>) -> Batch {
        let results: Vec<std::result::Result<Prepared, Skipped>> = raw
            .into_par_iter()
            .map(|p| {
                let fail = |what: &str, e: String| Skipped {
                    row: p.row,
                    error: format!("{what}: {e}"),
                };
                let caption = p.caption.map_err(|e| fail("caption", e))?;
                let ids = self
                    .tokenizer
                    .encode(&caption)
                    .map_err(|e| fail("caption", e.to_string()))?;
                let image = p.image.map_err(|e| fail("image", e))?;
                let pixels = pixels_from_bytes(&image, &self.preprocess)
                    .map_err(|e| fail("image", e.to_string()))?;
                Ok(Prepared {
                    row: p.row,
                    pixels,
                    ids,
                })
            })
            .collect();
        let mut batch = Batch::default();
        for r in results {
            match r {
                Ok(p) => batch.pairs.push(p),
                Err(s) => batch.skipped.push(s),
            }
        }
        batch
    }

    /// [`Preparer::prepare`] on a background thread.
    pub fn spawn(self: &Arc<Self>, raw: Vec<RawPair>) -> Pending {
        let me = self.clone();
        Pending(std::thread::spawn(move || me.prepare(raw)))
    }
}

/// A batch being prepared in the background.
pub struct Pending(JoinHandle<Batch>);

impl Pending {
    pub fn wait(self) -> Result<Batch> {
        self.0.join().map_err(|_| {
            Error::Training(
                "decoding a batch failed (a bug in archaeclip: please report it)".into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_fixed_and_unbiased_enough() {
        let mut a = Rng::new(42, 0);
        let mut b = Rng::new(42, 0);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..4).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(Rng::new(42, 1).next_u64(), Rng::new(42, 0).next_u64());
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[a.below(5)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        let mut v: Vec<usize> = (0..100).collect();
        a.shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
