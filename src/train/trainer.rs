//! The training loop, driven one event at a time (the SQL table-valued function asks for the
//! next row): one optimizer step per `train` row, plus `eval`, `checkpoint`, `skipped` and
//! `cache` rows.
//!
//! The recipe is CLIP's and HuggingFace's run_clip.py: symmetric cross-entropy over in-batch
//! negatives with a learned temperature (clamped at ln 100, as open_clip does), AdamW (torch's
//! update; no weight decay on parameters of rank < 2, open_clip's rule), linear warmup then
//! cosine/linear/constant decay, global gradient-norm clipping (HF's default 1.0).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::loss::cross_entropy;
use serde_json::{json, Value};

use super::data::{
    Batch, EpochReader, PairSource, Pending, Prepared, Preparer, Rng, Skipped, Stream,
};
use super::evaluate::recall;
use super::export::{self, Base, Checkpoint};
use super::optim::{clip_grad_norm, learning_rate, AdamW, Grads};
use super::options::{TrainOptions, TrainPrecision};
use super::params::{Param, Recording, TrainableRule};
use crate::clip::config::ClipConfig;
use crate::clip::load::{self, Forward};
use crate::clip::model::ClipModel;
use crate::clip::preprocess::PreprocessConfig;
use crate::clip::train_ops::Bf16Products;
use crate::error::{Error, Result};

/// open_clip's clamp of the learned temperature.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092; // ln(100)

fn fail(e: candle_core::Error) -> Error {
    Error::Training(format!(
        "the model failed: {}",
        crate::clip::candle_message(&e)
    ))
}

/// One row of `clip_train`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub kind: &'static str,
    pub epoch: u32,
    pub step: u64,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    /// exp(logit_scale): the inverse temperature (at most 100).
    pub logit_scale: Option<f64>,
    /// Pairs trained on so far.
    pub examples: u64,
    pub examples_per_s: Option<f64>,
    pub elapsed_s: f64,
    pub detail: Option<Value>,
}

/// Image features of a fixed vision tower, computed once.
struct FeatureCache {
    /// (pairs, dims), unit rows.
    features: Tensor,
    ids: Vec<Vec<u32>>,
    order: Vec<usize>,
    position: usize,
}

enum ImageInput<'a> {
    Pixels(&'a [Prepared]),
    Features(Tensor),
}

pub struct Trainer {
    /// Large freed blocks are reused while the run lasts (`crate::alloc`). First, so that it is
    /// dropped first: the rest is then freed straight to the system.
    _alloc: crate::alloc::Scope,
    options: TrainOptions,
    config: ClipConfig,
    model: ClipModel,
    params: Vec<Param>,
    logit_scale: Tensor,
    logit_scale_var: Option<Var>,
    optimizer: AdamW,
    preparer: Arc<Preparer>,
    rule: TrainableRule,
    base_root: PathBuf,
    base_model_dir: PathBuf,
    preprocess: Arc<PreprocessConfig>,
    output: PathBuf,
    statement: String,
    rows: u64,
    steps_per_epoch: u64,
    total_steps: u64,
    /// Optimizer steps done.
    step: u64,
    epoch: u32,
    /// Micro-batches of the current epoch already trained on (for resuming).
    micro_done: u64,
    epoch_started: bool,
    reader: Option<EpochReader>,
    pending: Option<Pending>,
    cache: Option<FeatureCache>,
    cache_saved_s: f64,
    events: VecDeque<Event>,
    /// Every row so far (of earlier sessions too, when resumed), as saved in the record.
    log: Vec<Value>,
    started: Instant,
    /// Seconds of earlier sessions of a resumed run.
    elapsed_before: f64,
    examples: u64,
    skipped: u64,
    finished: bool,
    last_eval_step: Option<u64>,
    last_save_step: Option<u64>,
    last_eval: Option<Value>,
}

fn unit_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

