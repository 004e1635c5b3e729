//! Head layouts: projections are token-major `(B, N, parts·H·D)`, the attention kernels read and
//! write head-major `(B, H, N, D)`. On the GPU each change of layout is one gather kernel
//! (layers/cuda); elsewhere, views and tensor-op copies.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// `x` `(B, N, parts·H·D)` -> `parts` contiguous tensors `(B, H, N, D)` (q, k, v of a fused
/// projection: `parts = 3`).
pub fn split_heads(x: &Tensor, parts: usize, heads: usize) -> Result<Vec<Tensor>> {
    let (b, n, all) = x.dims3()?;
    if parts == 0 || heads == 0 || all % (parts * heads) != 0 {
        return Err(Error::Other(format!("cannot split {all} channels into {parts} parts of {heads} heads")));
    }
    let c = all / parts;
    let d = c / heads;
    #[cfg(feature = "cuda")]
    if super::cuda::fused_kernels_apply(x) && x.is_contiguous() {
        let dims = [parts, b, heads, n];
        let strides = [c, n * all, d, all];
        if let Some(out) = super::cuda::gather_rows(x, dims, strides, d, &[parts, b, heads, n, d])? {
            return (0..parts).map(|i| Ok(out.narrow(0, i, 1)?.squeeze(0)?)).collect();
        }
    }
    let x = x.reshape((b, n, parts, heads, d))?;
    (0..parts).map(|i| Ok(x.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?)).collect()
}

/// `(B, H, N, D)` -> `(B, N, H·D)`; channel index `head·D + j`.
pub fn merge_heads(o: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = o.dims4()?;
    #[cfg(feature = "cuda")]
    if super::cuda::fused_kernels_apply(o) && o.is_contiguous() {
        if let Some(out) = super::cuda::gather_rows(o, [1, b, n, h], [0, h * n * d, d, n * d], d, &[b, n, h * d])? {
            return Ok(out);
        }
    }
    Ok(o.transpose(1, 2)?.reshape((b, n, h * d))?)
}
