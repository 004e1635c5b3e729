//! Per-layer resolution of a pipeline spec's `[attention]` table into backends.
//!
//! TEMPORARY (branch sana-model): a minimal stand-in with the signatures the lead announced, so the
//! SANA model compiles before main's plan.rs lands. On merge, main's version replaces this file.

use super::{Backend, LayerShape, Role};
use crate::error::{Error, Result};

/// Which layer is asking: its index in the model, its checkpoint prefix, its role.
#[derive(Debug, Clone, Copy)]
pub struct LayerRef<'a> {
    pub index: usize,
    pub name: &'a str,
    pub role: Role,
}

/// The attention backend of every layer of a model.
#[derive(Debug, Clone)]
pub struct AttentionPlan {
    self_backend: Backend,
    cross_backend: Backend,
}

impl AttentionPlan {
    /// One backend for every self-attention layer and one for every cross-attention layer.
    pub fn uniform(self_backend: Backend, cross_backend: Backend) -> Self {
        Self { self_backend, cross_backend }
    }

    /// The backend of one layer, checked against its shape.
    pub fn resolve(&self, layer: &LayerRef, shape: &LayerShape) -> Result<Backend> {
        let backend = match layer.role {
            Role::Cross => self.cross_backend.clone(),
            _ => self.self_backend.clone(),
        };
        backend.check(shape).map_err(|reason| Error::Attention {
            layer: layer.name.to_string(),
            backend: backend.name().to_string(),
            reason,
        })?;
        Ok(backend)
    }
}
