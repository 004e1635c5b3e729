//! The SANA denoising step as a replayed CUDA graph ([`crate::cuda_graph`]).
//!
//! [`StepGraphs::forward`] is [`SanaTransformer::forward_with_text`] with the same arguments and
//! the same result: the same kernels on the same values (bit for bit where the kernels are
//! deterministic; the full-size linear attention sums with float atomics). On CUDA, the first
//! call for a shape (batch, latent size, text length, dtypes, guidance or not) runs eagerly once
//! (which warms up cuBLAS, cuDNN, the kernel modules and candle's parameter uploads), then records
//! one step that reads the graph's own input
//! buffers and writes its own output buffer. Later calls of that shape copy the inputs in, launch
//! the graph and copy the output out: 4 launches instead of ~1,500. The text context is copied into
//! the graph's buffers when it changes (a new prompt), so one capture serves every image of a shape.
//! A new shape recaptures. When a capture fails, the step runs eagerly from then on and
//! [`StepGraphs::take_fallback_reason`] says why once.

use candle_core::{DType, Tensor};

use super::transformer::{SanaTransformer, TextContext};
use crate::error::Result;

/// What a captured step is valid for.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
struct StepKey {
    latents: Vec<usize>,
    latents_dtype: DType,
    timestep_dtype: DType,
    guidance: Option<DType>,
    text: (usize, usize),
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl StepKey {
    fn of(latents: &Tensor, timestep: &Tensor, text: &TextContext, guidance: Option<&Tensor>) -> Self {
        Self {
            latents: latents.dims().to_vec(),
            latents_dtype: latents.dtype(),
            timestep_dtype: timestep.dtype(),
            guidance: guidance.map(|g| g.dtype()),
            text: text.dims(),
        }
    }
}

/// One captured step and the buffers it reads and writes.
#[cfg(feature = "cuda")]
struct Captured {
    key: StepKey,
    latents: Tensor,
    timestep: Tensor,
    guidance: Option<Tensor>,
    text: TextContext,
    /// The id of the context whose values `text` holds now.
    text_source: u64,
    output: Tensor,
    graph: crate::cuda_graph::Graph,
}

#[cfg(feature = "cuda")]
impl Drop for Captured {
    fn drop(&mut self) {
        // A replay may still be running: the graph and its buffers must outlive it. (An error here
        // would also show at the next operation on the device.)
        let _ = self.output.device().synchronize();
    }
}

/// Runs SANA steps through CUDA graphs where it can (see the module docs).
#[derive(Default)]
pub struct StepGraphs {
    enabled: bool,
    #[cfg(feature = "cuda")]
    captured: Option<Captured>,
    /// Set when a capture failed: every later step runs eagerly.
    failed: Option<String>,
    reason_taken: bool,
    captures: usize,
    relaxed: bool,
}

impl StepGraphs {
    /// `enabled: false` always runs eagerly. On the CPU (or without the `cuda` feature) steps are
    /// eager regardless.
    pub fn new(enabled: bool) -> Self {
        Self { enabled, ..Self::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// How many graphs were captured so far (one per new shape).
    pub fn captures(&self) -> usize {
        self.captures
    }

    /// Whether a capture needed relaxed capture mode (see [`crate::cuda_graph::Graph::capture`]).
    pub fn relaxed(&self) -> bool {
        self.relaxed
    }

    /// Why graphs were given up, the first time it is asked after a failed capture; `None` after.
    pub fn take_fallback_reason(&mut self) -> Option<String> {
        if self.reason_taken {
            return None;
        }
        let reason = self.failed.clone()?;
        self.reason_taken = true;
        Some(reason)
    }


    /// [`SanaTransformer::forward_with_text`], replayed from a CUDA graph when possible.
    pub fn forward(
        &mut self,
        model: &SanaTransformer,
        latents: &Tensor,
        timestep: &Tensor,
        text: &TextContext,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !self.enabled || self.failed.is_some() || !latents.device().is_cuda() {
            return model.forward_with_text(latents, timestep, text, guidance);
        }
        #[cfg(feature = "cuda")]
        {
            self.forward_cuda(model, latents, timestep, text, guidance)
        }
        #[cfg(not(feature = "cuda"))]
        {
            model.forward_with_text(latents, timestep, text, guidance)
        }
    }

    #[cfg(feature = "cuda")]
    fn forward_cuda(
        &mut self,
        model: &SanaTransformer,
        latents: &Tensor,
        timestep: &Tensor,
        text: &TextContext,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let key = StepKey::of(latents, timestep, text, guidance);
        if let Some(c) = self.captured.as_mut().filter(|c| c.key == key) {
            c.latents.slice_set(&latents.contiguous()?, 0, 0)?;
            c.timestep.slice_set(&timestep.contiguous()?, 0, 0)?;
            if let (Some(dst), Some(src)) = (&c.guidance, guidance) {
                dst.slice_set(&src.contiguous()?, 0, 0)?;
            }
            if c.text_source != text.id() {
                c.text.copy_from(text)?;
                c.text_source = text.id();
            }
            c.graph.launch()?;
            // A copy, so that the caller's tensor outlives the next replay.
            return Ok(c.output.copy()?);
        }

        // A new shape: free the old graph's buffers first, then run this step eagerly (the warm-up;
        // its errors are the caller's), then capture.
        let dev = latents.device().as_cuda_device()?.clone();
        // (Dropping the old graph waits for its last replay.)
        self.captured = None;
        let out = crate::cuda_graph::with_htod_cache(&dev, || model.forward_with_text(latents, timestep, text, guidance))?;
        match Self::capture(&dev, model, key, latents, timestep, text, guidance, &out) {
            Ok(captured) => {
                self.relaxed |= captured.graph.relaxed();
                self.captured = Some(captured);
                self.captures += 1;
            }
            Err(e) => self.failed = Some(e.to_string()),
        }
        Ok(out)
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn capture(
        dev: &candle_core::cuda_backend::CudaDevice,
        model: &SanaTransformer,
        key: StepKey,
        latents: &Tensor,
        timestep: &Tensor,
        text: &TextContext,
        guidance: Option<&Tensor>,
        sample_output: &Tensor,
    ) -> Result<Captured> {
        // The graph's own buffers, made before the capture (their memory must outlive it).
        let static_latents = latents.contiguous()?.copy()?;
        let static_timestep = timestep.contiguous()?.copy()?;
        let static_guidance = guidance.map(|g| g.contiguous()?.copy()).transpose()?;
        let static_text = text.deep_copy()?;
        let output = sample_output.zeros_like()?;
        latents.device().synchronize()?;
        let graph = crate::cuda_graph::Graph::capture(dev, || {
            let y = model.forward_with_text(&static_latents, &static_timestep, &static_text, static_guidance.as_ref())?;
            output.slice_set(&y.contiguous()?, 0, 0)?;
            // `y` and every temporary are dropped here, inside the capture: their frees are part
            // of the graph, which is what lets it be launched again.
            Ok(())
        })?;
        Ok(Captured {
            key,
            latents: static_latents,
            timestep: static_timestep,
            guidance: static_guidance,
            text: static_text,
            text_source: text.id(),
            output,
            graph,
        })
    }
}
