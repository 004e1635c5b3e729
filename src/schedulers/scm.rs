//! sCM / TrigFlow few-step sampler of SANA-Sprint: diffusers' `SCMScheduler` plus the TrigFlow <->
//! flow conversions `SanaSprintPipeline` wraps around the transformer.
//!
//! Time `s` runs in TrigFlow units over [0, π/2]: `x_s = cos(s)·x0 + sin(s)·σd·z`. Each step predicts
//! `x0 = cos(s)·x − sin(s)·F` from the TrigFlow output F and re-noises to the next time with fresh
//! noise: `x' = cos(t)·x0 + sin(t)·σd·z'` (at t = 0 this is `x0`).
//!
//! The loop, as SanaSprintPipeline runs it:
//! ```text
//! let mut x = z * σd;                                   // z ~ N(0, 1)
//! for i in 0..scm.num_steps() {
//!     let s = scm.timesteps()[i];
//!     let t_flow = ScmScheduler::model_time(s);         // what the transformer is conditioned on
//!     let x_in = scm.model_input(&x, s)?;
//!     let v = transformer(x_in, t_flow, guidance);      // flow prediction
//!     let f = scm.trigflow_output(&x_in, &v, s)?;
//!     let out = scm.step(&f, i, &x, &z_i)?;             // z_i ~ N(0, 1), fresh per step
//!     x = out.prev_sample; denoised = out.denoised;
//! }
//! latents = denoised / σd
//! ```

use candle_core::{DType, Tensor};

use super::{check_step_count, lincomb, torch_linspace_f32};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScmConfig {
    pub sigma_data: f64,
    /// First TrigFlow time, just above π/2 rounded (1.57080 in diffusers).
    pub max_timesteps: f64,
    /// With exactly 2 steps, the middle time (SANA-Sprint: 1.3). Must be `None` for other step counts.
    pub intermediate_timesteps: Option<f64>,
}

impl Default for ScmConfig {
    /// SANA-Sprint's defaults: 2 steps through `[1.5708, 1.3, 0]`.
    // 1.57080 is diffusers' literal, not π/2: it must stay as written for parity
    #[allow(clippy::approx_constant)]
    fn default() -> Self {
        Self {
            sigma_data: 0.5,
            max_timesteps: 1.57080,
            intermediate_timesteps: Some(1.3),
        }
    }
}

/// One sCM step: the sample at the next time, and the current clean-sample prediction.
#[derive(Debug, Clone)]
pub struct ScmStep {
    pub prev_sample: Tensor,
    pub denoised: Tensor,
}

#[derive(Debug, Clone)]
pub struct ScmScheduler {
    config: ScmConfig,
    /// `num_steps + 1` TrigFlow times (f32 values widened), ending at 0.
    times: Vec<f64>,
}

impl ScmScheduler {
    pub fn new(config: ScmConfig, num_steps: usize) -> Result<Self> {
        check_step_count(num_steps)?;
        let times: Vec<f64> = match config.intermediate_timesteps {
            Some(mid) if num_steps == 2 => {
                vec![config.max_timesteps as f32 as f64, mid as f32 as f64, 0.0]
            }
            Some(_) => {
                return Err(Error::Usage(format!(
                    "SCM intermediate timestep only works with 2 steps, got {num_steps} steps"
                )))
            }
            None => torch_linspace_f32(config.max_timesteps as f32, 0.0, num_steps + 1)
                .into_iter()
                .map(|t| t as f64)
                .collect(),
        };
        Ok(Self { config, times })
    }

    /// A custom schedule of `num_steps + 1` TrigFlow times, decreasing to 0.
    pub fn with_times(sigma_data: f64, times: &[f64]) -> Result<Self> {
        if times.len() < 2 {
            return Err(Error::Usage("SCM needs at least two times (start and end)".into()));
        }
        let config = ScmConfig {
            sigma_data,
            max_timesteps: times[0],
            intermediate_timesteps: None,
        };
        Ok(Self {
            config,
            times: times.iter().map(|&t| t as f32 as f64).collect(),
        })
    }

    pub fn config(&self) -> &ScmConfig {
        &self.config
    }

    pub fn num_steps(&self) -> usize {
        self.times.len() - 1
    }

    /// The TrigFlow times the loop visits (without the final 0).
    pub fn timesteps(&self) -> &[f64] {
        &self.times[..self.times.len() - 1]
    }

    /// All `num_steps + 1` times, including the final 0.
    pub fn all_times(&self) -> &[f64] {
        &self.times
    }

    pub fn init_noise_sigma(&self) -> f64 {
        self.config.sigma_data
    }

    /// Flow-matching time in [0, 1] for TrigFlow time `s`: `sin s / (cos s + sin s)`. This is the
    /// value passed to the transformer as its timestep.
    pub fn model_time(s: f64) -> f64 {
        s.sin() / (s.cos() + s.sin())
    }

    fn flow_norm(t_flow: f64) -> f64 {
        (t_flow * t_flow + (1.0 - t_flow) * (1.0 - t_flow)).sqrt()
    }

    /// The transformer input at TrigFlow time `s`: `x / σd · sqrt(t² + (1 − t)²)`, t = model_time(s).
    pub fn model_input(&self, sample: &Tensor, s: f64) -> Result<Tensor> {
        let t = Self::model_time(s);
        Ok(sample.affine(Self::flow_norm(t) / self.config.sigma_data, 0.0)?)
    }

    /// Converts the transformer's flow prediction `v` (for input `x_in`) to the TrigFlow output F,
    /// scaled by σd, in f32: `((1 − 2t)·x_in + (1 − 2t + 2t²)·v) / sqrt(t² + (1 − t)²) · σd`.
    pub fn trigflow_output(&self, model_input: &Tensor, flow_pred: &Tensor, s: f64) -> Result<Tensor> {
        let t = Self::model_time(s);
        let scale = self.config.sigma_data / Self::flow_norm(t);
        lincomb(
            (1.0 - 2.0 * t) * scale,
            model_input,
            (1.0 - 2.0 * t + 2.0 * t * t) * scale,
            flow_pred,
            DType::F32,
        )
    }

    /// One sCM step from time index `step_index`. `noise` is standard normal with the sample's
    /// shape; it is scaled by σd here and only matters when the next time is above 0.
    pub fn step(&self, model_output: &Tensor, step_index: usize, sample: &Tensor, noise: &Tensor) -> Result<ScmStep> {
        if step_index >= self.num_steps() {
            return Err(Error::Other(format!(
                "SCM: step {step_index} is past the schedule of {} steps",
                self.num_steps()
            )));
        }
        let s = self.times[step_index];
        let t = self.times[step_index + 1];
        let dtype = model_output.dtype();
        let denoised = lincomb(s.cos(), sample, -s.sin(), model_output, dtype)?;
        let prev_sample = lincomb(t.cos(), &denoised, t.sin() * self.config.sigma_data, noise, dtype)?;
        Ok(ScmStep { prev_sample, denoised })
    }
}
