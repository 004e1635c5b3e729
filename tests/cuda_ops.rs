//! Parity of the fused layer kernels (src/layers/cuda, kernels/ops) on the GPU.
//!
//! Reference: the same layer computed with tensor ops in f32 on the CPU from the same inputs and
//! weights. Rule (flash-attention's): the kernel's error against the reference is at most twice
//! the error of the naive low-precision implementation (the same tensor ops on the GPU in the
//! kernel's dtype, forced by `with_reference_only`), in max-abs and relative L2, plus a small floor
//! for dtypes where both are at rounding level. Fresh random inputs per case; ragged image sizes
//! (planes smaller than, equal to and larger than the 32x16 tile, odd sides).
//!
//! Run on the H200: `cargo test --release --features cuda --test cuda_ops`.
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use common::{check, errors};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use visgen::attention::with_reference_only;
use visgen::layers::modulation::{gated_residual_reference, norm_modulate_reference};
use visgen::layers::{gated_residual, norm_modulate, GluMbConv};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn randn(shape: &[usize], scale: f64) -> Tensor {
    (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap()
}

fn glu_weights(c_in: usize, hidden: usize, c_out: usize) -> HashMap<String, Tensor> {
    HashMap::from([
        ("conv_inverted.weight".to_string(), randn(&[2 * hidden, c_in, 1, 1], 1.0 / (c_in as f64).sqrt())),
        ("conv_inverted.bias".to_string(), randn(&[2 * hidden], 0.5)),
        ("conv_depth.weight".to_string(), randn(&[2 * hidden, 1, 3, 3], 0.4)),
        ("conv_depth.bias".to_string(), randn(&[2 * hidden], 0.3)),
        ("conv_point.weight".to_string(), randn(&[c_out, hidden, 1, 1], 1.0 / (hidden as f64).sqrt())),
    ])
}

#[test]
fn mix_ffn_fused_matches_reference() {
    let dev = gpu();
    // (batch, channels, height, width): SANA's 32x32, a plane taller and wider than a tile with
    // ragged edges, a 1x1 plane, a one-row plane.
    let shapes = [(2, 64, 32, 32), (1, 32, 37, 70), (3, 16, 1, 1), (1, 48, 1, 29), (2, 40, 17, 33)];
    for &(b, c, h, w) in &shapes {
        let hidden = c * 5 / 2;
        let weights = glu_weights(c, hidden, c);
        let x = randn(&[b, c, h, w], 1.0);
        let reference = GluMbConv::new(c, c, 2.5, false, false, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu))
            .unwrap()
            .forward(&x)
            .unwrap();
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let ff = GluMbConv::new(c, c, 2.5, false, false, VarBuilder::from_tensors(weights.clone(), dtype, &dev)).unwrap();
            let xd = x.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            let ours = ff.forward(&xd).unwrap();
            let naive = with_reference_only(|| ff.forward(&xd)).unwrap();
            assert_eq!(ours.dims(), &[b, c, h, w]);
            assert_eq!(ours.dtype(), dtype);
            let what = format!("mix-ffn B{b} C{c} {h}x{w} {dtype:?}");
            check(&what, dtype, errors(&ours, &reference), errors(&naive, &reference), scale);
        }
    }
}

#[test]
fn mix_ffn_on_tokens_matches_reference() {
    // Channels-last tokens (SANA's blocks): the token kernel, rows of 4 with ragged last groups.
    let dev = gpu();
    for &(b, c, h, w) in &[(2, 64, 32, 32), (1, 40, 9, 13), (2, 16, 1, 1), (1, 24, 5, 1), (1, 130, 6, 7)] {
        let hidden = c * 5 / 2;
        let weights = glu_weights(c, hidden, c);
        let x = randn(&[b, h * w, c], 1.0);
        let cpu = GluMbConv::new(c, c, 2.5, false, false, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu)).unwrap();
        let reference = cpu.forward_tokens(&x, [h, w]).unwrap();
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let ff = GluMbConv::new(c, c, 2.5, false, false, VarBuilder::from_tensors(weights.clone(), dtype, &dev)).unwrap();
            let xd = x.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            let ours = ff.forward_tokens(&xd, [h, w]).unwrap();
            let naive = with_reference_only(|| ff.forward_tokens(&xd, [h, w])).unwrap();
            assert_eq!(ours.dims(), &[b, h * w, c]);
            check(&format!("mix-ffn tokens B{b} C{c} {h}x{w} {dtype:?}"), dtype, errors(&ours, &reference), errors(&naive, &reference), scale);
        }
    }
}

