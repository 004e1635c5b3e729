//! tiny-shapes: visgen's embedded default model. A small SANA-architecture DiT in pixel space
//! (RGB 64×64, patch 4 -> 16×16 tokens, linear self-attention, cross-attention to text, Mix-FFN,
//! AdaLN-single) with a small word-level text encoder, trained together by flow matching on the
//! procedural shapes data (`data::shapes`). Weights ship in `assets/tiny-shapes/`.
//!
//! Checkpoint keys: `text_encoder.*` ([`TextEncoder`]) and `transformer.*` (diffusers-named
//! [`crate::models::sana::SanaTransformer`] keys).

pub mod config;
pub mod model;
pub mod text_encoder;
pub mod tokenizer;

pub use config::{TextEncoderConfig, TinyShapesConfig};
pub use model::TinyShapesModel;
pub use text_encoder::TextEncoder;
pub use tokenizer::ShapesTokenizer;
