//! Pyramid sparse attention (PSA, ziplab/Pyramid-Sparse-Attention): each query block attends each
//! KV block at one of several mean-pooling levels (pool factor 1, 2, 4, 8) or skips it, chosen
//! from a cheap block-importance estimate. A pooled key carries a logit bias `ln(p)` so that it
//! stands in for the `p` keys it averages (exact when those keys and values are equal).
//!
//! Semantics follow the released code (`shared/specs/gna_psa_flux.md` §B.2) and
//! `shared/specs/ref/psa_ref.py`:
//! 1. [`importance`]: sampled queries and keys per block, row-max-normalized block maxima,
//!    normalized per row.
//! 2. [`assign_levels`]: per query block, rank KV blocks by importance and hand out pool factors
//!    by fixed quotas ([`LevelMode::Topk`]) or by cumulative importance ([`LevelMode::Threshold`]).
//! 3. [`reference_with_levels`]: per query block, softmax over the concatenation of the selected
//!    KV blocks, each pooled by its factor, with bias `ln(p)`.
//!
//! Deviations from the released code, all deliberate:
//! - Sampling is deterministic given `PyramidParams::seed` (SplitMix64, stable across crate
//!   versions); PSA draws fresh random positions on every call.
//! - Importance is normalized over the real KV blocks only (PSA's kernel also sums the columns of
//!   its 64-alignment padding before slicing them off).
//! - A query block whose row would select nothing (possible in `Topk` mode with very few KV
//!   blocks) gets its highest-importance KV block at pool 1, so no row ever divides by zero.
//!   [`reference_with_levels`] given a hand-made mask with an empty row returns zeros there.
//! - Keys past the sequence end (the replicate padding of the last, ragged KV block) are never
//!   attended: at pool `p` the pooled token `t` is kept iff `t * p < N`, as in psa_ref.py. A
//!   partly padded group keeps psa_ref's value: the mean over its real keys and copies of the
//!   last key, with bias `ln(p)`.
//! - Importance and attention use the same scale (`scale`, default `head_dim^-0.5`); PSA always
//!   uses `head_dim^-0.5` for both, which is the default here.

use candle_core::{DType, IndexOp, Tensor};

use super::masked::masked_attention;
use super::{check_qkv, AttentionInput, LayerShape, Role};
use crate::error::{Error, Result};

/// How KV blocks are assigned to levels, per query block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelMode {
    /// Fixed quotas over the importance ranking (PSA `topk`), the same for every row.
    Topk,
    /// Cumulative normalized importance up to each level's bound (PSA `thresholdbound`).
    Threshold,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PyramidParams {
    /// Queries per query block (PSA `block_m`).
    pub block_q: usize,
    /// Keys per KV block (PSA `block_n`).
    pub block_k: usize,
    /// Compute tile of the kernel (PSA `tile_n`); it sets the alignment of the level quotas.
    pub tile_k: usize,
    /// `(pool factor, cumulative end)` in order: in `Topk` mode the ranks up to `end * n_k`, in
    /// `Threshold` mode the cumulative importance up to `end`. Ends must not decrease; whatever
    /// is left after the last level is skipped.
    pub levels: Vec<(usize, f64)>,
    pub mode: LevelMode,
    /// `Threshold` mode: at least `int(n_k * min_full_ratio) + 1` blocks get pool 1.
    pub min_full_ratio: f64,
    /// Sampled queries per query block for the importance estimate; `None` = `block_q / 4` (PSA).
    pub sample_q: Option<usize>,
    /// Sampled keys per KV block; `None` = `block_k / 4` (PSA).
    pub sample_k: Option<usize>,
    /// Seed of the sampled positions.
    pub seed: u64,
    /// Softmax scale; `None` = `head_dim^-0.5`.
    pub scale: Option<f64>,
}

impl Default for PyramidParams {
    /// PSA's `PSAConfig` defaults (~85% sparsity).
    fn default() -> Self {
        Self {
            block_q: 128,
            block_k: 64,
            tile_k: 32,
            levels: vec![(1, 0.10), (2, 0.15), (4, 0.15), (8, 0.35)],
            mode: LevelMode::Topk,
            min_full_ratio: 0.06,
            sample_q: None,
            sample_k: None,
            seed: 0,
            scale: None,
        }
    }
}

