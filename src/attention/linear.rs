//! SANA's ReLU linear attention (sana.md §1.4), its RoPE-numerator form (§2.2) and the block-causal
//! form with a constant-memory state (LongSANA, §2.3).
//!
//! With φ = ReLU applied here to q and k (callers pass them after any qk-norm), for every batch,
//! head and query n:
//!
//! ```text
//! o_n = Σ_m v_m (R(φ(k_m)) · R(φ(q_n)))  /  (φ(q_n) · Σ_m φ(k_m) + ε)
//! ```
//!
//! where R is the rotary embedding in the RoPE form and the identity otherwise. The denominator
//! always uses the unrotated, non-negative features, so it stays ≥ 0. There is no scale and no
//! softmax; everything accumulates in f32. A query with φ(q_n) = 0 gets output 0.
//!
//! Block-causal form: the tokens are split into chunks of whole frames; a query attends to every
//! key of its own chunk and of all earlier chunks. The sums over earlier chunks are the whole
//! state ([`LinearState`]), so generation chunk by chunk runs at constant memory.

use super::{AttentionInput, LayerShape, Role, Rope};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct LinearParams {
    /// Added to the denominator: 1e-15 in diffusers, 1e-8 in the original SANA code.
    pub eps: f64,
    /// Block-causal form: chunk length in frames along the first grid axis. `None` = bidirectional.
    pub chunk_frames: Option<usize>,
}

impl Default for LinearParams {
    fn default() -> Self {
        Self { eps: 1e-15, chunk_frames: None }
    }
}

