//! The CUDA side of the training ops (layers::train_ops): launchers that take candle's raw CUDA
//! storages (as a custom op's `cuda_fwd` gets them) and return the output storage. Forwards reuse
//! kernels/ops/{norm_modulate,gated_residual}.cu; the backwards are kernels/ops/*_bwd.cu.
//! Every input is contiguous (train_ops makes it so) and of one dtype.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, WithDType};

use super::norm::NormLayout;
use super::residual::ResidualLayout;
use super::{launch_err, suffix, NORM_MAX_CHANNELS};
use crate::error::{Error, Result};

type Input<'a> = (&'a CudaStorage, &'a Layout);

/// The elements of a contiguous input as a device view.
fn view<'a, T: CudaDType>((s, l): Input<'a>, what: &str) -> Result<CudaView<'a, T>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| Error::Other(format!("{what}: input is not contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn same_dtype(what: &str, inputs: [Input; 3]) -> Result<DType> {
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        return Err(Error::Other(format!("{what}: inputs of mixed dtypes")));
    }
    Ok(dtype)
}

/// Dispatches a launcher generic over the element type on the inputs' dtype.
macro_rules! by_dtype {
    ($what:expr, $inputs:expr, $f:ident($($arg:expr),*)) => {
        match same_dtype($what, $inputs)? {
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            other => Err(Error::Other(format!("{}: no kernel for {other:?}", $what))),
        }
    };
}

fn check_channels(what: &str, c: usize) -> Result<()> {
    if c > NORM_MAX_CHANNELS {
        return Err(Error::Other(format!("{what}: {c} channels, the kernel serves up to {NORM_MAX_CHANNELS}")));
    }
    Ok(())
}

/// `LN(x) · (1 + scale) + shift`: `x` `(B, N, C)`, `shift`, `scale` `(B, 1, C)`.
pub(crate) fn norm_modulate_forward(x: Input, shift: Input, scale: Input, dims: (usize, usize, usize), eps: f32) -> Result<CudaStorage> {
    let what = "norm + modulation (training op)";
    check_channels(what, dims.2)?;
    by_dtype!(what, [x, shift, scale], norm_forward_typed(x, shift, scale, dims, eps))
}

