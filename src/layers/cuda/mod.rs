//! Rust glue for the fused layer kernels (kernels/ops/*): functions that take candle CUDA tensors
//! and return tensors. The layers in `src/layers/` dispatch here when their tensors live on the GPU
//! and no gradient is being recorded (see [`fused_kernels_apply`]); otherwise they run the same math
//! as tensor ops, which is the reference the tests compare with.

mod conv;
mod dcae;
mod heads;
mod mix_ffn;
mod norm;
mod residual;
pub(crate) mod train;

pub use conv::{conv3x3, conv3x3_implicit, IGEMM_CHANNEL_MULTIPLE};
pub use dcae::{
    depthwise_grouped_pointwise, multiscale_linear_attention, nchw_to_tokens, rms_norm_channels_residual, rms_norm_residual, tokens_to_nchw,
    DCAE_GROUP,
};
pub use heads::gather_rows;
pub use mix_ffn::{glu_depthwise3x3, glu_depthwise3x3_tokens};
pub use norm::{layer_norm_modulate, rms_norm_channels, NORM_MAX_CHANNELS};
pub use residual::gated_residual;

use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchArgs, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Storage, StorageRef, Tensor};

use crate::error::{Error, Result};

/// Whether the fused kernels may serve `x`: on a CUDA device, and not inside a training step
/// (`attention::with_reference_only`: the kernels have no backward).
pub fn fused_kernels_apply(x: &Tensor) -> bool {
    x.device().is_cuda() && !crate::attention::reference_only()
}

/// The kernel-name suffix of a dtype the fused kernels serve.
pub(crate) fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        other => Err(Error::Other(format!("{what}: no fused kernel for {other:?}"))),
    }
}

pub(crate) fn launch_err(what: &str) -> impl Fn(candle_core::cuda_backend::cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Other(format!("{what} launch: {e:?}"))
}


/// One row of `C` contiguous elements per batch, `stride` elements apart: a `(B, 1, C)` or `(B, C)`
/// tensor, e.g. a narrow of the `(B, 6, C)` modulation table, read in place.
pub(crate) struct BatchRows<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
    stride: usize,
}

impl<'a> BatchRows<'a> {
    pub(crate) fn new(t: &'a Tensor, b: usize, c: usize, what: &str) -> Result<Self> {
        let bad = || Error::Other(format!("{what}: expected ({b}, 1, {c}) or ({b}, {c}) rows, got {:?}", t.dims()));
        // dims (B, 1.., C): with the element count fixed, the middle dims are all 1.
        if t.rank() < 2 || t.elem_count() != b * c || t.dim(0)? != b || t.dims()[t.rank() - 1] != c {
            return Err(bad());
        }
        let (guard, layout) = t.storage_and_layout();
        let strides = layout.stride();
        if c > 1 && strides[strides.len() - 1] != 1 {
            return Err(bad());
        }
        let stride = if b > 1 { strides[0] } else { c };
        if !matches!(&*guard, Storage::Cuda(_)) {
            return Err(Error::Other(format!("{what}: not on a CUDA device")));
        }
        Ok(Self { guard, start: layout.start_offset(), len: (b - 1) * stride + c, stride })
    }

    pub(crate) fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        match &*self.guard {
            Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(self.start..self.start + self.len)),
            _ => unreachable!("checked in new"),
        }
    }
}

/// An optional tensor argument of a kernel: its device pointer, or null, which the kernel tests
/// for (no bias, no weight, no residual).
pub(crate) trait OptionalArg<'a> {
    fn arg_or_null<'b: 'a, 'c: 'b, T>(&mut self, view: Option<&'b CudaView<'c, T>>, null: &'b u64) -> &mut Self;
}

impl<'a> OptionalArg<'a> for LaunchArgs<'a> {
    fn arg_or_null<'b: 'a, 'c: 'b, T>(&mut self, view: Option<&'b CudaView<'c, T>>, null: &'b u64) -> &mut Self {
        match view {
            Some(v) => self.arg(v),
            None => self.arg(null),
        }
    }
}
