//! Generalized neighborhood attention (GNA, NATTEN): sliding-window, strided and blocked
//! self-attention over a 1-D, 2-D or 3-D token grid, with optional extra key/value tokens that
//! every query sees (text tokens in FLUX).
//!
//! Semantics follow NATTEN (`na_utils.cuh`, `fna_fusion.hpp`, `backends/flex.py`; see
//! `shared/specs/gna_psa_flux.md` §A). Per axis, with input length `L`, kernel `k`, stride `s`,
//! dilation `d`:
//! - A token at coordinate `x` is in dilation group `x % d` and attends only within it, at the
//!   intra-group coordinate `x / d`; the group holds `L / d + (1 if x % d < L % d)` tokens.
//! - Queries sharing `x / s` (a stride group) share the window of their leader: the centre-most
//!   query (right of centre for even `s`) without causality, the last one with it.
//! - A non-causal window holds exactly `k` keys; at the borders it shifts instead of shrinking.
//!   A causal window runs from `leader - k + 1` (clamped at 0) to the query itself.
//! - In N-D a key is a neighbor when it is in the window along every axis.
//!
//! The f32 reference builds the explicit `(N, N + extra)` mask and runs a masked softmax; it is
//! the oracle for the CUDA kernels.

pub mod balance;
pub mod masks;
pub mod tiles;

use candle_core::{DType, Tensor};

use super::masked::masked_attention;
use super::{check_qkv, AttentionInput, LayerShape, Role};
use crate::error::{Error, Result};

/// Per-axis GNA parameters; every vector has one entry per grid axis (rank 1 to 3).
#[derive(Debug, Clone, PartialEq)]
pub struct NeighborhoodParams {
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    pub dilation: Vec<usize>,
    pub causal: Vec<bool>,
    /// Softmax scale; `None` = `head_dim^-0.5`.
    pub scale: Option<f64>,
}

impl NeighborhoodParams {
    /// Plain neighborhood attention: stride 1, dilation 1, no causal axis.
    pub fn new(kernel: &[usize]) -> Self {
        Self {
            kernel: kernel.to_vec(),
            stride: vec![1; kernel.len()],
            dilation: vec![1; kernel.len()],
            causal: vec![false; kernel.len()],
            scale: None,
        }
    }

    pub fn rank(&self) -> usize {
        self.kernel.len()
    }

    /// NATTEN's argument checks against the token grid the layer runs on.
    pub fn validate(&self, grid: &[usize]) -> std::result::Result<(), String> {
        let rank = self.kernel.len();
        if !(1..=3).contains(&rank) {
            return Err(format!("neighborhood attention is 1-D, 2-D or 3-D, got a kernel of rank {rank}"));
        }
        for (name, len) in [("stride", self.stride.len()), ("dilation", self.dilation.len()), ("causal", self.causal.len())] {
            if len != rank {
                return Err(format!("{name} has {len} entries but the kernel has {rank}"));
            }
        }
        if grid.len() != rank {
            return Err(format!("the token grid {grid:?} has rank {} but the kernel has rank {rank}", grid.len()));
        }
        for (axis, &len) in grid.iter().enumerate() {
            let (k, s, d) = (self.kernel[axis], self.stride[axis], self.dilation[axis]);
            if k < 2 {
                return Err(format!("axis {axis}: kernel size must be at least 2, got {k}"));
            }
            if s == 0 {
                return Err(format!("axis {axis}: stride must be positive"));
            }
            if d == 0 {
                return Err(format!("axis {axis}: dilation must be positive"));
            }
            if s > k {
                return Err(format!("axis {axis}: stride cannot be larger than the kernel size ({s} > {k})"));
            }
            if k * d > len {
                return Err(format!(
                    "axis {axis}: the product of kernel size and dilation cannot be larger than the input size ({k} * {d} > {len})"
                ));
            }
        }
        Ok(())
    }

    /// Whether this layer's parameters and shape can be served; `Err` carries the reason.
    pub fn check(&self, layer: &LayerShape) -> std::result::Result<(), String> {
        match layer.role {
            Role::SelfAttention | Role::Joint => {}
            Role::Cross => {
                return Err("cross-attention keys have no token grid; neighborhood attention serves self-attention \
                            (or joint attention, with the text tokens as extra keys)"
                    .into())
            }
        }
        let grid = layer
            .grid
            .as_deref()
            .ok_or_else(|| format!("neighborhood attention needs a token grid of rank {}, the layer has none", self.rank()))?;
        self.validate(grid)?;
        if layer.key_mask {
            return Err("neighborhood attention does not take a key padding mask".into());
        }
        Ok(())
    }
}

