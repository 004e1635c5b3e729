//! Samplers for flow-matching diffusion, one algorithm per file. Tensor math only: no model, no
//! randomness of their own (a sampler that needs fresh noise takes it as an argument), no I/O.
//!
//! Conventions shared by every scheduler here:
//! - `sigma` is the flow-matching noise level: `x_sigma = (1 - sigma) * x0 + sigma * noise`.
//! - `timesteps()[i]` is what the model is conditioned on at step `i` (diffusers' `scheduler.timesteps`);
//!   `sigmas()` has one more entry than `timesteps()`, the final one being 0.
//! - Sample math runs in f32 whatever the model dtype (as diffusers upcasts), and the returned sample
//!   has the dtype of the model output.

pub mod config;
pub mod flow_dpm_solver;
pub mod flow_euler;
pub mod scm;

pub use config::SchedulerConfig;
pub use flow_dpm_solver::{FlowDpmSolver, FlowDpmSolverConfig};
pub use flow_euler::{FlowEuler, FlowEulerConfig};
pub use scm::{ScmConfig, ScmScheduler, ScmStep};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// A flow-matching sampler driven by a flow (velocity) prediction `v ≈ noise - x0`.
///
/// The denoising loop is
/// ```text
/// let mut x = noise * scheduler.init_noise_sigma();
/// for i in 0..scheduler.num_steps() {
///     let v = model(x, scheduler.timesteps()[i]);
///     x = scheduler.step(&v, i, &x)?;
/// }
/// ```
/// Multistep solvers keep a history, so `step` must be called with `i = 0, 1, 2, ...` in order;
/// `reset` starts a new trajectory.
pub trait Scheduler {
    /// The model conditioning value per step, as diffusers computes it (integers for DPM-Solver).
    fn timesteps(&self) -> &[f64];
    /// Noise levels per step plus the final 0: `num_steps() + 1` values.
    fn sigmas(&self) -> &[f64];
    /// Standard deviation of the initial latent noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }
    /// Advances `sample` from step `step_index` to the next noise level.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<Tensor>;
    /// Forgets the multistep history (a no-op for one-step methods).
    fn reset(&mut self) {}

    /// The forward process at step `step_index`: `sigma * noise + (1 - sigma) * sample` (image-to-image).
    fn scale_noise(&self, sample: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = *self.sigmas().get(step_index).ok_or_else(|| {
            Error::Usage(format!(
                "step index {step_index} is past the schedule of {} steps",
                self.num_steps()
            ))
        })?;
        let sigma = sigma as f32 as f64; // diffusers casts its sigma table to the sample dtype
        Ok((noise.affine(sigma, 0.0)? + sample.affine(1.0 - sigma, 0.0)?)?)
    }
}

/// `a * x + b * y` in f32, returned in `out_dtype`.
pub(crate) fn lincomb(a: f64, x: &Tensor, b: f64, y: &Tensor, out_dtype: DType) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let y = y.to_dtype(DType::F32)?;
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?.to_dtype(out_dtype)?)
}

/// `numpy.linspace(start, stop, num)` in f64, endpoint included, bit-compatible with numpy's formula.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `torch.linspace(start, end, steps, dtype=float32)`: computed in f32 from both ends, as ATen does.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        start + step * i as f32
                    } else {
                        end - step * (steps - i - 1) as f32
                    }
                })
                .collect()
        }
    }
}

pub(crate) fn check_step_count(steps: usize) -> Result<()> {
    if steps == 0 || steps > 1000 {
        return Err(Error::Usage(format!(
            "number of sampling steps must be between 1 and 1000, got {steps}"
        )));
    }
    Ok(())
}
