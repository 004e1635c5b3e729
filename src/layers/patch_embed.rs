//! Patch embedding (diffusers `PatchEmbed` without LayerNorm): a stride-p convolution to tokens in
//! row-major order, plus, when an interpolation scale is set, a fixed 2-D sin-cos embedding.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Conv2d, VarBuilder};

use super::conv::conv2d;
use crate::error::{Error, Result};

/// The 2-D sin-cos positional embedding `(H·W, dim)` of diffusers' `get_2d_sincos_pos_embed` for a
/// `grid = (h, w)` of patches: positions `i / (n / base_size) / interpolation_scale` per axis; the
/// first `dim/2` channels encode the column, the last `dim/2` the row; each half is
/// `[sin(pos·ω), cos(pos·ω)]` with `ω_i = 10000^(-i / (dim/4))`. Positions in f32, the rest in f64
/// (as diffusers), the result in f32. Token `n = row·w + col`.
pub fn sincos_2d(dim: usize, grid: (usize, usize), base_size: usize, interpolation_scale: f64, device: &Device) -> Result<Tensor> {
    if dim % 4 != 0 {
        return Err(Error::Other(format!("sin-cos embedding width {dim} must be divisible by 4")));
    }
    let (h, w) = grid;
    let axis = |n: usize| -> Vec<f32> {
        (0..n).map(|i| (i as f32) / (n as f32 / base_size as f32) / interpolation_scale as f32).collect()
    };
    let (rows, cols) = (axis(h), axis(w));
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64)).collect();
    let mut data = Vec::with_capacity(h * w * dim);
    for &row in &rows {
        for &col in &cols {
            for pos in [col as f64, row as f64] {
                data.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                data.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Ok(Tensor::from_vec(data, (h * w, dim), device)?)
}

#[derive(Debug)]
pub struct PatchEmbed {
    proj: Conv2d,
    patch_size: usize,
    embed_dim: usize,
    /// `(base_size, interpolation_scale)` when the sin-cos embedding is used.
    pos_embed: Option<(usize, f64)>,
    /// The embedding of the last grid seen (a 4K grid takes ~36M sin/cos to build).
    cache: std::sync::Mutex<Option<((usize, usize), Tensor)>>,
}

impl Clone for PatchEmbed {
    fn clone(&self) -> Self {
        Self {
            proj: self.proj.clone(),
            patch_size: self.patch_size,
            embed_dim: self.embed_dim,
            pos_embed: self.pos_embed,
            cache: std::sync::Mutex::new(None),
        }
    }
}

impl PatchEmbed {
    /// Keys: `proj.{weight (dim, in, p, p), bias}`. `sample_size` is the latent size the model was
    /// trained at; with `interpolation_scale = Some(s)` the sin-cos embedding is added, with
    /// `base_size = sample_size / p`.
    pub fn new(
        in_channels: usize,
        embed_dim: usize,
        patch_size: usize,
        sample_size: usize,
        interpolation_scale: Option<f64>,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            proj: conv2d(in_channels, embed_dim, patch_size, 0, patch_size, true, vb.pp("proj"))?,
            patch_size,
            embed_dim,
            pos_embed: interpolation_scale.map(|s| (sample_size / patch_size, s)),
            cache: std::sync::Mutex::new(None),
        })
    }

    /// `x`: `(B, C, H, W)` with H, W divisible by p -> `(B, (H/p)·(W/p), dim)`.
    /// The patch projection as one GEMM on the cut-out patches: the same sum as the stride-p
    /// convolution, `(B, C, H, W)` -> `(B, H/p·W/p, embed)`. Taken while gradients are recorded
    /// (training): candle's convolution backward computes the input's gradient with a naive
    /// transposed-convolution kernel on the GPU, even for an input that needs none.
    fn patchify_matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = x.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b * gh * gw, c * p * p))?;
        let weight = self.proj.weight().reshape((self.embed_dim, c * p * p))?;
        let mut y = patches.matmul(&weight.t()?)?;
        if let Some(bias) = self.proj.bias() {
            y = y.broadcast_add(bias)?;
        }
        Ok(y.reshape((b, gh * gw, self.embed_dim))?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let p = self.patch_size;
        if h % p != 0 || w % p != 0 {
            return Err(Error::Usage(format!("latent {h}x{w} is not divisible by the patch size {p}")));
        }
        let tokens = if self.proj.weight().track_op() {
            self.patchify_matmul(x)?
        } else if p == 1 {
            // A 1x1 patch is a per-pixel linear map: one GEMM over the tokens. (As a cuDNN
            // convolution it cost ~5 ms per call on the H200, nearly all host time in cuDNN's
            // per-call algorithm heuristics: more than a whole SANA block.)
            let (_, cin, _, _) = x.dims4()?;
            let weight = self.proj.weight().reshape((self.embed_dim, cin))?;
            let tokens = super::project(&x.flatten_from(2)?.transpose(1, 2)?, &weight)?;
            match self.proj.bias() {
                Some(bias) => tokens.broadcast_add(bias)?,
                None => tokens,
            }
        } else {
            self.proj.forward(x)?.flatten_from(2)?.transpose(1, 2)?.contiguous()?
        };
        match self.pos_embed {
            None => Ok(tokens),
            Some((base, scale)) => {
                let grid = (h / p, w / p);
                let mut cache = self.cache.lock().map_err(|_| Error::Other("patch embed cache poisoned".into()))?;
                let pe = match cache.as_ref() {
                    Some((g, pe)) if *g == grid && pe.device().same_device(x.device()) && pe.dtype() == tokens.dtype() => pe.clone(),
                    _ => {
                        let pe = sincos_2d(self.embed_dim, grid, base, scale, x.device())?.to_dtype(tokens.dtype())?.unsqueeze(0)?;
                        *cache = Some((grid, pe.clone()));
                        pe
                    }
                };
                Ok(tokens.broadcast_add(&pe)?)
            }
        }
    }
}
