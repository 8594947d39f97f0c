//! HuggingFace CLIP configuration (`config.json`), read as transformers reads it: every field
//! that is absent takes transformers' default (CLIPTextConfig / CLIPVisionConfig), so a config
//! that omits, say, `hidden_act` means `quick_gelu` here as it does there. Nothing comes from
//! presets: the architecture is what the file says.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(1.702 x): OpenAI's checkpoints.
    QuickGelu,
    /// The exact (erf) GELU.
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str, file: &str) -> Result<Activation> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            other => Err(Error::Model(format!(
                "{file}: hidden_act '{other}' is not supported (quick_gelu, gelu, gelu_new)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
        }
    }
}

/// One transformer tower.
#[derive(Debug, Clone, PartialEq)]
pub struct TowerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub tower: TowerConfig,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub eos_token_id: u32,
    pub bos_token_id: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerConfig,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub projection_dim: usize,
}

#[derive(Deserialize, Default)]
struct RawTower {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    // text
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    // vision
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
}

/// Upper bounds that keep a hostile config from asking for absurd allocations.
const MAX_HIDDEN: usize = 16_384;
const MAX_LAYERS: usize = 256;
const MAX_VOCAB: usize = 1 << 20;
const MAX_POSITIONS: usize = 4096;
const MAX_IMAGE: usize = 4096;
/// Patches per image (attention costs their square).
const MAX_PATCHES: usize = 4096;