impl PyramidParams {
    /// Default parameters with other block sizes.
    pub fn with_blocks(block_q: usize, block_k: usize, tile_k: usize) -> Self {
        Self { block_q, block_k, tile_k, ..Self::default() }
    }

    /// Sampled queries per query block.
    pub fn sample_q_count(&self) -> usize {
        self.sample_q.unwrap_or((self.block_q / 4).max(1))
    }

    /// Sampled keys per KV block.
    pub fn sample_k_count(&self) -> usize {
        self.sample_k.unwrap_or((self.block_k / 4).max(1))
    }

    /// Checks the parameters on their own; `Err` carries the reason.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_q == 0 || !self.block_q.is_multiple_of(8) {
            return Err(format!("block_q must be a positive multiple of 8, got {}", self.block_q));
        }
        if self.block_k == 0 || !self.block_k.is_multiple_of(8) {
            return Err(format!("block_k must be a positive multiple of 8 (pool 8 must tile a block), got {}", self.block_k));
        }
        if self.tile_k == 0 || !self.block_k.is_multiple_of(self.tile_k) {
            return Err(format!("tile_k must divide block_k, got tile_k {} and block_k {}", self.tile_k, self.block_k));
        }
        let (sample_q, sample_k) = (self.sample_q_count(), self.sample_k_count());
        if !(1..=self.block_q).contains(&sample_q) || !(1..=self.block_k).contains(&sample_k) {
            return Err(format!(
                "sample_q must be in 1..={} and sample_k in 1..={}, got {sample_q} and {sample_k}",
                self.block_q, self.block_k
            ));
        }
        let mut previous_end = 0.0;
        for (index, &(pool, end)) in self.levels.iter().enumerate() {
            if ![1, 2, 4, 8].contains(&pool) {
                return Err(format!("level {index}: pool factor must be 1, 2, 4 or 8, got {pool}"));
            }
            if self.levels[..index].iter().any(|&(p, _)| p == pool) {
                return Err(format!("level {index}: pool factor {pool} appears twice"));
            }
            if !(0.0..=1.0).contains(&end) || end < previous_end {
                return Err(format!("level {index}: ends must be in [0, 1] and not decrease, got {end} after {previous_end}"));
            }
            previous_end = end;
        }
        if !(0.0..=1.0).contains(&self.min_full_ratio) {
            return Err(format!("min_full_ratio must be in [0, 1], got {}", self.min_full_ratio));
        }
        if let Some(scale) = self.scale {
            if !scale.is_finite() {
                return Err(format!("scale must be finite, got {scale}"));
            }
        }
        Ok(())
    }

    /// Whether this layer can be served; `Err` carries the reason.
    pub fn check(&self, layer: &LayerShape) -> std::result::Result<(), String> {
        if layer.role != Role::SelfAttention {
            return Err(format!("pyramid sparse attention serves self-attention only, this layer is {}", layer.role));
        }
        if layer.key_mask {
            return Err("pyramid sparse attention does not take a key padding mask".into());
        }
        self.validate()
    }

    /// Segment lengths of pool `p` are rounded to this many KV blocks so that pooled blocks fill
    /// whole compute tiles (PSA `alignment_multiple`).
    fn alignment(&self, pool: usize) -> usize {
        pool.div_ceil(self.block_k / self.tile_k)
    }

    fn resolved_scale(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or(1.0 / (head_dim as f64).sqrt())
    }
}

/// Pool factor per `(batch, head, query block, KV block)`; 0 = skip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelMask {
    pub batch: usize,
    pub heads: usize,
    pub q_blocks: usize,
    pub k_blocks: usize,
    pools: Vec<u8>,
}

impl LevelMask {
    /// All blocks skipped.
    pub fn new(batch: usize, heads: usize, q_blocks: usize, k_blocks: usize) -> Self {
        Self { batch, heads, q_blocks, k_blocks, pools: vec![0; batch * heads * q_blocks * k_blocks] }
    }

