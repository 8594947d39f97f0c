//! The CLIP model, mirroring transformers' `CLIPModel` module by module and weight name by weight
//! name (`text_model.encoder.layers.0.self_attn.q_proj`, `vision_model.pre_layrnorm` with its
//! misspelling, ...), so any HuggingFace CLIP checkpoint loads as it is.
//!
//! Built for inference, the towers are [`super::fast::FastClip`]: fused passes over plain
//! buffers. Built for training (`differentiable`), they are candle modules whose linear layers,
//! layer norms, activations and attention are the custom ops of [`super::train_ops`], each with
//! a hand-written backward pass on the inference path's kernels (candle's own fused layer norm
//! and softmax have no backward pass, and its composed ones and its matmul cost ~2x the time).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, ClipConfig, TowerConfig};
use super::fast::{pool_index, FastClip};
use super::matmul::Precision;
use super::train_ops::{activate, attention, layer_norm, linear, linear_activate};

/// transformers' `nn.Linear`: weight (out, in), optional bias.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(inputs: usize, outputs: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
        Ok(Linear {
            weight: vb.get((outputs, inputs), "weight")?,
            bias: if bias {
                Some(vb.get(outputs, "bias")?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        linear(xs, &self.weight, self.bias.as_ref())
    }
}

/// transformers' `nn.LayerNorm` (weight and bias).
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Norm> {
        Ok(Norm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// How a tower's rows form sequences: causal (the text tower) or not, and whether they are
/// (batch, seq) or, with `lengths`, a batch of one holding sequences of those lengths one
/// after the other ([`attention`]'s).
#[derive(Clone, Copy, Default)]
struct Sequences<'a> {
    causal: bool,
    lengths: Option<&'a [usize]>,
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, c: &TowerConfig) -> Result<Attention> {
        let h = c.hidden_size;
        let head_dim = h / c.num_attention_heads;
        Ok(Attention {
            q_proj: Linear::new(h, h, true, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, h, true, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, h, true, vb.pp("v_proj"))?,
            out_proj: Linear::new(h, h, true, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// q, k and v come from one product with the three weights stacked (their gradients
    /// flow back through the concatenation to each projection).
    fn forward(&self, xs: &Tensor, seqs: Sequences) -> Result<Tensor> {
        self.out_proj.forward(&self.attend(xs, seqs)?)
    }

    /// The heads' outputs before `out_proj`.
    fn attend(&self, xs: &Tensor, seqs: Sequences) -> Result<Tensor> {
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        let weight = Tensor::cat(&projections.map(|p| &p.weight), 0)?;
        let biases: Vec<&Tensor> = projections.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = Tensor::cat(&biases, 0)?;
        let qkv = linear(xs, &weight, Some(&bias))?;
        attention(&qkv, self.heads, seqs.causal, self.scale, seqs.lengths)
    }
}

struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: Norm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: Norm,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &TowerConfig) -> Result<EncoderLayer> {
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        Ok(EncoderLayer {
            self_attn: Attention::new(vb.pp("self_attn"), c)?,
            layer_norm1: Norm::new(h, eps, vb.pp("layer_norm1"))?,
            fc1: Linear::new(h, i, true, vb.pp("mlp").pp("fc1"))?,
            fc2: Linear::new(i, h, true, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: Norm::new(h, eps, vb.pp("layer_norm2"))?,
            act: c.activation,
        })
    }

    fn forward(&self, xs: &Tensor, seqs: Sequences) -> Result<Tensor> {
        let xs = (self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, seqs)?
            + xs)?;
        self.mlp(xs)
    }

    /// The layer's output at the rows `picked` of xs (batch, seq, hidden) seen as (batch x seq,
    /// hidden) rows, as (picked, hidden): the last layer of a tower, whose other rows pooling
    /// never reads. Keys and values still come from every row; `out_proj` and the MLP, about
    /// three quarters of a layer's products, run on the picked rows only (what the inference
    /// towers do).
    fn forward_picked(&self, xs: &Tensor, seqs: Sequences, picked: &Tensor) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let attended = self
            .self_attn
            .attend(&self.layer_norm1.forward(xs)?, seqs)?
            .reshape((b * s, h))?
            .index_select(picked, 0)?;
        let residual = xs.reshape((b * s, h))?.index_select(picked, 0)?;
        self.mlp((self.self_attn.out_proj.forward(&attended)? + residual)?)
    }

    /// `xs + fc2(act(fc1(layer_norm2(xs))))`.
    fn mlp(&self, xs: Tensor) -> Result<Tensor> {
        let hidden = self.layer_norm2.forward(&xs)?;
        let hidden = match &self.fc1.bias {
            Some(b) => linear_activate(&hidden, &self.fc1.weight, b, self.act)?,
            None => activate(self.act, &self.fc1.forward(&hidden)?)?,
        };
        let mlp = self.fc2.forward(&hidden)?;
        mlp + xs
    }
}

struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    fn new(vb: VarBuilder, c: &TowerConfig) -> Result<Encoder> {
        let vb = vb.pp("layers");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(i.to_string()), c))
            .collect::<Result<_>>()?;
        Ok(Encoder { layers })
    }

    /// The last layer's output at the rows `picked` of xs (batch, seq, hidden) seen as (batch x
    /// seq, hidden) rows: (picked, hidden).
    fn forward_picked(&self, xs: &Tensor, seqs: Sequences, picked: &Tensor) -> Result<Tensor> {
        let Some((last, layers)) = self.layers.split_last() else {
            let (b, s, h) = xs.dims3()?;
            return xs.reshape((b * s, h))?.index_select(picked, 0);
        };
        let mut xs = xs.clone();
        for layer in layers {
            xs = layer.forward(&xs, seqs)?;
        }
        last.forward_picked(&xs, seqs, picked)
    }
}

