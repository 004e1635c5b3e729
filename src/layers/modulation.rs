//! AdaLN-single modulation: a per-block learned table plus the shared timestep vector.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// `(table[None] + temb.reshape(B, n, C))` split into `n` tensors of shape `(B, 1, C)`.
/// `table`: `(n, C)`; `temb`: `(B, n·C)` (the 6C vector of a block) or `(B, C)` broadcast over the
/// rows when `n` rows share one vector (the final layer, where `temb` is `(B, C)`).
pub fn modulation_chunks(table: &Tensor, temb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let (rows, c) = table.dims2()?;
    if rows != n {
        return Err(Error::Other(format!("modulation table has {rows} rows, expected {n}")));
    }
    let b = temb.dim(0)?;
    let temb = match temb.dims() {
        [_, w] if *w == n * c => temb.reshape((b, n, c))?,
        [_, w] if *w == c => temb.reshape((b, 1, c))?,
        d => return Err(Error::Other(format!("timestep embedding {d:?} does not match a ({n}, {c}) modulation table"))),
    };
    let summed = table.unsqueeze(0)?.to_dtype(temb.dtype())?.broadcast_add(&temb)?;
    Ok((0..n).map(|i| summed.narrow(1, i, 1)).collect::<candle_core::Result<Vec<_>>>()?)
}

/// `LayerNorm(x) * (1 + scale) + shift` (no-affine LayerNorm): SANA's norm + modulation. On the GPU
/// one fused kernel (layers/cuda), rounding once; elsewhere the tensor ops of
/// [`norm_modulate_reference`]. While gradients are recorded (any input tracks), on every device,
/// the custom op with a backward pass ([`super::train_ops::norm_modulate_tracked`]).
pub fn norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if x.track_op() || shift.track_op() || scale.track_op() {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.dim(candle_core::D::Minus1)? > super::cuda::NORM_MAX_CHANNELS {
            return norm_modulate_reference(x, shift, scale, eps);
        }
        return super::train_ops::norm_modulate_tracked(x, shift, scale, eps);
    }
    #[cfg(feature = "cuda")]
    if super::cuda::fused_kernels_apply(x) && x.dim(candle_core::D::Minus1)? <= super::cuda::NORM_MAX_CHANNELS {
        return super::cuda::layer_norm_modulate(x, shift, scale, eps);
    }
    norm_modulate_reference(x, shift, scale, eps)
}

/// [`norm_modulate`] as tensor ops: the LayerNorm in f32, the modulation in `x`'s dtype.
pub fn norm_modulate_reference(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    modulate(&super::norm::layer_norm_no_affine(x, eps)?, shift, scale)
}

/// `x + (y + bias) * gate`: a DiT block's gated residual with the bias of the projection that made
/// `y` folded in. `x`, `y`: `(B, N, C)`; `bias`: `(C,)`; `gate`: `(B, 1, C)`. On the GPU one fused
/// kernel (rounding once); elsewhere tensor ops. While gradients are recorded (any input tracks),
/// on every device, the custom op with a backward pass ([`super::train_ops::gated_residual_tracked`]).
pub fn gated_residual(x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: Option<&Tensor>) -> Result<Tensor> {
    if [Some(x), Some(y), bias, gate].into_iter().flatten().any(Tensor::track_op) {
        return super::train_ops::gated_residual_tracked(x, y, bias, gate);
    }
    #[cfg(feature = "cuda")]
    if super::cuda::fused_kernels_apply(x) {
        return super::cuda::gated_residual(x, y, bias, gate);
    }
    gated_residual_reference(x, y, bias, gate)
}

/// [`gated_residual`] as tensor ops.
pub fn gated_residual_reference(x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: Option<&Tensor>) -> Result<Tensor> {
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y.clone(),
    };
    let y = match gate {
        Some(g) => y.broadcast_mul(g)?,
        None => y,
    };
    Ok((x + y)?)
}

/// `x * (1 + scale) + shift`, with `shift`, `scale` broadcast over tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}
