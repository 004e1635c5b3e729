//! Rust glue for our attention kernels (kernels/attention/*): functions that take candle CUDA
//! tensors `(B, H, N, D)` and return tensors. The backends in `src/attention/*.rs` dispatch here
//! when their tensors live on the GPU.

pub mod dense;
pub mod linear;
pub mod neighborhood;
pub mod pyramid;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Shape, Storage, StorageRef, Tensor};

use crate::error::{Error, Result};

/// The CUDA device of a tensor, or a clear error for a tensor elsewhere.
pub(crate) fn cuda_device(t: &Tensor, what: &str) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        other => Err(Error::Other(format!("{what}: expected a CUDA tensor, got one on {other:?}"))),
    }
}

/// A contiguous tensor whose first element is 16-byte aligned (the kernels copy 16 bytes at a time).
pub(crate) fn aligned_contiguous(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    let elem = t.dtype().size_in_bytes();
    if (t.layout().start_offset() * elem) % 16 == 0 {
        Ok(t)
    } else {
        Ok(t.copy()?)
    }
}

/// Read access to a contiguous CUDA tensor's elements. Keep the guard alive while the view is used.
pub(crate) struct CudaRead<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> CudaRead<'a> {
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::Other("internal: kernel input is not contiguous".into()))?;
        if !matches!(&*guard, Storage::Cuda(_)) {
            return Err(Error::Other("internal: kernel input is not on a CUDA device".into()));
        }
        Ok(Self { guard, start, len: end - start })
    }

    pub fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        match &*self.guard {
            Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(self.start..self.start + self.len)),
            _ => unreachable!("checked in new"),
        }
    }
}

/// Wraps a device buffer that a kernel filled into a tensor of `shape`.
pub(crate) fn into_tensor<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    debug_assert!(storage.dtype().size_in_bytes() > 0);
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// The number of SMs of the device.
pub(crate) fn sm_count(dev: &CudaDevice) -> Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    dev.cuda_stream()
        .context()
        .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map(|n| n.max(1) as u32)
        .map_err(|e| Error::Other(format!("cannot read the SM count: {e:?}")))
}

/// A small index table (PSA's sample positions and tile schedule) on `dev`, uploaded once per
/// content and device. A copy from pageable host memory synchronizes the stream first, so an
/// upload in every call would stall the GPU until the host caught up (three times per PSA
/// forward before this cache); the cached tables keep the host running ahead.
pub(crate) fn cached_table(dev: &CudaDevice, data: &[i32]) -> Result<std::sync::Arc<CudaSlice<i32>>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    type Cache = HashMap<(candle_core::cuda_backend::DeviceId, Vec<i32>), Arc<CudaSlice<i32>>>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    const MAX_TABLES: usize = 256; // bound the memory of many shapes (tables are KBs)
    let key = (dev.id(), data.to_vec());
    let mut cache = CACHE.get_or_init(|| Mutex::new(HashMap::new())).lock().map_err(|_| Error::Other("table cache poisoned".into()))?;
    if let Some(t) = cache.get(&key) {
        return Ok(t.clone());
    }
    // (an empty table still gets one element: a null pointer is not a valid kernel argument)
    let upload = if data.is_empty() { &[0][..] } else { data };
    let t = Arc::new(dev.cuda_stream().clone_htod(upload).map_err(|e| Error::Other(format!("upload: {e:?}")))?);
    if cache.len() >= MAX_TABLES {
        cache.clear(); // in-flight launches hold their own Arc; frees are stream-ordered
    }
    cache.insert(key, t.clone());
    Ok(t)
}

/// Unit stride in D, other strides and the start 8-element aligned (16-byte rows for TMA and the
/// kernels' vector copies): the tensor itself, else a contiguous copy.
pub(crate) fn kernel_view(t: &Tensor) -> Result<Tensor> {
    let s = t.stride();
    let ok = s[3] == 1 && s[..3].iter().all(|x| x % 8 == 0) && t.layout().start_offset() % 8 == 0;
    Ok(if ok { t.clone() } else { t.contiguous()? })
}

/// Element strides (batch, head, row) of a (B, H, N, D) tensor.
pub(crate) fn strides3(t: &Tensor) -> [i64; 3] {
    let s = t.stride();
    [s[0] as i64, s[1] as i64, s[2] as i64]
}

/// TMA descriptor of a (B, H, N, D) 16-bit tensor at `ptr` with element strides (batch, head,
/// row): 4-D (D, N, H, B), box (64 columns, `box_rows` rows), 128-byte swizzle; reads past the
/// last row or column return zeros. An empty tensor gets an all-zero map, which no kernel reads.
pub(crate) fn tensor_map(ptr: u64, dtype: DType, dims: (usize, usize, usize, usize), strides: [i64; 3], box_rows: u32) -> Result<[u64; 16]> {
    let (b, h, n, d) = dims;
    if n == 0 || b * h == 0 {
        return Ok([0; 16]);
    }
    let global_dim = [d as u64, n as u64, h as u64, b as u64];
    let global_strides = [strides[2] as u64 * 2, strides[1] as u64 * 2, strides[0] as u64 * 2];
    encode_tiled(ptr, dtype, &global_dim, &global_strides, &[64, box_rows, 1, 1])
        .map_err(|status| Error::Other(format!("cuTensorMapEncodeTiled {dims:?} strides {strides:?} box rows {box_rows}: {status:?}")))
}

/// A tiled TMA descriptor of 16-bit elements (bf16, else f16) at `ptr`: `global_dim` innermost
/// first, byte strides of the outer dims, `box_dim` per dim; unit element strides, 128-byte
/// swizzle, 256-byte L2 promotion, zeros past the edges. Shared by the 4-D maps above and the
/// GNA launcher's 5-D in-place maps.
pub(crate) fn encode_tiled(
    ptr: u64,
    dtype: DType,
    global_dim: &[u64],
    global_strides: &[u64],
    box_dim: &[u32],
) -> std::result::Result<[u64; 16], candle_core::cuda_backend::cudarc::driver::sys::CUresult> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let rank = global_dim.len();
    assert!(global_strides.len() + 1 == rank && box_dim.len() == rank && (1..=5).contains(&rank), "tensor map rank mismatch");
    let data_type = match dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let element_strides = [1u32; 5];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array holds at least `rank` (strides rank - 1) entries, checked above; the
    // callers pass a live device allocation covering the tensor these dims and strides describe.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            rank as u32,
            ptr as *mut std::ffi::c_void,
            global_dim.as_ptr(),
            global_strides.as_ptr(),
            box_dim.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(status);
    }
    // SAFETY: written by the successful call above.
    Ok(unsafe { map.assume_init() }.opaque)
}

/// Device address of a tensor's first element, as `T` (its dtype).
pub(crate) fn dev_ptr<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(Error::Other("tensor is not on a CUDA device".into()));
    };
    let stream = dev.cuda_stream();
    // One stream per candle device: the sync guard has nothing to order, drop it here.
    let (ptr, _sync) = cs.as_cuda_slice::<T>()?.device_ptr(&stream);
    Ok(ptr + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}
