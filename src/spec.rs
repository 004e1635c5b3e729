//! Pipeline specs: the serde types of `pipelines/*.toml`.
//!
//! A spec names a model family and preset, where its weights come from, its dtype, its scheduler
//! with defaults, and an `[attention]` table: a backend per role, then per-layer overrides. Unknown
//! keys are errors that name the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Short name users pass to `--model`.
    pub name: String,
    /// One line for `gen models`.
    pub description: String,
    /// Model family: "sana", "tiny-shapes", ...
    pub family: String,
    /// Config preset of the family, e.g. "1600m-1024".
    pub preset: String,
    pub weights: WeightsSpec,
    /// Compute dtype: "f32", "f16" or "bf16".
    #[serde(default = "default_dtype")]
    pub dtype: String,
    pub scheduler: SchedulerSpec,
    #[serde(default)]
    pub defaults: DefaultsSpec,
    #[serde(default)]
    pub attention: AttentionSpec,
    /// Where this spec was read from (not a TOML key).
    #[serde(skip)]
    pub source: PathBuf,
}

fn default_dtype() -> String {
    "f32".into()
}

/// Where the weights come from: a hub repo (id + revision), a local folder, or a single file.
/// Relative local paths are relative to the spec file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsSpec {
    pub repo: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    pub path: Option<PathBuf>,
    /// Random weights of the preset's shape, seeded: for smoke tests and benchmarks.
    #[serde(default)]
    pub random: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    /// "flow-dpm-solver", "flow-euler" or "scm".
    pub kind: String,
    pub steps: usize,
    #[serde(default)]
    pub cfg: f64,
    /// Flow shift of the sigma schedule.
    #[serde(default = "one")]
    pub shift: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub negative_prompt: Option<String>,
}

/// `[attention]`: `self`, `cross`, `joint` defaults, then `[[attention.override]]` entries.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSpec {
    #[serde(rename = "self")]
    pub self_attention: Option<BackendSpec>,
    pub cross: Option<BackendSpec>,
    pub joint: Option<BackendSpec>,
    #[serde(default, rename = "override")]
    pub overrides: Vec<OverrideSpec>,
}

/// A backend and its parameters. All parameters of all backends are listed here; a parameter
/// that does not apply to the named backend is an error (see `attention::plan`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub backend: String,
    /// Backend to use instead when this one cannot serve the layer.
    pub fallback: Option<String>,
    // dense, neighborhood, pyramid
    pub scale: Option<f64>,
    // linear
    pub eps: Option<f64>,
    pub chunk_frames: Option<usize>,
    // neighborhood: one value per grid axis
    pub kernel: Option<Vec<usize>>,
    pub stride: Option<Vec<usize>>,
    pub dilation: Option<Vec<usize>>,
    pub causal: Option<Vec<bool>>,
    // pyramid
    pub block_q: Option<usize>,
    pub block_k: Option<usize>,
    /// Cumulative quota ends for pool factors 1, 2, 4, 8; the rest is skipped.
    pub levels: Option<Vec<f64>>,
    /// "topk" or "threshold".
    pub mode: Option<String>,
    pub seed: Option<u64>,
}

/// One `[[attention.override]]`: which layers (an index range "a-b" or "a", or a name glob with
/// `*`), optionally only those of one role, and the backend they use.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverrideSpec {
    pub layers: Option<String>,
    pub name: Option<String>,
    pub role: Option<String>,
    #[serde(rename = "use")]
    pub backend: BackendSpec,
}

impl PipelineSpec {
    pub fn parse(text: &str, source: &Path) -> Result<Self> {
        let mut spec: PipelineSpec = toml::from_str(text).map_err(|e| Error::Spec {
            file: source.display().to_string(),
            msg: e.message().to_string() + &location(text, e.span()),
        })?;
        spec.source = source.to_path_buf();
        spec.validate()?;
        Ok(spec)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Spec { file: self.source.display().to_string(), msg: msg.into() }
    }

    fn validate(&self) -> Result<()> {
        if !matches!(self.dtype.as_str(), "f32" | "f16" | "bf16") {
            return Err(self.err(format!("dtype `{}`: expected f32, f16 or bf16", self.dtype)));
        }
        let w = &self.weights;
        let sources = [w.repo.is_some(), w.path.is_some(), w.random.is_some()].iter().filter(|x| **x).count();
        if sources != 1 {
            return Err(self.err("[weights] needs exactly one of `repo`, `path` or `random`"));
        }
        if !matches!(self.scheduler.kind.as_str(), "flow-dpm-solver" | "flow-euler" | "scm") {
            return Err(self.err(format!(
                "scheduler kind `{}`: expected flow-dpm-solver, flow-euler or scm",
                self.scheduler.kind
            )));
        }
        if self.scheduler.steps == 0 {
            return Err(self.err("scheduler steps must be at least 1"));
        }
        // Building the plan checks every backend's parameters.
        crate::attention::plan::AttentionPlan::from_spec(&self.attention)
            .map_err(|e| self.err(format!("[attention]: {e}")))?;
        Ok(())
    }

    /// The weights path, resolved against the spec's folder.
    pub fn local_weights(&self) -> Option<PathBuf> {
        let p = self.weights.path.as_ref()?;
        Some(if p.is_absolute() { p.clone() } else { self.source.parent().unwrap_or(Path::new(".")).join(p) })
    }
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// The folder of built-in specs: `pipelines/` next to the crate, or `VISGEN_PIPELINES`.
pub fn pipelines_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VISGEN_PIPELINES") {
        return PathBuf::from(dir);
    }
    let beside_crate = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    if beside_crate.is_dir() {
        return beside_crate;
    }
    // A binary copied elsewhere: look beside the executable.
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|p| p.join("pipelines")))
        .unwrap_or(beside_crate)
}

/// Every spec in the pipelines folder, sorted by name. A spec that fails to parse is an error.
pub fn list_specs() -> Result<Vec<PipelineSpec>> {
    let dir = pipelines_dir();
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut specs = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(&dir, e))?.path();
        if path.extension().is_some_and(|x| x == "toml") {
            specs.push(PipelineSpec::load(&path)?);
        }
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

/// `--model` takes a spec name from the pipelines folder or a path to a spec file.
pub fn find_spec(model: &str) -> Result<PipelineSpec> {
    let as_path = Path::new(model);
    if model.ends_with(".toml") || as_path.is_file() {
        if !as_path.is_file() {
            return Err(Error::usage(format!("model spec file `{model}` does not exist")));
        }
        return PipelineSpec::load(as_path);
    }
    let path = pipelines_dir().join(format!("{model}.toml"));
    if path.is_file() {
        return PipelineSpec::load(&path);
    }
    let names: Vec<String> = list_specs().unwrap_or_default().into_iter().map(|s| s.name).collect();
    Err(Error::usage(format!("unknown model `{model}`; known models: {}", names.join(", "))))
}
