//! tiny-shapes, the embedded default model: the shipped weights load through the pipeline spec, a
//! seed fixes the picture, the tokenizer refuses words outside the shapes vocabulary, and the
//! model draws single objects that the independent shapes scorer (`eval::shapes`) accepts.

use std::sync::OnceLock;

use visgen::data::shapes::{parse_prompt, token_ids, Prompt, VOCABULARY};
use visgen::eval::shapes::check_image;
use visgen::models::tiny_shapes::tokenizer::{tokenizer_json, SPECIAL_TOKENS};
use visgen::models::tiny_shapes::ShapesTokenizer;
use visgen::pipelines::request::{Flow, ImageRequest, LoadOptions};
use visgen::pipelines::tiny_shapes::{time_grid, Sampling, TinyShapesPipeline};
use visgen::Error;

fn pipeline() -> &'static TinyShapesPipeline {
    static PIPELINE: OnceLock<TinyShapesPipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let spec = visgen::spec::find_spec("tiny-shapes").expect("pipelines/tiny-shapes.toml parses");
        assert_eq!(spec.family, "tiny-shapes");
        TinyShapesPipeline::load(&spec, &LoadOptions::default()).expect("the shipped weights load")
    })
}

#[test]
fn shipped_weights_load_and_a_seed_fixes_the_picture() {
    let p = pipeline();
    let request = ImageRequest::new("a red circle above a blue square").seed(7).steps(6);
    let a = p.generate(&request, &mut |_| Flow::Continue).unwrap();
    let b = p.generate(&request, &mut |_| Flow::Continue).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].width(), a[0].height()), (64, 64));
    assert_eq!(a[0].as_raw(), b[0].as_raw(), "same seed, same bytes");

    let c = p.generate(&request.clone().seed(8), &mut |_| Flow::Continue).unwrap();
    let differing = a[0].as_raw().iter().zip(c[0].as_raw()).filter(|(x, y)| x != y).count();
    assert!(differing > 100, "another seed must give another picture ({differing} bytes differ)");

    // Not a flat or saturated picture: the background is dark and something bright is drawn.
    let bright = a[0].pixels().filter(|p| p.0.iter().any(|&v| v > 128)).count();
    let dark = a[0].pixels().filter(|p| p.0.iter().all(|&v| v < 60)).count();
    assert!(bright > 20 && dark > 64 * 64 / 2, "bright {bright}, dark {dark}");
}

#[test]
fn cancelling_from_the_progress_callback_stops_generation() {
    let request = ImageRequest::new("a red circle").steps(4);
    let mut calls = 0;
    let result = pipeline().generate(&request, &mut |_| {
        calls += 1;
        if calls == 3 { Flow::Cancel } else { Flow::Continue }
    });
    assert!(matches!(result, Err(Error::Cancelled)));
}

#[test]
fn tokenizer_rejects_unknown_words_listing_the_vocabulary() {
    let tokenizer = pipeline().tokenizer();
    let err = tokenizer.encode("a red elephant").unwrap_err();
    assert_eq!(err.exit_code(), 2, "a usage error");
    let text = err.to_string();
    assert!(text.contains("elephant"), "{text}");
    for word in VOCABULARY {
        assert!(text.contains(word), "the message lists `{word}`: {text}");
    }
    // The special tokens are not words a user may type.
    assert!(tokenizer.encode("a [bos] circle").is_err());
    assert!(tokenizer.encode("a [unk]").is_err());
    // The whole CLI path refuses it too.
    let request = ImageRequest::new("a red elephant");
    assert_eq!(pipeline().generate(&request, &mut |_| Flow::Continue).unwrap_err().exit_code(), 2);
}

