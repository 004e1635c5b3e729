//! The gated residual with the projection's bias folded in (kernels/ops/gated_residual.cu).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};

use super::{launch_err, suffix, OptionalArg, BatchRows};
use crate::attention::cuda::{cuda_device, into_tensor, CudaRead};
use crate::error::{Error, Result};

/// Mirror of the kernel's `Layout` (kernels/ops/gated_residual.cu); the training launchers (train.rs) use it too.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct ResidualLayout {
    pub(super) rows: i64,
    pub(super) channels: i32,
    pub(super) rows_per_batch: i32,
    pub(super) gate_stride: i64,
}
unsafe impl DeviceRepr for ResidualLayout {}

/// `x`, `y`: `(B, N, C)`; `bias`: `(C,)`; `gate`: `(B, 1, C)` rows (views read in place). Returns
/// `x + (y + bias) · gate` in one pass.
pub fn gated_residual(x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: Option<&Tensor>) -> Result<Tensor> {
    let what = "fused gated residual";
    let (b, n, c) = x.dims3()?;
    if y.dims() != x.dims() {
        return Err(Error::Other(format!("{what}: y {:?} must match x {:?}", y.dims(), x.dims())));
    }
    for t in [Some(y), bias, gate].into_iter().flatten() {
        if t.dtype() != x.dtype() {
            return Err(Error::Other(format!("{what}: mixed dtypes {:?} and {:?}", t.dtype(), x.dtype())));
        }
    }
    if let Some(t) = bias {
        if t.dims() != [c] {
            return Err(Error::Other(format!("{what}: bias must be ({c},), got {:?}", t.dims())));
        }
    }
    match x.dtype() {
        DType::BF16 => residual_typed::<half::bf16>(x, y, bias, gate, (b, n, c)),
        DType::F16 => residual_typed::<half::f16>(x, y, bias, gate, (b, n, c)),
        DType::F32 => residual_typed::<f32>(x, y, bias, gate, (b, n, c)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn residual_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    y: &Tensor,
    bias: Option<&Tensor>,
    gate: Option<&Tensor>,
    (b, n, c): (usize, usize, usize),
) -> Result<Tensor> {
    let what = "fused gated residual";
    let dev: CudaDevice = cuda_device(x, what)?;
    let kernel = crate::kernels::load(&dev, "ops/gated_residual", &format!("gated_residual_{}", suffix(x.dtype(), what)?))?;
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let rg = gate.map(|g| BatchRows::new(g, b, c, what)).transpose()?;
    let layout = ResidualLayout {
        rows: (b * n) as i64,
        channels: c as i32,
        rows_per_batch: n as i32,
        gate_stride: rg.as_ref().map_or(0, |g| g.stride as i64),
    };
    let mut out = unsafe { dev.alloc::<T>(b * n * c)? };
    let (rx, ry) = (CudaRead::new(&x)?, CudaRead::new(&y)?);
    let rb = bias.as_ref().map(CudaRead::new).transpose()?;
    let (vx, vy) = (rx.view::<T>()?, ry.view::<T>()?);
    let vb = rb.as_ref().map(|r| r.view::<T>()).transpose()?;
    let vg = rg.as_ref().map(|r| r.view::<T>()).transpose()?;
    let null: u64 = 0;
    let blocks = (b * n * c).div_ceil(256).min(132 * 16) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx).arg(&vy);
    launch.arg_or_null(vb.as_ref(), &null);
    launch.arg_or_null(vg.as_ref(), &null);
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, n, c)))
}
