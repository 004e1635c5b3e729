//! Opened safetensors weights (one file or the shards of an index) behind a candle `VarBuilder`.
//!
//! Every file is memory-mapped and its header checked when opened, so a truncated or corrupt file
//! fails early, naming the file. Tensors are looked up by name across the files; a missing tensor
//! or a shape the model does not expect is reported as `Error::Weights` with the file and tensor
//! when the model is built through [`Weights::build`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};

fn fault(file: &Path, tensor: &str, msg: impl Into<String>) -> Error {
    Error::Weights {
        file: file.display().to_string(),
        tensor: tensor.to_string(),
        msg: msg.into(),
    }
}

/// The weight files of one model: a single safetensors file or a sharded set with its index.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    Single(PathBuf),
    /// `index` is the `*.safetensors.index.json`; the shards sit beside it under the names in its
    /// `weight_map`.
    Sharded {
        index: PathBuf,
        shards: Vec<PathBuf>,
    },
}

/// The shard file names listed by a `*.safetensors.index.json`, in first-use order, with the map.
pub fn read_index(index: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fault(index, "", format!("index is not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| fault(index, "", "index has no `weight_map`"))?;
    let mut weight_map = HashMap::with_capacity(map.len());
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| fault(index, tensor, "weight_map entry is not a file name"))?;
        if file.contains("..") || Path::new(file).is_absolute() {
            return Err(fault(
                index,
                tensor,
                format!("shard name `{file}` leaves the model folder"),
            ));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
        weight_map.insert(tensor.clone(), file.to_string());
    }
    Ok((shards, weight_map))
}

struct OpenFile {
    path: PathBuf,
    data: MmapedSafetensors,
}

struct Inner {
    files: Vec<OpenFile>,
    /// tensor name -> index into `files`
    route: HashMap<String, usize>,
}

/// Opened weights; cheap to clone.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<_> = self.inner.files.iter().map(|f| &f.path).collect();
        f.debug_struct("Weights")
            .field("files", &files)
            .field("tensors", &self.inner.route.len())
            .finish()
    }
}

fn open_file(path: &Path) -> Result<OpenFile> {
    if !path.is_file() {
        return Err(fault(path, "", "file not found"));
    }
    // SAFETY: the mapping is read-only; like every safetensors loader we assume the file is not
    // modified while it is mapped.
    let data = unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| fault(path, "", format!("truncated or not a safetensors file: {e}")))?;
    Ok(OpenFile {
        path: path.to_path_buf(),
        data,
    })
}

impl Weights {
    pub fn open(files: &WeightFiles) -> Result<Self> {
        match files {
            WeightFiles::Single(path) => Self::open_files(std::slice::from_ref(path)),
            WeightFiles::Sharded { index, .. } => Self::open_index(index),
        }
    }

