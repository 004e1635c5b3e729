//! The middle of the Mix-FFN (GLUMBConv) as one training op with a backward pass, on channels-last
//! tokens of an `H`×`W` grid:
//!
//!   a = SiLU(u)                              u: (B, N, 2h), the expanded tokens with their bias
//!   d = depthwise3x3(a; w) + db              w: (2h, 3, 3), zero padding 1 (cross-correlation)
//!   out = d[.., :h] · SiLU(d[.., h:])        out: (B, N, h)
//!
//! Backward, with σ the logistic and SiLU'(z) = σ(z) · (1 + z · (1 - σ(z))):
//!   dd[.., :h] = dout · SiLU(d[.., h:]),   dd[.., h:] = dout · d[.., :h] · SiLU'(d[.., h:])
//!   ddb[k] = Σ_{b,p} dd[p, k],   dw[k, t] = Σ_{b,p} dd[p, k] · a[p + offset(t), k]
//!   du[q, k] = SiLU'(u[q, k]) · Σ_t w[k, t] · dd[q - offset(t), k]
//!
//! The depth-wise weight and bias travel as one `(2h, 10)` tensor (9 taps, then the bias) so the
//! op has two inputs and its backward three (candle's custom ops take at most three). The
//! gradients come back packed in one flat tensor: `[du (B·N·2h); dwb (2h·10)]`. On the CPU plain
//! loops in f32 (the reference of the kernels); on CUDA kernels/ops/glu_depthwise_train.cu.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::train_ops::{f32_values, msg, storage_of};
use crate::error::{Error, Result};

const TAPS: usize = 9;

/// `u`: `(B, H·W, 2h)` (without the expansion's bias), `inverted_bias`: `(2h,)`, `depth_weight`:
/// `(2h, 1, 3, 3)`, `depth_bias`: `(2h,)` -> the gated `(B, H·W, h)`.
pub fn glu_depthwise3x3_tracked(
    u: &Tensor,
    inverted_bias: Option<&Tensor>,
    depth_weight: &Tensor,
    depth_bias: Option<&Tensor>,
    grid: [usize; 2],
) -> Result<Tensor> {
    let what = "Mix-FFN GLU (training op)";
    let (_, n, c2) = u.dims3()?;
    if n != grid[0] * grid[1] || c2 % 2 != 0 || depth_weight.dims() != [c2, 1, 3, 3] {
        return Err(Error::Other(format!(
            "{what}: u {:?} on a {grid:?} grid with a depth-wise weight {:?} (expected (B, H·W, 2h) and (2h, 1, 3, 3))",
            u.dims(),
            depth_weight.dims()
        )));
    }
    for bias in [inverted_bias, depth_bias].into_iter().flatten() {
        if bias.dims() != [c2] {
            return Err(Error::Other(format!("{what}: bias {:?}, expected ({c2},)", bias.dims())));
        }
    }
    let dtype = u.dtype();
    let u = match inverted_bias {
        Some(b) => u.broadcast_add(&b.to_dtype(dtype)?)?,
        None => u.clone(),
    };
    let bias = match depth_bias {
        Some(b) => b.to_dtype(dtype)?.reshape((c2, 1))?,
        None => Tensor::zeros((c2, 1), dtype, u.device())?,
    };
    let weights = Tensor::cat(&[&depth_weight.to_dtype(dtype)?.reshape((c2, TAPS))?, &bias], 1)?.contiguous()?;
    Ok(u.contiguous()?.apply_op2(&weights, GluDepthwise { grid })?)
}

fn silu(z: f32) -> f32 {
    z / (1.0 + (-z).exp())
}

fn silu_grad(z: f32) -> f32 {
    let s = 1.0 / (1.0 + (-z).exp());
    s * (1.0 + z * (1.0 - s))
}

/// The grid neighbour of token `p` at tap `t` (row-major 3×3), or `None` outside the grid.
fn neighbour(p: usize, t: usize, [h, w]: [usize; 2]) -> Option<usize> {
    let (y, x) = ((p / w) as isize + (t / 3) as isize - 1, (p % w) as isize + (t % 3) as isize - 1);
    (y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w).then(|| y as usize * w + x as usize)
}

/// `(B, N, 2h)` from the `(2h, 10)` weights: the activated input `a` and the convolution `d`.
fn activate_and_convolve(u: &[f32], weights: &[f32], (b, n, c2): (usize, usize, usize), grid: [usize; 2]) -> (Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = u.iter().map(|&z| silu(z)).collect();
    let mut d = vec![0f32; b * n * c2];
    for bi in 0..b {
        for p in 0..n {
            let out = &mut d[(bi * n + p) * c2..(bi * n + p + 1) * c2];
            for (k, o) in out.iter_mut().enumerate() {
                *o = weights[k * (TAPS + 1) + TAPS];
            }
            for t in 0..TAPS {
                let Some(q) = neighbour(p, t, grid) else { continue };
                let src = &a[(bi * n + q) * c2..(bi * n + q + 1) * c2];
                for k in 0..c2 {
                    out[k] += weights[k * (TAPS + 1) + t] * src[k];
                }
            }
        }
    }
    (a, d)
}

fn dims(what: &str, lu: &Layout, lw: &Layout, grid: [usize; 2]) -> candle_core::Result<(usize, usize, usize)> {
    let (b, n, c2) = lu.shape().dims3()?;
    if lw.shape().dims() != [c2, TAPS + 1] || n != grid[0] * grid[1] || c2 % 2 != 0 {
        return Err(msg(format!("{what}: u {:?}, weights {:?} on a {grid:?} grid", lu.shape().dims(), lw.shape().dims())));
    }
    Ok((b, n, c2))
}

