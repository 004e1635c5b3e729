//! Evaluation of generated images.
