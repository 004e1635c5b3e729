//! SANA's image DiT (diffusers `SanaTransformer2DModel`): SANA-1.0, SANA-1.5 (qk-norm across
//! heads) and SANA-Sprint (guidance embedding). Linear self-attention and softmax cross-attention
//! both go through [`crate::attention::attend`], with backends resolved once at load time.

pub mod attention;
pub mod block;
pub mod config;
pub mod graph;
pub mod transformer;

pub use config::{QkNorm, SanaConfig};
pub use graph::StepGraphs;
pub use transformer::{SanaTransformer, TextContext};
