//! Convolution helpers that candle lacks or runs slowly: depth-wise k×k convolutions (one group
//! per channel), grouped 1×1 convolutions, pixel (un)shuffle and channel repeat-interleave.
//! Written with tensor ops only, so they run on every device.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::error::{Error, Result};

/// A depth-wise convolution: `groups == channels`, weight `(C, 1, k, k)`, stride 1, zero padding
/// `k / 2` (same-size output), optional bias `(C,)`.
#[derive(Debug, Clone)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
}

impl DepthwiseConv2d {
    /// Keys: `weight` `(C, 1, k, k)` and, with `bias`, `bias` `(C,)`.
    pub fn new(channels: usize, kernel: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        if kernel % 2 == 0 {
            return Err(Error::Other(format!("depth-wise convolution needs an odd kernel, got {kernel}")));
        }
        let weight = vb.get((channels, 1, kernel, kernel), "weight")?;
        let bias = if bias { Some(vb.get(channels, "bias")?) } else { None };
        Ok(Self { weight, bias, kernel })
    }

    /// `x`: `(B, C, H, W)` -> `(B, C, H, W)`: a sum of k² shifted copies of the zero-padded input,
    /// each scaled per channel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let k = self.kernel;
        let pad = k / 2;
        let padded = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
        let weight = self.weight.to_dtype(x.dtype())?.reshape((c, k * k))?;
        let mut acc: Option<Tensor> = None;
        for dy in 0..k {
            let rows = padded.narrow(2, dy, h)?;
            for dx in 0..k {
                let tap = weight.narrow(1, dy * k + dx, 1)?.reshape((1, c, 1, 1))?;
                let term = rows.narrow(3, dx, w)?.broadcast_mul(&tap)?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term)?,
                });
            }
        }
        let mut y = acc.expect("kernel is at least 1x1");
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?)?;
        }
        debug_assert_eq!(y.dims(), &[b, c, h, w]);
        Ok(y)
    }
}

/// A 1×1 convolution with `groups` groups and no bias, weight `(C_out, C_in / groups, 1, 1)`.
#[derive(Debug, Clone)]
pub struct GroupedPointwiseConv2d {
    /// `(groups, out_per_group, in_per_group)`
    weight: Tensor,
    groups: usize,
}

impl GroupedPointwiseConv2d {
    pub fn new(in_channels: usize, out_channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
            return Err(Error::Other(format!("{in_channels} -> {out_channels} channels do not split into {groups} groups")));
        }
        let (ig, og) = (in_channels / groups, out_channels / groups);
        let weight = vb.get((out_channels, ig, 1, 1), "weight")?.reshape((groups, og, ig))?;
        Ok(Self { weight, groups })
    }

    /// `x`: `(B, C_in, H, W)` -> `(B, C_out, H, W)`, one matmul per group (batched).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (g, og, ig) = self.weight.dims3()?;
        if c != g * ig {
            return Err(Error::Other(format!("grouped conv expects {} channels, got {c}", g * ig)));
        }
        let xg = x.reshape((b, self.groups, ig, h * w))?;
        let weight = self.weight.to_dtype(x.dtype())?.unsqueeze(0)?;
        let y = weight.broadcast_matmul(&xg)?;
        Ok(y.reshape((b, g * og, h, w))?)
    }
}

/// A plain convolution loaded from `weight` (and `bias`), square kernel, `padding`, `stride`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, dilation: 1, groups: 1, cudnn_fwd_algo: None };
    Ok(if bias {
        candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?
    } else {
        candle_nn::conv2d_no_bias(in_channels, out_channels, kernel, cfg, vb)?
    })
}

/// Runs a candle module with the crate's error type.
pub fn apply<M: Module>(m: &M, x: &Tensor) -> Result<Tensor> {
    Ok(m.forward(x)?)
}

/// `(B, C·r², H, W)` -> `(B, C, H·r, W·r)` (torch `pixel_shuffle`).
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if c % (r * r) != 0 {
        return Err(Error::Other(format!("pixel_shuffle: {c} channels are not divisible by {r}²")));
    }
    let oc = c / (r * r);
    let y = x.reshape((b, oc, r, r, h, w))?.permute((0, 1, 4, 2, 5, 3))?;
    Ok(y.reshape((b, oc, h * r, w * r))?)
}

/// `(B, C, H·r, W·r)` -> `(B, C·r², H, W)` (torch `pixel_unshuffle`).
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % r != 0 || w % r != 0 {
        return Err(Error::Other(format!("pixel_unshuffle: {h}x{w} is not divisible by {r}")));
    }
    let (oh, ow) = (h / r, w / r);
    let y = x.reshape((b, c, oh, r, ow, r))?.permute((0, 1, 3, 5, 2, 4))?;
    Ok(y.reshape((b, c * r * r, oh, ow))?)
}

/// Repeats every channel `repeats` times in place: channel `c` becomes `c·repeats .. (c+1)·repeats`
/// (torch `repeat_interleave(repeats, dim=1)`).
pub fn repeat_interleave_channels(x: &Tensor, repeats: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let y = x.unsqueeze(2)?.broadcast_as((b, c, repeats, h, w))?;
    Ok(y.reshape((b, c * repeats, h, w))?)
}

/// Mean over consecutive groups of `group` channels: `(B, C, H, W)` -> `(B, C / group, H, W)`.
pub fn mean_channel_groups(x: &Tensor, group: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if group == 0 || c % group != 0 {
        return Err(Error::Other(format!("cannot average {c} channels in groups of {group}")));
    }
    Ok(x.reshape((b, c / group, group, h, w))?.mean(2)?)
}
