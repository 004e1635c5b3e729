//! Trains tiny-shapes (text encoder + SANA DiT in pixel space) by flow matching on the procedural
//! shapes data and writes `model.safetensors` (EMA weights, f16; `raw/` holds the last weights),
//! `config.json` and `tokenizer.json`.
//!
//! ```text
//! # CPU smoke run (a few steps of a very small model):
//! cargo run --release --example train_tiny_shapes -- --config tiny --steps 3 --batch 4 --data 64 --out /tmp/ts
//! # On the H200 (bf16 compute, f32 master weights; `--profile true` prints synchronized
//! # per-phase times; examples/train_tiny_shapes_gpu.sh packs, runs, profiles and sweeps it).
//! # The shipped weights' recipe, from scratch (490 s alone on one H200, 4,588 steps):
//! cargo build --release --features cuda --example train_tiny_shapes
//! train_tiny_shapes --device cuda --minutes 8.17 --dtype bf16 --predict sample --patch 4 --batch 128 \
//!     --lr 1e-3 --warmup 200 --ema 0.998 --data 200000 --seed 0 --out $OUT/tiny-shapes
//! ```
//!
//! The data set is rendered once on all cores and kept on the device as u8; every batch (items,
//! noise, times, caption dropout) is drawn there, with no host round trip. The model reads its
//! weights as Vars in the compute dtype (`--dtype f32|bf16`); the f32 master copy, AdamW's moments
//! and the EMA are each one flat tensor ([`FlatParams`]).
//!
//! Objective: `x_t = (1 - t) x0 + t ε`, target `v = ε - x0` (with `--predict sample` the network
//! outputs `x0` and `v = (x_t - x0) / t` is what the loss sees, as JiT). Times: for velocity
//! prediction half of the batch draws `t` uniform, half logit-normal (`t = sigmoid(n)`,
//! `n ~ N(0, 1)`; logit-normal alone almost never trains t < 0.05, where the sampler's last steps
//! remove the last noise); for sample prediction JiT's `n ~ N(0.8, 0.8)`, towards noise.
//! 10% of captions are dropped to `[bos]` alone for classifier-free guidance.
//! Attention runs through the candle-op references (dense for text and cross-attention, linear for
//! self-attention), which have a backward pass on every device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};

use visgen::attention::plan::AttentionPlan;
use visgen::attention::{Backend, DenseParams, LinearParams};
use visgen::data::shapes::{caption, render, scene_at, GenConfig};
use visgen::models::tiny_shapes::config::Prediction;
use visgen::models::tiny_shapes::{ShapesTokenizer, TinyShapesConfig, TinyShapesModel};

struct Args {
    device: String,
    config: String,
    out: PathBuf,
    minutes: f64,
    steps: usize,
    batch: usize,
    data: usize,
    lr: f64,
    seed: u64,
    drop_caption: f64,
    ema: f64,
    save_every_secs: f64,
    heads: Option<usize>,
    layers: Option<usize>,
    patch: Option<usize>,
    predict: Option<String>,
    init: Option<PathBuf>,
    profile: bool,
    log_every: usize,
    dtype: String,
    warmup: f64,
    event_tracking: bool,
    /// Step whose kernels a profiler records (`cuProfilerStart`/`Stop` around it; for
    /// `ncu --profile-from-start off`).
    profile_step: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        device: "cpu".into(),
        config: "default".into(),
        out: PathBuf::from("tiny-shapes-out"),
        minutes: 7.0,
        steps: usize::MAX,
        batch: 128,
        data: 20_000,
        lr: 6e-4,
        seed: 0,
        drop_caption: 0.1,
        ema: 0.999,
        save_every_secs: 90.0,
        heads: None,
        layers: None,
        patch: None,
        predict: None,
        init: None,
        profile: false,
        log_every: 100,
        dtype: "f32".into(),
        warmup: 200.0,
        event_tracking: false,
        profile_step: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let key = argv[i].as_str();
        let value = argv.get(i + 1).with_context(|| format!("{key} needs a value"))?;
        match key {
            "--device" => a.device = value.clone(),
            "--config" => a.config = value.clone(),
            "--out" => a.out = PathBuf::from(value),
            "--minutes" => a.minutes = value.parse()?,
            "--steps" => a.steps = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--data" => a.data = value.parse()?,
            "--lr" => a.lr = value.parse()?,
            "--seed" => a.seed = value.parse()?,
            "--drop-caption" => a.drop_caption = value.parse()?,
            "--ema" => a.ema = value.parse()?,
            "--save-every-secs" => a.save_every_secs = value.parse()?,
            "--heads" => a.heads = Some(value.parse()?),
            "--layers" => a.layers = Some(value.parse()?),
            "--patch" => a.patch = Some(value.parse()?),
            "--predict" => a.predict = Some(value.clone()),
            "--init" => a.init = Some(PathBuf::from(value)),
            "--profile" => a.profile = value.parse()?,
            "--log-every" => a.log_every = value.parse::<usize>()?.max(1),
            "--dtype" => a.dtype = value.clone(),
            "--warmup" => a.warmup = value.parse::<f64>()?.max(1.0),
            "--event-tracking" => a.event_tracking = value.parse()?,
            "--profile-step" => a.profile_step = Some(value.parse()?),
            other => bail!("unknown option {other}"),
        }
        i += 2;
    }
    Ok(a)
}

