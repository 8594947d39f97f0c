//! Training, in process (feature `static`): gradients reach every trainable tensor, a small
//! model learns a task with a known answer, a resumed run continues exactly, and the output is
//! a complete model directory.

#![cfg(feature = "static")]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use archaeclip::error::{Error, Result};
use archaeclip::train::data::{PairSource, RawPair, Stream};
use archaeclip::train::options::TrainOptions;
use archaeclip::train::trainer::{Event, Trainer};

const TINY: &str = "tests/fixtures/clip/models/tiny-quickgelu";

/// Pairs from memory; `interrupt_after` raises SQLite's interrupt after that many train rows.
struct VecSource {
    train: Vec<(Vec<u8>, String)>,
    validation: Vec<(Vec<u8>, String)>,
    queue: VecDeque<RawPair>,
    vqueue: VecDeque<RawPair>,
    interrupt_after_reads: Option<usize>,
    reads: usize,
}

fn raw(i: usize, (image, caption): &(Vec<u8>, String)) -> RawPair {
    RawPair {
        row: i as u64 + 1,
        image: Ok(image.clone()),
        caption: Ok(caption.clone()),
    }
}

impl VecSource {
    fn new(train: Vec<(Vec<u8>, String)>, validation: Vec<(Vec<u8>, String)>) -> VecSource {
        VecSource {
            train,
            validation,
            queue: VecDeque::new(),
            vqueue: VecDeque::new(),
            interrupt_after_reads: None,
            reads: 0,
        }
    }
}

impl PairSource for VecSource {
    fn count(&mut self, stream: Stream) -> Result<u64> {
        Ok(match stream {
            Stream::Train => self.train.len(),
            Stream::Validation => self.validation.len(),
        } as u64)
    }
    fn start(&mut self, stream: Stream) -> Result<()> {
        match stream {
            Stream::Train => {
                self.queue = self
                    .train
                    .iter()
                    .enumerate()
                    .map(|(i, p)| raw(i, p))
                    .collect()
            }
            Stream::Validation => {
                self.vqueue = self
                    .validation
                    .iter()
                    .enumerate()
                    .map(|(i, p)| raw(i, p))
                    .collect()
            }
        }
        Ok(())
    }
    fn next(&mut self, stream: Stream) -> Result<Option<RawPair>> {
        if stream == Stream::Train {
            self.reads += 1;
        }
        Ok(match stream {
            Stream::Train => self.queue.pop_front(),
            Stream::Validation => self.vqueue.pop_front(),
        })
    }
    fn interrupted(&mut self) -> bool {
        self.interrupt_after_reads.is_some_and(|n| self.reads >= n)
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p =
            std::env::temp_dir().join(format!("archaeclip-train-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn out(&self) -> String {
        self.0.join("out").display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 180, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [230, 210, 30]),
];
const SHAPES: [&str; 3] = ["square", "disc", "stripe"];

/// A PNG of a coloured shape on grey, with a little seeded jitter, and its caption.
fn shape_pair(colour: usize, shape: usize, seed: u64) -> (Vec<u8>, String) {
    let (cname, rgb) = COLOURS[colour];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut rnd = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as i32
    };
    let (w, h) = (40u32, 36u32);
    let (ox, oy) = (rnd() % 5 - 2, rnd() % 5 - 2);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as i32 - 20 - ox, y as i32 - 18 - oy);
        let inside = match shape {
            0 => dx.abs() < 10 && dy.abs() < 10,
            1 => dx * dx + dy * dy < 120,
            _ => dy.abs() < 4,
        };
        let noise = (rnd() % 21 - 10) as i16;
        let base = if inside { rgb } else { [128, 128, 128] };
        image::Rgb(base.map(|c| (i16::from(c) + noise).clamp(0, 255) as u8))
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    (png, format!("a {cname} {}", SHAPES[shape]))
}

fn shapes(copies: u64, seed: u64) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    for c in 0..copies {
        for colour in 0..COLOURS.len() {
            for shape in 0..SHAPES.len() {
                out.push(shape_pair(
                    colour,
                    shape,
                    seed + c * 100 + (colour * 10 + shape) as u64,
                ));
            }
        }
    }
    out
}

