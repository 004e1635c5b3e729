//! Per-layer resolution of a pipeline spec's `[attention]` table into backends.
//!
//! A model asks the plan once per attention layer, at load time, which backend serves it. The
//! answer is the last matching override (by index range, name glob, optionally role), else the
//! default of the layer's role. The chosen backend must accept the layer's shape; if it refuses,
//! the spec's named fallback is tried; if there is none, loading fails with the reason.

use super::pyramid::LevelMode;
use super::{Backend, DenseParams, LayerShape, LinearParams, NeighborhoodParams, PyramidParams, Role};
use crate::error::{Error, Result};
use crate::spec::{AttentionSpec, BackendSpec, OverrideSpec};

/// Which attention layer is asking.
#[derive(Debug, Clone, Copy)]
pub struct LayerRef<'a> {
    /// Block index in the model.
    pub index: usize,
    /// The layer's checkpoint prefix, e.g. `transformer_blocks.3.attn1`.
    pub name: &'a str,
    pub role: Role,
}

/// A backend with the fallback to use when it cannot serve a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub backend: Backend,
    pub fallback: Option<Backend>,
}

#[derive(Debug, Clone, PartialEq)]
enum Selector {
    Indices(std::ops::RangeInclusive<usize>),
    NameGlob(String),
    All,
}

#[derive(Debug, Clone, PartialEq)]
struct Override {
    selector: Selector,
    role: Option<Role>,
    choice: Choice,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    self_attention: Choice,
    cross: Choice,
    joint: Choice,
    overrides: Vec<Override>,
}

impl Default for AttentionPlan {
    fn default() -> Self {
        Self::uniform(Backend::Dense(DenseParams::default()), Backend::Dense(DenseParams::default()))
    }
}

impl AttentionPlan {
    /// One backend for every self-attention layer, one for every cross-attention layer; joint
    /// attention is dense.
    pub fn uniform(self_backend: Backend, cross_backend: Backend) -> Self {
        let plain = |backend| Choice { backend, fallback: None };
        Self {
            self_attention: plain(self_backend),
            cross: plain(cross_backend),
            joint: plain(Backend::Dense(DenseParams::default())),
            overrides: Vec::new(),
        }
    }

    pub fn from_spec(spec: &AttentionSpec) -> Result<Self> {
        let mut plan = Self::default();
        let defaults = [
            (&spec.self_attention, &mut plan.self_attention, "self"),
            (&spec.cross, &mut plan.cross, "cross"),
            (&spec.joint, &mut plan.joint, "joint"),
        ];
        for (given, slot, role) in defaults {
            if let Some(b) = given {
                *slot = choice_from_spec(b).map_err(|e| Error::usage(format!("`{role}`: {e}")))?;
            }
        }
        for (i, o) in spec.overrides.iter().enumerate() {
            let parsed = override_from_spec(o).map_err(|e| Error::usage(format!("override #{}: {e}", i + 1)))?;
            plan.overrides.push(parsed);
        }
        Ok(plan)
    }

    /// Adds a command-line override `LAYER=BACKEND[,key=value...]`, where LAYER is a role
    /// (`self`, `cross`, `joint`), an index or range (`3`, `0-4`), or a name glob
    /// (`transformer_blocks.*.attn1`), and list values are written `7x7`. Later overrides win.
    pub fn add_cli_override(&mut self, text: &str) -> Result<()> {
        let bad = |msg: String| Error::usage(format!("--attention `{text}`: {msg}"));
        let (layer, rest) = text.split_once('=').ok_or_else(|| bad("expected LAYER=BACKEND".into()))?;
        let backend = backend_spec_from_cli(rest).map_err(bad)?;
        let choice = choice_from_spec(&backend).map_err(bad)?;
        let layer = layer.trim();
        let (selector, role) = match parse_role(layer) {
            Some(role) => (Selector::All, Some(role)),
            None => (parse_selector(layer).map_err(bad)?, None),
        };
        self.overrides.push(Override { selector, role, choice });
        Ok(())
    }

    /// The backend for one layer, checked against its shape. Called once per layer at load time.
    pub fn resolve(&self, layer: &LayerRef, shape: &LayerShape) -> Result<Backend> {
        let choice = self
            .overrides
            .iter()
            .rev()
            .find(|o| o.matches(layer))
            .map(|o| &o.choice)
            .unwrap_or(match layer.role {
                Role::SelfAttention => &self.self_attention,
                Role::Cross => &self.cross,
                Role::Joint => &self.joint,
            });
        let refusal = match choice.backend.check(shape) {
            Ok(()) => return Ok(choice.backend.clone()),
            Err(reason) => reason,
        };
        let refused = |backend: &Backend, reason: String| Error::Attention {
            layer: layer.name.to_string(),
            backend: backend.name().to_string(),
            reason,
        };
        match &choice.fallback {
            None => Err(refused(&choice.backend, refusal)),
            Some(fallback) => match fallback.check(shape) {
                Ok(()) => Ok(fallback.clone()),
                Err(reason) => Err(refused(
                    &choice.backend,
                    format!("{refusal}; and its fallback {} cannot either: {reason}", fallback.name()),
                )),
            },
        }
    }
}

