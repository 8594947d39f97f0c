//! Model directories as users have them: a HuggingFace root (`config.json` with
//! `model.safetensors`, sharded safetensors with an index, or `pytorch_model.bin`), a
//! sentence-transformers directory (`modules.json` pointing at `0_CLIPModel/`, or files at the
//! root), and weights-only fine-tunes (config + weights, no tokenizer or preprocessor files; the
//! standard CLIP tokenizer and preprocessing are used, and `clip_model_info` says so).
//!
//! `pytorch_model.bin` is read by candle's pickle reader, which interprets the pickle opcodes
//! into data and never imports or calls anything: a malicious pickle cannot run code.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::Value;

use super::config::ClipConfig;
use super::matmul::Precision;
use super::model::ClipModel;
use super::preprocess::PreprocessConfig;
use super::tokenizer::ClipTokenizer;
use crate::error::{Error, Result};

/// A loaded model with everything needed to embed text and images.
pub struct LoadedModel {
    /// The directory the user named (canonical).
    pub root: PathBuf,
    /// The directory holding config.json (the root, or e.g. `0_CLIPModel/`).
    pub model_dir: PathBuf,
    pub layout: &'static str,
    pub config: ClipConfig,
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub preprocess: PreprocessConfig,
    /// Files read, relative to the root.
    pub files: Vec<String>,
    /// What was missing and replaced by a standard default.
    pub fallbacks: Vec<String>,
    pub parameters: usize,
    /// The arithmetic of the encoders' products.
    pub precision: Precision,
}

/// A model directory whose files are parsed and whose weights are open, before the model is
/// built (inference builds it with fused kernels, training with differentiable ones).
pub struct Opened {
    pub root: PathBuf,
    pub model_dir: PathBuf,
    pub layout: &'static str,
    pub config: ClipConfig,
    /// The weights, by HF name, converted to float32 on the CPU as they are read.
    pub weights: Box<dyn SimpleBackend>,
    pub tokenizer: ClipTokenizer,
    pub preprocess: PreprocessConfig,
    pub files: Vec<String>,
    pub fallbacks: Vec<String>,
    pub parameters: usize,
}

impl Opened {
    /// Builds the model from the weights (`differentiable` for training).
    pub fn build(self, differentiable: bool) -> Result<(ClipModel, Opened)> {
        self.build_in(differentiable, Precision::F32)
    }

    /// [`Opened::build`] with the inference products at `precision`.
    pub fn build_in(
        self,
        differentiable: bool,
        precision: Precision,
    ) -> Result<(ClipModel, Opened)> {
        let vb = VarBuilder::from_backend(
            Box::new(Forward(&*self.weights)) as Box<dyn SimpleBackend + '_>,
            DType::F32,
            Device::Cpu,
        );
        let model =
            ClipModel::build_in(vb, &self.config, differentiable, precision).map_err(|e| {
                model_error(
                    &self.model_dir,
                    format!(
                        "the weights do not match config.json: {}",
                        super::candle_message(&e)
                    ),
                )
            })?;
        Ok((model, self))
    }
}

/// Lends a backend to a VarBuilder without giving it away.
pub struct Forward<'a>(pub &'a dyn SimpleBackend);

impl SimpleBackend for Forward<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

enum Weights {
    Safetensors(Vec<PathBuf>),
    Pth(PathBuf),
    Made,
}

fn model_error(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::Model(format!("{}: {what}", dir.display()))
}

/// Finds the directory that holds the HF model inside `root`.
fn resolve_layout(root: &Path) -> Result<(PathBuf, &'static str)> {
    let modules = root.join("modules.json");
    if !modules.is_file() {
        return Ok((root.to_path_buf(), "huggingface"));
    }
    let text = std::fs::read_to_string(&modules)
        .map_err(|e| model_error(root, format!("modules.json: {e}")))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| model_error(root, format!("modules.json: invalid JSON: {e}")))?;
    let entries = json
        .as_array()
        .ok_or_else(|| model_error(root, "modules.json: expected a list of modules"))?;
    let clip = entries.iter().find(|m| {
        m.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.ends_with("models.CLIPModel"))
    });
    let Some(clip) = clip else {
        return Err(model_error(
            root,
            "modules.json: no sentence_transformers.models.CLIPModel module: not a CLIP model",
        ));
    };
    let sub = clip.get("path").and_then(Value::as_str).unwrap_or("");
    if sub.contains("..") || Path::new(sub).is_absolute() {
        return Err(model_error(
            root,
            format!("modules.json: module path '{sub}' leaves the model directory"),
        ));
    }
    Ok((root.join(sub), "sentence-transformers"))
}

