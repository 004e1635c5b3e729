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
use candle_core::{Shape, Storage, StorageRef, Tensor};

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