    /// Opens a list of safetensors files as one set (a tensor name must not repeat).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut route = HashMap::new();
        for path in paths {
            let file = open_file(path)?;
            for (name, _) in file.data.tensors() {
                if let Some(prev) = route.insert(name.clone(), files.len()) {
                    let prev: &OpenFile = &files[prev];
                    return Err(fault(path, &name, format!("tensor also in {}", prev.path.display())));
                }
            }
            files.push(file);
        }
        Ok(Self {
            inner: Arc::new(Inner { files, route }),
        })
    }

    /// Opens the shards of a `*.safetensors.index.json` and checks that each tensor of the index is
    /// in the shard the index names.
    pub fn open_index(index: &Path) -> Result<Self> {
        let (shard_names, weight_map) = read_index(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            let path = dir.join(name);
            if !path.is_file() {
                let first = weight_map
                    .iter()
                    .find(|(_, f)| *f == name)
                    .map(|(t, _)| t.as_str())
                    .unwrap_or("");
                return Err(fault(&path, first, "shard listed in the index is missing"));
            }
            files.push(open_file(&path)?);
        }
        let mut route = HashMap::with_capacity(weight_map.len());
        for (tensor, shard) in &weight_map {
            let i = shard_names
                .iter()
                .position(|s| s == shard)
                .expect("shard names come from the map");
            if files[i].data.get(tensor).is_err() {
                return Err(fault(
                    &files[i].path,
                    tensor,
                    "tensor listed in the index is missing from its shard",
                ));
            }
            route.insert(tensor.clone(), i);
        }
        Ok(Self {
            inner: Arc::new(Inner { files, route }),
        })
    }

    pub fn files(&self) -> Vec<&Path> {
        self.inner.files.iter().map(|f| f.path.as_path()).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.route.contains_key(name)
    }

    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.inner.route.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Loads one tensor, converted to `dtype`, on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let i = *self.inner.route.get(name).ok_or_else(|| self.missing(name))?;
        let file = &self.inner.files[i];
        let tensor = file
            .data
            .load(name, device)
            .map_err(|e| fault(&file.path, name, format!("cannot read: {e}")))?;
        Ok(tensor.to_dtype(dtype)?)
    }

    fn missing(&self, name: &str) -> Error {
        let where_ = match self.inner.files.as_slice() {
            [one] => one.path.clone(),
            many => many
                .first()
                .map(|f| f.path.parent().unwrap_or(&f.path).to_path_buf())
                .unwrap_or_default(),
        };
        fault(&where_, name, "tensor not found in the weights")
    }

    /// A `VarBuilder` over these weights. Errors surface as candle errors whose message names the
    /// file and tensor; use [`Weights::build`] to get them as `Error::Weights`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        self.var_builder_with_slot(dtype, device, Arc::new(Mutex::new(None)))
    }

    fn var_builder_with_slot(
        &self,
        dtype: DType,
        device: &Device,
        slot: Arc<Mutex<Option<Error>>>,
    ) -> VarBuilder<'static> {
        let backend = Backend {
            weights: self.clone(),
            last_fault: slot,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Builds a model from these weights: `build(dtype, device, |vb| Model::new(&cfg, vb))`. A
    /// missing tensor or a wrong shape met while building is returned as `Error::Weights`.
    pub fn build<T>(
        &self,
        dtype: DType,
        device: &Device,
        f: impl FnOnce(VarBuilder<'static>) -> Result<T>,
    ) -> Result<T> {
        let slot = Arc::new(Mutex::new(None));
        let result = f(self.var_builder_with_slot(dtype, device, slot.clone()));
        match result {
            Ok(model) => Ok(model),
            Err(err) => {
                // Only when the returned error is that fault: a model may probe optional tensors
                // and then fail for another reason.
                let fault = slot.lock().ok().and_then(|mut s| s.take());
                match fault {
                    Some(fault) if err.to_string().contains(&fault.to_string()) => Err(fault),
                    _ => Err(err),
                }
            }
        }
    }
}

struct Backend {
    weights: Weights,
    /// The latest weight fault met, kept so that `Weights::build` can return it with its details.
    last_fault: Arc<Mutex<Option<Error>>>,
}

impl Backend {
    fn record(&self, err: Error) -> candle_core::Error {
        let msg = err.to_string();
        if let Ok(mut slot) = self.last_fault.lock() {
            *slot = Some(err);
        }
        candle_core::Error::Msg(msg)
    }
}

impl candle_nn::var_builder::SimpleBackend for Backend {
    fn get(&self, shape: Shape, name: &str, _init: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &shape {
            let i = self.weights.inner.route[name];
            let path = &self.weights.inner.files[i].path;
            return Err(self.record(fault(
                path,
                name,
                format!(
                    "shape {:?} in the file, the model expects {:?}",
                    tensor.dims(),
                    shape.dims()
                ),
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.weights.load(name, dtype, dev).map_err(|e| self.record(e))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains(name)
    }
}
