//! LayerNorm + AdaLN modulation (kernels/ops/norm_modulate.cu) and channels-first RMSNorm
//! (kernels/ops/rms_norm.cu).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};

use super::{launch_err, suffix, OptionalArg, BatchRows};
use crate::attention::cuda::{cuda_device, into_tensor, CudaRead};
use crate::error::{Error, Result};

/// Mirror of the kernel's `Layout` (kernels/ops/norm_modulate.cu); the training launchers (train.rs) use it too.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct NormLayout {
    pub(super) rows: i32,
    pub(super) channels: i32,
    pub(super) rows_per_batch: i32,
    pub(super) eps: f32,
    pub(super) mod_stride: i64,
}
unsafe impl DeviceRepr for NormLayout {}

/// Channels the norm kernel keeps in registers (256 threads x 32).
pub const NORM_MAX_CHANNELS: usize = 8192;

/// `x`: `(B, N, C)`; `shift`, `scale`: `(B, 1, C)` or `(B, C)` rows (views are read in place),
/// same dtype. Returns `LayerNorm(x) · (1 + scale) + shift` (no affine LayerNorm, f32 statistics).
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let what = "fused layer norm + modulation";
    let (_, _, c) = x.dims3()?;
    if c > NORM_MAX_CHANNELS {
        return Err(Error::Other(format!("{what}: {c} channels, the kernel serves up to {NORM_MAX_CHANNELS}")));
    }
    let (b, n, c) = x.dims3()?;
    for (name, t) in [("shift", shift), ("scale", scale)] {
        if t.dtype() != x.dtype() {
            return Err(Error::Other(format!("{what}: {name} is {:?}, x is {:?}", t.dtype(), x.dtype())));
        }
    }
    // The same stride for both: rows of one modulation table (contiguous copies otherwise).
    let (shift, scale) = match (BatchRows::new(shift, b, c, what)?.stride, BatchRows::new(scale, b, c, what)?.stride) {
        (s1, s2) if s1 == s2 => (shift.clone(), scale.clone()),
        _ => (shift.reshape((b, c))?.contiguous()?, scale.reshape((b, c))?.contiguous()?),
    };
    match x.dtype() {
        DType::BF16 => norm_typed::<half::bf16>(x, &shift, &scale, eps, (b, n, c)),
        DType::F16 => norm_typed::<half::f16>(x, &shift, &scale, eps, (b, n, c)),
        DType::F32 => norm_typed::<f32>(x, &shift, &scale, eps, (b, n, c)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn norm_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
    (b, n, c): (usize, usize, usize),
) -> Result<Tensor> {
    let what = "fused layer norm + modulation";
    let dev: CudaDevice = cuda_device(x, what)?;
    let kernel = crate::kernels::load(&dev, "ops/norm_modulate", &format!("layer_norm_modulate_{}", suffix(x.dtype(), what)?))?;
    let x = x.contiguous()?;
    let (rsh, rsc) = (BatchRows::new(shift, b, c, what)?, BatchRows::new(scale, b, c, what)?);
    let layout =
        NormLayout { rows: (b * n) as i32, channels: c as i32, rows_per_batch: n as i32, eps: eps as f32, mod_stride: rsh.stride as i64 };
    let mut out = unsafe { dev.alloc::<T>(b * n * c)? };
    let rx = CudaRead::new(&x)?;
    let (vx, vsh, vsc) = (rx.view::<T>()?, rsh.view::<T>()?, rsc.view::<T>()?);
    let cfg = LaunchConfig { grid_dim: ((b * n) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx).arg(&vsh).arg(&vsc).arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, n, c)))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RmsLayout {
    batch: i32,
    channels: i32,
    pixels: i64,
    eps: f32,
}
unsafe impl DeviceRepr for RmsLayout {}

/// RMSNorm over the channels of `x` `(B, C, H, W)` (contiguous), with optional f32 `weight` and
/// `bias` `(C,)`, without moving the channels last.
pub fn rms_norm_channels(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let what = "fused channels-first RMSNorm";
    let (b, c, h, w) = x.dims4()?;
    for t in [weight, bias].into_iter().flatten() {
        if t.dims() != [c] || t.dtype() != DType::F32 {
            return Err(Error::Other(format!("{what}: parameters must be f32 ({c},), got {:?} {:?}", t.dtype(), t.dims())));
        }
    }
    match x.dtype() {
        DType::BF16 => rms_typed::<half::bf16>(x, weight, bias, eps, (b, c, h * w)),
        DType::F16 => rms_typed::<half::f16>(x, weight, bias, eps, (b, c, h * w)),
        DType::F32 => rms_typed::<f32>(x, weight, bias, eps, (b, c, h * w)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn rms_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    (b, c, pixels): (usize, usize, usize),
) -> Result<Tensor> {
    let what = "fused channels-first RMSNorm";
    let dev: CudaDevice = cuda_device(x, what)?;
    let kernel = crate::kernels::load(&dev, "ops/rms_norm", &format!("rms_norm_channels_{}", suffix(x.dtype(), what)?))?;
    let x = x.contiguous()?;
    let (weight, bias) = (weight.map(Tensor::contiguous).transpose()?, bias.map(Tensor::contiguous).transpose()?);
    let layout = RmsLayout { batch: b as i32, channels: c as i32, pixels: pixels as i64, eps: eps as f32 };
    let mut out = unsafe { dev.alloc::<T>(b * c * pixels)? };
    let rx = CudaRead::new(&x)?;
    let rw = weight.as_ref().map(CudaRead::new).transpose()?;
    let rb = bias.as_ref().map(CudaRead::new).transpose()?;
    let vx = rx.view::<T>()?;
    let vw = rw.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let vb = rb.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let null: u64 = 0;
    let cfg = LaunchConfig { grid_dim: (pixels.div_ceil(256) as u32, b as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx);
    launch.arg_or_null(vw.as_ref(), &null);
    launch.arg_or_null(vb.as_ref(), &null);
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, x.dims()))
}
