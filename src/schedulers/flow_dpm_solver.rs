//! Flow-DPM-Solver++: diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True,
//! prediction_type="flow_prediction", flow_shift=S)` with its defaults: second order, multistep,
//! "midpoint" solver, `lower_order_final`, `final_sigmas_type="zero"` (SANA's default sampler).
//!
//! The schedule: `s_j = 1 - linspace(1, 1/1000, N+1)`, shifted `S·s/(1+(S−1)·s)`, reversed, last dropped;
//! the model sees `trunc(sigma·1000)`. With `alpha = 1 − sigma` and `lambda = ln(alpha/sigma)`, each step
//! forms `x0 = x − sigma·v`, then takes a first-order step (first and last steps) or a second-order
//! multistep step from the two newest `x0` predictions.

use candle_core::Tensor;

use super::{check_step_count, lincomb, np_linspace, Scheduler};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowDpmSolverConfig {
    /// SANA 512–2K: 3.0; SANA 4K: 6.0; SANA-Video: 8.0.
    pub flow_shift: f64,
    pub num_train_timesteps: usize,
}

impl FlowDpmSolverConfig {
    /// SANA 512px–2K and SANA-1.5 / SANA-Sprint-size images: shift 3.
    pub fn sana() -> Self {
        Self {
            flow_shift: 3.0,
            num_train_timesteps: 1000,
        }
    }

    /// SANA 4K: shift 6.
    pub fn sana_4k() -> Self {
        Self {
            flow_shift: 6.0,
            num_train_timesteps: 1000,
        }
    }

    /// SANA-Video: shift 8.
    pub fn sana_video() -> Self {
        Self {
            flow_shift: 8.0,
            num_train_timesteps: 1000,
        }
    }
}

impl Default for FlowDpmSolverConfig {
    fn default() -> Self {
        Self {
            flow_shift: 3.0,
            num_train_timesteps: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlowDpmSolver {
    timesteps: Vec<f64>,
    /// The f32 values diffusers stores, widened to f64.
    sigmas: Vec<f64>,
    /// `x0` predictions of the previous and the current step.
    previous_x0: Option<Tensor>,
    next_step: usize,
}

impl FlowDpmSolver {
    pub fn new(config: FlowDpmSolverConfig, num_steps: usize) -> Result<Self> {
        check_step_count(num_steps)?;
        if config.flow_shift.is_nan() || config.flow_shift <= 0.0 {
            return Err(Error::Usage(format!(
                "flow shift must be positive, got {}",
                config.flow_shift
            )));
        }
        let train = config.num_train_timesteps as f64;
        let shift = config.flow_shift;
        let alphas = np_linspace(1.0, 1.0 / train, num_steps + 1);
        // s runs from 0 up to 1 - 1/train; reversed, then the trailing (zero) entry dropped.
        let shifted: Vec<f64> = alphas
            .iter()
            .rev()
            .take(num_steps)
            .map(|a| {
                let s = 1.0 - a;
                shift * s / (1.0 + (shift - 1.0) * s)
            })
            .collect();
        let timesteps = shifted.iter().map(|s| (s * train).trunc()).collect();
        let mut sigmas: Vec<f64> = shifted.iter().map(|&s| s as f32 as f64).collect();
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            previous_x0: None,
            next_step: 0,
        })
    }

    /// The integer timesteps the transformer is conditioned on (diffusers' int64 tensor).
    pub fn timesteps_i64(&self) -> Vec<i64> {
        self.timesteps.iter().map(|&t| t as i64).collect()
    }

    fn lambda(sigma: f64) -> f64 {
        // ln(alpha) - ln(sigma); +inf at sigma = 0, where the update reduces to x0.
        (1.0 - sigma).ln() - sigma.ln()
    }
}

impl Scheduler for FlowDpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn reset(&mut self) {
        self.previous_x0 = None;
        self.next_step = 0;
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<Tensor> {
        if step_index != self.next_step || step_index >= self.num_steps() {
            return Err(Error::Other(format!(
                "flow DPM-Solver: step {step_index} called, expected step {} of {}",
                self.next_step,
                self.num_steps()
            )));
        }
        let out_dtype = model_output.dtype();
        let sigma_s0 = self.sigmas[step_index];
        let sigma_t = self.sigmas[step_index + 1];
        let x0 = lincomb(1.0, sample, -sigma_s0, model_output, out_dtype)?;

        let alpha_t = 1.0 - sigma_t;
        let lambda_t = Self::lambda(sigma_t);
        let lambda_s0 = Self::lambda(sigma_s0);
        let h = lambda_t - lambda_s0;
        let phi = (-h).exp() - 1.0; // e^{-h} - 1, which is -1 at the final zero sigma
        let last_step = step_index + 1 == self.num_steps();

        let prev = match (&self.previous_x0, last_step) {
            (Some(x0_prev), false) => {
                let sigma_s1 = self.sigmas[step_index - 1];
                let h0 = lambda_s0 - Self::lambda(sigma_s1);
                let r0 = h0 / h;
                // D0 = x0, D1 = (x0 - x0_prev) / r0; x_t = (σt/σs0)·x − α_t·φ·(D0 + D1/2)
                let x0_f = x0.to_dtype(candle_core::DType::F32)?;
                let d1 = (x0_f.clone() - x0_prev.to_dtype(candle_core::DType::F32)?)?.affine(1.0 / r0, 0.0)?;
                let correction = (x0_f + d1.affine(0.5, 0.0)?)?;
                lincomb(sigma_t / sigma_s0, sample, -alpha_t * phi, &correction, out_dtype)?
            }
            _ => lincomb(sigma_t / sigma_s0, sample, -alpha_t * phi, &x0, out_dtype)?,
        };
        self.previous_x0 = Some(x0);
        self.next_step += 1;
        Ok(prev)
    }
}