    /// Every entry from `pool(b, h, i, j)`.
    pub fn from_fn(
        batch: usize,
        heads: usize,
        q_blocks: usize,
        k_blocks: usize,
        pool: impl Fn(usize, usize, usize, usize) -> usize,
    ) -> Self {
        let mut mask = Self::new(batch, heads, q_blocks, k_blocks);
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..q_blocks {
                    for j in 0..k_blocks {
                        mask.set(b, h, i, j, pool(b, h, i, j));
                    }
                }
            }
        }
        mask
    }

    fn index(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        ((b * self.heads + h) * self.q_blocks + i) * self.k_blocks + j
    }

    pub fn get(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        self.pools[self.index(b, h, i, j)] as usize
    }

    /// Pools above 255 saturate; [`reference_with_levels`] rejects any pool but 0, 1, 2, 4, 8.
    pub fn set(&mut self, b: usize, h: usize, i: usize, j: usize, pool: usize) {
        let index = self.index(b, h, i, j);
        self.pools[index] = pool.min(u8::MAX as usize) as u8;
    }

    /// One row `(b, h, i)`: the pool factor of every KV block.
    pub fn row(&self, b: usize, h: usize, i: usize) -> &[u8] {
        let start = self.index(b, h, i, 0);
        &self.pools[start..start + self.k_blocks]
    }

    /// Mean compute density `mean(1/p)` over all entries (0 for a skipped block), PSA's `calc_density`.
    pub fn density(&self) -> f64 {
        if self.pools.is_empty() {
            return 0.0;
        }
        let total: f64 = self.pools.iter().map(|&p| if p == 0 { 0.0 } else { 1.0 / p as f64 }).sum();
        total / self.pools.len() as f64
    }
}

/// Mean pooling along the sequence: replicate-pad `x (B, H, N, D)` to a multiple of `block_k`
/// (copies of the last token), then average non-overlapping groups of `pool` tokens.
/// Returns `(B, H, ceil(N / block_k) * block_k / pool, D)` in f32.
pub fn pool_mean(x: &Tensor, pool: usize, block_k: usize) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    if pool == 0 || block_k == 0 || !block_k.is_multiple_of(pool) || n == 0 {
        return Err(Error::Other(format!(
            "pool_mean: pool {pool} must divide block_k {block_k}, and the sequence must not be empty (N = {n})"
        )));
    }
    let x = x.to_dtype(DType::F32)?;
    let padded_len = n.div_ceil(block_k) * block_k;
    let padded = if padded_len > n {
        let last = x.narrow(2, n - 1, 1)?.broadcast_as((b, h, padded_len - n, d))?;
        Tensor::cat(&[&x, &last.contiguous()?], 2)?
    } else {
        x
    };
    Ok(padded.reshape((b, h, padded_len / pool, pool, d))?.mean(3)?)
}

/// Sampled intra-block positions, per `(b, h)` (index `b * heads + h`), ascending. The same
/// positions serve every block of that `(b, h)`, as in PSA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplePositions {
    pub q: Vec<Vec<usize>>,
    pub k: Vec<Vec<usize>>,
}

/// SplitMix64: a tiny generator whose stream is fixed by its definition, not by a crate version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `count` distinct positions of `0..len` (partial Fisher-Yates), ascending.
    fn choose(&mut self, len: usize, count: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..len).collect();
        for slot in 0..count.min(len) {
            let pick = slot + (self.next_u64() % (len - slot) as u64) as usize;
            pool.swap(slot, pick);
        }
        let mut chosen = pool[..count.min(len)].to_vec();
        chosen.sort_unstable();
        chosen
    }
}

/// The positions [`importance`] samples: for each `(b, h)` in order, `sample_q` of `block_q`
/// query positions, then `sample_k` of `block_k` key positions, from `params.seed`.
pub fn sample_positions(params: &PyramidParams, batch: usize, heads: usize) -> SamplePositions {
    let mut rng = SplitMix64(params.seed);
    let mut positions = SamplePositions { q: Vec::new(), k: Vec::new() };
    for _ in 0..batch * heads {
        positions.q.push(rng.choose(params.block_q, params.sample_q_count()));
        positions.k.push(rng.choose(params.block_k, params.sample_k_count()));
    }
    positions
}

/// Block importance `(B, H, ceil(Nq / block_q), ceil(Nk / block_k))`, f32, each row summing to 1.
/// Uses [`sample_positions`]; see [`importance_with_samples`].
pub fn importance(q: &Tensor, k: &Tensor, params: &PyramidParams) -> Result<Tensor> {
    let (b, h, _, _) = q.dims4()?;
    importance_with_samples(q, k, params, &sample_positions(params, b, h))
}

