//! Pyramid sparse attention (PSA). (Stub: filled in by the sparse-backends work.)
use super::{AttentionInput, LayerShape};
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub struct PyramidParams {
    pub block_q: usize,
    pub block_k: usize,
}

impl Default for PyramidParams {
    fn default() -> Self {
        Self { block_q: 128, block_k: 64 }
    }
}

impl PyramidParams {
    pub fn check(&self, _layer: &LayerShape) -> std::result::Result<(), String> {
        Ok(())
    }
}

pub fn forward(_p: &PyramidParams, _input: &AttentionInput) -> Result<Tensor> {
    Err(crate::error::Error::Other("pyramid attention: not written yet".into()))
}
