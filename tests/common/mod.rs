//! Helpers shared by the golden-tensor tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub mod gna_shapes;

use candle_core::{DType, Device, Shape, Tensor};

/// max |a - b| / max |b|: the error relative to the scale of the reference tensor.
pub fn max_rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims());
    let values = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (a, b) = (values(actual), values(expected));
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A weight source that hands out broadcast zeros of the requested shape and records every request,
/// so a full-size model can be built without memory and its key layout compared with diffusers'.
#[derive(Clone, Default)]
pub struct KeyRecorder(pub Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl candle_nn::var_builder::SimpleBackend for KeyRecorder {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A golden file of tests/goldens: its tensors (weights, `input.*`, `output.*`) and the model
/// config stored as JSON in its metadata under `config`.
pub struct GoldenFile {
    pub tensors: std::collections::HashMap<String, Tensor>,
    pub config_json: String,
}

pub fn golden_file(file_name: &str) -> GoldenFile {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/goldens").join(file_name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config_json = meta.metadata().as_ref().and_then(|m| m.get("config")).expect("config metadata").clone();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    GoldenFile { tensors, config_json }
}

/// The model weights of a golden file (everything but `input.*` and `output.*`), less `skip`.
pub fn model_weights(
    tensors: &std::collections::HashMap<String, Tensor>,
    skip: Option<&str>,
) -> candle_nn::VarBuilder<'static> {
    let weights: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output.") && Some(k.as_str()) != skip)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)
}

/// max|a - b| / max|b|, and the worst elementwise excess over `|a - b| <= 1e-5·max|b| + 1e-3·|b|`.
pub fn compare(actual: &Tensor, expected: &Tensor) -> (f32, f32) {
    assert_eq!(actual.dims(), expected.dims());
    let a: Vec<f32> = actual.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    let max_b = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let excess = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs() - (1e-5 * max_b + 1e-3 * y.abs())));
    (max_diff / max_b, excess)
}

/// Asserts max relative error <= 1e-4 and the elementwise bound of [`compare`].
pub fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    let (rel, excess) = compare(actual, expected);
    println!("{what}: max rel err {rel:.3e}, elementwise excess {excess:.3e}");
    assert!(rel <= 1e-4, "{what}: max relative error {rel:e} > 1e-4");
    assert!(excess <= 0.0, "{what}: an element exceeds |a-b| <= 1e-5·max|b| + 1e-3·|b| by {excess:e}");
}

/// A small SANA whose self-attention (head dim 32) and cross-attention (head dim 64) run both GPU
/// attention kernels; optionally with SANA-Sprint's guidance embedding. Shared by the GPU tests.
pub fn small_sana_config(guidance_embeds: bool) -> visgen::models::sana::SanaConfig {
    visgen::models::sana::SanaConfig {
        num_attention_heads: 2,
        attention_head_dim: 32,
        num_cross_attention_heads: 1,
        cross_attention_head_dim: 64,
        cross_attention_dim: 64,
        guidance_embeds,
        ..visgen::models::sana::SanaConfig::tiny()
    }
}

/// (max abs error, relative L2 error) of `actual` (any device, any dtype) against the f32
/// `expected`, element by element in memory order; a non-finite value in `actual` fails the test.
pub fn errors(actual: &Tensor, expected: &Tensor) -> (f64, f64) {
    let values = |t: &Tensor| -> Vec<f64> { t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let (a, e) = (values(actual), values(expected));
    assert_eq!(a.len(), e.len(), "element counts");
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    let max_abs = a.iter().zip(&e).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let num: f64 = a.iter().zip(&e).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = e.iter().map(|y| y * y).sum::<f64>().max(1e-30);
    (max_abs, (num / den).sqrt())
}

/// max |t|, on any device.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

/// The GPU kernels' rule (flash-attention's): in each dtype, our error against the f32 reference
/// is at most twice the naive low-precision path's error, in max-abs and relative L2, plus a floor
/// of a few units of the dtype's rounding (`scale`: the size of the values, for the max-abs floor).
pub fn check(what: &str, dtype: DType, ours: (f64, f64), naive: (f64, f64), scale: f64) {
    let unit = match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-20),
    };
    let ok_abs = ours.0 <= 2.0 * naive.0 + 4.0 * unit * scale;
    let ok_rel = ours.1 <= 2.0 * naive.1 + 4.0 * unit;
    println!("{what}: ours max-abs {:.3e} rel-L2 {:.3e}; naive {:.3e} {:.3e}", ours.0, ours.1, naive.0, naive.1);
    assert!(ok_abs && ok_rel, "{what}: ours {ours:?} vs naive {naive:?}");
}
