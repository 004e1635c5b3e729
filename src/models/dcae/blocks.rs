//! DC-AE building blocks (diffusers `autoencoder_dc.py` and `SanaMultiscaleLinearAttention`).

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear_no_bias, Conv2d, Linear, VarBuilder};

use crate::attention::{attend, AttentionInput, Backend, LayerShape, LinearParams, Role};
use crate::error::{Error, Result};
use crate::layers::conv::{
    conv2d, conv3x3_fused, conv_forward, mean_channel_groups, pixel_shuffle, pixel_unshuffle, repeat_interleave_channels, DepthwiseConv2d,
    GroupedPointwiseConv2d,
};
use crate::layers::{GluMbConv, RmsNorm};

/// eps of every RMSNorm in DC-AE.
const NORM_EPS: f64 = 1e-5;
/// Denominator eps of DC-AE's linear attention (diffusers and the original: 1e-15).
const LINEAR_ATTENTION_EPS: f64 = 1e-15;

/// `conv1 (3×3) -> SiLU -> conv2 (3×3, no bias) -> RMSNorm over channels -> + x`.
#[derive(Debug, Clone)]
pub struct ResBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    norm: RmsNorm,
    /// `norm` in f32 for the fused norm + residual kernel (on a CUDA device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fused_norm: Option<TokenNorm>,
}

impl ResBlock {
    /// Keys: `conv1.{weight, bias}`, `conv2.weight`, `norm.{weight, bias}`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv2d(channels, channels, 3, 1, 1, true, vb.pp("conv1"))?,
            conv2: conv2d(channels, channels, 3, 1, 1, false, vb.pp("conv2"))?,
            norm: RmsNorm::new(channels, NORM_EPS, true, true, vb.pp("norm"))?,
            fused_norm: if vb.device().is_cuda() { Some(TokenNorm::new(channels, vb.pp("norm"))?) } else { None },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = conv3x3_fused(&self.conv1, x, false, true, None)?;
        #[cfg(feature = "cuda")]
        if let (Some(n), true) = (&self.fused_norm, crate::layers::cuda::fused_kernels_apply(x)) {
            let h = conv_forward(&self.conv2, &h)?;
            return crate::layers::cuda::rms_norm_channels_residual(&h, &n.weight, &n.bias, x, NORM_EPS);
        }
        let h = self.norm.forward_channels_first(&conv_forward(&self.conv2, &h)?)?;
        Ok((h + x)?)
    }
}

/// One multi-scale branch: a depth-wise k×k convolution over q, k, v, then a 1×1 convolution
/// grouped per head (`3 · heads` groups). Keys: `proj_in.weight`, `proj_out.weight`.
#[derive(Debug, Clone)]
struct MultiscaleProjection {
    proj_in: DepthwiseConv2d,
    proj_out: GroupedPointwiseConv2d,
}

/// Multi-scale ReLU linear attention ("LiteMLA"; diffusers `SanaMultiscaleLinearAttention`).
///
/// The channels of `cat(to_q(x), to_k(x), to_v(x))` and of each multi-scale branch are regrouped as
/// `(heads', 3·d)`: head i's "q" is channels `[3d·i, 3d·i + d)` of the concatenation, so the names
/// to_q / to_k / to_v are not semantic (they are thirds of the original fused qkv weight). Every
/// group attends over all H·W tokens with linear attention through [`attend`]. diffusers switches
/// to a "quadratic" evaluation order when `H·W <= d`; it computes the same quantity
/// `Σ_m v_m φ(k_m)·φ(q_n) / (Σ_m φ(k_m)·φ(q_n) + ε)`, so one path serves both.
#[derive(Debug, Clone)]
pub struct MultiscaleLinearAttention {
    /// `to_q`, `to_k`, `to_v` stacked into one `(3C, C)` projection (they are concatenated anyway).
    to_qkv: Linear,
    multiscale: Vec<MultiscaleProjection>,
    to_out: Linear,
    norm_out: RmsNorm,
    head_dim: usize,
    backend: Backend,
    /// f32 copies of the weights the channels-last GPU kernels read (layers/cuda/dcae.rs); set on
    /// a CUDA device for head dim 32 and one multi-scale branch of 3×3 or 5×5 (DC-AE's configs).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fused: Option<FusedAttention>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone)]
struct FusedAttention {
    /// `(3C, k²)` depth-wise taps of the multi-scale branch.
    depth_weight: Tensor,
    /// `(3C, 32)`: row `g·32 + o` = output `o` of group `g` of the grouped 1×1 conv.
    point_weight: Tensor,
    norm: TokenNorm,
}

/// f32 parameters of an RMSNorm (DC-AE's are affine with bias) for the fused token kernel.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone)]
struct TokenNorm {
    weight: Tensor,
    bias: Tensor,
}

impl TokenNorm {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(channels, "bias")?.to_dtype(DType::F32)?,
        })
    }

    /// `RMSNorm(x) + residual` over the last dim, one kernel.
    #[cfg(feature = "cuda")]
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        crate::layers::cuda::rms_norm_residual(x, Some(&self.weight), Some(&self.bias), Some(residual), NORM_EPS)
    }
}

