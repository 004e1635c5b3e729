//! `AutoencoderDC`: encoder, decoder, scaling factor and tiled decoding.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::DcAeConfig;
use super::decoder::Decoder;
use super::encoder::Encoder;
use super::tiling::{tiled_decode, TilingConfig};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct AutoencoderDc {
    cfg: DcAeConfig,
    encoder: Option<Encoder>,
    decoder: Decoder,
    tiling: Option<TilingConfig>,
}

impl AutoencoderDc {
    /// Encoder and decoder from diffusers-named weights (`encoder.*`, `decoder.*`).
    pub fn new(cfg: &DcAeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Some(Encoder::new(cfg, vb.pp("encoder"))?),
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            tiling: None,
        })
    }

    /// The decoder only (`decoder.*`), for text-to-image pipelines.
    pub fn new_decoder_only(cfg: &DcAeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg: cfg.clone(), encoder: None, decoder: Decoder::new(cfg, vb.pp("decoder"))?, tiling: None })
    }

    /// Decodes latents larger than one tile tile by tile (see [`TilingConfig`]); `None` turns it off.
    pub fn with_tiling(mut self, tiling: Option<TilingConfig>) -> Result<Self> {
        if let Some(t) = &tiling {
            t.validate(self.cfg.spatial_compression())?;
        }
        self.tiling = tiling;
        Ok(self)
    }

    pub fn config(&self) -> &DcAeConfig {
        &self.cfg
    }

    /// Diffusion latents are `encode(x) · scaling_factor` (0.41407 for SANA).
    pub fn scaling_factor(&self) -> f64 {
        self.cfg.scaling_factor
    }

    /// `x`: `(B, 3, H, W)` in [-1, 1], H and W divisible by 32 -> raw latents `(B, 32, H/32, W/32)`
    /// (multiply by [`Self::scaling_factor`] for the diffusion model).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        match &self.encoder {
            Some(e) => e.forward(x),
            None => Err(Error::Usage("this autoencoder was loaded without its encoder".into())),
        }
    }

    /// Raw latents `(B, 32, h, w)` (divide diffusion latents by [`Self::scaling_factor`] first) ->
    /// images `(B, 3, 32h, 32w)` in about [-1, 1]. Tiled when tiling is on and the latent is larger
    /// than one tile.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = z.dims4().map_err(|_| Error::Usage(format!("latents must be (B, C, h, w), got {:?}", z.dims())))?;
        if c != self.cfg.latent_channels {
            return Err(Error::Usage(format!("latents have {c} channels, the autoencoder expects {}", self.cfg.latent_channels)));
        }
        let f = self.cfg.spatial_compression();
        match &self.tiling {
            Some(t) if t.applies(h, w, f) => tiled_decode(z, t, f, |tile| self.decoder.forward(tile)),
            _ => self.decoder.forward(z),
        }
    }

    /// Decodes without tiling whatever the setting.
    pub fn decode_untiled(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(z)
    }

    /// Diffusion-model latents -> images: `decode(latents / scaling_factor)`.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&(latents / self.cfg.scaling_factor)?)
    }
}
