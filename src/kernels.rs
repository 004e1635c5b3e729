//! Our CUDA kernels: compiled by kernels/build.rs (every `kernels/**/*.cu` to an sm_90a cubin and a
//! compute_90a PTX fallback) and embedded in the binary. Modules are keyed by their path under
//! `kernels/` without the extension, e.g. `"attention/linear/linear_attn"`.
//!
//! [`load`] gets a kernel function for a candle CUDA device. Modules are loaded once per device
//! and cached; the cubin is preferred (no JIT, Hopper-only instructions), the PTX is the fallback
//! for a driver that refuses the cubin. Without the `cuda` feature this module is empty.

#[cfg(feature = "cuda")]
pub use imp::*;

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchArgs};
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::{CudaDevice, DeviceId};

    use crate::error::{Error, Result};

    mod embedded {
        include!(concat!(env!("OUT_DIR"), "/kernels_embedded.rs"));
    }

    /// The keys of all embedded modules, sorted.
    pub fn module_keys() -> impl Iterator<Item = &'static str> {
        embedded::EMBEDDED.iter().map(|(key, _, _)| *key)
    }

    /// How a module got loaded: the sm_90a cubin or the PTX, JIT-compiled by the driver.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum LoadedFrom {
        Cubin,
        Ptx,
    }

    struct LoadedModule {
        module: Arc<CudaModule>,
        from: LoadedFrom,
    }

    type Cache = Mutex<HashMap<(DeviceId, &'static str), Arc<LoadedModule>>>;

    fn cache() -> &'static Cache {
        static CACHE: OnceLock<Cache> = OnceLock::new();
        CACHE.get_or_init(|| Mutex::new(HashMap::new()))
    }

    /// A kernel function bound to the device's stream. Launch with [`Kernel::builder`].
    pub struct Kernel {
        pub func: CudaFunction,
        pub stream: Arc<CudaStream>,
        pub from: LoadedFrom,
    }

    impl Kernel {
        pub fn builder(&self) -> LaunchArgs<'_> {
            self.stream.launch_builder(&self.func)
        }

        /// Allows `bytes` of dynamic shared memory (a block gets more than 48 KB only after this).
        pub fn set_max_dynamic_smem(&self, bytes: usize) -> Result<()> {
            use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
            self.func
                .set_attribute(Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                .map_err(|e| Error::Other(format!("kernel: cannot allow {bytes} B of shared memory: {e:?}")))
        }

        /// How many blocks of `threads` threads and `smem` dynamic bytes fit on one SM.
        pub fn blocks_per_sm(&self, threads: u32, smem: usize) -> Result<u32> {
            self.func
                .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
                .map(|n| n.max(1) as u32)
                .map_err(|e| Error::Other(format!("kernel: occupancy query failed: {e:?}")))
        }
    }

    /// Lets the device's stream-ordered memory pool keep freed memory instead of returning it to
    /// the driver at every synchronization (its default threshold is 0). Without this, a program
    /// that allocates its outputs per call and synchronizes between calls (a benchmark loop, a
    /// sampler step) pays for mapping fresh pages every time: seen as a 1 GiB copy at 1.1 TB/s.
    pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let ctx = dev.cuda_stream().context().clone();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: plain driver calls on this device's default pool, with valid out-pointers.
        unsafe {
            ctx.bind_to_thread().map_err(|e| Error::Other(format!("cuda context: {e:?}")))?;
            let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(Error::Other(format!("cuDeviceGetDefaultMemPool: {r:?}")));
            }
            let r = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(Error::Other(format!("cuMemPoolSetAttribute: {r:?}")));
            }
        }
        Ok(())
    }

    /// The kernel `function` of the embedded module `module` on `dev`.
    pub fn load(dev: &CudaDevice, module: &str, function: &str) -> Result<Kernel> {
        let loaded = load_module(dev, module)?;
        let func = loaded
            .module
            .load_function(function)
            .map_err(|e| Error::Other(format!("kernel module {module}: no function {function}: {e:?}")))?;
        Ok(Kernel { func, stream: dev.cuda_stream(), from: loaded.from })
    }

    fn load_module(dev: &CudaDevice, module: &str) -> Result<Arc<LoadedModule>> {
        let (key, cubin, ptx) = embedded::EMBEDDED
            .iter()
            .find(|(key, _, _)| *key == module)
            .ok_or_else(|| Error::Other(format!("no embedded kernel module {module:?} (see kernels/build.rs)")))?;
        let mut cache = cache().lock().map_err(|_| Error::Other("kernel cache poisoned".into()))?;
        if let Some(m) = cache.get(&(dev.id(), *key)) {
            return Ok(m.clone());
        }
        let context = dev.cuda_stream().context().clone();
        let loaded = match context.load_module(Ptx::from_binary(cubin.to_vec())) {
            Ok(module) => LoadedModule { module, from: LoadedFrom::Cubin },
            Err(cubin_err) => match context.load_module(Ptx::from_src(*ptx)) {
                Ok(module) => LoadedModule { module, from: LoadedFrom::Ptx },
                Err(ptx_err) => {
                    return Err(Error::Other(format!(
                        "kernel module {module}: the driver refused the sm_90a cubin ({cubin_err:?}) and the PTX ({ptx_err:?})"
                    )))
                }
            },
        };
        let loaded = Arc::new(loaded);
        cache.insert((dev.id(), *key), loaded.clone());
        Ok(loaded)
    }
}
