//! Rust glue for the fused layer kernels (kernels/ops/*): functions that take candle CUDA tensors
//! and return tensors. The layers in `src/layers/` dispatch here when their tensors live on the GPU
//! and no gradient is being recorded (see [`fused_kernels_apply`]); otherwise they run the same math
//! as tensor ops, which is the reference the tests compare with.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Storage, StorageRef, Tensor};

use crate::attention::cuda::{aligned_contiguous, cuda_device, into_tensor, CudaRead};
use crate::error::{Error, Result};

/// Whether the fused kernels may serve `x`: on a CUDA device, and not inside a training step
/// (`attention::with_reference_only`: the kernels have no backward).
pub fn fused_kernels_apply(x: &Tensor) -> bool {
    x.device().is_cuda() && !crate::attention::reference_only()
}

/// The kernel-name suffix of a dtype the fused kernels serve.
fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        other => Err(Error::Other(format!("{what}: no fused kernel for {other:?}"))),
    }
}

fn launch_err(what: &str) -> impl Fn(candle_core::cuda_backend::cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Other(format!("{what} launch: {e:?}"))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GluLayout {
    batch: i32,
    channels: i32,
    height: i32,
    width: i32,
    tiles_x: i32,
    tiles_y: i32,
}
unsafe impl DeviceRepr for GluLayout {}

const GLU_TILE_W: usize = 32;
const GLU_TILE_H: usize = 16;

/// `u`: `(B, 2C, H, W)`; `b_in`: `(2C,)` or none; `w_dw`: `(2C, 9)`; `b_dw`: `(2C,)` or none; all
/// weights f32. Returns `(B, C, H, W)` in `u`'s dtype:
/// `a = depthwise3x3(silu(u + b_in)) + b_dw`, `out = a[:C] · silu(a[C:])`.
pub fn glu_depthwise3x3(u: &Tensor, b_in: Option<&Tensor>, w_dw: &Tensor, b_dw: Option<&Tensor>) -> Result<Tensor> {
    let what = "fused Mix-FFN depth-wise GLU";
    let (b, c2, h, w) = u.dims4()?;
    if c2 % 2 != 0 {
        return Err(Error::Other(format!("{what}: {c2} channels do not split into value and gate")));
    }
    if w_dw.dims() != [c2, 9] || w_dw.dtype() != DType::F32 {
        return Err(Error::Other(format!("{what}: weights must be f32 ({c2}, 9), got {:?} {:?}", w_dw.dtype(), w_dw.dims())));
    }
    for (name, bias) in [("input bias", b_in), ("depth-wise bias", b_dw)] {
        if let Some(t) = bias {
            if t.dims() != [c2] || t.dtype() != DType::F32 {
                return Err(Error::Other(format!("{what}: {name} must be f32 ({c2},), got {:?} {:?}", t.dtype(), t.dims())));
            }
        }
    }
    match u.dtype() {
        DType::BF16 => glu_typed::<half::bf16>(u, b_in, w_dw, b_dw, (b, c2 / 2, h, w)),
        DType::F16 => glu_typed::<half::f16>(u, b_in, w_dw, b_dw, (b, c2 / 2, h, w)),
        DType::F32 => glu_typed::<f32>(u, b_in, w_dw, b_dw, (b, c2 / 2, h, w)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn glu_typed<T: CudaDType + DeviceRepr>(
    u: &Tensor,
    b_in: Option<&Tensor>,
    w_dw: &Tensor,
    b_dw: Option<&Tensor>,
    (b, c, h, w): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let what = "fused Mix-FFN depth-wise GLU";
    let dev: CudaDevice = cuda_device(u, what)?;
    let kernel = crate::kernels::load(&dev, "ops/mix_ffn", &format!("glu_depthwise3x3_{}", suffix(u.dtype(), what)?))?;
    let u = aligned_contiguous(u)?;
    let (w_dw, b_in, b_dw) = (w_dw.contiguous()?, b_in.map(Tensor::contiguous).transpose()?, b_dw.map(Tensor::contiguous).transpose()?);
    let (tiles_x, tiles_y) = (w.div_ceil(GLU_TILE_W), h.div_ceil(GLU_TILE_H));
    let layout = GluLayout {
        batch: b as i32,
        channels: c as i32,
        height: h as i32,
        width: w as i32,
        tiles_x: tiles_x as i32,
        tiles_y: tiles_y as i32,
    };
    let mut out = unsafe { dev.alloc::<T>(b * c * h * w)? };
    let ru = CudaRead::new(&u)?;
    let rw = CudaRead::new(&w_dw)?;
    let rb_in = b_in.as_ref().map(CudaRead::new).transpose()?;
    let rb_dw = b_dw.as_ref().map(CudaRead::new).transpose()?;
    let (vu, vw) = (ru.view::<T>()?, rw.view::<f32>()?);
    let vb_in = rb_in.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let vb_dw = rb_dw.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let null: u64 = 0;
    let cfg = LaunchConfig { grid_dim: ((tiles_x * tiles_y) as u32, c as u32, b as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vu);
    match &vb_in {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    launch.arg(&vw);
    match &vb_dw {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, c, h, w)))
}

/// One row of `C` contiguous elements per batch, `stride` elements apart: a `(B, 1, C)` or `(B, C)`
/// tensor, e.g. a narrow of the `(B, 6, C)` modulation table, read in place.
struct BatchRows<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
    stride: usize,
}

impl<'a> BatchRows<'a> {
    fn new(t: &'a Tensor, b: usize, c: usize, what: &str) -> Result<Self> {
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

    fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        match &*self.guard {
            Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(self.start..self.start + self.len)),
            _ => unreachable!("checked in new"),
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct NormLayout {
    rows: i32,
    channels: i32,
    rows_per_batch: i32,
    eps: f32,
    mod_stride: i64,
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
struct ResidualLayout {
    rows: i64,
    channels: i32,
    rows_per_batch: i32,
    gate_stride: i64,
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
    match &vb {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    match &vg {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, n, c)))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TokenGluLayout {
    batch: i32,
    channels: i32,
    height: i32,
    width: i32,
    tiles_x: i32,
    tiles_y: i32,
}
unsafe impl DeviceRepr for TokenGluLayout {}

/// mix_ffn.cu's token kernel: 256 threads, 32 channels x an 8x8 pixel tile per block.
const TOKEN_THREADS: usize = 256;
const TOKEN_CH: usize = 32;
const TOKEN_TILE: usize = 8;

/// [`glu_depthwise3x3`] on channels-last tokens: `u` `(B, H·W, 2C)` of a `grid = [H, W]` ->
/// `(B, H·W, C)`.
pub fn glu_depthwise3x3_tokens(
    u: &Tensor,
    grid: [usize; 2],
    b_in: Option<&Tensor>,
    w_dw: &Tensor,
    b_dw: Option<&Tensor>,
) -> Result<Tensor> {
    let what = "fused Mix-FFN depth-wise GLU (tokens)";
    let (b, n, c2) = u.dims3()?;
    let [h, w] = grid;
    if h * w != n || c2 % 2 != 0 {
        return Err(Error::Other(format!("{what}: {n} tokens of {c2} channels do not fit a {h}x{w} grid of value + gate")));
    }
    if w_dw.dims() != [c2, 9] || w_dw.dtype() != DType::F32 {
        return Err(Error::Other(format!("{what}: weights must be f32 ({c2}, 9), got {:?} {:?}", w_dw.dtype(), w_dw.dims())));
    }
    match u.dtype() {
        DType::BF16 => glu_tokens_typed::<half::bf16>(u, b_in, w_dw, b_dw, (b, c2 / 2, h, w)),
        DType::F16 => glu_tokens_typed::<half::f16>(u, b_in, w_dw, b_dw, (b, c2 / 2, h, w)),
        DType::F32 => glu_tokens_typed::<f32>(u, b_in, w_dw, b_dw, (b, c2 / 2, h, w)),
        other => Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    }
}

fn glu_tokens_typed<T: CudaDType + DeviceRepr>(
    u: &Tensor,
    b_in: Option<&Tensor>,
    w_dw: &Tensor,
    b_dw: Option<&Tensor>,
    (b, c, h, w): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let what = "fused Mix-FFN depth-wise GLU (tokens)";
    let dev: CudaDevice = cuda_device(u, what)?;
    let kernel = crate::kernels::load(&dev, "ops/mix_ffn", &format!("glu_depthwise3x3_tokens_{}", suffix(u.dtype(), what)?))?;
    let u = u.contiguous()?;
    let (tiles_x, tiles_y) = (w.div_ceil(TOKEN_TILE), h.div_ceil(TOKEN_TILE));
    let layout = TokenGluLayout {
        batch: b as i32,
        channels: c as i32,
        height: h as i32,
        width: w as i32,
        tiles_x: tiles_x as i32,
        tiles_y: tiles_y as i32,
    };
    let mut out = unsafe { dev.alloc::<T>(b * c * h * w)? };
    let ru = CudaRead::new(&u)?;
    let rw = CudaRead::new(w_dw)?;
    let rb_in = b_in.map(CudaRead::new).transpose()?;
    let rb_dw = b_dw.map(CudaRead::new).transpose()?;
    let (vu, vw) = (ru.view::<T>()?, rw.view::<f32>()?);
    let vb_in = rb_in.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let vb_dw = rb_dw.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let null: u64 = 0;
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(TOKEN_CH) as u32, (tiles_x * tiles_y) as u32, b as u32),
        block_dim: (TOKEN_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = kernel.builder();
    launch.arg(&vu);
    match &vb_in {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    launch.arg(&vw);
    match &vb_dw {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, h * w, c)))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GatherLayout {
    dims: [u32; 4],
    strides: [i64; 4],
    row_words: u32,
}
unsafe impl DeviceRepr for GatherLayout {}

/// Rows of `d` features gathered into a contiguous tensor of `shape`: output row
/// `((i0·d1 + i1)·d2 + i2)·d3 + i3` is read at element offset `Σ i_k · strides[k]` of `src`'s
/// storage (from its start offset). `None` when the layout does not allow 8-byte word copies
/// (the caller then uses tensor ops).
pub fn gather_rows(src: &Tensor, dims: [usize; 4], strides: [usize; 4], d: usize, shape: &[usize]) -> Result<Option<Tensor>> {
    let what = "head gather";
    let elem = src.dtype().size_in_bytes();
    let (guard, layout) = src.storage_and_layout();
    let start = layout.start_offset();
    let words = |n: usize| (n * elem) % 8 == 0;
    let total_rows: usize = dims.iter().product();
    let row_words = d * elem / 8;
    if !words(d) || !words(start) || strides.iter().any(|&s| !words(s)) || total_rows * row_words >= (1 << 31) || total_rows == 0 {
        return Ok(None);
    }
    let Storage::Cuda(storage) = &*guard else {
        return Err(Error::Other(format!("{what}: not on a CUDA device")));
    };
    let dev = storage.device().clone();
    let stream = dev.cuda_stream();
    // One stream per candle device: the pointers' sync guards have nothing to order.
    let base = match src.dtype() {
        DType::BF16 => storage.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => storage.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::F32 => storage.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        other => return Err(Error::Other(format!("{what}: no kernel for {other:?}"))),
    } + (start * elem) as u64;
    let kernel = crate::kernels::load(&dev, "ops/heads", "gather_rows_u64")?;
    let to_words = |n: usize| (n * elem / 8) as i64;
    let layout = GatherLayout {
        dims: dims.map(|n| n as u32),
        strides: [to_words(strides[0]), to_words(strides[1]), to_words(strides[2]), to_words(strides[3])],
        row_words: row_words as u32,
    };
    let blocks = (total_rows * row_words).div_ceil(256).min(132 * 16) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let out = match src.dtype() {
        DType::BF16 => gather_launch::<half::bf16>(&kernel, cfg, base, &layout, total_rows * d, &dev, shape)?,
        DType::F16 => gather_launch::<half::f16>(&kernel, cfg, base, &layout, total_rows * d, &dev, shape)?,
        _ => gather_launch::<f32>(&kernel, cfg, base, &layout, total_rows * d, &dev, shape)?,
    };
    drop(guard);
    Ok(Some(out))
}

fn gather_launch<T: CudaDType + DeviceRepr>(
    kernel: &crate::kernels::Kernel,
    cfg: LaunchConfig,
    base: u64,
    layout: &GatherLayout,
    elems: usize,
    dev: &CudaDevice,
    shape: &[usize],
) -> Result<Tensor> {
    let mut out = unsafe { dev.alloc::<T>(elems)? };
    let mut launch = kernel.builder();
    launch.arg(&base).arg(&mut out).arg(layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err("head gather"))?;
    Ok(into_tensor(out, dev, shape))
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
    match &vw {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    match &vb {
        Some(v) => launch.arg(v),
        None => launch.arg(&null),
    };
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, x.dims()))
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Im2colLayout {
    batch: i32,
    channels: i32,
    height: i32,
    width: i32,
}
unsafe impl DeviceRepr for Im2colLayout {}

/// A 3×3 convolution with stride 1 and padding 1 as im2col + one batched GEMM whose output is
/// already NCHW: `x` `(B, C, H, W)` bf16/f16, `weight` `(C_out, C, 3, 3)`, `bias` `(C_out,)`.
/// `None` when the grid of the im2col kernel would not fit (B·C·9 rows > 65535).
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let what = "3x3 convolution (im2col + GEMM)";
    let (b, c, h, w) = x.dims4()?;
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    if (c_in, kh, kw) != (c, 3, 3) {
        return Err(Error::Other(format!("{what}: weight {:?} does not fit input {:?}", weight.dims(), x.dims())));
    }
    if b * c * 9 > 65535 || h * w == 0 {
        return Ok(None);
    }
    let col = match x.dtype() {
        DType::BF16 => im2col_typed::<half::bf16>(x, (b, c, h, w))?,
        DType::F16 => im2col_typed::<half::f16>(x, (b, c, h, w))?,
        _ => return Ok(None),
    };
    // (C_out, C·9) x (B, C·9, H·W) -> (B, C_out, H·W)
    let w2 = weight.to_dtype(x.dtype())?.reshape((c_out, c * 9))?;
    let mut y = w2.broadcast_matmul(&col)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.to_dtype(x.dtype())?.reshape((1, c_out, 1))?)?;
    }
    Ok(Some(y.reshape((b, c_out, h, w))?))
}

fn im2col_typed<T: CudaDType + DeviceRepr>(x: &Tensor, (b, c, h, w): (usize, usize, usize, usize)) -> Result<Tensor> {
    let what = "im2col";
    let dev: CudaDevice = cuda_device(x, what)?;
    let kernel = crate::kernels::load(&dev, "ops/im2col", &format!("im2col3x3_{}", suffix(x.dtype(), what)?))?;
    let x = x.contiguous()?;
    let layout = Im2colLayout { batch: b as i32, channels: c as i32, height: h as i32, width: w as i32 };
    let mut col = unsafe { dev.alloc::<T>(b * c * 9 * h * w)? };
    let rx = CudaRead::new(&x)?;
    let vx = rx.view::<T>()?;
    let cfg = LaunchConfig { grid_dim: ((h * w).div_ceil(256) as u32, (b * c * 9) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx).arg(&mut col).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(col, &dev, (b, c * 9, h * w)))
}
