//! `gen bench sana`: SANA-1600M at full size with seeded random weights in bf16 on the GPU, the
//! shape of issue 5's speed goal: 1024² (32×32 latent tokens), CFG batch 2, 300 text tokens.
//!
//! Prints the time of one transformer step, the parts of one block (to see where a step's time
//! goes), and a whole 20-step image (text encoder + denoise + decode, each stage timed). With a
//! baseline log (tests/bench/sana_baseline.py, diffusers eager, same run) each line that has a
//! matching `baseline diffusers NAME` line also prints `ours / diffusers`.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor};

use super::gpu::time_ms;
use crate::attention::{attend, AttentionInput};
use crate::error::{Error, Result};
use crate::layers::{gated_residual, norm_modulate, project, GluMbConv};
use crate::models::sana::{SanaConfig, SanaTransformer, StepGraphs};
use crate::schedulers::{FlowDpmSolver, FlowDpmSolverConfig, Scheduler};
use crate::pipelines::sana::SanaPipeline;
use crate::pipelines::{attention_plan, DeviceChoice, Flow, ImageRequest, LoadOptions, Progress, Stage};
use crate::weights::random::random_var_builder;

const SPEC: &str = "sana-1600m";
const BATCH: usize = 2;
const LATENT_SIDE: usize = 32;
const TEXT_TOKENS: usize = 300;
/// Real (unpadded) text tokens in the mask: SANA's instruction prefix plus a short prompt.
const REAL_TEXT_TOKENS: usize = 120;
const IMAGE_STEPS: usize = 20;

/// One printed row: what, our milliseconds, and the baseline line it compares with.
fn row(what: &str, ms: f64, baselines: &HashMap<String, f64>, key: &str) {
    match baselines.get(&format!("diffusers {key}")) {
        Some(base) => println!("{what:<44} {ms:>10.3} {base:>14.3} {:>18.2}", ms / base),
        None => println!("{what:<44} {ms:>10.3} {:>14} {:>18}", "-", "-"),
    }
}

pub fn run(device: &Device, dev: &CudaDevice, ordinal: usize, iters: usize, baselines: &HashMap<String, f64>) -> Result<()> {
    let mut spec = crate::spec::find_spec(SPEC)?;
    spec.weights.random = Some(0);
    spec.weights.repo = None;
    let options = LoadOptions { device: DeviceChoice::Cuda(ordinal), dtype: Some(DType::BF16), attention: Vec::new() };
    let plan = attention_plan(&spec, &options)?;
    let t0 = Instant::now();
    let pipeline = SanaPipeline::load(&spec, &plan, &options)?;
    device.synchronize()?;
    println!("sana: {SPEC} with random weights, bf16, loaded in {:.1} s", t0.elapsed().as_secs_f64());
    let transformer = pipeline.transformer();
    let cfg = transformer.config().clone();
    let block0 = &transformer.blocks()[0];
    println!(
        "backends: self-attention {:?}; cross-attention {:?}",
        block0.self_attention().backend(),
        block0.cross_attention().backend()
    );
    println!("{:<44} {:>10} {:>14} {:>18}", "what (batch 2, 1024², 300 text tokens)", "ours ms", "diffusers ms", "ours / diffusers");

    // One transformer step, as the CFG loop calls it: eager, then replayed from a CUDA graph.
    let latents = Tensor::randn(0f32, 1.0, (BATCH, cfg.in_channels, LATENT_SIDE, LATENT_SIDE), device)?.to_dtype(DType::BF16)?;
    let timestep = Tensor::full(500f32, BATCH, device)?;
    let text = Tensor::randn(0f32, 1.0, (BATCH, TEXT_TOKENS, cfg.caption_channels), device)?.to_dtype(DType::BF16)?;
    let mask = text_mask(device)?;
    let context = transformer.text_context(&text, &mask)?;
    let eager = || transformer.forward_with_text(&latents, &timestep, &context, None);
    let ms = time_ms(dev, 3, iters, || Ok(drop(eager()?)))?;
    row("transformer step, eager", ms, baselines, "step");
    // Host time to enqueue one step: when it is close to the step's GPU time, the step is bound by
    // launches, not by the GPU.
    row("  host time to enqueue one step", host_ms(device, iters, || Ok(drop(eager()?)))?, baselines, "-");

    let mut graphs = StepGraphs::new(true);
    let t0 = Instant::now();
    let first = graphs.forward(transformer, &latents, &timestep, &context, None)?;
    device.synchronize()?;
    let first_ms = t0.elapsed().as_secs_f64() * 1e3;
    match graphs.take_fallback_reason() {
        Some(reason) => println!("CUDA graph capture FAILED, steps run eagerly: {reason}"),
        None => println!(
            "CUDA graph captured ({} capture{}, first call = eager warm-up + capture: {first_ms:.1} ms)",
            graphs.captures(),
            if graphs.relaxed() { ", relaxed mode" } else { "" }
        ),
    }
    let replay = graphs.forward(transformer, &latents, &timestep, &context, None)?;
    let again = eager()?;
    println!(
        "  max |replay - eager| {:.3e}, max |eager - eager| {:.3e} (linear attention sums its state with atomics)",
        max_abs_diff(&replay, &first)?,
        max_abs_diff(&again, &first)?
    );
    let ms = time_ms(dev, 3, iters, || Ok(drop(graphs.forward(transformer, &latents, &timestep, &context, None)?)))?;
    row("transformer step, CUDA graph replay", ms, baselines, "step");
    let host = host_ms(device, iters, || Ok(drop(graphs.forward(transformer, &latents, &timestep, &context, None)?)))?;
    row("  host time to enqueue one replay", host, baselines, "-");
    drop(graphs);

    let ms = time_ms(dev, 3, iters, || {
        transformer.forward(&latents, &timestep, &text, &mask, None)?;
        Ok(())
    })?;
    row("transformer step + text projections (per call)", ms, baselines, "-");
    let ms = time_ms(dev, 3, iters, || {
        transformer.text_context(&text, &mask)?;
        Ok(())
    })?;
    row("  text context (once per image)", ms, baselines, "-");

    outside_blocks(device, dev, iters, transformer, &latents, &timestep)?;
    block_parts(device, dev, iters, &pipeline, &cfg, baselines)?;
    text_encoder_at_real_token_counts(device, dev, iters, &pipeline, baselines)?;
    let mut pipeline = pipeline;
    whole_image(device, &pipeline, baselines, "with CUDA graphs")?;
    pipeline.set_cuda_graphs(false);
    whole_image(device, &pipeline, baselines, "eager")?;
    if std::env::var("VISGEN_BENCH_SKIP_DECODER").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    decoder_parts(device, dev, iters)
}

