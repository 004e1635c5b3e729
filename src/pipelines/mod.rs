//! Pipelines: explicit loops (encode the prompt, denoise with a scheduler, decode). They report
//! progress through a callback, can be cancelled from it, return images, and write nothing.
//!
//! The request types are shared by the CLI and library users.

pub mod request;
pub mod resolution_bins;
pub mod sana;
pub mod tiny_shapes;

pub use request::{DeviceChoice, ImageRequest, LoadOptions, Progress};

use crate::error::{Error, Result};
use crate::attention::plan::AttentionPlan;
use crate::spec::PipelineSpec;
pub use request::{Flow, Stage};

/// A loaded pipeline: a closed set of families, dispatched by an exhaustive `match`.
pub enum Pipeline {
    Sana(Box<sana::SanaPipeline>),
    TinyShapes(Box<tiny_shapes::TinyShapesPipeline>),
}

impl Pipeline {
    /// Loads a pipeline from a spec name (`pipelines/NAME.toml`) or a spec file path.
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self> {
        let spec = crate::spec::find_spec(model)?;
        Self::from_spec(spec, options)
    }

    pub fn from_spec(spec: PipelineSpec, options: &LoadOptions) -> Result<Self> {
        let plan = attention_plan(&spec, options)?;
        match spec.family.as_str() {
            "sana" => Ok(Pipeline::Sana(Box::new(sana::SanaPipeline::load(&spec, &plan, options)?))),
            "tiny-shapes" => Ok(Pipeline::TinyShapes(Box::new(tiny_shapes::TinyShapesPipeline::load(&spec, options)?))),
            other => Err(Error::Spec {
                file: spec.source.display().to_string(),
                msg: format!("unknown model family `{other}`; expected sana or tiny-shapes"),
            }),
        }
    }

    /// Runs a text-to-image request; `progress` is called at every step and may cancel.
    pub fn generate(
        &self,
        request: &ImageRequest,
        progress: &mut dyn FnMut(Progress) -> Flow,
    ) -> Result<Vec<image::RgbImage>> {
        match self {
            Pipeline::Sana(p) => p.generate(request, progress),
            Pipeline::TinyShapes(p) => p.generate(request, progress),
        }
    }
}

/// The spec's attention table with the caller's overrides applied last.
pub fn attention_plan(spec: &PipelineSpec, options: &LoadOptions) -> Result<AttentionPlan> {
    let mut plan = AttentionPlan::from_spec(&spec.attention)?;
    for text in &options.attention {
        plan.add_cli_override(text)?;
    }
    Ok(plan)
}
