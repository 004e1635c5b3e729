//! Host-side tiling of GNA for the block-sparse CUDA kernel (kernels/attention/neighborhood):
//! the token permutation and, per query tile, the list of KV tiles to visit with their kind.
//! Pure Rust (no device), so that it is tested on the CPU against [`super::neighbors`].
//!
//! Layout (NATTEN's token permutation, with dilation folded in):
//! - The grid is padded to rank 3 with leading axes of length 1.
//! - Per axis of length `L`, dilation `d`, tile `t` (a power of two): each dilation group (tokens
//!   `x` with `x % d == g`, intra-group coordinate `x / d`) is padded to `P = ceil(ceil(L/d)/t) t`
//!   positions; the permuted axis is the `d` groups one after the other, `d P` positions.
//! - A tile is a box `t0 x t1 x t2` (product [`TILE`] = 128 tokens), the boxes ordered row-major,
//!   the tokens inside a box row-major: permuted token `p = tile * 128 + row`. A tile never
//!   crosses a dilation group, so a query tile only ever sees KV tiles of its own group.
//! - Query tiles and KV tiles are the same boxes (128 queries, 128 keys per compute tile).
//!
//! Per (query tile, KV tile) the neighbor relation is a product over axes, and so are the real
//! (non-padding) tokens of a box, so "some pair is a neighbor" and "every real query sees every
//! key of the tile" are both products of per-axis answers: the lists are built per axis and
//! combined. A FULL tile needs no masking in the kernel; a PARTIAL tile is masked by its keep
//! words, precomputed here ([`super::masks`]); an EXTRA tile is 128 extra KV tokens (all seen;
//! only the ragged end is masked).

use super::masks::{self, MaskTable, PATTERN_WORDS};
use super::{dilation_group_len, window_bounds, NeighborhoodParams};

/// Tokens per query tile and per KV tile.
pub const TILE: usize = 128;
/// Kinds of a KV tile list entry (low 2 bits of the entry; the tile index above them).
pub const KIND_FULL: i32 = 0;
pub const KIND_PARTIAL: i32 = 1;
pub const KIND_EXTRA: i32 = 2;
/// A PARTIAL tile whose keep words depend, in every row, only on the key column's class
/// `(n % 2, c)` (`masks::MaskTable::columns_only`): the kernel masks it by a bias per class.
pub const KIND_PARTIAL_COLUMNS: i32 = 3;


/// One axis of the (rank-3-padded) grid, as the kernel sees it. Mirrored by `GnaAxis` in
/// kernels/attention/neighborhood/gna_fwd.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AxisTiling {
    pub len: i32,
    pub kernel: i32,
    pub stride: i32,
    pub dilation: i32,
    pub causal: i32,
    /// box size along the axis (power of two)
    pub tile: i32,
    pub log_tile: i32,
    /// padded length of one dilation group (multiple of `tile`)
    pub group_pad: i32,
    /// tiles per dilation group (`group_pad / tile`)
    pub tiles_per_group: i32,
    /// tiles along the axis (`dilation * tiles_per_group`)
    pub tiles: i32,
}

impl AxisTiling {
    fn new(len: usize, kernel: usize, stride: usize, dilation: usize, causal: bool, tile: usize) -> Self {
        let group_max = len.div_ceil(dilation);
        let tiles_per_group = group_max.div_ceil(tile);
        Self {
            len: len as i32,
            kernel: kernel as i32,
            stride: stride as i32,
            dilation: dilation as i32,
            causal: causal as i32,
            tile: tile as i32,
            log_tile: tile.trailing_zeros() as i32,
            group_pad: (tiles_per_group * tile) as i32,
            tiles_per_group: tiles_per_group as i32,
            tiles: (dilation * tiles_per_group) as i32,
        }
    }

    /// A trivial axis of length 1 (rank padding): one window of one key.
    fn unit() -> Self {
        Self::new(1, 1, 1, 1, false, 1)
    }

    pub(super) fn group_len(&self, group: usize) -> usize {
        dilation_group_len(self.len as usize, self.dilation as usize, group)
    }

    /// Window `[start, end)` of intra-group coordinate `i` in `group`.
    pub(super) fn window(&self, i: usize, group: usize) -> (usize, usize) {
        let gl = self.group_len(group);
        window_bounds(i, gl, self.kernel as usize, self.stride as usize, self.causal != 0)
    }

