//! Mix-FFN (diffusers `GLUMBConv`): an inverted-bottleneck GLU with a depth-wise 3×3 convolution,
//! used by SANA's DiT blocks (no norm, no residual) and DC-AE's EfficientViT blocks (RMSNorm and
//! residual).

use candle_core::{DType, Tensor};
use candle_nn::{Conv2d, VarBuilder};

use super::conv::{conv2d, DepthwiseConv2d};
use super::norm::RmsNorm;
use crate::error::Result;

/// A 1×1 convolution computed as one matmul over the channels (the same sum as `conv.forward`).
/// Why: candle's backward of a convolution is a transposed convolution, which has no fast path
/// (a naive kernel on CUDA), so training through `Conv2d` 1×1 layers was ~10× slower.
fn pointwise(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    pointwise_with(conv, x, true)
}

fn pointwise_with(conv: &Conv2d, x: &Tensor, add_bias: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let weight = conv.weight();
    let out = weight.dim(0)?;
    let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?.reshape((b * h * w, c))?;
    let mut y = tokens.matmul(&weight.reshape((out, c))?.t()?)?;
    if let (true, Some(bias)) = (add_bias, conv.bias()) {
        y = y.broadcast_add(bias)?;
    }
    Ok(y.reshape((b, h * w, out))?.transpose(1, 2)?.reshape((b, out, h, w))?)
}

/// The f32 copies of the weights that the fused GPU kernel reads (layers/cuda).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone)]
struct FusedWeights {
    inverted_bias: Option<Tensor>,
    depth_weight: Tensor,
    depth_bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct GluMbConv {
    conv_inverted: Conv2d,
    conv_depth: DepthwiseConv2d,
    conv_point: Conv2d,
    norm: Option<RmsNorm>,
    residual: bool,
    /// Set on a CUDA device when the depth-wise kernel is 3×3.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fused: Option<FusedWeights>,
}

impl GluMbConv {
    /// `hidden = int(expand_ratio · in_channels)`. Keys: `conv_inverted.{weight (2h, in, 1, 1), bias}`,
    /// `conv_depth.{weight (2h, 1, 3, 3), bias}`, `conv_point.weight (out, h, 1, 1)` and, with
    /// `rms_norm`, `norm.{weight, bias}` (eps 1e-5).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        expand_ratio: f64,
        rms_norm: bool,
        residual: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let hidden = (expand_ratio * in_channels as f64) as usize;
        let conv_inverted = conv2d(in_channels, 2 * hidden, 1, 0, 1, true, vb.pp("conv_inverted"))?;
        let conv_depth = DepthwiseConv2d::new(2 * hidden, 3, true, vb.pp("conv_depth"))?;
        let f32_copy = |t: &Tensor| t.to_dtype(DType::F32);
        let fused = if vb.device().is_cuda() && conv_depth.kernel() == 3 {
            Some(FusedWeights {
                inverted_bias: conv_inverted.bias().map(f32_copy).transpose()?,
                depth_weight: f32_copy(conv_depth.weight())?.reshape((2 * hidden, 9))?,
                depth_bias: conv_depth.bias().map(f32_copy).transpose()?,
            })
        } else {
            None
        };
        Ok(Self {
            conv_inverted,
            conv_depth,
            conv_point: conv2d(hidden, out_channels, 1, 0, 1, false, vb.pp("conv_point"))?,
            norm: if rms_norm { Some(RmsNorm::new(out_channels, 1e-5, true, true, vb.pp("norm"))?) } else { None },
            residual,
            fused,
        })
    }