impl Override {
    fn matches(&self, layer: &LayerRef) -> bool {
        if self.role.is_some_and(|r| r != layer.role) {
            return false;
        }
        match &self.selector {
            Selector::All => true,
            Selector::Indices(range) => range.contains(&layer.index),
            Selector::NameGlob(glob) => glob_matches(glob, layer.name),
        }
    }
}

fn parse_role(text: &str) -> Option<Role> {
    match text {
        "self" => Some(Role::SelfAttention),
        "cross" => Some(Role::Cross),
        "joint" => Some(Role::Joint),
        _ => None,
    }
}

fn parse_selector(text: &str) -> std::result::Result<Selector, String> {
    let number = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("`{s}` is not a layer index"));
    if text.is_empty() {
        return Err("empty layer selector".into());
    }
    if text.chars().all(|c| c.is_ascii_digit() || c == '-' || c == ' ') {
        let (a, b) = match text.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(text)?, number(text)?),
        };
        if a > b {
            return Err(format!("layer range `{text}` is empty"));
        }
        return Ok(Selector::Indices(a..=b));
    }
    Ok(Selector::NameGlob(text.to_string()))
}

/// `*` matches any run of characters (dots included); everything else is literal.
fn glob_matches(glob: &str, name: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || !name[first.len()..].ends_with(last) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

fn override_from_spec(o: &OverrideSpec) -> std::result::Result<Override, String> {
    let selector = match (&o.layers, &o.name) {
        (Some(_), Some(_)) => return Err("give `layers` or `name`, not both".into()),
        (Some(range), None) => match parse_selector(range)? {
            Selector::NameGlob(_) => return Err(format!("`layers = \"{range}\"`: expected an index or range like 0-4")),
            s => s,
        },
        (None, Some(glob)) => Selector::NameGlob(glob.clone()),
        (None, None) => Selector::All,
    };
    let role = match &o.role {
        None => None,
        Some(r) => Some(parse_role(r).ok_or_else(|| format!("role `{r}`: expected self, cross or joint"))?),
    };
    if selector == Selector::All && role.is_none() {
        return Err("an override needs `layers`, `name` or `role`".into());
    }
    Ok(Override { selector, role, choice: choice_from_spec(&o.backend)? })
}

fn choice_from_spec(spec: &BackendSpec) -> std::result::Result<Choice, String> {
    let backend = backend_from_spec(spec)?;
    let fallback = match &spec.fallback {
        None => None,
        Some(name) => Some(backend_from_spec(&BackendSpec { backend: name.clone(), ..Default::default() })?),
    };
    Ok(Choice { backend, fallback })
}

/// Builds a backend from its spec; a parameter that does not apply to it is an error.
pub fn backend_from_spec(spec: &BackendSpec) -> std::result::Result<Backend, String> {
    let given: Vec<&str> = [
        ("scale", spec.scale.is_some()),
        ("eps", spec.eps.is_some()),
        ("chunk_frames", spec.chunk_frames.is_some()),
        ("kernel", spec.kernel.is_some()),
        ("stride", spec.stride.is_some()),
        ("dilation", spec.dilation.is_some()),
        ("causal", spec.causal.is_some()),
        ("block_q", spec.block_q.is_some()),
        ("block_k", spec.block_k.is_some()),
        ("levels", spec.levels.is_some()),
        ("mode", spec.mode.is_some()),
        ("seed", spec.seed.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, present)| present.then_some(key))
    .collect();
    let allowed: &[&str] = match spec.backend.as_str() {
        "dense" => &["scale"],
        "linear" => &["eps", "chunk_frames"],
        "neighborhood" => &["scale", "kernel", "stride", "dilation", "causal"],
        "pyramid" => &["scale", "block_q", "block_k", "levels", "mode", "seed"],
        other => return Err(format!("unknown backend `{other}`; expected dense, linear, neighborhood or pyramid")),
    };
    if let Some(key) = given.iter().find(|k| !allowed.contains(k)) {
        return Err(format!("key `{key}` does not apply to backend `{}`", spec.backend));
    }
    Ok(match spec.backend.as_str() {
        "dense" => Backend::Dense(DenseParams { scale: spec.scale }),
        "linear" => {
            let mut p = LinearParams::default();
            if let Some(eps) = spec.eps {
                p.eps = eps;
            }
            p.chunk_frames = spec.chunk_frames;
            Backend::Linear(p)
        }
        "neighborhood" => Backend::Neighborhood(neighborhood_from_spec(spec)?),
        _ => Backend::Pyramid(pyramid_from_spec(spec)?),
    })
}

fn neighborhood_from_spec(spec: &BackendSpec) -> std::result::Result<NeighborhoodParams, String> {
    let kernel = spec.kernel.clone().ok_or("backend `neighborhood` needs `kernel` (one size per grid axis)")?;
    let rank = kernel.len();
    if !(1..=3).contains(&rank) {
        return Err(format!("`kernel` has {rank} axes; expected 1 to 3"));
    }
    let per_axis = |name: &str, v: &Option<Vec<usize>>| -> std::result::Result<Vec<usize>, String> {
        match v {
            None => Ok(vec![1; rank]),
            Some(v) if v.len() == rank => Ok(v.clone()),
            Some(v) => Err(format!("`{name}` has {} values but `kernel` has {rank}", v.len())),
        }
    };
    let causal = match &spec.causal {
        None => vec![false; rank],
        Some(c) if c.len() == rank => c.clone(),
        Some(c) => return Err(format!("`causal` has {} values but `kernel` has {rank}", c.len())),
    };
    Ok(NeighborhoodParams {
        stride: per_axis("stride", &spec.stride)?,
        dilation: per_axis("dilation", &spec.dilation)?,
        kernel,
        causal,
        scale: spec.scale,
    })
}

fn pyramid_from_spec(spec: &BackendSpec) -> std::result::Result<PyramidParams, String> {
    let mut p = PyramidParams::default();
    if let Some(b) = spec.block_q {
        p.block_q = b;
    }
    if let Some(b) = spec.block_k {
        p.block_k = b;
        p.tile_k = p.tile_k.min(b);
    }
    if let Some(ends) = &spec.levels {
        if ends.is_empty() || ends.len() > 4 {
            return Err(format!("`levels` has {} values; expected 1 to 4 (pool 1, 2, 4, 8)", ends.len()));
        }
        if ends.windows(2).any(|w| w[1] < w[0]) || ends.iter().any(|e| !(0.0..=1.0).contains(e)) {
            return Err("`levels` must be non-decreasing cumulative fractions in [0, 1]".into());
        }
        p.levels = ends.iter().enumerate().map(|(i, &end)| (1usize << i, end)).collect();
    }
    if let Some(mode) = &spec.mode {
        p.mode = match mode.as_str() {
            "topk" => LevelMode::Topk,
            "threshold" => LevelMode::Threshold,
            other => return Err(format!("`mode = \"{other}\"`: expected topk or threshold")),
        };
    }
    if let Some(seed) = spec.seed {
        p.seed = seed;
    }
    p.scale = spec.scale;
    Ok(p)
}

/// `neighborhood,kernel=7x7,stride=2x2` -> BackendSpec, through TOML so unknown keys are named.
fn backend_spec_from_cli(text: &str) -> std::result::Result<BackendSpec, String> {
    let mut parts = text.split(',');
    let name = parts.next().unwrap_or("").trim();
    let mut toml_text = format!("backend = {}\n", toml_string(name));
    for part in parts {
        let (key, value) = part.split_once('=').ok_or_else(|| format!("`{part}`: expected key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        let items: Vec<&str> = value.split('x').collect();
        let literal = |v: &str| -> String {
            match (key, v) {
                ("causal", "1" | "true") => "true".into(),
                ("causal", "0" | "false") => "false".into(),
                _ if v.parse::<f64>().is_ok() => v.into(),
                _ => toml_string(v),
            }
        };
        let is_list = matches!(key, "kernel" | "stride" | "dilation" | "causal" | "levels");
        let rendered = if is_list {
            format!("[{}]", items.iter().map(|v| literal(v)).collect::<Vec<_>>().join(", "))
        } else {
            literal(value)
        };
        toml_text.push_str(&format!("{key} = {rendered}\n"));
    }
    toml::from_str(&toml_text).map_err(|e| e.message().to_string())
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_matches("transformer_blocks.*.attn1", "transformer_blocks.12.attn1"));
        assert!(!glob_matches("transformer_blocks.*.attn1", "transformer_blocks.12.attn2"));
        assert!(glob_matches("*", "x"));
        assert!(glob_matches("a*b*c", "aXbYc"));
        assert!(!glob_matches("a*b*c", "aXc"));
        assert!(!glob_matches("ab*ba", "aba"));
    }
}