impl LinearParams {
    pub fn check(&self, layer: &LayerShape) -> std::result::Result<(), String> {
        if layer.role != Role::SelfAttention {
            return Err(format!(
                "linear attention only serves self-attention (queries and keys are the same tokens), not {} attention",
                layer.role
            ));
        }
        if layer.key_mask {
            return Err("linear attention has no key padding mask: it sums over every key".into());
        }
        if layer.head_dim == 0 {
            return Err("head_dim is 0".into());
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(format!("eps {} must be a finite number >= 0", self.eps));
        }
        match self.chunk_frames {
            Some(0) => return Err("chunk_frames is 0: a chunk needs at least one frame".into()),
            Some(c) if layer.grid.as_ref().map_or(true, |g| g.is_empty()) => {
                return Err(format!(
                    "block-causal linear attention (chunk_frames = {c}) needs a token grid whose first axis is frames, and the layer has none"
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// The constant-memory state of block-causal linear attention, carried from chunk to chunk.
#[derive(Debug, Clone)]
pub struct LinearState {
    /// `(B, H, D, D)` f32: `S[a, b] = Σ_m v_m[a] φ(k_m)[b]` (keys rotated in the RoPE form).
    pub kv: Tensor,
    /// `(B, H, D)` f32: `z = Σ_m φ(k_m)` (never rotated).
    pub k_sum: Tensor,
}

impl LinearState {
    /// The state before the first chunk: nothing summed yet.
    pub fn zeros(batch: usize, heads: usize, head_dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            kv: Tensor::zeros((batch, heads, head_dim, head_dim), DType::F32, device)?,
            k_sum: Tensor::zeros((batch, heads, head_dim), DType::F32, device)?,
        })
    }

    /// Sums of two states (e.g. chunk states cached separately, as LongSANA's pipeline does).
    pub fn add(&self, other: &LinearState) -> Result<LinearState> {
        Ok(Self { kv: (&self.kv + &other.kv)?, k_sum: (&self.k_sum + &other.k_sum)? })
    }
}

fn bad(msg: String) -> Error {
    Error::Other(format!("linear attention: {msg}"))
}

/// Checks the rotary tables against the tokens and head dim of `x` `(B, H, N, D)`.
fn check_rope(rope: &Rope, n: usize, d: usize) -> Result<()> {
    if d % 2 != 0 {
        return Err(bad(format!("RoPE needs an even head dim, got {d}")));
    }
    if rope.cos.dims() != [n, d] || rope.sin.dims() != [n, d] {
        return Err(bad(format!(
            "RoPE tables must be (N, D) = ({n}, {d}), got cos {:?} sin {:?}",
            rope.cos.dims(),
            rope.sin.dims()
        )));
    }
    Ok(())
}

/// The features of one call: `φ(q)`, `φ(k)` unrotated (denominator) and rotated (numerator), f32.
struct Features {
    q: Tensor,
    k: Tensor,
    q_rot: Tensor,
    k_rot: Tensor,
}

fn features(q: &Tensor, k: &Tensor, rope: Option<&Rope>) -> Result<Features> {
    let q = q.to_dtype(DType::F32)?.relu()?;
    let k = k.to_dtype(DType::F32)?.relu()?;
    let (q_rot, k_rot) = match rope {
        Some(rope) => {
            let (n, d) = (q.dim(2)?, q.dim(3)?);
            check_rope(rope, n, d)?;
            if k.dim(2)? != n {
                return Err(bad(format!("RoPE needs as many keys as queries, got {} and {n}", k.dim(2)?)));
            }
            (rope.apply(&q)?, rope.apply(&k)?)
        }
        None => (q.clone(), k.clone()),
    };
    Ok(Features { q, k, q_rot, k_rot })
}

/// `(S, z)` of one set of keys: `S[a, b] = Σ_m v_m[a] k_rot_m[b]` `(B, H, D, D)`, `z = Σ_m φ(k_m)` `(B, H, D)`.
fn key_sums(f: &Features, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let v = v.to_dtype(DType::F32)?;
    let kv = v.t()?.contiguous()?.matmul(&f.k_rot.contiguous()?)?;
    let k_sum = f.k.sum(2)?;
    Ok((kv, k_sum))
}

/// Output `(B, H, N, D)` f32 of the queries in `f` against the key sums `(kv, k_sum)`.
fn output(f: &Features, kv: &Tensor, k_sum: &Tensor, eps: f64) -> Result<Tensor> {
    // numerator[n, a] = Σ_b q_rot[n, b] S[a, b]
    let numerator = f.q_rot.contiguous()?.matmul(&kv.t()?.contiguous()?)?;
    // denominator[n] = φ(q_n) · z, shaped (B, H, N, 1) to broadcast over D.
    let denominator = f.q.contiguous()?.matmul(&k_sum.unsqueeze(3)?.contiguous()?)?;
    Ok(numerator.broadcast_div(&(denominator + eps)?)?)
}

/// f32 reference of bidirectional linear attention: every query attends to every key.
/// `q`: `(B, H, Nq, D)`, `k`, `v`: `(B, H, Nk, D)` (Nq = Nk in the RoPE form, with tables
/// `(N, D)`). φ = ReLU is applied here. Returns `(B, H, Nq, D)` f32.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, rope: Option<&Rope>, eps: f64) -> Result<Tensor> {
    super::check_qkv(q, k, v)?;
    let f = features(q, k, rope)?;
    let (kv, k_sum) = key_sums(&f, v)?;
    output(&f, &kv, &k_sum, eps)
}

/// One chunk of block-causal linear attention: the queries of this chunk attend to its own keys
/// (bidirectionally) and to everything summarized in `state` (earlier chunks). `rope` holds the
/// tables of this chunk's tokens only. Returns the output `(B, H, N, D)` f32 and the new state,
/// `state` plus this chunk's sums.
pub fn forward_chunk(
    p: &LinearParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    state: Option<&LinearState>,
) -> Result<(Tensor, LinearState)> {
    let (b, h, _nq, _nk, d) = super::check_qkv(q, k, v)?;
    let f = features(q, k, rope)?;
    let (mut kv, mut k_sum) = key_sums(&f, v)?;
    if let Some(state) = state {
        if state.kv.dims() != [b, h, d, d] || state.k_sum.dims() != [b, h, d] {
            return Err(bad(format!(
                "state kv {:?} / k_sum {:?} do not match (B, H, D) = ({b}, {h}, {d})",
                state.kv.dims(),
                state.k_sum.dims()
            )));
        }
        kv = (kv + state.kv.to_dtype(DType::F32)?)?;
        k_sum = (k_sum + state.k_sum.to_dtype(DType::F32)?)?;
    }
    let out = output(&f, &kv, &k_sum, p.eps)?;
    Ok((out, LinearState { kv, k_sum }))
}

/// Frame boundaries of the chunks, LongSANA style: chunks of `chunk_frames` frames, the first chunk
/// absorbing the remainder (21 frames, chunk 10 -> `[0, 11, 21]`). Fewer frames than one chunk give
/// a single chunk.
pub fn chunk_boundaries(frames: usize, chunk_frames: usize) -> Result<Vec<usize>> {
    if chunk_frames == 0 {
        return Err(bad("chunk_frames is 0".into()));
    }
    let full_chunks = frames / chunk_frames;
    if full_chunks <= 1 {
        return Ok(vec![0, frames]);
    }
    let first = chunk_frames + frames % chunk_frames;
    let mut bounds = vec![0, first];
    while *bounds.last().unwrap_or(&frames) < frames {
        let next = bounds[bounds.len() - 1] + chunk_frames;
        bounds.push(next);
    }
    Ok(bounds)
}

/// Narrows the rotary tables to tokens `[start, start + len)`.
fn rope_rows(rope: &Rope, start: usize, len: usize) -> Result<Rope> {
    Ok(Rope { cos: rope.cos.narrow(0, start, len)?, sin: rope.sin.narrow(0, start, len)? })
}

/// Linear attention for one call, bidirectional or block-causal (`p.chunk_frames`, which needs
/// `input.grid` with frames first). Output `(B, H, N, D)` in the dtype of `q`.
pub fn forward(p: &LinearParams, input: &AttentionInput) -> Result<Tensor> {
    let (b, h, nq, nk, d) = super::check_qkv(input.q, input.k, input.v)?;
    if input.key_mask.is_some() {
        return Err(bad("a key padding mask is not supported: linear attention sums over every key".into()));
    }
    if input.extra_kv.is_some() {
        return Err(bad("extra keys (joint attention) are not supported".into()));
    }
    if let Some(rope) = input.rope {
        check_rope(rope, nq, d)?;
    }

    // Block-causal chunks as token boundaries `[0, b1, ..., N]` (the first chunk absorbs the remainder).
    let bounds = match p.chunk_frames {
        None => None,
        Some(chunk_frames) => {
            let grid = input
                .grid
                .ok_or_else(|| bad(format!("chunk_frames = {chunk_frames} needs the token grid (frames first)")))?;
            let tokens: usize = grid.iter().product();
            if grid.is_empty() || tokens != nq || nk != nq {
                return Err(bad(format!(
                    "block-causal attention needs q and k over the grid {grid:?} ({tokens} tokens), got {nq} queries and {nk} keys"
                )));
            }
            let tokens_per_frame = tokens / grid[0].max(1);
            let frames = chunk_boundaries(grid[0], chunk_frames)?;
            Some(frames.iter().map(|f| f * tokens_per_frame).collect::<Vec<_>>())
        }
    };

    #[cfg(feature = "cuda")]
    if input.q.device().is_cuda() && super::cuda::linear::supports(input.q.dtype(), d) && nq == nk && !super::reference_only() {
        use super::cuda::linear as kernel;
        return match &bounds {
            None => kernel::forward(input.q, input.k, input.v, input.rope, p.eps),
            Some(bounds) => Ok(kernel::forward_chunked(input.q, input.k, input.v, input.rope, bounds, p.eps)?.0),
        };
    }

    let out = match bounds {
        None => reference(input.q, input.k, input.v, input.rope, p.eps)?,
        Some(bounds) => {
            let mut state = LinearState::zeros(b, h, d, input.q.device())?;
            let mut outputs = Vec::with_capacity(bounds.len() - 1);
            for w in bounds.windows(2) {
                let (start, len) = (w[0], w[1] - w[0]);
                let rope = input.rope.map(|r| rope_rows(r, start, len)).transpose()?;
                let (o, next) = forward_chunk(
                    p,
                    &input.q.narrow(2, start, len)?,
                    &input.k.narrow(2, start, len)?,
                    &input.v.narrow(2, start, len)?,
                    rope.as_ref(),
                    Some(&state),
                )?;
                outputs.push(o);
                state = next;
            }
            Tensor::cat(&outputs, 2)?
        }
    };
    Ok(out.to_dtype(input.q.dtype())?)
}
