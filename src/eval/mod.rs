//! Evaluation of generated images.
//!
//! `shapes`: the compositional benchmark on the procedural shapes data (object, attribute binding,
//! spatial relation, counting); `shapes_report`: its accuracy tables.

pub mod shapes;
pub mod shapes_report;
