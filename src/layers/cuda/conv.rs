//! 3×3 convolutions as im2col (kernels/ops/im2col.cu) + one tensor-core GEMM.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};

use super::{launch_err, suffix, OptionalArg};
use crate::attention::cuda::{cuda_device, into_tensor, CudaRead};
use crate::error::{Error, Result};

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

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ImplicitLayout {
    batch: i32,
    c_in: i32,
    c_out: i32,
    height: i32,
    width: i32,
    in_height: i32,
    in_width: i32,
    upsample: i32,
    silu: i32,
    shortcut_repeats: i32,
}
unsafe impl DeviceRepr for ImplicitLayout {}

/// kernels/ops/conv_igemm.cu's tile: output channels x pixels per block (the `_m32` kernels take
/// 32 output channels).
const IGEMM_TILE: usize = 128;
const IGEMM_SMALL_TILE: usize = 32;
/// Input channels per K tile: the kernel needs a multiple.
pub const IGEMM_CHANNEL_MULTIPLE: usize = 32;

/// A 3×3, stride-1, padding-1 convolution as an implicit GEMM on the tensor cores (no im2col
/// buffer): `x` `(B, C, H, W)` bf16/f16, `weight` `(C_out, C, 3, 3)`, `bias` `(C_out,)`. With
/// `upsample`, the convolution runs on the nearest ×2 up-sampled `x` (output `(B, C_out, 2H, 2W)`)
/// without building it; with `silu`, SiLU is applied to the biased output; with
/// `shortcut_repeats` (only with `upsample`), DC-AE's up-block shortcut
/// `pixel_shuffle(repeat_interleave(x, r), 2)` is added. `None` when the kernel does not serve the
/// case (dtype, `C % 32 != 0`). With `channels_last`, `x` is first transposed to NHWC by one
/// kernel and the GEMM reads 16-byte runs of channels (fewer, wider loads than the NCHW gather).
pub fn conv3x3_implicit(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    upsample: bool,
    silu: bool,
    shortcut_repeats: Option<usize>,
    channels_last: bool,
) -> Result<Option<Tensor>> {
    let what = "3x3 convolution (implicit GEMM)";
    let (b, c, h, w) = x.dims4()?;
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    if (c_in, kh, kw) != (c, 3, 3) {
        return Err(Error::Other(format!("{what}: weight {:?} does not fit input {:?}", weight.dims(), x.dims())));
    }
    let (oh, ow) = if upsample { (2 * h, 2 * w) } else { (h, w) };
    if c % IGEMM_CHANNEL_MULTIPLE != 0 || oh * ow == 0 || c_out == 0 || oh * ow > i32::MAX as usize / 2 {
        return Ok(None);
    }
    if let Some(r) = shortcut_repeats {
        if !upsample || r == 0 || (4 * c_out) % r != 0 || 4 * c_out / r != c {
            return Err(Error::Other(format!("{what}: shortcut of {c} channels repeated {r} times does not give 4 x {c_out}")));
        }
    }
    match x.dtype() {
        DType::BF16 => implicit_typed::<half::bf16>(x, weight, bias, (b, c, c_out, h, w), upsample, silu, shortcut_repeats, channels_last).map(Some),
        DType::F16 => implicit_typed::<half::f16>(x, weight, bias, (b, c, c_out, h, w), upsample, silu, shortcut_repeats, channels_last).map(Some),
        _ => Ok(None),
    }
}

fn implicit_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (b, c, c_out, h, w): (usize, usize, usize, usize, usize),
    upsample: bool,
    silu: bool,
    shortcut_repeats: Option<usize>,
    channels_last: bool,
) -> Result<Tensor> {
    let what = "3x3 convolution (implicit GEMM)";
    let dev: CudaDevice = cuda_device(x, what)?;
    let sfx = suffix(x.dtype(), what)?;
    // 32 output channels per block for C_out <= 32 (DC-AE's conv_out), else 128.
    let tile_m = if c_out <= IGEMM_SMALL_TILE { IGEMM_SMALL_TILE } else { IGEMM_TILE };
    let name = format!(
        "conv3x3_igemm{}{}_{sfx}",
        if channels_last { "_nhwc" } else { "" },
        if tile_m == IGEMM_SMALL_TILE { "_m32" } else { "" }
    );
    let kernel = crate::kernels::load(&dev, "ops/conv_igemm", &name)?;
    let x = x.contiguous()?;
    let x = if channels_last { nchw_to_nhwc::<T>(&x, &dev, (b, c, h * w))? } else { x };
    // (C_out, C, 3, 3) -> (C_out, C / 32, 3·3, 32): a K tile is 32 channels of one tap, the 9 taps
    // of a chunk of channels in a row.
    let chunks = c / IGEMM_CHANNEL_MULTIPLE;
    let wk = weight
        .to_dtype(x.dtype())?
        .reshape((c_out, chunks, IGEMM_CHANNEL_MULTIPLE, 9))?
        .permute((0, 1, 3, 2))?
        .contiguous()?;
    let bias = bias.map(|t| t.to_dtype(DType::F32)?.contiguous()).transpose()?;
    let (oh, ow) = if upsample { (2 * h, 2 * w) } else { (h, w) };
    let layout = ImplicitLayout {
        batch: b as i32,
        c_in: c as i32,
        c_out: c_out as i32,
        height: oh as i32,
        width: ow as i32,
        in_height: h as i32,
        in_width: w as i32,
        upsample: i32::from(upsample),
        silu: i32::from(silu),
        shortcut_repeats: shortcut_repeats.unwrap_or(0) as i32,
    };
    let mut out = unsafe { dev.alloc::<T>(b * c_out * oh * ow)? };
    let (rx, rw) = (CudaRead::new(&x)?, CudaRead::new(&wk)?);
    let rb = bias.as_ref().map(CudaRead::new).transpose()?;
    let (vx, vw) = (rx.view::<T>()?, rw.view::<T>()?);
    let vb = rb.as_ref().map(|r| r.view::<f32>()).transpose()?;
    let null: u64 = 0;
    let cfg = LaunchConfig {
        grid_dim: ((oh * ow).div_ceil(IGEMM_TILE) as u32, c_out.div_ceil(tile_m) as u32, b as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = kernel.builder();
    launch.arg(&vx).arg(&vw);
    launch.arg_or_null(vb.as_ref(), &null);
    launch.arg(&mut out).arg(&layout);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, &dev, (b, c_out, oh, ow)))
}

/// `(B, C, H, W)` contiguous -> the same elements channels-last, as a flat `(B·H·W·C,)` tensor.
fn nchw_to_nhwc<T: CudaDType + DeviceRepr>(x: &Tensor, dev: &CudaDevice, (b, c, pixels): (usize, usize, usize)) -> Result<Tensor> {
    let what = "NCHW -> NHWC";
    let kernel = crate::kernels::load(dev, "ops/conv_igemm", &format!("nchw_to_nhwc_{}", suffix(x.dtype(), what)?))?;
    let mut out = unsafe { dev.alloc::<T>(b * c * pixels)? };
    let rx = CudaRead::new(x)?;
    let vx = rx.view::<T>()?;
    let (c32, p32) = (c as i32, pixels as i32);
    let cfg = LaunchConfig { grid_dim: (pixels.div_ceil(32) as u32, c.div_ceil(32) as u32, b as u32), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut launch = kernel.builder();
    launch.arg(&vx).arg(&mut out).arg(&c32).arg(&p32);
    unsafe { launch.launch(cfg) }.map_err(launch_err(what))?;
    Ok(into_tensor(out, dev, b * c * pixels))
}
