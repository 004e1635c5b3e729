//! `AutoencoderDC` configuration with the SANA presets (`scripts/convert_dcae_to_diffusers.py`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockType {
    ResBlock,
    EfficientViTBlock,
}

/// Field names follow diffusers' `vae/config.json`. Only the variants SANA's checkpoints use are
/// supported: RMSNorm everywhere, SiLU in the decoder's ResBlocks, ReLU before `conv_out`,
/// stride-2 convolution down-sampling or pixel-unshuffle, interpolation or pixel-shuffle up-sampling,
/// and the in/out shortcuts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DcAeConfig {
    pub in_channels: usize,
    pub latent_channels: usize,
    pub attention_head_dim: usize,
    /// One type per stage (diffusers also accepts a single type for all stages).
    #[serde(deserialize_with = "one_or_many")]
    pub encoder_block_types: Vec<BlockType>,
    #[serde(deserialize_with = "one_or_many")]
    pub decoder_block_types: Vec<BlockType>,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub encoder_layers_per_block: Vec<usize>,
    pub decoder_layers_per_block: Vec<usize>,
    pub encoder_qkv_multiscales: Vec<Vec<usize>>,
    pub decoder_qkv_multiscales: Vec<Vec<usize>>,
    /// `"interpolate"` (nearest ×2 then conv) or `"pixel_shuffle"`.
    pub upsample_block_type: String,
    /// `"conv"` (stride-2 conv) or `"pixel_unshuffle"`.
    pub downsample_block_type: String,
    #[serde(deserialize_with = "uniform_string")]
    pub decoder_norm_types: String,
    #[serde(deserialize_with = "uniform_string")]
    pub decoder_act_fns: String,
    pub encoder_out_shortcut: bool,
    pub decoder_in_shortcut: bool,
    pub decoder_conv_act_fn: String,
    /// Latents given to the diffusion model are `encode(x) · scaling_factor`; decode `z / scaling_factor`.
    pub scaling_factor: f64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// A single value or a list (a single value stands for every stage; the length is checked later).
fn one_or_many<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Clone>(d: D) -> std::result::Result<Vec<T>, D::Error> {
    Ok(match OneOrMany::<T>::deserialize(d)? {
        OneOrMany::One(v) => vec![v; 1],
        OneOrMany::Many(v) => v,
    })
}

/// A string, or a list of strings that must all be equal (per-stage variants are not supported).
fn uniform_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    match OneOrMany::<String>::deserialize(d)? {
        OneOrMany::One(v) => Ok(v),
        OneOrMany::Many(v) => match v.first() {
            Some(first) if v.iter().all(|x| x == first) => Ok(first.clone()),
            _ => Err(serde::de::Error::custom(format!("per-stage values {v:?} are not supported"))),
        },
    }
}

impl Default for DcAeConfig {
    fn default() -> Self {
        Self::f32c32_sana_1_0()
    }
}

impl DcAeConfig {
    /// `mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers`.
    pub fn f32c32_sana_1_0() -> Self {
        use BlockType::*;
        let types = vec![ResBlock, ResBlock, ResBlock, EfficientViTBlock, EfficientViTBlock, EfficientViTBlock];
        let channels = vec![128, 256, 512, 512, 1024, 1024];
        let scales = vec![vec![], vec![], vec![], vec![5], vec![5], vec![5]];
        Self {
            in_channels: 3,
            latent_channels: 32,
            attention_head_dim: 32,
            encoder_block_types: types.clone(),
            decoder_block_types: types,
            encoder_block_out_channels: channels.clone(),
            decoder_block_out_channels: channels,
            encoder_layers_per_block: vec![2, 2, 2, 3, 3, 3],
            decoder_layers_per_block: vec![3, 3, 3, 3, 3, 3],
            encoder_qkv_multiscales: scales.clone(),
            decoder_qkv_multiscales: scales,
            upsample_block_type: "interpolate".into(),
            downsample_block_type: "conv".into(),
            decoder_norm_types: "rms_norm".into(),
            decoder_act_fns: "silu".into(),
            encoder_out_shortcut: true,
            decoder_in_shortcut: true,
            decoder_conv_act_fn: "relu".into(),
            scaling_factor: 0.41407,
        }
    }

    /// `mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers` (SANA-Sprint): the same architecture and
    /// scaling factor as 1.0 (spec sana.md §3: unverified beyond the conversion script), new weights.
    pub fn f32c32_sana_1_1() -> Self {
        Self::f32c32_sana_1_0()
    }