fn norm_forward_typed<T: CudaDType + DeviceRepr + WithDType>(x: Input, shift: Input, scale: Input, (b, n, c): (usize, usize, usize), eps: f32) -> Result<CudaStorage> {
    let what = "norm + modulation (training op)";
    let dev: CudaDevice = x.0.device.clone();
    let kernel = crate::kernels::load(&dev, "ops/norm_modulate", &format!("layer_norm_modulate_{}", suffix(T::DTYPE, what)?))?;
    let layout = NormLayout { rows: (b * n) as i32, channels: c as i32, rows_per_batch: n as i32, eps, mod_stride: c as i64 };
    let (vx, vsh, vsc) = (view::<T>(x, what)?, view::<T>(shift, what)?, view::<T>(scale, what)?);
    let mut out = unsafe { dev.alloc::<T>(b * n * c)? };
    let cfg = LaunchConfig { grid_dim: ((b * n) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    {
        let mut launch = kernel.builder();
        launch.arg(&vx).arg(&vsh).arg(&vsc).arg(&mut out).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct NormBackwardLayout {
    rows: i32,
    channels: i32,
    rows_per_batch: i32,
    eps: f32,
}
unsafe impl DeviceRepr for NormBackwardLayout {}

/// Gradients of the norm + modulation: `dy`, `x` `(B, N, C)`, `scale` `(B, 1, C)`; returns the
/// packed `(B, N + 2, C)` = `[dx; dshift; dscale]`.
pub(crate) fn norm_modulate_backward(dy: Input, x: Input, scale: Input, dims: (usize, usize, usize), eps: f32) -> Result<CudaStorage> {
    let what = "norm + modulation backward";
    check_channels(what, dims.2)?;
    by_dtype!(what, [dy, x, scale], norm_backward_typed(dy, x, scale, dims, eps))
}

fn norm_backward_typed<T: CudaDType + DeviceRepr + WithDType>(dy: Input, x: Input, scale: Input, (b, n, c): (usize, usize, usize), eps: f32) -> Result<CudaStorage> {
    let what = "norm + modulation backward";
    let dev: CudaDevice = x.0.device.clone();
    let sfx = suffix(T::DTYPE, what)?;
    let rows_kernel = crate::kernels::load(&dev, "ops/norm_modulate_bwd", &format!("layer_norm_modulate_bwd_rows_{sfx}"))?;
    let mod_kernel = crate::kernels::load(&dev, "ops/norm_modulate_bwd", &format!("layer_norm_modulate_bwd_mod_{sfx}"))?;
    let layout = NormBackwardLayout { rows: (b * n) as i32, channels: c as i32, rows_per_batch: n as i32, eps };
    let (vdy, vx, vsc) = (view::<T>(dy, what)?, view::<T>(x, what)?, view::<T>(scale, what)?);
    let mut packed = unsafe { dev.alloc::<T>(b * (n + 2) * c)? };
    // (mean, 1/σ) per row: written by the rows kernel, read by the modulation kernel.
    let mut stats = unsafe { dev.alloc::<f32>(2 * b * n)? };

    let cfg = LaunchConfig { grid_dim: ((b * n) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    {
        let mut launch = rows_kernel.builder();
        launch.arg(&vdy).arg(&vx).arg(&vsc).arg(&mut packed).arg(&mut stats).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }

    let cfg = LaunchConfig { grid_dim: (c.div_ceil(256) as u32, b as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    {
        let mut launch = mod_kernel.builder();
        launch.arg(&vdy).arg(&vx).arg(&stats).arg(&mut packed).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(packed, dev))
}

/// `x + y · gate`: `x`, `y` `(B, N, C)`, `gate` `(B, 1, C)` (the bias is already in `y`).
pub(crate) fn gated_residual_forward(x: Input, y: Input, gate: Input, dims: (usize, usize, usize)) -> Result<CudaStorage> {
    by_dtype!("gated residual (training op)", [x, y, gate], residual_forward_typed(x, y, gate, dims))
}

fn residual_forward_typed<T: CudaDType + DeviceRepr + WithDType>(x: Input, y: Input, gate: Input, (b, n, c): (usize, usize, usize)) -> Result<CudaStorage> {
    let what = "gated residual (training op)";
    let dev: CudaDevice = x.0.device.clone();
    let kernel = crate::kernels::load(&dev, "ops/gated_residual", &format!("gated_residual_{}", suffix(T::DTYPE, what)?))?;
    let layout = ResidualLayout { rows: (b * n) as i64, channels: c as i32, rows_per_batch: n as i32, gate_stride: c as i64 };
    let (vx, vy, vg) = (view::<T>(x, what)?, view::<T>(y, what)?, view::<T>(gate, what)?);
    let mut out = unsafe { dev.alloc::<T>(b * n * c)? };
    let no_bias: u64 = 0;
    let blocks = (b * n * c).div_ceil(256).min(132 * 16) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    {
        let mut launch = kernel.builder();
        launch.arg(&vx).arg(&vy).arg(&no_bias).arg(&vg).arg(&mut out).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ResidualBackwardLayout {
    batch: i32,
    tokens: i32,
    channels: i32,
}
unsafe impl DeviceRepr for ResidualBackwardLayout {}

/// Gradients of the gated residual with respect to `y` and `gate`: `dout`, `y` `(B, N, C)`,
/// `gate` `(B, 1, C)`; returns the packed `(B, N + 1, C)` = `[dy; dgate]`.
pub(crate) fn gated_residual_backward(dout: Input, y: Input, gate: Input, dims: (usize, usize, usize)) -> Result<CudaStorage> {
    by_dtype!("gated residual backward", [dout, y, gate], residual_backward_typed(dout, y, gate, dims))
}

fn residual_backward_typed<T: CudaDType + DeviceRepr + WithDType>(dout: Input, y: Input, gate: Input, (b, n, c): (usize, usize, usize)) -> Result<CudaStorage> {
    let what = "gated residual backward";
    let dev: CudaDevice = y.0.device.clone();
    let kernel = crate::kernels::load(&dev, "ops/gated_residual_bwd", &format!("gated_residual_bwd_{}", suffix(T::DTYPE, what)?))?;
    let layout = ResidualBackwardLayout { batch: b as i32, tokens: n as i32, channels: c as i32 };
    let (vd, vy, vg) = (view::<T>(dout, what)?, view::<T>(y, what)?, view::<T>(gate, what)?);
    let mut packed = unsafe { dev.alloc::<T>(b * (n + 1) * c)? };
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(256) as u32, b as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    {
        let mut launch = kernel.builder();
        launch.arg(&vd).arg(&vy).arg(&vg).arg(&mut packed).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(packed, dev))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GluLayout {
    batch: i32,
    height: i32,
    width: i32,
    channels: i32,
}
unsafe impl DeviceRepr for GluLayout {}

/// Blocks of a grid-stride loop over `elems` elements (enough to fill the H200's 132 SMs).
fn stride_blocks(elems: usize) -> u32 {
    (elems.div_ceil(256).min(132 * 16) as u32).max(1)
}

/// The Mix-FFN middle (SiLU, depth-wise 3x3, GLU) on tokens: `u` `(B, H·W, 2h)`, `wb` `(2h, 10)`
/// (taps, then the bias) -> `(B, H·W, h)`.
pub(crate) fn glu_forward(u: Input, wb: Input, dims: (usize, usize, usize), grid: [usize; 2]) -> Result<CudaStorage> {
    by_dtype!("Mix-FFN GLU (training op)", [u, wb, wb], glu_forward_typed(u, wb, dims, grid))
}

fn glu_forward_typed<T: CudaDType + DeviceRepr + WithDType>(u: Input, wb: Input, (b, n, c2): (usize, usize, usize), grid: [usize; 2]) -> Result<CudaStorage> {
    let what = "Mix-FFN GLU (training op)";
    let dev: CudaDevice = u.0.device.clone();
    let kernel = crate::kernels::load(&dev, "ops/glu_depthwise_train", &format!("glu_dw_tokens_fwd_{}", suffix(T::DTYPE, what)?))?;
    let layout = GluLayout { batch: b as i32, height: grid[0] as i32, width: grid[1] as i32, channels: c2 as i32 };
    let (vu, vw) = (view::<T>(u, what)?, view::<T>(wb, what)?);
    let mut out = unsafe { dev.alloc::<T>(b * n * c2 / 2)? };
    let cfg = LaunchConfig { grid_dim: (stride_blocks(b * n * c2 / 2), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    {
        let mut launch = kernel.builder();
        launch.arg(&vu).arg(&vw).arg(&mut out).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Gradients of [`glu_forward`]: `dout` `(B, H·W, h)`; returns the flat `[du (B·H·W·2h); dwb (2h·10)]`.
pub(crate) fn glu_backward(dout: Input, u: Input, wb: Input, dims: (usize, usize, usize), grid: [usize; 2]) -> Result<CudaStorage> {
    by_dtype!("Mix-FFN GLU backward", [dout, u, wb], glu_backward_typed(dout, u, wb, dims, grid))
}

fn glu_backward_typed<T: CudaDType + DeviceRepr + WithDType>(
    dout: Input,
    u: Input,
    wb: Input,
    (b, n, c2): (usize, usize, usize),
    grid: [usize; 2],
) -> Result<CudaStorage> {
    let what = "Mix-FFN GLU backward";
    let dev: CudaDevice = u.0.device.clone();
    let sfx = suffix(T::DTYPE, what)?;
    let load = |name: &str| crate::kernels::load(&dev, "ops/glu_depthwise_train", &format!("glu_dw_tokens_{name}_{sfx}"));
    let (grad_d, grad_u, grad_w, round) = (load("grad_d")?, load("grad_u")?, load("grad_w")?, load("round")?);
    let layout = GluLayout { batch: b as i32, height: grid[0] as i32, width: grid[1] as i32, channels: c2 as i32 };
    let (vdout, vu, vw) = (view::<T>(dout, what)?, view::<T>(u, what)?, view::<T>(wb, what)?);
    let (elems, weights) = (b * n * c2, c2 * 10);
    // dd: the gradient reaching the convolution's output, in f32 (read by two kernels).
    let mut dd = unsafe { dev.alloc::<f32>(elems)? };
    let mut sums = dev.alloc_zeros::<f32>(weights)?;
    let mut packed = unsafe { dev.alloc::<T>(elems + weights)? };
    let block = (256, 1, 1);

    let cfg = LaunchConfig { grid_dim: (stride_blocks(elems / 2), 1, 1), block_dim: block, shared_mem_bytes: 0 };
    {
        let mut launch = grad_d.builder();
        launch.arg(&vdout).arg(&vu).arg(&vw).arg(&mut dd).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }

    let cfg = LaunchConfig { grid_dim: (stride_blocks(elems), 1, 1), block_dim: block, shared_mem_bytes: 0 };
    {
        let mut launch = grad_u.builder();
        launch.arg(&dd).arg(&vu).arg(&vw).arg(&mut packed).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }

    // Token slices: ~64 tokens per thread, at most 1024 slices (atomics per (k, t) stay few).
    let slices = (b * n).div_ceil(64).clamp(1, 1024) as u32;
    let cfg = LaunchConfig { grid_dim: (c2.div_ceil(256) as u32, slices, 1), block_dim: block, shared_mem_bytes: 0 };
    {
        let mut launch = grad_w.builder();
        launch.arg(&dd).arg(&vu).arg(&mut sums).arg(&layout);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }

    let count = weights as i32;
    let cfg = LaunchConfig { grid_dim: (weights.div_ceil(256) as u32, 1, 1), block_dim: block, shared_mem_bytes: 0 };
    {
        let mut tail = packed.slice_mut(elems..elems + weights);
        let mut launch = round.builder();
        launch.arg(&sums).arg(&mut tail).arg(&count);
        unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(packed, dev))
}
