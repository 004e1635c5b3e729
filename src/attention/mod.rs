//! The attention backend: every attention layer of every model goes through [`attend`].
//!
//! A layer's backend is a closed enum ([`Backend`]) chosen per layer by the pipeline spec and
//! resolved once at load time ([`plan`]). Each backend lives in its own file beside its f32 CPU
//! reference; the reference is written for clarity and is the oracle for the CUDA kernels.
//!
//! Tensor layout everywhere: `(batch, heads, tokens, head_dim)`. Tokens of a grid (an image or a
//! video) are flattened row-major: for a grid `[T, H, W]`, token `n = (t * H + h) * W + w`.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense;
pub mod linear;
pub mod masked;
pub mod neighborhood;
pub mod plan;
pub mod pyramid;

use candle_core::{DType, Device, Tensor};

pub use dense::DenseParams;
pub use linear::{LinearParams, LinearState};
pub use neighborhood::NeighborhoodParams;
pub use pyramid::PyramidParams;

use crate::error::Result;

/// What an attention layer does in its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Queries and keys are the same tokens (image or video tokens).
    #[serde(rename = "self")]
    SelfAttention,
    /// Queries are image tokens, keys are text tokens.
    Cross,
    /// Image and text tokens attend together (FLUX double/single blocks).
    Joint,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::SelfAttention => "self",
            Role::Cross => "cross",
            Role::Joint => "joint",
        })
    }
}

/// The closed set of attention backends. Every dispatch is an exhaustive `match` on this enum.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// Softmax attention (flash-style on the GPU).
    Dense(DenseParams),
    /// SANA's ReLU linear attention, optionally block-causal and with RoPE in the numerator.
    Linear(LinearParams),
    /// Generalized neighborhood attention over a 1-3 D token grid.
    Neighborhood(NeighborhoodParams),
    /// Pyramid sparse attention: KV blocks at several pooling levels, chosen per query block.
    Pyramid(PyramidParams),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Dense(_) => "dense",
            Backend::Linear(_) => "linear",
            Backend::Neighborhood(_) => "neighborhood",
            Backend::Pyramid(_) => "pyramid",
        }
    }

    /// Whether this backend can serve a layer of this shape; `Err` carries the reason.
    /// Called once per layer at load time (NATTEN's `choose_backend`).
    pub fn check(&self, layer: &LayerShape) -> std::result::Result<(), String> {
        if !matches!(layer.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(format!("dtype {:?} is not supported (f32, f16, bf16)", layer.dtype));
        }
        match self {
            Backend::Dense(p) => p.check(layer),
            Backend::Linear(p) => p.check(layer),
            Backend::Neighborhood(p) => p.check(layer),
            Backend::Pyramid(p) => p.check(layer),
        }
    }
}

/// What a layer looks like, as far as choosing its backend goes.
#[derive(Debug, Clone)]
pub struct LayerShape {
    pub role: Role,
    pub head_dim: usize,
    /// The token grid of the queries (self-attention over an image or video), if any.
    pub grid: Option<Vec<usize>>,
    /// Whether the keys carry a padding mask (text tokens).
    pub key_mask: bool,
    pub dtype: DType,
    pub device: Device,
}

/// Rotary embedding tables for the RoPE-numerator form of linear attention: `cos` and `sin` of
/// shape `(tokens, head_dim)`, already repeated over interleaved pairs `(2i, 2i+1)`.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Rotates interleaved pairs: `out[2i] = x[2i] cos - x[2i+1] sin`, `out[2i+1] = x[2i] sin + x[2i+1] cos`.
    /// `x` is `(.., tokens, head_dim)`; the tables broadcast over the leading dims.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = *dims.last().unwrap();
        let mut pair_dims = dims[..dims.len() - 1].to_vec();
        pair_dims.extend([d / 2, 2]);
        let pairs = x.reshape(pair_dims.as_slice())?;
        let last = pair_dims.len() - 1;
        let even = pairs.narrow(last, 0, 1)?;
        let odd = pairs.narrow(last, 1, 1)?;
        // (-x_odd, x_even) interleaved: the "rotate half" of interleaved pairs.
        let rotated = Tensor::cat(&[&odd.neg()?, &even], last)?.reshape(dims.as_slice())?;
        let cos = self.cos.to_dtype(x.dtype())?;
        let sin = self.sin.to_dtype(x.dtype())?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// Everything one attention call needs besides the backend.
