//! Configuration of tiny-shapes (`assets/tiny-shapes/config.json`).

use serde::{Deserialize, Serialize};

use crate::data::shapes::VOCABULARY;
use crate::error::{Error, Result};
use crate::models::sana::SanaConfig;

/// The word-level text encoder: token + learned position embeddings, pre-LN transformer layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextEncoderConfig {
    /// Special tokens plus the shapes vocabulary.
    pub vocab_size: usize,
    /// Most tokens per caption, the leading `[bos]` included.
    pub max_len: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// MLP width = `mlp_ratio · hidden`.
    pub mlp_ratio: usize,
}

/// What the transformer's output means. The sampler always receives the velocity `v = ε - x0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The output is `v` itself.
    #[default]
    Velocity,
    /// The output is the clean picture `x0`; `v = (x_t - x0) / t`. A pixel model with few hidden
    /// channels per patch learns this much faster: predicting `v` makes the network carry the
    /// noise, a full-rank signal, through its narrow hidden state ("Back to Basics: Let Denoising
    /// Generative Models Denoise", Li & He 2025), while clean pictures of a few flat shapes lie on
    /// a small manifold.
    Sample,
}

/// `t` is clamped from below when `v` is derived from a predicted `x0`: `(x_t - x0) / t` blows
/// up as t -> 0 (JiT's clip, 0.05).
pub const SAMPLE_PREDICTION_MIN_T: f64 = 0.05;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyShapesConfig {
    /// Side of the square RGB pictures the model was trained on.
    pub image_size: usize,
    /// The model's timestep input is `t · timestep_scale`, t in [0, 1] (1 = pure noise).
    pub timestep_scale: f64,
    /// Absent in configs written before sample prediction existed: those models predict `v`.
    #[serde(default)]
    pub prediction: Prediction,
    pub text: TextEncoderConfig,
    pub transformer: SanaConfig,
}

impl TinyShapesConfig {
    /// The shipped shape: C = 192 (6 heads of 32), 6 blocks, patch 4 on 64×64 RGB pixels, sin-cos
    /// positions (relations need absolute positions), a 3-layer 128-wide text encoder.
    pub fn default_64() -> Self {
        let c_heads = 6;
        let head_dim = 32;
        let text_hidden = 128;
        Self {
            image_size: 64,
            timestep_scale: 1000.0,
            prediction: Prediction::Velocity,
            text: TextEncoderConfig {
                vocab_size: super::tokenizer::SPECIAL_TOKENS.len() + VOCABULARY.len(),
                max_len: 20,
                hidden: text_hidden,
                layers: 3,
                heads: 4,
                mlp_ratio: 4,
            },
            transformer: SanaConfig {
                in_channels: 3,
                out_channels: Some(3),
                num_attention_heads: c_heads,
                attention_head_dim: head_dim,
                num_layers: 6,
                num_cross_attention_heads: c_heads,
                cross_attention_head_dim: head_dim,
                cross_attention_dim: c_heads * head_dim,
                caption_channels: text_hidden,
                mlp_ratio: 2.5,
                attention_bias: false,
                sample_size: 64,
                patch_size: 4,
                norm_eps: 1e-6,
                interpolation_scale: Some(1.0),
                guidance_embeds: false,
                guidance_embeds_scale: 0.1,
                qk_norm: None,
                timestep_scale: 1.0,
            },
        }
    }

    /// A very small shape for tests and the CPU smoke run of the training example.
    pub fn tiny_test() -> Self {
        let mut cfg = Self::default_64();
        cfg.text.hidden = 32;
        cfg.text.layers = 1;
        cfg.text.heads = 2;
        cfg.transformer.num_attention_heads = 2;
        cfg.transformer.num_cross_attention_heads = 2;
        cfg.transformer.attention_head_dim = 16;
        cfg.transformer.cross_attention_head_dim = 16;
        cfg.transformer.cross_attention_dim = 32;
        cfg.transformer.caption_channels = 32;
        cfg.transformer.num_layers = 2;
        cfg
    }

    pub fn from_json(json: &str, file: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json).map_err(|e| Error::Spec { file: file.into(), msg: e.to_string() })?;
        cfg.validate().map_err(|e| Error::Spec { file: file.into(), msg: e.to_string() })?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Other(format!("config to json: {e}")))
    }

    pub fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        let bad = |msg: String| Err(Error::Spec { file: "TinyShapesConfig".into(), msg });
        let t = &self.text;
        if t.heads == 0 || t.hidden % t.heads != 0 {
            return bad(format!("text hidden {} must be a positive multiple of its heads {}", t.hidden, t.heads));
        }
        if t.hidden != self.transformer.caption_channels {
            return bad(format!("text hidden {} must equal caption_channels {}", t.hidden, self.transformer.caption_channels));
        }
        if t.vocab_size < super::tokenizer::SPECIAL_TOKENS.len() + VOCABULARY.len() || t.max_len < 2 {
            return bad(format!("vocab_size {} / max_len {} too small for the shapes vocabulary", t.vocab_size, t.max_len));
        }
        let p = self.transformer.patch_size;
        if self.image_size % p != 0 || self.transformer.in_channels != 3 || self.transformer.out_channels() != 3 {
            return bad("tiny-shapes is an RGB pixel model: 3 channels in and out, image size a multiple of the patch".into());
        }
        Ok(())
    }
}
