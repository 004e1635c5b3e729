//! SANA transformer parity with diffusers 0.42.1 on tiny random configs (goldens from
//! tests/goldens/make_sana_goldens.py), in f32 on the CPU.

mod common;
use common::{assert_close, compare, KeyRecorder};
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use visgen::attention::plan::AttentionPlan;
use visgen::attention::{Backend, DenseParams, LinearParams};
use visgen::models::sana::{QkNorm, SanaConfig, SanaTransformer};

struct Golden {
    tensors: HashMap<String, Tensor>,
    config: SanaConfig,
}

fn golden(name: &str) -> Golden {
    let file = common::golden_file(&format!("sana_{name}.safetensors"));
    Golden { config: SanaConfig::from_diffusers_json(&file.config_json).unwrap(), tensors: file.tensors }
}

fn plan() -> AttentionPlan {
    AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Dense(DenseParams::default()))
}

fn weights(g: &Golden) -> VarBuilder<'static> {
    common::model_weights(&g.tensors, None)
}


fn run(g: &Golden, text: Option<&Tensor>) -> Tensor {
    let model = SanaTransformer::new(&g.config, &plan(), weights(g)).unwrap();
    let t = &g.tensors;
    model
        .forward(
            &t["input.latents"],
            &t["input.timestep"],
            text.unwrap_or(&t["input.text"]),
            &t["input.text_mask"],
            t.get("input.guidance"),
        )
        .unwrap()
}

#[test]
fn matches_diffusers_sana_1_0() {
    let g = golden("plain");
    assert_eq!(g.config, SanaConfig { out_channels: Some(4), ..SanaConfig::tiny() });
    assert_close(&run(&g, None), &g.tensors["output.sample"], "plain");
}

#[test]
fn matches_diffusers_qk_norm_patch2_sincos() {
    let g = golden("qknorm_pe");
    assert_eq!(g.config.qk_norm, Some(QkNorm::RmsNormAcrossHeads));
    assert_eq!((g.config.patch_size, g.config.interpolation_scale), (2, Some(1.0)));
    assert_close(&run(&g, None), &g.tensors["output.sample"], "qknorm_pe");
    // The positional embedding is cached per grid: another size, then the first one again.
    let model = SanaTransformer::new(&g.config, &plan(), weights(&g)).unwrap();
    let t = &g.tensors;
    let call = |latents: &Tensor| model.forward(latents, &t["input.timestep"], &t["input.text"], &t["input.text_mask"], None).unwrap();
    let other = call(&t["input.latents"].narrow(3, 0, 8).unwrap());
    assert_eq!(other.dims(), &[2, 4, 8, 8]);
    assert_close(&call(&t["input.latents"]), &t["output.sample"], "qknorm_pe after a cache change");
}

#[test]
fn matches_diffusers_sprint_guidance() {
    let g = golden("sprint");
    assert!(g.config.guidance_embeds);
    assert_close(&run(&g, None), &g.tensors["output.sample"], "sprint");
}

#[test]
fn padded_text_tokens_are_ignored() {
    let g = golden("plain");
    let text = &g.tensors["input.text"];
    // Sample 0 keeps 3 of 5 tokens: overwrite its 2 padded tokens.
    let pad = (text.narrow(0, 0, 1).unwrap().narrow(1, 3, 2).unwrap().ones_like().unwrap() * 100.0).unwrap();
    let sample0 = Tensor::cat(&[&text.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap(), &pad], 1).unwrap();
    let changed = Tensor::cat(&[&sample0, &text.narrow(0, 1, 1).unwrap()], 0).unwrap();
    assert_close(&run(&g, Some(&changed)), &g.tensors["output.sample"], "padded tokens changed");
    // And changing a real token does change the output (the check above can fail).
    let real = Tensor::cat(&[&text.narrow(1, 0, 1).unwrap().affine(0.0, 3.0).unwrap(), &text.narrow(1, 1, 4).unwrap()], 1).unwrap();
    let (rel, _) = compare(&run(&g, Some(&real)), &g.tensors["output.sample"]);
    assert!(rel > 1e-3, "changing a real text token changed nothing ({rel:e})");
}

#[test]
fn missing_tensor_is_named() {
    let g = golden("qknorm_pe");
    for missing in ["transformer_blocks.1.attn2.to_k.weight", "transformer_blocks.0.attn1.norm_q.weight", "caption_norm.weight"] {
        let mut w: HashMap<String, Tensor> = g
            .tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(w.remove(missing).is_some(), "{missing} is not in the golden");
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let err = SanaTransformer::new(&g.config, &plan(), vb).expect_err("loading must fail").to_string();
        assert!(err.contains(missing), "error `{err}` does not name `{missing}`");
    }
}

#[test]
fn wrongly_shaped_tensor_is_an_error() {
    let g = golden("plain");
    let mut w: HashMap<String, Tensor> =
        g.tensors.iter().filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    w.insert("transformer_blocks.0.ff.conv_depth.weight".into(), Tensor::zeros((40, 1, 3, 3), DType::F32, &Device::Cpu).unwrap());
    let err = SanaTransformer::new(&g.config, &plan(), VarBuilder::from_tensors(w, DType::F32, &Device::Cpu))
        .expect_err("a wrong shape must fail")
        .to_string();
    assert!(err.contains("conv_depth"), "error `{err}` does not name the tensor");
}

