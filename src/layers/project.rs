//! `x · Wᵀ` on the last dimension: a Linear layer's product without its bias, for callers that
//! fold the bias into a fused kernel after it (layers/cuda).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// `x`: `(..., K)`, `weight`: `(M, K)` -> `(..., M)`, one GEMM over all leading dims.
pub fn project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (m, k) = weight.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(Error::Other(format!("projection: input {:?} does not end in {k} features", dims)));
    }
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("checked above") = m;
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&weight.t()?)?;
    Ok(y.reshape(out_dims)?)
}