struct GluDepthwise {
    grid: [usize; 2],
}

impl CustomOp2 for GluDepthwise {
    fn name(&self) -> &'static str {
        "glu-depthwise3x3"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = self.name();
        let (b, n, c2) = dims(what, l1, l2, self.grid)?;
        if s1.dtype() != s2.dtype() {
            return Err(msg(format!("{what}: inputs of mixed dtypes")));
        }
        let (u, weights) = (f32_values(s1, l1, what)?, f32_values(s2, l2, what)?);
        let (_, d) = activate_and_convolve(&u, &weights, (b, n, c2), self.grid);
        let h = c2 / 2;
        let out = d.chunks_exact(c2).flat_map(|row| (0..h).map(move |j| row[j] * silu(row[h + j]))).collect();
        Ok((storage_of(out, s1.dtype()), Shape::from((b, n, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, n, c2) = dims(self.name(), l1, l2, self.grid)?;
        let out = super::cuda::train::glu_forward((s1, l1), (s2, l2), (b, n, c2), self.grid).map_err(msg)?;
        Ok((out, Shape::from((b, n, c2 / 2))))
    }

    fn bwd(&self, u: &Tensor, weights: &Tensor, _out: &Tensor, dout: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, n, c2) = u.dims3()?;
        let packed = dout.contiguous()?.apply_op3_no_bwd(u, weights, &GluDepthwiseBackward { grid: self.grid })?;
        let du = packed.narrow(0, 0, b * n * c2)?.reshape((b, n, c2))?;
        let dw = packed.narrow(0, b * n * c2, c2 * (TAPS + 1))?.reshape((c2, TAPS + 1))?;
        Ok((Some(du), Some(dw)))
    }
}

/// `(B, N, 2C)` of the backward's `u` (layouts of dout, u, weights), dout `(B, N, C)` checked.
fn backward_dims(what: &str, l_dout: &Layout, l_u: &Layout, l_w: &Layout, grid: [usize; 2]) -> candle_core::Result<(usize, usize, usize)> {
    let (b, n, c2) = dims(what, l_u, l_w, grid)?;
    if l_dout.shape().dims() != [b, n, c2 / 2] {
        return Err(msg(format!("{what}: output gradient {:?} for u {:?}", l_dout.shape().dims(), [b, n, c2])));
    }
    Ok((b, n, c2))
}

/// Inputs `(dout, u, weights)`; output the flat `[du; dweights]`.
struct GluDepthwiseBackward {
    grid: [usize; 2],
}

impl CustomOp3 for GluDepthwiseBackward {
    fn name(&self) -> &'static str {
        "glu-depthwise3x3-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = self.name();
        let (b, n, c2) = backward_dims(what, l1, l2, l3, self.grid)?;
        let h = c2 / 2;
        if s1.dtype() != s2.dtype() || s2.dtype() != s3.dtype() {
            return Err(msg(format!("{what}: inputs of mixed dtypes {:?} {:?} {:?}", s1.dtype(), s2.dtype(), s3.dtype())));
        }
        let (dout, u, weights) = (f32_values(s1, l1, what)?, f32_values(s2, l2, what)?, f32_values(s3, l3, what)?);
        let (a, d) = activate_and_convolve(&u, &weights, (b, n, c2), self.grid);

        // Through the GLU: the gradient reaching d.
        let mut dd = vec![0f32; b * n * c2];
        for r in 0..b * n {
            for j in 0..h {
                let (value, gate, g) = (d[r * c2 + j], d[r * c2 + h + j], dout[r * h + j]);
                dd[r * c2 + j] = g * silu(gate);
                dd[r * c2 + h + j] = g * value * silu_grad(gate);
            }
        }
        // Through the depth-wise convolution: weights, bias, and the activated input (scattered
        // back along each tap), then through the SiLU.
        let mut packed = vec![0f32; b * n * c2 + c2 * (TAPS + 1)];
        let (du, dweights) = packed.split_at_mut(b * n * c2);
        for bi in 0..b {
            for p in 0..n {
                let g = &dd[(bi * n + p) * c2..(bi * n + p + 1) * c2];
                for k in 0..c2 {
                    dweights[k * (TAPS + 1) + TAPS] += g[k];
                }
                for t in 0..TAPS {
                    let Some(q) = neighbour(p, t, self.grid) else { continue };
                    let at = (bi * n + q) * c2;
                    for k in 0..c2 {
                        dweights[k * (TAPS + 1) + t] += g[k] * a[at + k];
                        du[at + k] += weights[k * (TAPS + 1) + t] * g[k];
                    }
                }
            }
        }
        for (g, &z) in du.iter_mut().zip(&u) {
            *g *= silu_grad(z);
        }
        Ok((storage_of(packed, s1.dtype()), Shape::from(b * n * c2 + c2 * (TAPS + 1))))
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
        let (b, n, c2) = backward_dims(self.name(), l1, l2, l3, self.grid)?;
        let out = super::cuda::train::glu_backward((s1, l1), (s2, l2), (s3, l3), (b, n, c2), self.grid).map_err(msg)?;
        Ok((out, Shape::from(b * n * c2 + c2 * (TAPS + 1))))
    }
}
