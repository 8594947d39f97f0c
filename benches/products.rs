//! The linear-layer products of one CLIP training step (ViT-B/32 at batch 32 and 64, the text
//! tower at ~12-token captions), as `clip::train_ops` runs them (`product_new`,
//! `product_transposed_new`): each timing includes packing the operand into panels and
//! allocating the output (not zeroed), as a step does on every call.
//!
//!     cargo bench --locked --bench products            # a table
//!     cargo bench --locked --bench products -- --json  # one JSON object per line
//!
//! `benches/products_bench.py` runs this and torch's matmuls on the same shapes in one
//! invocation and prints the ratios. Threads: rayon's default (RAYON_NUM_THREADS).

use archaeclip::clip::amx::{self, Layout, Operand};
use archaeclip::clip::matmul::Packed;
use std::hint::black_box;
use std::time::Instant;

/// (rows, inputs, outputs) of a step's linear layers: vision q/k/v, out, fc1, fc2 at 50 tokens
/// x 32 and x 64 images; text at 12 tokens x 32 captions.
const SHAPES: [(usize, usize, usize); 12] = [
    (1600, 768, 2304),
    (1600, 768, 768),
    (1600, 768, 3072),
    (1600, 3072, 768),
    (3200, 768, 2304),
    (3200, 768, 768),
    (3200, 768, 3072),
    (3200, 3072, 768),
    (384, 512, 1536),
    (384, 512, 512),
    (384, 512, 2048),
    (384, 2048, 512),
];

/// One product, run as the step runs it.
type Op<'a> = (&'static str, Box<dyn FnMut() + 'a>);

fn median_s(runs: usize, f: &mut dyn FnMut()) -> f64 {
    f(); // warm-up
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let runs = 7;
    if !json {
        println!(
            "{:>20} {:>6} {:>9} {:>10} {:>9}   (median of {runs}, {} threads, packing and output allocation included)",
            "rows x in -> out",
            "op",
            "precision",
            "ms",
            "GFLOP/s",
            rayon::current_num_threads()
        );
    }
    for (m, k, n) in SHAPES {
        let (x, w, dy) = (values(m * k, 1), values(n * k, 2), values(m * n, 3));
        let flops = 2.0 * (m * k * n) as f64;
        let mut ops: Vec<(&str, Op)> = vec![
            // y (m, n) = x (m, k) · Wᵀ
            (
                "fp32",
                (
                    "fwd",
                    Box::new(|| {
                        let packed = Packed::from_rows(&w, n, k);
                        black_box(packed.product_new(&x, m, None));
                    }),
                ),
            ),
            // dX (m, k) = dY (m, n) · W
            (
                "fp32",
                (
                    "dX",
                    Box::new(|| {
                        let packed = Packed::from_transposed(&w, k, n);
                        black_box(packed.product_new(&dy, m, None));
                    }),
                ),
            ),
            // dW (n, k) = dYᵀ (n, m) · X (m, k)
            (
                "fp32",
                (
                    "dW",
                    Box::new(|| {
                        let packed = Packed::from_transposed(&x, k, m);
                        black_box(packed.product_transposed_new(&dy, n));
                    }),
                ),
            ),
        ];
        if amx::available() {
            // The same products on AMX tiles in bf16 (`clip_train`'s precision 'bf16'), both
            // operands packed per call as the step does.
            ops.extend([
                (
                    "bf16-amx",
                    (
                        "fwd",
                        Box::new(|| {
                            let (a, b) = (
                                Operand::a(&x, m, k, Layout::Rows),
                                Operand::b(&w, k, n, Layout::Transposed),
                            );
                            black_box(amx::product(&a, &b, None));
                        }) as Box<dyn FnMut()>,
                    ),
                ),
                (
                    "bf16-amx",
                    (
                        "dX",
                        Box::new(|| {
                            let (a, b) = (
                                Operand::a(&dy, m, n, Layout::Rows),
                                Operand::b(&w, n, k, Layout::Rows),
                            );
                            black_box(amx::product(&a, &b, None));
                        }),
                    ),
                ),
                (
                    "bf16-amx",
                    (
                        "dW",
                        Box::new(|| {
                            let (a, b) = (
                                Operand::a(&dy, n, m, Layout::Transposed),
                                Operand::b(&x, m, k, Layout::Rows),
                            );
                            black_box(amx::product(&a, &b, None));
                        }),
                    ),
                ),
            ]);
        }
        for (precision, (op, mut f)) in ops {
            let s = median_s(runs, &mut *f);
            if json {
                println!(
                    "{{\"m\": {m}, \"k\": {k}, \"n\": {n}, \"op\": \"{op}\", \"precision\": \"{precision}\", \"seconds\": {s:e}}}"
                );
            } else {
                println!(
                    "{:>20} {op:>6} {precision:>9} {:>10.2} {:>9.1}",
                    format!("{m} x {k} -> {n}"),
                    s * 1e3,
                    flops / s / 1e9
                );
            }
        }
    }
}
