//! Tiled decoding: the latent is cut into overlapping tiles, each decoded alone, and neighbouring
//! tiles are cross-faded over their overlap (diffusers `AutoencoderDC.tiled_decode`, whose output
//! this reproduces exactly when `halo_latents = 0`). Peak memory is that of one tile plus the
//! output, so a 4096² decode (128² latents) runs in a few GB.
//!
//! Optionally each tile is decoded with a margin of `halo_latents` extra latents on every side,
//! which is then cropped away: a decoder whose receptive field is within the halo then gives
//! exactly the untiled result. DC-AE's linear attention is global, so for the real model tiling is
//! always an approximation (as in diffusers).

use candle_core::Tensor;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct TilingConfig {
    /// Tile size in output pixels (diffusers `tile_sample_min_height/width`, default 512).
    pub tile_sample_height: usize,
    pub tile_sample_width: usize,
    /// Distance between tile starts in output pixels (default 448); the overlap
    /// `tile - stride` is cross-faded.
    pub stride_sample_height: usize,
    pub stride_sample_width: usize,
    /// Extra latents decoded around each tile and cropped away (0 = diffusers' behaviour).
    pub halo_latents: usize,
}

impl Default for TilingConfig {
    fn default() -> Self {
        Self { tile_sample_height: 512, tile_sample_width: 512, stride_sample_height: 448, stride_sample_width: 448, halo_latents: 0 }
    }
}

impl TilingConfig {
    pub fn validate(&self, compression: usize) -> Result<()> {
        let ok = |tile: usize, stride: usize| tile >= compression && stride >= compression && stride <= tile;
        if !ok(self.tile_sample_height, self.stride_sample_height) || !ok(self.tile_sample_width, self.stride_sample_width) {
            return Err(Error::Usage(format!(
                "tiling: tiles {}x{} with strides {}x{} must satisfy compression ({compression}) <= stride <= tile",
                self.tile_sample_height, self.tile_sample_width, self.stride_sample_height, self.stride_sample_width
            )));
        }
        Ok(())
    }

    /// Whether a latent of this size needs tiles (diffusers: larger than one tile on either side).
    pub fn applies(&self, latent_height: usize, latent_width: usize, compression: usize) -> bool {
        latent_height > self.tile_sample_height / compression || latent_width > self.tile_sample_width / compression
    }
}

/// `b` with its first `extent` rows (`dim` = 2) or columns (`dim` = 3) faded from the last `extent`
/// of `a`: `b[y] = a[-extent + y] · (1 - y/extent) + b[y] · (y/extent)`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let weights: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let complement: Vec<f32> = (0..extent).map(|y| (1.0 - y as f64 / extent as f64) as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let w = Tensor::from_vec(weights, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let wc = Tensor::from_vec(complement, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let a_tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let b_head = b.narrow(dim, 0, extent)?;
    let mixed = (a_tail.broadcast_mul(&wc)? + b_head.broadcast_mul(&w)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Ok(Tensor::cat(&[&mixed, &rest], dim)?)
}

/// Decodes `z` `(B, C, h, w)` tile by tile with `decode` (the untiled decoder, ×`compression`).
pub fn tiled_decode<F>(z: &Tensor, cfg: &TilingConfig, compression: usize, decode: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    cfg.validate(compression)?;
    let (_, _, h, w) = z.dims4()?;
    let f = compression;
    let (tile_h, tile_w) = (cfg.tile_sample_height / f, cfg.tile_sample_width / f);
    let (stride_h, stride_w) = (cfg.stride_sample_height / f, cfg.stride_sample_width / f);
    let blend_h = cfg.tile_sample_height - cfg.stride_sample_height;
    let blend_w = cfg.tile_sample_width - cfg.stride_sample_width;
    let halo = cfg.halo_latents;

    // Tiles are blended in raster order against their already-blended upper and left neighbours
    // (diffusers blends in place), so only the previous row of tiles is kept.
    let mut previous_row: Vec<Tensor> = Vec::new();
    let mut output_rows: Vec<Tensor> = Vec::new();
    for i in (0..h).step_by(stride_h) {
        let mut row: Vec<Tensor> = Vec::new();
        let mut cropped: Vec<Tensor> = Vec::new();
        for (col, j) in (0..w).step_by(stride_w).enumerate() {
            let (th, tw) = ((i + tile_h).min(h) - i, (j + tile_w).min(w) - j);
            let (i0, j0) = (i.saturating_sub(halo), j.saturating_sub(halo));
            let (i1, j1) = ((i + th + halo).min(h), (j + tw + halo).min(w));
            let decoded = decode(&z.narrow(2, i0, i1 - i0)?.narrow(3, j0, j1 - j0)?)?;
            let mut tile = decoded.narrow(2, (i - i0) * f, th * f)?.narrow(3, (j - j0) * f, tw * f)?;
            if let Some(above) = previous_row.get(col) {
                tile = blend(above, &tile, blend_h, 2)?;
            }
            if let Some(left) = row.last() {
                tile = blend(left, &tile, blend_w, 3)?;
            }
            let keep_h = tile.dim(2)?.min(cfg.stride_sample_height);
            let keep_w = tile.dim(3)?.min(cfg.stride_sample_width);
            cropped.push(tile.narrow(2, 0, keep_h)?.narrow(3, 0, keep_w)?);
            row.push(tile);
        }
        output_rows.push(Tensor::cat(&cropped, 3)?);
        previous_row = row;
    }
    let out = Tensor::cat(&output_rows, 2)?;
    Ok(out)
}
