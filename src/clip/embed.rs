//! Embedding with a loaded model: text and images in, L2-normalized vectors in the shared space
//! out (so cosine similarity is a dot product).

use candle_core::Tensor;

use super::load::LoadedModel;
use super::model::normalize;
use super::preprocess;
use crate::error::{Error, Result};

fn model_error(e: candle_core::Error) -> Error {
    Error::Model(format!("the model failed: {}", super::candle_message(&e)))
}

impl LoadedModel {
    /// Token ids as the model sees them (start and end of text, truncated to the model's
    /// maximum length with the end kept).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text)
    }

    /// A unit vector for a text.
    pub fn embed_text(&self, text: &str) -> Result<Vec<f32>> {
        let ids = self.tokenize(text)?;
        let mut v = self.model.text_features(&ids).map_err(model_error)?;
        normalize(&mut v);
        Ok(v)
    }

    /// Preprocessed pixels (3 x size x size) for encoded image bytes.
    pub fn pixels(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        preprocess::pixels_from_bytes(bytes, &self.preprocess)
    }

    /// Unit vectors for a batch of preprocessed images.
    pub fn embed_pixels(&self, pixels: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if pixels.is_empty() {
            return Ok(Vec::new());
        }
        let size = self.preprocess.crop_size;
        let flat: Vec<f32> = pixels.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (pixels.len(), 3, size, size), self.model.device())
            .map_err(model_error)?;
        let mut out = self.model.image_features(&t).map_err(model_error)?;
        for v in &mut out {
            normalize(v);
        }
        Ok(out)
    }

    /// A unit vector for encoded image bytes.
    pub fn embed_image(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        let pixels = self.pixels(bytes)?;
        Ok(self.embed_pixels(&[pixels])?.remove(0))
    }

    /// Dimensions of the embeddings.
    pub fn dims(&self) -> usize {
        self.config.projection_dim
    }

    /// `clip_model_info()`'s JSON.
    pub fn info(&self, name: &str) -> serde_json::Value {
        let c = &self.config;
        let tower = |t: &super::config::TowerConfig| {
            serde_json::json!({
                "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                "layers": t.num_hidden_layers, "heads": t.num_attention_heads,
                "hidden_act": t.activation.name(), "layer_norm_eps": t.layer_norm_eps,
            })
        };
        serde_json::json!({
            "name": name,
            "path": self.root.display().to_string(),
            "layout": self.layout,
            "architecture": "CLIPModel",
            "dimensions": c.projection_dim,
            "image_size": c.vision.image_size,
            "patch_size": c.vision.patch_size,
            "text": {
                "max_positions": c.text.max_position_embeddings, "vocab_size": c.text.vocab_size,
                "eos_token_id": c.text.eos_token_id, "tower": tower(&c.text.tower),
            },
            "vision": tower(&c.vision.tower),
            "parameters": self.parameters,
            "logit_scale": self.model.logit_scale(),
            "files": self.files,
            "tokenizer": self.tokenizer.source().describe(),
            "preprocessing": {
                "shortest_edge": self.preprocess.shortest_edge, "crop_size": self.preprocess.crop_size,
                "mean": self.preprocess.mean, "std": self.preprocess.std, "resample": "bicubic",
            },
            "fallbacks": self.fallbacks,
            "precision": self.precision.name(),
            "matmul_kernel": self.precision.kernel_name(),
            "normalized": true,
        })
    }
}
