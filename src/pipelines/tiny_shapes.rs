//! The tiny-shapes pipeline: tokenize, encode the caption (and the empty caption for guidance),
//! integrate the flow ODE from noise (t = 1) to the picture (t = 0) with explicit Euler steps and
//! classifier-free guidance, and map pixels from [-1, 1] to bytes. Runs on the CPU in about a
//! second; the same seed gives the same bytes.
//!
//! ```text
//! v = v_uncond + cfg · (v_cond - v_uncond)
//! x_{t_next} = x_t + (t_next - t) · v
//! ```
//! The time grid is uniform in t, warped by `shift` as SANA's flow schedulers do:
//! `t' = shift · t / (1 + (shift - 1) · t)` (shift 1 = uniform).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::attention::plan::AttentionPlan;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use crate::attention::{Backend, DenseParams, LinearParams};
use crate::data::shapes::{prompt_set, Category};
use crate::error::{Error, Result};
use crate::eval::shapes_report::{evaluate_images, Report};
use crate::models::tiny_shapes::{ShapesTokenizer, TinyShapesConfig, TinyShapesModel};
use crate::pipelines::request::{Flow, ImageRequest, LoadOptions, Progress, Stage};
use crate::spec::PipelineSpec;

/// Sampling defaults when neither the spec nor the request sets them.
pub const DEFAULT_STEPS: usize = 16;
pub const DEFAULT_CFG: f64 = 4.0;
pub const DEFAULT_SHIFT: f64 = 1.0;

/// The files of a tiny-shapes weights folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// How many steps, how much guidance, which time warp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub steps: usize,
    pub cfg: f64,
    pub shift: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { steps: DEFAULT_STEPS, cfg: DEFAULT_CFG, shift: DEFAULT_SHIFT }
    }
}

#[derive(Debug, Clone)]
pub struct TinyShapesPipeline {
    model: TinyShapesModel,
    tokenizer: ShapesTokenizer,
    device: Device,
    sampling: Sampling,
}

fn weights_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights { file: path.display().to_string(), tensor: String::new(), msg: msg.into() }
}

/// The time grid from 1 to 0: `steps + 1` values, warped by `shift`.
pub fn time_grid(steps: usize, shift: f64) -> Vec<f64> {
    (0..=steps)
        .map(|i| {
            let t = 1.0 - i as f64 / steps as f64;
            shift * t / (1.0 + (shift - 1.0) * t)
        })
        .collect()
}

/// Standard normal noise (the shipped model's tests and reported scores use this stream) `(1, 3, size, size)` from a seeded generator on the CPU (Box-Muller), so
/// the starting point is the same bytes on every device and every run.
pub fn seeded_noise(seed: u64, size: usize, device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = 3 * size * size;
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        values.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
        values.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
    }
    values.truncate(n);
    Ok(Tensor::from_vec(values, (1, 3, size, size), device)?)
}

impl TinyShapesPipeline {
    /// Loads from a spec (family `tiny-shapes`, `[weights] path` = a folder with `config.json`,
    /// `tokenizer.json` and `model.safetensors`). The spec's scheduler steps, cfg and shift become
    /// the defaults; the attention plan is the spec's with the caller's overrides.
    pub fn load(spec: &PipelineSpec, options: &LoadOptions) -> Result<Self> {
        if spec.family != "tiny-shapes" {
            return Err(Error::usage(format!("`{}` is a `{}` model, not tiny-shapes", spec.name, spec.family)));
        }
        if spec.scheduler.kind != "flow-euler" {
            return Err(Error::Spec {
                file: spec.source.display().to_string(),
                msg: format!("tiny-shapes samples with flow-euler, not `{}`", spec.scheduler.kind),
            });
        }
        let dir = spec.local_weights().ok_or_else(|| Error::Spec {
            file: spec.source.display().to_string(),
            msg: "tiny-shapes needs `[weights] path` (a folder with model.safetensors)".into(),
        })?;
        let plan = crate::pipelines::attention_plan(spec, options)?;
        let device = options.device.open()?;
        let sampling = Sampling { steps: spec.scheduler.steps, cfg: spec.scheduler.cfg, shift: spec.scheduler.shift };
        Self::from_dir(&dir, &plan, &device, sampling)
    }

