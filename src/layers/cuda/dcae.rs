//! DC-AE's EfficientViT kernels on channels-last tokens (kernels/ops/dcae.cu): LiteMLA's
//! multi-scale branch (depth-wise k×k + grouped 1×1), its ReLU linear attention with head dim 32,
//! and RMSNorm over the last dim with a residual.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};

use super::{launch_err, suffix, OptionalArg};
use crate::attention::cuda::{cuda_device, into_tensor, sm_count, CudaRead};
use crate::error::{Error, Result};

/// The group size of the fused 1×1 and the head dim of the attention kernels.
pub const DCAE_GROUP: usize = 32;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DwLayout {
    batch: i32,
    channels: i32,
    height: i32,
    width: i32,
    tiles_x: i32,
}
unsafe impl DeviceRepr for DwLayout {}

const DW_TILE: usize = 8;

/// `u` `(B, H·W, C)` of a `grid = [H, W]`; `w_dw` `(C, k²)` f32 (depth-wise, k ∈ {3, 5}, zero
/// padding k/2, no bias); `w_pw` `(C, 32)` f32: the 1×1 conv grouped per 32 channels, row
/// `g·32 + o` holding output `o` of group `g` (no bias). Returns `(B, H·W, C)` in `u`'s dtype.
pub fn depthwise_grouped_pointwise(u: &Tensor, grid: [usize; 2], w_dw: &Tensor, w_pw: &Tensor) -> Result<Tensor> {
    let what = "fused depth-wise + grouped 1x1 conv";
    let (b, n, c) = u.dims3()?;
    let [h, w] = grid;
    if h * w != n || c % DCAE_GROUP != 0 {
        return Err(Error::Other(format!("{what}: {n} tokens of {c} channels do not fit a {h}x{w} grid of 32-channel groups")));
    }
    let k2 = w_dw.dim(1)?;
    let k = match k2 {
        9 => 3,
        25 => 5,
        _ => return Err(Error::Other(format!("{what}: kernel of {k2} taps, the kernel serves 3x3 and 5x5"))),
    };
    if w_dw.dims() != [c, k2] || w_pw.dims() != [c, DCAE_GROUP] || w_dw.dtype() != DType::F32 || w_pw.dtype() != DType::F32 {
        return Err(Error::Other(format!("{what}: weights must be f32 ({c}, {k2}) and ({c}, 32), got {:?} {:?}", w_dw.dims(), w_pw.dims())));
    }
    match u.dtype() {
        DType::BF16 => dw_typed::<half::bf16>(u, w_dw, w_pw, k, (b, c, h, w)),
        DType::F16 => dw_typed::<half::f16>(u, w_dw, w_pw, k, (b, c, h, w)),
        DType::F32 => dw_typed::<f32>(u, w_dw, w_pw, k, (b, c, h, w)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn dw_typed<T: CudaDType + DeviceRepr>(
    u: &Tensor,
    w_dw: &Tensor,
    w_pw: &Tensor,
    k: usize,
    (b, c, h, w): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let what = "fused depth-wise + grouped 1x1 conv";
    let dev: CudaDevice = cuda_device(u, what)?;
    let kernel = crate::kernels::load(&dev, "ops/dcae", &format!("dw_grouped_k{k}_{}", suffix(u.dtype(), what)?))?;
    let (u, w_dw, w_pw) = (u.contiguous()?, w_dw.contiguous()?, w_pw.contiguous()?);
    let (tiles_x, tiles_y) = (w.div_ceil(DW_TILE), h.div_ceil(DW_TILE));
    let layout = DwLayout { batch: b as i32, channels: c as i32, height: h as i32, width: w as i32, tiles_x: tiles_x as i32 };
    let mut out = unsafe { dev.alloc::<T>(b * h * w * c)? };
    let (ru, rd, rp) = (CudaRead::new(&u)?, CudaRead::new(&w_dw)?, CudaRead::new(&w_pw)?);
    let (vu, vd, vp) = (ru.view::<T>()?, rd.view::<f32>()?, rp.view::<f32>()?);
    let cfg = LaunchConfig {
        grid_dim: ((c / DCAE_GROUP) as u32, (tiles_x * tiles_y) as u32, b as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = kernel.builder();
    launch.arg(&vu).arg(&vd).arg(&vp).arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, h * w, c)))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AttnLayout {
    batch: i32,
    tokens: i32,
    heads_per_source: i32,
    source_channels: i32,
    out_channels: i32,
    splits: i32,
    chunk: i32,
    eps: f32,
}
unsafe impl DeviceRepr for AttnLayout {}

const STATE_TOKENS: usize = 64;
const OUT_TOKENS: usize = 128;
const STATE: usize = DCAE_GROUP * (DCAE_GROUP + 1);

/// LiteMLA's ReLU linear attention on the two `(B, N, 3C)` sources the reference concatenates
/// along the channels (`qkv`, then the multi-scale branch `ms`), each regrouped into heads of
/// `[q | k | v]` × 32 channels. Returns `(B, N, 2C)`: head `h`'s output in channels
/// `[32h, 32h + 32)`, `o = relu(q)·Σ relu(k) vᵀ / (relu(q)·Σ relu(k) + eps)`, f32 math.
pub fn multiscale_linear_attention(qkv: &Tensor, ms: &Tensor, eps: f64) -> Result<Tensor> {
    let what = "DC-AE linear attention";
    let (b, n, c3) = qkv.dims3()?;
    if ms.dims() != qkv.dims() || ms.dtype() != qkv.dtype() {
        return Err(Error::Other(format!("{what}: sources {:?} and {:?} differ", qkv.dims(), ms.dims())));
    }
    if c3 % (3 * DCAE_GROUP) != 0 || n == 0 {
        return Err(Error::Other(format!("{what}: {c3} channels are not heads of 3 x 32")));
    }
    match qkv.dtype() {
        DType::BF16 => attn_typed::<half::bf16>(qkv, ms, eps, (b, n, c3)),
        DType::F16 => attn_typed::<half::f16>(qkv, ms, eps, (b, n, c3)),
        DType::F32 => attn_typed::<f32>(qkv, ms, eps, (b, n, c3)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn attn_typed<T: CudaDType + DeviceRepr>(qkv: &Tensor, ms: &Tensor, eps: f64, (b, n, c3): (usize, usize, usize)) -> Result<Tensor> {
    let what = "DC-AE linear attention";
    let dev: CudaDevice = cuda_device(qkv, what)?;
    let sfx = suffix(qkv.dtype(), what)?;
    let state_kernel = crate::kernels::load(&dev, "ops/dcae", &format!("linattn_state_{sfx}"))?;
    let out_kernel = crate::kernels::load(&dev, "ops/dcae", &format!("linattn_out_{sfx}"))?;
    let (qkv, ms) = (qkv.contiguous()?, ms.contiguous()?);
    let heads_per_source = c3 / (3 * DCAE_GROUP);
    let heads = 2 * heads_per_source;
    // Token chunks per head: enough state blocks for four waves of the SMs, chunks of whole tiles;
    // output blocks per head: two waves, each block summing the chunks' partials once.
    let sms = sm_count(&dev)? as usize;
    let want = (4 * sms).div_ceil(b * heads).max(1);
    let out_blocks = (2 * sms).div_ceil(b * heads).clamp(1, n.div_ceil(OUT_TOKENS));
    let chunk = n.div_ceil(want).div_ceil(STATE_TOKENS) * STATE_TOKENS;
    let splits = n.div_ceil(chunk);
    let layout = AttnLayout {
        batch: b as i32,
        tokens: n as i32,
        heads_per_source: heads_per_source as i32,
        source_channels: c3 as i32,
        out_channels: (2 * c3 / 3) as i32,
        splits: splits as i32,
        chunk: chunk as i32,
        eps: eps as f32,
    };
    let mut partial = unsafe { dev.alloc::<f32>(b * heads * splits * STATE)? };
    let mut out = unsafe { dev.alloc::<T>(b * n * 2 * c3 / 3)? };
    let (rq, rm) = (CudaRead::new(&qkv)?, CudaRead::new(&ms)?);
    let (vq, vm) = (rq.view::<T>()?, rm.view::<T>()?);
    let cfg = LaunchConfig { grid_dim: (splits as u32, heads as u32, b as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = state_kernel.builder();
    launch.arg(&vq).arg(&vm).arg(&mut partial).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    let cfg = LaunchConfig { grid_dim: (out_blocks as u32, heads as u32, b as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = out_kernel.builder();
    launch.arg(&vq).arg(&vm).arg(&partial).arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, n, 2 * c3 / 3)))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct NormLayout {
    rows: i32,
    channels: i32,
    eps: f32,
}
unsafe impl DeviceRepr for NormLayout {}

/// RMSNorm over the last dim of `x` `(.., C)` with optional f32 `weight`, `bias` `(C,)`, plus an
/// optional `residual` of `x`'s shape and dtype, one rounding.
pub fn rms_norm_residual(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, residual: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let what = "fused RMSNorm + residual";
    let c = *x.dims().last().ok_or_else(|| Error::Other(format!("{what}: a scalar input")))?;
    for t in [weight, bias].into_iter().flatten() {
        if t.dims() != [c] || t.dtype() != DType::F32 {
            return Err(Error::Other(format!("{what}: parameters must be f32 ({c},), got {:?} {:?}", t.dtype(), t.dims())));
        }
    }
    if let Some(r) = residual {
        if r.dims() != x.dims() || r.dtype() != x.dtype() {
            return Err(Error::Other(format!("{what}: residual {:?} does not match {:?}", r.dims(), x.dims())));
        }
    }
    match x.dtype() {
        DType::BF16 => norm_typed::<half::bf16>(x, weight, bias, residual, eps, c),
        DType::F16 => norm_typed::<half::f16>(x, weight, bias, residual, eps, c),
        DType::F32 => norm_typed::<f32>(x, weight, bias, residual, eps, c),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn norm_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    eps: f64,
    c: usize,
) -> Result<Tensor> {
    let what = "fused RMSNorm + residual";
    let dev: CudaDevice = cuda_device(x, what)?;
    let kernel = crate::kernels::load(&dev, "ops/dcae", &format!("rms_norm_residual_{}", suffix(x.dtype(), what)?))?;
    let x = x.contiguous()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let (weight, bias) = (weight.map(Tensor::contiguous).transpose()?, bias.map(Tensor::contiguous).transpose()?);
    let rows = x.elem_count() / c.max(1);
    let layout = NormLayout { rows: rows as i32, channels: c as i32, eps: eps as f32 };
    let mut out = unsafe { dev.alloc::<T>(x.elem_count())? };
    let rx = CudaRead::new(&x)?;
    let rr = residual.as_ref().map(CudaRead::new).transpose()?;
    let rw = weight.as_ref().map(CudaRead::new).transpose()?;
    let rb = bias.as_ref().map(CudaRead::new).transpose()?;
    let vx = rx.view::<T>()?;
    let vr = rr.as_ref().map(|r| r.view::<T>()).transpose()?;
    let vw = rw.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let vb = rb.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let null: u64 = 0;
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx);
    launch.arg_or_null(vw.as_ref(), &null);
    launch.arg_or_null(vb.as_ref(), &null);
    launch.arg_or_null(vr.as_ref(), &null);
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, x.dims()))
}

/// Mirror of `rms_norm::Layout` (kernels/ops/rms_norm.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ChannelsLayout {
    batch: i32,
    channels: i32,
    pixels: i64,
    eps: f32,
}
unsafe impl DeviceRepr for ChannelsLayout {}

/// RMSNorm over the channels of `x` `(B, C, H, W)` with f32 `weight`, `bias` `(C,)`, plus
/// `residual` of `x`'s shape and dtype (DC-AE's ResBlock), one pass and one rounding.
pub fn rms_norm_channels_residual(x: &Tensor, weight: &Tensor, bias: &Tensor, residual: &Tensor, eps: f64) -> Result<Tensor> {
    let what = "fused channels-first RMSNorm + residual";
    let (b, c, h, w) = x.dims4()?;
    for t in [weight, bias] {
        if t.dims() != [c] || t.dtype() != DType::F32 {
            return Err(Error::Other(format!("{what}: parameters must be f32 ({c},), got {:?} {:?}", t.dtype(), t.dims())));
        }
    }
    if residual.dims() != x.dims() || residual.dtype() != x.dtype() {
        return Err(Error::Other(format!("{what}: residual {:?} does not match {:?}", residual.dims(), x.dims())));
    }
    match x.dtype() {
        DType::BF16 => channels_typed::<half::bf16>(x, weight, bias, residual, eps, (b, c, h * w)),
        DType::F16 => channels_typed::<half::f16>(x, weight, bias, residual, eps, (b, c, h * w)),
        DType::F32 => channels_typed::<f32>(x, weight, bias, residual, eps, (b, c, h * w)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn channels_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    eps: f64,
    (b, c, pixels): (usize, usize, usize),
) -> Result<Tensor> {
    let what = "fused channels-first RMSNorm + residual";
    let dev: CudaDevice = cuda_device(x, what)?;
    let kernel = crate::kernels::load(&dev, "ops/dcae", &format!("rms_norm_channels_residual_{}", suffix(x.dtype(), what)?))?;
    let (x, residual, weight, bias) = (x.contiguous()?, residual.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let layout = ChannelsLayout { batch: b as i32, channels: c as i32, pixels: pixels as i64, eps: eps as f32 };
    let mut out = unsafe { dev.alloc::<T>(b * c * pixels)? };
    let (rx, rr, rw, rb) = (CudaRead::new(&x)?, CudaRead::new(&residual)?, CudaRead::new(&weight)?, CudaRead::new(&bias)?);
    let (vx, vr, vw, vb) = (rx.view::<T>()?, rr.view::<T>()?, rw.view::<f32>()?, rb.view::<f32>()?);
    let cfg = LaunchConfig { grid_dim: (pixels.div_ceil(256) as u32, b as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx).arg(&vw).arg(&vb).arg(&vr).arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, x.dims()))
}

/// `x` `(B, C, H, W)` -> channels-last tokens `(B, H·W, C)`, one transpose kernel.
pub fn nchw_to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    transpose_batched(x, (b, c, h * w), (b, h * w, c))
}

/// Channels-last tokens `t` `(B, H·W, C)` of a `grid = [H, W]` -> `(B, C, H, W)`, one kernel.
pub fn tokens_to_nchw(t: &Tensor, grid: [usize; 2]) -> Result<Tensor> {
    let (b, n, c) = t.dims3()?;
    if grid[0] * grid[1] != n {
        return Err(Error::Other(format!("tokens to NCHW: {n} tokens do not fill a {}x{} grid", grid[0], grid[1])));
    }
    transpose_batched(t, (b, n, c), (b, c, grid[0], grid[1]))
}

/// Per batch, the `(rows, cols)` matrix of `x` transposed, shaped `out_shape`.
fn transpose_batched(x: &Tensor, (b, rows, cols): (usize, usize, usize), out_shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
    let what = "NCHW <-> NHWC transpose";
    let dev: CudaDevice = cuda_device(x, what)?;
    let x = x.contiguous()?;
    let out = match x.dtype() {
        DType::BF16 => transpose_typed::<half::bf16>(&x, &dev, (b, rows, cols))?,
        DType::F16 => transpose_typed::<half::f16>(&x, &dev, (b, rows, cols))?,
        DType::F32 => transpose_typed::<f32>(&x, &dev, (b, rows, cols))?,
        other => return Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    };
    Ok(out.reshape(out_shape)?)
}

fn transpose_typed<T: CudaDType + DeviceRepr>(x: &Tensor, dev: &CudaDevice, (b, rows, cols): (usize, usize, usize)) -> Result<Tensor> {
    let what = "NCHW <-> NHWC transpose";
    let kernel = crate::kernels::load(dev, "ops/dcae", &format!("transpose_{}", suffix(x.dtype(), what)?))?;
    let mut out = unsafe { dev.alloc::<T>(b * rows * cols)? };
    let rx = CudaRead::new(x)?;
    let vx = rx.view::<T>()?;
    let (r32, c32) = (rows as i32, cols as i32);
    let cfg = LaunchConfig { grid_dim: (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, b as u32), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx).arg(&mut out).arg(&r32).arg(&c32);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, dev, b * rows * cols))
}