impl Trainer {
    /// Loads the base model (or the checkpoint in `output` when resuming) and sizes the run.
    pub fn new(
        base: &Path,
        statement: &str,
        options: TrainOptions,
        source: &mut dyn PairSource,
    ) -> Result<Trainer> {
        options.check()?;
        let output = export::absolute(options.output.as_deref().unwrap_or_default())?;
        let seed = options.seed;
        let random = move |c: &ClipConfig| {
            Box::new(super::init::RandomInit::new(c, seed))
                as Box<dyn candle_nn::var_builder::SimpleBackend>
        };
        let opened = match options.init.as_deref() {
            Some(_) => load::open_with(base, Some(&random))?,
            None => load::open(base)?,
        };
        if opened.root == output || opened.root.starts_with(&output) {
            return Err(Error::Options(format!(
                "'output': {} is or contains the base model",
                options.output.as_deref().unwrap_or_default()
            )));
        }
        let mut record = None;
        if options.resume {
            let r = export::read_record(&output)?;
            let same = |key: &str, want: &Value| r.get(key) == Some(want);
            if !same("base_model", &json!(opened.root.display().to_string())) {
                return Err(Error::Options(format!(
                    "'resume': {} was trained from {}, not from {}",
                    output.display(),
                    r.get("base_model").unwrap_or(&Value::Null),
                    opened.root.display()
                )));
            }
            if !same("statement", &json!(statement)) {
                return Err(Error::Options(
                    "'resume': the statement differs from the one the run started with".into(),
                ));
            }
            if !same("fingerprint", &options.fingerprint()) {
                return Err(Error::Options(format!(
                    "'resume': options differ from the run's ({}); only epochs, max_steps, \
                     validation, eval_every, save_every, name and progress may change",
                    r.get("fingerprint").unwrap_or(&Value::Null)
                )));
            }
            record = Some(r);
        } else if output.is_dir()
            && std::fs::read_dir(&output)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
            && !options.overwrite
        {
            return Err(Error::Options(format!(
                "'output': {} exists and is not empty; pass 'resume': true to continue the run \
                 saved there, 'overwrite': true to replace it, or choose another directory",
                output.display()
            )));
        }

        let rule = TrainableRule::new(&options, &opened.config);
        let overrides = match &record {
            Some(_) => Some(
                // SAFETY: read-only map of our own checkpoint; tensors are copied out below.
                unsafe {
                    candle_core::safetensors::MmapedSafetensors::new(
                        output.join("model.safetensors"),
                    )
                }
                .map_err(|e| {
                    Error::Io(format!(
                        "{}: {}",
                        output.join("model.safetensors").display(),
                        crate::clip::candle_message(&e)
                    ))
                })?,
            ),
            None => None,
        };
        let (recording, recorded) = Recording::new(
            &*opened.weights,
            overrides
                .as_ref()
                .map(|o| o as &dyn candle_nn::var_builder::SimpleBackend),
            rule.clone(),
        );
        let vb = candle_nn::VarBuilder::from_backend(
            Box::new(Forward(&recording)),
            DType::F32,
            Device::Cpu,
        );
        let model = ClipModel::build(vb, &opened.config, true).map_err(|e| {
            Error::Model(format!(
                "{}: the weights do not match config.json: {e}",
                opened.model_dir.display()
            ))
        })?;
        drop(recording);
        let mut params = std::mem::take(&mut *recorded.lock().unwrap_or_else(|p| p.into_inner()));
        let (logit_scale, logit_scale_var) = match params.iter().find(|p| p.name == "logit_scale") {
            Some(p) => (p.tensor.clone(), p.var.clone()),
            None => {
                // Checkpoints without the temperature: CLIP's initial value, trained and saved.
                let init = (1.0f32 / 0.07).ln();
                let var = Var::new(init, &Device::Cpu).map_err(fail)?;
                params.push(Param {
                    name: "logit_scale".into(),
                    tensor: var.as_tensor().clone(),
                    var: Some(var.clone()),
                });
                (var.as_tensor().clone(), Some(var))
            }
        };
        let optimizer = AdamW::new(&params, &options)?;

        let rows = source.count(Stream::Train)?;
        if rows < 2 {
            return Err(Error::Training(format!(
                "the statement returned {rows} row(s); training needs at least 2 pairs"
            )));
        }
        let micro_per_epoch = rows.div_ceil(options.batch_size as u64);
        let steps_per_epoch = micro_per_epoch.div_ceil(options.gradient_accumulation as u64);
        let total_steps = options
            .max_steps
            .unwrap_or(steps_per_epoch * u64::from(options.epochs));

        let preprocess = Arc::new(opened.preprocess.clone());
        let mut trainer = Trainer {
            _alloc: crate::alloc::Scope::enter(),
            preparer: Arc::new(Preparer {
                tokenizer: Arc::new(opened.tokenizer),
                preprocess: preprocess.clone(),
            }),
            config: opened.config,
            model,
            logit_scale,
            logit_scale_var,
            params,
            optimizer,
            rule,
            base_root: opened.root,
            base_model_dir: opened.model_dir,
            preprocess,
            output,
            statement: statement.to_owned(),
            rows,
            steps_per_epoch,
            total_steps,
            step: 0,
            epoch: 0,
            micro_done: 0,
            epoch_started: false,
            reader: None,
            pending: None,
            cache: None,
            cache_saved_s: 0.0,
            events: VecDeque::new(),
            log: Vec::new(),
            started: Instant::now(),
            elapsed_before: 0.0,
            examples: 0,
            skipped: 0,
            finished: false,
            last_eval_step: None,
            last_save_step: None,
            last_eval: None,
            options,
        };
        if let Some(r) = record {
            trainer.resume_from(&r)?;
        }
        if trainer.rule.vision_frozen() {
            trainer.build_cache(source)?;
        }
        Ok(trainer)
    }

