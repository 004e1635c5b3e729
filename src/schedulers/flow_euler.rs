//! Flow-matching Euler: diffusers' `FlowMatchEulerDiscreteScheduler(shift=S)` with its defaults
//! (static shift, no terminal stretch, deterministic). Used by SANA-Video image-to-video.
//!
//! The schedule reproduces diffusers' double shift: the training table is already shifted, its
//! end points are taken as timesteps, spaced linearly, divided by 1000 and shifted once more.
//! `x_{i+1} = x_i + (sigma_{i+1} − sigma_i)·v`.

use candle_core::Tensor;

use super::{check_step_count, lincomb, np_linspace, Scheduler};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowEulerConfig {
    pub shift: f64,
    pub num_train_timesteps: usize,
}

impl Default for FlowEulerConfig {
    fn default() -> Self {
        Self {
            shift: 1.0,
            num_train_timesteps: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlowEuler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl FlowEuler {
    pub fn new(config: FlowEulerConfig, num_steps: usize) -> Result<Self> {
        check_step_count(num_steps)?;
        if config.shift.is_nan() || config.shift <= 0.0 {
            return Err(Error::Usage(format!(
                "flow shift must be positive, got {}",
                config.shift
            )));
        }
        let train = config.num_train_timesteps as f64;
        let shift = config.shift;
        // The training table is built in f32 by diffusers: its first entry is the shift of
        // train/train = 1 and its last the shift of 1/train.
        let shift_f32 = |s: f32| (shift as f32) * s / (1.0f32 + (shift as f32 - 1.0f32) * s);
        let sigma_max = shift_f32(1.0) as f64;
        let sigma_min = shift_f32(1.0f32 / train as f32) as f64;

        let sigmas_f32: Vec<f32> = np_linspace(sigma_max * train, sigma_min * train, num_steps)
            .into_iter()
            .map(|t| {
                let s = t / train;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas_f32.iter().map(|&s| (s * train as f32) as f64).collect();
        let mut sigmas: Vec<f64> = sigmas_f32.iter().map(|&s| s as f64).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }
}

impl Scheduler for FlowEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<Tensor> {
        if step_index >= self.num_steps() {
            return Err(Error::Other(format!(
                "flow Euler: step {step_index} is past the schedule of {} steps",
                self.num_steps()
            )));
        }
        // diffusers subtracts the two f32 sigmas in f32
        let dt = (self.sigmas[step_index + 1] as f32 - self.sigmas[step_index] as f32) as f64;
        lincomb(1.0, sample, dt, model_output, model_output.dtype())
    }
}