/// PSA's importance estimate with given sample positions. Sequences are replicate-padded to
/// whole blocks (a position past the end reads the last token). Per sampled query `r` and KV
/// block `j`: `R[r, j] = max over sampled keys c of j (scale q_r . k_c)`; per query block `i`:
/// `S[i, j] = max over sampled queries r of i of exp(R[r, j] - max_j' R[r, j'])`; then each row
/// of `S` is divided by its sum.
pub fn importance_with_samples(q: &Tensor, k: &Tensor, params: &PyramidParams, samples: &SamplePositions) -> Result<Tensor> {
    params.validate().map_err(|m| Error::Usage(format!("pyramid attention: {m}")))?;
    let (b, h, nq, d) = q.dims4()?;
    let (bk, hk, nk, dk) = k.dims4()?;
    if (bk, hk, dk) != (b, h, d) || nq == 0 || nk == 0 {
        return Err(Error::Other(format!("pyramid importance: q {:?} and k {:?} do not match", q.dims(), k.dims())));
    }
    if samples.q.len() != b * h || samples.k.len() != b * h {
        return Err(Error::Other(format!("pyramid importance: sample positions for {} heads, need {}", samples.q.len(), b * h)));
    }
    let scale = params.resolved_scale(d);
    let (q_blocks, k_blocks) = (nq.div_ceil(params.block_q), nk.div_ceil(params.block_k));
    let q_data = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let k_data = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;

    let mut out = Vec::with_capacity(b * h * q_blocks * k_blocks);
    for bh in 0..b * h {
        let q_head = &q_data[bh * nq * d..(bh + 1) * nq * d];
        let k_head = &k_data[bh * nk * d..(bh + 1) * nk * d];
        // Block max of the sampled logits, one row per sampled query, grouped by query block.
        let mut block_max: Vec<Vec<Vec<f64>>> = vec![Vec::new(); q_blocks];
        for (i, rows) in block_max.iter_mut().enumerate() {
            for &qp in &samples.q[bh] {
                let query = token(q_head, d, (i * params.block_q + qp).min(nq - 1));
                let r: Vec<f64> = (0..k_blocks)
                    .map(|j| {
                        samples.k[bh]
                            .iter()
                            .map(|&kp| {
                                let key = token(k_head, d, (j * params.block_k + kp).min(nk - 1));
                                dot(query, key) * scale
                            })
                            .fold(f64::NEG_INFINITY, f64::max)
                    })
                    .collect();
                rows.push(r);
            }
        }
        for rows in &block_max {
            let mut scores = vec![0f64; k_blocks];
            for r in rows {
                let row_max = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                for (score, &x) in scores.iter_mut().zip(r) {
                    *score = score.max((x - row_max).exp());
                }
            }
            let total: f64 = scores.iter().sum();
            out.extend(scores.iter().map(|&s| (s / total) as f32));
        }
    }
    Ok(Tensor::from_vec(out, (b, h, q_blocks, k_blocks), q.device())?)
}

