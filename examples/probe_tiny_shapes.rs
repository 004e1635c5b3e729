//! Denoising probe for a tiny-shapes checkpoint: noises held-out data pictures to a few times t,
//! asks the model for x0, prints the v-loss (the training objective) and the x0 error per t, and
//! writes the predictions as one PNG grid (rows: clean picture, then x0 at each t). Also checks
//! that the training forward (weights as Vars) computes what inference computes.
//!
//! ```text
//! cargo run --release --example probe_tiny_shapes -- --weights assets/tiny-shapes --out /tmp/probe.png
//! ```
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use visgen::attention::plan::AttentionPlan;
use visgen::attention::{Backend, DenseParams, LinearParams};
use visgen::data::shapes::{caption, render, scene_at, GenConfig};
use visgen::models::tiny_shapes::TinyShapesModel;
use visgen::pipelines::tiny_shapes::{seeded_noise, Sampling, TinyShapesPipeline};

fn main() -> Result<()> {
    let mut weights = PathBuf::from("assets/tiny-shapes");
    let mut out = PathBuf::from("probe.png");
    let mut n = 8usize;
    let mut seed = 987_654u64;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [flag, value] = pair else { bail!("options come as --flag value pairs") };
        match flag.as_str() {
            "--weights" => weights = PathBuf::from(value),
            "--out" => out = PathBuf::from(value),
            "--n" => n = value.parse()?,
            "--seed" => seed = value.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    let device = Device::Cpu;
    let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()));
    let pipe = TinyShapesPipeline::from_dir(&weights, &plan, &device, Sampling::default())?;
    let size = pipe.image_size();
    let config = GenConfig::default();
    let scenes: Vec<_> = (0..n as u64).map(|i| scene_at(seed, i, &config)).collect();
    let captions: Vec<String> = scenes.iter().map(caption).collect();
    let mut pixels = Vec::new();
    for s in &scenes {
        let img = render(s, size as u32);
        for c in 0..3 {
            pixels.extend(img.as_raw().chunks_exact(3).map(|p| p[c] as f32 / 127.5 - 1.0));
        }
    }
    let x0 = Tensor::from_vec(pixels, (n, 3, size, size), &device)?;
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let tokens = pipe.tokenizer().encode_batch(&refs)?;
    let ids = Tensor::from_vec(tokens.ids, (n, tokens.len), &device)?;
    let mask = Tensor::from_vec(tokens.mask, (n, tokens.len), &device)?;
    let text = pipe.model().encode_text(&ids, &mask)?;
    let noise = Tensor::cat(&(0..n as u64).map(|i| seeded_noise(1000 + i, size, &device)).collect::<visgen::error::Result<Vec<_>>>()?, 0)?;
    let mut rows = vec![x0.clone()];
    for &t in &[0.1f64, 0.3, 0.5, 0.7, 0.9] {
        let x_t = ((&x0 * (1.0 - t))? + (&noise * t)?)?;
        let t_in = Tensor::full(t as f32, n, &device)?;
        let v = pipe.model().velocity(&x_t, &t_in, &text, &mask)?.to_dtype(DType::F32)?;
        let target = (&noise - &x0)?;
        let v_loss = (&v - &target)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        let x0_pred = (&x_t - (&v * t)?)?;
        let x0_err = (&x0_pred - &x0)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        println!("t {t:.1}: v-loss {v_loss:.4}, x0 mse {x0_err:.4}");
        rows.push(x0_pred);
    }
    // The training forward against the inference forward on the same inputs: the model built
    // from Vars first and the checkpoint then written into them, as an optimizer does.
    {
        let varmap = candle_nn::VarMap::new();
        let cfg = pipe.model().config().clone();
        let tracked = TinyShapesModel::new(&cfg, &plan, candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
        let saved = candle_core::safetensors::load(weights.join("model.safetensors"), &device)?;
        for (name, var) in varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?.iter() {
            let value = saved.get(name).ok_or_else(|| anyhow::anyhow!("{name} missing from the checkpoint"))?;
            var.set(&value.to_dtype(DType::F32)?)?;
        }
        let t = 0.5;
        let x_t = ((&x0 * (1.0 - t))? + (&noise * t)?)?;
        let t_in = Tensor::full(t as f32, n, &device)?;
        let v_training = visgen::attention::with_reference_only(|| tracked.velocity(&x_t, &t_in, &tracked.encode_text(&ids, &mask)?, &mask))?;
        let v_inference = pipe.model().velocity(&x_t, &t_in, &text, &mask)?;
        let diff = (&v_training - &v_inference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("training forward vs inference forward at t 0.5: velocity max diff {diff:.3e}");
    }
    for (i, c) in captions.iter().enumerate() {
        println!("{i}: {c}");
    }
    // Grid: one column per picture, one row per t.
    let mut grid = RgbImage::new((n * size) as u32, (rows.len() * size) as u32);
    for (r, row) in rows.iter().enumerate() {
        for (i, img) in visgen::pipelines::sana::to_images(row)?.iter().enumerate() {
            image::imageops::replace(&mut grid, img, (i * size) as i64, (r * size) as i64);
        }
    }
    grid.save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
