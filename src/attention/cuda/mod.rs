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
