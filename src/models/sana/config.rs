//! `SanaTransformer2DModel` configuration with the published presets
//! (`scripts/convert_sana_to_diffusers.py`; spec: shared/specs/sana.md §1.1).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Normalization of q and k before attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QkNorm {
    /// RMSNorm over all `heads · head_dim` channels at once, eps 1e-5, with a weight
    /// (diffusers `"rms_norm_across_heads"`; SANA-1.5 and SANA-Sprint).
    #[serde(rename = "rms_norm_across_heads")]
    RmsNormAcrossHeads,
}

/// Field names and defaults follow diffusers' `config.json`, so a checkpoint's config parses as is
/// (unknown fields such as `_class_name` are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SanaConfig {
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    /// Self-attention (linear) heads; hidden size `C = num_attention_heads · attention_head_dim`.
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub num_layers: usize,
    pub num_cross_attention_heads: usize,
    pub cross_attention_head_dim: usize,
    pub cross_attention_dim: usize,
    /// Width of the text encoder's hidden states (Gemma-2-2B: 2304).
    pub caption_channels: usize,
    pub mlp_ratio: f64,
    /// Bias on the self-attention q, k, v projections.
    pub attention_bias: bool,
    /// Latent size the model was trained at (image size / 32).
    pub sample_size: usize,
    pub patch_size: usize,
    pub norm_eps: f64,
    /// `None`: no positional embedding (512/1024 models); `Some(s)`: 2-D sin-cos PE (2K: 1, 4K: 2).
    pub interpolation_scale: Option<f64>,
    pub guidance_embeds: bool,
    /// Pipelines multiply the guidance scale by this before the guidance embedder (Sprint: 0.1).
    pub guidance_embeds_scale: f64,
    pub qk_norm: Option<QkNorm>,
    /// Pipelines multiply the timestep by this before calling the model.
    pub timestep_scale: f64,
}

impl Default for SanaConfig {
    /// diffusers' class defaults (the 1600M shape).
    fn default() -> Self {
        Self {
            in_channels: 32,
            out_channels: Some(32),
            num_attention_heads: 70,
            attention_head_dim: 32,
            num_layers: 20,
            num_cross_attention_heads: 20,
            cross_attention_head_dim: 112,
            cross_attention_dim: 2240,
            caption_channels: 2304,
            mlp_ratio: 2.5,
            attention_bias: false,
            sample_size: 32,
            patch_size: 1,
            norm_eps: 1e-6,
            interpolation_scale: None,
            guidance_embeds: false,
            guidance_embeds_scale: 0.1,
            qk_norm: None,
            timestep_scale: 1.0,
        }
    }
}

impl SanaConfig {
    /// SANA 0.6B at 1024² (`SanaMS_600M_P1_D28`): 28 layers, C = 1152 (36 × 32), cross 16 × 72.
    pub fn sana_600m_1024() -> Self {
        Self {
            num_attention_heads: 36,
            num_layers: 28,
            num_cross_attention_heads: 16,
            cross_attention_head_dim: 72,
            cross_attention_dim: 1152,
            ..Self::default()
        }
    }

    /// SANA 1.6B at 1024² (`SanaMS_1600M_P1_D20`): 20 layers, C = 2240 (70 × 32), cross 20 × 112.
    pub fn sana_1600m_1024() -> Self {
        Self::default()
    }

    /// SANA 1.6B at 2048² (`Sana_1600M_2Kpx`): latent 64², sin-cos PE with interpolation scale 1.
    pub fn sana_1600m_2k() -> Self {
        Self { sample_size: 64, interpolation_scale: Some(1.0), ..Self::sana_1600m_1024() }
    }

    /// SANA 1.6B at 4096² (`Sana_1600M_4Kpx`): latent 128², sin-cos PE with interpolation scale 2.
    pub fn sana_1600m_4k() -> Self {
        Self { sample_size: 128, interpolation_scale: Some(2.0), ..Self::sana_1600m_1024() }
    }

    /// SANA-1.5 1.6B at 1024²: the 1600M shape with qk RMSNorm across heads.
    pub fn sana_1_5_1600m_1024() -> Self {
        Self { qk_norm: Some(QkNorm::RmsNormAcrossHeads), ..Self::sana_1600m_1024() }
    }

