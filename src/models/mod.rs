//! See ../../shared/DESIGN.md for what lives here.

pub mod dcae;
pub mod sana;
pub mod text;
pub mod tiny_shapes;
