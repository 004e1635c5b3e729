//! Parity of DC-AE's GPU kernels (src/layers/cuda/{dcae,conv}.rs, kernels/ops/{dcae,conv_igemm}.cu)
//! and of a whole small DC-AE decoder on the GPU.
//!
//! Reference: the same layer or model computed with tensor ops in f32 on the CPU from the same
//! inputs and weights. Rule (tests/cuda_ops.rs, flash-attention's): the GPU error against the
//! reference is at most twice the error of the naive low-precision implementation (the same
//! tensor ops on the GPU in the kernel's dtype, forced by `with_reference_only`), in max-abs and
//! relative L2, plus a floor of a few units of the dtype's rounding. Ragged sizes: planes smaller
//! and larger than the kernels' tiles, odd sides, channel counts that leave partial tiles.
//!
//! Run on the H200: `cargo test --release --features cuda --test cuda_dcae`.
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use common::{check, errors, max_abs};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use visgen::attention::with_reference_only;
use visgen::layers::conv::{conv3x3_fused, set_conv3x3_path, Conv3x3Path};
use visgen::models::dcae::blocks::{EfficientViTBlock, MultiscaleLinearAttention};
use visgen::models::dcae::{AutoencoderDc, BlockType, DcAeConfig};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn randn(shape: &[usize], scale: f64) -> Tensor {
    (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap()
}

/// Random weights for every tensor a model built from `build` asks for: matrices and kernels
/// scaled by 1/sqrt(fan-in), biases ~0.1, norm weights ~1.
fn random_weights(build: impl Fn(VarBuilder) -> visgen::Result<()>) -> HashMap<String, Tensor> {
    let recorder = common::KeyRecorder::default();
    build(VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu)).unwrap();
    let shapes = recorder.0.lock().unwrap().clone();
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.contains("norm") && name.ends_with("weight") {
                (randn(&shape, 0.1) + 1.0).unwrap()
            } else if shape.len() == 1 {
                randn(&shape, 0.1)
            } else {
                let fan_in: usize = shape[1..].iter().product();
                randn(&shape, 1.0 / (fan_in.max(1) as f64).sqrt())
            };
            (name, t)
        })
        .collect()
}

#[test]
fn implicit_gemm_conv_matches_reference() {
    let dev = gpu();
    // (batch, c_in, c_out, height, width, upsample, silu, shortcut repeats): tiles of 128 channels
    // x 128 pixels with partial ones, one pixel, one row, DC-AE's conv_out (3 outputs), the up
    // block's x2 with and without its shortcut (4·c_out / c_in repeats).
    let cases = [
        (1, 32, 64, 9, 13, false, false, None),
        (2, 64, 130, 16, 20, false, true, None),
        (1, 128, 3, 17, 33, false, false, None),
        (1, 32, 40, 1, 1, false, false, None),
        (1, 96, 32, 1, 150, false, true, None),
        (1, 64, 32, 7, 11, true, false, None),
        (2, 32, 160, 12, 8, true, true, None),
        (1, 64, 32, 7, 11, true, false, Some(2)),
        (2, 64, 64, 5, 9, true, false, Some(4)),
        (1, 256, 128, 16, 8, true, false, Some(2)),
    ];
    for &(b, ci, co, h, w, upsample, silu, shortcut) in &cases {
        let weight = randn(&[co, ci, 3, 3], 1.0 / ((9 * ci) as f64).sqrt());
        let bias = randn(&[co], 0.2);
        let x = randn(&[b, ci, h, w], 1.0);
        let cfg = Conv2dConfig { padding: 1, stride: 1, dilation: 1, groups: 1, cudnn_fwd_algo: None };
        let cpu = Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
        let reference = conv3x3_fused(&cpu, &x, upsample, silu, shortcut).unwrap();
        let (oh, ow) = if upsample { (2 * h, 2 * w) } else { (h, w) };
        assert_eq!(reference.dims(), &[b, co, oh, ow]);
        for dtype in [DType::BF16, DType::F16] {
            let on = |t: &Tensor| t.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            let conv = Conv2d::new(on(&weight), Some(on(&bias)), cfg);
            let xd = on(&x);
            set_conv3x3_path(Conv3x3Path::Implicit);
            let ours = conv3x3_fused(&conv, &xd, upsample, silu, shortcut).unwrap();
            let naive = with_reference_only(|| conv3x3_fused(&conv, &xd, upsample, silu, shortcut)).unwrap();
            assert_eq!(ours.dtype(), dtype);
            let what = format!("conv3x3 implicit B{b} {ci}->{co} {h}x{w} up {upsample} silu {silu} shortcut {shortcut:?} {dtype:?}");
            check(&what, dtype, errors(&ours, &reference), errors(&naive, &reference), max_abs(&reference));
            // The other paths that Auto may pick.
            for path in [Conv3x3Path::ImplicitNhwc, Conv3x3Path::Im2col, Conv3x3Path::Auto] {
                set_conv3x3_path(path);
                let other = conv3x3_fused(&conv, &xd, upsample, silu, shortcut).unwrap();
                check(&format!("{what} ({path:?})"), dtype, errors(&other, &reference), errors(&naive, &reference), max_abs(&reference));
            }
        }
    }
}

