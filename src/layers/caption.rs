//! Caption projection (diffusers `PixArtAlphaTextProjection`): Linear, GELU (tanh), Linear.

use candle_core::{Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct CaptionProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl CaptionProjection {
    /// Keys: `linear_1.{weight,bias}` `(hidden, in)`, `linear_2.{weight,bias}` `(hidden, hidden)`.
    pub fn new(in_features: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear_1: linear(in_features, hidden, vb.pp("linear_1"))?, linear_2: linear(hidden, hidden, vb.pp("linear_2"))? })
    }

    pub fn forward(&self, caption: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, as `nn.GELU(approximate="tanh")`.
        let h = self.linear_1.forward(caption)?.gelu()?;
        Ok(self.linear_2.forward(&h)?)
    }
}
