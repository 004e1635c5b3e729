//! What a caller asks for: the image request, load options and progress reports.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// One text-to-image job. Unset fields take the pipeline spec's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub cfg: Option<f64>,
    pub seed: u64,
    /// Images per prompt.
    pub count: usize,
    /// Models trained on a set of sizes (SANA) generate at the trained size of the closest aspect
    /// ratio and resize the picture to the request, as diffusers does by default
    /// (`use_resolution_binning`); `false` generates at exactly the requested size.
    pub resolution_binning: bool,
}

/// The largest width or height a request may ask for.
pub const MAX_SIDE: usize = 16384;

impl Default for ImageRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            width: None,
            height: None,
            steps: None,
            cfg: None,
            seed: 0,
            count: 1,
            resolution_binning: true,
        }
    }
}

impl ImageRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self { prompt: prompt.into(), ..Default::default() }
    }
    pub fn size(mut self, width: usize, height: usize) -> Self {
        self.width = Some(width);
        self.height = Some(height);
        self
    }
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = Some(steps);
        self
    }
    pub fn cfg(mut self, cfg: f64) -> Self {
        self.cfg = Some(cfg);
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn resolution_binning(mut self, on: bool) -> Self {
        self.resolution_binning = on;
        self
    }
    pub fn negative_prompt(mut self, text: impl Into<String>) -> Self {
        self.negative_prompt = Some(text.into());
        self
    }

    /// Checks what does not depend on the model: a prompt, sane numbers.
    pub fn validate(&self) -> Result<()> {
        if self.prompt.trim().is_empty() {
            return Err(Error::usage("the prompt is empty: pass --prompt \"...\""));
        }
        if self.steps == Some(0) {
            return Err(Error::usage("--steps must be at least 1"));
        }
        if let Some(cfg) = self.cfg {
            if !cfg.is_finite() || cfg < 0.0 {
                return Err(Error::usage(format!("--cfg {cfg}: expected a finite number >= 0")));
            }
        }
        if self.width == Some(0) || self.height == Some(0) {
            return Err(Error::usage("--width and --height must be positive"));
        }
        if self.width.max(self.height).is_some_and(|side| side > MAX_SIDE) {
            return Err(Error::usage(format!("--width and --height must be at most {MAX_SIDE}")));
        }
        if self.count == 0 {
            return Err(Error::usage("the image count must be at least 1"));
        }
        Ok(())
    }

    /// Width and height must be multiples of what the model consumes per latent token.
    pub fn check_size(width: usize, height: usize, multiple: usize, model: &str) -> Result<()> {
        if width % multiple != 0 || height % multiple != 0 {
            return Err(Error::usage(format!(
                "size {width}x{height} is not a multiple of {multiple}, the pixel size of one token of `{model}`"
            )));
        }
        Ok(())
    }
}

/// Where and in which precision a pipeline runs.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    /// Overrides the spec's dtype.
    pub dtype: Option<DType>,
    /// Attention overrides in the CLI's `LAYER=BACKEND[,key=value...]` form.
    pub attention: Vec<String>,
}

impl LoadOptions {
    pub fn device(mut self, device: DeviceChoice) -> Self {
        self.device = device;
        self
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match text.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(Error::usage(format!("--device `{text}`: expected cpu, cuda or cuda:N"))),
            },
        }
    }

    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::usage(
                        "this binary was built without CUDA: rebuild with `cargo build --release --features cuda`",
                    ));
                }
                let device = Device::new_cuda(n).map_err(|e| Error::usage(format!("cannot open CUDA device {n}: {e}")))?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(dev) = &device {
                    // One stream: cudarc's per-allocation events are never used (see cuda_graph.rs).
                    crate::cuda_graph::prepare_device(dev);
                    // Sampler steps allocate per call; keep freed memory pooled (see kernels.rs).
                    crate::kernels::keep_freed_memory(dev)?;
                }
                Ok(device)
            }
        }
    }
}

pub fn parse_dtype(text: &str) -> Result<DType> {
    match text {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(Error::usage(format!("dtype `{text}`: expected f32, f16 or bf16"))),
    }
}

/// A progress report from a running pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Encode,
    Denoise,
    Decode,
}

/// What the progress callback answers: go on, or stop the pipeline with `Error::Cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}