impl ClipConfig {
    /// Parses `config.json` text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ClipConfig> {
        let json: Value = serde_json::from_str(text)
            .map_err(|e| Error::Model(format!("{file}: invalid JSON: {e}")))?;
        let model_type = json.get("model_type").and_then(Value::as_str);
        if !matches!(model_type, Some("clip") | None) {
            return Err(Error::Model(format!(
                "{file}: model_type is '{}', not a CLIP model ('clip')",
                model_type.unwrap_or_default()
            )));
        }
        let section = |key: &str, legacy: &str| -> Result<RawTower> {
            match json.get(key).filter(|v| !v.is_null()).or_else(|| json.get(legacy)) {
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|e| Error::Model(format!("{file}: {key}: {e}"))),
                None => Err(Error::Model(format!(
                    "{file}: no {key}: this is not a CLIP model config (expected text_config and vision_config)"
                ))),
            }
        };
        let t = section("text_config", "text_config_dict")?;
        let v = section("vision_config", "vision_config_dict")?;
        let tower =
            |raw: &RawTower, defaults: (usize, usize, usize, usize)| -> Result<TowerConfig> {
                Ok(TowerConfig {
                    hidden_size: raw.hidden_size.unwrap_or(defaults.0),
                    intermediate_size: raw.intermediate_size.unwrap_or(defaults.1),
                    num_hidden_layers: raw.num_hidden_layers.unwrap_or(defaults.2),
                    num_attention_heads: raw.num_attention_heads.unwrap_or(defaults.3),
                    activation: Activation::parse(
                        raw.hidden_act.as_deref().unwrap_or("quick_gelu"),
                        file,
                    )?,
                    layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
                })
            };
        let config = ClipConfig {
            text: TextConfig {
                tower: tower(&t, (512, 2048, 12, 8))?,
                vocab_size: t.vocab_size.unwrap_or(49408),
                max_position_embeddings: t.max_position_embeddings.unwrap_or(77),
                eos_token_id: t.eos_token_id.unwrap_or(49407),
                bos_token_id: t.bos_token_id.unwrap_or(49406),
            },
            vision: VisionConfig {
                tower: tower(&v, (768, 3072, 12, 12))?,
                image_size: v.image_size.unwrap_or(224),
                patch_size: v.patch_size.unwrap_or(32),
                num_channels: v.num_channels.unwrap_or(3),
            },
            projection_dim: json
                .get("projection_dim")
                .and_then(Value::as_u64)
                .unwrap_or(512) as usize,
        };
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let bad = |what: String| Err(Error::Model(format!("{file}: {what}")));
        for (name, t) in [
            ("text_config", &self.text.tower),
            ("vision_config", &self.vision.tower),
        ] {
            if t.hidden_size == 0
                || t.hidden_size > MAX_HIDDEN
                || t.intermediate_size == 0
                || t.intermediate_size > 4 * MAX_HIDDEN
            {
                return bad(format!(
                    "{name}: hidden_size {} / intermediate_size {} out of range",
                    t.hidden_size, t.intermediate_size
                ));
            }
            if t.num_hidden_layers == 0 || t.num_hidden_layers > MAX_LAYERS {
                return bad(format!(
                    "{name}: num_hidden_layers {} out of range 1..{MAX_LAYERS}",
                    t.num_hidden_layers
                ));
            }
            if t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads != 0 {
                return bad(format!(
                    "{name}: hidden_size {} is not divisible by num_attention_heads {}",
                    t.hidden_size, t.num_attention_heads
                ));
            }
            if !(t.layer_norm_eps > 0.0 && t.layer_norm_eps < 1.0) {
                return bad(format!(
                    "{name}: layer_norm_eps {} out of range",
                    t.layer_norm_eps
                ));
            }
        }
        if self.text.vocab_size == 0 || self.text.vocab_size > MAX_VOCAB {
            return bad(format!(
                "text_config: vocab_size {} out of range",
                self.text.vocab_size
            ));
        }
        if self.text.max_position_embeddings < 2
            || self.text.max_position_embeddings > MAX_POSITIONS
        {
            return bad(format!(
                "text_config: max_position_embeddings {} out of range",
                self.text.max_position_embeddings
            ));
        }
        let v = &self.vision;
        if v.patch_size == 0
            || v.image_size == 0
            || v.image_size > MAX_IMAGE
            || !v.image_size.is_multiple_of(v.patch_size)
        {
            return bad(format!(
                "vision_config: image_size {} must be a multiple of patch_size {} (and at most {MAX_IMAGE})",
                v.image_size, v.patch_size
            ));
        }
        // Attention is quadratic in the patch count: bound it (ViT-L/14 at 336 px has 576).
        let patches = (v.image_size / v.patch_size).pow(2);
        if patches > MAX_PATCHES {
            return bad(format!(
                "vision_config: image_size {} / patch_size {} gives {patches} patches per image, \
                 more than the limit of {MAX_PATCHES}",
                v.image_size, v.patch_size
            ));
        }
        if v.num_channels != 3 {
            return bad(format!(
                "vision_config: num_channels {} (only RGB, 3, is supported)",
                v.num_channels
            ));
        }
        if self.projection_dim == 0 || self.projection_dim > MAX_HIDDEN {
            return bad(format!(
                "projection_dim {} out of range",
                self.projection_dim
            ));
        }
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.vision.image_size / self.vision.patch_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers_defaults() {
        let c = ClipConfig::parse(
            r#"{"model_type": "clip", "text_config": {}, "vision_config": {}}"#,
            "config.json",
        )
        .unwrap();
        assert_eq!(c.text.tower.hidden_size, 512);
        assert_eq!(c.vision.tower.hidden_size, 768);
        assert_eq!(c.vision.patch_size, 32);
        assert_eq!(c.text.tower.activation, Activation::QuickGelu);
        assert_eq!(c.projection_dim, 512);
        assert_eq!(c.text.eos_token_id, 49407);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = |t: &str| {
            ClipConfig::parse(t, "m/config.json")
                .unwrap_err()
                .to_string()
        };
        assert!(e("{").starts_with("m/config.json: invalid JSON"));
        assert!(e(r#"{"model_type": "bert"}"#).contains("model_type is 'bert', not a CLIP model"));
        assert!(e(r#"{"text_config": {}}"#).contains("no vision_config"));
        assert!(
            e(r#"{"text_config": {"hidden_act": "relu"}, "vision_config": {}}"#)
                .contains("hidden_act 'relu' is not supported")
        );
        assert!(
            e(r#"{"text_config": {"hidden_size": 100000000}, "vision_config": {}}"#)
                .contains("out of range")
        );
        assert!(
            e(r#"{"text_config": {}, "vision_config": {"image_size": 225}}"#)
                .contains("multiple of patch_size")
        );
        assert!(e(
            r#"{"text_config": {"hidden_size": 10, "num_attention_heads": 3}, "vision_config": {}}"#
        )
        .contains("not divisible"));
    }
}
