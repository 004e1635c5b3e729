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

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// `(C, 1, k, k)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
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

/// Runs a convolution made by [`conv2d`]. On the GPU, a 3×3, stride-1, padding-1 convolution in
/// bf16/f16 runs as im2col + one tensor-core GEMM (layers/cuda): candle's CUDA convolution (its
/// im2col, or cuDNN with f32 compute for bf16) took 15-18 ms for one 128-channel 3×3 conv at 1024².
pub fn conv_forward(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let cfg = conv.config();
        let (k_h, k_w) = (conv.weight().dim(2)?, conv.weight().dim(3)?);
        let plain = cfg.stride == 1 && cfg.padding == 1 && cfg.dilation == 1 && cfg.groups == 1 && (k_h, k_w) == (3, 3);
        if plain && super::cuda::fused_kernels_apply(x) {
            if let Some(y) = super::cuda::conv3x3(x, conv.weight(), conv.bias())? {
                return Ok(y);
            }
        }
    }
    Ok(conv.forward(x)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values without an RNG dependency.
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (((i as u64 + 1) * (seed * 2 + 7919)) % 1013) as f32 / 506.5 - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn depthwise_matches_candle_grouped_conv() {
        for k in [3usize, 5] {
            let (c, h, w) = (6, 7, 9);
            let x = randn(&[2, c, h, w], 1);
            let weight = randn(&[c, 1, k, k], 2);
            let bias = randn(&[c], 3);
            let vb = VarBuilder::from_tensors(
                HashMap::from([("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())]),
                DType::F32,
                &Device::Cpu,
            );
            let ours = DepthwiseConv2d::new(c, k, true, vb).unwrap().forward(&x).unwrap();
            let cfg = Conv2dConfig { padding: k / 2, stride: 1, dilation: 1, groups: c, cudnn_fwd_algo: None };
            let reference = Conv2d::new(weight, Some(bias), cfg).forward(&x).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "k = {k}");
        }
    }

    #[test]
    fn grouped_pointwise_matches_candle_grouped_conv() {
        let (cin, cout, groups) = (12, 12, 4);
        let x = randn(&[2, cin, 3, 5], 4);
        let weight = randn(&[cout, cin / groups, 1, 1], 5);
        let vb = VarBuilder::from_tensors(HashMap::from([("weight".to_string(), weight.clone())]), DType::F32, &Device::Cpu);
        let ours = GroupedPointwiseConv2d::new(cin, cout, groups, vb).unwrap().forward(&x).unwrap();
        let cfg = Conv2dConfig { padding: 0, stride: 1, dilation: 1, groups, cudnn_fwd_algo: None };
        let reference = Conv2d::new(weight, None, cfg).forward(&x).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
    }

    #[test]
    fn pixel_shuffle_layout() {
        // torch: out[b, c, h·r + i, w·r + j] = in[b, c·r² + i·r + j, h, w]
        let x = Tensor::arange(0f32, 2.0 * 8.0 * 3.0 * 2.0, &Device::Cpu).unwrap().reshape((2, 8, 3, 2)).unwrap();
        let y = pixel_shuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), &[2, 2, 6, 4]);
        let get_in = |b: usize, c: usize, h: usize, w: usize| ((b * 8 + c) * 3 + h) * 2 + w;
        let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for b in 0..2 {
            for c in 0..2 {
                for h in 0..3 {
                    for w in 0..2 {
                        for i in 0..2 {
                            for j in 0..2 {
                                let out = ((b * 2 + c) * 6 + h * 2 + i) * 4 + w * 2 + j;
                                assert_eq!(yv[out] as usize, get_in(b, c * 4 + i * 2 + j, h, w));
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(max_diff(&pixel_unshuffle(&y, 2).unwrap(), &x), 0.0);
    }

    #[test]
    fn repeat_interleave_and_group_mean() {
        let x = Tensor::arange(0f32, 3.0, &Device::Cpu).unwrap().reshape((1, 3, 1, 1)).unwrap();
        let y: Vec<f32> = repeat_interleave_channels(&x, 2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        let z = Tensor::new(&[1f32, 3.0, 5.0, 7.0], &Device::Cpu).unwrap().reshape((1, 4, 1, 1)).unwrap();
        let m: Vec<f32> = mean_channel_groups(&z, 2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(m, [2.0, 6.0]);
    }
}
