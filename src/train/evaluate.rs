//! Retrieval metrics over paired embeddings: text -> image and image -> text recall@1/5/10,
//! median and mean rank. Row i of the images pairs with row i of the texts. Ties count against
//! the model (an image tied with the right one is ranked before it), so a model that maps
//! everything to one point scores like chance, not perfectly.

use serde::Serialize;

/// Metrics of one direction.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recall {
    pub direction: &'static str,
    pub pairs: usize,
    pub recall_at_1: f64,
    pub recall_at_5: f64,
    pub recall_at_10: f64,
    pub median_rank: f64,
    pub mean_rank: f64,
}

/// 1-based ranks of the right answer for each query.
fn ranks(queries: &[Vec<f32>], candidates: &[Vec<f32>]) -> Vec<usize> {
    use rayon::prelude::*;
    queries
        .par_iter()
        .enumerate()
        .map(|(i, q)| {
            let dot = |c: &Vec<f32>| -> f32 { q.iter().zip(c).map(|(a, b)| a * b).sum() };
            let right = dot(&candidates[i]);
            1 + candidates
                .iter()
                .enumerate()
                .filter(|&(j, c)| j != i && dot(c) >= right)
                .count()
        })
        .collect()
}

fn summarize(direction: &'static str, mut ranks: Vec<usize>) -> Recall {
    let n = ranks.len();
    let at = |k: usize| ranks.iter().filter(|&&r| r <= k).count() as f64 / n.max(1) as f64;
    let (r1, r5, r10) = (at(1), at(5), at(10));
    let mean = ranks.iter().sum::<usize>() as f64 / n.max(1) as f64;
    ranks.sort_unstable();
    let median = match n {
        0 => 0.0,
        _ if n % 2 == 1 => ranks[n / 2] as f64,
        _ => (ranks[n / 2 - 1] + ranks[n / 2]) as f64 / 2.0,
    };
    Recall {
        direction,
        pairs: n,
        recall_at_1: r1,
        recall_at_5: r5,
        recall_at_10: r10,
        median_rank: median,
        mean_rank: mean,
    }
}

/// Both directions for unit-length `images[i]` paired with `texts[i]`.
pub fn recall(images: &[Vec<f32>], texts: &[Vec<f32>]) -> [Recall; 2] {
    [
        summarize("text_to_image", ranks(texts, images)),
        summarize("image_to_text", ranks(images, texts)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_random_and_collapsed() {
        let eye: Vec<Vec<f32>> = (0..20)
            .map(|i| (0..20).map(|j| f32::from(u8::from(i == j))).collect())
            .collect();
        let [t2i, i2t] = recall(&eye, &eye);
        assert_eq!(
            (t2i.recall_at_1, t2i.median_rank, i2t.mean_rank),
            (1.0, 1.0, 1.0)
        );
        // Everything at one point: every candidate ties, the right one ranks last.
        let same = vec![vec![1.0, 0.0]; 20];
        let [t2i, _] = recall(&same, &same);
        assert_eq!((t2i.recall_at_10, t2i.median_rank), (0.0, 20.0));
        // Texts shifted by one: each text's best image is the wrong one.
        let shifted: Vec<Vec<f32>> = (0..20).map(|i| eye[(i + 1) % 20].clone()).collect();
        let [t2i, _] = recall(&eye, &shifted);
        assert_eq!(t2i.recall_at_1, 0.0);
        assert!(t2i.recall_at_5 == 0.0 && t2i.median_rank > 1.0);
    }
}
