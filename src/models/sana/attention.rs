//! SANA's two attention layers. The projections live here; the attention itself is always
//! [`attend`] with the backend resolved for the layer at load time.
//!
//! - `attn1`, self-attention over image tokens (linear attention in every released SANA):
//!   `to_q, to_k, to_v` (bias per `attention_bias`), optional `norm_q, norm_k`, `to_out.0` (bias).
//! - `attn2`, cross-attention to the text (softmax, text padding mask): all projections biased.

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use super::config::{QkNorm, SanaConfig};
use crate::attention::plan::{AttentionPlan, LayerRef};
use crate::attention::{attend, AttentionInput, Backend, LayerShape, Role};
use crate::error::Result;
use crate::layers::{merge_heads, project, split_heads as split_parts, RmsNorm};

/// qk-norm eps (diffusers `Attention(eps=1e-5)`).
const QK_NORM_EPS: f64 = 1e-5;

/// `(B, N, heads·d)` -> `(B, heads, N, d)`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    Ok(x.reshape((b, n, heads, c / heads))?.transpose(1, 2)?.contiguous()?)
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

/// Several checkpoint Linears (q, k, v of self-attention; k, v of cross-attention) applied as one
/// GEMM on their shared input, the weight being their row-wise concatenation.
///
/// The concatenation is a copy. Made once at load time it would freeze Vars: an optimizer updates
/// a Var in place (`Var::set`), the copy keeps the old values, the forward pass never sees the
/// update while the gradients still reach the Vars — the model trained is then not the model
/// saved. So when the parts are Vars (training) the copy is made again at every forward.
#[derive(Debug, Clone)]
enum FusedLinear {
    /// Plain tensors: concatenated once, at load time.
    Fixed(Linear),
    /// The parts (weights, biases) while they are Vars, concatenated at every forward.
    Trainable(Vec<Tensor>, Option<Vec<Tensor>>),
}

impl FusedLinear {
    /// `outs`: (output width, checkpoint name) per part. The init hints are candle_nn::linear's,
    /// so that a fresh VarMap starts every part as a Linear would (not at zero: zero q and k
    /// never move).
    fn new(in_dim: usize, outs: &[(usize, &str)], bias: bool, vb: &VarBuilder) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let weights = outs
            .iter()
            .map(|(out, name)| vb.pp(*name).get_with_hints((*out, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let biases = if bias {
            let init = candle_nn::Init::Uniform { lo: -bound, up: bound };
            Some(outs.iter().map(|(out, name)| vb.pp(*name).get_with_hints(*out, "bias", init)).collect::<candle_core::Result<Vec<_>>>()?)
        } else {
            None
        };
        if weights.iter().chain(biases.iter().flatten()).any(Tensor::is_variable) {
            Ok(Self::Trainable(weights, biases))
        } else {
            Ok(Self::Fixed(Self::concatenate(&weights, biases.as_deref())?))
        }
    }

    fn concatenate(weights: &[Tensor], biases: Option<&[Tensor]>) -> Result<Linear> {
        Ok(Linear::new(Tensor::cat(weights, 0)?, biases.map(|b| Tensor::cat(b, 0)).transpose()?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Fixed(linear) => Ok(linear.forward(x)?),
            Self::Trainable(weights, biases) => Ok(Self::concatenate(weights, biases.as_deref())?.forward(x)?),
        }
    }
}

/// `(B, N, parts·C)` -> the `i`-th of `parts` blocks of C channels, as `(B, heads, N, d)`: a view,
/// no copy (the reshape comes before the narrow, while the tensor is still contiguous).
fn head_view(x: &Tensor, part: usize, width: usize, heads: usize) -> Result<Tensor> {
    let (b, n, all) = x.dims3()?;
    let parts = all / width;
    let x = x.reshape((b, n, parts, heads, width / heads))?;
    Ok(x.narrow(2, part, 1)?.squeeze(2)?.transpose(1, 2)?)
}

/// The output projection, optionally without its bias for a caller that folds it into the gated
/// residual (`layers::gated_residual`).
fn output(to_out: &Linear, o: &Tensor, dtype: DType, with_bias: bool) -> Result<Tensor> {
    let merged = merge_heads(&o.to_dtype(dtype)?)?;
    if with_bias {
        Ok(to_out.forward(&merged)?)
    } else {
        project(&merged, to_out.weight())
    }
}

/// `attn1`: self-attention over the image tokens.
#[derive(Debug, Clone)]
pub struct SanaSelfAttention {
    /// `to_q`, `to_k`, `to_v` concatenated: `(3C, C)`.
    qkv: FusedLinear,
    to_out: Linear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    backend: Backend,
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
            qkv: FusedLinear::new(c, &[(c, "to_q"), (c, "to_k"), (c, "to_v")], cfg.attention_bias, &vb)?,
            to_out: linear(c, c, vb.pp("to_out").pp("0"))?,
            qk_norm: qk_norms(cfg.qk_norm, c, c, &vb)?,
            heads: cfg.num_attention_heads,
            backend,
        })
    }

    /// `x`: `(B, N, C)` tokens of a `grid = [h, w]` -> `(B, N, C)`.
    pub fn forward(&self, x: &Tensor, grid: [usize; 2]) -> Result<Tensor> {
        let out = self.attend(x, grid, true)?;
        // diffusers clips the linear-attention output to the f16 range in f16.
        if x.dtype() == DType::F16 {
            return Ok(out.clamp(-65504f32, 65504f32)?);
        }
        Ok(out)
    }

    /// [`Self::forward`] without the output projection's bias, and that bias, for the block's
    /// fused gated residual. Not for f16 (the clip comes after the bias).
    pub fn forward_unbiased(&self, x: &Tensor, grid: [usize; 2]) -> Result<(Tensor, Option<&Tensor>)> {
        Ok((self.attend(x, grid, false)?, self.to_out.bias()))
    }

