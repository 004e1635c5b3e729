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

use super::attention::{SanaCrossAttention, SanaSelfAttention, TextKv};
use super::config::SanaConfig;
use crate::attention::plan::AttentionPlan;
use crate::error::Result;
use crate::layers::{gated_residual, modulation_chunks, norm_modulate, GluMbConv};

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
        self.forward_cached(x, temb, &self.attn2.text_kv(text)?, text_mask, grid)
    }

    /// [`Self::forward`] with the text's keys and values computed once per prompt
    /// ([`SanaCrossAttention::text_kv`]). The residual adds take the projections' biases and the
    /// gates in one fused op each (`layers::gated_residual`).
    pub fn forward_cached(&self, x: &Tensor, temb: &Tensor, text: &TextKv, text_mask: Option<&Tensor>, grid: [usize; 2]) -> Result<Tensor> {
        let m = modulation_chunks(&self.scale_shift_table, temb, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);

        let h = norm_modulate(x, shift_msa, scale_msa, self.norm_eps)?.to_dtype(x.dtype())?;
        let x = if x.dtype() == DType::F16 {
            // The f16 clip of the attention output comes after its bias: no folding.
            gated_residual(x, &self.attn1.forward(&h, grid)?, None, Some(gate_msa))?
        } else {
            let (attn, bias) = self.attn1.forward_unbiased(&h, grid)?;
            gated_residual(x, &attn, bias, Some(gate_msa))?
        };

        let cross = self.attn2.forward_cached(&x, text, text_mask, false)?;
        let x = gated_residual(&x, &cross, self.attn2.output_bias(), None)?;

        let h = norm_modulate(&x, shift_mlp, scale_mlp, self.norm_eps)?;
        let ff = self.ff.forward_tokens(&h, grid)?;
        gated_residual(&x, &ff, None, Some(gate_mlp))
    }

    pub fn self_attention(&self) -> &SanaSelfAttention {
        &self.attn1
    }

    pub fn cross_attention(&self) -> &SanaCrossAttention {
        &self.attn2
    }
}