    /// The weights folder shipped in the repository (`assets/tiny-shapes`), on the CPU, with the
    /// default attention (linear self, dense cross) and sampling.
    pub fn load_default() -> Result<Self> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("tiny-shapes");
        let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()));
        Self::from_dir(&dir, &plan, &Device::Cpu, Sampling::default())
    }

    pub fn from_dir(dir: &Path, plan: &AttentionPlan, device: &Device, sampling: Sampling) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let json = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let cfg = TinyShapesConfig::from_json(&json, &config_path.display().to_string())?;
        let tokenizer = ShapesTokenizer::from_file(&dir.join(TOKENIZER_FILE), cfg.text.max_len)?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(weights_error(&weights, "missing: the tiny-shapes weights are not there"));
        }
        // The file is f16; compute in f32 (CPU f16 matmuls are slow and gain nothing at this size).
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| weights_error(&weights, e.to_string()))?;
        let model = TinyShapesModel::new(&cfg, plan, vb)?;
        Ok(Self { model, tokenizer, device: device.clone(), sampling })
    }

    pub fn model(&self) -> &TinyShapesModel {
        &self.model
    }

    pub fn tokenizer(&self) -> &ShapesTokenizer {
        &self.tokenizer
    }

    pub fn sampling(&self) -> Sampling {
        self.sampling
    }

    /// Side of the pictures the model makes natively.
    pub fn image_size(&self) -> usize {
        self.model.config().image_size
    }

    /// Runs a request: `count` images with seeds `seed, seed + 1, ...`. A width/height other than
    /// the native size resizes the native picture (the model only draws at its training size).
    /// A negative prompt replaces the empty caption of the guidance.
    pub fn generate(&self, request: &ImageRequest, progress: &mut dyn FnMut(Progress) -> Flow) -> Result<Vec<RgbImage>> {
        request.validate()?;
        let sampling = Sampling {
            steps: request.steps.unwrap_or(self.sampling.steps),
            cfg: request.cfg.unwrap_or(self.sampling.cfg),
            shift: self.sampling.shift,
        };
        let negative = request.negative_prompt.as_deref().unwrap_or("");
        let mut images = Vec::with_capacity(request.count);
        for i in 0..request.count {
            let seed = request.seed.wrapping_add(i as u64);
            let image = self.generate_one(&request.prompt, negative, seed, sampling, progress)?;
            let (w, h) = (request.width.unwrap_or(image.width() as usize), request.height.unwrap_or(image.height() as usize));
            images.push(if (w, h) == (image.width() as usize, image.height() as usize) {
                image
            } else {
                image::imageops::resize(&image, w as u32, h as u32, image::imageops::FilterType::Triangle)
            });
        }
        Ok(images)
    }

    /// One native-size picture. `negative` is the caption guided away from ("" = unconditional).
    pub fn generate_one(
        &self,
        prompt: &str,
        negative: &str,
        seed: u64,
        sampling: Sampling,
        progress: &mut dyn FnMut(Progress) -> Flow,
    ) -> Result<RgbImage> {
        if sampling.steps == 0 {
            return Err(Error::usage("steps must be at least 1"));
        }
        if !(sampling.shift.is_finite() && sampling.shift > 0.0) {
            return Err(Error::usage(format!("shift {} must be a positive number", sampling.shift)));
        }
        let guided = sampling.cfg != 1.0;
        if progress(Progress { stage: Stage::Encode, step: 0, total: 1 }) == Flow::Cancel {
            return Err(Error::Cancelled);
        }
        let mut texts = vec![prompt];
        if guided {
            texts.push(negative);
        }
        let tokens = self.tokenizer.encode_batch(&texts)?;
        let rows = tokens.batch;
        let ids = Tensor::from_vec(tokens.ids, (rows, tokens.len), &self.device)?;
        let mask = Tensor::from_vec(tokens.mask, (rows, tokens.len), &self.device)?;
        let text = self.model.encode_text(&ids, &mask)?;

        let size = self.image_size();
        let mut x = seeded_noise(seed, size, &self.device)?;
        let grid = time_grid(sampling.steps, sampling.shift);
        for (step, pair) in grid.windows(2).enumerate() {
            if progress(Progress { stage: Stage::Denoise, step, total: sampling.steps }) == Flow::Cancel {
                return Err(Error::Cancelled);
            }
            let (t, t_next) = (pair[0], pair[1]);
            let t_in = Tensor::full(t as f32, rows, &self.device)?;
            let v = self.guided_velocity(&x, &t_in, &text, &mask, sampling.cfg)?;
            x = (x + (v * (t_next - t))?)?;
        }
        if progress(Progress { stage: Stage::Decode, step: 0, total: 1 }) == Flow::Cancel {
            return Err(Error::Cancelled);
        }
        let mut images = super::sana::to_images(&x)?;
        Ok(images.remove(0))
    }
}