    /// [`Self::forward`] on channels-last tokens: `x` `(B, H·W, C_in)` of a `grid = [H, W]` ->
    /// `(B, H·W, C_out)` (SANA's blocks hold tokens). On the GPU the two 1×1 convolutions are GEMMs
    /// on the tokens around the fused depth-wise GLU kernel, with no layout changes.
    pub fn forward_tokens(&self, x: &Tensor, grid: [usize; 2]) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        #[cfg(feature = "cuda")]
        if let (Some(f), true, None, false) = (&self.fused, super::cuda::fused_kernels_apply(x), &self.norm, self.residual) {
            let weight = |conv: &Conv2d| -> Result<Tensor> {
                let w = conv.weight();
                Ok(w.reshape((w.dim(0)?, w.dim(1)?))?)
            };
            let u = super::project(x, &weight(&self.conv_inverted)?)?;
            let gated = super::cuda::glu_depthwise3x3_tokens(&u, grid, f.inverted_bias.as_ref(), &f.depth_weight, f.depth_bias.as_ref())?;
            return super::project(&gated, &weight(&self.conv_point)?);
        }
        if self.norm.is_none() && !self.residual && self.conv_inverted.weight().track_op() {
            return self.forward_tokens_training(x, grid);
        }
        let image = x.transpose(1, 2)?.reshape((b, c, grid[0], grid[1]))?;
        let y = self.forward(&image)?;
        let c_out = y.dim(1)?;
        Ok(y.reshape((b, c_out, n))?.transpose(1, 2)?)
    }

    /// On the GPU: [`Self::forward_tokens`] up to the output 1×1 conv, before the norm and the
    /// residual (DC-AE's EfficientViT blocks fuse those into one kernel). `None` where the fused
    /// depth-wise kernel does not serve.
    #[cfg(feature = "cuda")]
    pub(crate) fn forward_tokens_unnormalized(&self, x: &Tensor, grid: [usize; 2]) -> Result<Option<Tensor>> {
        let Some(f) = &self.fused else { return Ok(None) };
        if !super::cuda::fused_kernels_apply(x) {
            return Ok(None);
        }
        let weight = |conv: &Conv2d| -> Result<Tensor> {
            let w = conv.weight();
            Ok(w.reshape((w.dim(0)?, w.dim(1)?))?)
        };
        let u = super::project(x, &weight(&self.conv_inverted)?)?;
        let gated = super::cuda::glu_depthwise3x3_tokens(&u, grid, f.inverted_bias.as_ref(), &f.depth_weight, f.depth_bias.as_ref())?;
        Ok(Some(super::project(&gated, &weight(&self.conv_point)?)?))
    }

    /// [`Self::forward_tokens`] while gradients are recorded (training): the same sums as tensor
    /// ops that stay channels-last, so the only layout changes are the two transposes around the
    /// depth-wise convolution's batched GEMM (the image form transposes the widest tensor of the
    /// block six times, and again in the backward pass).
    fn forward_tokens_training(&self, x: &Tensor, grid: [usize; 2]) -> Result<Tensor> {
        let as_matrix = |conv: &Conv2d| -> Result<Tensor> {
            let w = conv.weight();
            Ok(w.reshape((w.dim(0)?, w.dim(1)?))?)
        };
        let u = super::project(x, &as_matrix(&self.conv_inverted)?)?;
        // The SiLU, depth-wise 3x3 and GLU as one op with its own backward (layers::train_glu).
        let gated = if self.conv_depth.kernel() == 3 {
            let (depth_weight, depth_bias) = (self.conv_depth.weight(), self.conv_depth.bias());
            super::train_glu::glu_depthwise3x3_tracked(&u, self.conv_inverted.bias(), depth_weight, depth_bias, grid)?
        } else {
            self.gated_tokens_reference(&u, grid)?
        };
        let mut y = super::project(&gated, &as_matrix(&self.conv_point)?)?;
        if let Some(bias) = self.conv_point.bias() {
            y = y.broadcast_add(bias)?;
        }
        Ok(y)
    }

    /// The middle of [`Self::forward_tokens_training`] as tensor ops: `u` `(B, H·W, 2h)` without the
    /// expansion's bias -> bias, SiLU, depth-wise convolution, GLU -> `(B, H·W, h)`.
    pub fn gated_tokens_reference(&self, u: &Tensor, grid: [usize; 2]) -> Result<Tensor> {
        let u = match self.conv_inverted.bias() {
            Some(bias) => u.broadcast_add(bias)?,
            None => u.clone(),
        };
        let u = candle_nn::ops::silu(&u)?;
        let d = self.conv_depth.forward_tokens_matmul(&u, grid)?;
        // First half of the channels is the value, second half the gate.
        let half = d.dim(2)? / 2;
        Ok((d.narrow(2, 0, half)? * candle_nn::ops::silu(&d.narrow(2, half, half)?)?)?)
    }

    /// The expanded, activated, depth-wise convolved and gated tensor `(B, hidden, H, W)`.
    fn gated(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(f), true) = (&self.fused, super::cuda::fused_kernels_apply(x)) {
            let u = pointwise_with(&self.conv_inverted, x, false)?;
            return super::cuda::glu_depthwise3x3(&u, f.inverted_bias.as_ref(), &f.depth_weight, f.depth_bias.as_ref());
        }
        self.gated_reference(x)
    }

    /// [`Self::gated`] as tensor ops (the reference of the fused kernel).
    pub fn gated_reference(&self, x: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::silu(&pointwise(&self.conv_inverted, x)?)?;
        let h = self.conv_depth.forward(&h)?;
        // First half of the channels is the value, second half the gate.
        let half = h.dim(1)? / 2;
        let value = h.narrow(1, 0, half)?;
        let gate = h.narrow(1, half, half)?;
        Ok((value * candle_nn::ops::silu(&gate)?)?)
    }

    /// `x`: `(B, C, H, W)` -> `(B, C_out, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.gated(x)?;
        let mut y = pointwise(&self.conv_point, &h)?;
        if let Some(norm) = &self.norm {
            y = norm.forward_channels_first(&y)?;
        }
        if self.residual {
            y = (y + x)?;
        }
        Ok(y)
    }
}