fn find_weights(dir: &Path) -> Result<Weights> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(Weights::Safetensors(vec![single]));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| model_error(dir, format!("model.safetensors.index.json: {e}")))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            model_error(
                dir,
                format!("model.safetensors.index.json: invalid JSON: {e}"),
            )
        })?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| model_error(dir, "model.safetensors.index.json: no weight_map"))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        shards.sort();
        shards.dedup();
        let mut paths = Vec::new();
        for shard in shards {
            if shard.contains('/') || shard.contains("..") {
                return Err(model_error(
                    dir,
                    format!("model.safetensors.index.json: shard '{shard}' is not a file name"),
                ));
            }
            let p = dir.join(&shard);
            if !p.is_file() {
                return Err(model_error(
                    dir,
                    format!("missing shard {shard} named by model.safetensors.index.json"),
                ));
            }
            paths.push(p);
        }
        return Ok(Weights::Safetensors(paths));
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok(Weights::Pth(bin));
    }
    Err(model_error(
        dir,
        "no weights: expected model.safetensors, model.safetensors.index.json (shards) or pytorch_model.bin",
    ))
}

/// Reads the tensor index of a `pytorch_model.bin` (candle's pickle reader interprets the
/// opcodes as data and calls nothing) and checks it before any tensor is read: every tensor
/// must fit in the file, so a pickle that claims a huge shape is refused instead of making the
/// reader allocate it. Returns the tensors and their parameter count.
fn open_pth(p: &Path) -> std::result::Result<(candle_core::pickle::PthTensors, usize), String> {
    // The reader indexes argument tuples without checking their length: a malformed pickle
    // panics in it, which becomes an error here rather than a caught "internal error".
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        candle_core::pickle::PthTensors::new(p, None)
    }));
    let pth = match opened {
        Ok(Ok(pth)) => pth,
        Ok(Err(e)) => {
            return Err(format!(
                "cannot read pytorch_model.bin: {}",
                super::candle_message(&e)
            ))
        }
        Err(_) => {
            return Err(
                "cannot read pytorch_model.bin: malformed pickle (a tensor record has the wrong arguments)"
                    .into(),
            )
        }
    };
    if pth.tensor_infos().is_empty() {
        return Err(
            "pytorch_model.bin holds no tensors: not a PyTorch state dict (nothing in it was run)"
                .into(),
        );
    }
    let file_len = std::fs::metadata(p)
        .map_err(|e| format!("pytorch_model.bin: {e}"))?
        .len();
    let mut parameters = 0usize;
    for (name, info) in pth.tensor_infos() {
        let dims = info.layout.dims();
        let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let end = elements
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes()))
            .and_then(|b| b.checked_add(info.layout.start_offset()));
        match (elements, end) {
            (Some(n), Some(end)) if end as u64 <= file_len => parameters += n,
            _ => {
                return Err(format!(
                    "pytorch_model.bin: tensor '{name}' claims shape {dims:?}, more data than the file's {file_len} bytes hold"
                ))
            }
        }
    }
    Ok((pth, parameters))
}

fn relative(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Loads a model directory (any supported layout) for inference.
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_in(path, Precision::F32)
}

/// [`load`] with the products at `precision`.
pub fn load_in(path: &Path, precision: Precision) -> Result<LoadedModel> {
    let (model, o) = open(path)?.build_in(false, precision)?;
    Ok(LoadedModel {
        root: o.root,
        model_dir: o.model_dir,
        layout: o.layout,
        config: o.config,
        model,
        tokenizer: o.tokenizer,
        preprocess: o.preprocess,
        files: o.files,
        fallbacks: o.fallbacks,
        parameters: o.parameters,
        precision,
    })
}

/// Reads a model directory (any supported layout): config, tokenizer, preprocessing, and the
/// weights opened (memory-mapped safetensors, or the pickle's tensor index).
pub fn open(path: &Path) -> Result<Opened> {
    open_with(path, None)
}

/// Makes the weights of a model from its config instead of reading them (random initial
/// weights for training from scratch).
pub type WeightsFromConfig<'a> = &'a dyn Fn(&ClipConfig) -> Box<dyn SimpleBackend>;