/// Median host milliseconds that `f` takes to return (to enqueue its work), the stream drained
/// before each call.
fn host_ms(device: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut host = Vec::new();
    for _ in 0..iters {
        device.synchronize()?;
        let t0 = Instant::now();
        f()?;
        host.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    device.synchronize()?;
    Ok(super::median(host))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?;
    Ok(d.to_scalar::<f32>()? as f64)
}

/// The step's work outside the 20 blocks, each part timed alone on the step's shapes: where the
/// difference between a step and 20 blocks goes when it is not launch gaps.
fn outside_blocks(device: &Device, dev: &CudaDevice, iters: usize, transformer: &SanaTransformer, latents: &Tensor, timestep: &Tensor) -> Result<()> {
    let none = HashMap::new();
    let (x, _temb, embedded) = transformer.embed(latents, timestep, None)?;
    let ms = time_ms(dev, 3, iters, || Ok(drop(transformer.embed(latents, timestep, None)?)))?;
    row("outside the blocks: patch + time embedding", ms, &none, "-");
    let side = (LATENT_SIDE, LATENT_SIDE);
    let ms = time_ms(dev, 3, iters, || Ok(drop(transformer.final_layer(&x, &embedded, side)?)))?;
    row("  final norm + projection + unpatchify", ms, &none, "-");
    // The sampler's own work per step (f32 latents of one image): CFG batch, dtype casts, CFG
    // combine and one DPM-Solver++ step.
    let z = Tensor::randn(0f32, 1.0, (1, latents.dim(1)?, LATENT_SIDE, LATENT_SIDE), device)?;
    let v = Tensor::randn(0f32, 1.0, (BATCH, latents.dim(1)?, LATENT_SIDE, LATENT_SIDE), device)?.to_dtype(DType::BF16)?;
    let ms = time_ms(dev, 3, iters, || {
        let model_in = Tensor::cat(&[&z, &z], 0)?.to_dtype(DType::BF16)?;
        let v = v.to_dtype(DType::F32)?;
        let (v_neg, v_pos) = (v.narrow(0, 0, 1)?, v.narrow(0, 1, 1)?);
        drop(((&v_neg + ((v_pos - &v_neg)? * 4.5)?)?, model_in));
        Ok(())
    })?;
    row("  CFG batch + casts + CFG combine", ms, &none, "-");
    let mut scheduler = FlowDpmSolver::new(FlowDpmSolverConfig { flow_shift: 3.0, ..FlowDpmSolverConfig::sana() }, IMAGE_STEPS)?;
    let mut i = 0;
    let v1 = v.narrow(0, 0, 1)?.to_dtype(DType::F32)?;
    let ms = time_ms(dev, 3, iters.min(IMAGE_STEPS - 4), || {
        drop(scheduler.step(&v1, i, &z)?);
        i += 1;
        Ok(())
    })?;
    row("  scheduler step (DPM-Solver++)", ms, &none, "-");
    Ok(())
}

/// Gemma-2-2B on the token counts the real tokenizer gives (the baseline's: the prompt with SANA's
/// instruction is 124 + 298 = 422 tokens, the negative 300), as the pipeline runs them: one pass,
/// the negative padded to 422. The random-weight pipeline's character-level tokenizer turns the
/// instruction into ~1,060 tokens, so the whole-image rows below encode ~3.8x the baseline's
/// tokens.
fn text_encoder_at_real_token_counts(
    device: &Device,
    dev: &CudaDevice,
    iters: usize,
    pipeline: &SanaPipeline,
    baselines: &HashMap<String, f64>,
) -> Result<()> {
    const PROMPT_TOKENS: usize = 422;
    const NEGATIVE_TOKENS: usize = 300;
    let encoder = &pipeline.text_encoder().model;
    let vocab = encoder.config().vocab_size as u32;
    let ids: Vec<u32> = (0..2 * PROMPT_TOKENS as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab).collect();
    let ids = Tensor::from_vec(ids, (2, PROMPT_TOKENS), device)?;
    let mask: Vec<u32> = (0..2 * PROMPT_TOKENS).map(|i| u32::from(i < PROMPT_TOKENS + NEGATIVE_TOKENS)).collect();
    let mask = Tensor::from_vec(mask, (2, PROMPT_TOKENS), device)?;
    let ms = time_ms(dev, 2, iters, || {
        encoder.forward(&ids, &mask)?;
        Ok(())
    })?;
    row("text encoder alone: prompt 422 + negative 300 tokens", ms, baselines, "text_encoder");
    Ok(())
}

/// `(B, L)` f32: the first [`REAL_TEXT_TOKENS`] are real, the rest padding.
fn text_mask(device: &Device) -> Result<Tensor> {
    let row: Vec<f32> = (0..TEXT_TOKENS).map(|i| if i < REAL_TEXT_TOKENS { 1.0 } else { 0.0 }).collect();
    let rows: Vec<f32> = (0..BATCH).flat_map(|_| row.iter().copied()).collect();
    Ok(Tensor::from_vec(rows, (BATCH, TEXT_TOKENS), device)?)
}

/// The parts of one block on the block's own shapes (each timed alone; the sum is close to, not
/// equal to, the block: nothing overlaps on one stream, but allocations and launches differ).
fn block_parts(
    device: &Device,
    dev: &CudaDevice,
    iters: usize,
    pipeline: &SanaPipeline,
    cfg: &SanaConfig,
    baselines: &HashMap<String, f64>,
) -> Result<()> {
    let block = &pipeline.transformer().blocks()[0];
    let c = cfg.inner_dim();
    let n = LATENT_SIDE * LATENT_SIDE / (cfg.patch_size * cfg.patch_size);
    let side = LATENT_SIDE / cfg.patch_size;
    let grid = [side, side];
    let bf16 = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?) };
    let x = bf16(Tensor::randn(0f32, 1.0, (BATCH, n, c), device)?)?;
    let temb = bf16(Tensor::randn(0f32, 0.1, (BATCH, 6 * c), device)?)?;
    let text = bf16(Tensor::randn(0f32, 1.0, (BATCH, TEXT_TOKENS, c), device)?)?;
    let mask = text_mask(device)?;
    let kv = block.cross_attention().text_kv(&text)?;

    let ms = time_ms(dev, 3, iters, || {
        block.forward_cached(&x, &temb, &kv, Some(&mask), grid)?;
        Ok(())
    })?;
    row(&format!("one block (x{} per step)", cfg.num_layers), ms, baselines, "block");

    let shift = bf16(Tensor::randn(0f32, 0.1, (BATCH, 1, c), device)?)?;
    let scale = bf16(Tensor::randn(0f32, 0.1, (BATCH, 1, c), device)?)?;
    let ms = time_ms(dev, 3, iters, || {
        norm_modulate(&x, &shift, &scale, cfg.norm_eps)?;
        Ok(())
    })?;
    row("  layer norm + modulate (x2 per block)", ms, baselines, "norm_modulate");

    let ms = time_ms(dev, 3, iters, || {
        block.self_attention().forward(&x, grid)?;
        Ok(())
    })?;
    row("  self-attention with projections", ms, baselines, "attn1");

    let heads = cfg.num_attention_heads;
    let d = cfg.attention_head_dim;
    let qkv = || -> Result<Tensor> { bf16(Tensor::randn(0f32, 1.0, (BATCH, heads, n, d), device)?) };
    let (q, k, v) = (qkv()?, qkv()?, qkv()?);
    let ms = time_ms(dev, 3, iters, || {
        attend(block.self_attention().backend(), &AttentionInput::new(&q, &k, &v).grid(Some(&grid)))?;
        Ok(())
    })?;
    row(&format!("    linear attention alone (H{heads} D{d})"), ms, baselines, "linear_attention");

    let ms = time_ms(dev, 3, iters, || {
        block.cross_attention().forward_cached(&x, &kv, Some(&mask), true)?;
        Ok(())
    })?;
    row("  cross-attention (text keys/values cached)", ms, baselines, "attn2");
    let ms = time_ms(dev, 3, iters, || {
        gated_residual(&x, &x, None, Some(&shift))?;
        Ok(())
    })?;
    row("  gated residual (x3 per block)", ms, baselines, "-");

    // The pieces, to see what the parts above are made of.
    let weight = |rows: usize, cols: usize| -> Result<Tensor> { bf16((Tensor::randn(0f32, 1.0, (rows, cols), device)? * 0.02)?) };
    let w_c = weight(c, c)?;
    let ms = time_ms(dev, 3, iters, || {
        project(&x, &w_c)?;
        Ok(())
    })?;
    row(&format!("    GEMM {}x{c}x{c}", BATCH * n), ms, baselines, "-");
    let ch = cfg.num_cross_attention_heads;
    let cd = cfg.cross_attention_head_dim;
    let cq = bf16(Tensor::randn(0f32, 1.0, (BATCH, ch, n, cd), device)?)?;
    let ck = bf16(Tensor::randn(0f32, 1.0, (BATCH, ch, TEXT_TOKENS, cd), device)?)?;
    let ms = time_ms(dev, 3, iters, || {
        attend(block.cross_attention().backend(), &AttentionInput::new(&cq, &ck, &ck).key_mask(Some(&mask)))?;
        Ok(())
    })?;
    row(&format!("    dense attention alone (H{ch} D{cd}, {TEXT_TOKENS} keys)"), ms, baselines, "-");
    let ms = time_ms(dev, 3, iters, || {
        cq.transpose(1, 2)?.contiguous()?;
        Ok(())
    })?;
    row("    merge heads (one copy of the token tensor)", ms, baselines, "-");
    let hidden = (cfg.mlp_ratio * c as f64) as usize;
    let (w_in, w_point) = (weight(2 * hidden, c)?, weight(c, hidden)?);
    let u = project(&x, &w_in)?;
    let gated = bf16(Tensor::randn(0f32, 1.0, (BATCH, n, hidden), device)?)?;
    let ms = time_ms(dev, 3, iters, || {
        project(&x, &w_in)?;
        project(&gated, &w_point)?;
        Ok(())
    })?;
    row(&format!("    Mix-FFN GEMMs alone ({c}->{}->{c})", 2 * hidden), ms, baselines, "-");
    let w_dw = Tensor::randn(0f32, 0.3, (2 * hidden, 9), device)?;
    let ms = time_ms(dev, 3, iters, || {
        crate::layers::cuda::glu_depthwise3x3_tokens(&u, grid, None, &w_dw, None)?;
        Ok(())
    })?;
    row("    depth-wise 3x3 + GLU kernel alone", ms, baselines, "-");

    let ff = GluMbConv::new(c, c, cfg.mlp_ratio, false, false, random_var_builder(7, DType::BF16, device))?;
    let ms = time_ms(dev, 3, iters, || {
        ff.forward_tokens(&x, grid)?;
        Ok(())
    })?;
    row("  Mix-FFN (GLUMBConv) on tokens", ms, baselines, "ff");
    Ok(())
}

