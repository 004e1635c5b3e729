//! visgen: visual generation with diffusion transformers and scale-wise autoregressive models,
//! with one attention backend chosen per layer.

pub mod attention;
pub mod bench;
pub mod cuda_graph;
pub mod data;
pub mod error;
pub mod eval;
pub mod kernels;
pub mod layers;
pub mod models;
pub mod pipelines;
pub mod schedulers;
pub mod spec;
pub mod weights;

pub use error::{Error, Result};
