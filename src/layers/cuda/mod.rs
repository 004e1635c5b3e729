//! Rust glue for the fused layer kernels (kernels/ops/*): functions that take candle CUDA tensors
//! and return tensors. The layers in `src/layers/` dispatch here when their tensors live on the GPU
//! and no gradient is being recorded (see [`fused_kernels_apply`]); otherwise they run the same math
//! as tensor ops, which is the reference the tests compare with.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
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
    row_groups: i32,
}
unsafe impl DeviceRepr for TokenGluLayout {}

const TOKEN_THREADS: usize = 128;
const TOKEN_ROWS: usize = 4;

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
    let row_groups = h.div_ceil(TOKEN_ROWS);
    let layout = TokenGluLayout { batch: b as i32, channels: c as i32, height: h as i32, width: w as i32, row_groups: row_groups as i32 };
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
        grid_dim: (c.div_ceil(TOKEN_THREADS) as u32, w as u32, (b * row_groups) as u32),
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
