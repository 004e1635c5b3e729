//! CUDA graph replay of the SANA step (src/models/sana/graph.rs, src/cuda_graph.rs) on the GPU.
//!
//! The reference is the eager step, `SanaTransformer::forward_with_text` on the same inputs: a
//! replay runs the same kernels with the same arguments, so it must equal the eager step bit for
//! bit. The shapes are small enough that every kernel is deterministic (linear attention's state
//! has one block per head: <= 64 tokens), so eager equals eager too, which the tests check first.
//! Each replay gets fresh latents, timesteps and (between calls) another prompt: a graph that
//! read stale inputs, or the text it was captured with, would differ from the eager step.
//!
//! Run on the H200: `cargo test --release --features cuda --test cuda_graph`.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use visgen::attention::plan::AttentionPlan;
use visgen::models::sana::{SanaTransformer, StepGraphs, TextContext};
use visgen::pipelines::sana::SanaPipeline;
use visgen::pipelines::{DeviceChoice, Flow, ImageRequest, LoadOptions, Pipeline};
use visgen::weights::random::random_var_builder;

fn gpu() -> Device {
    let device = Device::new_cuda(0).expect("a CUDA device");
    // As the pipelines and `gen bench` open it: one stream, no per-allocation events.
    visgen::cuda_graph::prepare_device(device.as_cuda_device().unwrap());
    device
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

fn assert_same_bits(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (bits(a), bits(b));
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{what}: {differ} of {} values differ", a.len());
}

/// The small SANA of tests/common (head dims 32 and 64: both attention kernels run), with or
/// without SANA-Sprint's guidance embedding.
fn small_model(dev: &Device, guidance_embeds: bool) -> SanaTransformer {
    let cfg = common::small_sana_config(guidance_embeds);
    let plan = AttentionPlan::from_spec(&visgen::spec::find_spec("tiny-random").unwrap().attention).unwrap();
    SanaTransformer::new(&cfg, &plan, random_var_builder(3, DType::BF16, dev)).unwrap()
}

fn text_context(model: &SanaTransformer, dev: &Device, b: usize, len: usize, real: usize) -> TextContext {
    let c = model.config().caption_channels;
    let text = Tensor::randn(0f32, 1.0, (b, len, c), dev).unwrap().to_dtype(DType::BF16).unwrap();
    let row: Vec<f32> = (0..len).map(|i| if i < real { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(row.repeat(b), (b, len), dev).unwrap();
    model.text_context(&text, &mask).unwrap()
}

fn inputs(model: &SanaTransformer, dev: &Device, b: usize, (h, w): (usize, usize), seed: f32) -> (Tensor, Tensor) {
    let c = model.config().in_channels;
    let latents = Tensor::randn(0f32, 1.0, (b, c, h, w), dev).unwrap().to_dtype(DType::BF16).unwrap();
    let t: Vec<f32> = (0..b).map(|i| (seed * 97.0 + i as f32 * 131.0) % 1000.0).collect();
    (latents, Tensor::from_vec(t, b, dev).unwrap())
}

/// Several steps of each of two shapes (batch, latent size and text length all change), back to
/// the first shape (recaptured), and a prompt change between replays of one shape.
fn replay_matches_eager(guidance_embeds: bool) {
    let dev = gpu();
    let model = small_model(&dev, guidance_embeds);
    let mut graphs = StepGraphs::new(true);
    let shapes = [(2usize, (8usize, 8usize), 7usize, 4usize), (1, (4, 8), 5, 5), (2, (8, 8), 7, 4)];
    let mut step = 0f32;
    for (round, &(b, hw, len, real)) in shapes.iter().enumerate() {
        let prompts = [text_context(&model, &dev, b, len, real), text_context(&model, &dev, b, len, real)];
        for call in 0..5 {
            step += 1.0;
            let text = &prompts[usize::from(call >= 3)];
            let (latents, timestep) = inputs(&model, &dev, b, hw, step);
            let guidance = guidance_embeds.then(|| Tensor::from_vec(vec![step * 0.37; b], b, &dev).unwrap());
            let eager = model.forward_with_text(&latents, &timestep, text, guidance.as_ref()).unwrap();
            let eager_again = model.forward_with_text(&latents, &timestep, text, guidance.as_ref()).unwrap();
            assert_same_bits("eager vs eager (the kernels must be deterministic here)", &eager, &eager_again);
            let replayed = graphs.forward(&model, &latents, &timestep, text, guidance.as_ref()).unwrap();
            if let Some(reason) = graphs.take_fallback_reason() {
                panic!("the capture failed: {reason}");
            }
            let what = format!("guidance {guidance_embeds}, shape {round} B{b} {hw:?} L{len}, call {call}");
            assert_same_bits(&what, &replayed, &eager);
            println!("{what}: replay == eager ({} values)", replayed.elem_count());
        }
        assert_eq!(graphs.captures(), round + 1, "one capture per new shape");
    }
    println!("captures needed relaxed mode: {}", graphs.relaxed());
}

#[test]
fn graph_replay_equals_eager_step() {
    replay_matches_eager(false);
}

#[test]
fn graph_replay_equals_eager_step_with_guidance_embedding() {
    replay_matches_eager(true);
}

/// A replay's output belongs to the caller: the next replay does not overwrite it.
#[test]
fn replay_outputs_are_not_overwritten() {
    let dev = gpu();
    let model = small_model(&dev, false);
    let text = text_context(&model, &dev, 2, 7, 4);
    let mut graphs = StepGraphs::new(true);
    let mut kept = Vec::new();
    for step in 0..4 {
        let (latents, timestep) = inputs(&model, &dev, 2, (8, 8), step as f32);
        let eager = model.forward_with_text(&latents, &timestep, &text, None).unwrap();
        kept.push((graphs.forward(&model, &latents, &timestep, &text, None).unwrap(), eager));
    }
    for (i, (replayed, eager)) in kept.iter().enumerate() {
        assert_same_bits(&format!("kept output {i}"), replayed, eager);
    }
}

fn tiny_pipeline(graphs: bool) -> Box<SanaPipeline> {
    let spec = visgen::spec::find_spec("tiny-random").unwrap();
    let options = LoadOptions { device: DeviceChoice::Cuda(0), dtype: Some(DType::BF16), attention: Vec::new() };
    match Pipeline::from_spec(spec, &options).unwrap() {
        Pipeline::Sana(mut p) => {
            p.set_cuda_graphs(graphs);
            p
        }
        _ => panic!("tiny-random is a SANA spec"),
    }
}

/// The whole pipeline (flow DPM-Solver++ with CFG) with and without graphs: identical latents and
/// pixels, over two images with different prompts and seeds (the second replays the first's graph
/// with the new text copied in).
#[test]
fn pipeline_with_and_without_graphs_makes_identical_images() {
    let with = tiny_pipeline(true);
    let without = tiny_pipeline(false);
    assert!(with.cuda_graphs() && !without.cuda_graphs());
    let dev = match DeviceChoice::Cuda(0).open().unwrap() {
        d @ Device::Cuda(_) => d,
        _ => unreachable!(),
    };
    for (seed, prompt) in [(1u64, "a red fox"), (2, "a blue boat on a lake")] {
        let request = ImageRequest::new(prompt).size(64, 64).steps(4).cfg(4.5).seed(seed);
        let (c, h, w) = with.latent_shape(64, 64);
        let noise = Tensor::randn(0f32, 1.0, (1, c, h, w), &dev).unwrap();
        let a = with.generate_from_latents(&request, noise.clone(), &mut |_| Flow::Continue).unwrap();
        let b = without.generate_from_latents(&request, noise, &mut |_| Flow::Continue).unwrap();
        assert_same_bits(&format!("latents, {prompt:?}"), &a.latents, &b.latents);
        assert_same_bits(&format!("pixels, {prompt:?}"), &a.pixels, &b.pixels);
    }
    assert_eq!(with.cuda_graph_captures(), 1, "one capture serves both images");
    assert_eq!(without.cuda_graph_captures(), 0);
}
