//! visgen: visual generation with diffusion transformers and scale-wise autoregressive models,
//! with one attention backend chosen per layer. See DESIGN.md in the project's shared notes.

pub mod attention;
pub mod error;
pub mod layers;
pub mod models;
pub mod pipelines;
pub mod schedulers;
pub mod weights;

pub use error::{Error, Result};