#[test]
fn backend_refusal_is_reported_at_load() {
    // Linear attention cannot serve the masked cross-attention: loading must fail, naming the layer.
    let g = golden("plain");
    let plan = AttentionPlan::uniform(Backend::Linear(LinearParams::default()), Backend::Linear(LinearParams::default()));
    let err = SanaTransformer::new(&g.config, &plan, weights(&g)).expect_err("must refuse").to_string();
    assert!(err.contains("transformer_blocks.0.attn2"), "{err}");
}

#[test]
fn guidance_must_match_the_config() {
    let plain = golden("plain");
    let model = SanaTransformer::new(&plain.config, &plan(), weights(&plain)).unwrap();
    let t = &plain.tensors;
    let g = Tensor::new(&[0.4f32, 0.4], &Device::Cpu).unwrap();
    assert!(model.forward(&t["input.latents"], &t["input.timestep"], &t["input.text"], &t["input.text_mask"], Some(&g)).is_err());

    let sprint = golden("sprint");
    let model = SanaTransformer::new(&sprint.config, &plan(), weights(&sprint)).unwrap();
    let t = &sprint.tensors;
    assert!(model.forward(&t["input.latents"], &t["input.timestep"], &t["input.text"], &t["input.text_mask"], None).is_err());
}

#[test]
fn bad_inputs_are_usage_errors() {
    let g = golden("qknorm_pe");
    let model = SanaTransformer::new(&g.config, &plan(), weights(&g)).unwrap();
    let t = &g.tensors;
    // 7 is not divisible by the patch size 2.
    let odd = Tensor::zeros((2, 4, 7, 12), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&odd, &t["input.timestep"], &t["input.text"], &t["input.text_mask"], None).unwrap_err();
    assert!(matches!(err, visgen::Error::Usage(_)), "{err}");
    let short_mask = t["input.text_mask"].narrow(1, 0, 4).unwrap();
    assert!(model.forward(&t["input.latents"], &t["input.timestep"], &t["input.text"], &short_mask, None).is_err());
}

#[test]
fn presets() {
    let c = SanaConfig::sana_600m_1024();
    assert_eq!((c.inner_dim(), c.num_layers, c.ffn_hidden(), c.cross_attention_head_dim), (1152, 28, 2880, 72));
    c.validate().unwrap();
    let c = SanaConfig::sana_1600m_1024();
    assert_eq!((c.inner_dim(), c.num_layers, c.ffn_hidden(), c.num_cross_attention_heads), (2240, 20, 5600, 20));
    c.validate().unwrap();
    let c = SanaConfig::sana_1_5_4800m_1024();
    assert_eq!((c.num_layers, c.qk_norm), (60, Some(QkNorm::RmsNormAcrossHeads)));
    let c = SanaConfig::sana_sprint_1600m_1024();
    assert!(c.guidance_embeds && c.qk_norm.is_some() && c.guidance_embeds_scale == 0.1);
    for name in ["sana-600m", "sana-1600m", "sana-1.5-1600m", "sana-1.5-4800m", "sana-sprint-600m", "sana-sprint-1600m", "tiny"] {
        SanaConfig::preset(name).unwrap().validate().unwrap();
    }
    assert!(SanaConfig::preset("sana-9000m").is_err());
    // The names used by pipelines/*.toml.
    for (name, expected) in [
        ("600m-1024", SanaConfig::sana_600m_1024()),
        ("1600m-1024", SanaConfig::sana_1600m_1024()),
        ("1.5-1600m-1024", SanaConfig::sana_1_5_1600m_1024()),
        ("sprint-1600m-1024", SanaConfig::sana_sprint_1600m_1024()),
    ] {
        assert_eq!(SanaConfig::preset(name).unwrap(), expected, "{name}");
    }
    // A diffusers config.json with extra fields parses.
    let json = r#"{"_class_name": "SanaTransformer2DModel", "num_layers": 28, "num_attention_heads": 36,
        "num_cross_attention_heads": 16, "cross_attention_head_dim": 72, "cross_attention_dim": 1152,
        "interpolation_scale": null, "qk_norm": null, "sample_size": 32}"#;
    assert_eq!(SanaConfig::from_diffusers_json(json).unwrap(), SanaConfig::sana_600m_1024());
}

#[test]
fn full_size_presets_request_exactly_the_diffusers_keys() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/sana_full_size_keys.json");
    let manifest: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<usize>>> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for preset in ["sana-600m", "sana-1600m", "sana-sprint-1600m"] {
        let recorder = KeyRecorder::default();
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
        SanaTransformer::new(&SanaConfig::preset(preset).unwrap(), &plan(), vb).unwrap();
        let requested = recorder.0.lock().unwrap().clone();
        let expected = &manifest[preset];
        let missing: Vec<_> = expected.keys().filter(|k| !requested.contains_key(*k)).collect();
        let extra: Vec<_> = requested.keys().filter(|k| !expected.contains_key(*k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{preset}: not loaded {missing:?}; not in diffusers {extra:?}");
        for (k, shape) in expected {
            assert_eq!(&requested[k], shape, "{preset}: shape of {k}");
        }
    }
}
