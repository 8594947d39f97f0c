//! Training against PyTorch: the losses, learning rates, gradient norms, step-0 gradients and
//! weights after four AdamW steps of tests/fixtures/train/ (made by
//! scripts/make_train_fixtures.py with torch and transformers on the same tiny model, the same
//! images and captions and the same recipe).

#![cfg(feature = "static")]

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use archaeclip::error::Result;
use archaeclip::train::data::{PairSource, RawPair, Stream};
use archaeclip::train::options::TrainOptions;
use archaeclip::train::trainer::Trainer;
use candle_core::{Device, Tensor};

const TINY: &str = "tests/fixtures/clip/models/tiny-quickgelu";
const FIXTURES: &str = "tests/fixtures/train";

struct Fixture {
    pairs: Vec<(Vec<u8>, String)>,
    reference: HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn fixture() -> Fixture {
    let dir = PathBuf::from(FIXTURES);
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pairs.json")).unwrap()).unwrap();
    let pairs = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                std::fs::read(dir.join(p["image"].as_str().unwrap())).unwrap(),
                p["caption"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    Fixture {
        pairs,
        reference,
        json,
    }
}

struct Pairs {
    pairs: Vec<(Vec<u8>, String)>,
    queue: VecDeque<RawPair>,
}

impl PairSource for Pairs {
    fn count(&mut self, _: Stream) -> Result<u64> {
        Ok(self.pairs.len() as u64)
    }
    fn start(&mut self, _: Stream) -> Result<()> {
        self.queue = self
            .pairs
            .iter()
            .enumerate()
            .map(|(i, (img, cap))| RawPair {
                row: i as u64 + 1,
                image: Ok(img.clone()),
                caption: Ok(cap.clone()),
            })
            .collect();
        Ok(())
    }
    fn next(&mut self, _: Stream) -> Result<Option<RawPair>> {
        Ok(self.queue.pop_front())
    }
    fn interrupted(&mut self) -> bool {
        false
    }
}

fn trainer(f: &Fixture, extra: serde_json::Value, out: &Path) -> (Trainer, Pairs) {
    let mut o = serde_json::json!({
        "output": out.display().to_string(), "overwrite": true, "batch_size": 4, "epochs": 2,
        "lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.2, "adam_beta1": 0.9,
        "adam_beta2": 0.999, "adam_eps": 1e-8, "max_grad_norm": 1.0, "shuffle": false,
        "save_every": 100,
    });
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    let mut source = Pairs {
        pairs: f.pairs.clone(),
        queue: VecDeque::new(),
    };
    let t = Trainer::new(
        Path::new(TINY),
        "fixture",
        TrainOptions::parse(&o.to_string()).unwrap(),
        &mut source,
    )
    .unwrap();
    (t, source)
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |a - b| / max(|b|max, floor).
fn rel(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let (a, b) = (vec1(a), vec1(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("archaeclip-ref-{name}-{}", std::process::id()))
}

struct Run {
    losses: Vec<f64>,
    lrs: Vec<f64>,
    grad_norms: Vec<f64>,
    params: HashMap<String, Tensor>,
}

fn train(f: &Fixture, extra: serde_json::Value, name: &str) -> Run {
    let out = scratch(name);
    let (mut t, mut source) = trainer(f, extra, &out);
    let mut run = Run {
        losses: vec![],
        lrs: vec![],
        grad_norms: vec![],
        params: HashMap::new(),
    };
    while let Some(e) = t.next_event(&mut source).unwrap() {
        if e.kind == "train" {
            run.losses.push(e.loss.unwrap());
            run.lrs.push(e.lr.unwrap());
            run.grad_norms
                .push(e.detail.unwrap()["grad_norm"].as_f64().unwrap());
        }
    }
    run.params = t
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.copy().unwrap()))
        .collect();
    let _ = std::fs::remove_dir_all(out);
    run
}

fn assert_close(what: &str, ours: &[f64], theirs: &Tensor, tol: f64) {
    let theirs = vec1(theirs);
    assert_eq!(ours.len(), theirs.len(), "{what}");
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(
            (a - b).abs() <= tol * b.abs().max(1e-3),
            "{what}: ours {ours:?}\ntorch {theirs:?}"
        );
    }
    eprintln!("{what}: ours {ours:?} torch {theirs:?}");
}

fn zero_grad_params(f: &Fixture) -> Vec<String> {
    f.json["zero_gradient_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Weights after training against torch's `after.*` (tolerance relative to each tensor's
/// largest value); the token embedding on the rows the captions use.
fn assert_weights(f: &Fixture, run: &Run, prefix: &str, tol: f64) -> usize {
    let skip = zero_grad_params(f);
    let mut checked = 0;
    let mut worst = (0.0, String::new());
    for (key, theirs) in &f.reference {
        let Some(name) = key.strip_prefix(&format!("{prefix}after.")) else {
            continue;
        };
        if skip.contains(&name.to_owned()) {
            continue; // Adam amplifies their rounding-noise gradients (see the fixture README)
        }
        let ours = run.params[name].reshape(theirs.shape()).unwrap();
        let r = rel(&ours, theirs, 1e-3);
        if r > worst.0 {
            worst = (r, name.to_owned());
        }
        checked += 1;
    }
    if prefix.is_empty() {
        // Rows the captions use, and rows they don't (weight decay still shrinks those).
        for rows in ["after_rows", "after_rows_unused"] {
            let ids = f.reference[&format!("{rows}_ids")]
                .to_dtype(candle_core::DType::U32)
                .unwrap();
            let name = "text_model.embeddings.token_embedding.weight";
            let ours = run.params[name].index_select(&ids, 0).unwrap();
            let r = rel(&ours, &f.reference[&format!("{rows}.{name}")], 1e-3);
            if r > worst.0 {
                worst = (r, format!("{name} ({rows})"));
            }
            checked += 1;
        }
    }
    eprintln!(
        "{prefix}after: {checked} tensors, worst relative difference {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= tol,
        "{prefix}after: {} differs by {:.2e}",
        worst.1,
        worst.0
    );
    checked
}

#[test]
fn step_zero_gradients_match_torch() {
    let f = fixture();
    let out = scratch("grads");
    let (mut t, mut source) = trainer(&f, serde_json::json!({}), &out);
    let grads = t.probe_gradients(&mut source).unwrap();
    let skip = zero_grad_params(&f);
    let mut worst = (0.0, String::new());
    let mut checked = 0;
    for (name, _, grad) in &grads {
        let g = grad
            .as_ref()
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let (ours, theirs) = if name == "text_model.embeddings.token_embedding.weight" {
            let ids = f.reference["grad_rows_ids"]
                .to_dtype(candle_core::DType::U32)
                .unwrap();
            (
                g.index_select(&ids, 0).unwrap(),
                f.reference[&format!("grad_rows.{name}")].clone(),
            )
        } else {
            (
                g.reshape(f.reference[&format!("grad.{name}")].shape())
                    .unwrap(),
                f.reference[&format!("grad.{name}")].clone(),
            )
        };
        if skip.contains(name) {
            // Zero in exact arithmetic: only the magnitude of the noise can be compared.
            assert!(vec1(&ours).iter().all(|x| x.abs() < 1e-5), "{name}");
            continue;
        }
        let r = rel(&ours, &theirs, 1e-6);
        if r > worst.0 {
            worst = (r, name.clone());
        }
        checked += 1;
    }
    let _ = std::fs::remove_dir_all(out);
    eprintln!(
        "step-0 gradients: {checked} tensors, worst relative difference {:.2e} ({})",
        worst.0, worst.1
    );
    assert_eq!(checked + skip.len(), grads.len());
    assert!(worst.0 <= 1e-4, "{} differs by {:.2e}", worst.1, worst.0);
}

#[test]
fn four_steps_match_torch() {
    let f = fixture();
    let run = train(&f, serde_json::json!({}), "full");
    assert_close("losses", &run.losses, &f.reference["losses"], 1e-4);
    assert_close("lrs", &run.lrs, &f.reference["lrs"], 1e-12);
    assert_close(
        "grad norms",
        &run.grad_norms,
        &f.reference["grad_norms"],
        1e-4,
    );
    let scale: Vec<f64> = vec1(&run.params["logit_scale"]);
    assert_close(
        "logit_scale",
        &scale,
        &f.reference["logit_scale_after"].narrow(0, 3, 1).unwrap(),
        1e-5,
    );
    assert!(assert_weights(&f, &run, "", 1e-4) > 70);
}

#[test]
fn frozen_vision_matches_torch() {
    let f = fixture();
    let run = train(&f, serde_json::json!({"freeze": "vision"}), "frozen");
    assert_close(
        "frozen losses",
        &run.losses,
        &f.reference["frozen_vision.losses"],
        1e-4,
    );
    assert_eq!(assert_weights(&f, &run, "frozen_vision.", 1e-4), 2);
}

#[test]
fn gradient_accumulation_matches_torch() {
    let f = fixture();
    let run = train(
        &f,
        serde_json::json!({"batch_size": 2, "gradient_accumulation": 2}),
        "accum",
    );
    assert_close(
        "accumulated losses",
        &run.losses,
        &f.reference["accum.losses"],
        1e-4,
    );
    assert_eq!(assert_weights(&f, &run, "accum.", 1e-4), 1);
}