fn norm(t: &candle_core::Tensor) -> f64 {
    f64::from(
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
}

fn options(json: serde_json::Value) -> TrainOptions {
    TrainOptions::parse(&json.to_string()).unwrap()
}

fn run(trainer: &mut Trainer, source: &mut VecSource) -> Result<Vec<Event>> {
    let mut events = Vec::new();
    while let Some(e) = trainer.next_event(source)? {
        events.push(e);
    }
    Ok(events)
}

fn losses(events: &[Event]) -> Vec<f64> {
    events
        .iter()
        .filter(|e| e.kind == "train")
        .map(|e| e.loss.unwrap())
        .collect()
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_no_frozen_one_does() {
    let s = Scratch::new("grads");
    for (freeze, frozen_prefixes) in [
        ("none", vec![]),
        ("vision", vec!["vision_model.", "visual_projection."]),
        ("text", vec!["text_model.", "text_projection."]),
    ] {
        let mut source = VecSource::new(shapes(1, 1), vec![]);
        let o = options(
            serde_json::json!({"output": s.out(), "batch_size": 6, "freeze": freeze, "shuffle": false}),
        );
        let mut trainer = Trainer::new(Path::new(TINY), "test", o, &mut source).unwrap();
        let grads = trainer.probe_gradients(&mut source).unwrap();
        assert!(grads.len() >= 40, "{} parameters", grads.len());
        for (name, trainable, grad) in &grads {
            let norm = grad.as_ref().map(norm);
            let frozen = frozen_prefixes.iter().any(|p| name.starts_with(p));
            assert_eq!(*trainable, !frozen, "{freeze}: {name}");
            if frozen {
                assert!(norm.is_none(), "{freeze}: frozen {name} got a gradient");
            } else {
                let n = norm.unwrap_or_else(|| panic!("{freeze}: no gradient reached {name}"));
                assert!(n.is_finite(), "{freeze}: {name} gradient norm {n}");
                // The key bias shifts every score of a softmax row equally: its gradient is 0
                // in exact arithmetic (rounding noise here, as in torch). Every other tensor
                // must really learn.
                if !name.ends_with("k_proj.bias") {
                    assert!(n > 1e-6, "{freeze}: {name} gradient norm {n}");
                }
            }
        }
        // The traps: layer norms of the first layer and the class token and the temperature.
        for name in [
            "text_model.encoder.layers.0.layer_norm1.weight",
            "vision_model.pre_layrnorm.bias",
            "vision_model.embeddings.class_embedding",
            "logit_scale",
        ] {
            assert!(grads.iter().any(|(n, _, _)| n == name), "{name} missing");
        }
    }
    // Only the last layers.
    let mut source = VecSource::new(shapes(1, 1), vec![]);
    let o =
        options(serde_json::json!({"output": s.out(), "batch_size": 6, "train_last_layers": 1}));
    let mut trainer = Trainer::new(Path::new(TINY), "test", o, &mut source).unwrap();
    for (name, trainable, grad) in trainer.probe_gradients(&mut source).unwrap() {
        assert_eq!(trainable, grad.is_some(), "{name}");
        if name.contains("layers.0.") || name.contains("embeddings") {
            assert!(!trainable, "{name}");
        }
    }
}

#[test]
fn a_small_model_learns_colours_and_shapes() {
    learns_colours_and_shapes("fp32");
}

/// The same task in mixed precision (bf16 products on AMX tiles or AVX512_BF16) learns as well.
#[test]
fn a_small_model_learns_colours_and_shapes_in_bf16() {
    if archaeclip::clip::Bf16Engine::detect().is_none() {
        eprintln!("no AMX or AVX512_BF16 here: bf16 training is not run (see the refusal test)");
        return;
    }
    learns_colours_and_shapes("bf16");
}

fn learns_colours_and_shapes(precision: &str) {
    let s = Scratch::new(&format!("learn-{precision}"));
    // 12 classes (4 colours x 3 shapes), 8 jittered copies each to train on, 2 held out.
    let mut source = VecSource::new(shapes(8, 1000), shapes(2, 9000));
    let o = options(serde_json::json!({
        "output": s.out(), "batch_size": 12, "epochs": 12, "lr": 3e-3, "warmup_steps": 5,
        "weight_decay": 0.0, "validation": "held out", "save_every": 0, "precision": precision,
    }));
    let mut trainer = Trainer::new(Path::new(TINY), "train", o, &mut source).unwrap();
    let events = run(&mut trainer, &mut source).unwrap();
    let l = losses(&events);
    assert_eq!(l.len(), 8 * 12);
    let chance_loss = 12f64.ln();
    let last: f64 = l[l.len() - 8..].iter().sum::<f64>() / 8.0;
    assert!(l[0] > 0.8 * chance_loss, "first loss {}", l[0]);
    assert!(
        last < 0.5 * chance_loss,
        "last epoch's loss {last} (ln 12 = {chance_loss})"
    );
    let evals: Vec<&Event> = events.iter().filter(|e| e.kind == "eval").collect();
    assert_eq!(evals.len(), 12, "one evaluation per epoch");
    let recall = |e: &Event| {
        e.detail.as_ref().unwrap()["text_to_image"]["recall_at_1"]
            .as_f64()
            .unwrap()
    };
    // 24 held-out pairs, two per caption: chance recall@1 is 1/24; a perfect model that can't
    // tell two identical captions apart gets 1/2 (ties count against it).
    let first = recall(evals[0]);
    let best = evals.iter().map(|e| recall(e)).fold(0.0, f64::max);
    assert!(
        best >= 0.3,
        "held-out recall@1 {best} (first epoch {first}, chance 0.04)"
    );
    let checkpoints = events.iter().filter(|e| e.kind == "checkpoint").count();
    assert_eq!(checkpoints, 12, "one per epoch, the last one final");
}

#[test]
fn a_resumed_run_continues_exactly() {
    let o = |out: &str, resume: bool| {
        options(serde_json::json!({
            "output": out, "batch_size": 5, "epochs": 2, "lr": 1e-3, "warmup_steps": 2,
            "shuffle_buffer": 7, "resume": resume, "save_every": 100,
        }))
    };
    let data = shapes(1, 5);
    // 12 pairs, batches of 5: 3 steps an epoch (5, 5, 2), 6 in all.
    let a = Scratch::new("resume-a");
    let mut source = VecSource::new(data.clone(), vec![]);
    let mut trainer = Trainer::new(Path::new(TINY), "s", o(&a.out(), false), &mut source).unwrap();
    let straight = losses(&run(&mut trainer, &mut source).unwrap());
    assert_eq!(straight.len(), 6);

    // The same run, interrupted in the second epoch (after 4 steps), then resumed.
    let b = Scratch::new("resume-b");
    let mut source = VecSource::new(data.clone(), vec![]);
    source.interrupt_after_reads = Some(12 + 10);
    let mut trainer = Trainer::new(Path::new(TINY), "s", o(&b.out(), false), &mut source).unwrap();
    let mut first = Vec::new();
    let err = loop {
        match trainer.next_event(&mut source) {
            Ok(Some(e)) => first.push(e),
            Ok(None) => panic!("not interrupted"),
            Err(e) => break e,
        }
    };
    assert_eq!(err, Error::Interrupted);
    trainer.save_after_interrupt().unwrap();
    let done = losses(&first);
    assert!(done.len() >= 3 && done.len() < 6, "{done:?}");
    let mut source = VecSource::new(data, vec![]);
    let mut resumed = Trainer::new(Path::new(TINY), "s", o(&b.out(), true), &mut source).unwrap();
    let rest = losses(&run(&mut resumed, &mut source).unwrap());
    let joined: Vec<f64> = done.iter().chain(&rest).copied().collect();
    assert_eq!(joined.len(), 6);
    for (x, y) in joined.iter().zip(&straight) {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs(),
            "resumed {joined:?}\nstraight {straight:?}"
        );
    }
    // A changed recipe is refused.
    let mut changed = o(&b.out(), true);
    changed.lr = 2e-3;
    let mut source = VecSource::new(shapes(1, 5), vec![]);
    let e = Trainer::new(Path::new(TINY), "s", changed, &mut source)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("'resume': options differ"), "{e}");
}

