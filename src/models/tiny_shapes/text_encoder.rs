//! The text encoder of tiny-shapes: token embedding plus a learned position embedding, then
//! pre-LN transformer layers (softmax self-attention over the caption with its padding mask, GELU
//! MLP) and a final LayerNorm. Attention is the f32 reference of the dense backend, called
//! directly: plain candle ops, so the encoder trains on any device.
//!
//! Keys (under `text_encoder.`): `token_embedding.weight (V, D)`, `position_embedding (L, D)`,
//! `layers.{i}.{norm1,norm2}.{weight,bias}`, `layers.{i}.qkv.{weight (3D, D),bias}`,
//! `layers.{i}.out.*`, `layers.{i}.fc1.*`, `layers.{i}.fc2.*`, `final_norm.*`.

use candle_core::{DType, Module, Tensor};
use candle_nn::{embedding, linear, Embedding, Init, Linear, VarBuilder};

use super::config::TextEncoderConfig;
use crate::attention::dense;
use crate::error::{Error, Result};
use crate::layers::layer_norm_no_affine;

const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
struct TextLayer {
    norm1: LayerNorm,
    qkv: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

/// LayerNorm with weight and bias, in plain candle ops: candle_nn's fused layer norm records no
/// backward pass, which would silently stop the gradient into the text encoder during training.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = layer_norm_no_affine(x, LAYER_NORM_EPS)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

fn norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
    })
}

impl TextLayer {
    fn new(cfg: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden;
        Ok(Self {
            norm1: norm(d, vb.pp("norm1"))?,
            qkv: linear(d, 3 * d, vb.pp("qkv"))?,
            out: linear(d, d, vb.pp("out"))?,
            norm2: norm(d, vb.pp("norm2"))?,
            fc1: linear(d, cfg.mlp_ratio * d, vb.pp("fc1"))?,
            fc2: linear(cfg.mlp_ratio * d, d, vb.pp("fc2"))?,
            heads: cfg.heads,
        })
    }

    /// `x`: `(B, L, D)`, `mask`: `(B, L)` with 1 for real tokens.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?.reshape((b, l, 3, self.heads, hd))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let (o, _lse) = dense::reference(&q, &k, &v, Some(mask), None, scale)?;
        let o = o.to_dtype(x.dtype())?.transpose(1, 2)?.reshape((b, l, d))?;
        let x = (x + self.out.forward(&o)?)?;
        let h = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu()?)?;
        Ok((x + h)?)
    }
}

#[derive(Debug, Clone)]
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<TextLayer>,
    final_norm: LayerNorm,
    max_len: usize,
}

impl TextEncoder {
    pub fn new(cfg: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.layers).map(|i| TextLayer::new(cfg, vb.pp("layers").pp(i))).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, cfg.hidden, vb.pp("token_embedding"))?,
            position_embedding: vb.get((cfg.max_len, cfg.hidden), "position_embedding")?,
            layers,
            final_norm: norm(cfg.hidden, vb.pp("final_norm"))?,
            max_len: cfg.max_len,
        })
    }

    /// `ids`: `(B, L)` u32 with L <= max_len; `mask`: `(B, L)`, 1 = real token. Returns the hidden
    /// states `(B, L, D)` (padding positions hold values, excluded later by the mask).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_b, l) = ids.dims2()?;
        if l > self.max_len {
            return Err(Error::Usage(format!("{l} text tokens, the encoder reads at most {}", self.max_len)));
        }
        let mask = mask.to_dtype(DType::F32)?;
        let pos = self.position_embedding.narrow(0, 0, l)?.unsqueeze(0)?;
        let mut x = self.token_embedding.forward(ids)?.broadcast_add(&pos)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        Ok(self.final_norm.forward(&x)?)
    }
}