    fn resume_from(&mut self, r: &Value) -> Result<()> {
        let state = r.get("state").cloned().unwrap_or(Value::Null);
        let num = |k: &str| {
            state.get(k).and_then(Value::as_u64).ok_or_else(|| {
                Error::Training(format!(
                    "{}: no state.{k} to resume from",
                    export::TRAINING_FILE
                ))
            })
        };
        self.step = num("step")?;
        self.epoch = num("epoch")? as u32;
        self.micro_done = num("micro_done")?;
        self.examples = num("examples")?;
        self.skipped = num("skipped").unwrap_or(0);
        self.elapsed_before = state
            .get("elapsed_s")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        self.optimizer
            .restore(&export::read_optimizer(&self.output)?, self.step)?;
        self.log = r
            .get("log")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        self.last_save_step = Some(self.step);
        Ok(())
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    fn scale_value(&self) -> Option<f64> {
        let v = self
            .logit_scale
            .to_dtype(DType::F32)
            .ok()?
            .to_scalar::<f32>()
            .ok()?;
        Some(f64::from(v).exp())
    }

    fn event(&self, kind: &'static str) -> Event {
        Event {
            kind,
            epoch: self.epoch,
            step: self.step,
            loss: None,
            lr: None,
            logit_scale: self.scale_value(),
            examples: self.examples,
            examples_per_s: None,
            elapsed_s: self.elapsed(),
            detail: None,
        }
    }

    fn emit(&mut self, e: Event) {
        if let Ok(v) = serde_json::to_value(&e) {
            self.log.push(v);
        }
        if self.options.progress {
            eprintln!(
                "clip_train: {} epoch {} step {}/{}{}{}",
                e.kind,
                e.epoch,
                e.step,
                self.total_steps,
                e.loss.map(|l| format!(" loss {l:.4}")).unwrap_or_default(),
                e.detail
                    .as_ref()
                    .map(|d| format!(" {d}"))
                    .unwrap_or_default()
            );
        }
        self.events.push_back(e);
    }

    fn report_skipped(&mut self, skipped: Vec<Skipped>) {
        for s in skipped {
            self.skipped += 1;
            let mut e = self.event("skipped");
            e.detail = Some(json!({"row": s.row, "error": s.error}));
            self.emit(e);
        }
    }

    /// The trainable parameters and whether each has a gradient from `loss` (for tests and
    /// for the first step's check).
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// One forward and backward pass on the first batch of the data, without an update: the
    /// gradient of every parameter (`None`: no gradient reached it). For the tests that prove
    /// every trainable tensor learns, every frozen one stays out of the graph, and the
    /// gradients match torch's.
    #[doc(hidden)]
    pub fn probe_gradients(
        &mut self,
        source: &mut dyn PairSource,
    ) -> Result<Vec<(String, bool, Option<Tensor>)>> {
        self.start_epoch(source)?;
        let _products = self.products();
        let loss = if self.cache.is_some() {
            let (features, ids) = self
                .next_cached()
                .ok_or_else(|| Error::Training("no data".into()))?;
            self.loss(ImageInput::Features(features), &ids)
        } else {
            let batch = self
                .next_micro(source)?
                .ok_or_else(|| Error::Training("no data".into()))?;
            let ids: Vec<Vec<u32>> = batch.pairs.iter().map(|p| p.ids.clone()).collect();
            self.loss(ImageInput::Pixels(&batch.pairs), &ids)
        }
        .map_err(fail)?;
        let store = loss.backward().map_err(fail)?;
        self.epoch_started = false;
        self.pending = None;
        Ok(self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.trainable(), store.get(&p.tensor).cloned()))
            .collect())
    }

    /// The next row, `None` when training is done. Stops with `Error::Interrupted` between
    /// steps when SQLite is interrupted.
    pub fn next_event(&mut self, source: &mut dyn PairSource) -> Result<Option<Event>> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            if self.finished {
                return Ok(None);
            }
            if source.interrupted() {
                return Err(Error::Interrupted);
            }
            self.advance(source)?;
        }
    }

    fn epochs_done(&self) -> bool {
        self.options.max_steps.is_none() && self.epoch >= self.options.epochs
    }

    /// One unit of work: a step, or the end of an epoch, or the end of the run.
    fn advance(&mut self, source: &mut dyn PairSource) -> Result<()> {
        if self.step >= self.total_steps || self.epochs_done() {
            if self.options.validation.is_some() && self.last_eval_step != Some(self.step) {
                self.evaluate_validation(source)?;
            }
            self.finished = true;
            return self.save();
        }
        if !self.epoch_started {
            self.start_epoch(source)?;
        }
        if self.train_step(source)? {
            let (save, eval) = (self.options.save_every, self.options.eval_every);
            if eval > 0 && self.step.is_multiple_of(eval) && self.options.validation.is_some() {
                self.evaluate_validation(source)?;
            }
            if save > 0 && self.step.is_multiple_of(save) && self.step < self.total_steps {
                self.save()?;
            }
        } else {
            // The epoch's data is used up.
            self.epoch += 1;
            self.epoch_started = false;
            self.micro_done = 0;
            let last = self.step >= self.total_steps || self.epochs_done();
            if !last {
                if self.options.eval_every == 0 && self.options.validation.is_some() {
                    self.evaluate_validation(source)?;
                }
                if self.options.save_every == 0 {
                    self.save()?;
                }
            }
        }
        Ok(())
    }

    fn epoch_rng(&self) -> Option<Rng> {
        self.options
            .shuffle
            .then(|| Rng::new(self.options.seed, u64::from(self.epoch) + 1))
    }

    fn start_epoch(&mut self, source: &mut dyn PairSource) -> Result<()> {
        self.epoch_started = true;
        let skip = self.micro_done as usize * self.options.batch_size;
        if let Some(cache) = &mut self.cache {
            cache.order = (0..cache.ids.len()).collect();
            if let Some(mut rng) = self
                .options
                .shuffle
                .then(|| Rng::new(self.options.seed, u64::from(self.epoch) + 1))
            {
                rng.shuffle(&mut cache.order);
            }
            cache.position = skip.min(cache.order.len());
            return Ok(());
        }
        source.start(Stream::Train)?;
        let mut reader = EpochReader::new(self.options.shuffle_buffer, self.epoch_rng());
        // Resuming mid-epoch: replay the order, skip what was trained on.
        let mut left = skip;
        while left > 0 {
            let n = left.min(self.options.batch_size);
            if reader.take(source, n)?.is_empty() {
                break;
            }
            left -= n;
        }
        self.reader = Some(reader);
        self.pending = None;
        Ok(())
    }

    /// The next micro-batch of the epoch (decoded), `None` at its end. The following one is
    /// read now and decoded in the background.
    fn next_micro(&mut self, source: &mut dyn PairSource) -> Result<Option<Batch>> {
        let bs = self.options.batch_size;
        let reader = self.reader.as_mut().expect("an epoch was started");
        let current = match self.pending.take() {
            Some(p) => p.wait()?,
            None => {
                let raw = reader.take(source, bs)?;
                if raw.is_empty() {
                    return Ok(None);
                }
                self.preparer.prepare(raw)
            }
        };
        let raw = reader.take(source, bs)?;
        if !raw.is_empty() {
            self.pending = Some(self.preparer.spawn(raw));
        }
        Ok(Some(current))
    }

    fn next_cached(&mut self) -> Option<(Tensor, Vec<Vec<u32>>)> {
        let cache = self.cache.as_mut()?;
        let end = (cache.position + self.options.batch_size).min(cache.order.len());
        if cache.position >= end {
            return None;
        }
        let picked: Vec<u32> = cache.order[cache.position..end]
            .iter()
            .map(|&i| i as u32)
            .collect();
        cache.position = end;
        let ids = picked
            .iter()
            .map(|&i| cache.ids[i as usize].clone())
            .collect();
        let index = Tensor::new(picked.as_slice(), &Device::Cpu).ok()?;
        Some((cache.features.index_select(&index, 0).ok()?, ids))
    }

    /// CLIP's loss for a batch: mean of the text->image and image->text cross-entropies.
    fn loss(&self, images: ImageInput, ids: &[Vec<u32>]) -> candle_core::Result<Tensor> {
        let image = match images {
            ImageInput::Pixels(pairs) => {
                let size = self.preprocess.crop_size;
                let flat: Vec<f32> = pairs
                    .iter()
                    .flat_map(|p| p.pixels.iter().copied())
                    .collect();
                let pixels = Tensor::from_vec(flat, (pairs.len(), 3, size, size), &Device::Cpu)?;
                unit_rows(&self.model.image_embeds(&pixels)?)?
            }
            ImageInput::Features(f) => f,
        };
        let text = unit_rows(&self.model.text_embeds(ids)?)?;
        let n = ids.len();
        let logits = text
            .matmul(&image.t()?)?
            .broadcast_mul(&self.logit_scale.exp()?)?;
        let labels = Tensor::arange(0u32, n as u32, &Device::Cpu)?;
        let per_text = cross_entropy(&logits, &labels)?;
        let per_image = cross_entropy(&logits.t()?.contiguous()?, &labels)?;
        (per_text + per_image)? / 2.0
    }

    /// Backward pass of one micro-batch; adds its gradients to `grads`.
    fn backward(&self, loss: &Tensor, grads: &mut Grads) -> Result<()> {
        let store = loss.backward().map_err(fail)?;
        for p in &self.params {
            let Some(var) = &p.var else { continue };
            let Some(g) = store.get(var.as_tensor()) else {
                return Err(Error::Training(format!(
                    "no gradient reached {} (a bug in archaeclip: please report it)",
                    p.name
                )));
            };
            let sum = match grads.remove(&p.name) {
                Some(prev) => (prev + g).map_err(fail)?,
                None => g.clone(),
            };
            grads.insert(p.name.clone(), sum);
        }
        Ok(())
    }

    /// The products' precision for this thread while the guard lives (the option `precision`).
    fn products(&self) -> Bf16Products {
        Bf16Products::set(self.options.precision == TrainPrecision::Bf16)
    }

    /// One optimizer step over `gradient_accumulation` micro-batches. `false` when the epoch
    /// had no data left.
    fn train_step(&mut self, source: &mut dyn PairSource) -> Result<bool> {
        let started = Instant::now();
        let _products = self.products();
        let lr = learning_rate(&self.options, self.step, self.total_steps);
        let mut grads = Grads::new();
        let (mut losses, mut pairs, mut micro) = (Vec::new(), 0u64, 0u64);
        for _ in 0..self.options.gradient_accumulation {
            let (loss, n) = if self.cache.is_some() {
                let Some((features, ids)) = self.next_cached() else {
                    break;
                };
                let loss = self
                    .loss(ImageInput::Features(features), &ids)
                    .map_err(fail)?;
                (Some(loss), ids.len())
            } else {
                let Some(batch) = self.next_micro(source)? else {
                    break;
                };
                self.report_skipped(batch.skipped);
                let n = batch.pairs.len();
                let loss = if n >= 2 {
                    let ids: Vec<Vec<u32>> = batch.pairs.iter().map(|p| p.ids.clone()).collect();
                    Some(
                        self.loss(ImageInput::Pixels(&batch.pairs), &ids)
                            .map_err(fail)?,
                    )
                } else {
                    None // a lone pair has no negatives
                };
                (loss, n)
            };
            micro += 1;
            if let Some(loss) = loss {
                losses.push(f64::from(loss.to_scalar::<f32>().map_err(fail)?));
                self.backward(&loss, &mut grads)?;
                pairs += n as u64;
            }
        }
        if micro == 0 {
            return Ok(false);
        }
        self.micro_done += micro;
        if losses.is_empty() {
            return Ok(true); // nothing usable in these micro-batches: no step
        }
        let count = losses.len() as f64;
        if count > 1.0 {
            for g in grads.values_mut() {
                *g = (&*g / count).map_err(fail)?;
            }
        }
        let (grad_norm, coef) = clip_grad_norm(&grads, self.options.max_grad_norm)?;
        self.optimizer.step(&grads, lr, coef)?;
        if let Some(var) = &self.logit_scale_var {
            let clamped = var.as_tensor().clamp(0.0, MAX_LOGIT_SCALE).map_err(fail)?;
            var.set(&clamped).map_err(fail)?;
        }
        self.step += 1;
        self.examples += pairs;
        let secs = started.elapsed().as_secs_f64();
        let mut e = self.event("train");
        e.loss = Some(losses.iter().sum::<f64>() / count);
        e.lr = Some(lr);
        e.examples_per_s = Some(pairs as f64 / secs.max(1e-9));
        e.detail = Some(json!({"pairs": pairs, "grad_norm": grad_norm}));
        self.emit(e);
        Ok(true)
    }

    /// With the vision tower fixed, the image features of every training pair are computed
    /// once (one forward pass) and reused every epoch.
    /// The model as it is now, built for inference (the fused towers of `clip::fast`, ~1.4x
    /// the differentiable modules' speed): for work that needs no gradient, the frozen vision
    /// tower's feature cache and validation. Costs a copy of the weights while it lives.
    fn inference_model(&self) -> Result<ClipModel> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.detach()))
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        ClipModel::build(vb, &self.config, false).map_err(fail)
    }

    fn build_cache(&mut self, source: &mut dyn PairSource) -> Result<()> {
        let started = Instant::now();
        source.start(Stream::Train)?;
        let (features, ids, skipped) = embed_stream(
            &self.inference_model()?,
            &self.preparer,
            source,
            Stream::Train,
            self.options.batch_size,
        )?;
        self.report_skipped(skipped);
        let n = ids.len();
        if n < 2 {
            return Err(Error::Training(format!(
                "only {n} usable pair(s); training needs at least 2"
            )));
        }
        let dims = features.first().map_or(0, Vec::len);
        let flat: Vec<f32> = features.into_iter().flatten().collect();
        let features = Tensor::from_vec(flat, (n, dims), &Device::Cpu).map_err(fail)?;
        let secs = started.elapsed().as_secs_f64();
        let epochs = match self.options.max_steps {
            Some(m) => m as f64 / self.steps_per_epoch.max(1) as f64,
            None => f64::from(self.options.epochs),
        };
        // Each epoch would have run the vision tower forward (and, frozen, no backward).
        self.cache_saved_s = secs * (epochs - 1.0).max(0.0);
        self.cache = Some(FeatureCache {
            features,
            ids,
            order: Vec::new(),
            position: 0,
        });
        let mut e = self.event("cache");
        e.detail = Some(json!({
            "pairs": n, "seconds": secs,
            "note": "vision tower frozen: image features computed once and reused every epoch",
            "estimated_seconds_saved": self.cache_saved_s,
        }));
        self.emit(e);
        Ok(())
    }

    fn evaluate_validation(&mut self, source: &mut dyn PairSource) -> Result<()> {
        self.last_eval_step = Some(self.step);
        source.start(Stream::Validation)?;
        let (images, texts, skipped) = {
            let model = self.inference_model()?;
            let (img, ids, skipped) = embed_stream(
                &model,
                &self.preparer,
                source,
                Stream::Validation,
                self.options.batch_size,
            )?;
            let texts = embed_texts(&model, &ids, self.options.batch_size)?;
            (img, texts, skipped)
        };
        for s in skipped {
            let mut e = self.event("skipped");
            e.detail = Some(json!({"validation_row": s.row, "error": s.error}));
            self.emit(e);
        }
        let scale = self.scale_value().unwrap_or(1.0);
        let loss = batched_loss(&images, &texts, self.options.batch_size, scale)?;
        let [t2i, i2t] = recall(&images, &texts);
        let mut e = self.event("eval");
        e.loss = loss;
        let detail = json!({"text_to_image": t2i, "image_to_text": i2t});
        self.last_eval = Some(detail.clone());
        e.detail = Some(detail);
        self.emit(e);
        Ok(())
    }

    /// The tensors to save, by HF name.
    fn weights(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| {
                let t = match &p.var {
                    Some(v) => v.as_tensor().detach(),
                    None => p.tensor.clone(),
                };
                (p.name.clone(), t)
            })
            .collect()
    }

    /// Writes a checkpoint (the whole model) to the output directory, atomically.
    pub fn save(&mut self) -> Result<()> {
        if self.last_save_step == Some(self.step) && !self.finished {
            return Ok(());
        }
        let started = Instant::now();
        let mut e = self.event("checkpoint");
        e.detail = Some(json!({"path": self.output.display().to_string(), "final": self.finished}));
        // The record includes this checkpoint's own row.
        let mut log = self.log.clone();
        if let Ok(v) = serde_json::to_value(&e) {
            log.push(v);
        }
        let record = json!({
            "archaeclip_version": env!("CARGO_PKG_VERSION"),
            "base_model": self.base_root.display().to_string(),
            "statement": self.statement,
            "options": self.options,
            "fingerprint": self.options.fingerprint(),
            "rows": self.rows,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "state": {
                "step": self.step, "epoch": self.epoch, "micro_done": self.micro_done,
                "examples": self.examples, "skipped": self.skipped, "elapsed_s": self.elapsed(),
                "finished": self.finished,
            },
            "last_eval": self.last_eval,
            "log": log,
        });
        let weights = self.weights();
        let optimizer =
            (self.options.save_optimizer || !self.finished).then(|| self.optimizer.state());
        export::write(
            &self.output,
            &Base {
                model_dir: &self.base_model_dir,
                preprocess: &self.preprocess,
                max_len: self.config.text.max_position_embeddings,
            },
            &Checkpoint {
                weights: &weights,
                optimizer,
                record: &record,
            },
        )?;
        self.last_save_step = Some(self.step);
        if let Some(Value::Object(d)) = &mut e.detail {
            d.insert("seconds".into(), started.elapsed().as_secs_f64().into());
        }
        self.emit(e);
        Ok(())
    }

    /// Saves a checkpoint after an interruption (between steps), so the run can resume.
    pub fn save_after_interrupt(&mut self) -> Result<()> {
        self.pending = None;
        if self.last_save_step == Some(self.step) {
            return Ok(());
        }
        self.save()
    }

    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Whether steps were taken since the last checkpoint (a stopped run should save).
    pub fn needs_save(&self) -> bool {
        !self.finished && self.last_save_step != Some(self.step) && self.step > 0
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The `name` option (what to register the output as).
    pub fn options_name(&self) -> Option<String> {
        self.options.name.clone()
    }
}

