//! Training forms of the fused layer ops: candle custom ops with a backward pass, so that a
//! training step runs one kernel per op and per gradient instead of the chain of small tensor ops
//! (each starting its gradients from `zeros_like` and adding into them).
//!
//! - [`norm_modulate_tracked`]: `y = LN(x) · (1 + scale) + shift` (no-affine LayerNorm, f32
//!   statistics). With `x̂ = (x - μ) / σ` and `ĝ = dy · (1 + scale)`:
//!   `dx = (ĝ - mean_c(ĝ) - x̂ · mean_c(ĝ · x̂)) / σ`, `dshift = Σ_n dy`, `dscale = Σ_n dy · x̂`
//!   (sums over the N tokens of each batch row).
//! - [`gated_residual_tracked`]: `out = x + (y + bias) · gate`. `dx = dout`, `dy = dout · gate`,
//!   `dgate = Σ_n dout · (y + bias)`; the bias is a separate broadcast add before the op (candle's
//!   custom ops take at most three inputs), so its gradient `Σ_{b,n} dy` comes from autograd.
//!
//! The backward passes are themselves custom ops (without gradient) whose one output packs every
//! gradient along the token axis: `(B, N + 2, C)` = `[dx; dshift; dscale]` for the norm,
//! `(B, N + 1, C)` = `[dy; dgate]` for the residual. On the CPU plain loops in f32 (the reference
//! the GPU kernels are checked against); on CUDA the kernels of kernels/ops/*_bwd.cu.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// `LayerNorm(x) · (1 + scale) + shift` as one op with a backward pass. `x`: `(B, N, C)`; `shift`,
/// `scale`: `(B, 1, C)` or `(B, C)`, same dtype as `x` (f32, bf16 or f16).
pub fn norm_modulate_tracked(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let what = "norm + modulation (training op)";
    let (b, _, c) = x.dims3()?;
    let shift = batch_rows(shift, x, b, c, "shift", what)?;
    let scale = batch_rows(scale, x, b, c, "scale", what)?;
    Ok(x.contiguous()?.apply_op3(&shift, &scale, NormModulate { eps: eps as f32 })?)
}

/// `x + (y + bias) · gate` with a backward pass. `x`, `y`: `(B, N, C)`; `bias`: `(C,)`; `gate`:
/// `(B, 1, C)` or `(B, C)`. Without a gate there is nothing to fuse: plain tensor ops.
pub fn gated_residual_tracked(x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: Option<&Tensor>) -> Result<Tensor> {
    let what = "gated residual (training op)";
    let (b, _, c) = x.dims3()?;
    if y.dims() != x.dims() || y.dtype() != x.dtype() {
        return Err(Error::Other(format!("{what}: y {:?} {:?} must match x {:?} {:?}", y.dims(), y.dtype(), x.dims(), x.dtype())));
    }
    let y = match bias {
        Some(bias) if bias.dims() != [c] => return Err(Error::Other(format!("{what}: bias must be ({c},), got {:?}", bias.dims()))),
        Some(bias) => y.broadcast_add(bias)?,
        None => y.clone(),
    };
    let Some(gate) = gate else { return Ok((x + y)?) };
    let gate = batch_rows(gate, x, b, c, "gate", what)?;
    Ok(x.contiguous()?.apply_op3(&y.contiguous()?, &gate, GatedResidual)?)
}

/// `t` as a contiguous `(B, 1, C)` tensor of `x`'s dtype, or a clear error.
fn batch_rows(t: &Tensor, x: &Tensor, b: usize, c: usize, name: &str, what: &str) -> Result<Tensor> {
    if t.dtype() != x.dtype() {
        return Err(Error::Other(format!("{what}: {name} is {:?}, x is {:?}", t.dtype(), x.dtype())));
    }
    if t.elem_count() != b * c || t.dim(0)? != b || t.dims().last() != Some(&c) {
        return Err(Error::Other(format!("{what}: {name} must be ({b}, 1, {c}) rows, got {:?}", t.dims())));
    }
    Ok(t.reshape((b, 1, c))?.contiguous()?)
}