/// The DC-AE decoder's parts at the sizes of a 1024² decode (batch 1), each timed alone (more in
/// `gen bench dcae`, with diffusers' parts beside them).
fn decoder_parts(device: &Device, dev: &CudaDevice, iters: usize) -> Result<()> {
    use crate::layers::RmsNorm;
    use crate::models::dcae::blocks::{EfficientViTBlock, ResBlock, UpBlock};
    let vb = || random_var_builder(11, DType::BF16, device);
    let image = |c: usize, side: usize| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, (1, c, side, side), device)?.to_dtype(DType::BF16)?) };
    let none = HashMap::new();
    let x = image(128, 1024)?;
    let res = ResBlock::new(128, vb())?;
    row("decoder: ResBlock 128ch at 1024² (x3)", time_ms(dev, 1, iters, || Ok(drop(res.forward(&x)?)))?, &none, "-");
    let norm = RmsNorm::new(128, 1e-5, true, true, vb())?;
    row("  RMSNorm channels-first 128ch at 1024²", time_ms(dev, 1, iters, || Ok(drop(norm.forward_channels_first(&x)?)))?, &none, "-");
    let conv = crate::layers::conv::conv2d(128, 128, 3, 1, 1, true, vb())?;
    row("  conv 3x3 128->128 at 1024²", time_ms(dev, 1, iters, || Ok(drop(crate::layers::conv::conv_forward(&conv, &x)?)))?, &none, "-");
    let x2 = image(256, 512)?;
    let up = UpBlock::new(256, 128, true, vb())?;
    row("decoder: up 256->128, 512² -> 1024²", time_ms(dev, 1, iters, || Ok(drop(up.forward(&x2)?)))?, &none, "-");
    let res2 = ResBlock::new(256, vb())?;
    row("decoder: ResBlock 256ch at 512² (x3)", time_ms(dev, 1, iters, || Ok(drop(res2.forward(&x2)?)))?, &none, "-");
    let x3 = image(512, 128)?;
    let evit = EfficientViTBlock::new(512, 32, &[5], vb())?;
    row("decoder: EfficientViT 512ch at 128² (x3)", time_ms(dev, 1, iters, || Ok(drop(evit.forward(&x3)?)))?, &none, "-");
    let x4 = image(1024, 64)?;
    let evit4 = EfficientViTBlock::new(1024, 32, &[5], vb())?;
    row("decoder: EfficientViT 1024ch at 64² (x3)", time_ms(dev, 1, iters, || Ok(drop(evit4.forward(&x4)?)))?, &none, "-");
    Ok(())
}