#[test]
fn multiscale_attention_fused_matches_reference() {
    let dev = gpu();
    // (batch, channels, height, width, kernel): grids smaller and larger than the 8x8 tile and the
    // 64/128-token tiles of the attention, ragged edges, both kernel sizes.
    for &(b, c, h, w, k) in &[(1, 64, 16, 16, 5), (2, 96, 9, 13, 3), (1, 32, 1, 1, 5), (1, 64, 3, 70, 5), (1, 32, 37, 29, 5)] {
        let weights = random_weights(|vb| MultiscaleLinearAttention::new(c, 32, &[k], vb).map(drop));
        let x = randn(&[b, c, h, w], 1.0);
        let reference = MultiscaleLinearAttention::new(c, 32, &[k], VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu))
            .unwrap()
            .forward(&x)
            .unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let attn = MultiscaleLinearAttention::new(c, 32, &[k], VarBuilder::from_tensors(weights.clone(), dtype, &dev)).unwrap();
            let xd = x.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            let ours = attn.forward(&xd).unwrap();
            let naive = attn.forward_reference(&xd).unwrap();
            let what = format!("LiteMLA B{b} C{c} {h}x{w} k{k} {dtype:?}");
            check(&what, dtype, errors(&ours, &reference), errors(&naive, &reference), max_abs(&reference));
        }
    }
}

#[test]
fn efficientvit_block_fused_matches_reference() {
    let dev = gpu();
    for &(b, c, h, w) in &[(1, 64, 12, 12), (2, 32, 5, 9)] {
        let weights = random_weights(|vb| EfficientViTBlock::new(c, 32, &[5], vb).map(drop));
        let x = randn(&[b, c, h, w], 1.0);
        let reference =
            EfficientViTBlock::new(c, 32, &[5], VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu)).unwrap().forward(&x).unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let block = EfficientViTBlock::new(c, 32, &[5], VarBuilder::from_tensors(weights.clone(), dtype, &dev)).unwrap();
            let xd = x.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            let ours = block.forward(&xd).unwrap();
            let naive = with_reference_only(|| block.forward(&xd)).unwrap();
            check(&format!("EfficientViT B{b} C{c} {h}x{w} {dtype:?}"), dtype, errors(&ours, &reference), errors(&naive, &reference), max_abs(&reference));
        }
    }
}

/// A small decoder that takes every fused path: 32 latent channels, head dim 32, ResBlocks, both
/// up-block types' interpolate form, EfficientViT blocks with 3x3 and 5x5 multi-scale branches.
fn small_config() -> DcAeConfig {
    use BlockType::*;
    DcAeConfig {
        latent_channels: 32,
        attention_head_dim: 32,
        decoder_block_types: vec![ResBlock, EfficientViTBlock, EfficientViTBlock],
        decoder_block_out_channels: vec![32, 64, 128],
        decoder_layers_per_block: vec![1, 2, 1],
        decoder_qkv_multiscales: vec![vec![], vec![3], vec![5]],
        encoder_block_types: vec![ResBlock, EfficientViTBlock, EfficientViTBlock],
        encoder_block_out_channels: vec![32, 64, 128],
        encoder_layers_per_block: vec![1, 1, 1],
        encoder_qkv_multiscales: vec![vec![], vec![3], vec![5]],
        ..DcAeConfig::f32c32_sana_1_0()
    }
}

#[test]
fn small_decoder_on_the_gpu_matches_the_cpu() {
    let dev = gpu();
    let cfg = small_config();
    let weights = random_weights(|vb| AutoencoderDc::new_decoder_only(&cfg, vb).map(drop));
    let z = randn(&[1, 32, 5, 7], 1.0);
    let cpu = AutoencoderDc::new_decoder_only(&cfg, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu)).unwrap();
    let reference = cpu.decode_untiled(&z).unwrap();
    assert_eq!(reference.dims(), &[1, 3, 20, 28]);
    let gpu_ae = AutoencoderDc::new_decoder_only(&cfg, VarBuilder::from_tensors(weights, DType::BF16, &dev)).unwrap();
    let zd = z.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let ours = gpu_ae.decode_untiled(&zd).unwrap();
    let naive = with_reference_only(|| gpu_ae.decode_untiled(&zd)).unwrap();
    check("small DC-AE decoder bf16", DType::BF16, errors(&ours, &reference), errors(&naive, &reference), max_abs(&reference));
}
