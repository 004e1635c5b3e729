//! The Mix-FFN's depth-wise 3×3 + SiLU + GLU (kernels/ops/mix_ffn.cu), on NCHW images and on
//! channels-last tokens.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};

use super::{launch_err, suffix, OptionalArg};
use crate::attention::cuda::{aligned_contiguous, cuda_device, into_tensor, CudaRead};
use crate::error::{Error, Result};

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
    launch.arg_or_null(vb_in.as_ref(), &null);
    launch.arg(&vw);
    launch.arg_or_null(vb_dw.as_ref(), &null);
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, c, h, w)))
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
    launch.arg_or_null(vb_in.as_ref(), &null);
    launch.arg(&vw);
    launch.arg_or_null(vb_dw.as_ref(), &null);
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, h * w, c)))
}
