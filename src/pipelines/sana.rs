//! SANA text-to-image: encode the prompt with Gemma-2, denoise with a flow scheduler (or SANA-Sprint's
//! sCM sampler), decode with DC-AE.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::request::{Flow, Progress, Stage};
use super::resolution_bins::{resize_and_crop, ResolutionBins};
use super::{ImageRequest, LoadOptions};
use crate::attention::plan::AttentionPlan;
use crate::error::{Error, Result};
use crate::models::dcae::{AutoencoderDc, DcAeConfig, TilingConfig};
use crate::models::sana::{SanaConfig, SanaTransformer, StepGraphs, TextContext};
use crate::models::text::{
    Gemma2Config, Gemma2Encoder, GemmaTokenizer, PromptEmbeddings, SanaPromptConfig, SanaTextEncoder,
};
use crate::schedulers::{
    FlowDpmSolver, FlowDpmSolverConfig, FlowEuler, FlowEulerConfig, Scheduler, ScmConfig, ScmScheduler,
};
use crate::spec::PipelineSpec;
use crate::weights::hub::HubConfig;
use crate::weights::random::{random_var_builder, seeded_normal};
use crate::weights::{ModelRepo, ModelSource};

/// `VISGEN_CUDA_GRAPHS=0` in the environment turns CUDA graph replay of the denoising step off.
const CUDA_GRAPHS_ENV: &str = "VISGEN_CUDA_GRAPHS";

/// Images up to this many pixels per side are decoded untiled, as diffusers does by default.
const UNTILED_DECODE_MAX_SIDE: usize = 2048;

/// What the pipeline returns before quantization to 8-bit images.
#[derive(Debug, Clone)]
pub struct SanaOutput {
    /// The denoised latents `(B, C, h, w)`, f32, before the VAE's scaling.
    pub latents: Tensor,
    /// The decoder's output `(B, 3, H, W)`, nominally in [-1, 1], not clamped.
    pub pixels: Tensor,
}

/// What a spec's `[scheduler]` table asks for.
#[derive(Debug, Clone, PartialEq)]
struct Sampling {
    kind: String,
    steps: usize,
    cfg: f64,
    shift: f64,
}

pub struct SanaPipeline {
    name: String,
    transformer: SanaTransformer,
    vae: AutoencoderDc,
    text: SanaTextEncoder,
    sampling: Sampling,
    default_size: (usize, usize),
    default_negative: String,
    device: Device,
    dtype: DType,
    /// The denoising step's CUDA graphs, kept across images (one capture per shape).
    graphs: std::sync::Mutex<StepGraphs>,
}

