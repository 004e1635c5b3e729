//! One error type for the whole crate. Variants name the file, tensor, layer or flag at fault, and
//! say whether the user can fix it (exit code 2 in the CLI) or it is an internal failure (exit 1).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from the user: a flag, a prompt, a size. The message is shown as is.
    #[error("{0}")]
    Usage(String),

    /// A pipeline spec that does not parse or names something unknown.
    #[error("spec {file}: {msg}")]
    Spec { file: String, msg: String },

    /// Weights that are missing, truncated or do not match the model.
    #[error("weights {file}: {}{msg}", tensor_prefix(.tensor))]
    Weights { file: String, tensor: String, msg: String },

    /// An attention backend that cannot serve a layer, with the reason.
    #[error("attention layer `{layer}`: backend {backend} cannot serve it: {reason}")]
    Attention { layer: String, backend: String, reason: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{0}")]
    Other(String),
}

/// "tensor `NAME`: ", or nothing when the fault is the whole file.
fn tensor_prefix(tensor: &str) -> String {
    if tensor.is_empty() {
        String::new()
    } else {
        format!("tensor `{tensor}`: ")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Exit code for the CLI: 2 for anything the user can fix by changing the command, the spec
    /// or the files it names; 1 for internal failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Spec { .. } | Error::Weights { .. } | Error::Attention { .. } | Error::Io { .. } => 2,
            Error::Cancelled => 130,
            Error::Candle(_) | Error::Other(_) => 1,
        }
    }
}