/// A whole 20-step image, timed twice (the first run pays for one-time set-up), with each stage's
/// time taken at the progress reports (the stream is synchronized there).
fn whole_image(device: &Device, pipeline: &SanaPipeline, baselines: &HashMap<String, f64>, how: &str) -> Result<()> {
    let request = ImageRequest::new("a cat sitting on a windowsill at sunset, detailed photograph")
        .size(LATENT_SIDE * 32, LATENT_SIDE * 32)
        .steps(IMAGE_STEPS)
        .cfg(4.5)
        .seed(0);
    let mut last = (0.0, 0.0, 0.0, 0.0);
    for _ in 0..2 {
        let start = Instant::now();
        let mut marks: Vec<(Stage, usize, f64)> = Vec::new();
        let mut progress = |p: Progress| {
            // A failed synchronize shows up again at the next tensor op.
            let _ = device.synchronize();
            marks.push((p.stage, p.step, start.elapsed().as_secs_f64() * 1e3));
            Flow::Continue
        };
        pipeline.generate(&request, &mut progress)?;
        device.synchronize()?;
        let total = start.elapsed().as_secs_f64() * 1e3;
        let at = |stage: Stage, first: bool| -> Result<f64> {
            let mut hits = marks.iter().filter(|m| m.0 == stage);
            let hit = if first { hits.next() } else { hits.last() };
            hit.map(|m| m.2).ok_or_else(|| Error::Other(format!("no {stage:?} progress report")))
        };
        let encode = at(Stage::Denoise, true)?;
        let denoise = at(Stage::Denoise, false)? - encode;
        let decode = total - at(Stage::Denoise, false)?;
        last = (total, encode, denoise, decode);
    }
    let (total, encode, denoise, decode) = last;
    row(&format!("whole image, {IMAGE_STEPS} steps, {how} (second run)"), total, baselines, "image");
    row("  text encoder (Gemma-2-2B, prompt + negative; ~3.8x the tokens, see above)", encode, baselines, "text_encoder");
    row(&format!("  denoise ({IMAGE_STEPS} CFG steps + scheduler)"), denoise, baselines, "denoise");
    row("  decode (DC-AE f32c32, 1024²) + to 8-bit", decode, baselines, "decode");
    Ok(())
}
