//! Mix-FFN (diffusers `GLUMBConv`): an inverted-bottleneck GLU with a depth-wise 3×3 convolution,
//! used by SANA's DiT blocks (no norm, no residual) and DC-AE's EfficientViT blocks (RMSNorm and
//! residual).

use candle_core::Tensor;
use candle_nn::{Conv2d, VarBuilder};

use super::conv::{conv2d, DepthwiseConv2d};
use super::norm::RmsNorm;
use crate::error::Result;

/// A 1×1 convolution computed as one matmul over the channels (the same sum as `conv.forward`).
/// Why: candle's backward of a convolution is a transposed convolution, which has no fast path
/// (a naive kernel on CUDA), so training through `Conv2d` 1×1 layers was ~10× slower.
fn pointwise(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let weight = conv.weight();
    let out = weight.dim(0)?;
    let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?.reshape((b * h * w, c))?;
    let mut y = tokens.matmul(&weight.reshape((out, c))?.t()?)?;
    if let Some(bias) = conv.bias() {
        y = y.broadcast_add(bias)?;
    }
    Ok(y.reshape((b, h * w, out))?.transpose(1, 2)?.reshape((b, out, h, w))?)
}

#[derive(Debug, Clone)]
pub struct GluMbConv {
    conv_inverted: Conv2d,
    conv_depth: DepthwiseConv2d,
    conv_point: Conv2d,
    norm: Option<RmsNorm>,
    residual: bool,
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
        Ok(Self {
            conv_inverted: conv2d(in_channels, 2 * hidden, 1, 0, 1, true, vb.pp("conv_inverted"))?,
            conv_depth: DepthwiseConv2d::new(2 * hidden, 3, true, vb.pp("conv_depth"))?,
            conv_point: conv2d(hidden, out_channels, 1, 0, 1, false, vb.pp("conv_point"))?,
            norm: if rms_norm { Some(RmsNorm::new(out_channels, 1e-5, true, true, vb.pp("norm"))?) } else { None },
            residual,
        })
    }

    /// `x`: `(B, C, H, W)` -> `(B, C_out, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::silu(&pointwise(&self.conv_inverted, x)?)?;
        let h = self.conv_depth.forward(&h)?;
        // First half of the channels is the value, second half the gate.
        let half = h.dim(1)? / 2;
        let value = h.narrow(1, 0, half)?;
        let gate = h.narrow(1, half, half)?;
        let h = (value * candle_nn::ops::silu(&gate)?)?;
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