impl TinyShapesPipeline {
    /// The velocity the sampler steps along for the pictures `x` `(n, 3, S, S)`. Guided (`cfg` ≠ 1)
    /// the model sees `x` twice, against the prompt rows of `text` first and then the empty
    /// caption's, and the result is `v_uncond + cfg (v_cond - v_uncond)`. (Clipping a
    /// sample-predicting model's guided picture to [-1, 1], DDPM's "clip denoised", was tried: 18.8%
    /// vs 25.0% on 80 benchmark prompts.)
    fn guided_velocity(&self, x: &Tensor, t_in: &Tensor, text: &Tensor, mask: &Tensor, cfg: f64) -> Result<Tensor> {
        if cfg == 1.0 {
            return Ok(self.model.velocity(x, t_in, text, mask)?.to_dtype(DType::F32)?);
        }
        let n = x.dim(0)?;
        let v = self.model.velocity(&Tensor::cat(&[x, x], 0)?, t_in, text, mask)?.to_dtype(DType::F32)?;
        let (cond, uncond) = (v.narrow(0, 0, n)?, v.narrow(0, n, n)?);
        Ok((&uncond + ((cond - &uncond)? * cfg)?)?)
    }

    /// Many native-size pictures in one batch (prompt i with seed i, guided away from the empty
    /// caption): the same starting noise and update as [`Self::generate_one`], so the pictures
    /// match it up to float rounding. For benchmarks on the GPU, where one picture at a time
    /// leaves the device idle.
    pub fn generate_many(&self, prompts: &[&str], seeds: &[u64], sampling: Sampling) -> Result<Vec<RgbImage>> {
        if prompts.len() != seeds.len() {
            return Err(Error::usage(format!("{} prompts but {} seeds", prompts.len(), seeds.len())));
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if sampling.steps == 0 {
            return Err(Error::usage("steps must be at least 1"));
        }
        let n = prompts.len();
        let guided = sampling.cfg != 1.0;
        let mut texts: Vec<&str> = prompts.to_vec();
        if guided {
            texts.extend(std::iter::repeat("").take(n));
        }
        let tokens = self.tokenizer.encode_batch(&texts)?;
        let rows = tokens.batch;
        let ids = Tensor::from_vec(tokens.ids, (rows, tokens.len), &self.device)?;
        let mask = Tensor::from_vec(tokens.mask, (rows, tokens.len), &self.device)?;
        let text = self.model.encode_text(&ids, &mask)?;

        let size = self.image_size();
        let noise = seeds.iter().map(|&s| seeded_noise(s, size, &self.device)).collect::<Result<Vec<_>>>()?;
        let mut x = Tensor::cat(&noise, 0)?;
        for pair in time_grid(sampling.steps, sampling.shift).windows(2) {
            let (t, t_next) = (pair[0], pair[1]);
            let t_in = Tensor::full(t as f32, rows, &self.device)?;
            let v = self.guided_velocity(&x, &t_in, &text, &mask, sampling.cfg)?;
            x = (x + (v * (t_next - t))?)?;
        }
        super::sana::to_images(&x)
    }
}

/// Generates one picture per prompt of the shapes benchmark (`data::shapes::prompt_set(seed, n)`),
/// prompt i with seed `seed + i`. Returns the prompts with their categories and the pictures.
pub fn generate_benchmark(
    pipeline: &TinyShapesPipeline,
    n: usize,
    seed: u64,
    sampling: Sampling,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<(String, Category)>, Vec<RgbImage>)> {
    let prompts = prompt_set(seed, n);
    let mut images = Vec::with_capacity(n);
    for (i, (text, _)) in prompts.iter().enumerate() {
        progress(i, n);
        images.push(pipeline.generate_one(text, "", seed.wrapping_add(i as u64), sampling, &mut |_| Flow::Continue)?);
    }
    Ok((prompts, images))
}

/// Scores the pipeline on the shapes benchmark (`gen eval shapes`): accuracy per category and
/// per check, from `eval::shapes`.
pub fn evaluate_shapes(pipeline: &TinyShapesPipeline, n: usize, seed: u64, sampling: Sampling) -> Result<Report> {
    let (prompts, images) = generate_benchmark(pipeline, n, seed, sampling, &mut |_, _| {})?;
    evaluate_images(&prompts, &images)
}
