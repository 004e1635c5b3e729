//! Choosing a scheduler from a diffusers `scheduler_config.json` (the text; reading the file is
//! the caller's job). Only the configurations implemented here are accepted; anything that would
//! silently sample differently (another prediction type, Karras sigmas, thresholding, ...) is
//! refused with the field at fault.

use serde_json::Value;

use super::{FlowDpmSolver, FlowDpmSolverConfig, FlowEuler, FlowEulerConfig, Scheduler, ScmConfig};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerConfig {
    FlowDpmSolver(FlowDpmSolverConfig),
    FlowEuler(FlowEulerConfig),
    /// SANA-Sprint; the TrigFlow times are pipeline arguments, so they take SANA-Sprint's defaults.
    Scm(ScmConfig),
}

/// Python's json writes `Infinity`, `-Infinity` and `NaN` (diffusers' `lambda_min_clipped`);
/// they become `null` here, outside of strings.
fn replace_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let mut replaced = false;
        for word in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(word) {
                out.push_str("null");
                rest = &rest[word.len()..];
                replaced = true;
                break;
            }
        }
        if !replaced {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

struct Fields<'a> {
    value: &'a Value,
    origin: &'a str,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Spec {
            file: self.origin.to_string(),
            msg,
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(format!("`{key}` must be a number"))),
        }
    }

    /// The field must be absent, null, or equal to `expected`.
    fn expect(&self, key: &str, expected: Value) -> Result<()> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if *v == expected => Ok(()),
            Some(v) => Err(self.err(format!("`{key}` = {v} is not supported (only {expected})"))),
        }
    }

    fn train_steps(&self) -> Result<usize> {
        let n = self.f64_or("num_train_timesteps", 1000.0)?;
        if n < 1.0 || n.fract() != 0.0 {
            return Err(self.err(format!("`num_train_timesteps` = {n} must be a positive integer")));
        }
        Ok(n as usize)
    }
}

impl SchedulerConfig {
    /// The flow scheduler for `steps` sampling steps. SCM has its own loop (it takes fresh noise
    /// and converts the model output), so it is built directly as `ScmScheduler::new`.
    pub fn flow_scheduler(&self, steps: usize) -> Result<Box<dyn Scheduler + Send>> {
        match self {
            Self::FlowDpmSolver(c) => Ok(Box::new(FlowDpmSolver::new(*c, steps)?)),
            Self::FlowEuler(c) => Ok(Box::new(FlowEuler::new(*c, steps)?)),
            Self::Scm(_) => Err(Error::Usage(
                "SCM (SANA-Sprint) is not a flow scheduler: use ScmScheduler".into(),
            )),
        }
    }

    /// Parses the JSON text of a diffusers scheduler config; `origin` names it in errors.
    pub fn from_diffusers_json(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(&replace_non_finite(text)).map_err(|e| Error::Spec {
            file: origin.to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let f = Fields { value: &value, origin };
        let class = value.get("_class_name").and_then(Value::as_str).unwrap_or("");
        match class {
            "DPMSolverMultistepScheduler" => {
                f.expect("use_flow_sigmas", Value::Bool(true))
                    .and_then(|_| f.expect("prediction_type", "flow_prediction".into()))
                    .map_err(|_| {
                        f.err("only flow DPM-Solver (use_flow_sigmas, flow_prediction) is supported".into())
                    })?;
                f.expect("algorithm_type", "dpmsolver++".into())?;
                f.expect("solver_order", 2.into())?;
                f.expect("solver_type", "midpoint".into())?;
                f.expect("final_sigmas_type", "zero".into())?;
                f.expect("lower_order_final", Value::Bool(true))?;
                f.expect("euler_at_final", Value::Bool(false))?;
                f.expect("thresholding", Value::Bool(false))?;
                f.expect("use_dynamic_shifting", Value::Bool(false))?;
                for key in [
                    "use_karras_sigmas",
                    "use_lu_lambdas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                ] {
                    f.expect(key, Value::Bool(false))?;
                }
                let flow_shift = f.f64_or("flow_shift", 1.0)?;
                Ok(Self::FlowDpmSolver(FlowDpmSolverConfig {
                    flow_shift,
                    num_train_timesteps: f.train_steps()?,
                }))
            }
            "FlowMatchEulerDiscreteScheduler" => {
                for key in [
                    "use_dynamic_shifting",
                    "invert_sigmas",
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "stochastic_sampling",
                ] {
                    f.expect(key, Value::Bool(false))?;
                }
                f.expect("shift_terminal", Value::Null)?;
                let shift = f.f64_or("shift", 1.0)?;
                Ok(Self::FlowEuler(FlowEulerConfig {
                    shift,
                    num_train_timesteps: f.train_steps()?,
                }))
            }
            "SCMScheduler" => {
                f.expect("prediction_type", "trigflow".into())?;
                let sigma_data = f.f64_or("sigma_data", 0.5)?;
                Ok(Self::Scm(ScmConfig {
                    sigma_data,
                    ..ScmConfig::default()
                }))
            }
            other => Err(f.err(format!("scheduler `{other}` is not supported"))),
        }
    }
}