/// Unit image features, token ids, and the rows skipped.
pub type Embedded = (Vec<Vec<f32>>, Vec<Vec<u32>>, Vec<Skipped>);

/// Embeds every pair of a stream: image features (unit rows) and token ids, in batches, the
/// next batch decoding while the current one computes; rows that fail are returned as skipped.
pub fn embed_stream(
    model: &ClipModel,
    preparer: &Arc<Preparer>,
    source: &mut dyn PairSource,
    stream: Stream,
    batch_size: usize,
) -> Result<Embedded> {
    let read = |source: &mut dyn PairSource| super::data::take(batch_size, || source.next(stream));
    let (mut features, mut ids, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    let first = read(source)?;
    let mut pending = (!first.is_empty()).then(|| preparer.spawn(first));
    while let Some(p) = pending.take() {
        let batch = p.wait()?;
        let next = read(source)?;
        if !next.is_empty() {
            pending = Some(preparer.spawn(next));
        }
        skipped.extend(batch.skipped);
        if batch.pairs.is_empty() {
            continue;
        }
        let size = preparer.preprocess.crop_size;
        let n = batch.pairs.len();
        let flat: Vec<f32> = batch
            .pairs
            .iter()
            .flat_map(|p| p.pixels.iter().copied())
            .collect();
        let rows = Tensor::from_vec(flat, (n, 3, size, size), &Device::Cpu)
            .and_then(|t| {
                unit_rows(&model.image_embeds(&t)?)?
                    .detach()
                    .to_vec2::<f32>()
            })
            .map_err(fail)?;
        features.extend(rows);
        ids.extend(batch.pairs.into_iter().map(|p| p.ids));
        if source.interrupted() {
            return Err(Error::Interrupted);
        }
    }
    Ok((features, ids, skipped))
}

/// Unit text features for token ids, in batches.
pub fn embed_texts(
    model: &ClipModel,
    ids: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(batch_size) {
        let rows = model
            .text_embeds(chunk)
            .and_then(|t| unit_rows(&t)?.detach().to_vec2::<f32>())
            .map_err(fail)?;
        out.extend(rows);
    }
    Ok(out)
}

/// The CLIP loss averaged over consecutive batches of unit features (batches of one pair are
/// left out: they have no negatives). `None` when there is no batch of two.
pub fn batched_loss(
    images: &[Vec<f32>],
    texts: &[Vec<f32>],
    batch_size: usize,
    scale: f64,
) -> Result<Option<f64>> {
    let mut losses = Vec::new();
    for (img, txt) in images.chunks(batch_size).zip(texts.chunks(batch_size)) {
        let n = img.len();
        if n < 2 {
            continue;
        }
        let logits: Vec<Vec<f64>> = txt
            .iter()
            .map(|t| {
                img.iter()
                    .map(|i| scale * t.iter().zip(i).map(|(a, b)| f64::from(a * b)).sum::<f64>())
                    .collect()
            })
            .collect();
        let ce = |row: &dyn Fn(usize) -> Vec<f64>| -> f64 {
            (0..n)
                .map(|k| {
                    let r = row(k);
                    let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + r.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                    lse - r[k]
                })
                .sum::<f64>()
                / n as f64
        };
        let per_text = ce(&|k| logits[k].clone());
        let per_image = ce(&|k| logits.iter().map(|r| r[k]).collect());
        losses.push((per_text + per_image) / 2.0);
    }
    Ok((!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64))
}
