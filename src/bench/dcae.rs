//! `gen bench dcae`: the DC-AE f32c32 decoder (SANA's) with seeded random weights in bf16 on the
//! GPU: one 1024² decode under each 3×3-convolution path ([`Conv3x3Path`]), then the decoder's
//! parts on their own shapes, and the pieces of an EfficientViT block. With a baseline log
//! (tests/bench/dcae_baseline.py, diffusers eager, same run) rows with a matching
//! `baseline diffusers NAME` line also print `ours / diffusers`.

use std::collections::HashMap;

use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor};

use super::gpu::time_ms;
use crate::error::Result;
use crate::layers::conv::{conv2d, conv3x3_fused, set_conv3x3_path, Conv3x3Path};
use crate::models::dcae::blocks::{EfficientViTBlock, ResBlock, UpBlock};
use crate::models::dcae::{AutoencoderDc, DcAeConfig};
use crate::weights::random::random_var_builder;

const LATENT_SIDE: usize = 32;
const PATHS: [(Conv3x3Path, &str); 5] = [
    (Conv3x3Path::Auto, "auto: fastest of ours per shape"),
    (Conv3x3Path::Implicit, "implicit GEMM"),
    (Conv3x3Path::ImplicitNhwc, "NHWC copy + implicit GEMM"),
    (Conv3x3Path::Im2col, "im2col + GEMM"),
    (Conv3x3Path::Candle, "candle"),
];

fn row(what: &str, ms: f64, baselines: &HashMap<String, f64>, key: &str) {
    match baselines.get(&format!("diffusers {key}")) {
        Some(base) => println!("{what:<52} {ms:>10.3} {base:>14.3} {:>18.2}", ms / base),
        None => println!("{what:<52} {ms:>10.3} {:>14} {:>18}", "-", "-"),
    }
}

pub fn run(device: &Device, dev: &CudaDevice, iters: usize, baselines: &HashMap<String, f64>) -> Result<()> {
    println!("dcae: f32c32 decoder, random weights, bf16");
    println!("{:<52} {:>10} {:>14} {:>18}", "what (batch 1, 1024² image)", "ours ms", "diffusers ms", "ours / diffusers");
    let cfg = DcAeConfig::f32c32_sana_1_0();
    let vae = AutoencoderDc::new_decoder_only(&cfg, random_var_builder(3, DType::BF16, device))?;
    let z = Tensor::randn(0f32, 1.0, (1, cfg.latent_channels, LATENT_SIDE, LATENT_SIDE), device)?.to_dtype(DType::BF16)?;
    for (path, name) in PATHS {
        set_conv3x3_path(path);
        let ms = time_ms(dev, 2, iters, || {
            let image = vae.decode_untiled(&(&z / vae.scaling_factor())?)?;
            drop(image.to_dtype(DType::F32)?.clamp(-1f32, 1f32)?);
            Ok(())
        })?;
        row(&format!("decode 1024² (3x3 convs: {name})"), ms, baselines, "decode");
    }
    set_conv3x3_path(Conv3x3Path::Auto);
    decoder_parts(device, dev, iters, baselines)
}