/// The training set, resident on the device: pictures `(N, 3, S, S)` as u8 (a quarter of f32's
/// memory; a batch is gathered and converted on the device), captions padded to the encoder's
/// length as ids `(N, L)` u32 and mask `(N, L)` f32.
struct Dataset {
    images: Tensor,
    ids: Tensor,
    mask: Tensor,
    len: usize,
    /// `(1, L)`: 1 at the `[bos]` column, which caption dropout keeps.
    bos_column: Tensor,
}

/// Renders `n` scenes on all cores (`std::thread::scope`) and uploads them once.
fn build_dataset(n: usize, size: usize, seed: u64, tokenizer: &ShapesTokenizer, device: &Device) -> Result<Dataset> {
    if n == 0 {
        bail!("--data must be at least 1");
    }
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).max(1);
    let chunk = n.div_ceil(threads);
    let config = GenConfig::default();
    let plane = size * size;
    let parts: Vec<(Vec<u8>, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let config = config.clone();
                s.spawn(move || {
                    let (start, end) = (t * chunk, ((t + 1) * chunk).min(n));
                    let count = end.saturating_sub(start);
                    let mut pixels = vec![0u8; count * 3 * plane];
                    let mut texts = Vec::with_capacity(count);
                    for (k, i) in (start..end).enumerate() {
                        let scene = scene_at(seed, i as u64, &config);
                        let img = render(&scene, size as u32);
                        // HWC bytes -> CHW planes.
                        let out = &mut pixels[k * 3 * plane..(k + 1) * 3 * plane];
                        for (p, rgb) in img.as_raw().chunks_exact(3).enumerate() {
                            for c in 0..3 {
                                out[c * plane + p] = rgb[c];
                            }
                        }
                        texts.push(caption(&scene));
                    }
                    (pixels, texts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("render thread")).collect()
    });
    let mut pixels = Vec::with_capacity(n * 3 * plane);
    let mut captions = Vec::with_capacity(n);
    for (p, texts) in parts {
        pixels.extend(p);
        for t in texts {
            captions.push(tokenizer.encode(&t)?);
        }
    }
    let tokens = tokenizer.pad_batch(&captions);
    let bos_column = (0..tokens.len).map(|j| if j == 0 { 1f32 } else { 0.0 }).collect::<Vec<_>>();
    Ok(Dataset {
        bos_column: Tensor::from_vec(bos_column, (1, tokens.len), device)?,
        images: Tensor::from_vec(pixels, (n, 3, size, size), device)?,
        ids: Tensor::from_vec(tokens.ids, (n, tokens.len), device)?,
        mask: Tensor::from_vec(tokens.mask, (n, tokens.len), device)?,
        len: n,
    })
}

