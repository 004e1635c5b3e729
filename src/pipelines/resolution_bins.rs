//! Resolution binning, as diffusers' SANA pipelines do by default (`use_resolution_binning`): a
//! requested size is generated at the trained size whose aspect ratio is closest, and the decoded
//! image is resized (bilinear) and center-cropped back to what was asked. The models were trained
//! on these bins only; other sizes come out visibly worse, and sizes that are not multiples of the
//! latent grid would not be possible at all.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The bins of one table, chosen by the transformer's `sample_size` (latent side).
#[derive(Debug, Clone, Copy)]
pub struct ResolutionBins {
    base: &'static [(f64, u16, u16)],
    scale: usize,
}

impl ResolutionBins {
    /// The table diffusers uses for a transformer of this `sample_size`: 16 → 512 px, 32 → 1024,
    /// 64 → 2048, 128 → 4096. Other sizes (our tiny test models) have none.
    pub fn for_sample_size(sample_size: usize) -> Option<Self> {
        match sample_size {
            16 => Some(Self { base: &BINS_512, scale: 1 }),
            32 => Some(Self { base: &BINS_512, scale: 2 }),
            64 => Some(Self { base: &BINS_2048, scale: 1 }),
            128 => Some(Self { base: &BINS_2048, scale: 2 }),
            _ => None,
        }
    }

    /// `(aspect ratio label h/w, height, width)` of every bin, by increasing ratio.
    pub fn entries(&self) -> impl Iterator<Item = (f64, usize, usize)> + '_ {
        self.base.iter().map(|&(ratio, h, w)| (ratio, h as usize * self.scale, w as usize * self.scale))
    }

    /// `(height, width)` of the bin whose ratio label is closest to `height / width`; on a tie the
    /// smaller ratio wins (the table's first, as Python's `min` picks).
    pub fn closest(&self, height: usize, width: usize) -> (usize, usize) {
        let aspect = height as f64 / width.max(1) as f64;
        let mut best = (f64::INFINITY, 0, 0);
        for (ratio, h, w) in self.entries() {
            let distance = (ratio - aspect).abs();
            if distance < best.0 {
                best = (distance, h, w);
            }
        }
        (best.1, best.2)
    }
}

/// Resizes `(B, C, H, W)` images so they cover `height` x `width` (bilinear, half-pixel centres,
/// no anti-aliasing: torch's `interpolate(mode="bilinear", align_corners=False)`), then crops the
/// centre. Runs on the CPU in f32; the result is on the CPU.
pub fn resize_and_crop(images: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, in_h, in_w) = images.dims4()?;
    if height == 0 || width == 0 {
        return Err(Error::usage(format!("cannot resize to {width}x{height}")));
    }
    let images = images.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
    if (in_h, in_w) == (height, width) {
        return Ok(images);
    }
    let ratio = (height as f64 / in_h as f64).max(width as f64 / in_w as f64);
    // int() truncation, as diffusers; the product can land a hair under the requested side
    let resized_h = ((in_h as f64 * ratio) as usize).max(height);
    let resized_w = ((in_w as f64 * ratio) as usize).max(width);
    let resized = images.upsample_bilinear2d(resized_h, resized_w, false)?;
    let top = (resized_h - height) / 2;
    let left = (resized_w - width) / 2;
    Ok(resized.narrow(2, top, height)?.narrow(3, left, width)?.contiguous()?)
}

// Bins of PixArt / SANA training (h, w multiples of 32), labelled with their rounded h/w as in
// diffusers' ASPECT_RATIO_*_BIN tables; the 1024 and 4096 tables are these doubled.
const BINS_512: [(f64, u16, u16); 33] = [
    (0.25, 256, 1024), (0.28, 256, 928), (0.32, 288, 896), (0.33, 288, 864), (0.35, 288, 832),
    (0.4, 320, 800), (0.42, 320, 768), (0.48, 352, 736), (0.5, 352, 704), (0.52, 352, 672),
    (0.57, 384, 672), (0.6, 384, 640), (0.68, 416, 608), (0.72, 416, 576), (0.78, 448, 576),
    (0.82, 448, 544), (0.88, 480, 544), (0.94, 480, 512), (1.0, 512, 512), (1.07, 512, 480),
    (1.13, 544, 480), (1.21, 544, 448), (1.29, 576, 448), (1.38, 576, 416), (1.46, 608, 416),
    (1.67, 640, 384), (1.75, 672, 384), (2.0, 704, 352), (2.09, 736, 352), (2.4, 768, 320),
    (2.5, 800, 320), (3.0, 864, 288), (4.0, 1024, 256),
];
const BINS_2048: [(f64, u16, u16); 40] = [
    (0.25, 1024, 4096), (0.26, 1024, 3968), (0.27, 1024, 3840), (0.28, 1024, 3712),
    (0.32, 1152, 3584), (0.33, 1152, 3456), (0.35, 1152, 3328), (0.4, 1280, 3200),
    (0.42, 1280, 3072), (0.48, 1408, 2944), (0.5, 1408, 2816), (0.52, 1408, 2688),
    (0.57, 1536, 2688), (0.6, 1536, 2560), (0.68, 1664, 2432), (0.72, 1664, 2304),
    (0.78, 1792, 2304), (0.82, 1792, 2176), (0.88, 1920, 2176), (0.94, 1920, 2048),
    (1.0, 2048, 2048), (1.07, 2048, 1920), (1.13, 2176, 1920), (1.21, 2176, 1792),
    (1.29, 2304, 1792), (1.38, 2304, 1664), (1.46, 2432, 1664), (1.67, 2560, 1536),
    (1.75, 2688, 1536), (2.0, 2816, 1408), (2.09, 2944, 1408), (2.4, 3072, 1280), (2.5, 3200, 1280),
    (2.89, 3328, 1152), (3.0, 3456, 1152), (3.11, 3584, 1152), (3.62, 3712, 1024),
    (3.75, 3840, 1024), (3.88, 3968, 1024), (4.0, 4096, 1024),
];