impl MultiscaleLinearAttention {
    /// Keys: `to_{q,k,v}.weight (C, C)`, `to_qkv_multiscale.{i}.proj_in.weight (3C, 1, k, k)`
    /// (depth-wise), `to_qkv_multiscale.{i}.proj_out.weight (3C, d, 1, 1)` (3·heads groups),
    /// `to_out.weight (C, C·(1 + scales))`, `norm_out.{weight, bias}`.
    pub fn new(channels: usize, head_dim: usize, kernel_sizes: &[usize], vb: VarBuilder) -> Result<Self> {
        if head_dim == 0 || channels % head_dim != 0 {
            return Err(Error::Other(format!("{channels} channels are not divisible by the head dim {head_dim}")));
        }
        let heads = channels / head_dim;
        let multiscale = kernel_sizes
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let vb = vb.pp("to_qkv_multiscale").pp(i);
                Ok(MultiscaleProjection {
                    proj_in: DepthwiseConv2d::new(3 * channels, k, false, vb.pp("proj_in"))?,
                    proj_out: GroupedPointwiseConv2d::new(3 * channels, 3 * channels, 3 * heads, vb.pp("proj_out"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = Backend::Linear(LinearParams { eps: LINEAR_ATTENTION_EPS, chunk_frames: None });
        let shape = LayerShape {
            role: Role::SelfAttention,
            head_dim,
            grid: None,
            key_mask: false,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        };
        backend.check(&shape).map_err(|reason| Error::Attention {
            layer: "DC-AE multi-scale attention".into(),
            backend: backend.name().into(),
            reason,
        })?;
        let qkv_weight = Tensor::cat(
            &[
                vb.get((channels, channels), "to_q.weight")?,
                vb.get((channels, channels), "to_k.weight")?,
                vb.get((channels, channels), "to_v.weight")?,
            ],
            0,
        )?;
        let fused = match (vb.device().is_cuda(), head_dim, multiscale.as_slice()) {
            (true, 32, [branch]) if matches!(branch.proj_in.kernel(), 3 | 5) => {
                let k = branch.proj_in.kernel();
                Some(FusedAttention {
                    depth_weight: branch.proj_in.weight().to_dtype(DType::F32)?.reshape((3 * channels, k * k))?,
                    point_weight: branch.proj_out.weight().to_dtype(DType::F32)?.reshape((3 * channels, head_dim))?,
                    norm: TokenNorm::new(channels, vb.pp("norm_out"))?,
                })
            }
            _ => None,
        };
        Ok(Self {
            fused,
            to_qkv: Linear::new(qkv_weight, None),
            to_out: linear_no_bias(channels * (1 + kernel_sizes.len()), channels, vb.pp("to_out"))?,
            norm_out: RmsNorm::new(channels, NORM_EPS, true, true, vb.pp("norm_out"))?,
            multiscale,
            head_dim,
            backend,
        })
    }

    /// On the GPU: [`Self::forward`] on channels-last tokens `(B, H·W, C)` of a `grid = [H, W]`
    /// (with the residual), through the fused kernels: the projections are GEMMs on the tokens, the
    /// multi-scale branch one kernel, the attention reads q, k, v in place, and the norm and the
    /// residual are one pass. `None` where the kernels do not serve.
    #[cfg(feature = "cuda")]
    pub fn forward_tokens_fused(&self, t: &Tensor, grid: [usize; 2]) -> Result<Option<Tensor>> {
        use crate::layers::{cuda, project};
        let Some(f) = &self.fused else { return Ok(None) };
        if !cuda::fused_kernels_apply(t) {
            return Ok(None);
        }
        let qkv = project(t, self.to_qkv.weight())?;
        let ms = cuda::depthwise_grouped_pointwise(&qkv, grid, &f.depth_weight, &f.point_weight)?;
        let o = cuda::multiscale_linear_attention(&qkv, &ms, LINEAR_ATTENTION_EPS)?;
        let o = project(&o, self.to_out.weight())?;
        Ok(Some(f.norm.forward_residual(&o, t)?))
    }

    /// `x`: `(B, C, H, W)` -> `(B, C, H, W)` (with the residual).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused.is_some() && crate::layers::cuda::fused_kernels_apply(x) {
            let (_, _, h, w) = x.dims4()?;
            let t = crate::layers::cuda::nchw_to_tokens(x)?;
            if let Some(y) = self.forward_tokens_fused(&t, [h, w])? {
                return crate::layers::cuda::tokens_to_nchw(&y, [h, w]);
            }
        }
        self.forward_reference(x)
    }

    /// [`Self::forward`] as tensor ops through [`attend`] (the CPU path, and the reference of the
    /// fused GPU path).
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let d = self.head_dim;
        let channels_last = x.permute((0, 2, 3, 1))?.contiguous()?;
        let qkv = self.to_qkv.forward(&channels_last)?.permute((0, 3, 1, 2))?.contiguous()?;
        let mut scales = vec![qkv.clone()];
        for branch in &self.multiscale {
            scales.push(branch.proj_out.forward(&branch.proj_in.forward(&qkv)?)?);
        }
        let all = Tensor::cat(&scales, 1)?;
        let groups = all.dim(1)? / (3 * d);
        // (B, groups, 3d, HW) -> q, k, v (B, groups, HW, d), the layout of `attend`.
        let grouped = all.to_dtype(DType::F32)?.reshape((b, groups, 3 * d, h * w))?;
        let part = |i: usize| -> Result<Tensor> { Ok(grouped.narrow(2, i * d, d)?.transpose(2, 3)?.contiguous()?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let o = attend(&self.backend, &AttentionInput::new(&q, &k, &v).grid(Some(&[h, w])))?;
        let o = o.transpose(2, 3)?.reshape((b, groups * d, h, w))?.to_dtype(x.dtype())?;
        let o = self.to_out.forward(&o.permute((0, 2, 3, 1))?.contiguous()?)?;
        let o = self.norm_out.forward(&o)?.permute((0, 3, 1, 2))?;
        Ok((o + x)?)
    }
}

/// `attn` (multi-scale linear attention, residual) then `conv_out` (GLUMBConv ×4, RMSNorm, residual).
#[derive(Debug, Clone)]
pub struct EfficientViTBlock {
    attn: MultiscaleLinearAttention,
    conv_out: GluMbConv,
    /// `conv_out.norm` in f32 for the fused token path (on a CUDA device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    conv_out_norm: Option<TokenNorm>,
}

impl EfficientViTBlock {
    pub fn new(channels: usize, head_dim: usize, kernel_sizes: &[usize], vb: VarBuilder) -> Result<Self> {
        let conv_out_norm = if vb.device().is_cuda() { Some(TokenNorm::new(channels, vb.pp("conv_out").pp("norm"))?) } else { None };
        Ok(Self {
            attn: MultiscaleLinearAttention::new(channels, head_dim, kernel_sizes, vb.pp("attn"))?,
            conv_out: GluMbConv::new(channels, channels, 4.0, true, true, vb.pp("conv_out"))?,
            conv_out_norm,
        })
    }

    /// On the GPU the whole block runs on channels-last tokens (one transpose in, one out): see
    /// [`MultiscaleLinearAttention::forward_tokens_fused`]; the GLUMBConv's 1×1 convs are GEMMs
    /// around the fused depth-wise GLU kernel, its norm and residual one pass.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.forward_fused(x)? {
            return Ok(y);
        }
        self.forward_reference(x)
    }

    /// The block as tensor ops (the CPU path and the reference of the fused GPU path).
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&self.attn.forward_reference(x)?)
    }

    #[cfg(feature = "cuda")]
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(norm) = &self.conv_out_norm else { return Ok(None) };
        let (_, _, h, w) = x.dims4()?;
        let grid = [h, w];
        let t = crate::layers::cuda::nchw_to_tokens(x)?;
        let Some(t1) = self.attn.forward_tokens_fused(&t, grid)? else { return Ok(None) };
        let Some(p) = self.conv_out.forward_tokens_unnormalized(&t1, grid)? else { return Ok(None) };
        let t2 = norm.forward_residual(&p, &t1)?;
        Ok(Some(crate::layers::cuda::tokens_to_nchw(&t2, grid)?))
    }
}