/// One training batch, drawn on the device with no host round trip: `x_t` in the compute dtype,
/// `t` `(B,)` f32, the velocity target f32, caption ids and mask.
struct Batch {
    x_t: Tensor,
    t: Tensor,
    target: Tensor,
    ids: Tensor,
    mask: Tensor,
}

/// Draws `b` random items; `t` by the prediction's schedule (below); a fraction
/// `drop_caption` of the captions becomes `[bos]` alone (classifier-free guidance).
fn draw_batch(data: &Dataset, b: usize, drop_caption: f64, dtype: DType, prediction: Prediction) -> Result<Batch> {
    let device = data.images.device();
    // rand is in (0, 1] on some backends: clamp the index to the last item.
    let idx = (Tensor::rand(0f32, 1f32, b, device)? * data.len as f64)?
        .floor()?
        .minimum((data.len - 1) as f64)?
        .to_dtype(DType::U32)?;
    let x0 = data.images.index_select(&idx, 0)?.to_dtype(DType::F32)?.affine(1.0 / 127.5, -1.0)?;
    let (ids, mask) = (data.ids.index_select(&idx, 0)?, data.mask.index_select(&idx, 0)?);
    // keep (B, L): 1 where the token stays; the first column is `[bos]` and always stays.
    let keep_caption = Tensor::rand(0f32, 1f32, (b, 1), device)?.ge(drop_caption)?.to_dtype(DType::F32)?;
    let keep = keep_caption.broadcast_maximum(&data.bos_column)?;
    // Dropped tokens become padding (id 0) and leave the mask.
    let ids = (ids.to_dtype(DType::F32)? * &keep)?.to_dtype(DType::U32)?;
    let mask = (mask * keep)?;

    let t = match prediction {
        Prediction::Velocity => {
            let half = b / 2;
            let uniform = Tensor::rand(0f32, 1f32, b - half, device)?;
            let logit_normal = candle_nn::ops::sigmoid(&Tensor::randn(0f32, 1f32, half, device)?)?;
            Tensor::cat(&[&uniform, &logit_normal], 0)?
        }
        // JiT's logit-normal N(0.8, 0.8) towards noise: the v-loss of a predicted x0 weighs
        // 1/t², which already stresses small t; uniform draws would let them dominate.
        Prediction::Sample => candle_nn::ops::sigmoid(&Tensor::randn(0.8f32, 0.8f32, b, device)?)?,
    };
    let tb = t.reshape((b, 1, 1, 1))?;
    let noise = x0.randn_like(0.0, 1.0)?;
    let x_t = (x0.broadcast_mul(&(1.0 - &tb)?)? + noise.broadcast_mul(&tb)?)?.to_dtype(dtype)?;
    let target = (noise - x0)?;
    Ok(Batch { x_t, t, target, ids, mask })
}

/// How a freshly made parameter starts. Every tensor of the model is set here by its name, none is
/// left to the VarBuilder's hints: a plain `vb.get` defaults to 0, and a zero q/k pair never
/// moves (the gradient of Q Kᵀ with respect to Q is dS·K = 0, and the reverse; ReLU(0) passes no
/// gradient either), which left attention dead in from-scratch runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// N(0, std²).
    Normal(f64),
    /// Glorot: U(-a, a), a = √(6 / (fan_in + fan_out)), fans counted over the kernel window.
    XavierUniform,
    Const(f64),
}

/// DiT / PixArt's recipe, by name: linears and convolutions Xavier; the timestep MLP and the AdaLN
/// projection N(0, 0.02); the per-block modulation tables N(0, 1/C); the output projection and
/// every cross-attention output 0, so each block starts by passing its input through; biases 0,
/// norm weights 1. An unknown one-dimensional tensor is an error: it must be given a rule.
fn init_rule(name: &str, rank: usize, channels: usize) -> Result<Init> {
    let is = |suffix: &str| name.ends_with(suffix);
    Ok(if is("scale_shift_table") {
        Init::Normal(1.0 / (channels as f64).sqrt())
    } else if name.starts_with("transformer.proj_out.") || name.contains(".attn2.to_out.") {
        Init::Const(0.0)
    } else if is(".bias") {
        Init::Const(0.0)
    } else if (name.contains("norm") && is(".weight")) && rank == 1 {
        Init::Const(1.0)
    } else if name.contains("time_embed.") {
        Init::Normal(0.02)
    } else if is("position_embedding") {
        Init::Normal(0.02)
    } else if is("conv_depth.weight") {
        // Depth-wise: each output sees 9 inputs of its own channel (Kaiming, fan-in 9).
        Init::Normal(1.0 / 3.0)
    } else if is("token_embedding.weight") {
        Init::Normal(1.0)
    } else if is(".weight") && rank >= 2 {
        Init::XavierUniform
    } else {
        bail!("no initialization rule for {name} (rank {rank})")
    })
}

