//! Which parameters train, and the model built so that exactly those are candle `Var`s.
//!
//! The weights are read through [`Recording`], a VarBuilder backend that turns each trainable
//! tensor into a `Var` (gradients flow to it) and hands out every other one as a constant, and
//! that records every tensor the model asks for under its HuggingFace name: that list is what
//! a checkpoint writes, so the output has exactly the base model's keys.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

use super::options::{Freeze, TrainOptions};
use crate::clip::config::ClipConfig;

/// A parameter of the model under training.
#[derive(Clone)]
pub struct Param {
    pub name: String,
    /// The tensor the model computes with (a `Var`'s tensor when trainable).
    pub tensor: Tensor,
    pub var: Option<Var>,
}

impl Param {
    pub fn trainable(&self) -> bool {
        self.var.is_some()
    }

    /// open_clip's rule: no weight decay on gains, biases, embeddings of rank < 2 (the class
    /// token) and the temperature.
    pub fn decays(&self) -> bool {
        self.tensor.rank() >= 2
    }
}

/// The rule deciding which names train.
#[derive(Debug, Clone)]
pub struct TrainableRule {
    freeze: Freeze,
    last_layers: Option<usize>,
    text_layers: usize,
    vision_layers: usize,
}

impl TrainableRule {
    pub fn new(options: &TrainOptions, config: &ClipConfig) -> TrainableRule {
        TrainableRule {
            freeze: options.freeze,
            last_layers: options.train_last_layers,
            text_layers: config.text.tower.num_hidden_layers,
            vision_layers: config.vision.tower.num_hidden_layers,
        }
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        let vision = name.starts_with("vision_model.") || name.starts_with("visual_projection.");
        let text = name.starts_with("text_model.") || name.starts_with("text_projection.");
        match self.freeze {
            Freeze::Vision if vision => return false,
            Freeze::Text if text => return false,
            _ => {}
        }
        let Some(last) = self.last_layers else {
            return true;
        };
        // Only the last `last` encoder layers, the final norms, the projections and the
        // temperature train.
        let (prefix, layers) = if name.starts_with("text_model.") {
            ("text_model.encoder.layers.", self.text_layers)
        } else if name.starts_with("vision_model.") {
            ("vision_model.encoder.layers.", self.vision_layers)
        } else {
            return true; // projections, logit_scale
        };
        if let Some(rest) = name.strip_prefix(prefix) {
            let index: usize = rest
                .split('.')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            return index + last >= layers;
        }
        name.starts_with("text_model.final_layer_norm.")
            || name.starts_with("vision_model.post_layernorm.")
    }

    /// Whether the whole image side (tower and projection) is fixed, so image features can
    /// be computed once.
    pub fn vision_frozen(&self) -> bool {
        self.freeze == Freeze::Vision
    }
}

/// A backend that makes trainable tensors `Var`s and records every tensor handed out.
pub struct Recording<'a> {
    inner: &'a dyn SimpleBackend,
    rule: TrainableRule,
    /// Values that replace the base weights (a checkpoint being resumed).
    overrides: Option<&'a dyn SimpleBackend>,
    params: Arc<Mutex<Vec<Param>>>,
}

impl<'a> Recording<'a> {
    pub fn new(
        inner: &'a dyn SimpleBackend,
        overrides: Option<&'a dyn SimpleBackend>,
        rule: TrainableRule,
    ) -> (Recording<'a>, Arc<Mutex<Vec<Param>>>) {
        let params = Arc::new(Mutex::new(Vec::new()));
        (
            Recording {
                inner,
                rule,
                overrides,
                params: params.clone(),
            },
            params,
        )
    }

    fn record(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        let (tensor, var) = if self.rule.is_trainable(name) {
            let var = Var::from_tensor(&t)?;
            (var.as_tensor().clone(), Some(var))
        } else {
            (t.detach(), None)
        };
        let mut params = self.params.lock().unwrap_or_else(|p| p.into_inner());
        if !params.iter().any(|p| p.name == name) {
            params.push(Param {
                name: name.to_owned(),
                tensor: tensor.clone(),
                var,
            });
        }
        Ok(tensor)
    }

    fn source(&self, name: &str) -> &dyn SimpleBackend {
        match self.overrides {
            Some(o) if o.contains_tensor(name) => o,
            _ => self.inner,
        }
    }
}

impl SimpleBackend for Recording<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.source(name).get(s, name, h, dtype, dev)?;
        self.record(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.source(name).get_unchecked(name, dtype, dev)?;
        self.record(name, t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> TrainableRule {
        let options = TrainOptions::parse(json).unwrap();
        let config = ClipConfig::parse(
            &std::fs::read_to_string("tests/fixtures/clip/models/tiny-quickgelu/config.json")
                .unwrap(),
            "config.json",
        )
        .unwrap();
        TrainableRule::new(&options, &config)
    }

    #[test]
    fn freezing_rules() {
        let all = rule(r#"{"output": "o"}"#);
        assert!(all.is_trainable("vision_model.embeddings.class_embedding"));
        let lit = rule(r#"{"output": "o", "freeze": "vision"}"#);
        assert!(!lit.is_trainable("vision_model.encoder.layers.1.mlp.fc1.weight"));
        assert!(!lit.is_trainable("visual_projection.weight"));
        assert!(lit.is_trainable("text_projection.weight"));
        assert!(lit.is_trainable("logit_scale"));
        assert!(lit.vision_frozen());
        // tiny models have 2 layers per tower: the last one trains.
        let last = rule(r#"{"output": "o", "train_last_layers": 1}"#);
        assert!(last.is_trainable("text_model.encoder.layers.1.self_attn.q_proj.weight"));
        assert!(!last.is_trainable("text_model.encoder.layers.0.self_attn.q_proj.weight"));
        assert!(!last.is_trainable("text_model.embeddings.token_embedding.weight"));
        assert!(last.is_trainable("text_model.final_layer_norm.weight"));
        assert!(last.is_trainable("vision_model.post_layernorm.bias"));
        assert!(!last.is_trainable("vision_model.pre_layrnorm.bias"));
        assert!(last.is_trainable("visual_projection.weight"));
    }
}