    /// A tiny configuration (the one of tests/goldens/make_sana_goldens.py): 8x compression, 4
    /// latent channels; for random-weight smoke tests.
    pub fn tiny() -> Self {
        use BlockType::*;
        let types = vec![ResBlock, ResBlock, EfficientViTBlock, EfficientViTBlock];
        let scales = vec![vec![], vec![], vec![5], vec![5]];
        Self {
            latent_channels: 4,
            attention_head_dim: 8,
            encoder_block_types: types.clone(),
            decoder_block_types: types,
            encoder_block_out_channels: vec![8, 16, 16, 32],
            decoder_block_out_channels: vec![8, 16, 16, 32],
            encoder_layers_per_block: vec![1, 1, 1, 2],
            decoder_layers_per_block: vec![1, 1, 2, 1],
            encoder_qkv_multiscales: scales.clone(),
            decoder_qkv_multiscales: scales,
            ..Self::f32c32_sana_1_0()
        }
    }

    /// A preset by name: `dc-ae-f32c32-sana-1.0`, `dc-ae-f32c32-sana-1.1`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "dc-ae-f32c32-sana-1.0" => Ok(Self::f32c32_sana_1_0()),
            "dc-ae-f32c32-sana-1.1" => Ok(Self::f32c32_sana_1_1()),
            other => Err(Error::Usage(format!("unknown DC-AE preset `{other}`"))),
        }
    }

    /// Parses a diffusers `vae/config.json`.
    pub fn from_diffusers_json(json: &str) -> Result<Self> {
        let mut cfg: Self =
            serde_json::from_str(json).map_err(|e| Error::Spec { file: "vae/config.json".into(), msg: e.to_string() })?;
        // A single block type stands for every stage.
        let (ne, nd) = (cfg.encoder_block_out_channels.len(), cfg.decoder_block_out_channels.len());
        if cfg.encoder_block_types.len() == 1 {
            cfg.encoder_block_types = vec![cfg.encoder_block_types[0]; ne];
        }
        if cfg.decoder_block_types.len() == 1 {
            cfg.decoder_block_types = vec![cfg.decoder_block_types[0]; nd];
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Spatial compression, `2^(stages - 1)`.
    pub fn spatial_compression(&self) -> usize {
        1 << (self.encoder_block_out_channels.len().saturating_sub(1))
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Spec { file: "DcAeConfig".into(), msg });
        for (side, n, lens) in [
            (
                "encoder",
                self.encoder_block_out_channels.len(),
                [self.encoder_block_types.len(), self.encoder_layers_per_block.len(), self.encoder_qkv_multiscales.len()],
            ),
            (
                "decoder",
                self.decoder_block_out_channels.len(),
                [self.decoder_block_types.len(), self.decoder_layers_per_block.len(), self.decoder_qkv_multiscales.len()],
            ),
        ] {
            if n == 0 || lens.iter().any(|&l| l != n) {
                return bad(format!("{side}: block types, channels, layers and multiscales must all have {n} entries"));
            }
        }
        if self.encoder_layers_per_block.contains(&0) || self.decoder_layers_per_block.contains(&0) {
            return bad("stages without layers are not supported".into());
        }
        let checks = [
            ("upsample_block_type", self.upsample_block_type.as_str(), &["interpolate", "pixel_shuffle"][..]),
            ("downsample_block_type", self.downsample_block_type.as_str(), &["conv", "pixel_unshuffle"][..]),
            ("decoder_norm_types", self.decoder_norm_types.as_str(), &["rms_norm"][..]),
            ("decoder_act_fns", self.decoder_act_fns.as_str(), &["silu"][..]),
            ("decoder_conv_act_fn", self.decoder_conv_act_fn.as_str(), &["relu"][..]),
        ];
        for (field, value, allowed) in checks {
            if !allowed.contains(&value) {
                return bad(format!("{field} = `{value}` is not supported (supported: {allowed:?})"));
            }
        }
        let head = self.attention_head_dim;
        for (types, chans) in [
            (&self.encoder_block_types, &self.encoder_block_out_channels),
            (&self.decoder_block_types, &self.decoder_block_out_channels),
        ] {
            for (t, c) in types.iter().zip(chans.iter()) {
                if *t == BlockType::EfficientViTBlock && (head == 0 || c % head != 0) {
                    return bad(format!("EfficientViT stage with {c} channels is not divisible by attention_head_dim {head}"));
                }
            }
        }
        Ok(())
    }
}