fn init_weights(varmap: &VarMap, cfg: &TinyShapesConfig) -> Result<()> {
    let channels = cfg.transformer.inner_dim();
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?;
    for (name, var) in data.iter() {
        let t = var.as_tensor();
        let (shape, device) = (t.shape().clone(), t.device().clone());
        let dims = shape.dims().to_vec();
        let value = match init_rule(name, dims.len(), channels)? {
            Init::Normal(std) => Tensor::randn(0f32, std as f32, shape, &device)?,
            Init::Const(v) => (Tensor::ones(shape, DType::F32, &device)? * v)?,
            Init::XavierUniform => {
                let window: usize = dims[2..].iter().product();
                let (fan_out, fan_in) = (dims[0] * window, dims[1] * window);
                let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                Tensor::rand(-a, a, shape, &device)?
            }
        };
        var.set(&value)?;
    }
    Ok(())
}

fn save(dir: &Path, weights: &[(String, Tensor)], cfg: &TinyShapesConfig, tokenizer: &ShapesTokenizer) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut map = HashMap::new();
    for (name, t) in weights {
        map.insert(name.clone(), t.to_dtype(DType::F16)?.to_device(&Device::Cpu)?);
    }
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), cfg.to_json()?)?;
    tokenizer.save(&dir.join("tokenizer.json"))?;
    Ok(())
}

/// Lets the CUDA memory pool keep freed memory instead of returning it to the driver at every
/// synchronization (the default threshold is 0). Every op allocates its output; without this, each
/// step maps gigabytes of activations afresh. A failure only costs speed, so it is reported and
/// training goes on.
#[cfg(feature = "cuda")]
fn keep_freed_gpu_memory() {
    use cudarc::driver::sys;
    let result = unsafe {
        let mut device: sys::CUdevice = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        let r = sys::cuCtxGetDevice(&mut device);
        if r != sys::CUresult::CUDA_SUCCESS {
            Err(r)
        } else {
            let r = sys::cuDeviceGetDefaultMemPool(&mut pool, device);
            if r != sys::CUresult::CUDA_SUCCESS {
                Err(r)
            } else {
                let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
                match sys::cuMemPoolSetAttribute(pool, attr, &mut threshold as *mut u64 as *mut std::ffi::c_void) {
                    sys::CUresult::CUDA_SUCCESS => Ok(()),
                    r => Err(r),
                }
            }
        }
    };
    match result {
        Ok(()) => println!("CUDA memory pool keeps freed memory"),
        Err(e) => println!("warning: could not set the CUDA memory pool's release threshold: {e:?}"),
    }
}

/// Every trained tensor, in one flat f32 vector: the master weights, AdamW's moments and the EMA
/// are each one tensor, so the optimizer and the average are a dozen element-wise ops per step
/// instead of a dozen per parameter tensor (~230 tensors: thousands of tiny kernel launches).
/// The model itself reads separate `compute` Vars in the compute dtype (f32 or bf16), refreshed
/// from the master after each update; their gradients are gathered into one flat f32 vector.
struct FlatParams {
    names: Vec<String>,
    shapes: Vec<candle_core::Shape>,
    offsets: Vec<usize>,
    compute: Vec<Var>,
    master: Tensor,
    m: Tensor,
    v: Tensor,
    ema: Tensor,
    steps: i32,
}

