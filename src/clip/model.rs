//! The CLIP model (candle), mirroring transformers' `CLIPModel` module by module and weight name
//! by weight name (`text_model.encoder.layers.0.self_attn.q_proj`, `vision_model.pre_layrnorm`
//! with its misspelling, ...), so any HuggingFace CLIP checkpoint loads as it is.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};

use super::config::{Activation, ClipConfig, TowerConfig};

fn activate(act: Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluTanh => xs.gelu(),
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
        let weights = candle_nn::ops::softmax_last_dim(&weights)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        self.out_proj.forward(&out)
    }
}

struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &TowerConfig) -> Result<EncoderLayer> {
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        Ok(EncoderLayer {
            self_attn: Attention::new(vb.pp("self_attn"), c)?,
            layer_norm1: layer_norm(h, eps, vb.pp("layer_norm1"))?,
            fc1: linear(h, i, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(i, h, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: layer_norm(h, eps, vb.pp("layer_norm2"))?,
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
    final_layer_norm: LayerNorm,
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
            final_layer_norm: layer_norm(h, t.tower.layer_norm_eps, vb.pp("final_layer_norm"))?,
            eos_token_id: t.eos_token_id,
        })
    }

    /// transformers' pooling: the first end-of-text token (or, for legacy configs whose
    /// eos_token_id is 2, the largest id).
    fn pool_index(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max).unwrap_or(0)
        } else {
            ids.iter()
                .position(|&i| i == self.eos_token_id)
                .unwrap_or(0)
        }
    }

    /// Pooled output (1, hidden) for one unpadded sequence of ids.
    fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let s = ids.len();
        let ids_t = Tensor::new(ids, device)?;
        let xs = self
            .token_embedding
            .index_select(&ids_t, 0)?
            .add(&self.position_embedding.narrow(0, 0, s)?)?
            .unsqueeze(0)?;
        let mask = causal_mask(s, device)?;
        let xs = self.encoder.forward(&xs, Some(&mask))?;
        let xs = self.final_layer_norm.forward(&xs)?;
        xs.i((.., self.pool_index(ids), ..))
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
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
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
            pre_layrnorm: layer_norm(h, eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(vb.pp("encoder"), &v.tower)?,
            post_layernorm: layer_norm(h, eps, vb.pp("post_layernorm"))?,
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

/// A whole CLIP model: both towers and their projections into the shared space.
pub struct ClipModel {
    text_model: TextTransformer,
    vision_model: VisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    logit_scale: Option<f32>,
    device: Device,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> Result<ClipModel> {
        let logit_scale = if vb.contains_tensor("logit_scale") {
            Some(
                vb.get((), "logit_scale")?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?,
            )
        } else {
            None
        };
        Ok(ClipModel {
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
            logit_scale,
            device: vb.device().clone(),
        })
    }

    /// transformers' `get_text_features` for one sequence of ids (not normalized).
    pub fn text_features(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let pooled = self.text_model.forward(ids, &self.device)?;
        self.text_projection.forward(&pooled)?.squeeze(0)?.to_vec1()
    }

    /// transformers' `get_image_features` for a batch of preprocessed pixels (not normalized).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Vec<Vec<f32>>> {
        let pooled = self.vision_model.forward(pixels)?;
        self.visual_projection.forward(&pooled)?.to_vec2()
    }

    pub fn logit_scale(&self) -> Option<f32> {
        self.logit_scale
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