/// `text_model`: token + position embeddings, causal encoder, final layer norm, pooled at the
/// end-of-text token.
struct TextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: Norm,
    eos_token_id: u32,
}

impl TextTransformer {
    fn new(vb: VarBuilder, c: &ClipConfig) -> Result<TextTransformer> {
        let t = &c.text;
        let h = t.tower.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(TextTransformer {
            token_embedding: emb.pp("token_embedding").get((t.vocab_size, h), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((t.max_position_embeddings, h), "weight")?,
            encoder: Encoder::new(vb.pp("encoder"), &t.tower)?,
            final_layer_norm: Norm::new(h, t.tower.layer_norm_eps, vb.pp("final_layer_norm"))?,
            eos_token_id: t.eos_token_id,
        })
    }

    /// Pooled output (batch, hidden) for sequences of ids (each with its start and end of
    /// text). Each sequence is cut after its pooled token: under the causal mask the tokens
    /// after it never reach it. The cut sequences run one after the other as a batch of one,
    /// their attention kept apart by their lengths, so a batch of captions of mixed lengths
    /// computes no padding.
    fn forward(&self, batch: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        if batch.is_empty() || batch.iter().any(Vec::is_empty) {
            candle_core::bail!("no token ids to embed");
        }
        let lengths: Vec<usize> = batch
            .iter()
            .map(|ids| pool_index(self.eos_token_id, ids) + 1)
            .collect();
        let total: usize = lengths.iter().sum();
        let (mut ids, mut positions, mut pooled) = (
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(batch.len()),
        );
        for (seq, &len) in batch.iter().zip(&lengths) {
            ids.extend_from_slice(&seq[..len]);
            positions.extend(0..len as u32);
            pooled.push((ids.len() - 1) as u32);
        }
        let h = self.token_embedding.dim(1)?;
        let xs = (self
            .token_embedding
            .index_select(&Tensor::from_vec(ids, total, device)?, 0)?
            + self
                .position_embedding
                .index_select(&Tensor::from_vec(positions, total, device)?, 0)?)?
        .reshape((1, total, h))?;
        let pooled = Tensor::from_vec(pooled, batch.len(), device)?;
        // The final layer norm works row by row, so it runs on the pooled rows only.
        let seqs = Sequences {
            causal: true,
            lengths: Some(&lengths),
        };
        self.final_layer_norm
            .forward(&self.encoder.forward_picked(&xs, seqs, &pooled)?)
    }
}

/// `vision_model`: patch embedding (a strided convolution, done as patchify + matmul), class
/// token, positions, pre-layer-norm, encoder, and the class token's post-layer-norm.
struct VisionTransformer {
    class_embedding: Tensor,
    /// (hidden, channels * patch * patch)
    patch_weight: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: Norm,
    encoder: Encoder,
    post_layernorm: Norm,
    patch: usize,
    grid: usize,
}

impl VisionTransformer {
    fn new(vb: VarBuilder, c: &ClipConfig) -> Result<VisionTransformer> {
        let v = &c.vision;
        let (h, p, eps) = (v.tower.hidden_size, v.patch_size, v.tower.layer_norm_eps);
        let grid = c.grid();
        let emb = vb.pp("embeddings");
        let patch_weight = emb
            .pp("patch_embedding")
            .get((h, v.num_channels, p, p), "weight")?
            .reshape((h, v.num_channels * p * p))?;
        Ok(VisionTransformer {
            class_embedding: emb.get(h, "class_embedding")?,
            patch_weight,
            position_embedding: emb
                .pp("position_embedding")
                .get((grid * grid + 1, h), "weight")?,
            pre_layrnorm: Norm::new(h, eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(vb.pp("encoder"), &v.tower)?,
            post_layernorm: Norm::new(h, eps, vb.pp("post_layernorm"))?,
            patch: p,
            grid,
        })
    }

    /// Pooled output (batch, hidden) for pixels (batch, 3, size, size).
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = pixels.dims4()?;
        let (g, p) = (self.grid, self.patch);
        let patches = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, c * p * p))?;
        let patches = linear(&patches, &self.patch_weight, None)?;
        let h = self.class_embedding.dim(0)?;
        let class = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let s = xs.dim(1)?;
        let class_rows: Vec<u32> = (0..b).map(|i| (i * s) as u32).collect();
        let class_rows = Tensor::from_vec(class_rows, b, xs.device())?;
        self.post_layernorm.forward(&self.encoder.forward_picked(
            &xs,
            Sequences::default(),
            &class_rows,
        )?)
    }
}

