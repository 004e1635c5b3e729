//! Timestep (and guidance) embeddings of the AdaLN-single family (PixArt-α, SANA, SANA-Sprint).

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use crate::error::{Error, Result};

/// Width of the sinusoidal timestep features fed to [`TimestepEmbedding`].
pub const TIMESTEP_FREQ_DIM: usize = 256;

/// Sinusoidal features of `t` `(B,)`: `[cos(t·f_i), sin(t·f_i)]` with `f_i = exp(-ln(10000)·i/half)`,
/// `half = dim/2` (diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`).
/// Computed in f32 like diffusers: the frequencies are rounded to f32 first, then multiplied by t.
pub fn timestep_frequencies(t: &Tensor, dim: usize) -> Result<Tensor> {
    if dim % 2 != 0 {
        return Err(Error::Other(format!("timestep embedding width {dim} must be even")));
    }
    let t = match t.rank() {
        1 => t.to_dtype(DType::F32)?,
        _ => return Err(Error::Usage(format!("timestep must have shape (B,), got {:?}", t.dims()))),
    };
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            // torch: exp(arange(f32) * -ln(10000) / half), every step in f32.
            let exponent = (i as f32) * -(10000f64.ln() as f32) / (half as f32);
            exponent.exp()
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], 1)?)
}

/// `linear_2(SiLU(linear_1(x)))` (diffusers `TimestepEmbedding`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Keys: `linear_1.{weight,bias}` `(dim, in)`, `linear_2.{weight,bias}` `(dim, dim)`.
    pub fn new(in_channels: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear_1: linear(in_channels, dim, vb.pp("linear_1"))?, linear_2: linear(dim, dim, vb.pp("linear_2"))? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::silu(&self.linear_1.forward(x)?)?;
        Ok(self.linear_2.forward(&h)?)
    }
}

/// AdaLN-single (diffusers `AdaLayerNormSingle` without size conditions): returns the 6C block
/// modulation vector `linear(SiLU(e))` and the embedded timestep `e` (C) used by the final layer.
#[derive(Debug, Clone)]
pub struct AdaLayerNormSingle {
    timestep_embedder: TimestepEmbedding,
    linear: Linear,
}

impl AdaLayerNormSingle {
    /// Keys: `emb.timestep_embedder.linear_{1,2}.*`, `linear.{weight (6C, C), bias}`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(TIMESTEP_FREQ_DIM, dim, vb.pp("emb").pp("timestep_embedder"))?,
            linear: linear(dim, 6 * dim, vb.pp("linear"))?,
        })
    }

    /// `t`: `(B,)`. Returns `((B, 6C), (B, C))` in `dtype`.
    pub fn forward(&self, t: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let freqs = timestep_frequencies(t, TIMESTEP_FREQ_DIM)?.to_dtype(dtype)?;
        let embedded = self.timestep_embedder.forward(&freqs)?;
        let modulation = self.linear.forward(&candle_nn::ops::silu(&embedded)?)?;
        Ok((modulation, embedded))
    }
}

/// SANA-Sprint's timestep + guidance embedding (diffusers `SanaCombinedTimestepGuidanceEmbeddings`):
/// `e = TE_t(freq(t)) + TE_g(freq(g))`; returns `(linear(SiLU(e)), e)`.
#[derive(Debug, Clone)]
pub struct TimestepGuidanceEmbedding {
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: TimestepEmbedding,
    linear: Linear,
}

impl TimestepGuidanceEmbedding {
    /// Keys: `timestep_embedder.linear_{1,2}.*`, `guidance_embedder.linear_{1,2}.*`, `linear.*`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(TIMESTEP_FREQ_DIM, dim, vb.pp("timestep_embedder"))?,
            guidance_embedder: TimestepEmbedding::new(TIMESTEP_FREQ_DIM, dim, vb.pp("guidance_embedder"))?,
            linear: linear(dim, 6 * dim, vb.pp("linear"))?,
        })
    }

    /// `t`, `guidance`: `(B,)`. Returns `((B, 6C), (B, C))` in `dtype`.
    pub fn forward(&self, t: &Tensor, guidance: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let t_emb = self.timestep_embedder.forward(&timestep_frequencies(t, TIMESTEP_FREQ_DIM)?.to_dtype(dtype)?)?;
        let g_emb = self.guidance_embedder.forward(&timestep_frequencies(guidance, TIMESTEP_FREQ_DIM)?.to_dtype(dtype)?)?;
        let embedded = (t_emb + g_emb)?;
        let modulation = self.linear.forward(&candle_nn::ops::silu(&embedded)?)?;
        Ok((modulation, embedded))
    }
}