fn token(data: &[f32], d: usize, t: usize) -> &[f32] {
    &data[t * d..(t + 1) * d]
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Pool factors from an importance tensor `(B, H, q_blocks, k_blocks)`, per row, by `params.mode`.
///
/// KV blocks are ranked by importance, descending (ties: lower block index first). Each level
/// takes a contiguous range of ranks starting where the previous one ended; a range of pool `p`
/// has a length that is a multiple of `ceil(p / (block_k / tile_k))` blocks (rounded up, or down
/// where it would pass the last block). Ranks after the last level are skipped.
/// - `Topk`: the range of a level ends at rank `int(n_k * end)`.
/// - `Threshold`: it ends one past the last rank whose cumulative normalized importance is
///   `<= end + 1e-6`; pool 1 ends no earlier than `min(n_k, int(n_k * min_full_ratio) + 1)`.
///
/// A row left with nothing selected gets its highest-ranked block at pool 1.
pub fn assign_levels(importance: &Tensor, params: &PyramidParams) -> Result<LevelMask> {
    params.validate().map_err(|m| Error::Usage(format!("pyramid attention: {m}")))?;
    let (b, h, q_blocks, k_blocks) = importance.dims4()?;
    let data = importance.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut mask = LevelMask::new(b, h, q_blocks, k_blocks);
    for (row_index, row) in data.chunks(k_blocks.max(1)).enumerate().take(b * h * q_blocks) {
        let ranked = rank_descending(row);
        let ranges = match params.mode {
            LevelMode::Topk => topk_ranges(k_blocks, params),
            LevelMode::Threshold => threshold_ranges(row, &ranked, params),
        };
        let start = row_index * k_blocks;
        for (pool, from, to) in ranges {
            for &block in &ranked[from..to] {
                mask.pools[start + block] = pool as u8;
            }
        }
        if k_blocks > 0 && mask.pools[start..start + k_blocks].iter().all(|&p| p == 0) {
            mask.pools[start + ranked[0]] = 1;
        }
    }
    Ok(mask)
}

/// Block indices sorted by importance, descending; stable, so ties keep index order.
fn rank_descending(row: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order
}

/// Rounds the range `[start, end)` to a multiple of `multiple` blocks: up, then down again if
/// rounding up reached the last block.
fn align_range(start: usize, end: usize, multiple: usize, n_k: usize) -> usize {
    let length = end.saturating_sub(start);
    let up = (start + length.div_ceil(multiple) * multiple).min(n_k);
    if up == n_k {
        start + ((up - start) / multiple) * multiple
    } else {
        up
    }
}

/// `(pool, first rank, end rank)` for `Topk` mode: the same for every row.
pub(crate) fn topk_ranges(n_k: usize, params: &PyramidParams) -> Vec<(usize, usize, usize)> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for &(pool, end_ratio) in &params.levels {
        let quota_end = n_k.min((n_k as f64 * end_ratio) as usize);
        let multiple = params.alignment(pool);
        let end = if multiple > 1 && quota_end > start { align_range(start, quota_end, multiple, n_k) } else { quota_end };
        if start < end {
            ranges.push((pool, start, end));
            start = end;
        }
    }
    ranges
}

/// `(pool, first rank, end rank)` for `Threshold` mode, from one row's cumulative importance.
fn threshold_ranges(row: &[f32], ranked: &[usize], params: &PyramidParams) -> Vec<(usize, usize, usize)> {
    let n_k = row.len();
    let total: f64 = ranked.iter().map(|&j| row[j] as f64).sum();
    let mut cumulative = 0.0;
    let energy: Vec<f64> = ranked
        .iter()
        .map(|&j| {
            cumulative += row[j] as f64;
            cumulative / total
        })
        .collect();
    let mut ranges = Vec::new();
    let mut start = 0;
    for &(pool, end_ratio) in &params.levels {
        let within = energy.iter().filter(|&&e| e <= end_ratio + 1e-6).count();
        // One past the last rank within the bound: the block that crosses it is included.
        let bound_end = if within > 0 { within + 1 } else { start };
        let multiple = params.alignment(pool);
        let end = if multiple > 1 {
            align_range(start, bound_end, multiple, n_k)
        } else {
            let mut end = bound_end.min(n_k).max(start);
            if pool == 1 {
                end = end.max(n_k.min((n_k as f64 * params.min_full_ratio) as usize + 1));
            }
            end
        };
        if start < end {
            ranges.push((pool, start, end));
        }
        start = end.max(start);
    }
    ranges
}

