//! Procedural training data (see README).
//!
//! `shapes`: pictures of solid colored shapes with captions, the training data of the tiny default
//! model and the truth of the compositional benchmark; `prompt`: their caption grammar.

pub mod prompt;
pub mod shapes;