    /// SANA-1.5 4.8B at 1024² (`SanaMS1.5_4800M_P1_D60`): 60 layers of the 1600M width, qk-norm.
    pub fn sana_1_5_4800m_1024() -> Self {
        Self { num_layers: 60, ..Self::sana_1_5_1600m_1024() }
    }

    /// SANA-Sprint 1.6B at 1024²: qk-norm and the guidance embedding (guidance scale × 0.1).
    pub fn sana_sprint_1600m_1024() -> Self {
        Self { guidance_embeds: true, ..Self::sana_1_5_1600m_1024() }
    }

    /// SANA-Sprint 0.6B at 1024²: the 600M shape with qk-norm and the guidance embedding.
    pub fn sana_sprint_600m_1024() -> Self {
        Self { guidance_embeds: true, qk_norm: Some(QkNorm::RmsNormAcrossHeads), ..Self::sana_600m_1024() }
    }

    /// A tiny configuration for tests (the one of tests/goldens/make_sana_goldens.py): C = 16,
    /// 2 layers, 2 × 8 heads, 4 latent channels, 12 caption channels.
    pub fn tiny() -> Self {
        Self {
            in_channels: 4,
            out_channels: Some(4),
            num_attention_heads: 2,
            attention_head_dim: 8,
            num_layers: 2,
            num_cross_attention_heads: 2,
            cross_attention_head_dim: 8,
            cross_attention_dim: 16,
            caption_channels: 12,
            sample_size: 8,
            ..Self::default()
        }
    }

    /// A preset by name, as in `pipelines/*.toml` (`preset = "600m-1024"`), with or without a
    /// `sana-` prefix: `600m-1024`, `1600m-1024`, `1600m-2k`, `1600m-4k`, `1.5-1600m-1024`,
    /// `1.5-4800m-1024`, `sprint-600m-1024`, `sprint-1600m-1024`, `tiny`. The `-1024` suffix may be
    /// left out.
    pub fn preset(name: &str) -> Result<Self> {
        let short = name.strip_prefix("sana-").unwrap_or(name);
        let short = short.strip_suffix("-1024").unwrap_or(short);
        Ok(match short {
            "600m" => Self::sana_600m_1024(),
            "1600m" => Self::sana_1600m_1024(),
            "1600m-2k" => Self::sana_1600m_2k(),
            "1600m-4k" => Self::sana_1600m_4k(),
            "1.5-1600m" => Self::sana_1_5_1600m_1024(),
            "1.5-4800m" => Self::sana_1_5_4800m_1024(),
            "sprint-600m" => Self::sana_sprint_600m_1024(),
            "sprint-1600m" => Self::sana_sprint_1600m_1024(),
            "tiny" => Self::tiny(),
            _ => return Err(Error::Usage(format!("unknown SANA preset `{name}`"))),
        })
    }

    /// Parses a diffusers `transformer/config.json`.
    pub fn from_diffusers_json(json: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json)
            .map_err(|e| Error::Spec { file: "transformer/config.json".into(), msg: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Hidden size `C`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Hidden width of the Mix-FFN, `int(mlp_ratio · C)`.
    pub fn ffn_hidden(&self) -> usize {
        (self.mlp_ratio * self.inner_dim() as f64) as usize
    }

    /// Checks the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Spec { file: "SanaConfig".into(), msg });
        let c = self.inner_dim();
        if c == 0 || self.num_layers == 0 || self.patch_size == 0 {
            return bad("hidden size, num_layers and patch_size must be positive".into());
        }
        if self.num_cross_attention_heads * self.cross_attention_head_dim != c {
            return bad(format!(
                "cross-attention heads {} × {} must equal the hidden size {c}",
                self.num_cross_attention_heads, self.cross_attention_head_dim
            ));
        }
        if self.cross_attention_dim != c {
            return bad(format!("cross_attention_dim {} must equal the hidden size {c}", self.cross_attention_dim));
        }
        if self.interpolation_scale.is_some() && c % 4 != 0 {
            return bad(format!("the sin-cos embedding needs a hidden size divisible by 4, got {c}"));
        }
        Ok(())
    }
}
