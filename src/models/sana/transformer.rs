//! `SanaTransformer2DModel` (spec sana.md §1.2): patch embed, AdaLN-single timestep embedding,
//! caption projection + RMSNorm, N blocks, modulated final norm, projection and unpatchify.

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use super::attention::TextKv;
use super::block::SanaBlock;
use super::config::SanaConfig;
use crate::attention::plan::AttentionPlan;
use crate::error::{Error, Result};
use crate::layers::{
    modulation_chunks, norm_modulate, AdaLayerNormSingle, CaptionProjection, PatchEmbed, RmsNorm,
    TimestepGuidanceEmbedding,
};

/// eps of the final LayerNorm (diffusers `SanaModulatedNorm(eps=1e-6)`, fixed).
const NORM_OUT_EPS: f64 = 1e-6;
/// eps of the caption RMSNorm (fixed in diffusers).
const CAPTION_NORM_EPS: f64 = 1e-5;

/// The timestep embedding: plain AdaLN-single or Sprint's timestep + guidance sum.
#[derive(Debug, Clone)]
enum TimeEmbed {
    Timestep(AdaLayerNormSingle),
    TimestepGuidance(TimestepGuidanceEmbedding),
}

/// What [`SanaTransformer::text_context`] computes once per prompt.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone)]
pub struct TextContext {
    batch: usize,
    mask: Tensor,
    kv: Vec<TextKv>,
    /// Unique per computed context (clones share it): what a CUDA graph checks to know whether
    /// the text it holds is this one.
    id: u64,
}

