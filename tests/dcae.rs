//! DC-AE parity with diffusers 0.42.1 (`AutoencoderDC`) on a tiny config with the real block types
//! (ResBlock, EfficientViT with multi-scale linear attention), encode and decode, plus tiled decode.

mod common;
use common::{assert_close, compare, KeyRecorder};
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use visgen::models::dcae::{AutoencoderDc, BlockType, DcAeConfig, TilingConfig};

struct Golden {
    tensors: HashMap<String, Tensor>,
    config: DcAeConfig,
}

fn golden(name: &str) -> Golden {
    let file = common::golden_file(&format!("sana_dcae_{name}.safetensors"));
    Golden { config: DcAeConfig::from_diffusers_json(&file.config_json).unwrap(), tensors: file.tensors }
}

fn weights(g: &Golden, skip: Option<&str>) -> VarBuilder<'static> {
    common::model_weights(&g.tensors, skip)
}


fn golden_tiling() -> TilingConfig {
    // The script's enable_tiling(32, 32, 24, 24): 4-latent tiles every 3 latents, 8 px cross-fade.
    TilingConfig { tile_sample_height: 32, tile_sample_width: 32, stride_sample_height: 24, stride_sample_width: 24, halo_latents: 0 }
}

#[test]
fn encode_matches_diffusers() {
    let g = golden("tiny");
    let ae = AutoencoderDc::new(&g.config, weights(&g, None)).unwrap();
    assert_close(&ae.encode(&g.tensors["input.image"]).unwrap(), &g.tensors["output.latent"], "encode");
}

#[test]
fn decode_matches_diffusers() {
    let g = golden("tiny");
    let ae = AutoencoderDc::new(&g.config, weights(&g, None)).unwrap();
    assert_close(&ae.decode(&g.tensors["output.latent"]).unwrap(), &g.tensors["output.decoded"], "decode (linear path)");
    // 2x3 latent: diffusers takes its quadratic branch at the deepest stage (H·W <= head_dim).
    assert_close(&ae.decode(&g.tensors["input.small_latent"]).unwrap(), &g.tensors["output.small_decoded"], "decode (quadratic path)");
    assert_close(&ae.decode(&g.tensors["input.tile_latent"]).unwrap(), &g.tensors["output.tile_untiled"], "decode 7x9");
}

#[test]
fn tiled_decode_matches_diffusers_tiled_decode() {
    let g = golden("tiny");
    let ae = AutoencoderDc::new_decoder_only(&g.config, weights(&g, None)).unwrap().with_tiling(Some(golden_tiling())).unwrap();
    let z = &g.tensors["input.tile_latent"];
    let tiled = ae.decode(z).unwrap();
    assert_close(&tiled, &g.tensors["output.tile_tiled"], "tiled decode");
    // The tiles really were used: with global attention, tiled != untiled.
    let (rel, _) = compare(&tiled, &g.tensors["output.tile_untiled"]);
    assert!(rel > 1e-3, "tiled decode equals untiled ({rel:e}): tiling did not run");
}

#[test]
fn tiling_is_skipped_when_one_tile_covers_the_latent() {
    let g = golden("tiny");
    let tiling = TilingConfig { tile_sample_height: 64, tile_sample_width: 96, stride_sample_height: 56, stride_sample_width: 88, halo_latents: 0 };
    let ae = AutoencoderDc::new_decoder_only(&g.config, weights(&g, None)).unwrap().with_tiling(Some(tiling)).unwrap();
    assert_close(&ae.decode(&g.tensors["input.tile_latent"]).unwrap(), &g.tensors["output.tile_untiled"], "one tile");
}

