//! Where weights come from and how they are opened.
//!
//! A [`ModelSource`] names a hub repo (`org/name`, optionally `@revision`), a local diffusers
//! folder (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`,
//! `scheduler/`), or a single `.safetensors` file. [`ModelRepo`] resolves files of a source (from
//! the hub cache, downloading when allowed) and finds a component's weights: one file, or shards
//! with their `*.safetensors.index.json`, optionally of a variant (`fp16`, `bf16`: diffusers'
//! `diffusion_pytorch_model.bf16.safetensors`). [`Weights`] opens them for a candle `VarBuilder`.
//!
//! Published SANA repos (diffusers layout): `Efficient-Large-Model/Sana_1600M_1024px_diffusers`,
//! `Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers` (variant bf16),
//! `Efficient-Large-Model/Sana_600M_1024px_diffusers`, `Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers`.

pub mod hub;
pub mod random;
pub mod safetensors;

pub use self::hub::{HubConfig, HubRepo};
pub use self::safetensors::{read_index, WeightFiles, Weights};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// What the user named as the model.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Hub { repo_id: String, revision: Option<String> },
    Folder(PathBuf),
    File(PathBuf),
}

impl ModelSource {
    /// An existing path is a folder or a `.safetensors` file; otherwise `org/name[@revision]` is a
    /// hub repo id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Folder(path.to_path_buf()));
        }
        if path.is_file() {
            return if spec.ends_with(".safetensors") {
                Ok(Self::File(path.to_path_buf()))
            } else {
                Err(Error::Usage(format!("{spec}: a model file must be .safetensors")))
            };
        }
        let (repo_id, revision) = match spec.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
            Some(_) => return Err(Error::Usage(format!("{spec}: empty revision after @"))),
            None => (spec, None),
        };
        let parts: Vec<&str> = repo_id.split('/').collect();
        let looks_like_repo = parts.len() == 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
            && !repo_id.starts_with('.');
        if looks_like_repo {
            Ok(Self::Hub {
                repo_id: repo_id.to_string(),
                revision,
            })
        } else {
            Err(Error::Usage(format!(
                "{spec}: no such file or folder, and not a hub repo id (org/name)"
            )))
        }
    }
}

/// The parsed `model_index.json` of a diffusers folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIndex {
    pub class_name: Option<String>,
    /// component -> (library, class), e.g. "transformer" -> ("diffusers", "SanaTransformer2DModel")
    pub components: BTreeMap<String, (Option<String>, Option<String>)>,
}

impl ModelIndex {
    pub fn parse(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
            file: path.display().to_string(),
            tensor: String::new(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let object = value.as_object().ok_or_else(|| Error::Weights {
            file: path.display().to_string(),
            tensor: String::new(),
            msg: "expected a JSON object".into(),
        })?;
        let mut components = BTreeMap::new();
        for (key, entry) in object {
            if key.starts_with('_') {
                continue;
            }
            if let Some([library, class]) = entry.as_array().map(|a| a.as_slice()) {
                let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
                components.insert(key.clone(), (s(library), s(class)));
            }
        }
        let class_name = object.get("_class_name").and_then(|v| v.as_str()).map(str::to_string);
        Ok(Self { class_name, components })
    }
}

/// A resolved model source whose files can be fetched by relative path.
#[derive(Debug)]
pub enum ModelRepo {
    Folder(PathBuf),
    File(PathBuf),
    Hub {
        repo: HubRepo,
        listing: OnceLock<Option<Vec<String>>>,
    },
}

/// Variants tried, in order, when none is asked for and a component has no plain weight files.
pub const KNOWN_VARIANTS: [&str; 2] = ["bf16", "fp16"];

/// The weight file names diffusers and transformers write, most specific first.
fn weight_candidates(variant: Option<&str>) -> Vec<(String, bool)> {
    let mut names = Vec::new();
    for base in ["diffusion_pytorch_model", "model"] {
        if let Some(v) = variant {
            names.push((format!("{base}.{v}.safetensors"), false));
            names.push((format!("{base}.safetensors.index.{v}.json"), true));
        }
    }
    for base in ["diffusion_pytorch_model", "model"] {
        names.push((format!("{base}.safetensors"), false));
        names.push((format!("{base}.safetensors.index.json"), true));
    }
    names
}

impl ModelRepo {
    pub fn open(source: &ModelSource, hub: &HubConfig) -> Result<Self> {
        Ok(match source {
            ModelSource::Folder(dir) => Self::Folder(dir.clone()),
            ModelSource::File(file) => Self::File(file.clone()),
            ModelSource::Hub { repo_id, revision } => Self::Hub {
                repo: HubRepo::new(repo_id, revision.as_deref(), hub.clone())?,
                listing: OnceLock::new(),
            },
        })
    }