#[test]
fn tokenizer_numbers_words_as_the_vocabulary_does() {
    // The shipped tokenizer.json is the one built from the vocabulary, and its ids are the caption
    // grammar's word indices shifted past the special tokens, after a leading [bos].
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-shapes/tokenizer.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&shipped).unwrap();
    let built: serde_json::Value = serde_json::from_str(&tokenizer_json()).unwrap();
    assert_eq!(parsed["model"]["vocab"], built["model"]["vocab"]);

    let tokenizer = ShapesTokenizer::from_vocabulary(20).unwrap();
    let text = "A small Red square on the left of a large blue circle.";
    let ids = tokenizer.encode(text).unwrap();
    let mut expected = vec![2u32];
    expected.extend(token_ids(text).unwrap().iter().map(|i| i + SPECIAL_TOKENS.len() as u32));
    assert_eq!(ids, expected);
    assert_eq!(tokenizer.encode("").unwrap(), vec![2], "the empty caption is [bos] alone");

    let batch = tokenizer.encode_batch(&["a red circle", ""]).unwrap();
    assert_eq!((batch.batch, batch.len), (2, 20));
    assert_eq!(&batch.mask[..4], &[1.0, 1.0, 1.0, 1.0]);
    assert_eq!(batch.mask[4], 0.0);
    assert_eq!(&batch.mask[20..22], &[1.0, 0.0]);

    let too_long = vec!["red"; 20].join(" ");
    assert!(tokenizer.encode(&too_long).is_err());
}

#[test]
fn time_grid_runs_from_noise_to_the_picture() {
    let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    assert!(close(&time_grid(4, 1.0), &[1.0, 0.75, 0.5, 0.25, 0.0]));
    // shift 3 at t = 0.5: 1.5 / 2 = 0.75; at t = 0.25: 0.75 / 1.5 = 0.5; at 0.75: 2.25 / 3 = 0.75... by hand:
    assert!(close(&time_grid(4, 3.0), &[1.0, 2.25 / 2.5, 1.5 / 2.0, 0.75 / 1.5, 0.0]));
}

/// Single-object prompts with fixed seeds, scored by the independent shapes scorer. The shipped
/// model (sample prediction, 4,588 training steps) drew the asked color and passed the full check
/// (the asked color, shape and size) in 8 of 8 pictures when measured; the bars allow one miss.
/// Untrained or broken weights score 0 on both, the weights shipped before the attention fix 7
/// and 3.
#[test]
fn model_draws_single_objects_the_scorer_accepts() {
    let prompts = [
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow circle",
        "a purple square",
        "a white triangle",
        "a large red square",
        "a small blue circle",
    ];
    let p = pipeline();
    let (mut passed, mut colored) = (0, 0);
    let mut report = Vec::new();
    for (i, text) in prompts.iter().enumerate() {
        let image = p.generate_one(text, "", 1000 + i as u64, Sampling::default(), &mut |_| Flow::Continue).unwrap();
        let prompt = parse_prompt(text).unwrap();
        let wanted = match &prompt {
            Prompt::Objects(specs) => specs[0].color,
            _ => unreachable!("single-object prompts"),
        };
        let verdict = check_image(&image, &prompt);
        let has_color = verdict.blobs.iter().any(|b| Some(b.color) == wanted);
        passed += verdict.passed as usize;
        colored += has_color as usize;
        report.push(format!("{text}: passed {} color {has_color} ({})", verdict.passed, verdict.checks[0].detail));
    }
    println!("{report:#?}");
    assert!(colored >= COLOR_BAR, "{colored}/8 pictures hold the asked color: {report:#?}");
    assert!(passed >= FULL_BAR, "{passed}/8 single objects passed: {report:#?}");
}

const COLOR_BAR: usize = 7;
const FULL_BAR: usize = 7;

