//! SANA's two attention layers. The projections live here; the attention itself is always
//! [`attend`] with the backend resolved for the layer at load time.
//!
//! - `attn1`, self-attention over image tokens (linear attention in every released SANA):
//!   `to_q, to_k, to_v` (bias per `attention_bias`), optional `norm_q, norm_k`, `to_out.0` (bias).
//! - `attn2`, cross-attention to the text (softmax, text padding mask): all projections biased.

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, linear_b, Linear, VarBuilder};

use super::config::{QkNorm, SanaConfig};
use crate::attention::plan::{AttentionPlan, LayerRef};
use crate::attention::{attend, AttentionInput, Backend, LayerShape, Role};
use crate::error::Result;
use crate::layers::RmsNorm;

/// qk-norm eps (diffusers `Attention(eps=1e-5)`).
const QK_NORM_EPS: f64 = 1e-5;

/// `(B, N, heads·d)` -> `(B, heads, N, d)`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    Ok(x.reshape((b, n, heads, c / heads))?.transpose(1, 2)?.contiguous()?)
}

/// `(B, heads, N, d)` -> `(B, N, heads·d)`; channel index `head·d + j`.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, n, h * d))?)
}

fn qk_norms(kind: Option<QkNorm>, q_dim: usize, k_dim: usize, vb: &VarBuilder) -> Result<Option<(RmsNorm, RmsNorm)>> {
    Ok(match kind {
        None => None,
        Some(QkNorm::RmsNormAcrossHeads) => Some((
            RmsNorm::new(q_dim, QK_NORM_EPS, true, false, vb.pp("norm_q"))?,
            RmsNorm::new(k_dim, QK_NORM_EPS, true, false, vb.pp("norm_k"))?,
        )),
    })
}

/// The projections and the resolved backend of one attention layer.
#[derive(Debug, Clone)]
struct Projections {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    backend: Backend,
}

impl Projections {
    /// Projects, normalizes and splits heads: `(B, H, N, d)` each. q, k, v keep the input dtype;
    /// the backends compute in f32 internally.
    fn qkv(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mut q = self.to_q.forward(x)?;
        let mut k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        if let Some((norm_q, norm_k)) = &self.qk_norm {
            q = norm_q.forward(&q)?;
            k = norm_k.forward(&k)?;
        }
        Ok((split_heads(&q, self.heads)?, split_heads(&k, self.heads)?, split_heads(&v, self.heads)?))
    }

    fn output(&self, o: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(self.to_out.forward(&merge_heads(&o.to_dtype(dtype)?)?)?)
    }
}

/// `attn1`: self-attention over the image tokens.
#[derive(Debug, Clone)]
pub struct SanaSelfAttention {
    proj: Projections,
}

impl SanaSelfAttention {
    /// `grid`: the token grid `[H/p, W/p]` at the config's sample size, used to resolve the backend
    /// (the backend serves any grid at call time).
    pub fn new(cfg: &SanaConfig, index: usize, plan: &AttentionPlan, grid: [usize; 2], dtype: DType, vb: VarBuilder) -> Result<Self> {
        let c = cfg.inner_dim();
        let name = format!("transformer_blocks.{index}.attn1");
        let shape = LayerShape {
            role: Role::SelfAttention,
            head_dim: cfg.attention_head_dim,
            grid: Some(grid.to_vec()),
            key_mask: false,
            dtype,
            device: vb.device().clone(),
        };
        let backend = plan.resolve(&LayerRef { index, name: &name, role: Role::SelfAttention }, &shape)?;
        Ok(Self {
            proj: Projections {
                to_q: linear_b(c, c, cfg.attention_bias, vb.pp("to_q"))?,
                to_k: linear_b(c, c, cfg.attention_bias, vb.pp("to_k"))?,
                to_v: linear_b(c, c, cfg.attention_bias, vb.pp("to_v"))?,
                to_out: linear(c, c, vb.pp("to_out").pp("0"))?,
                qk_norm: qk_norms(cfg.qk_norm, c, c, &vb)?,
                heads: cfg.num_attention_heads,
                backend,
            },
        })
    }

    /// `x`: `(B, N, C)` tokens of a `grid = [h, w]` -> `(B, N, C)`.
    pub fn forward(&self, x: &Tensor, grid: [usize; 2]) -> Result<Tensor> {
        let (q, k, v) = self.proj.qkv(x, x)?;
        let o = attend(&self.proj.backend, &AttentionInput::new(&q, &k, &v).grid(Some(&grid)))?;
        let out = self.proj.output(&o, x.dtype())?;
        // diffusers clips the linear-attention output to the f16 range in f16.
        if x.dtype() == DType::F16 {
            return Ok(out.clamp(-65504f32, 65504f32)?);
        }
        Ok(out)
    }

    pub fn backend(&self) -> &Backend {
        &self.proj.backend
    }
}

/// `attn2`: cross-attention from the image tokens to the text tokens.
#[derive(Debug, Clone)]
pub struct SanaCrossAttention {
    proj: Projections,
}

impl SanaCrossAttention {
    pub fn new(cfg: &SanaConfig, index: usize, plan: &AttentionPlan, dtype: DType, vb: VarBuilder) -> Result<Self> {
        let c = cfg.inner_dim();
        let inner = cfg.num_cross_attention_heads * cfg.cross_attention_head_dim;
        let name = format!("transformer_blocks.{index}.attn2");
        let shape = LayerShape {
            role: Role::Cross,
            head_dim: cfg.cross_attention_head_dim,
            grid: None,
            key_mask: true,
            dtype,
            device: vb.device().clone(),
        };
        let backend = plan.resolve(&LayerRef { index, name: &name, role: Role::Cross }, &shape)?;
        Ok(Self {
            proj: Projections {
                to_q: linear(c, inner, vb.pp("to_q"))?,
                to_k: linear(cfg.cross_attention_dim, inner, vb.pp("to_k"))?,
                to_v: linear(cfg.cross_attention_dim, inner, vb.pp("to_v"))?,
                to_out: linear(inner, c, vb.pp("to_out").pp("0"))?,
                qk_norm: qk_norms(cfg.qk_norm, inner, inner, &vb)?,
                heads: cfg.num_cross_attention_heads,
                backend,
            },
        })
    }

    /// `x`: `(B, N, C)`, `text`: `(B, L, C)`, `text_mask`: `(B, L)`, nonzero = keep -> `(B, N, C)`.
    /// Padded keys are excluded. (diffusers adds a -10000 bias instead: the same result unless
    /// every key of a row is padding, where diffusers averages all keys.)
    pub fn forward(&self, x: &Tensor, text: &Tensor, text_mask: Option<&Tensor>) -> Result<Tensor> {
        let (q, k, v) = self.proj.qkv(x, text)?;
        let o = attend(&self.proj.backend, &AttentionInput::new(&q, &k, &v).key_mask(text_mask))?;
        self.proj.output(&o, x.dtype())
    }

    pub fn backend(&self) -> &Backend {
        &self.proj.backend
    }
}