/// Mixed-level attention, f32 `(B, H, Nq, D)` (psa_ref.py): query block `i` attends, for every
/// KV block `j` with pool `p = mask(b, h, i, j) > 0`, the block's keys and values mean-pooled by
/// `p` (see [`pool_mean`]) with logit bias `ln(p)`. Pooled tokens made only of padding past the
/// end of the sequence are not attended. A row with nothing selected gives zeros.
pub fn reference_with_levels(q: &Tensor, k: &Tensor, v: &Tensor, mask: &LevelMask, params: &PyramidParams) -> Result<Tensor> {
    params.validate().map_err(|m| Error::Usage(format!("pyramid attention: {m}")))?;
    let (b, h, nq, nk, d) = check_qkv(q, k, v)?;
    let (q_blocks, k_blocks) = (nq.div_ceil(params.block_q), nk.div_ceil(params.block_k));
    if (mask.batch, mask.heads, mask.q_blocks, mask.k_blocks) != (b, h, q_blocks, k_blocks) {
        return Err(Error::Other(format!(
            "pyramid attention: level mask is ({}, {}, {}, {}) but the inputs need ({b}, {h}, {q_blocks}, {k_blocks})",
            mask.batch, mask.heads, mask.q_blocks, mask.k_blocks
        )));
    }
    if let Some(&bad) = mask.pools.iter().find(|&&p| ![0, 1, 2, 4, 8].contains(&p)) {
        return Err(Error::Other(format!("pyramid attention: pool factor {bad} in the level mask (0, 1, 2, 4 or 8)")));
    }
    let scale = params.resolved_scale(d);
    let q = q.to_dtype(DType::F32)?;
    // Pooled keys and values per level, (B, H, padded / p, D).
    let levels = [1usize, 2, 4, 8];
    let mut pooled = Vec::new();
    for &p in &levels {
        pooled.push((pool_mean(k, p, params.block_k)?, pool_mean(v, p, params.block_k)?));
    }

    let mut heads_out = Vec::with_capacity(b * h);
    for bi in 0..b {
        for hi in 0..h {
            let mut blocks_out = Vec::with_capacity(q_blocks);
            for i in 0..q_blocks {
                let row_start = i * params.block_q;
                let rows = params.block_q.min(nq - row_start);
                let queries = q.i((bi, hi))?.narrow(0, row_start, rows)?;
                let mut keys = Vec::new();
                let mut values = Vec::new();
                let mut bias = Vec::new();
                for (level, &p) in levels.iter().enumerate() {
                    let tokens_per_block = params.block_k / p;
                    let selected: Vec<u32> = (0..k_blocks)
                        .filter(|&j| mask.get(bi, hi, i, j) == p)
                        .flat_map(|j| j * tokens_per_block..(j + 1) * tokens_per_block)
                        .filter(|&t| t * p < nk)
                        .map(|t| t as u32)
                        .collect();
                    if selected.is_empty() {
                        continue;
                    }
                    let index = Tensor::from_vec(selected.clone(), selected.len(), q.device())?;
                    keys.push(pooled[level].0.i((bi, hi))?.index_select(&index, 0)?);
                    values.push(pooled[level].1.i((bi, hi))?.index_select(&index, 0)?);
                    bias.extend(std::iter::repeat_n((p as f32).ln(), selected.len()));
                }
                if keys.is_empty() {
                    blocks_out.push(Tensor::zeros((rows, d), DType::F32, q.device())?);
                    continue;
                }
                let keys = Tensor::cat(&keys, 0)?;
                let values = Tensor::cat(&values, 0)?;
                let bias = Tensor::from_vec(bias, (1, keys.dim(0)?), q.device())?;
                let (out, _lse) = masked_attention(&queries, &keys, &values, &bias, scale)?;
                blocks_out.push(out);
            }
            heads_out.push(Tensor::cat(&blocks_out, 0)?);
        }
    }
    Ok(Tensor::stack(&heads_out, 0)?.reshape((b, h, nq, d))?)
}

/// One pyramid attention call: importance, then levels, then mixed-level attention.
/// Output `(B, H, N, D)` in q's dtype.
pub fn forward(p: &PyramidParams, input: &AttentionInput) -> Result<Tensor> {
    p.validate().map_err(|m| Error::Usage(format!("pyramid attention: {m}")))?;
    if input.key_mask.is_some() {
        return Err(Error::Other("pyramid attention does not take a key padding mask".into()));
    }
    if input.extra_kv.is_some() {
        return Err(Error::Other("pyramid attention does not take extra key/value tokens".into()));
    }
    check_qkv(input.q, input.k, input.v)?;

    // On the GPU: importance, ranking, pooling and the mixed-level kernel
    // (kernels/attention/pyramid); a case it does not serve is an error naming why, not a silent
    // fallback. `with_reference_only` selects the reference explicitly.
    #[cfg(feature = "cuda")]
    if input.q.device().is_cuda() && !super::reference_only() {
        let d = input.q.dim(3)?;
        if !super::cuda::pyramid::supports(input.q.dtype(), d) {
            return Err(Error::Other(format!(
                "pyramid attention on the GPU: no kernel for dtype {:?} / head_dim {d} (bf16 or f16, head_dim in {:?})",
                input.q.dtype(),
                super::cuda::pyramid::HEAD_DIMS
            )));
        }
        super::cuda::pyramid::check_params(p).map_err(|m| Error::Other(format!("pyramid attention on the GPU: {m}")))?;
        return super::cuda::pyramid::forward(input.q, input.k, input.v, p);
    }

    let scores = importance(input.q, input.k, p)?;
    let levels = assign_levels(&scores, p)?;
    let out = reference_with_levels(input.q, input.k, input.v, &levels, p)?;
    Ok(out.to_dtype(input.q.dtype())?)
}