#[test]
fn gated_residual_matches_reference() {
    let dev = gpu();
    for &(b, n, c) in &[(2, 1024, 2240), (1, 7, 33), (3, 5, 1)] {
        let x = randn(&[b, n, c], 1.0);
        let y = randn(&[b, n, c], 1.0);
        let bias = randn(&[c], 0.5);
        // The gate as a view into a (B, 6, C) table, as the block passes it.
        let table = randn(&[b, 6, c], 0.5);
        let gate = table.narrow(1, 2, 1).unwrap();
        for (use_bias, use_gate) in [(true, true), (false, true), (true, false)] {
            let (bias_ref, gate_ref) = (use_bias.then_some(&bias), use_gate.then_some(&gate));
            let reference = gated_residual_reference(&x, &y, bias_ref, gate_ref).unwrap();
            let bound = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            for dtype in [DType::BF16, DType::F32] {
                let on = |t: &Tensor| t.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
                let (xd, yd, bd) = (on(&x), on(&y), on(&bias));
                let gd = on(&table).narrow(1, 2, 1).unwrap();
                let (bo, go) = (use_bias.then_some(&bd), use_gate.then_some(&gd));
                let ours = gated_residual(&xd, &yd, bo, go).unwrap();
                let naive = with_reference_only(|| gated_residual(&xd, &yd, bo, go)).unwrap();
                let what = format!("gated residual B{b} N{n} C{c} bias {use_bias} gate {use_gate} {dtype:?}");
                check(&what, dtype, errors(&ours, &reference), errors(&naive, &reference), bound);
            }
        }
    }
}

#[test]
fn norm_modulate_fused_matches_reference() {
    let dev = gpu();
    // (batch, tokens, channels): SANA-1600M's width, SANA-600M's, a small odd one, a wide one
    // with an offset mean (the two-pass variance must not cancel).
    let shapes = [(2, 64, 2240, 0.0), (1, 33, 1152, 0.0), (3, 5, 7, 0.0), (2, 9, 5000, 30.0)];
    for &(b, n, c, offset) in &shapes {
        let x = (randn(&[b, n, c], 2.0) + offset).unwrap();
        let shift = randn(&[b, 1, c], 0.5);
        let scale = randn(&[b, 1, c], 0.5);
        let reference = norm_modulate_reference(&x, &shift, &scale, 1e-6).unwrap();
        let bound = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let on = |t: &Tensor| t.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            // The block passes narrowed (B, 1, C) views of the 6-row modulation table.
            let table = Tensor::cat(&[&shift, &scale, &shift, &scale, &shift, &scale], 1).unwrap();
            let table = on(&table);
            let (sd, cd) = (table.narrow(1, 2, 1).unwrap(), table.narrow(1, 3, 1).unwrap());
            let xd = on(&x);
            let ours = norm_modulate(&xd, &sd, &cd, 1e-6).unwrap();
            let naive = with_reference_only(|| norm_modulate(&xd, &sd, &cd, 1e-6)).unwrap();
            // Contiguous rows give the same bits as the views.
            let flat = norm_modulate(&xd, &on(&shift), &on(&scale), 1e-6).unwrap();
            assert_eq!(errors(&flat, &ours.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()).0, 0.0);
            assert_eq!(ours.dims(), &[b, n, c]);
            let what = format!("norm+modulate B{b} N{n} C{c} offset {offset} {dtype:?}");
            check(&what, dtype, errors(&ours, &reference), errors(&naive, &reference), bound);
        }
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dev = gpu();
    let x = Tensor::zeros((2, 4, 8), DType::BF16, &dev).unwrap();
    let wrong = Tensor::zeros((3, 1, 8), DType::BF16, &dev).unwrap();
    assert!(norm_modulate(&x, &wrong, &wrong, 1e-6).is_err());
    // Wider than the kernel serves: the tensor-op path takes over.
    let too_wide = Tensor::ones((1, 2, 9000), DType::BF16, &dev).unwrap();
    let s = Tensor::zeros((1, 1, 9000), DType::BF16, &dev).unwrap();
    assert_eq!(norm_modulate(&too_wide, &s, &s, 1e-6).unwrap().dims(), &[1, 2, 9000]);
}

/// A whole (small) SANA transformer on the GPU, where every fused kernel and both attention
/// kernels run (head dims 32 and 64), against the same weights in f32 on the CPU: in f32 the GPU
/// result equals the CPU one up to summation order; in bf16 it stays within bf16 rounding.
#[test]
fn sana_transformer_on_gpu_matches_cpu() {
    use visgen::attention::plan::AttentionPlan;
    use visgen::models::sana::SanaTransformer;
    use visgen::weights::random::random_var_builder;

    let dev = gpu();
    let cfg = common::small_sana_config(false);
    let plan = AttentionPlan::from_spec(&visgen::spec::find_spec("tiny-random").unwrap().attention).unwrap();
    let cpu = SanaTransformer::new(&cfg, &plan, random_var_builder(3, DType::F32, &Device::Cpu)).unwrap();
    let (b, side, text_len) = (2, 8, 7);
    let latents = randn(&[b, cfg.in_channels, side, side], 1.0);
    let timestep = Tensor::new(&[999f32, 250.0], &Device::Cpu).unwrap();
    let text = randn(&[b, text_len, cfg.caption_channels], 1.0);
    let mask = Tensor::new(&[[1f32, 1., 1., 1., 0., 0., 0.], [1., 1., 1., 1., 1., 1., 1.]], &Device::Cpu).unwrap();
    let reference = cpu.forward(&latents, &timestep, &text, &mask, None).unwrap();
    for (dtype, bound) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
        let model = SanaTransformer::new(&cfg, &plan, random_var_builder(3, dtype, &dev)).unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let out = model
            .forward(&on(&latents).to_dtype(dtype).unwrap(), &on(&timestep), &on(&text).to_dtype(dtype).unwrap(), &on(&mask), None)
            .unwrap();
        let (max_abs, rel) = errors(&out, &reference);
        println!("sana transformer GPU {dtype:?} vs CPU f32: max-abs {max_abs:.3e} rel-L2 {rel:.3e}");
        assert!(rel <= bound, "{dtype:?}: rel-L2 {rel:.3e} > {bound:.0e}");
    }
}

