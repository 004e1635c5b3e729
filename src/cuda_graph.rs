//! CUDA graphs: record a fixed-shape piece of GPU work once, replay it with one launch.
//!
//! A SANA step is ~1,500 kernel launches; enqueuing them from the host takes about as long as the
//! GPU needs to run them, so the GPU waits on the host between kernels. A captured graph replays
//! all of them from one driver call.
//!
//! What a captured body may do: launch kernels and cuBLAS / cuDNN calls on the device's stream,
//! allocate and free stream-ordered memory (every allocation made during the capture must also be
//! freed during it, or the graph cannot be launched twice), and upload small host constants that
//! an eager warm-up under [`with_htod_cache`] already uploaded (candle keeps them by content). It must
//! not read results back to the host, synchronize, or upload anything new: the capture then fails
//! with an error and the caller runs eagerly instead.
//!
//! Everything here needs the `cuda` feature; without it the module is empty.

#[cfg(feature = "cuda")]
pub use imp::*;

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
    use candle_core::cuda_backend::CudaDevice;

    use crate::error::{Error, Result};

    /// Sets up a freshly opened device for this crate's use: call it right after
    /// `Device::new_cuda`, before any tensor is made on the device.
    ///
    /// It turns cudarc's event tracking off. With tracking on, every allocation creates two CUDA
    /// events and every free destroys them (~1,000 allocations per SANA step), but the events are
    /// only waited on when the context runs several streams (`is_managing_stream_synchronization`).
    /// candle's `Device::new_cuda` runs everything on one stream, the per-thread default stream,
    /// and this crate creates no other stream, so the events are never used: turning them off
    /// removes host work and nothing else.
    pub fn prepare_device(dev: &CudaDevice) {
        // SAFETY: event tracking only orders work between streams of one context. candle's
        // `Device::new_cuda` context has a single stream (`CudaContext::per_thread_stream`, which
        // does not enter multi-stream mode), no code in this crate creates another one, and
        // tensors are used from the thread that made them, so there is no cross-stream use to
        // order and the disabled events would never have been waited on.
        unsafe { dev.disable_event_tracking() }
    }

    /// Runs `f` while candle keeps small host-to-device uploads (kernel shape parameters,
    /// constant tables up to 4 KiB) on the device, keyed by content, handing out the kept copy: the
    /// uploads of an eager warm-up become device-to-device copies that a capture can record. Only
    /// for code whose uploads are constants (each new content stays cached for good).
    pub fn with_htod_cache<R>(dev: &CudaDevice, f: impl FnOnce() -> R) -> R {
        let _cache = dev.enable_cuda_graph_htod_cache();
        f()
    }

    /// A captured, instantiated graph on the device's stream.
    pub struct Graph {
        graph: CudaGraph,
        relaxed: bool,
    }

    // SAFETY: a CUDA graph and its executable instance are plain driver handles, usable from any
    // thread of the process; the driver requires that calls on one graph are not concurrent, which
    // `&mut self` on `launch` (and a Mutex around any shared owner) guarantees.
    unsafe impl Send for Graph {}

    impl Graph {
        /// Records what `body` enqueues on `dev`'s stream (nothing runs), then instantiates it.
        /// `body` runs as under [`with_htod_cache`]. First in thread-local mode, where an unsafe
        /// call from this thread (a synchronous allocation, a synchronize, a query) fails the
        /// capture instead of being recorded wrongly; if that fails, once more in relaxed mode,
        /// which lets such calls through when they touch no stream (a query, a module load).
        /// Errors (from `body`, from the capture or from the instantiation) come back as `Err` with
        /// both reasons; the stream is out of capture mode again either way, and work enqueued
        /// before the call is unaffected.
        pub fn capture<F: FnMut() -> Result<()>>(dev: &CudaDevice, mut body: F) -> Result<Self> {
            let strict = match Self::capture_in(dev, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, &mut body) {
                Ok(graph) => return Ok(graph),
                Err(e) => e,
            };
            Self::capture_in(dev, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED, &mut body)
                .map(|graph| Self { relaxed: true, ..graph })
                .map_err(|relaxed| Error::Other(format!("{strict}; in relaxed mode: {relaxed}")))
        }

        /// Whether the capture needed relaxed mode.
        pub fn relaxed(&self) -> bool {
            self.relaxed
        }

        fn capture_in(dev: &CudaDevice, mode: sys::CUstreamCaptureMode, body: &mut dyn FnMut() -> Result<()>) -> Result<Self> {
            let stream = dev.cuda_stream();
            let ctx = stream.context().clone();
            let fail = |what: &str, e: &dyn std::fmt::Debug| Error::Other(format!("CUDA graph capture: {what}: {e:?}"));
            // Errors that drops recorded earlier are not the capture's.
            let _ = ctx.check_err();
            let _cache = dev.enable_cuda_graph_htod_cache();
            stream.begin_capture(mode).map_err(|e| fail("begin", &e))?;
            let body_result = body();
            // Always end the capture, also after a failed body: it takes the stream out of capture
            // mode (the partial graph is discarded).
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            // Frees and event records inside the capture report their errors here.
            let recorded = ctx.check_err();
            body_result.map_err(|e| Error::Other(format!("CUDA graph capture: the captured work failed: {e}")))?;
            let graph = ended.map_err(|e| fail("end / instantiate", &e))?;
            recorded.map_err(|e| fail("recorded during the capture", &e))?;
            let graph = graph.ok_or_else(|| Error::Other("CUDA graph capture: nothing was captured".into()))?;
            graph.upload().map_err(|e| fail("upload", &e))?;
            Ok(Self { graph, relaxed: false })
        }

        /// Enqueues one replay on the stream it was captured on.
        pub fn launch(&mut self) -> Result<()> {
            self.graph.launch().map_err(|e| Error::Other(format!("CUDA graph launch: {e:?}")))
        }
    }
}