    /// Original coordinate of permuted position `pos`, or None for a padding position.
    fn original(&self, pos: usize) -> Option<usize> {
        let (group, i) = (pos / self.group_pad as usize, pos % self.group_pad as usize);
        (i < self.group_len(group)).then(|| i * self.dilation as usize + group)
    }

    /// Per query tile coordinate along this axis: the KV tile coordinates it visits, each with
    /// `true` when every real query of the tile sees every key of the KV tile (all keys real).
    ///
    /// Windows are intervals whose ends never decrease with the query (stride <= kernel), so
    /// the union of a tile's windows is the interval [min start, max end) and their
    /// intersection is [max start, min end).
    fn relations(&self) -> Vec<Vec<(usize, bool)>> {
        let (tpg, t) = (self.tiles_per_group as usize, self.tile as usize);
        (0..self.tiles as usize)
            .map(|qt| {
                let group = qt / tpg;
                let gl = self.group_len(group);
                let q0 = (qt % tpg) * t;
                if q0 >= gl {
                    return Vec::new(); // no real query in this tile
                }
                let (mut lo, mut hi, mut in_lo, mut in_hi) = (usize::MAX, 0, 0, usize::MAX);
                for i in q0..(q0 + t).min(gl) {
                    let (ws, we) = self.window(i, group);
                    (lo, hi, in_lo, in_hi) = (lo.min(ws), hi.max(we), in_lo.max(ws), in_hi.min(we));
                }
                let first = lo / t;
                let last = hi.min(gl).div_ceil(t); // exclusive, in group-local tiles
                (first..last)
                    .map(|local| {
                        let k0 = local * t;
                        let full = k0 + t <= gl && in_lo <= k0 && in_hi >= k0 + t;
                        (group * tpg + local, full)
                    })
                    .collect()
            })
            .collect()
    }
}

/// The tiling of one (grid, params, extra tokens) problem: what the CUDA launcher uploads.
#[derive(Debug, Clone)]
pub struct GnaTiling {
    /// axes 0..3 (slowest first), the first `3 - rank` of unit length
    pub axes: [AxisTiling; 3],
    /// real tokens
    pub n: usize,
    /// permuted (padded) tokens: tiles * 128
    pub n_pad: usize,
    /// permuted token -> original flattened token, -1 for padding
    pub perm: Vec<i32>,
    /// CSR over query tiles: entries of tile `i` are `entries[offsets[i]..offsets[i + 1]]`,
    /// FULL tiles first, then PARTIAL, then extra-token tiles
    pub offsets: Vec<i32>,
    /// per query tile, the end of its FULL entries (`offsets[i] <= full_ends[i] <= offsets[i + 1]`):
    /// the kernel runs that run of tiles through a loop without masking code
    pub full_ends: Vec<i32>,
    /// per query tile, the end of its PARTIAL_COLUMNS entries, which follow the FULL ones
    /// (`full_ends[i] <= columns_ends[i] <= offsets[i + 1]`): the kernel's loop for them
    pub columns_ends: Vec<i32>,
    /// `(kv_tile << 2) | kind`
    pub entries: Vec<i32>,
    /// per entry: its keep-word pattern for a PARTIAL tile, -1 otherwise
    pub mask_of: Vec<i32>,
    /// the patterns, [`PATTERN_WORDS`] u32 each (see [`super::masks`])
    pub masks: Vec<u32>,
    /// grid tiles visited, of which full (extra tiles not counted)
    pub visited: usize,
    pub full: usize,
    /// KV tiles of extra tokens (ceil(n_extra / 128)), listed for every query tile with a real query
    pub extra_tiles: usize,
}