/// Training takes the patch projection as a GEMM on cut-out patches (candle's convolution backward
/// is slow on the GPU); it must be the same function as the stride-p convolution inference uses,
/// checked against an independent per-output sum.
#[test]
fn patch_embed_training_form_matches_the_convolution() {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarBuilder;
    use std::collections::HashMap;
    use visgen::layers::PatchEmbed;

    let (b, c, side, p, embed) = (2, 3, 8, 4, 8);
    let dev = Device::Cpu;
    let values = |n: usize, k: u64| -> Vec<f32> { (0..n as u64).map(|i| ((i * 7919 + k * 104729) % 997) as f32 / 498.5 - 1.0).collect() };
    let weight = Tensor::from_vec(values(embed * c * p * p, 1), (embed, c, p, p), &dev).unwrap();
    let bias = Tensor::from_vec(values(embed, 2), embed, &dev).unwrap();
    let x = Tensor::from_vec(values(b * c * side * side, 3), (b, c, side, side), &dev).unwrap();
    let build = |w: Tensor, bs: Tensor| {
        let tensors = HashMap::from([("proj.weight".to_string(), w), ("proj.bias".to_string(), bs)]);
        PatchEmbed::new(c, embed, p, side, None, VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap()
    };
    let conv = build(weight.clone(), bias.clone()).forward(&x).unwrap();
    // Vars record gradients: the training form.
    let (wv, bv) = (Var::from_tensor(&weight).unwrap(), Var::from_tensor(&bias).unwrap());
    let trained = build(wv.as_tensor().clone(), bv.as_tensor().clone()).forward(&x).unwrap();
    assert_eq!(conv.dims(), &[b, (side / p) * (side / p), embed]);
    assert_eq!(trained.dims(), conv.dims());

    // Independent sum: token (gy, gx), channel o = bias[o] + Σ_{ci, dy, dx} w[o, ci, dy, dx] x[ci, gy·p+dy, gx·p+dx].
    let (w, bs, xs) = (values(embed * c * p * p, 1), values(embed, 2), values(b * c * side * side, 3));
    let g = side / p;
    let conv_v: Vec<f32> = conv.flatten_all().unwrap().to_vec1().unwrap();
    let trained_v: Vec<f32> = trained.flatten_all().unwrap().to_vec1().unwrap();
    for bi in 0..b {
        for gy in 0..g {
            for gx in 0..g {
                for o in 0..embed {
                    let mut sum = bs[o];
                    for ci in 0..c {
                        for dy in 0..p {
                            for dx in 0..p {
                                sum += w[((o * c + ci) * p + dy) * p + dx] * xs[((bi * c + ci) * side + gy * p + dy) * side + gx * p + dx];
                            }
                        }
                    }
                    let at = ((bi * g + gy) * g + gx) * embed + o;
                    assert!((conv_v[at] - sum).abs() < 1e-4, "conv {} vs {sum}", conv_v[at]);
                    assert!((trained_v[at] - sum).abs() < 1e-4, "training form {} vs {sum}", trained_v[at]);
                }
            }
        }
    }
}

/// Mix-FFN's channels-last training path (taken while gradients are recorded) computes the same
/// function as the image-layout path inference uses (tap-form depth-wise convolution), and every
/// weight gets a gradient through it.
#[test]
fn mix_ffn_training_path_matches_the_image_path() {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarBuilder;
    use std::collections::HashMap;
    use visgen::layers::GluMbConv;

    let (b, c, grid, ratio) = (2, 8, [3usize, 5usize], 2.0);
    let hidden = (ratio * c as f64) as usize;
    let dev = Device::Cpu;
    let values = |n: usize, k: u64| -> Vec<f32> { (0..n as u64).map(|i| ((i * 7919 + k * 104729) % 997) as f32 / 498.5 - 1.0).collect() };
    let shapes: [(&str, Vec<usize>); 5] = [
        ("conv_inverted.weight", vec![2 * hidden, c, 1, 1]),
        ("conv_inverted.bias", vec![2 * hidden]),
        ("conv_depth.weight", vec![2 * hidden, 1, 3, 3]),
        ("conv_depth.bias", vec![2 * hidden]),
        ("conv_point.weight", vec![c, hidden, 1, 1]),
    ];
    let plain: HashMap<String, Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            (name.to_string(), (Tensor::from_vec(values(n, i as u64 + 1), shape.as_slice(), &dev).unwrap() * 0.5).unwrap())
        })
        .collect();
    let vars: HashMap<String, Var> = plain.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
    let x = Tensor::from_vec(values(b * grid[0] * grid[1] * c, 9), (b, grid[0] * grid[1], c), &dev).unwrap();

    let inference = GluMbConv::new(c, c, ratio, false, false, VarBuilder::from_tensors(plain, DType::F32, &dev)).unwrap();
    let tracked: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let training = GluMbConv::new(c, c, ratio, false, false, VarBuilder::from_tensors(tracked, DType::F32, &dev)).unwrap();
    let want = inference.forward_tokens(&x, grid).unwrap();
    let got = training.forward_tokens(&x, grid).unwrap();
    assert_eq!(got.dims(), want.dims());
    let diff: f32 = (&got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    let scale: f32 = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(scale > 0.1 && diff < 1e-4 * scale, "max diff {diff} (outputs up to {scale})");

    let grads = got.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reaches {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
}

/// A sample-predicting model hands the sampler `v = (x_t - x0) / max(t, 0.05)` where `x0` is the
/// transformer's output: checked against the same weights read as a velocity model, whose
/// `velocity` is that raw output. Two times, one under the clamp.
#[test]
fn sample_prediction_turns_the_output_into_a_velocity() {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use visgen::attention::plan::AttentionPlan;
    use visgen::attention::{Backend, DenseParams, LinearParams};
    use visgen::models::tiny_shapes::config::{Prediction, SAMPLE_PREDICTION_MIN_T};
    use visgen::models::tiny_shapes::{TinyShapesConfig, TinyShapesModel};

    let dev = Device::Cpu;
    let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()));
    let mut cfg = TinyShapesConfig::tiny_test();
    let varmap = VarMap::new();
    TinyShapesModel::new(&cfg, &plan, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    // Every weight random (a plain `get` is 0 in a VarMap, which would make the output trivial).
    for (i, (_, var)) in varmap.data().lock().unwrap().iter().enumerate() {
        let t = var.as_tensor();
        let noise = Tensor::randn(0f32, 0.2, t.shape(), &dev).unwrap();
        var.set(&(noise + (i % 3) as f64 * 0.1).unwrap()).unwrap();
    }
    let velocity_model = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    cfg.prediction = Prediction::Sample;
    let sample_model = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();

    let x_t = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev).unwrap();
    let t = Tensor::new(&[0.7f32, 0.01], &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 0], [1, 7, 0, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 1., 0.], [1., 1., 0., 0.]], &dev).unwrap();
    let text = velocity_model.encode_text(&ids, &mask).unwrap();
    let x0 = velocity_model.velocity(&x_t, &t, &text, &mask).unwrap();
    let v = sample_model.velocity(&x_t, &t, &text, &mask).unwrap();
    assert!(x0.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3, "random weights give a non-trivial output");
    for (b, t) in [(0, 0.7), (1, SAMPLE_PREDICTION_MIN_T)] {
        let expected = ((x_t.get(b).unwrap() - x0.get(b).unwrap()).unwrap() / t).unwrap();
        let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (v.get(b).unwrap() - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Relative: dividing by t = 0.05 makes the values large, and f32 rounds them.
        assert!(diff <= 1e-5 * scale, "item {b}: v differs from (x_t - x0) / {t} by {diff} (largest |v| {scale})");
    }
}

