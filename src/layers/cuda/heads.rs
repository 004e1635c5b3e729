//! Row gathers between token-major and head-major layouts (kernels/ops/heads.cu).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Storage, Tensor};

use super::launch_err;
use crate::attention::cuda::into_tensor;
use crate::error::{Error, Result};

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
