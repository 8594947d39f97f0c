//! Bounded selection of the k nearest: a max-heap of the best k seen so far, keyed by
//! (distance, id) so that ties are broken by the smaller id, deterministically.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One result: a row id and its distance (smaller is nearer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub distance: f64,
    pub id: i64,
}

impl Eq for Hit {}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The k best hits of a stream.
#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Hit>,
}

impl TopK {
    pub fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1),
        }
    }

    /// Offers one hit; keeps it if it is among the k best so far.
    #[inline]
    pub fn push(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(hit);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if hit < *worst {
                *worst = hit;
            }
        }
    }

    /// The distance a new hit must beat to enter (infinite until the heap is full).
    #[inline]
    pub fn threshold(&self) -> f64 {
        if self.heap.len() < self.k {
            f64::INFINITY
        } else {
            self.heap.peek().map_or(f64::INFINITY, |h| h.distance)
        }
    }

    /// Folds another selection into this one.
    pub fn merge(&mut self, other: TopK) {
        for hit in other.heap {
            self.push(hit);
        }
    }

    /// The hits, nearest first (ties: smaller id first).
    pub fn into_sorted(self) -> Vec<Hit> {
        self.heap.into_sorted_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_k_smallest_with_id_tie_break() {
        let mut t = TopK::new(3);
        for (id, d) in [(5, 0.5), (1, 0.1), (9, 0.1), (2, 0.9), (3, 0.1), (4, 0.0)] {
            t.push(Hit { distance: d, id });
        }
        let ids: Vec<i64> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![4, 1, 3]);
    }

    #[test]
    fn k_zero_keeps_nothing() {
        let mut t = TopK::new(0);
        t.push(Hit {
            distance: 0.0,
            id: 1,
        });
        assert!(t.into_sorted().is_empty());
    }
}