    fn describe(&self, rel: &str) -> String {
        match self {
            Self::Folder(dir) => dir.join(rel).display().to_string(),
            Self::File(file) => file.display().to_string(),
            Self::Hub { repo, .. } => format!("{}@{}/{rel}", repo.repo_id, repo.revision),
        }
    }

    fn missing(&self, rel: &str, msg: impl Into<String>) -> Error {
        Error::Weights {
            file: self.describe(rel),
            tensor: String::new(),
            msg: msg.into(),
        }
    }

    /// Whether the source has the file (for the hub: in the repo listing or the cache).
    pub fn has_file(&self, rel: &str) -> bool {
        match self {
            Self::Folder(dir) => dir.join(rel).is_file(),
            Self::File(_) => false,
            Self::Hub { repo, listing } => {
                repo.cached_file(rel).is_some()
                    || listing
                        .get_or_init(|| repo.list_files().ok())
                        .as_ref()
                        .map(|files| files.iter().any(|f| f == rel))
                        .unwrap_or(false)
            }
        }
    }

    /// The local path of a file of the source (downloading it from the hub if needed and allowed).
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        match self {
            Self::Folder(dir) => {
                let path = dir.join(rel);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(self.missing(rel, "file not found"))
                }
            }
            Self::File(_) => Err(self.missing(rel, format!("a single weights file has no `{rel}`"))),
            Self::Hub { repo, .. } => repo.file(rel),
        }
    }

    pub fn model_index(&self) -> Result<ModelIndex> {
        ModelIndex::parse(&self.file("model_index.json")?)
    }

    /// `component/config.json` (models) or `component/scheduler_config.json` (schedulers).
    pub fn component_config(&self, component: &str) -> Result<PathBuf> {
        let config = join(component, "config.json");
        if self.has_file(&config) {
            return self.file(&config);
        }
        let scheduler = join(component, "scheduler_config.json");
        if self.has_file(&scheduler) {
            return self.file(&scheduler);
        }
        Err(self.missing(&config, "component has no config.json"))
    }

    /// `tokenizer/tokenizer.json` (the fast-tokenizer file the tokenizers crate reads).
    pub fn tokenizer_json(&self, component: &str) -> Result<PathBuf> {
        let path = self.file(&join(component, "tokenizer.json"))?;
        // the special tokens live beside it; fetch them too when they exist
        let config = join(component, "tokenizer_config.json");
        if self.has_file(&config) {
            self.file(&config)?;
        }
        Ok(path)
    }

    /// The weight files of a component (`""` for a repo that is a single model). With a variant,
    /// its files are preferred and the plain files are the fallback; without one, the plain files
    /// are preferred and [`KNOWN_VARIANTS`] the fallback. A single-file source returns its file
    /// whatever the component.
    pub fn component_weights(&self, component: &str, variant: Option<&str>) -> Result<WeightFiles> {
        if let Self::File(file) = self {
            return Ok(WeightFiles::Single(file.clone()));
        }
        let candidates = weight_candidates(variant);
        for (name, sharded) in &candidates {
            let rel = join(component, name);
            if !self.has_file(&rel) {
                continue;
            }
            let path = self.file(&rel)?;
            if !sharded {
                return Ok(WeightFiles::Single(path));
            }
            let (shard_names, _) = read_index(&path)?;
            let shards = shard_names
                .iter()
                .map(|s| self.file(&join(component, s)))
                .collect::<Result<Vec<_>>>()?;
            return Ok(WeightFiles::Sharded { index: path, shards });
        }
        // A repo published in one precision only (e.g. `..._BF16_diffusers`) has no plain files.
        if variant.is_none() {
            for known in KNOWN_VARIANTS {
                if let Ok(files) = self.component_weights(component, Some(known)) {
                    return Ok(files);
                }
            }
        }
        let looked: Vec<&str> = candidates.iter().map(|(n, _)| n.as_str()).collect();
        let hint = if self.has_file(&join(component, "diffusion_pytorch_model.bin"))
            || self.has_file(&join(component, "pytorch_model.bin"))
        {
            " (only .bin files: convert them to safetensors)"
        } else {
            ""
        };
        Err(self.missing(
            &join(component, ""),
            format!("no safetensors weights{hint}; looked for {}", looked.join(", ")),
        ))
    }

    /// Resolves and opens a component's weights.
    pub fn open_weights(&self, component: &str, variant: Option<&str>) -> Result<Weights> {
        Weights::open(&self.component_weights(component, variant)?)
    }
}

fn join(component: &str, name: &str) -> String {
    if component.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", component.trim_end_matches('/'))
    }
}
