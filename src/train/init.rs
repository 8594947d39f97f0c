//! Random initial weights for training a CLIP from scratch (`'init': 'random'`), drawn as
//! transformers' `CLIPPreTrainedModel._init_weights` draws them (normal with the same standard
//! deviations, layer norms at 1 and 0, biases at 0, the temperature at ln(1/0.07)), from a
//! seeded generator: each tensor's values depend only on the seed and its name.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

use super::data::Rng;
use crate::clip::config::{ClipConfig, TowerConfig};

pub struct RandomInit {
    config: ClipConfig,
    seed: u64,
}

impl RandomInit {
    pub fn new(config: &ClipConfig, seed: u64) -> RandomInit {
        RandomInit {
            config: config.clone(),
            seed,
        }
    }

    /// The standard deviation of `name` (`None`: a constant).
    fn std(&self, name: &str) -> Option<f64> {
        let tower: &TowerConfig = if name.starts_with("vision_model.") {
            &self.config.vision.tower
        } else {
            &self.config.text.tower
        };
        let h = tower.hidden_size as f64;
        let in_proj = h.powf(-0.5) * (2.0 * tower.num_hidden_layers as f64).powf(-0.5);
        let last = name.rsplit('.').next().unwrap_or("");
        Some(match () {
            _ if name.ends_with("bias") || name == "logit_scale" => return None,
            _ if name.contains("layer_norm")
                || name.contains("layrnorm")
                || name.contains("layernorm") =>
            {
                return None
            }
            _ if name.ends_with("class_embedding") => h.powf(-0.5),
            _ if name.contains("embedding") => 0.02,
            _ if name.contains("self_attn.out_proj") => h.powf(-0.5),
            _ if name.contains("self_attn.") => in_proj,
            _ if name.contains("mlp.fc1") => (2.0 * h).powf(-0.5),
            _ if name.contains("mlp.fc2") => in_proj,
            _ if name.starts_with("text_projection") => {
                (self.config.text.tower.hidden_size as f64).powf(-0.5)
            }
            _ if name.starts_with("visual_projection") => {
                (self.config.vision.tower.hidden_size as f64).powf(-0.5)
            }
            _ => {
                let _ = last;
                0.02
            }
        })
    }

    fn draw(&self, shape: Shape, name: &str) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let values: Vec<f32> = match self.std(name) {
            None if name == "logit_scale" => vec![(1.0f32 / 0.07).ln(); n],
            None if name.ends_with("weight") => vec![1.0; n], // layer-norm gains
            None => vec![0.0; n],
            Some(std) => {
                let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                let mut rng = Rng::new(self.seed, stream);
                let mut unit = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (0..n)
                    .map(|_| {
                        // Box-Muller.
                        let (u, v) = (unit().max(f64::MIN_POSITIVE), unit());
                        (std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos())
                            as f32
                    })
                    .collect()
            }
        };
        Tensor::from_vec(values, shape, &Device::Cpu)
    }
}

impl SimpleBackend for RandomInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.draw(s, name)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random init: the shape of {name} is unknown")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        name == "logit_scale"
            || name.starts_with("text_model.")
            || name.starts_with("vision_model.")
            || name.ends_with("_projection.weight")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_deviations_follow_transformers() {
        let config = ClipConfig::parse(
            &std::fs::read_to_string("tests/fixtures/clip/models/tiny-quickgelu/config.json")
                .unwrap(),
            "config.json",
        )
        .unwrap();
        let init = RandomInit::new(&config, 1);
        let get = |name: &str, shape: &[usize]| {
            init.get(
                shape.into(),
                name,
                Init::Const(0.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        };
        let std = |t: &Tensor| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let m = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / v.len() as f32).sqrt()
        };
        let tok = get("text_model.embeddings.token_embedding.weight", &[49408, 16]);
        assert!((std(&tok) - 0.02).abs() < 0.001, "{}", std(&tok));
        // text hidden 16, 2 layers: q_proj std 16^-0.5 * 4^-0.5 = 0.125
        let q = get(
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            &[16, 16],
        );
        assert!((std(&q) - 0.125).abs() < 0.02, "{}", std(&q));
        let ln: Vec<f32> = get("vision_model.pre_layrnorm.weight", &[20])
            .to_vec1()
            .unwrap();
        assert!(ln.iter().all(|&x| x == 1.0));
        let b: Vec<f32> = get("vision_model.encoder.layers.1.mlp.fc1.bias", &[52])
            .to_vec1()
            .unwrap();
        assert!(b.iter().all(|&x| x == 0.0));
        // Same seed and name, same values; another name, other values.
        assert_eq!(
            q.to_vec2::<f32>().unwrap(),
            get(
                "text_model.encoder.layers.0.self_attn.q_proj.weight",
                &[16, 16]
            )
            .to_vec2::<f32>()
            .unwrap()
        );
        assert_ne!(
            q.to_vec2::<f32>().unwrap(),
            get(
                "text_model.encoder.layers.0.self_attn.k_proj.weight",
                &[16, 16]
            )
            .to_vec2::<f32>()
            .unwrap()
        );
    }
}
