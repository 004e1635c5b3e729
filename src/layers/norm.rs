//! Normalizations, computed in f32 whatever the input dtype (as diffusers does for RMSNorm and as
//! torch's LayerNorm does internally), then cast back.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::Result;

/// LayerNorm over the last dimension without weight or bias (SANA's `norm1`, `norm2`, `norm_out`).
/// Variance is the biased one, as in torch.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.to_dtype(dtype)?)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight + bias` (diffusers'
/// `RMSNorm`: the weight and the bias are optional).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    /// `affine`: load `weight` of shape `(dim,)`; `bias`: also load `bias`.
    pub fn new(dim: usize, eps: f64, affine: bool, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = if affine { Some(vb.get(dim, "weight")?) } else { None };
        let bias = if affine && bias { Some(vb.get(dim, "bias")?) } else { None };
        Ok(Self { weight, bias, eps })
    }

    /// Normalizes over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let mut y = xf.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
        }
        Ok(y.to_dtype(dtype)?)
    }

    /// Normalizes over the channels of an NCHW tensor (DC-AE and GLUMBConv: `movedim(1, -1)`). On
    /// the GPU one kernel that reads the channels in place; elsewhere (and while gradients are
    /// recorded) [`Self::forward_channels_first_reference`].
    pub fn forward_channels_first(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::cuda::fused_kernels_apply(x) {
            let f32_param = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_dtype(DType::F32)).transpose();
            let (weight, bias) = (f32_param(&self.weight)?, f32_param(&self.bias)?);
            return super::cuda::rms_norm_channels(x, weight.as_ref(), bias.as_ref(), self.eps);
        }
        self.forward_channels_first_reference(x)
    }

    /// [`Self::forward_channels_first`] as tensor ops: channels last, normalize, channels first.
    pub fn forward_channels_first_reference(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward(&x.permute((0, 2, 3, 1))?)?;
        Ok(y.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        RmsNorm::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
