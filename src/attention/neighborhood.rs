//! Generalized neighborhood attention (GNA). (Stub: filled in by the sparse-backends work.)
use super::{AttentionInput, LayerShape};
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub struct NeighborhoodParams {
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    pub dilation: Vec<usize>,
    pub causal: Vec<bool>,
    pub scale: Option<f64>,
}

impl NeighborhoodParams {
    pub fn check(&self, _layer: &LayerShape) -> std::result::Result<(), String> {
        Ok(())
    }
}

pub fn forward(_p: &NeighborhoodParams, _input: &AttentionInput) -> Result<(Tensor, Tensor)> {
    Err(crate::error::Error::Other("neighborhood attention: not written yet".into()))
}