#[test]
fn tiled_decode_with_halo_equals_untiled_for_a_local_decoder() {
    // ResBlock-only decoder (no global attention): its receptive field is < 6 latents, so tiles
    // decoded with a 6-latent halo and cropped reproduce the untiled decode.
    let g = golden("local");
    assert!(g.config.decoder_block_types.iter().all(|t| *t == BlockType::ResBlock));
    let f = g.config.spatial_compression();
    assert_eq!(f, 4);
    let z = &g.tensors["input.latent"];
    let untiled = AutoencoderDc::new_decoder_only(&g.config, weights(&g, None)).unwrap();
    assert_close(&untiled.decode(z).unwrap(), &g.tensors["output.decoded"], "local decoder untiled");
    // 3-latent tiles every 2 latents: 5 x 6 tiles over the 9 x 11 latent.
    let tiling = |halo| TilingConfig {
        tile_sample_height: 3 * f,
        tile_sample_width: 3 * f,
        stride_sample_height: 2 * f,
        stride_sample_width: 2 * f,
        halo_latents: halo,
    };
    let with_halo = untiled.clone().with_tiling(Some(tiling(6))).unwrap();
    assert_close(&with_halo.decode(z).unwrap(), &g.tensors["output.decoded"], "tiled with halo vs untiled");
    // Without the halo the seams show: the comparison above can fail.
    let without = untiled.with_tiling(Some(tiling(0))).unwrap();
    let (rel, _) = compare(&without.decode(z).unwrap(), &g.tensors["output.decoded"]);
    assert!(rel > 1e-3, "tiles without a halo should differ from the untiled decode ({rel:e})");
}

#[test]
fn missing_tensor_is_named() {
    let g = golden("tiny");
    for missing in [
        "decoder.up_blocks.2.1.attn.to_qkv_multiscale.0.proj_out.weight",
        "encoder.down_blocks.0.1.conv.bias",
        "decoder.norm_out.bias",
    ] {
        assert!(g.tensors.contains_key(missing), "{missing} is not in the golden");
        let err = AutoencoderDc::new(&g.config, weights(&g, Some(missing))).expect_err("loading must fail").to_string();
        assert!(err.contains(missing), "error `{err}` does not name `{missing}`");
    }
}

#[test]
fn presets_and_errors() {
    let c = DcAeConfig::f32c32_sana_1_0();
    c.validate().unwrap();
    assert_eq!((c.spatial_compression(), c.latent_channels, c.scaling_factor), (32, 32, 0.41407));
    assert_eq!(DcAeConfig::preset("dc-ae-f32c32-sana-1.1").unwrap(), c);
    assert!(DcAeConfig::preset("dc-ae-f64c128").is_err());
    let json = r#"{"_class_name": "AutoencoderDC", "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock",
        "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"], "decoder_norm_types": ["rms_norm", "rms_norm",
        "rms_norm", "rms_norm", "rms_norm", "rms_norm"], "scaling_factor": 0.41407}"#;
    assert_eq!(DcAeConfig::from_diffusers_json(json).unwrap(), c);
    let bad = r#"{"decoder_norm_types": ["rms_norm", "batch_norm"]}"#;
    assert!(DcAeConfig::from_diffusers_json(bad).is_err());

    let g = golden("tiny");
    let ae = AutoencoderDc::new_decoder_only(&g.config, weights(&g, None)).unwrap();
    assert!(ae.encode(&g.tensors["input.image"]).is_err(), "no encoder loaded");
    let wrong_channels = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(ae.decode(&wrong_channels), Err(visgen::Error::Usage(_))));
    let full = AutoencoderDc::new(&g.config, weights(&g, None)).unwrap();
    let odd = Tensor::zeros((1, 3, 30, 48), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(full.encode(&odd), Err(visgen::Error::Usage(_))));
}

#[test]
fn f32c32_preset_requests_exactly_the_diffusers_keys() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/sana_full_size_keys.json");
    let manifest: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<usize>>> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let expected = &manifest["dc-ae-f32c32-sana-1.0"];
    let recorder = KeyRecorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    AutoencoderDc::new(&DcAeConfig::f32c32_sana_1_0(), vb).unwrap();
    let requested = recorder.0.lock().unwrap().clone();
    let missing: Vec<_> = expected.keys().filter(|k| !requested.contains_key(*k)).collect();
    let extra: Vec<_> = requested.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "not loaded {missing:?}; not in diffusers {extra:?}");
    for (k, shape) in expected {
        assert_eq!(&requested[k], shape, "shape of {k}");
    }
}
