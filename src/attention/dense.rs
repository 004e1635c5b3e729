//! Dense softmax attention: `softmax(q kᵀ · scale) v` over all attended keys.
//!
//! The f32 CPU [`reference`] is written with plain candle ops for clarity; it is the oracle the
//! CUDA kernel is tested against. [`forward`] validates the call, runs the kernel on the GPU (once
//! it exists) and the reference otherwise.
//!
//! Masking convention: a query row whose attended key set is empty (every main key masked out and
//! no extra tokens) has output 0 and log-sum-exp `-inf`; it never produces NaN. This is what makes
//! [`super::merge_partials`] treat such a row as "contributes nothing".

use super::{AttentionInput, LayerShape};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DenseParams {
    /// Softmax scale; `None` = `head_dim^-0.5`.
    pub scale: Option<f64>,
}

impl DenseParams {
    /// Dense attention serves every role, any head dim and masked keys; the only thing it cannot
    /// do is a layer without a head dimension, or a scale that is not a finite number.
    pub fn check(&self, layer: &LayerShape) -> std::result::Result<(), String> {
        if layer.head_dim == 0 {
            return Err("head_dim is 0".into());
        }
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(format!("softmax scale {s} is not finite"));
            }
        }
        Ok(())
    }

    /// The softmax scale for a given head dim.
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or(1.0 / (head_dim as f64).sqrt())
    }
}

fn bad(msg: String) -> Error {
    Error::Other(format!("dense attention: {msg}"))
}

/// f32 reference of softmax attention.
///
/// - `q`: `(B, H, Nq, D)`, `k`, `v`: `(B, H, Nk, D)`, any float dtype (computed in f32).
/// - `key_mask`: `(B, Nk)`, nonzero = attend; applies to the main keys only.
/// - `extra_kv`: `(B, H, Ne, D)` keys and values attended by every query, never masked (the other
///   sequence of a joint attention). Equivalent to concatenating them after the main keys.
/// - `scale`: multiplies the logits `q·k`.
///
/// Returns `(out, lse)`: `out` `(B, H, Nq, D)` f32 and `lse` `(B, H, Nq)` f32, the natural-log
/// log-sum-exp of the scaled logits over the attended keys. A row with no attended key gets
/// `out = 0` and `lse = -inf`.
pub fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    extra_kv: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, h, nq, nk, _d) = super::check_qkv(q, k, v)?;
    let q = q.to_dtype(DType::F32)?;
    let mut k = k.to_dtype(DType::F32)?;
    let mut v = v.to_dtype(DType::F32)?;

    // (B, Nk) attend flags for the main keys; `None` = every key is attended (no masking work).
    let mut attend = match key_mask {
        Some(mask) => {
            if mask.dims() != [b, nk] {
                return Err(bad(format!("key_mask must be (B, Nk) = ({b}, {nk}), got {:?}", mask.dims())));
            }
            Some(mask.to_dtype(DType::F32)?.ne(0f64)?)
        }
        None => None,
    };

    if let Some((ek, ev)) = extra_kv {
        let (be, he, ne, de) = ek.dims4().map_err(|_| bad(format!("extra keys must be (B,H,N,D), got {:?}", ek.dims())))?;
        if ev.dims() != ek.dims() || (be, he, de) != (b, h, q.dim(3)?) {
            return Err(bad(format!(
                "extra keys {:?} / values {:?} do not match q {:?}",
                ek.dims(),
                ev.dims(),
                q.dims()
            )));
        }
        k = Tensor::cat(&[&k, &ek.to_dtype(DType::F32)?], 2)?;
        v = Tensor::cat(&[&v, &ev.to_dtype(DType::F32)?], 2)?;
        // Extra tokens are attended by every query.
        if let Some(main) = attend {
            attend = Some(Tensor::cat(&[&main, &Tensor::ones((b, ne), DType::U8, q.device())?], 1)?);
        }
    }
    let n_keys = k.dim(2)?;

    // Scaled logits (B, H, Nq, Nk'), with masked keys set to -inf.
    let mut logits = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(attend) = attend {
        let logit_shape = (b, h, nq, n_keys);
        let attend = attend.reshape((b, 1, 1, n_keys))?.broadcast_as(logit_shape)?.contiguous()?;
        let neg_inf = Tensor::full(f32::NEG_INFINITY, logit_shape, q.device())?;
        logits = attend.where_cond(&logits, &neg_inf)?;
    }

    // Softmax with the row max subtracted. A fully masked row has max -inf: shift by 0 instead,
    // so exp(-inf - 0) = 0 and the row sum is 0 (not NaN).
    let row_max = logits.max_keepdim(D::Minus1)?;
    let row_max = row_max.ge(f32::MIN as f64)?.where_cond(&row_max, &row_max.zeros_like()?)?;
    let weights = logits.broadcast_sub(&row_max)?.exp()?;
    let row_sum = weights.sum_keepdim(D::Minus1)?;

    // An empty row has weights 0, so its numerator is 0; dividing by a tiny positive number keeps it 0.
    let numerator = weights.matmul(&v.contiguous()?)?;
    let out = numerator.broadcast_div(&row_sum.maximum(f32::MIN_POSITIVE as f64)?)?;
    // log(0) = -inf for empty rows, and -inf + 0 stays -inf.
    let lse = (row_sum.log()? + row_max)?.squeeze(D::Minus1)?;
    Ok((out, lse))
}

/// Dense attention for one call: `(out, lse)`, `out` in the dtype of `q`, `lse` `(B, H, Nq)` f32.
pub fn forward(p: &DenseParams, input: &AttentionInput) -> Result<(Tensor, Tensor)> {
    let (_b, _h, _nq, _nk, d) = super::check_qkv(input.q, input.k, input.v)?;
    if input.rope.is_some() {
        return Err(bad("rotary tables are applied by the caller for softmax attention, not passed in".into()));
    }
    let scale = p.scale_for(d);

    #[cfg(feature = "cuda")]
    if input.q.device().is_cuda() && super::cuda::dense::supports(input.q.dtype(), d) && !super::reference_only() {
        return super::cuda::dense::forward(input.q, input.k, input.v, input.key_mask, input.extra_kv, scale);
    }

    let (out, lse) = reference(input.q, input.k, input.v, input.key_mask, input.extra_kv, scale)?;
    Ok((out.to_dtype(input.q.dtype())?, lse))
}
