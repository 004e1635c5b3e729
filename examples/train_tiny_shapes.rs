//! Trains tiny-shapes (text encoder + SANA DiT in pixel space) by flow matching on the procedural
//! shapes data and writes `model.safetensors` (EMA weights, f16), `config.json` and `tokenizer.json`.
//!
//! ```text
//! # CPU smoke run (a few steps of a very small model):
//! cargo run --release --example train_tiny_shapes -- --config tiny --steps 3 --batch 4 --data 64 --out /tmp/ts
//! # The shipped model, on the H200 (4.3 steps/s at batch 128; the shipped weights had 95 + 982
//! # steps, about 5 minutes; `--profile true` prints synchronized per-phase times):
//! cargo build --release --features cuda --example train_tiny_shapes
//! train_tiny_shapes --device cuda --minutes 9 --batch 128 --data 100000 --lr 8e-4 --out $OUT/tiny-shapes
//! ```
//!
//! Objective: `x_t = (1 - t) x0 + t ε`, target `v = ε - x0`; half of the batch draws `t` uniform
//! in [0, 1], half logit-normal (`t = sigmoid(n)`, `n ~ N(0, 1)`): logit-normal alone almost never
//! trains t < 0.05, where the sampler's last steps remove the last noise from flat pixel colors.
//! 10% of captions are dropped to `[bos]` alone for classifier-free guidance.
//! Attention runs through the candle-op references (dense for text and cross-attention, linear for
//! self-attention), which have a backward pass on every device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use visgen::attention::plan::AttentionPlan;
use visgen::attention::{Backend, DenseParams, LinearParams};
use visgen::data::shapes::{caption, render, scene_at, GenConfig};
use visgen::models::tiny_shapes::tokenizer::BOS_ID;
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
    init: Option<PathBuf>,
    profile: bool,
    log_every: usize,
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
        init: None,
        profile: false,
        log_every: 100,
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
            "--init" => a.init = Some(PathBuf::from(value)),
            "--profile" => a.profile = value.parse()?,
            "--log-every" => a.log_every = value.parse::<usize>()?.max(1),
            other => bail!("unknown option {other}"),
        }
        i += 2;
    }
    Ok(a)
}

/// The training set: images `(N, 3, S, S)` in [-1, 1] on the device, captions as token ids.
struct Dataset {
    images: Tensor,
    captions: Vec<Vec<u32>>,
}