    fn attend(&self, x: &Tensor, grid: [usize; 2], with_bias: bool) -> Result<Tensor> {
        let c = x.dim(2)?;
        let qkv = self.qkv.forward(x)?;
        let (q, k, v) = match &self.qk_norm {
            None => {
                let mut parts = split_parts(&qkv, 3, self.heads)?.into_iter();
                let mut next = || parts.next().ok_or_else(|| crate::error::Error::Other("qkv split".into()));
                (next()?, next()?, next()?)
            }
            Some((norm_q, norm_k)) => {
                let q = norm_q.forward(&qkv.narrow(2, 0, c)?)?;
                let k = norm_k.forward(&qkv.narrow(2, c, c)?)?;
                (split_heads(&q, self.heads)?, split_heads(&k, self.heads)?, head_view(&qkv, 2, c, self.heads)?)
            }
        };
        let o = attend(&self.backend, &AttentionInput::new(&q, &k, &v).grid(Some(&grid)))?;
        output(&self.to_out, &o, x.dtype(), with_bias)
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

/// The text side of a cross-attention layer: keys and values `(B, heads, L, d)` (views), computed
/// once per prompt and reused at every denoising step (the text does not change between steps).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone)]
pub struct TextKv {
    /// The fused k|v projection `(B, L, 2·inner)`, contiguous: the storage `v` (and `k` without
    /// qk-norm) are views of.
    kv: Tensor,
    /// With qk-norm: the normalized keys `(B, heads, L, d)`, contiguous; `k` is this tensor.
    k_normed: Option<Tensor>,
    heads: usize,
    k: Tensor,
    v: Tensor,
}

// Only CUDA graphs copy text contexts.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl TextKv {
    fn from_parts(kv: Tensor, k_normed: Option<Tensor>, heads: usize) -> Result<Self> {
        let inner = kv.dim(2)? / 2;
        let k = match &k_normed {
            Some(k) => k.clone(),
            None => head_view(&kv, 0, inner, heads)?,
        };
        let v = head_view(&kv, 1, inner, heads)?;
        Ok(Self { kv, k_normed, heads, k, v })
    }

    /// A copy in fresh device memory, with the same layout (a CUDA graph reads its own copy).
    pub(crate) fn deep_copy(&self) -> Result<Self> {
        Self::from_parts(self.kv.copy()?, self.k_normed.as_ref().map(|k| k.copy()).transpose()?, self.heads)
    }

    /// Overwrites this text's values in place with `src`'s (same shapes): every view of this
    /// storage, a captured graph's included, reads the new text.
    pub(crate) fn copy_from(&self, src: &TextKv) -> Result<()> {
        self.kv.slice_set(&src.kv, 0, 0)?;
        if let (Some(dst), Some(src)) = (&self.k_normed, &src.k_normed) {
            dst.slice_set(src, 0, 0)?;
        }
        Ok(())
    }

    pub(crate) fn dims(&self) -> &[usize] {
        self.kv.dims()
    }
}

/// `attn2`: cross-attention from the image tokens to the text tokens.
#[derive(Debug, Clone)]
pub struct SanaCrossAttention {
    to_q: Linear,
    /// `to_k`, `to_v` concatenated: `(2·inner, C_text)`.
    kv: FusedLinear,
    to_out: Linear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    backend: Backend,
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
            to_q: linear(c, inner, vb.pp("to_q"))?,
            kv: FusedLinear::new(cfg.cross_attention_dim, &[(inner, "to_k"), (inner, "to_v")], true, &vb)?,
            to_out: linear(inner, c, vb.pp("to_out").pp("0"))?,
            qk_norm: qk_norms(cfg.qk_norm, inner, inner, &vb)?,
            heads: cfg.num_cross_attention_heads,
            backend,
        })
    }

    /// The keys and values of `text` `(B, L, C)`.
    pub fn text_kv(&self, text: &Tensor) -> Result<TextKv> {
        let kv = self.kv.forward(text)?.contiguous()?;
        let inner = kv.dim(2)? / 2;
        let k_normed = match &self.qk_norm {
            Some((_, norm_k)) => Some(split_heads(&norm_k.forward(&kv.narrow(2, 0, inner)?)?, self.heads)?),
            None => None,
        };
        TextKv::from_parts(kv, k_normed, self.heads)
    }

    /// `x`: `(B, N, C)`, `text`: `(B, L, C)`, `text_mask`: `(B, L)`, nonzero = keep -> `(B, N, C)`.
    /// Padded keys are excluded. (diffusers adds a -10000 bias instead: the same result unless
    /// every key of a row is padding, where diffusers averages all keys.)
    pub fn forward(&self, x: &Tensor, text: &Tensor, text_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_cached(x, &self.text_kv(text)?, text_mask, true)
    }

    /// [`Self::forward`] with the text's keys and values from [`Self::text_kv`]; `with_bias: false`
    /// leaves out the output projection's bias (see [`Self::output_bias`]).
    pub fn forward_cached(&self, x: &Tensor, text: &TextKv, text_mask: Option<&Tensor>, with_bias: bool) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let q = match &self.qk_norm {
            Some((norm_q, _)) => norm_q.forward(&q)?,
            None => q,
        };
        let inner = q.dim(2)?;
        let q = head_view(&q, 0, inner, self.heads)?;
        let o = attend(&self.backend, &AttentionInput::new(&q, &text.k, &text.v).key_mask(text_mask))?;
        output(&self.to_out, &o, x.dtype(), with_bias)
    }

    pub fn output_bias(&self) -> Option<&Tensor> {
        self.to_out.bias()
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}
