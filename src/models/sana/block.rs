//! One SANA transformer block (diffusers `SanaTransformerBlock`, spec sana.md §1.3):
//!
//! ```text
//! shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table + temb.reshape(B, 6, C)
//! x = x + gate_msa · attn1(LN(x) · (1 + scale_msa) + shift_msa)
//! x = x + attn2(x, text)                      (no norm, no gate)
//! x = x + gate_mlp · MixFFN(LN(x) · (1 + scale_mlp) + shift_mlp)   (as an NCHW image)
//! ```

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::attention::{SanaCrossAttention, SanaSelfAttention};
use super::config::SanaConfig;
use crate::attention::plan::AttentionPlan;
use crate::error::Result;
use crate::layers::{modulation_chunks, norm_modulate, GluMbConv};

#[derive(Debug, Clone)]
pub struct SanaBlock {
    scale_shift_table: Tensor,
    attn1: SanaSelfAttention,
    attn2: SanaCrossAttention,
    ff: GluMbConv,
    norm_eps: f64,
}

impl SanaBlock {
    /// `vb` at `transformer_blocks.{index}`. Keys: `scale_shift_table (6, C)`, `attn1.*`, `attn2.*`,
    /// `ff.conv_{inverted,depth,point}.*`.
    pub fn new(cfg: &SanaConfig, index: usize, plan: &AttentionPlan, grid: [usize; 2], dtype: DType, vb: VarBuilder) -> Result<Self> {
        let c = cfg.inner_dim();
        Ok(Self {
            scale_shift_table: vb.get((6, c), "scale_shift_table")?,
            attn1: SanaSelfAttention::new(cfg, index, plan, grid, dtype, vb.pp("attn1"))?,
            attn2: SanaCrossAttention::new(cfg, index, plan, dtype, vb.pp("attn2"))?,
            ff: GluMbConv::new(c, c, cfg.mlp_ratio, false, false, vb.pp("ff"))?,
            norm_eps: cfg.norm_eps,
        })
    }

    /// `x`: `(B, h·w, C)`; `temb`: `(B, 6C)`; `text`: `(B, L, C)`; `text_mask`: `(B, L)`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, text: &Tensor, text_mask: Option<&Tensor>, grid: [usize; 2]) -> Result<Tensor> {
        let m = modulation_chunks(&self.scale_shift_table, temb, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);

        let h = norm_modulate(x, shift_msa, scale_msa, self.norm_eps)?.to_dtype(x.dtype())?;
        let attn = self.attn1.forward(&h, grid)?;
        let x = (x + attn.broadcast_mul(gate_msa)?)?;

        let x = (&x + self.attn2.forward(&x, text, text_mask)?)?;

        let h = norm_modulate(&x, shift_mlp, scale_mlp, self.norm_eps)?;
        let (b, n, c) = h.dims3()?;
        let image = h.transpose(1, 2)?.reshape((b, c, grid[0], grid[1]))?;
        let ff = self.ff.forward(&image)?.reshape((b, c, n))?.transpose(1, 2)?;
        Ok((x + ff.broadcast_mul(gate_mlp)?)?)
    }

    pub fn self_attention(&self) -> &SanaSelfAttention {
        &self.attn1
    }

    pub fn cross_attention(&self) -> &SanaCrossAttention {
        &self.attn2
    }
}
