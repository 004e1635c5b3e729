//! The Hugging Face hub cache, laid out as `huggingface_hub` (Python) writes it, so that files a
//! user downloaded with Python are found, and files we download are found by Python:
//! `<cache>/models--<org>--<name>/{refs/<revision>, snapshots/<commit>/<file>, blobs/}`.
//!
//! Environment, as in `huggingface_hub`: `HF_HUB_CACHE` (else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), `HF_HUB_OFFLINE=1` (only the cache is used), `HF_TOKEN` (else the
//! token file `HF_HOME/token`) for gated repos, `HF_ENDPOINT` for a mirror.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub token: Option<String>,
    pub endpoint: Option<String>,
    /// Show download progress bars (off for library use; the CLI turns it on).
    pub progress: bool,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

impl HubConfig {
    /// Reads the `huggingface_hub` environment variables.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`HubConfig::from_env`], with the variables looked up through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| non_empty(var(name));
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| get("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN").or_else(|| {
            let path = get("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            non_empty(std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()))
        });
        let offline = get("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
            .unwrap_or(false);
        Self {
            cache_dir,
            offline,
            token,
            endpoint: get("HF_ENDPOINT"),
            progress: false,
        }
    }
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A model repository on the hub at a revision (branch, tag or commit).
#[derive(Debug, Clone)]
pub struct HubRepo {
    pub repo_id: String,
    pub revision: String,
    config: HubConfig,
}

impl HubRepo {
    pub fn new(repo_id: &str, revision: Option<&str>, config: HubConfig) -> Result<Self> {
        let valid = repo_id.split('/').count() == 2 && repo_id.split('/').all(|p| !p.is_empty() && p != "..");
        if !valid {
            return Err(Error::Usage(format!(
                "`{repo_id}` is not a hub repo id (expected org/name)"
            )));
        }
        Ok(Self {
            repo_id: repo_id.to_string(),
            revision: revision.unwrap_or("main").to_string(),
            config,
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// `<cache>/models--org--name`
    pub fn cache_folder(&self) -> PathBuf {
        self.config
            .cache_dir
            .join(format!("models--{}", self.repo_id.replace('/', "--")))
    }

    /// The cached snapshot folder for the revision, if the cache has it.
    pub fn cached_snapshot(&self) -> Option<PathBuf> {
        let folder = self.cache_folder();
        let commit = match std::fs::read_to_string(folder.join("refs").join(&self.revision)) {
            Ok(commit) => commit.trim().to_string(),
            Err(_) if is_commit_hash(&self.revision) => self.revision.clone(),
            Err(_) => return None,
        };
        let snapshot = folder.join("snapshots").join(commit);
        snapshot.is_dir().then_some(snapshot)
    }

    /// A file of the repo from the cache, without network.
    pub fn cached_file(&self, filename: &str) -> Option<PathBuf> {
        let path = self.cached_snapshot()?.join(filename);
        path.is_file().then_some(path) // a dangling blob link counts as absent
    }

    fn api_repo(&self) -> Result<hf_hub::api::sync::ApiRepo> {
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(self.config.cache_dir.clone()))
            .with_token(self.config.token.clone())
            .with_progress(self.config.progress);
        if let Some(endpoint) = &self.config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| Error::Other(format!("hub client: {e}")))?;
        let repo = hf_hub::Repo::with_revision(self.repo_id.clone(), hf_hub::RepoType::Model, self.revision.clone());
        Ok(api.repo(repo))
    }

    fn not_found(&self, filename: &str, why: &str) -> Error {
        Error::Weights {
            file: format!("{}@{}/{filename}", self.repo_id, self.revision),
            tensor: String::new(),
            msg: why.to_string(),
        }
    }

    /// A file of the repo: from the cache, else downloaded into it (unless offline).
    pub fn file(&self, filename: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached_file(filename) {
            return Ok(path);
        }
        if self.config.offline {
            return Err(self.not_found(
                filename,
                &format!(
                    "not in the hub cache {} and HF_HUB_OFFLINE is set",
                    self.config.cache_dir.display()
                ),
            ));
        }
        self.api_repo()?
            .get(filename)
            .map_err(|e| self.not_found(filename, &format!("download failed (gated repos need HF_TOKEN): {e}")))
    }

    /// The file names of the repo: listed by the hub, or from the cached snapshot when offline.
    pub fn list_files(&self) -> Result<Vec<String>> {
        if !self.config.offline {
            if let Ok(info) = self.api_repo()?.info() {
                return Ok(info.siblings.into_iter().map(|s| s.rfilename).collect());
            }
        }
        let snapshot = self.cached_snapshot().ok_or_else(|| {
            self.not_found(
                "",
                &format!("no cached snapshot in {}", self.config.cache_dir.display()),
            )
        })?;
        let mut files = Vec::new();
        walk(&snapshot, &snapshot, &mut files);
        files.sort();
        Ok(files)
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, out);
        } else if path.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
}