/// Window `[start, end)` of query `index` along one axis, in intra-dilation-group coordinates,
/// for a group of `length` tokens (NATTEN `get_win_start` / `get_win_end`). `index` may lie past
/// the end (a padded query in a tile); the leader clamp keeps the result inside `[0, length]`.
fn window_bounds(index: usize, length: usize, kernel: usize, stride: usize, causal: bool) -> (usize, usize) {
    let (i, len, k, s) = (index as i64, length as i64, kernel as i64, stride as i64);
    if causal {
        let leader = ((i / s) * s + s - 1).min(len - 1);
        let start = (leader - k + 1).max(0);
        let end = (i + 1).min(len);
        (start as usize, end as usize)
    } else {
        let left = k / 2;
        let right = k / 2 + (k % 2 - 1);
        let leader = ((i / s) * s + s / 2).min(len - 1);
        // Shift, don't truncate: near the right border the window moves left by the overhang.
        let overhang = if leader + right >= len { len - right - leader - 1 } else { 0 };
        let start = (leader - left).max(0) + overhang;
        (start as usize, (start + k) as usize)
    }
}

/// Number of tokens in dilation group `group` of an axis of `len` tokens.
fn dilation_group_len(len: usize, dilation: usize, group: usize) -> usize {
    len / dilation + usize::from(group < len % dilation)
}

/// Keys (original coordinates, ascending) that query `i` attends along one axis of `len` tokens.
/// Expects validated parameters (`kernel * dilation <= len`, `stride <= kernel`); keys that would
/// fall outside the axis are dropped rather than panicking.
pub fn window_1d(i: usize, len: usize, kernel: usize, stride: usize, dilation: usize, causal: bool) -> Vec<usize> {
    if len == 0 || stride == 0 || dilation == 0 || i >= len {
        return Vec::new();
    }
    let group = i % dilation;
    let group_len = dilation_group_len(len, dilation, group);
    let (start, end) = window_bounds(i / dilation, group_len, kernel, stride, causal);
    (start..end.min(group_len)).map(|j| j * dilation + group).collect()
}

/// Flattened (row-major) key tokens attended by flattened query token `query_token` of `grid`,
/// in ascending order. Empty for a token outside the grid.
pub fn neighbors(query_token: usize, grid: &[usize], params: &NeighborhoodParams) -> Vec<usize> {
    let total: usize = grid.iter().product();
    if query_token >= total || params.rank() != grid.len() {
        return Vec::new();
    }
    let coords = unflatten(query_token, grid);
    let per_axis: Vec<Vec<usize>> = (0..grid.len())
        .map(|a| window_1d(coords[a], grid[a], params.kernel[a], params.stride[a], params.dilation[a], params.causal[a]))
        .collect();
    // Cartesian product, last axis fastest: the row-major order of the flattened grid.
    let mut keys = vec![0usize];
    for (axis, window) in per_axis.iter().enumerate() {
        keys = keys.iter().flat_map(|&prefix| window.iter().map(move |&x| prefix * grid[axis] + x)).collect();
    }
    keys
}

fn unflatten(mut token: usize, grid: &[usize]) -> Vec<usize> {
    let mut coords = vec![0; grid.len()];
    for axis in (0..grid.len()).rev() {
        coords[axis] = token % grid[axis];
        token /= grid[axis];
    }
    coords
}

/// KV tiles a tiled kernel visits (NATTEN `get_trip_count`) against the dense total.
///
/// Each dilation group is tiled on its own (NATTEN folds the groups into the batch). For each
/// Q tile box, per axis, the kernel visits the KV tiles from `floor_to_tile(win_start(first q))`
/// to `ceil_to_tile(win_end(last q))`; the box is the product over axes. The dense total is
/// `Q tiles * KV tiles` of the undilated grid. Returns `(0, 0)` when the shapes do not fit
/// (rank mismatch, a zero tile).
pub fn visited_kv_tiles(grid: &[usize], params: &NeighborhoodParams, q_tile: &[usize], kv_tile: &[usize]) -> (usize, usize) {
    let rank = grid.len();
    let fits = params.validate(grid).is_ok()
        && q_tile.len() == rank
        && kv_tile.len() == rank
        && q_tile.iter().chain(kv_tile).all(|&t| t > 0);
    if !fits {
        return (0, 0);
    }
    // The box count is a product over axes, and so is the set of (dilation group, Q tile)
    // pairs, so the total is the product over axes of per-axis sums.
    let mut visited = 1usize;
    let mut dense = 1usize;
    for a in 0..rank {
        let (len, k, s, d, causal) = (grid[a], params.kernel[a], params.stride[a], params.dilation[a], params.causal[a]);
        let (qt, kt) = (q_tile[a], kv_tile[a]);
        let mut axis_sum = 0usize;
        for group in 0..d {
            let group_len = dilation_group_len(len, d, group);
            for tile in 0..group_len.div_ceil(qt) {
                let first = tile * qt;
                let last = first + qt - 1;
                let (start_first, _) = window_bounds(first, group_len, k, s, causal);
                let (_, end_last) = window_bounds(last, group_len, k, s, causal);
                let kv_start = (start_first / kt) * kt;
                let kv_end = end_last.div_ceil(kt) * kt;
                axis_sum += (kv_end - kv_start) / kt;
            }
        }
        visited *= axis_sum;
        dense *= len.div_ceil(qt) * len.div_ceil(kt);
    }
    (visited, dense)
}