/// A stage layer: ResBlock or EfficientViT block.
#[derive(Debug, Clone)]
pub enum StageBlock {
    Res(ResBlock),
    EfficientViT(EfficientViTBlock),
}

impl StageBlock {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            StageBlock::Res(b) => b.forward(x),
            StageBlock::EfficientViT(b) => b.forward(x),
        }
    }
}

/// ×2 down-sampling with an averaging shortcut (diffusers `DCDownBlock2d`, shortcut on).
/// `pixel_unshuffle = false`: a stride-2 3×3 conv to `out`; `true`: a 3×3 conv to `out/4` then
/// pixel-unshuffle. Shortcut: pixel-unshuffle of the input, averaged over groups of channels.
#[derive(Debug, Clone)]
pub struct DownBlock {
    conv: Conv2d,
    pixel_unshuffle: bool,
    group_size: usize,
}

impl DownBlock {
    /// Key: `conv.{weight, bias}`.
    pub fn new(in_channels: usize, out_channels: usize, pixel_unshuffle: bool, vb: VarBuilder) -> Result<Self> {
        let (conv_out, stride) = if pixel_unshuffle { (out_channels / 4, 1) } else { (out_channels, 2) };
        Ok(Self {
            conv: conv2d(in_channels, conv_out, 3, 1, stride, true, vb.pp("conv"))?,
            pixel_unshuffle,
            group_size: in_channels * 4 / out_channels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = conv_forward(&self.conv, x)?;
        if self.pixel_unshuffle {
            y = pixel_unshuffle(&y, 2)?;
        }
        let shortcut = mean_channel_groups(&pixel_unshuffle(x, 2)?, self.group_size)?;
        Ok((y + shortcut)?)
    }
}

/// ×2 up-sampling with a repeating shortcut (diffusers `DCUpBlock2d`, shortcut on).
/// `interpolate`: nearest ×2 then a 3×3 conv; otherwise a 3×3 conv to `4·out` then pixel-shuffle.
/// Shortcut: every channel repeated `4·out/in` times, then pixel-shuffle.
#[derive(Debug, Clone)]
pub struct UpBlock {
    conv: Conv2d,
    interpolate: bool,
    repeats: usize,
}

impl UpBlock {
    /// Key: `conv.{weight, bias}`.
    pub fn new(in_channels: usize, out_channels: usize, interpolate: bool, vb: VarBuilder) -> Result<Self> {
        let conv_out = if interpolate { out_channels } else { 4 * out_channels };
        Ok(Self {
            conv: conv2d(in_channels, conv_out, 3, 1, 1, true, vb.pp("conv"))?,
            interpolate,
            repeats: out_channels * 4 / in_channels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.interpolate {
            // One kernel on the GPU: up-sampling, convolution and shortcut.
            return conv3x3_fused(&self.conv, x, true, false, Some(self.repeats));
        }
        let y = pixel_shuffle(&conv_forward(&self.conv, x)?, 2)?;
        let shortcut = pixel_shuffle(&repeat_interleave_channels(x, self.repeats)?, 2)?;
        Ok((y + shortcut)?)
    }
}
