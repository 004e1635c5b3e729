//! Dense softmax attention. (Stub: filled in by the dense/linear work.)
use super::{AttentionInput, LayerShape};
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DenseParams {
    /// Softmax scale; `None` = `head_dim^-0.5`.
    pub scale: Option<f64>,
}

impl DenseParams {
    pub fn check(&self, _layer: &LayerShape) -> std::result::Result<(), String> {
        Ok(())
    }
}

pub fn forward(_p: &DenseParams, _input: &AttentionInput) -> Result<(Tensor, Tensor)> {
    Err(crate::error::Error::Other("dense attention: not written yet".into()))
}