/// The explicit mask as an additive bias `(N, N + extra)`: 0 for a neighbor or an extra token,
/// `-inf` elsewhere.
fn neighborhood_bias(grid: &[usize], params: &NeighborhoodParams, extra: usize) -> Vec<f32> {
    let n: usize = grid.iter().product();
    let width = n + extra;
    let mut bias = vec![f32::NEG_INFINITY; n * width];
    for query in 0..n {
        let row = &mut bias[query * width..(query + 1) * width];
        for key in neighbors(query, grid, params) {
            row[key] = 0.0;
        }
        // Extra tokens are seen by every query and never masked (not even by a causal axis).
        row[n..].fill(0.0);
    }
    bias
}

/// f32 reference: `out[q] = softmax_{kv in neighbors(q) ∪ extra}(scale q.k) v`.
///
/// `q, k, v`: `(B, H, N, D)` with `N = prod(grid)`, tokens flattened row-major; `extra_kv`:
/// `(B, H, Ne, D)` keys and values attended by every query. Returns `out (B, H, N, D)` and the
/// natural-log `lse (B, H, N)`, both f32.
pub fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grid: &[usize],
    params: &NeighborhoodParams,
    extra_kv: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    params.validate(grid).map_err(|m| Error::Usage(format!("neighborhood attention: {m}")))?;
    let (b, h, nq, nk, d) = check_qkv(q, k, v)?;
    let n: usize = grid.iter().product();
    if nq != n || nk != n {
        return Err(Error::Other(format!(
            "neighborhood attention: the grid {grid:?} has {n} tokens but q has {nq} and k has {nk}"
        )));
    }
    let (keys, values, extra) = match extra_kv {
        None => (k.clone(), v.clone(), 0),
        Some((ek, ev)) => {
            let (eb, eh, ne, ed) = ek.dims4().map_err(|_| {
                Error::Other(format!("neighborhood attention: extra keys must be (B,H,N,D), got {:?}", ek.dims()))
            })?;
            if (eb, eh, ed) != (b, h, d) || ev.dims() != ek.dims() {
                return Err(Error::Other(format!(
                    "neighborhood attention: extra keys {:?} / values {:?} do not match q {:?}",
                    ek.dims(),
                    ev.dims(),
                    q.dims()
                )));
            }
            let ek = ek.to_dtype(k.dtype())?;
            let ev = ev.to_dtype(v.dtype())?;
            (Tensor::cat(&[k, &ek], 2)?, Tensor::cat(&[v, &ev], 2)?, ne)
        }
    };
    let bias = Tensor::from_vec(neighborhood_bias(grid, params, extra), (n, n + extra), q.device())?;
    masked_attention(q, &keys, &values, &bias, scale)
}

/// One neighborhood attention call: `(out in q's dtype, lse f32 (B, H, N))`.
pub fn forward(p: &NeighborhoodParams, input: &AttentionInput) -> Result<(Tensor, Tensor)> {
    let grid = input
        .grid
        .ok_or_else(|| Error::Other("neighborhood attention needs the token grid of the queries".into()))?;
    if input.key_mask.is_some() {
        return Err(Error::Other("neighborhood attention does not take a key padding mask".into()));
    }
    // `input.rope` belongs to linear attention's numerator form; softmax backends receive q and k
    // already rotated, so it is not used here.
    let d = input.q.dim(3)?;
    let scale = p.scale.unwrap_or(1.0 / (d as f64).sqrt());

    // On the GPU: the block-sparse kernel (kernels/attention/neighborhood); a dtype or head dim
    // it does not serve is an error, not a silent fallback (the f32 reference on the GPU is an
    // (N, N) mask). `with_reference_only` selects the reference explicitly.
    #[cfg(feature = "cuda")]
    if input.q.device().is_cuda() && !super::reference_only() {
        if !super::cuda::neighborhood::supports(input.q.dtype(), d) {
            return Err(Error::Other(format!(
                "neighborhood attention on the GPU: no kernel for dtype {:?} / head_dim {d} (bf16 or f16, head_dim in {:?}); \
                 run with the reference attention for other cases",
                input.q.dtype(),
                super::cuda::neighborhood::HEAD_DIMS
            )));
        }
        return super::cuda::neighborhood::forward(input.q, input.k, input.v, grid, p, input.extra_kv, scale);
    }

    let (out, lse) = reference(input.q, input.k, input.v, grid, p, input.extra_kv, scale)?;
    Ok((out.to_dtype(input.q.dtype())?, lse.to_dtype(DType::F32)?))
}