#[test]
fn the_output_is_a_complete_model_directory_with_the_base_keys() {
    let s = Scratch::new("output");
    let mut source = VecSource::new(shapes(1, 7), vec![]);
    let o = options(serde_json::json!({"output": s.out(), "batch_size": 6, "max_steps": 2}));
    let mut trainer = Trainer::new(Path::new(TINY), "SELECT 1", o.clone(), &mut source).unwrap();
    run(&mut trainer, &mut source).unwrap();
    let out = PathBuf::from(s.out());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "modules.json",
        "archaeclip_training.json",
        "optimizer.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let read = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let base = read(&Path::new(TINY).join("model.safetensors"));
    let trained = read(&out.join("model.safetensors"));
    let mut keys: Vec<&String> = base.keys().collect();
    keys.sort();
    let mut out_keys: Vec<&String> = trained.keys().collect();
    out_keys.sort();
    assert_eq!(keys, out_keys);
    for (k, t) in &base {
        assert_eq!(t.dims(), trained[k].dims(), "{k}");
    }
    let changed = |k: &str| {
        let diff = (&base[k] - &trained[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff > 0.0
    };
    assert!(changed("text_projection.weight") && changed("vision_model.pre_layrnorm.weight"));
    // archaeclip loads it, and the record says what made it.
    let loaded = archaeclip::clip::load::load(&out).unwrap();
    assert_eq!(
        loaded.config,
        archaeclip::clip::load::load(Path::new(TINY))
            .unwrap()
            .config
    );
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("archaeclip_training.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["statement"], "SELECT 1");
    assert_eq!(record["state"]["step"], 2);
    assert_eq!(record["options"]["batch_size"], 6);
    // A second run into the same directory is refused without resume/overwrite.
    let mut source = VecSource::new(shapes(1, 7), vec![]);
    let e = Trainer::new(Path::new(TINY), "SELECT 1", o, &mut source)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("exists and is not empty"), "{e}");
}

#[test]
fn a_weights_only_base_gets_standard_tokenizer_files() {
    // tiny-gelu: config.json + pytorch_model.bin only (what HF Trainer's save_model leaves).
    let base = "tests/fixtures/clip/models/tiny-gelu";
    let s = Scratch::new("weights-only");
    let mut source = VecSource::new(shapes(1, 3), vec![]);
    let o = options(serde_json::json!({"output": s.out(), "batch_size": 6, "max_steps": 1}));
    let mut trainer = Trainer::new(Path::new(base), "s", o, &mut source).unwrap();
    run(&mut trainer, &mut source).unwrap();
    let out = PathBuf::from(s.out());
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let trained = archaeclip::clip::load::load(&out).unwrap();
    assert!(trained.fallbacks.is_empty(), "{:?}", trained.fallbacks);
    let original = archaeclip::clip::load::load(Path::new(base)).unwrap();
    assert_eq!(original.fallbacks.len(), 2);
    for text in [
        "a bronze coin from Gabii",
        "terracotta statuette, 6th century BCE",
        "café 🏺",
    ] {
        assert_eq!(
            trained.tokenize(text).unwrap(),
            original.tokenize(text).unwrap(),
            "{text}"
        );
    }
    assert_eq!(trained.preprocess, original.preprocess);
}

/// `precision: 'bf16'` rounds the linear layers' inputs to bf16 (AMX tiles, or AVX512_BF16):
/// one step's gradients differ from float32's by that rounding and no more, and every
/// trainable tensor still gets one. Where the CPU has neither, the option is refused with a
/// message that says so.
#[test]
fn bf16_products_give_float32s_gradients_within_rounding() {
    let Some(engine) = archaeclip::clip::Bf16Engine::detect() else {
        let o = serde_json::json!({"output": "x", "precision": "bf16"});
        let err = TrainOptions::parse(&o.to_string()).unwrap_err().to_string();
        assert!(
            err.contains("'precision'") && err.contains("AMX") && err.contains("AVX512_BF16"),
            "{err}"
        );
        eprintln!(
            "no AMX or AVX512_BF16 here: the bf16 products are not tested, only their refusal"
        );
        return;
    };
    eprintln!("bf16 products on {}", engine.name());
    let s = Scratch::new("bf16");
    let probe = |precision: &str| {
        let mut source = VecSource::new(shapes(1, 1), vec![]);
        let o = options(serde_json::json!({
            "output": s.out(), "batch_size": 6, "shuffle": false, "precision": precision,
        }));
        let mut trainer = Trainer::new(Path::new(TINY), "test", o, &mut source).unwrap();
        trainer.probe_gradients(&mut source).unwrap()
    };
    let (exact, rounded) = (probe("fp32"), probe("bf16"));
    assert_eq!(exact.len(), rounded.len());
    let mut worst = (0.0, String::new());
    for ((name, trainable, a), (name_b, _, b)) in exact.iter().zip(&rounded) {
        assert_eq!(name, name_b);
        if !trainable {
            continue;
        }
        let a = a
            .as_ref()
            .unwrap_or_else(|| panic!("fp32: no gradient reached {name}"));
        let b = b
            .as_ref()
            .unwrap_or_else(|| panic!("bf16: no gradient reached {name}"));
        // (The key bias' gradient is 0 in exact arithmetic: rounding noise only.)
        if name.ends_with("k_proj.bias") {
            continue;
        }
        let diff = norm(&(a - b).unwrap()) / norm(a);
        assert!(
            diff.is_finite() && norm(b) > 1e-6,
            "{name}: bf16 gradient norm {}",
            norm(b)
        );
        if diff > worst.0 {
            worst = (diff, name.clone());
        }
    }
    // bf16 keeps 8 significant bits (relative rounding up to 2^-9): the gradients move by
    // about 1% and not by more than a few, and they do move (the bf16 path ran).
    assert!(
        worst.0 < 0.05,
        "largest relative gradient difference {worst:?}"
    );
    assert!(
        worst.0 > 1e-4,
        "bf16 gradients equal float32's ({worst:?}): not rounded?"
    );
    eprintln!("bf16 against fp32: largest relative gradient difference {worst:?}");
}