/// [`open`], or with `make_weights`, a directory that needs only `config.json`.
pub fn open_with(path: &Path, make_weights: Option<WeightsFromConfig>) -> Result<Opened> {
    let root = path
        .canonicalize()
        .map_err(|e| model_error(path, format!("cannot open the model directory: {e}")))?;
    if !root.is_dir() {
        return Err(model_error(
            &root,
            "not a directory (a model is a directory with config.json and weights)",
        ));
    }
    let (model_dir, layout) = resolve_layout(&root)?;
    let config_path = model_dir.join("config.json");
    let mut missing = Vec::new();
    if !config_path.is_file() {
        missing.push("config.json");
    }
    let weights = match make_weights {
        Some(_) => Ok(Weights::Made),
        None => find_weights(&model_dir),
    };
    if weights.is_err() {
        missing.push("model.safetensors (or model.safetensors.index.json, or pytorch_model.bin)");
    }
    if !missing.is_empty() {
        return Err(model_error(
            &model_dir,
            format!(
                "not a CLIP model directory: missing {}",
                missing.join(" and ")
            ),
        ));
    }
    let weights = weights?;
    let config_text = std::fs::read_to_string(&config_path)
        .map_err(|e| model_error(&model_dir, format!("config.json: {e}")))?;
    let config = ClipConfig::parse(&config_text, &relative(&root, &config_path))?;

    let mut files = vec![relative(&root, &config_path)];
    let mut fallbacks = Vec::new();
    let (backend, parameters): (Box<dyn SimpleBackend>, usize) = match &weights {
        Weights::Safetensors(paths) => {
            // SAFETY: the files are memory-mapped read-only; candle copies each tensor out.
            // A file changed on disk while loading is the caller's problem, as with any mmap.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }.map_err(
                |e| {
                    model_error(
                        &model_dir,
                        format!(
                            "cannot read the safetensors weights: {}",
                            super::candle_message(&e)
                        ),
                    )
                },
            )?;
            let parameters = st
                .tensors()
                .iter()
                .map(|(_, t)| t.shape().iter().product::<usize>())
                .sum();
            files.extend(paths.iter().map(|p| relative(&root, p)));
            (Box::new(st), parameters)
        }
        Weights::Made => {
            let make = make_weights.expect("Made only with a maker");
            fallbacks.push("no weights read: initial weights made from config.json".to_owned());
            (make(&config), 0)
        }
        Weights::Pth(p) => {
            let (pth, parameters) = open_pth(p).map_err(|e| model_error(&model_dir, e))?;
            files.push(relative(&root, p));
            (Box::new(pth), parameters)
        }
    };

    let max_len = config.text.max_position_embeddings;
    let tokenizer = match ClipTokenizer::from_dir(&model_dir, max_len)? {
        Some(t) => {
            files.push(format!(
                "{} ({})",
                relative(&root, &model_dir.join("")),
                t.source().describe()
            ));
            t
        }
        None => {
            fallbacks.push("no tokenizer files: using the standard CLIP tokenizer".to_owned());
            ClipTokenizer::bundled(max_len)?
        }
    };
    if tokenizer.vocab_size() > config.text.vocab_size {
        return Err(model_error(
            &model_dir,
            format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                config.text.vocab_size
            ),
        ));
    }
    if tokenizer.max_id() as usize >= config.text.vocab_size {
        return Err(model_error(
            &model_dir,
            format!(
                "the tokenizer has a token with id {} but the model's vocab_size is {} (ids must be below it)",
                tokenizer.max_id(),
                config.text.vocab_size
            ),
        ));
    }
    let pre_path = model_dir.join("preprocessor_config.json");
    let preprocess = if pre_path.is_file() {
        let text = std::fs::read_to_string(&pre_path)
            .map_err(|e| model_error(&model_dir, format!("preprocessor_config.json: {e}")))?;
        files.push(relative(&root, &pre_path));
        PreprocessConfig::parse(&text, &relative(&root, &pre_path))?
    } else {
        fallbacks.push(format!(
            "no preprocessor_config.json: using the standard CLIP preprocessing at {} px",
            config.vision.image_size
        ));
        PreprocessConfig::standard(config.vision.image_size)
    };
    if preprocess.crop_size != config.vision.image_size {
        return Err(model_error(
            &model_dir,
            format!(
                "preprocessor_config.json crops to {} px but the model's image_size is {}",
                preprocess.crop_size, config.vision.image_size
            ),
        ));
    }
    Ok(Opened {
        root,
        model_dir,
        layout,
        config,
        weights: backend,
        tokenizer,
        preprocess,
        files,
        fallbacks,
        parameters,
    })
}
