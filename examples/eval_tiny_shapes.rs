//! Times, looks at and scores a tiny-shapes weights folder on the CPU.
//!
//! ```text
//! cargo run --release --example eval_tiny_shapes -- [--weights DIR] [--n 200] [--seed 0]
//!     [--steps 16] [--cfg 4] [--shift 1] [--time 5] [--png DIR] [--prompt "a red circle"]
//!     [--device cpu|cuda] [--batch B (benchmark B pictures at a time)]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use visgen::attention::plan::AttentionPlan;
use visgen::attention::{Backend, DenseParams, LinearParams};
use visgen::pipelines::request::Flow;
use visgen::pipelines::tiny_shapes::{evaluate_shapes, generate_benchmark, Sampling, TinyShapesPipeline};

fn main() -> Result<()> {
    let mut weights = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-shapes"));
    let (mut n, mut seed, mut time_runs) = (0usize, 0u64, 0usize);
    let mut sampling = Sampling::default();
    let mut png: Option<PathBuf> = None;
    let mut prompt = "a red circle above a blue square".to_string();
    let mut singles = 0usize;
    let mut device = Device::Cpu;
    let mut batch = 0usize;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).with_context(|| format!("{} needs a value", pair[0]))?;
        match pair[0].as_str() {
            "--weights" => weights = PathBuf::from(value),
            "--n" => n = value.parse()?,
            "--seed" => seed = value.parse()?,
            "--steps" => sampling.steps = value.parse()?,
            "--cfg" => sampling.cfg = value.parse()?,
            "--shift" => sampling.shift = value.parse()?,
            "--time" => time_runs = value.parse()?,
            "--png" => png = Some(PathBuf::from(value)),
            "--prompt" => prompt = value.clone(),
            "--singles" => singles = value.parse()?,
            "--batch" => batch = value.parse()?,
            "--device" => {
                device = match value.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::new_cuda(0)?,
                    other => bail!("--device {other}: cpu or cuda"),
                }
            }
            other => bail!("unknown option {other}"),
        }
    }
    let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()));
    let pipeline = TinyShapesPipeline::from_dir(&weights, &plan, &device, sampling)?;
    if singles > 0 {
        // All 18 color x shape single-object prompts, `singles` seeds each.
        let mut passed = 0;
        let mut total = 0;
        for color in visgen::data::shapes::Color::ALL {
            for shape in visgen::data::shapes::Shape::ALL {
                let text = format!("a {} {}", color.word(), shape.word());
                let parsed = visgen::data::shapes::parse_prompt(&text)?;
                for s in 0..singles {
                    let image = pipeline.generate_one(&text, "", seed + s as u64, sampling, &mut |_| Flow::Continue)?;
                    passed += visgen::eval::shapes::check_image(&image, &parsed).passed as usize;
                    total += 1;
                }
            }
        }
        println!("single objects {sampling:?}: {passed}/{total} passed");
    }
    if time_runs > 0 {
        let mut times = Vec::new();
        for i in 0..time_runs {
            let start = Instant::now();
            pipeline.generate_one(&prompt, "", i as u64, sampling, &mut |_| Flow::Continue)?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!("{} runs of `{prompt}`: median {:.3}s (min {:.3}s, max {:.3}s)", time_runs, times[time_runs / 2], times[0], times[time_runs - 1]);
    }
    if let Some(dir) = &png {
        std::fs::create_dir_all(dir)?;
        let (prompts, images) = generate_benchmark(&pipeline, n.max(8), seed, sampling, &mut |_, _| {})?;
        for (i, ((text, _), image)) in prompts.iter().zip(&images).enumerate() {
            image.save(dir.join(format!("{i:03}_{}.png", text.replace(' ', "_"))))?;
        }
        println!("wrote {} pictures to {}", images.len(), dir.display());
    }
    if n > 0 && png.is_none() && batch > 0 {
        // The benchmark's prompts and seeds, generated `batch` at a time (fast on the GPU).
        let start = Instant::now();
        let prompts = visgen::data::shapes::prompt_set(seed, n);
        let mut images = Vec::with_capacity(n);
        for (c, chunk) in prompts.chunks(batch).enumerate() {
            let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
            let seeds: Vec<u64> = (0..chunk.len()).map(|i| seed.wrapping_add((c * batch + i) as u64)).collect();
            images.extend(pipeline.generate_many(&texts, &seeds, sampling)?);
        }
        let report = visgen::eval::shapes_report::evaluate_images(&prompts, &images)?;
        println!("shapes benchmark (batched {batch}), n = {n}, seed {seed}, {sampling:?} ({:.1}s):\n{report}", start.elapsed().as_secs_f64());
        return Ok(());
    }
    if n > 0 && png.is_none() {
        let start = Instant::now();
        let report = evaluate_shapes(&pipeline, n, seed, sampling)?;
        println!("shapes benchmark, n = {n}, seed {seed}, {sampling:?} ({:.0}s):\n{report}", start.elapsed().as_secs_f64());
    }
    Ok(())
}
