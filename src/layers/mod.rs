//! Blocks shared by the models: norms, AdaLN modulation, timestep and caption embeddings, the
//! Mix-FFN (GLUMBConv), patch embedding with its sin-cos positional embedding, and the small
//! convolution helpers (depth-wise, grouped point-wise, pixel shuffle) they are built from.
//!
//! Every block is a plain struct built from a `VarBuilder` whose prefixes mirror diffusers' keys.

pub mod caption;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod conv;
pub mod heads;
pub mod mix_ffn;
pub mod modulation;
pub mod norm;
pub mod patch_embed;
pub mod project;
pub mod timestep;
pub mod train_glu;
pub mod train_ops;

pub use caption::CaptionProjection;
pub use mix_ffn::GluMbConv;
pub use modulation::{gated_residual, modulate, modulation_chunks, norm_modulate};
pub use heads::{merge_heads, split_heads};
pub use project::project;
pub use norm::{layer_norm_no_affine, RmsNorm};
pub use patch_embed::{sincos_2d, PatchEmbed};
pub use timestep::{timestep_frequencies, AdaLayerNormSingle, TimestepEmbedding, TimestepGuidanceEmbedding};