/// The whole model computes the same velocity while training (weights as Vars updated in place
/// after the model was built; every op records its graph, and the training-only forms run: patch
/// embed as a GEMM, channels-last Mix-FFN, the modulation and residual ops with their own
/// backward) as at inference (plain tensors). A difference here means the sampler uses another
/// function than the one trained: the fused q/k/v copy made at load time once froze attention at
/// its initial weights in every training run while the saved weights moved.
#[test]
fn training_forward_matches_inference_forward() {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use std::collections::HashMap;
    use visgen::attention::plan::AttentionPlan;
    use visgen::attention::{Backend, DenseParams, LinearParams};
    use visgen::models::tiny_shapes::{TinyShapesConfig, TinyShapesModel};

    let dev = Device::Cpu;
    let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()));
    let cfg = TinyShapesConfig::tiny_test();
    let varmap = VarMap::new();
    // Built first, then every Var changed in place, as an optimizer step does: the forward pass
    // must see the new values (a copy made at load time, like a fused q/k/v weight, would not).
    let training = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    for (i, (_, var)) in varmap.data().lock().unwrap().iter().enumerate() {
        let t = var.as_tensor();
        let noise = Tensor::randn(0f32, 0.2, t.shape(), &dev).unwrap();
        var.set(&(noise + (i % 3) as f64 * 0.1).unwrap()).unwrap();
    }
    let detached: HashMap<String, Tensor> =
        varmap.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    let inference = TinyShapesModel::new(&cfg, &plan, VarBuilder::from_tensors(detached, DType::F32, &dev)).unwrap();

    let size = cfg.image_size;
    let x_t = Tensor::randn(0f32, 1.0, (2, 3, size, size), &dev).unwrap();
    let t = Tensor::new(&[0.7f32, 0.3], &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 0], [1, 7, 0, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 1., 0.], [1., 1., 0., 0.]], &dev).unwrap();
    let text = inference.encode_text(&ids, &mask).unwrap();
    let want = inference.velocity(&x_t, &t, &text, &mask).unwrap();
    let text_tracked = training.encode_text(&ids, &mask).unwrap();
    let got = visgen::attention::with_reference_only(|| training.velocity(&x_t, &t, &text_tracked, &mask)).unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(scale > 1e-2 && diff <= 1e-4 * scale, "training forward differs by {diff} (outputs up to {scale})");
}