impl GnaTiling {
    pub fn q_tiles(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Fraction of the dense kernel's KV tile visits that this tiling makes, extra tokens
    /// included on both sides: (grid tiles visited + extra-token tiles visited) /
    /// (ceil(N/128) x (ceil(N/128) + extra-token tiles)), the dense kernel attending the extra
    /// keys too. Without extra tokens: visited / ceil(N/128)^2.
    pub fn visited_fraction(&self) -> f64 {
        let q_tiles = self.n.div_ceil(TILE);
        let extra_visits = self.entries.len() - self.visited;
        let dense = q_tiles * (q_tiles + self.extra_tiles);
        (self.visited + extra_visits) as f64 / dense.max(1) as f64
    }

    /// Per-axis coordinate of permuted token `p`: (tile coordinate, offset inside the box).
    fn split(&self, p: usize) -> [(usize, usize); 3] {
        let (tile, row) = (p / TILE, p % TILE);
        let a = &self.axes;
        let t2 = tile % a[2].tiles as usize;
        let t1 = (tile / a[2].tiles as usize) % a[1].tiles as usize;
        let t0 = tile / (a[2].tiles as usize * a[1].tiles as usize);
        let c2 = row & (a[2].tile as usize - 1);
        let c1 = (row >> a[2].log_tile) & (a[1].tile as usize - 1);
        let c0 = row >> (a[2].log_tile + a[1].log_tile);
        [(t0, c0), (t1, c1), (t2, c2)]
    }

    /// Number of distinct keep-word patterns.
    pub fn patterns(&self) -> usize {
        self.masks.len() / PATTERN_WORDS
    }

    /// Whether the kernel keeps the key of column `col` for the query of row `row` in grid list
    /// entry `index` (FULL: always; PARTIAL: the bit of its keep word, read from the table it
    /// uploads); None for an extra-token entry.
    pub fn kernel_keeps(&self, index: usize, row: usize, col: usize) -> Option<bool> {
        match self.entries[index] & 3 {
            KIND_FULL => Some(true),
            KIND_PARTIAL | KIND_PARTIAL_COLUMNS => {
                let (ctid, w, bit) = masks::keep_bit(row, col);
                let word = self.masks[self.mask_of[index] as usize * PATTERN_WORDS + ctid * masks::THREAD_WORDS + w];
                Some((word >> bit) & 1 == 1)
            }
            _ => None,
        }
    }

    /// The window test per element, on the host: whether permuted query `pq` attends permuted
    /// key `pk` (both in the same group by construction of the lists).
    pub fn mask_ok(&self, pq: usize, pk: usize) -> bool {
        let (sq, sk) = (self.split(pq), self.split(pk));
        (0..3).all(|a| {
            let ax = &self.axes[a];
            let (tpg, t) = (ax.tiles_per_group as usize, ax.tile as usize);
            let group = sq[a].0 / tpg;
            let i = (sq[a].0 % tpg) * t + sq[a].1;
            let j = (sk[a].0 % tpg) * t + sk[a].1;
            let (ws, we) = ax.window(i, group);
            j >= ws && j < we
        })
    }
}

/// Per-axis candidate box sizes: powers of two up to 128 (a box longer than the axis is only
/// padding, which the visit count penalizes; tiny grids need it).
fn tile_options() -> Vec<usize> {
    (0..=7).map(|e| 1usize << e).collect()
}

/// Builds the tiling, choosing the box (t0, t1, t2) that visits the fewest tiles (ties: the
/// most full tiles). `grid` and `params` must have passed `params.validate(grid)`.
pub fn plan(grid: &[usize], params: &NeighborhoodParams, n_extra: usize) -> Result<GnaTiling, String> {
    params.validate(grid)?;
    let rank = grid.len();
    let pad = 3 - rank;
    let spec = |a: usize| -> Option<(usize, usize, usize, usize, bool)> {
        (a >= pad).then(|| {
            let r = a - pad;
            (grid[r], params.kernel[r], params.stride[r], params.dilation[r], params.causal[r])
        })
    };
    let options: Vec<Vec<usize>> = (0..3).map(|a| spec(a).map_or(vec![1], |_| tile_options())).collect();
    // Per-axis relation tables for a candidate tile size, memoized: (visited pairs, full pairs).
    let axis_for = |a: usize, t: usize| match spec(a) {
        Some((l, k, s, d, c)) => AxisTiling::new(l, k, s, d, c, t),
        None => AxisTiling::unit(),
    };
    let axis_counts = |ax: &AxisTiling| -> (usize, usize) {
        let rel = ax.relations();
        let visited = rel.iter().map(Vec::len).sum();
        let full = rel.iter().map(|r| r.iter().filter(|x| x.1).count()).sum();
        (visited, full)
    };
    let mut best: Option<((usize, std::cmp::Reverse<usize>), [AxisTiling; 3])> = None;
    for &t0 in &options[0] {
        for &t1 in &options[1] {
            for &t2 in &options[2] {
                if t0 * t1 * t2 != TILE {
                    continue;
                }
                let axes = [axis_for(0, t0), axis_for(1, t1), axis_for(2, t2)];
                let counts: Vec<(usize, usize)> = axes.iter().map(axis_counts).collect();
                let visited: usize = counts.iter().map(|c| c.0).product();
                let full: usize = counts.iter().map(|c| c.1).product();
                let key = (visited, std::cmp::Reverse(full));
                if best.as_ref().is_none_or(|(k, _)| key < *k) {
                    best = Some((key, axes));
                }
            }
        }
    }
    let (_, axes) = best.ok_or_else(|| format!("internal: no {TILE}-token box for the grid {grid:?}"))?;
    Ok(build(axes, grid.iter().product(), n_extra))
}

fn build(axes: [AxisTiling; 3], n: usize, n_extra: usize) -> GnaTiling {
    let tiles = [axes[0].tiles as usize, axes[1].tiles as usize, axes[2].tiles as usize];
    let q_tiles = tiles.iter().product::<usize>();
    let n_pad = q_tiles * TILE;
    let lens = [axes[0].len as usize, axes[1].len as usize, axes[2].len as usize];
    let mut tiling = GnaTiling {
        axes,
        n,
        n_pad,
        perm: vec![-1; n_pad],
        offsets: vec![0],
        full_ends: Vec::new(),
        columns_ends: Vec::new(),
        entries: Vec::new(),
        mask_of: Vec::new(),
        masks: Vec::new(),
        visited: 0,
        full: 0,
        extra_tiles: n_extra.div_ceil(TILE),
    };
    let mut table = MaskTable::new(axes);
    for p in 0..n_pad {
        let split = tiling.split(p);
        let coords: Option<Vec<usize>> = (0..3)
            .map(|a| axes[a].original(split[a].0 * axes[a].tile as usize + split[a].1))
            .collect();
        if let Some(c) = coords {
            tiling.perm[p] = ((c[0] * lens[1] + c[1]) * lens[2] + c[2]) as i32;
        }
    }
    // Per axis, per query tile coordinate: the KV tile coordinates with their relation.
    let related: Vec<Vec<Vec<(usize, bool)>>> = axes.iter().map(AxisTiling::relations).collect();
    let extra_tiles = n_extra.div_ceil(TILE);
    for q0 in 0..tiles[0] {
        for q1 in 0..tiles[1] {
            for q2 in 0..tiles[2] {
                let (r0, r1, r2) = (&related[0][q0], &related[1][q1], &related[2][q2]);
                let has_real_query = !(r0.is_empty() || r1.is_empty() || r2.is_empty());
                // the tile's KV tiles with their kind and pattern, listed FULL, then
                // PARTIAL_COLUMNS, then PARTIAL (each kind a loop of its own in the kernel)
                let mut grid_entries = Vec::new();
                for &(k0, f0) in r0 {
                    for &(k1, f1) in r1 {
                        for &(k2, f2) in r2 {
                            let kt = (k0 * tiles[1] + k1) * tiles[2] + k2;
                            let pattern = if f0 && f1 && f2 { -1 } else { table.pattern([q0, q1, q2], [k0, k1, k2]) };
                            let kind = match pattern {
                                -1 => KIND_FULL,
                                p if table.columns_only[p as usize] => KIND_PARTIAL_COLUMNS,
                                _ => KIND_PARTIAL,
                            };
                            grid_entries.push((kt as i32, kind, pattern));
                        }
                    }
                }
                for kind in [KIND_FULL, KIND_PARTIAL_COLUMNS, KIND_PARTIAL] {
                    for &(kt, _, pattern) in grid_entries.iter().filter(|e| e.1 == kind) {
                        tiling.entries.push((kt << 2) | kind);
                        tiling.mask_of.push(pattern);
                        tiling.visited += 1;
                        tiling.full += (kind == KIND_FULL) as usize;
                    }
                    match kind {
                        KIND_FULL => tiling.full_ends.push(tiling.entries.len() as i32),
                        KIND_PARTIAL_COLUMNS => tiling.columns_ends.push(tiling.entries.len() as i32),
                        _ => {}
                    }
                }
                if has_real_query {
                    for e in 0..extra_tiles {
                        tiling.entries.push(((e as i32) << 2) | KIND_EXTRA);
                        tiling.mask_of.push(-1);
                    }
                }
                tiling.offsets.push(tiling.entries.len() as i32);
            }
        }
    }
    tiling.masks = table.words;
    tiling
}
