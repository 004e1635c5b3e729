//! tiny-shapes: the text encoder and the SANA transformer, predicting the flow velocity
//! `v = ε - x0` of `x_t = (1 - t) x0 + t ε` on RGB pixels in [-1, 1].

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::{Prediction, TinyShapesConfig, SAMPLE_PREDICTION_MIN_T};
use super::text_encoder::TextEncoder;
use crate::attention::plan::AttentionPlan;
use crate::error::Result;
use crate::models::sana::SanaTransformer;

#[derive(Debug, Clone)]
pub struct TinyShapesModel {
    cfg: TinyShapesConfig,
    text_encoder: TextEncoder,
    transformer: SanaTransformer,
}

impl TinyShapesModel {
    /// `vb` at the checkpoint root (`text_encoder.*`, `transformer.*`).
    pub fn new(cfg: &TinyShapesConfig, plan: &AttentionPlan, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: cfg.clone(),
            text_encoder: TextEncoder::new(&cfg.text, vb.pp("text_encoder"))?,
            transformer: SanaTransformer::new(&cfg.transformer, plan, vb.pp("transformer"))?,
        })
    }

    pub fn config(&self) -> &TinyShapesConfig {
        &self.cfg
    }

    pub fn transformer(&self) -> &SanaTransformer {
        &self.transformer
    }

    /// `ids`, `mask`: `(B, L)` -> text states `(B, L, D)`.
    pub fn encode_text(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.text_encoder.forward(ids, mask)
    }

    /// `x_t`: `(B, 3, H, W)`; `t`: `(B,)` in [0, 1]; `text`: `(B, L, D)`; `mask`: `(B, L)`.
    /// Returns the predicted velocity `(B, 3, H, W)` (f32 for a sample-predicting model, else
    /// `x_t`'s dtype).
    pub fn velocity(&self, x_t: &Tensor, t: &Tensor, text: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let timestep = (t.to_dtype(DType::F32)? * self.cfg.timestep_scale)?;
        let out = self.transformer.forward(x_t, &timestep, text, mask, None)?;
        match self.cfg.prediction {
            Prediction::Velocity => Ok(out),
            Prediction::Sample => {
                // v = (x_t - x0) / t, in f32 (the division amplifies rounding as t shrinks).
                let b = x_t.dim(0)?;
                let t = t.to_dtype(DType::F32)?.clamp(SAMPLE_PREDICTION_MIN_T, 1.0)?.reshape((b, 1, 1, 1))?;
                Ok((x_t.to_dtype(DType::F32)? - out.to_dtype(DType::F32)?)?.broadcast_div(&t)?)
            }
        }
    }
}
