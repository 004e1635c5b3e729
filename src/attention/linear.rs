//! SANA ReLU linear attention. (Stub: filled in by the dense/linear work.)
use super::{AttentionInput, LayerShape};
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub struct LinearParams {
    /// Added to the denominator: 1e-15 in diffusers, 1e-8 in the original SANA code.
    pub eps: f64,
    /// Block-causal form: chunk length in frames along the first grid axis. `None` = bidirectional.
    pub chunk_frames: Option<usize>,
}

impl Default for LinearParams {
    fn default() -> Self {
        Self { eps: 1e-15, chunk_frames: None }
    }
}

impl LinearParams {
    pub fn check(&self, _layer: &LayerShape) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// The constant-memory state of block-causal linear attention, carried from chunk to chunk.
#[derive(Debug, Clone)]
pub struct LinearState {
    /// `(B, H, D, D)` f32: `S[a, b] = Σ_m v_m[a] φ(k_m)[b]` (keys rotated in the RoPE form).
    pub kv: Tensor,
    /// `(B, H, D)` f32: `z = Σ_m φ(k_m)` (never rotated).
    pub k_sum: Tensor,
}

pub fn forward(_p: &LinearParams, _input: &AttentionInput) -> Result<Tensor> {
    Err(crate::error::Error::Other("linear attention: not written yet".into()))
}
