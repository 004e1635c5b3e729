//! Softmax attention with an explicit additive logit bias: the shared core of the sparse references
//! (neighborhood and pyramid). Written for clarity; it is the oracle, not the fast path.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// `softmax(scale * q k^T + bias) v` and its natural-log log-sum-exp, all in f32.
///
/// - `q`: `(.., Nq, D)`, `k`: `(.., Nk, D)`, `v`: `(.., Nk, Dv)`.
/// - `bias`: broadcastable to `(.., Nq, Nk)`. `0` attends a key, `-inf` masks it out, any other
///   finite value is added to the logit (PSA adds `ln(pool factor)`).
///
/// Returns `(out (.., Nq, Dv), lse (.., Nq))`. A row that masks every key gets `out = 0` and
/// `lse = -inf`, the convention of [`super::merge_partials`] for "contributes nothing".
pub fn masked_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let q = q.to_dtype(DType::F32)?;
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let bias = bias.to_dtype(DType::F32)?;

    let k_t = k.transpose(D::Minus2, D::Minus1)?.contiguous()?;
    let logits = (q.contiguous()?.matmul(&k_t)? * scale)?.broadcast_add(&bias)?;

    // Row max for a stable exp; a fully masked row has max -inf, shift it by 0 instead so that
    // exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
    let row_max = logits.max_keepdim(D::Minus1)?;
    let finite = row_max.ge(f32::MIN as f64)?;
    let shift = finite.where_cond(&row_max, &row_max.zeros_like()?)?;

    let weights = logits.broadcast_sub(&shift)?.exp()?;
    let row_sum = weights.sum_keepdim(D::Minus1)?;
    let out = weights
        .matmul(&v.contiguous()?)?
        .broadcast_div(&row_sum.maximum(f32::MIN_POSITIVE as f64)?)?;
    let lse = (row_sum.log()? + shift)?.squeeze(D::Minus1)?;
    Ok((out, lse))
}