/// The differentiable towers (candle modules on the ops of `train_ops`, for training).
struct CandleTowers {
    text_model: TextTransformer,
    vision_model: VisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
}

enum Towers {
    Candle(Box<CandleTowers>),
    Fast(Box<FastClip>),
}

/// A whole CLIP model: both towers and their projections into the shared space.
pub struct ClipModel {
    towers: Towers,
    /// The learned temperature (log scale), when the checkpoint has one.
    logit_scale: Option<Tensor>,
    device: Device,
}

impl ClipModel {
    /// A model for inference (fused passes, [`FastClip`]).
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> Result<ClipModel> {
        ClipModel::build(vb, c, false)
    }

    /// `differentiable`: candle modules whose every op has a backward pass (for training, CPU);
    /// otherwise the fused inference towers.
    pub fn build(vb: VarBuilder, c: &ClipConfig, differentiable: bool) -> Result<ClipModel> {
        ClipModel::build_in(vb, c, differentiable, Precision::F32)
    }

    /// [`ClipModel::build`], the fused towers' products at `precision`.
    pub fn build_in(
        vb: VarBuilder,
        c: &ClipConfig,
        differentiable: bool,
        precision: Precision,
    ) -> Result<ClipModel> {
        let logit_scale = if vb.contains_tensor("logit_scale") {
            Some(vb.get((), "logit_scale")?)
        } else {
            None
        };
        let towers = if differentiable || !vb.device().is_cpu() {
            Towers::Candle(Box::new(CandleTowers {
                text_model: TextTransformer::new(vb.pp("text_model"), c)?,
                vision_model: VisionTransformer::new(vb.pp("vision_model"), c)?,
                text_projection: Linear::new(
                    c.text.tower.hidden_size,
                    c.projection_dim,
                    false,
                    vb.pp("text_projection"),
                )?,
                visual_projection: Linear::new(
                    c.vision.tower.hidden_size,
                    c.projection_dim,
                    false,
                    vb.pp("visual_projection"),
                )?,
            }))
        } else {
            Towers::Fast(Box::new(FastClip::load(vb.clone(), c, precision)?))
        };
        Ok(ClipModel {
            towers,
            logit_scale,
            device: vb.device().clone(),
        })
    }

    /// transformers' `get_text_features` for a batch of token id sequences: (batch, dims),
    /// not normalized.
    pub fn text_embeds(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        match &self.towers {
            Towers::Candle(t) => {
                let pooled = t.text_model.forward(ids, &self.device)?;
                t.text_projection.forward(&pooled)
            }
            Towers::Fast(f) => {
                let rows = f.text_features(ids)?;
                Tensor::from_vec(rows, (ids.len(), f.dims()), &self.device)
            }
        }
    }

    /// transformers' `get_image_features` for preprocessed pixels (batch, 3, size, size):
    /// (batch, dims), not normalized.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        match &self.towers {
            Towers::Candle(t) => {
                let pooled = t.vision_model.forward(pixels)?;
                t.visual_projection.forward(&pooled)
            }
            Towers::Fast(f) => {
                let batch = pixels.dim(0)?;
                let flat = pixels.flatten_all()?.to_vec1::<f32>()?;
                let rows = f.image_features(&flat, batch)?;
                Tensor::from_vec(rows, (batch, f.dims()), &self.device)
            }
        }
    }

    /// `text_embeds` for one sequence of ids, as a vector.
    pub fn text_features(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.text_embeds(&[ids.to_vec()])?.squeeze(0)?.to_vec1()
    }

    /// `image_embeds` as vectors.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Vec<Vec<f32>>> {
        self.image_embeds(pixels)?.to_vec2()
    }

    /// The learned temperature (log scale) as stored, if the checkpoint has one.
    pub fn logit_scale_tensor(&self) -> Option<&Tensor> {
        self.logit_scale.as_ref()
    }

    pub fn logit_scale(&self) -> Option<f32> {
        self.logit_scale
            .as_ref()
            .and_then(|t| t.to_dtype(DType::F32).ok()?.to_scalar::<f32>().ok())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// L2-normalizes in place (the outputs of the SQL functions are unit vectors).
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}