pub(crate) fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `(B, N, C)` of the first input of an op; the other two must be `(B, 1, C)` (or `(B, N, C)`
/// where `full` says so).
fn op_dims(what: &str, l1: &Layout, l2: &Layout, l3: &Layout, full: [bool; 2]) -> candle_core::Result<(usize, usize, usize)> {
    let (b, n, c) = l1.shape().dims3()?;
    for (l, full) in [(l2, full[0]), (l3, full[1])] {
        let want = [b, if full { n } else { 1 }, c];
        if l.shape().dims() != want {
            return Err(msg(format!("{what}: input {:?} where {want:?} was expected", l.shape().dims())));
        }
    }
    Ok((b, n, c))
}

/// The elements of a contiguous CPU input, widened to f32.
pub(crate) fn f32_values(s: &CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Vec<f32>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| msg(format!("{what}: input is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(v[start..end].to_vec()),
        CpuStorage::BF16(v) => Ok(v[start..end].iter().map(|e| e.to_f32()).collect()),
        CpuStorage::F16(v) => Ok(v[start..end].iter().map(|e| e.to_f32()).collect()),
        other => Err(msg(format!("{what}: no CPU implementation for {:?}", other.dtype()))),
    }
}

/// f32 results rounded once to `dtype`.
pub(crate) fn storage_of(values: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
        _ => CpuStorage::F32(values),
    }
}

/// The three inputs of a row op on the CPU: `(B, N, C)` as [`op_dims`] checks it, their common
/// dtype, and their values widened to f32.
type CpuInputs = ((usize, usize, usize), DType, [Vec<f32>; 3]);
fn cpu_inputs(what: &str, s: [(&CpuStorage, &Layout); 3], full: [bool; 2]) -> candle_core::Result<CpuInputs> {
    let dims = op_dims(what, s[0].1, s[1].1, s[2].1, full)?;
    let dtype = same_dtype(what, [s[0].0, s[1].0, s[2].0])?;
    let [a, b, c] = s.map(|(st, l)| f32_values(st, l, what));
    Ok((dims, dtype, [a?, b?, c?]))
}

fn same_dtype(what: &str, s: [&CpuStorage; 3]) -> candle_core::Result<DType> {
    let dtype = s[0].dtype();
    if s.iter().any(|s| s.dtype() != dtype) {
        return Err(msg(format!("{what}: inputs of mixed dtypes")));
    }
    Ok(dtype)
}

/// Mean and 1/σ of one row (two-pass, as the kernel: no cancellation).
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let c = row.len() as f32;
    let mean = row.iter().sum::<f32>() / c;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Forward of [`norm_modulate_tracked`]: inputs `(x, shift, scale)`.
struct NormModulate {
    eps: f32,
}

impl CustomOp3 for NormModulate {
    fn name(&self) -> &'static str {
        "norm-modulate"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((b, n, c), dtype, [x, shift, scale]) = cpu_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)], [false, false])?;
        let mut y = vec![0f32; b * n * c];
        for (r, (row, out)) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)).enumerate() {
            let (mean, rstd) = row_stats(row, self.eps);
            let m = (r / n) * c;
            for k in 0..c {
                out[k] = (row[k] - mean) * rstd * (1.0 + scale[m + k]) + shift[m + k];
            }
        }
        Ok((storage_of(y, dtype), Shape::from((b, n, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = op_dims(self.name(), l1, l2, l3, [false, false])?;
        let out = super::cuda::train::norm_modulate_forward((s1, l1), (s2, l2), (s3, l3), dims, self.eps).map_err(msg)?;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _shift: &Tensor, scale: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.dim(1)?;
        let packed = dy.contiguous()?.apply_op3_no_bwd(x, scale, &NormModulateBackward { eps: self.eps })?;
        Ok((Some(packed.narrow(1, 0, n)?), Some(packed.narrow(1, n, 1)?), Some(packed.narrow(1, n + 1, 1)?)))
    }
}

/// Gradients of [`NormModulate`]: inputs `(dy, x, scale)`, output `(B, N + 2, C)` =
/// `[dx; dshift; dscale]` (the shift does not enter the gradients).
struct NormModulateBackward {
    eps: f32,
}

impl CustomOp3 for NormModulateBackward {
    fn name(&self) -> &'static str {
        "norm-modulate-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((b, n, c), dtype, [dy, x, scale]) = cpu_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)], [true, false])?;
        let mut packed = vec![0f32; b * (n + 2) * c];
        let (mut x_hat, mut g_hat) = (vec![0f32; c], vec![0f32; c]);
        for bi in 0..b {
            let s = &scale[bi * c..(bi + 1) * c];
            let (dx_rows, mod_rows) = packed[bi * (n + 2) * c..(bi + 1) * (n + 2) * c].split_at_mut(n * c);
            let (dshift, dscale) = mod_rows.split_at_mut(c);
            for t in 0..n {
                let at = (bi * n + t) * c;
                let (row, g) = (&x[at..at + c], &dy[at..at + c]);
                let (mean, rstd) = row_stats(row, self.eps);
                for k in 0..c {
                    x_hat[k] = (row[k] - mean) * rstd;
                    g_hat[k] = g[k] * (1.0 + s[k]);
                    dshift[k] += g[k];
                    dscale[k] += g[k] * x_hat[k];
                }
                let mean_g = g_hat.iter().sum::<f32>() / c as f32;
                let mean_gx = g_hat.iter().zip(&x_hat).map(|(g, h)| g * h).sum::<f32>() / c as f32;
                for (k, dx) in dx_rows[t * c..(t + 1) * c].iter_mut().enumerate() {
                    *dx = (g_hat[k] - mean_g - x_hat[k] * mean_gx) * rstd;
                }
            }
        }
        Ok((storage_of(packed, dtype), Shape::from((b, n + 2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, n, c) = op_dims(self.name(), l1, l2, l3, [true, false])?;
        let out = super::cuda::train::norm_modulate_backward((s1, l1), (s2, l2), (s3, l3), (b, n, c), self.eps).map_err(msg)?;
        Ok((out, Shape::from((b, n + 2, c))))
    }
}

/// Forward of [`gated_residual_tracked`]: inputs `(x, y, gate)`, `y` with the bias already added.
struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "gated-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((b, n, c), dtype, [x, y, gate]) = cpu_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)], [true, false])?;
        let out = (0..b * n * c).map(|i| x[i] + y[i] * gate[(i / (n * c)) * c + i % c]).collect();
        Ok((storage_of(out, dtype), Shape::from((b, n, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = op_dims(self.name(), l1, l2, l3, [true, false])?;
        let out = super::cuda::train::gated_residual_forward((s1, l1), (s2, l2), (s3, l3), dims).map_err(msg)?;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, gate: &Tensor, _out: &Tensor, dout: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = y.dim(1)?;
        let packed = dout.contiguous()?.apply_op3_no_bwd(y, gate, &GatedResidualBackward)?;
        Ok((Some(dout.clone()), Some(packed.narrow(1, 0, n)?), Some(packed.narrow(1, n, 1)?)))
    }
}

/// Gradients of [`GatedResidual`] with respect to `y` and `gate`: inputs `(dout, y, gate)`,
/// output `(B, N + 1, C)` = `[dy; dgate]`.
struct GatedResidualBackward;

impl CustomOp3 for GatedResidualBackward {
    fn name(&self) -> &'static str {
        "gated-residual-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((b, n, c), dtype, [dout, y, gate]) = cpu_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)], [true, false])?;
        let mut packed = vec![0f32; b * (n + 1) * c];
        for bi in 0..b {
            let g = &gate[bi * c..(bi + 1) * c];
            let (dy_rows, dgate) = packed[bi * (n + 1) * c..(bi + 1) * (n + 1) * c].split_at_mut(n * c);
            for t in 0..n {
                let at = (bi * n + t) * c;
                for k in 0..c {
                    dy_rows[t * c + k] = dout[at + k] * g[k];
                    dgate[k] += dout[at + k] * y[at + k];
                }
            }
        }
        Ok((storage_of(packed, dtype), Shape::from((b, n + 1, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, n, c) = op_dims(self.name(), l1, l2, l3, [true, false])?;
        let out = super::cuda::train::gated_residual_backward((s1, l1), (s2, l2), (s3, l3), (b, n, c)).map_err(msg)?;
        Ok((out, Shape::from((b, n + 1, c))))
    }
}