/// The decoder's parts at the sizes of a 1024² decode, each timed alone, and the convolutions
/// under each path.
fn decoder_parts(device: &Device, dev: &CudaDevice, iters: usize, baselines: &HashMap<String, f64>) -> Result<()> {
    let vb = || random_var_builder(11, DType::BF16, device);
    let image = |c: usize, side: usize| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, (1, c, side, side), device)?.to_dtype(DType::BF16)?) };
    let none = HashMap::new();
    let (x128, x256, x512) = (image(128, 1024)?, image(256, 512)?, image(512, 256)?);

    let conv128 = conv2d(128, 128, 3, 1, 1, true, vb())?;
    let conv_up = conv2d(256, 128, 3, 1, 1, true, vb())?;
    let conv512 = conv2d(512, 512, 3, 1, 1, true, vb())?;
    let conv_out = conv2d(128, 3, 3, 1, 1, true, vb())?;
    for (path, name) in PATHS {
        set_conv3x3_path(path);
        let ms = time_ms(dev, 1, iters, || Ok(drop(conv3x3_fused(&conv128, &x128, false, false, None)?)))?;
        row(&format!("conv 3x3 128->128 at 1024² ({name})"), ms, baselines, "conv128");
        let ms = time_ms(dev, 1, iters, || Ok(drop(conv3x3_fused(&conv_up, &x256, true, false, Some(2))?)))?;
        row(&format!("  up x2 + conv 256->128 + shortcut at 1024² ({name})"), ms, &none, "-");
        let ms = time_ms(dev, 1, iters, || Ok(drop(conv3x3_fused(&conv512, &x512, false, false, None)?)))?;
        row(&format!("  conv 512->512 at 256² ({name})"), ms, &none, "-");
        let ms = time_ms(dev, 1, iters, || Ok(drop(conv3x3_fused(&conv_out, &x128, false, false, None)?)))?;
        row(&format!("  conv_out 128->3 at 1024² ({name})"), ms, &none, "-");
    }
    set_conv3x3_path(Conv3x3Path::Auto);

    let res = ResBlock::new(128, vb())?;
    row("ResBlock 128ch at 1024² (x3)", time_ms(dev, 1, iters, || Ok(drop(res.forward(&x128)?)))?, baselines, "res128");
    let up = UpBlock::new(256, 128, true, vb())?;
    row("up 256->128, 512² -> 1024²", time_ms(dev, 1, iters, || Ok(drop(up.forward(&x256)?)))?, baselines, "up256");
    let res2 = ResBlock::new(256, vb())?;
    row("ResBlock 256ch at 512² (x3)", time_ms(dev, 1, iters, || Ok(drop(res2.forward(&x256)?)))?, baselines, "res256");
    let res3 = ResBlock::new(512, vb())?;
    row("ResBlock 512ch at 256² (x3)", time_ms(dev, 1, iters, || Ok(drop(res3.forward(&x512)?)))?, baselines, "res512");

    for (c, side, key) in [(512, 128, "evit512"), (1024, 64, "evit1024_64"), (1024, 32, "evit1024_32")] {
        let x = image(c, side)?;
        let evit = EfficientViTBlock::new(c, 32, &[5], vb())?;
        row(&format!("EfficientViT {c}ch at {side}² (x3), fused"), time_ms(dev, 1, iters, || Ok(drop(evit.forward(&x)?)))?, baselines, key);
        let ms = time_ms(dev, 1, iters, || Ok(drop(evit.forward_reference(&x)?)))?;
        row(&format!("  the same as tensor ops (before)"), ms, &none, "-");
        if c == 512 {
            evit_pieces(device, dev, iters, c, side)?;
        }
    }
    Ok(())
}

/// The kernels of one fused EfficientViT block, on its shapes.
fn evit_pieces(device: &Device, dev: &CudaDevice, iters: usize, c: usize, side: usize) -> Result<()> {
    use crate::layers::{cuda, project};
    let none = HashMap::new();
    let n = side * side;
    let grid = [side, side];
    let bf16 = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?) };
    let t = bf16(Tensor::randn(0f32, 1.0, (1, n, c), device)?)?;
    let w_qkv = bf16((Tensor::randn(0f32, 1.0, (3 * c, c), device)? * 0.03)?)?;
    let qkv = project(&t, &w_qkv)?;
    row(&format!("  qkv GEMM {n}x{c}->{}", 3 * c), time_ms(dev, 1, iters, || Ok(drop(project(&t, &w_qkv)?)))?, &none, "-");
    let w_dw = (Tensor::randn(0f32, 1.0, (3 * c, 25), device)? * 0.2)?;
    let w_pw = (Tensor::randn(0f32, 1.0, (3 * c, 32), device)? * 0.2)?;
    let ms = time_ms(dev, 1, iters, || Ok(drop(cuda::depthwise_grouped_pointwise(&qkv, grid, &w_dw, &w_pw)?)))?;
    row("  depth-wise 5x5 + grouped 1x1 kernel", ms, &none, "-");
    let ms_branch = cuda::depthwise_grouped_pointwise(&qkv, grid, &w_dw, &w_pw)?;
    let ms = time_ms(dev, 1, iters, || Ok(drop(cuda::multiscale_linear_attention(&qkv, &ms_branch, 1e-15)?)))?;
    row("  linear attention kernels (state + out)", ms, &none, "-");
    let o = cuda::multiscale_linear_attention(&qkv, &ms_branch, 1e-15)?;
    let w_out = bf16((Tensor::randn(0f32, 1.0, (c, 2 * c), device)? * 0.03)?)?;
    row(&format!("  to_out GEMM {n}x{}->{c}", 2 * c), time_ms(dev, 1, iters, || Ok(drop(project(&o, &w_out)?)))?, &none, "-");
    let w = Tensor::ones(c, DType::F32, device)?;
    let ms = time_ms(dev, 1, iters, || Ok(drop(cuda::rms_norm_residual(&t, Some(&w), Some(&w), Some(&t), 1e-5)?)))?;
    row("  RMSNorm + residual kernel", ms, &none, "-");
    let ms = time_ms(dev, 1, iters, || Ok(drop(cuda::tokens_to_nchw(&t, grid)?)))?;
    row("  NHWC -> NCHW transpose kernel", ms, &none, "-");
    Ok(())
}