fn next_context_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl TextContext {
    /// `(batch, text tokens)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.mask.dim(1).unwrap_or(0))
    }

    /// Identifies this context (and its clones): a context made by another
    /// [`SanaTransformer::text_context`] call, or a deep copy, has another id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// A copy in fresh device memory with the same layouts, for a CUDA graph to read.
    pub(crate) fn deep_copy(&self) -> Result<Self> {
        Ok(Self {
            batch: self.batch,
            mask: self.mask.copy()?,
            kv: self.kv.iter().map(TextKv::deep_copy).collect::<Result<Vec<_>>>()?,
            id: next_context_id(),
        })
    }

    /// Overwrites this context's values in place with `src`'s; the shapes must agree.
    pub(crate) fn copy_from(&self, src: &TextContext) -> Result<()> {
        let same = self.mask.dims() == src.mask.dims()
            && self.kv.len() == src.kv.len()
            && self.kv.iter().zip(&src.kv).all(|(a, b)| a.dims() == b.dims());
        if !same {
            return Err(Error::Other("text context copy: the shapes differ".into()));
        }
        self.mask.slice_set(&src.mask, 0, 0)?;
        for (dst, src) in self.kv.iter().zip(&src.kv) {
            dst.copy_from(src)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct SanaTransformer {
    cfg: SanaConfig,
    patch_embed: PatchEmbed,
    time_embed: TimeEmbed,
    caption_projection: CaptionProjection,
    caption_norm: RmsNorm,
    blocks: Vec<SanaBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    dtype: DType,
}

impl SanaTransformer {
    /// Builds the model from diffusers-named weights (`vb` at the checkpoint root). Each attention
    /// layer's backend is resolved once here through `plan`, with the token grid of the config's
    /// sample size. A missing or mis-shaped tensor is an error naming it.
    pub fn new(cfg: &SanaConfig, plan: &AttentionPlan, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let c = cfg.inner_dim();
        let dtype = vb.dtype();
        let grid_side = (cfg.sample_size / cfg.patch_size).max(1);
        let grid = [grid_side, grid_side];
        let patch_embed = PatchEmbed::new(
            cfg.in_channels,
            c,
            cfg.patch_size,
            cfg.sample_size,
            cfg.interpolation_scale,
            vb.pp("patch_embed"),
        )?;
        let time_embed = if cfg.guidance_embeds {
            TimeEmbed::TimestepGuidance(TimestepGuidanceEmbedding::new(c, vb.pp("time_embed"))?)
        } else {
            TimeEmbed::Timestep(AdaLayerNormSingle::new(c, vb.pp("time_embed"))?)
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| SanaBlock::new(cfg, i, plan, grid, dtype, vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            time_embed,
            caption_projection: CaptionProjection::new(cfg.caption_channels, c, vb.pp("caption_projection"))?,
            caption_norm: RmsNorm::new(c, CAPTION_NORM_EPS, true, false, vb.pp("caption_norm"))?,
            blocks,
            scale_shift_table: vb.get((2, c), "scale_shift_table")?,
            proj_out: linear(c, cfg.patch_size * cfg.patch_size * cfg.out_channels(), vb.pp("proj_out"))?,
            dtype,
        })
    }

    pub fn config(&self) -> &SanaConfig {
        &self.cfg
    }

    pub fn blocks(&self) -> &[SanaBlock] {
        &self.blocks
    }

    /// The text side of every step, computed once per prompt: the projected, normalized caption's
    /// keys and values for each block's cross-attention, and the mask as f32.
    /// - `text`: `(B, L, caption_channels)`; `text_mask`: `(B, L)`, nonzero = real token.
    pub fn text_context(&self, text: &Tensor, text_mask: &Tensor) -> Result<TextContext> {
        let (b, l, tc) = text.dims3().map_err(|_| Error::Usage(format!("text must be (B, L, C), got {:?}", text.dims())))?;
        if tc != self.cfg.caption_channels {
            return Err(Error::Usage(format!("text {:?} must have {} channels", text.dims(), self.cfg.caption_channels)));
        }
        if text_mask.dims() != [b, l] {
            return Err(Error::Usage(format!("text mask must be ({b}, {l}), got {:?}", text_mask.dims())));
        }
        let caption = self.caption_norm.forward(&self.caption_projection.forward(&text.to_dtype(self.dtype)?.contiguous()?)?)?;
        let kv = self.blocks.iter().map(|block| block.cross_attention().text_kv(&caption)).collect::<Result<Vec<_>>>()?;
        Ok(TextContext { batch: b, mask: text_mask.to_dtype(DType::F32)?.contiguous()?, kv, id: next_context_id() })
    }

    /// Predicts the flow velocity.
    /// - `latents`: `(B, in_channels, H, W)`, H and W divisible by the patch size;
    /// - `timestep`: `(B,)` (already multiplied by `timestep_scale`, as diffusers' pipeline does);
    /// - `text`: `(B, L, caption_channels)`; `text_mask`: `(B, L)`, nonzero = real token;
    /// - `guidance`: `(B,)`, required exactly when the config has `guidance_embeds` (Sprint; already
    ///   multiplied by `guidance_embeds_scale`).
    ///
    /// Returns `(B, out_channels, H, W)` in the weights' dtype.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
        text_mask: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with_text(latents, timestep, &self.text_context(text, text_mask)?, guidance)
    }

    /// [`Self::forward`] with the text side from [`Self::text_context`] (a sampler calls this at
    /// every step with the same context).
    pub fn forward_with_text(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        text: &TextContext,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, cin, h, w) = latents
            .dims4()
            .map_err(|_| Error::Usage(format!("latents must be (B, C, H, W), got {:?}", latents.dims())))?;
        let p = self.cfg.patch_size;
        if cin != self.cfg.in_channels {
            return Err(Error::Usage(format!("latents have {cin} channels, the model expects {}", self.cfg.in_channels)));
        }
        if h % p != 0 || w % p != 0 {
            return Err(Error::Usage(format!("latent size {h}x{w} is not divisible by the patch size {p}")));
        }
        if timestep.dims() != [b] {
            return Err(Error::Usage(format!("timestep must be ({b},), got {:?}", timestep.dims())));
        }
        if text.batch != b {
            return Err(Error::Usage(format!("the text has batch {} but the latents {b}", text.batch)));
        }
        let grid = [h / p, w / p];

        let (mut x, temb, embedded) = self.embed(latents, timestep, guidance)?;
        for (block, kv) in self.blocks.iter().zip(&text.kv) {
            x = block.forward_cached(&x, &temb, kv, Some(&text.mask), grid)?;
        }
        self.final_layer(&x, &embedded, (h, w))
    }

    /// The step's input side: patch-embedded tokens `(B, h·w, C)`, the blocks' modulation
    /// `(B, 6C)` and the embedded timestep `(B, C)` (inputs as in [`Self::forward`], checked there).
    pub fn embed(&self, latents: &Tensor, timestep: &Tensor, guidance: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
        let b = latents.dim(0)?;
        let x = self.patch_embed.forward(&latents.to_dtype(self.dtype)?)?;
        let (temb, embedded) = match (&self.time_embed, guidance) {
            (TimeEmbed::Timestep(te), None) => te.forward(timestep, self.dtype)?,
            (TimeEmbed::TimestepGuidance(te), Some(g)) => {
                if g.dims() != [b] {
                    return Err(Error::Usage(format!("guidance must be ({b},), got {:?}", g.dims())));
                }
                te.forward(timestep, g, self.dtype)?
            }
            (TimeEmbed::Timestep(_), Some(_)) => {
                return Err(Error::Usage("this model has no guidance embedding; pass no guidance".into()))
            }
            (TimeEmbed::TimestepGuidance(_), None) => {
                return Err(Error::Usage("this model (guidance_embeds) needs a guidance value".into()))
            }
        };
        Ok((x, temb, embedded))
    }

    /// The step's output side: the modulated final norm, the projection and the unpatchify of
    /// the last block's tokens `x` `(B, h·w, C)` to `(B, out_channels, H, W)` for a latent of
    /// `H x W`.
    pub fn final_layer(&self, x: &Tensor, embedded: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let b = x.dim(0)?;
        let p = self.cfg.patch_size;
        // Shift first, then scale, from the embedded timestep (not the 6C vector).
        let m = modulation_chunks(&self.scale_shift_table, embedded, 2)?;
        let x = norm_modulate(x, &m[0], &m[1], NORM_OUT_EPS)?;
        let x = self.proj_out.forward(&x)?;

        // Unpatchify: proj_out channels are (ph, pw, c) with c fastest.
        let cout = self.cfg.out_channels();
        let (gh, gw) = (h / p, w / p);
        let x = x.reshape((b, gh, gw, p, p, cout))?.permute((0, 5, 1, 3, 2, 4))?;
        Ok(x.reshape((b, cout, h, w))?)
    }
}