impl SanaPipeline {
    pub fn load(spec: &PipelineSpec, plan: &AttentionPlan, options: &LoadOptions) -> Result<Self> {
        let device = options.device.open()?;
        // On the CPU everything runs in f32 unless asked otherwise: candle's CPU kernels are f32.
        let spec_dtype = super::request::parse_dtype(&spec.dtype)?;
        let dtype = options.dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { spec_dtype });
        // The VAE and text encoder stay in bf16 or f32 (f16 overflows in both; sana.md §1.6).
        let aux_dtype = if dtype == DType::F16 { DType::BF16 } else { dtype };
        let sampling = Sampling {
            kind: spec.scheduler.kind.clone(),
            steps: spec.scheduler.steps,
            cfg: spec.scheduler.cfg,
            shift: spec.scheduler.shift,
        };
        let (transformer, vae, text) = match spec.weights.random {
            Some(seed) => load_random(spec, plan, seed, dtype, aux_dtype, &device)?,
            None => load_checkpoint(spec, plan, dtype, aux_dtype, &device)?,
        };
        let vae = vae.with_tiling(Some(TilingConfig::default()))?;
        if transformer.config().in_channels != vae.config().latent_channels {
            return Err(Error::Spec {
                file: spec.source.display().to_string(),
                msg: format!(
                    "the transformer takes {} latent channels but the VAE makes {}",
                    transformer.config().in_channels,
                    vae.config().latent_channels
                ),
            });
        }
        Ok(Self {
            name: spec.name.clone(),
            transformer,
            vae,
            text,
            sampling,
            default_size: (spec.defaults.width.unwrap_or(1024), spec.defaults.height.unwrap_or(1024)),
            default_negative: spec.defaults.negative_prompt.clone().unwrap_or_default(),
            graphs: std::sync::Mutex::new(StepGraphs::new(
                device.is_cuda() && std::env::var(CUDA_GRAPHS_ENV).map_or(true, |v| v != "0"),
            )),
            device,
            dtype,
        })
    }

    pub fn transformer(&self) -> &SanaTransformer {
        &self.transformer
    }

    pub fn text_encoder(&self) -> &SanaTextEncoder {
        &self.text
    }

    /// Turns CUDA graph replay of the denoising step on or off (on by default on CUDA, unless
    /// `VISGEN_CUDA_GRAPHS=0`; the CLI's `--no-cuda-graphs`). Graphs change no result: a replay
    /// runs the eager step's kernels on the same values (equal bit for bit wherever the kernels are
    /// deterministic; tests/cuda_graph.rs). Turning them off frees the graph.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        let graphs = self.graphs.get_mut().unwrap_or_else(|e| e.into_inner());
        *graphs = StepGraphs::new(on && self.device.is_cuda());
    }

    pub fn cuda_graphs(&self) -> bool {
        self.graphs.lock().map(|g| g.enabled()).unwrap_or(false)
    }

    /// How many step graphs were captured so far (one per new shape; 0 when eager).
    pub fn cuda_graph_captures(&self) -> usize {
        self.graphs.lock().map(|g| g.captures()).unwrap_or(0)
    }

    /// The step through the pipeline's graphs: [`SanaTransformer::forward_with_text`]'s result.
    /// If a capture fails, the step runs eagerly and the reason is printed once.
    fn step(&self, latents: &Tensor, timestep: &Tensor, text: &TextContext, guidance: Option<&Tensor>) -> Result<Tensor> {
        let mut graphs = self.graphs.lock().map_err(|_| Error::Other("the step graphs' lock is poisoned".into()))?;
        let v = graphs.forward(&self.transformer, latents, timestep, text, guidance)?;
        if let Some(reason) = graphs.take_fallback_reason() {
            eprintln!("warning: CUDA graphs off, running the SANA step eagerly: {reason}");
        }
        Ok(v)
    }

    /// Pixels per latent token: the VAE's compression times the transformer's patch.
    pub fn pixels_per_token(&self) -> usize {
        self.vae.config().spatial_compression() * self.transformer.config().patch_size
    }

    /// Latent `(channels, height, width)` for an image of `width` x `height` pixels.
    pub fn latent_shape(&self, width: usize, height: usize) -> (usize, usize, usize) {
        let compression = self.vae.config().spatial_compression();
        (self.transformer.config().in_channels, height / compression, width / compression)
    }

    pub fn generate(
        &self,
        request: &ImageRequest,
        progress: &mut dyn FnMut(Progress) -> Flow,
    ) -> Result<Vec<RgbImage>> {
        request.validate()?;
        let (width, height) = self.image_size(request);
        let (gen_width, gen_height) = self.generation_size(request, width, height)?;
        let (channels, h, w) = self.latent_shape(gen_width, gen_height);
        let noise = seeded_normal(request.seed, (request.count, channels, h, w), &self.device)?;
        let at_bin = request.clone().size(gen_width, gen_height);
        let output = self.generate_from_latents(&at_bin, noise, progress)?;
        if (gen_width, gen_height) == (width, height) {
            to_images(&output.pixels)
        } else {
            to_images(&resize_and_crop(&output.pixels, height, width)?)
        }
    }

    /// The size the model draws at: with resolution binning, the trained size whose aspect ratio is
    /// closest to the request's (models without a bin table draw at the request's size).
    fn generation_size(&self, request: &ImageRequest, width: usize, height: usize) -> Result<(usize, usize)> {
        let bins = ResolutionBins::for_sample_size(self.transformer.config().sample_size);
        match bins.filter(|_| request.resolution_binning) {
            Some(bins) => {
                let (h, w) = bins.closest(height, width);
                Ok((w, h))
            }
            None => {
                ImageRequest::check_size(width, height, self.pixels_per_token(), &self.name)?;
                Ok((width, height))
            }
        }
    }

    /// The whole pipeline from given initial latents `(count, C, h, w)` (diffusers' `latents=`
    /// argument): the image size is the latents' size; the request's width and height, if set, must
    /// agree with it. Returns the final latents and the decoder's pixels, before any clamping.
    pub fn generate_from_latents(
        &self,
        request: &ImageRequest,
        latents: Tensor,
        progress: &mut dyn FnMut(Progress) -> Flow,
    ) -> Result<SanaOutput> {
        request.validate()?;
        let (batch, channels, h, w) = latents.dims4()?;
        let compression = self.vae.config().spatial_compression();
        let (width, height) = (w * compression, h * compression);
        let expected = self.latent_shape(request.width.unwrap_or(width), request.height.unwrap_or(height));
        if expected != (channels, h, w) || batch != request.count {
            return Err(Error::usage(format!(
                "initial latents {:?} do not fit the request: expected ({}, {}, {}, {})",
                latents.dims(),
                request.count,
                expected.0,
                expected.1,
                expected.2
            )));
        }
        ImageRequest::check_size(width, height, self.pixels_per_token(), &self.name)?;
        let steps = request.steps.unwrap_or(self.sampling.steps);
        let cfg = request.cfg.unwrap_or(self.sampling.cfg);
        let report = |progress: &mut dyn FnMut(Progress) -> Flow, stage, step, total| match progress(Progress {
            stage,
            step,
            total,
        }) {
            Flow::Continue => Ok(()),
            Flow::Cancel => Err(Error::Cancelled),
        };

        report(progress, Stage::Encode, 0, 1)?;
        let prompts = vec![request.prompt.as_str(); batch];
        let sprint = self.sampling.kind == "scm";
        // diffusers: `do_classifier_free_guidance = guidance_scale > 1`
        let use_cfg = !sprint && cfg > 1.0;
        let conditioning = if use_cfg {
            let negative_text = request.negative_prompt.as_deref().unwrap_or(&self.default_negative);
            let (positive, negative) = self.text.encode_with_negative(&prompts, &vec![negative_text; batch])?;
            PromptEmbeddings::cfg_batch(&negative, &positive)?
        } else {
            self.text.encode_prompts(&prompts)?
        };
        let text = conditioning.embeds.to_dtype(self.dtype)?;
        let mask = conditioning.mask.clone();
        report(progress, Stage::Encode, 1, 1)?;

        // Latents stay f32 between steps, as diffusers keeps them.
        let latents = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        let latents = if sprint {
            self.denoise_scm(latents, steps, cfg, &text, &mask, request.seed, progress)?
        } else {
            self.denoise_flow(latents, steps, cfg, use_cfg, &text, &mask, progress)?
        };

        report(progress, Stage::Decode, 0, 1)?;
        let raw = (latents.to_dtype(self.vae_dtype())? / self.vae.scaling_factor())?;
        // diffusers decodes in one piece unless tiling is asked for; so do we up to 2K, and tile
        // beyond, where one piece would need tens of GB (SANA's docs tile 4K decodes too).
        let pixels = if width.max(height) <= UNTILED_DECODE_MAX_SIDE {
            self.vae.decode_untiled(&raw)?
        } else {
            self.vae.decode(&raw)?
        };
        report(progress, Stage::Decode, 1, 1)?;
        Ok(SanaOutput { latents, pixels })
    }

    fn image_size(&self, request: &ImageRequest) -> (usize, usize) {
        (request.width.unwrap_or(self.default_size.0), request.height.unwrap_or(self.default_size.1))
    }

    fn vae_dtype(&self) -> DType {
        if self.dtype == DType::F16 {
            DType::BF16
        } else {
            self.dtype
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn denoise_flow(
        &self,
        noise: Tensor,
        steps: usize,
        cfg: f64,
        use_cfg: bool,
        text: &Tensor,
        mask: &Tensor,
        progress: &mut dyn FnMut(Progress) -> Flow,
    ) -> Result<Tensor> {
        let mut scheduler: Box<dyn Scheduler> = match self.sampling.kind.as_str() {
            "flow-dpm-solver" => Box::new(FlowDpmSolver::new(
                FlowDpmSolverConfig { flow_shift: self.sampling.shift, ..FlowDpmSolverConfig::sana() },
                steps,
            )?),
            "flow-euler" => {
                Box::new(FlowEuler::new(FlowEulerConfig { shift: self.sampling.shift, ..Default::default() }, steps)?)
            }
            other => return Err(Error::Other(format!("scheduler `{other}` is not a flow scheduler"))),
        };
        let config = self.transformer.config();
        let timestep_scale = config.timestep_scale;
        let latent_channels = config.in_channels;
        let learned_sigma = config.out_channels() / 2 == latent_channels;
        // Latents stay f32 between steps, as diffusers keeps them; the model sees its dtype.
        let mut x = (noise * scheduler.init_noise_sigma())?;
        // The schedulers give the model's conditioning values as diffusers does (DPM-Solver's are
        // truncated to integers there); the pipeline only scales them.
        let timesteps = scheduler.timesteps().to_vec();
        // The text's keys and values are the same at every step: computed once.
        let text = self.transformer.text_context(text, mask)?;
        for (i, &t) in timesteps.iter().enumerate() {
            if progress(Progress { stage: Stage::Denoise, step: i, total: steps }) == Flow::Cancel {
                return Err(Error::Cancelled);
            }
            let model_in = if use_cfg { Tensor::cat(&[&x, &x], 0)? } else { x.clone() };
            let b = model_in.dim(0)?;
            let timestep = Tensor::full((t * timestep_scale) as f32, b, &self.device)?;
            let v = self.step(&model_in.to_dtype(self.dtype)?, &timestep, &text, None)?;
            let v = v.to_dtype(DType::F32)?;
            let v = if use_cfg {
                let half = b / 2;
                let (v_neg, v_pos) = (v.narrow(0, 0, half)?, v.narrow(0, half, half)?);
                (&v_neg + ((v_pos - &v_neg)? * cfg)?)?
            } else {
                v
            };
            // A model that also predicts a variance (out = 2 x in channels) keeps the first half.
            let v = if learned_sigma { v.narrow(1, 0, latent_channels)? } else { v };
            x = scheduler.step(&v, i, &x)?;
        }
        if progress(Progress { stage: Stage::Denoise, step: steps, total: steps }) == Flow::Cancel {
            return Err(Error::Cancelled);
        }
        Ok(x)
    }

    /// SANA-Sprint: sCM in TrigFlow time, guidance embedded in the model (no CFG batch).
    #[allow(clippy::too_many_arguments)]
    fn denoise_scm(
        &self,
        noise: Tensor,
        steps: usize,
        cfg: f64,
        text: &Tensor,
        mask: &Tensor,
        seed: u64,
        progress: &mut dyn FnMut(Progress) -> Flow,
    ) -> Result<Tensor> {
        // SANA-Sprint's middle time (1.3) is for 2 steps only; other counts space the times evenly,
        // as diffusers' SanaSprintPipeline does with `intermediate_timesteps=None` (it refuses otherwise).
        let defaults = ScmConfig::default();
        let intermediate_timesteps = if steps == 2 { defaults.intermediate_timesteps } else { None };
        let scheduler = ScmScheduler::new(ScmConfig { intermediate_timesteps, ..defaults }, steps)?;
        let config = self.transformer.config();
        let b = noise.dim(0)?;
        let guidance = config
            .guidance_embeds
            .then(|| Tensor::full((cfg * config.guidance_embeds_scale) as f32, b, &self.device))
            .transpose()?
            .map(|g| g.to_dtype(self.dtype))
            .transpose()?;
        let mut x = (noise * scheduler.init_noise_sigma())?;
        let mut denoised = x.clone();
        let text = self.transformer.text_context(text, mask)?;
        for (i, &s) in scheduler.timesteps().to_vec().iter().enumerate() {
            if progress(Progress { stage: Stage::Denoise, step: i, total: steps }) == Flow::Cancel {
                return Err(Error::Cancelled);
            }
            let x_in = scheduler.model_input(&x, s)?;
            // diffusers' SanaSprintPipeline passes the TrigFlow time as is: no `timestep_scale`.
            let t = ScmScheduler::model_time(s);
            let timestep = Tensor::full(t as f32, b, &self.device)?;
            let v = self.step(&x_in.to_dtype(self.dtype)?, &timestep, &text, guidance.as_ref())?;
            let f = scheduler.trigflow_output(&x_in, &v.to_dtype(DType::F32)?, s)?;
            let fresh = seeded_normal(seed.wrapping_add(1 + i as u64), x.shape().clone(), &self.device)?;
            let step = scheduler.step(&f, i, &x, &fresh)?;
            x = step.prev_sample;
            denoised = step.denoised;
        }
        if progress(Progress { stage: Stage::Denoise, step: steps, total: steps }) == Flow::Cancel {
            return Err(Error::Cancelled);
        }
        Ok((denoised / scheduler.init_noise_sigma())?)
    }
}

/// `(B, 3, H, W)` in [-1, 1] to 8-bit RGB images.
pub fn to_images(pixels: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = pixels.dims4()?;
    if c != 3 {
        return Err(Error::Other(format!("decoder returned {c} channels, expected 3")));
    }
    let bytes = ((pixels.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let per_image = h * w * 3;
    (0..b)
        .map(|i| {
            RgbImage::from_raw(w as u32, h as u32, bytes[i * per_image..(i + 1) * per_image].to_vec())
                .ok_or_else(|| Error::Other("image buffer has the wrong size".into()))
        })
        .collect()
}

type Parts = (SanaTransformer, AutoencoderDc, SanaTextEncoder);

fn load_random(
    spec: &PipelineSpec,
    plan: &AttentionPlan,
    seed: u64,
    dtype: DType,
    aux: DType,
    device: &Device,
) -> Result<Parts> {
    let config = SanaConfig::preset(&spec.preset)?;
    let tiny = spec.preset == "tiny";
    let vae_config = if tiny { DcAeConfig::tiny() } else { DcAeConfig::f32c32_sana_1_0() };
    let text_config = if tiny { Gemma2Config::tiny(config.caption_channels) } else { Gemma2Config::gemma2_2b() };
    let transformer = SanaTransformer::new(&config, plan, random_var_builder(seed, dtype, device))?;
    let vae = AutoencoderDc::new_decoder_only(&vae_config, random_var_builder(seed ^ 1, aux, device))?;
    let gemma = Gemma2Encoder::new(&text_config, random_var_builder(seed ^ 2, aux, device))?;
    let prompt_config = if tiny {
        SanaPromptConfig { max_sequence_length: 16, ..SanaPromptConfig::image() }
    } else {
        SanaPromptConfig::image()
    };
    let text = SanaTextEncoder::new(GemmaTokenizer::char_level()?, gemma, prompt_config);
    Ok((transformer, vae, text))
}

fn load_checkpoint(
    spec: &PipelineSpec,
    plan: &AttentionPlan,
    dtype: DType,
    aux: DType,
    device: &Device,
) -> Result<Parts> {
    let source = match (&spec.weights.repo, spec.local_weights()) {
        (Some(repo), _) => ModelSource::Hub { repo_id: repo.clone(), revision: spec.weights.revision.clone() },
        (None, Some(path)) => ModelSource::parse(&path.display().to_string())?,
        (None, None) => {
            return Err(Error::Spec { file: spec.source.display().to_string(), msg: "no weights source".into() })
        }
    };
    let repo = ModelRepo::open(&source, &HubConfig::from_env())?;
    let read = |component: &str| -> Result<String> {
        let path = repo.component_config(component)?;
        std::fs::read_to_string(&path).map_err(|e| Error::io(path, e))
    };
    let config = SanaConfig::from_diffusers_json(&read("transformer")?)?;
    let vae_config = DcAeConfig::from_diffusers_json(&read("vae")?)?;
    let text_config = Gemma2Config::from_json_file(&repo.component_config("text_encoder")?)?;
    let transformer =
        repo.open_weights("transformer", None)?.build(dtype, device, |vb| SanaTransformer::new(&config, plan, vb))?;
    let vae =
        repo.open_weights("vae", None)?.build(aux, device, |vb| AutoencoderDc::new_decoder_only(&vae_config, vb))?;
    let gemma =
        repo.open_weights("text_encoder", None)?.build(aux, device, |vb| Gemma2Encoder::new(&text_config, vb))?;
    let tokenizer = GemmaTokenizer::from_file(&repo.tokenizer_json("tokenizer")?)?;
    Ok((transformer, vae, SanaTextEncoder::new(tokenizer, gemma, SanaPromptConfig::image())))
}