fn build_dataset(n: usize, size: usize, seed: u64, tokenizer: &ShapesTokenizer, device: &Device) -> Result<Dataset> {
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).max(1);
    let chunk = n.div_ceil(threads);
    let config = GenConfig::default();
    let parts: Vec<(Vec<f32>, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let config = config.clone();
                s.spawn(move || {
                    let (start, end) = (t * chunk, ((t + 1) * chunk).min(n));
                    let mut pixels = Vec::with_capacity(end.saturating_sub(start) * 3 * size * size);
                    let mut texts = Vec::new();
                    for i in start..end {
                        let scene = scene_at(seed, i as u64, &config);
                        let img = render(&scene, size as u32);
                        for c in 0..3 {
                            for y in 0..size {
                                for x in 0..size {
                                    pixels.push(img.get_pixel(x as u32, y as u32)[c] as f32 / 127.5 - 1.0);
                                }
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
    let mut pixels = Vec::with_capacity(n * 3 * size * size);
    let mut captions = Vec::with_capacity(n);
    for (p, texts) in parts {
        pixels.extend(p);
        for t in texts {
            captions.push(tokenizer.encode(&t)?);
        }
    }
    let images = Tensor::from_vec(pixels, (n, 3, size, size), device)?;
    Ok(Dataset { images, captions })
}

/// Training init on top of the VarMap's defaults (which are 0 for plain `get`s): AdaLN tables
/// ~N(0, 1/C) as PixArt, RMSNorm weights 1, depth-wise kernels random, the output projection 0.
fn init_weights(varmap: &VarMap, cfg: &TinyShapesConfig) -> Result<()> {
    let c = cfg.transformer.inner_dim() as f64;
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?;
    for (name, var) in data.iter() {
        let t = var.as_tensor();
        let (shape, device) = (t.shape().clone(), t.device().clone());
        let value = if name.ends_with("scale_shift_table") {
            Some((Tensor::randn(0f32, 1f32, shape, &device)? / c.sqrt())?)
        } else if name.ends_with("caption_norm.weight") {
            Some(Tensor::ones(shape, DType::F32, &device)?)
        } else if name.ends_with("conv_depth.weight") {
            Some((Tensor::randn(0f32, 1f32, shape, &device)? * (1.0 / 3.0))?)
        } else if name.ends_with("position_embedding") {
            Some((Tensor::randn(0f32, 1f32, shape, &device)? * 0.02)?)
        } else if name.starts_with("transformer.proj_out.") {
            Some(Tensor::zeros(shape, DType::F32, &device)?)
        } else {
            None
        };
        if let Some(v) = value {
            var.set(&v)?;
        }
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
        keep_freed_gpu_memory();
    }
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
    let tokenizer = ShapesTokenizer::from_vocabulary(cfg.text.max_len)?;
    let size = cfg.image_size;

    let t0 = Instant::now();
    let data = build_dataset(args.data, size, args.seed, &tokenizer, &device)?;
    println!("dataset: {} images {}x{} in {:.1}s", args.data, size, size, t0.elapsed().as_secs_f64());

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    // Training always uses the candle-op references of both backends (they have a backward pass).
    let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()));
    let model = TinyShapesModel::new(&cfg, &plan, vb)?;
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

    let mut named: Vec<(String, Var)> = varmap.data().lock().map_err(|_| anyhow::anyhow!("lock"))?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let params: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
    println!("model: {} tensors, {:.2}M parameters", named.len(), params as f64 / 1e6);
    let mut ema: Vec<Tensor> = named.iter().map(|(_, v)| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?;

    let mut opt = AdamW::new(
        named.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW { lr: args.lr, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.01 },
    )?;

    if args.profile {
        // The same forward without gradient tracking, for comparison with the training forward.
        let tensors: HashMap<String, Tensor> = named.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
        let frozen = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_tensors(tensors, DType::F32, &device))?;
        let b = args.batch;
        let tokens = tokenizer.pad_batch(&data.captions[..b]);
        let ids = Tensor::from_vec(tokens.ids, (b, tokens.len), &device)?;
        let mask = Tensor::from_vec(tokens.mask, (b, tokens.len), &device)?;
        let x = data.images.narrow(0, 0, b)?;
        let t = Tensor::full(0.5f32, b, &device)?;
        for _ in 0..2 {
            let s = Instant::now();
            let text = frozen.encode_text(&ids, &mask)?;
            let v = visgen::attention::with_reference_only(|| frozen.velocity(&x, &t, &text, &mask))?;
            device.synchronize()?;
            println!("untracked forward, batch {b}: {:.1}ms {:?}", 1e3 * s.elapsed().as_secs_f64(), v.dims());
        }
    }
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x7472_6169_6e);
    let budget = args.minutes * 60.0;
    let warmup = 200.0;
    let start = Instant::now();
    let mut last_save = Instant::now();
    let mut loss_sum = 0.0;
    let mut loss_acc: Option<Tensor> = None;
    let mut last_report = (0usize, 0f64);
    let mut loss_n = 0usize;
    let mut step = 0usize;
    let b = args.batch;
    // --profile true: per-phase wall times (synchronized), printed every 100 steps and at the end.
    let mut phases = [0f64; 7];
    const PHASE_NAMES: [&str; 7] = ["data", "text", "forward", "backward", "optimizer", "ema", "loss-sync"];
    let mut mark = Instant::now();
    let mut lap = |phase: usize, phases: &mut [f64; 7]| -> Result<()> {
        if args.profile {
            device.synchronize()?;
            phases[phase] += mark.elapsed().as_secs_f64();
            mark = Instant::now();
        }
        Ok(())
    };
    while step < args.steps && start.elapsed().as_secs_f64() < budget {
        // Learning rate: linear warm-up, then cosine by the fraction of the time budget spent.
        let frac = (start.elapsed().as_secs_f64() / budget).min(1.0);
        let lr = args.lr * ((step as f64 + 1.0) / warmup).min(1.0) * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()));
        opt.set_learning_rate(lr);

        let idx: Vec<u32> = (0..b).map(|_| rng.random_range(0..args.data) as u32).collect();
        let captions: Vec<Vec<u32>> = idx
            .iter()
            .map(|&i| if rng.random_bool(args.drop_caption) { vec![BOS_ID] } else { data.captions[i as usize].clone() })
            .collect();
        let tokens = tokenizer.pad_batch(&captions);
        let ids = Tensor::from_vec(tokens.ids, (b, tokens.len), &device)?;
        let mask = Tensor::from_vec(tokens.mask, (b, tokens.len), &device)?;
        let x0 = data.images.index_select(&Tensor::from_vec(idx, b, &device)?, 0)?;

        let noise = x0.randn_like(0.0, 1.0)?;
        let t: Vec<f32> = (0..b)
            .map(|i| {
                if i % 2 == 0 {
                    rng.random::<f32>()
                } else {
                    // Box-Muller for n ~ N(0, 1), then the logistic function.
                    let (u1, u2) = (1.0 - rng.random::<f32>(), rng.random::<f32>());
                    let n = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
                    1.0 / (1.0 + (-n).exp())
                }
            })
            .collect();
        let t = Tensor::from_vec(t, b, &device)?;
        let tb = t.reshape((b, 1, 1, 1))?;
        let x_t = (x0.broadcast_mul(&(1.0 - &tb)?)? + noise.broadcast_mul(&tb)?)?;
        let target = (&noise - &x0)?;
        lap(0, &mut phases)?;

        let text = model.encode_text(&ids, &mask)?;
        lap(1, &mut phases)?;
        // Our CUDA attention kernels are forward-only: train through the candle-op references.
        let v = visgen::attention::with_reference_only(|| model.velocity(&x_t, &t, &text, &mask))?;
        let loss = (v - target)?.sqr()?.mean_all()?;
        lap(2, &mut phases)?;
        let grads = loss.backward()?;
        lap(3, &mut phases)?;
        if step == 0 {
            // Every parameter must receive a gradient: an op without a backward pass cuts the graph silently.
            let missing: Vec<&str> = named.iter().filter(|(_, v)| grads.get(v.as_tensor()).is_none()).map(|(n, _)| n.as_str()).collect();
            if !missing.is_empty() {
                bail!("no gradient reaches {} parameters: {:?}", missing.len(), missing);
            }
        }
        opt.step(&grads)?;
        lap(4, &mut phases)?;

        // EMA with a warm-up of its own: early on the average must not be dominated by the init.
        let decay = args.ema.min((1.0 + step as f64) / (10.0 + step as f64));
        for (e, (_, var)) in ema.iter_mut().zip(&named) {
            *e = ((&*e * decay)? + (var.as_tensor() * (1.0 - decay))?)?;
        }

        lap(5, &mut phases)?;
        // The loss stays on the device between reports: reading it every step would make the host
        // wait for the GPU each step instead of queueing the next one.
        loss_acc = Some(match loss_acc {
            None => loss.detach(),
            Some(acc) => (acc + loss.detach())?,
        });
        loss_n += 1;
        step += 1;
        if step % args.log_every == 0 || step <= 3 {
            if let Some(acc) = loss_acc.take() {
                loss_sum = acc.to_scalar::<f32>()? as f64;
            }
            lap(6, &mut phases)?;
            let secs = start.elapsed().as_secs_f64();
            let recent = (step - last_report.0) as f64 / (secs - last_report.1).max(1e-9);
            last_report = (step, secs);
            println!("step {step:6} loss {:.4} lr {lr:.2e} {recent:.2} steps/s {secs:.0}s", loss_sum / loss_n as f64);
            loss_sum = 0.0;
            loss_n = 0;
            if args.profile {
                let total: f64 = phases.iter().sum();
                let parts: Vec<String> = PHASE_NAMES.iter().zip(&phases).map(|(n, t)| format!("{n} {:.1}ms", 1e3 * t / step as f64)).collect();
                println!("  per step {:.1}ms: {}", 1e3 * total / step as f64, parts.join(", "));
            }
        }
        if last_save.elapsed().as_secs_f64() > args.save_every_secs {
            let weights: Vec<(String, Tensor)> = named.iter().map(|(n, _)| n.clone()).zip(ema.iter().cloned()).collect();
            save(&args.out, &weights, &cfg, &tokenizer)?;
            println!("saved EMA weights at step {step}");
            last_save = Instant::now();
        }
    }
    let weights: Vec<(String, Tensor)> = named.iter().map(|(n, _)| n.clone()).zip(ema.iter().cloned()).collect();
    save(&args.out, &weights, &cfg, &tokenizer)?;
    let raw: Vec<(String, Tensor)> = named.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    save(&args.out.join("raw"), &raw, &cfg, &tokenizer)?;
    let secs = start.elapsed().as_secs_f64();
    println!("done: {step} steps in {secs:.0}s ({:.2} steps/s at batch {b}); wrote {}", step as f64 / secs, args.out.display());
    Ok(())
}
