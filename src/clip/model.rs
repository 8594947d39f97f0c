//! The CLIP model, mirroring transformers' `CLIPModel` module by module and weight name by weight
//! name (`text_model.encoder.layers.0.self_attn.q_proj`, `vision_model.pre_layrnorm` with its
//! misspelling, ...), so any HuggingFace CLIP checkpoint loads as it is.
//!
//! Built for inference, the towers are [`super::fast::FastClip`]: fused passes over plain
//! buffers. Built for training (`differentiable`), they are candle modules whose layer norm and
//! softmax are composed of elementary ops: candle's fused layer norm and softmax have no
//! backward pass, so gradients would silently stop at every layer norm.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{linear, linear_no_bias, Linear, VarBuilder};

use super::config::{Activation, ClipConfig, TowerConfig};
use super::fast::{pool_index, FastClip};
use super::matmul::Precision;

fn activate(act: Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluTanh => xs.gelu(),
    }
}

/// transformers' `nn.LayerNorm` (weight and bias), composed of differentiable ops.
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
        let size = xs.dim(D::Minus1)? as f64;
        let centred = xs.broadcast_sub(&(xs.sum_keepdim(D::Minus1)? / size)?)?;
        let variance = (centred.sqr()?.sum_keepdim(D::Minus1)? / size)?;
        centred
            .broadcast_div(&(variance + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, c: &TowerConfig) -> Result<Attention> {
        let h = c.hidden_size;
        let head_dim = h / c.num_attention_heads;
        Ok(Attention {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// (batch, seq, hidden) -> (batch, heads, seq, head_dim)
    fn split(&self, xs: &Tensor, b: usize, s: usize) -> Result<Tensor> {
        xs.reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let q = self.split(&(self.q_proj.forward(xs)? * self.scale)?, b, s)?;
        let k = self.split(&self.k_proj.forward(xs)?, b, s)?;
        let v = self.split(&self.v_proj.forward(xs)?, b, s)?;
        let mut weights = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            weights = weights.broadcast_add(mask)?;
        }
        let weights = candle_nn::ops::softmax(&weights, D::Minus1)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        self.out_proj.forward(&out)
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
            fc1: linear(h, i, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(i, h, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: Norm::new(h, eps, vb.pp("layer_norm2"))?,
            act: c.activation,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?
            + xs)?;
        let mlp = self.fc2.forward(&activate(
            self.act,
            &self.fc1.forward(&self.layer_norm2.forward(&xs)?)?,
        )?)?;
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

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, mask)?;
        }
        Ok(xs)
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
    /// text). Shorter sequences are padded to the longest after their end of text, which the
    /// causal mask makes irrelevant to the pooled token.
    fn forward(&self, batch: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let (b, s) = (batch.len(), batch.iter().map(Vec::len).max().unwrap_or(0));
        if b == 0 || s == 0 {
            candle_core::bail!("no token ids to embed");
        }
        let mut padded = Vec::with_capacity(b * s);
        let mut pooled = Vec::with_capacity(b);
        for (row, ids) in batch.iter().enumerate() {
            padded.extend_from_slice(ids);
            padded.resize((row + 1) * s, 0);
            pooled.push((row * s + pool_index(self.eos_token_id, ids)) as u32);
        }
        let h = self.token_embedding.dim(1)?;
        let xs = self
            .token_embedding
            .index_select(&Tensor::from_vec(padded, b * s, device)?, 0)?
            .reshape((b, s, h))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        let mask = causal_mask(s, device)?;
        let xs = self.encoder.forward(&xs, Some(&mask))?;
        let xs = self.final_layer_norm.forward(&xs)?;
        xs.reshape((b * s, h))?
            .index_select(&Tensor::from_vec(pooled, b, device)?, 0)
    }
}

fn causal_mask(s: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_slice(&mask, (s, s), device)
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
        let patches = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let h = self.class_embedding.dim(0)?;
        let class = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let xs = self.encoder.forward(&xs, None)?;
        self.post_layernorm.forward(&xs.i((.., 0, ..))?)
    }
}

/// The differentiable towers (candle modules, for training).
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

    /// `differentiable`: candle modules whose every op has a backward pass (for training);
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
                text_projection: linear_no_bias(
                    c.text.tower.hidden_size,
                    c.projection_dim,
                    vb.pp("text_projection"),
                )?,
                visual_projection: linear_no_bias(
                    c.vision.tower.hidden_size,
                    c.projection_dim,
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