#[derive(Debug, Clone, Copy)]
pub struct AttentionInput<'a> {
    /// `(B, H, Nq, D)`
    pub q: &'a Tensor,
    /// `(B, H, Nk, D)`
    pub k: &'a Tensor,
    /// `(B, H, Nk, D)`
    pub v: &'a Tensor,
    /// `(B, Nk)`, nonzero = attend. Only for backends that accept masks.
    pub key_mask: Option<&'a Tensor>,
    /// Extra keys and values `(B, H, Ne, D)` attended by every query (text tokens in FLUX).
    pub extra_kv: Option<(&'a Tensor, &'a Tensor)>,
    /// The token grid of q (and k, v for self-attention).
    pub grid: Option<&'a [usize]>,
    /// Rotary tables for linear attention's RoPE-numerator form.
    pub rope: Option<&'a Rope>,
}

impl<'a> AttentionInput<'a> {
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Self { q, k, v, key_mask: None, extra_kv: None, grid: None, rope: None }
    }
    pub fn key_mask(mut self, mask: Option<&'a Tensor>) -> Self {
        self.key_mask = mask;
        self
    }
    pub fn extra_kv(mut self, kv: Option<(&'a Tensor, &'a Tensor)>) -> Self {
        self.extra_kv = kv;
        self
    }
    pub fn grid(mut self, grid: Option<&'a [usize]>) -> Self {
        self.grid = grid;
        self
    }
    pub fn rope(mut self, rope: Option<&'a Rope>) -> Self {
        self.rope = rope;
        self
    }
}

thread_local! {
    static REFERENCE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every attention call on this thread taking the f32 reference path, even on the
/// GPU: our CUDA kernels are forward-only, so training (which needs gradients through candle ops)
/// runs inside this.
pub fn with_reference_only<T>(f: impl FnOnce() -> T) -> T {
    let before = REFERENCE_ONLY.with(|r| r.replace(true));
    let out = f();
    REFERENCE_ONLY.with(|r| r.set(before));
    out
}

/// Whether [`with_reference_only`] is in force on this thread.
pub fn reference_only() -> bool {
    REFERENCE_ONLY.with(|r| r.get())
}

/// Runs one attention call: the CUDA kernel when the tensors are on the GPU, the f32 reference
/// otherwise. Output `(B, H, Nq, D)` in the dtype of `q`.
pub fn attend(backend: &Backend, input: &AttentionInput) -> Result<Tensor> {
    match backend {
        Backend::Dense(p) => dense::forward(p, input).map(|(o, _lse)| o),
        Backend::Linear(p) => linear::forward(p, input),
        Backend::Neighborhood(p) => neighborhood::forward(p, input).map(|(o, _lse)| o),
        Backend::Pyramid(p) => pyramid::forward(p, input),
    }
}

/// Merges two partial attentions over disjoint key sets through their log-sum-exps:
/// `O = O0 - sigmoid(lse1 - lse0) (O0 - O1)`, `lse = log(exp(lse0) + exp(lse1))`.
/// `o*`: `(B, H, N, D)`, `lse*`: `(B, H, N)`, both f32. Rows whose lse is -inf contribute nothing.
pub fn merge_partials(o0: &Tensor, lse0: &Tensor, o1: &Tensor, lse1: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = lse0.maximum(lse1)?;
    // Guard rows where both are -inf: use 0 as the shift so exp() gives 0, not NaN.
    let finite = m.ge(f32::MIN as f64)?;
    let m = finite.where_cond(&m, &m.zeros_like()?)?;
    let w0 = lse0.broadcast_sub(&m)?.exp()?;
    let w1 = lse1.broadcast_sub(&m)?.exp()?;
    let total = (&w0 + &w1)?;
    let safe_total = total.maximum(f32::MIN_POSITIVE as f64)?;
    let o = (o0.broadcast_mul(&w0.unsqueeze(3)?)? + o1.broadcast_mul(&w1.unsqueeze(3)?)?)?
        .broadcast_div(&safe_total.unsqueeze(3)?)?;
    let lse = (total.log()? + m)?;
    Ok((o, lse))
}

/// Checks that `q, k, v` are rank 4 with matching batch, heads and head dim.
pub(crate) fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
    let bad = |m: String| crate::error::Error::Other(format!("attention: {m}"));
    let (b, h, nq, d) = q.dims4().map_err(|_| bad(format!("q must be (B,H,N,D), got {:?}", q.dims())))?;
    let (bk, hk, nk, dk) = k.dims4().map_err(|_| bad(format!("k must be (B,H,N,D), got {:?}", k.dims())))?;
    if v.dims() != k.dims() {
        return Err(bad(format!("v {:?} must match k {:?}", v.dims(), k.dims())));
    }
    if (bk, hk, dk) != (b, h, d) {
        return Err(bad(format!("k {:?} does not match q {:?}", k.dims(), q.dims())));
    }
    Ok((b, h, nq, nk, d))
}