impl FlatParams {
    /// `named`: the initialized f32 variables, sorted by name.
    fn new(named: &[(String, Var)], dtype: DType) -> Result<Self> {
        let mut offsets = Vec::with_capacity(named.len());
        let mut total = 0;
        for (_, v) in named {
            offsets.push(total);
            total += v.elem_count();
        }
        let flat: Vec<Tensor> = named.iter().map(|(_, v)| v.as_tensor().flatten_all()).collect::<candle_core::Result<_>>()?;
        let master = Tensor::cat(&flat, 0)?.detach();
        let compute = named.iter().map(|(_, v)| Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            names: named.iter().map(|(n, _)| n.clone()).collect(),
            shapes: named.iter().map(|(_, v)| v.shape().clone()).collect(),
            offsets,
            compute,
            m: master.zeros_like()?,
            v: master.zeros_like()?,
            ema: master.copy()?,
            master,
            steps: 0,
        })
    }

    /// The compute Vars by name, for a `VarBuilder`.
    fn tensors(&self) -> HashMap<String, Tensor> {
        self.names.iter().cloned().zip(self.compute.iter().map(|v| v.as_tensor().clone())).collect()
    }

    /// The gradients of the compute Vars as one flat f32 vector; errors if one has none (an op
    /// without a backward pass cuts the graph silently).
    fn flat_grad(&self, grads: &candle_core::backprop::GradStore) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.compute.len());
        let mut missing = Vec::new();
        for (name, var) in self.names.iter().zip(&self.compute) {
            match grads.get(var.as_tensor()) {
                Some(g) => parts.push(g.flatten_all()?),
                None => missing.push(name.as_str()),
            }
        }
        if !missing.is_empty() {
            bail!("no gradient reaches {} parameters: {:?}", missing.len(), missing);
        }
        Ok(Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?)
    }

    /// One AdamW step on the master (decoupled weight decay, bias-corrected moments: candle_nn's
    /// AdamW), then the EMA update and the refresh of the compute Vars.
    fn step(&mut self, grad: &Tensor, p: &ParamsAdamW, ema_decay: f64) -> Result<()> {
        self.steps += 1;
        let (b1, b2) = (p.beta1, p.beta2);
        self.m = (self.m.affine(b1, 0.0)? + grad.affine(1.0 - b1, 0.0)?)?;
        self.v = (self.v.affine(b2, 0.0)? + grad.sqr()?.affine(1.0 - b2, 0.0)?)?;
        let m_hat = self.m.affine(1.0 / (1.0 - b1.powi(self.steps)), 0.0)?;
        let v_hat = self.v.affine(1.0 / (1.0 - b2.powi(self.steps)), 0.0)?;
        let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
        self.master = (self.master.affine(1.0 - p.lr * p.weight_decay, 0.0)? - update.affine(p.lr, 0.0)?)?;
        self.ema = (self.ema.affine(ema_decay, 0.0)? + self.master.affine(1.0 - ema_decay, 0.0)?)?;
        let cast = self.master.to_dtype(self.compute[0].dtype())?;
        for ((var, &offset), shape) in self.compute.iter().zip(&self.offsets).zip(&self.shapes) {
            var.set(&cast.narrow(0, offset, shape.elem_count())?.reshape(shape)?)?;
        }
        Ok(())
    }

    /// `(name, tensor)` pairs of a flat vector (the master or the EMA).
    fn unflatten(&self, flat: &Tensor) -> Result<Vec<(String, Tensor)>> {
        self.names
            .iter()
            .zip(&self.offsets)
            .zip(&self.shapes)
            .map(|((n, &o), s)| Ok((n.clone(), flat.narrow(0, o, s.elem_count())?.reshape(s)?)))
            .collect()
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => bail!("--device {other}: cpu or cuda"),
    };
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    if device.is_cuda() {
        device.set_seed(args.seed)?;
        #[cfg(feature = "cuda")]
        {
            keep_freed_gpu_memory();
            if !args.event_tracking {
                // Every allocation otherwise creates two CUDA events, and every launch records and
                // waits on them: pure overhead with candle's single stream.
                if let Device::Cuda(d) = &device {
                    // SAFETY: one stream on one device; nothing else shares these buffers.
                    unsafe { d.disable_event_tracking() };
                }
            }
        }
    }
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other}: f32 or bf16"),
    };
    let mut cfg = match args.config.as_str() {
        "default" => TinyShapesConfig::default_64(),
        "tiny" => TinyShapesConfig::tiny_test(),
        other => bail!("--config {other}: default or tiny"),
    };
    // Width (heads of 32 channels) and depth overrides, to try other sizes.
    if let Some(h) = args.heads {
        let t = &mut cfg.transformer;
        t.num_attention_heads = h;
        t.num_cross_attention_heads = h;
        t.cross_attention_dim = h * t.attention_head_dim;
    }
    if let Some(l) = args.layers {
        cfg.transformer.num_layers = l;
    }
    if let Some(p) = args.patch {
        cfg.transformer.patch_size = p;
    }
    match args.predict.as_deref() {
        None => {}
        Some("sample") => cfg.prediction = Prediction::Sample,
        Some("velocity") => cfg.prediction = Prediction::Velocity,
        Some(other) => bail!("--predict {other}: sample or velocity"),
    }
    cfg.validate()?;
    let tokenizer = ShapesTokenizer::from_vocabulary(cfg.text.max_len)?;
    let size = cfg.image_size;

    let t0 = Instant::now();
    let data = build_dataset(args.data, size, args.seed, &tokenizer, &device)?;
    device.synchronize()?;
    println!("dataset: {} images {}x{} in {:.1}s (u8 on {:?})", args.data, size, size, t0.elapsed().as_secs_f64(), device.location());

    // Training always uses the candle-op references of both backends (they have a backward pass).
    let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()));
    // The f32 variables are made (and initialized or loaded) through a VarMap, then flattened.
    let named: Vec<(String, Var)> = {
        let varmap = VarMap::new();
        let _shape_only = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
        init_weights(&varmap, &cfg)?;
        if let Some(dir) = &args.init {
            // Resume from a saved checkpoint (f16 file, f32 training); optimizer state starts afresh.
            let saved = candle_core::safetensors::load(dir.join("model.safetensors"), &device)?;
            let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?;
            for (name, var) in data.iter() {
                let t = saved.get(name).with_context(|| format!("{name} missing from {}", dir.display()))?;
                var.set(&t.to_dtype(DType::F32)?)?;
            }
            println!("initialized from {}", dir.display());
        }
        let mut named: Vec<(String, Var)> =
            varmap.data().lock().map_err(|_| anyhow::anyhow!("lock"))?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    };
    let params: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
    let mut flat = FlatParams::new(&named, dtype)?;
    drop(named);
    let model = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_tensors(flat.tensors(), dtype, &device))?;
    println!("model: {} tensors, {:.2}M parameters, compute {dtype:?}, f32 master weights", flat.names.len(), params as f64 / 1e6);

    let b = args.batch;
    if args.profile {
        // The same forward without gradient tracking, for comparison with the training forward.
        let detached: HashMap<String, Tensor> = flat.tensors().into_iter().map(|(n, t)| (n, t.detach())).collect();
        let frozen = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_tensors(detached, dtype, &device))?;
        let batch = draw_batch(&data, b, 0.0, dtype, cfg.prediction)?;
        for _ in 0..2 {
            let s = Instant::now();
            let text = frozen.encode_text(&batch.ids, &batch.mask)?;
            let v = visgen::attention::with_reference_only(|| frozen.velocity(&batch.x_t, &batch.t, &text, &batch.mask))?;
            device.synchronize()?;
            println!("untracked forward, batch {b}: {:.1}ms {:?}", 1e3 * s.elapsed().as_secs_f64(), v.dims());
        }
    }
    let adam = |lr: f64| ParamsAdamW { lr, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.01 };
    let budget = args.minutes * 60.0;
    let start = Instant::now();
    let mut last_save = Instant::now();
    let mut loss_acc: Option<Tensor> = None;
    let mut last_report = (0usize, 0f64);
    let mut loss_n = 0usize;
    let mut step = 0usize;
    // --profile true: per-phase wall times (synchronized), printed with each report.
    let mut phases = [0f64; 6];
    const PHASE_NAMES: [&str; 6] = ["data", "text", "forward", "backward", "optimizer+ema", "loss-sync"];
    let mut mark = Instant::now();
    let mut lap = |phase: usize, phases: &mut [f64; 6]| -> Result<()> {
        if args.profile {
            device.synchronize()?;
            phases[phase] += mark.elapsed().as_secs_f64();
            mark = Instant::now();
        }
        Ok(())
    };
    while step < args.steps && start.elapsed().as_secs_f64() < budget {
        // Learning rate: linear warm-up, then cosine down to 10% by the fraction of the budget spent
        // (time, or steps when --steps bounds the run).
        let frac = if args.steps == usize::MAX { start.elapsed().as_secs_f64() / budget } else { step as f64 / args.steps as f64 };
        let lr = args.lr * ((step as f64 + 1.0) / args.warmup).min(1.0) * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * frac.min(1.0)).cos()));

        #[cfg(feature = "cuda")]
        let _profiled = match args.profile_step {
            Some(k) if k == step && device.is_cuda() => Some(cudarc::driver::Profiler::new()?),
            _ => None,
        };
        let batch = draw_batch(&data, b, args.drop_caption, dtype, cfg.prediction)?;
        lap(0, &mut phases)?;

        let text = model.encode_text(&batch.ids, &batch.mask)?;
        lap(1, &mut phases)?;
        // Our CUDA attention kernels are forward-only: train through the candle-op references.
        let v = visgen::attention::with_reference_only(|| model.velocity(&batch.x_t, &batch.t, &text, &batch.mask))?;
        let loss = (v.to_dtype(DType::F32)? - &batch.target)?.sqr()?.mean_all()?;
        lap(2, &mut phases)?;
        let grads = loss.backward()?;
        let grad = flat.flat_grad(&grads)?;
        drop(grads);
        lap(3, &mut phases)?;
        // EMA with a warm-up of its own: early on the average must not be dominated by the init.
        let decay = args.ema.min((1.0 + step as f64) / (10.0 + step as f64));
        flat.step(&grad, &adam(lr), decay)?;
        lap(4, &mut phases)?;

        // The loss stays on the device between reports: reading it every step would make the host
        // wait for the GPU each step instead of queueing the next one.
        loss_acc = Some(match loss_acc {
            None => loss.detach(),
            Some(acc) => (acc + loss.detach())?,
        });
        loss_n += 1;
        step += 1;
        if step % args.log_every == 0 || step <= 3 {
            let loss_sum = match loss_acc.take() {
                Some(acc) => acc.to_scalar::<f32>()? as f64,
                None => 0.0,
            };
            lap(5, &mut phases)?;
            let secs = start.elapsed().as_secs_f64();
            let recent = (step - last_report.0) as f64 / (secs - last_report.1).max(1e-9);
            last_report = (step, secs);
            println!(
                "step {step:6} loss {:.4} lr {lr:.2e} {recent:.2} steps/s {:.0} pictures/s {secs:.0}s",
                loss_sum / loss_n as f64,
                recent * b as f64
            );
            loss_n = 0;
            if args.profile {
                let total: f64 = phases.iter().sum();
                let parts: Vec<String> = PHASE_NAMES.iter().zip(&phases).map(|(n, t)| format!("{n} {:.1}ms", 1e3 * t / step as f64)).collect();
                println!("  per step {:.1}ms: {}", 1e3 * total / step as f64, parts.join(", "));
            }
        }
        if last_save.elapsed().as_secs_f64() > args.save_every_secs {
            save(&args.out, &flat.unflatten(&flat.ema)?, &cfg, &tokenizer)?;
            println!("saved EMA weights at step {step}");
            last_save = Instant::now();
        }
    }
    save(&args.out, &flat.unflatten(&flat.ema)?, &cfg, &tokenizer)?;
    save(&args.out.join("raw"), &flat.unflatten(&flat.master)?, &cfg, &tokenizer)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "done: {step} steps in {secs:.0}s ({:.2} steps/s, {:.0} pictures/s at batch {b}); wrote {}",
        step as f64 / secs,
        step as f64 * b as f64 / secs,
        args.out.display()
    );
    Ok(())
}