/// The head-layout gathers move bits: the GPU result equals the CPU views exactly, for fused
/// (parts = 3) and single projections, several head dims, bf16 and f32.
#[test]
fn head_split_and_merge_are_exact() {
    use visgen::layers::{merge_heads, split_heads};
    let dev = gpu();
    for &(b, n, parts, heads, d, dtype) in &[
        (2, 1024, 3, 70, 32, DType::BF16),
        (1, 77, 2, 20, 112, DType::BF16),
        (2, 5, 1, 3, 8, DType::F32),
        (1, 9, 3, 2, 6, DType::BF16), // 12-byte rows: not word-aligned, tensor-op path
    ] {
        let x = randn(&[b, n, parts * heads * d], 1.0).to_dtype(dtype).unwrap();
        let cpu = split_heads(&x, parts, heads).unwrap();
        let gpu_parts = split_heads(&x.to_device(&dev).unwrap(), parts, heads).unwrap();
        for (c, g) in cpu.iter().zip(&gpu_parts) {
            assert_eq!(g.dims(), &[b, heads, n, d]);
            assert_eq!(errors(g, &c.to_dtype(DType::F32).unwrap()).0, 0.0);
            let merged = merge_heads(g).unwrap();
            assert_eq!(merged.dims(), &[b, n, heads * d]);
            let merged_cpu = merge_heads(c).unwrap();
            assert_eq!(errors(&merged, &merged_cpu.to_dtype(DType::F32).unwrap()).0, 0.0);
        }
    }
}

#[test]
fn channels_first_rms_norm_matches_reference() {
    use visgen::layers::RmsNorm;
    let dev = gpu();
    for &(b, c, h, w, affine) in &[(1, 128, 64, 64, true), (2, 33, 7, 9, false), (1, 1024, 4, 4, true), (3, 5, 1, 1, true)] {
        let x = (randn(&[b, c, h, w], 2.0) + 0.5).unwrap();
        let weights = HashMap::from([("weight".to_string(), randn(&[c], 1.0)), ("bias".to_string(), randn(&[c], 0.3))]);
        let cpu = RmsNorm::new(c, 1e-5, affine, affine, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu)).unwrap();
        let reference = cpu.forward_channels_first_reference(&x).unwrap();
        let bound = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let norm = RmsNorm::new(c, 1e-5, affine, affine, VarBuilder::from_tensors(weights.clone(), dtype, &dev)).unwrap();
            let xd = x.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            let ours = norm.forward_channels_first(&xd).unwrap();
            let naive = with_reference_only(|| norm.forward_channels_first(&xd)).unwrap();
            assert_eq!(ours.dims(), &[b, c, h, w]);
            let what = format!("rms channels-first B{b} C{c} {h}x{w} affine {affine} {dtype:?}");
            check(&what, dtype, errors(&ours, &reference), errors(&naive, &reference), bound);
        }
    }
}

#[test]
fn conv3x3_im2col_gemm_matches_reference() {
    use visgen::layers::conv::{conv2d, conv_forward};
    let dev = gpu();
    for &(b, c, c_out, h, w) in &[(1, 16, 24, 33, 47), (2, 8, 3, 16, 16), (1, 32, 32, 1, 1), (1, 4, 8, 64, 5)] {
        let weights = HashMap::from([
            ("weight".to_string(), randn(&[c_out, c, 3, 3], 1.0 / (9.0 * c as f64).sqrt())),
            ("bias".to_string(), randn(&[c_out], 0.3)),
        ]);
        let x = randn(&[b, c, h, w], 1.0);
        let cpu = conv2d(c, c_out, 3, 1, 1, true, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu)).unwrap();
        let reference = conv_forward(&cpu, &x).unwrap();
        let bound = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        for dtype in [DType::BF16, DType::F16] {
            let conv = conv2d(c, c_out, 3, 1, 1, true, VarBuilder::from_tensors(weights.clone(), dtype, &dev)).unwrap();
            let xd = x.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
            let ours = conv_forward(&conv, &xd).unwrap();
            let naive = with_reference_only(|| conv_forward(&conv, &xd)).unwrap();
            assert_eq!(ours.dims(), &[b, c_out, h, w]);
            check(&format!("conv3x3 B{b} C{c}->{c_out} {h}x{w} {dtype:?}"), dtype, errors(&ours, &reference), errors(&naive, &reference), bound);
        }
    }
}
