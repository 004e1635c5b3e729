//! The window test of PARTIAL tiles, precomputed on the host as bit masks in the exact register
//! layout of the kernel's score fragment, so the kernel spends one 8-byte load per thread and
//! per PARTIAL tile instead of ~160 instructions of window arithmetic (profile of the stride-1
//! FLUX-4K case, kernels/NOTES.md `## neighborhood` v3 and v4).
//!
//! Register layout (wgmma m64 accumulators of two consumer warpgroups, 128 query rows x 128
//! keys): consumer thread `ctid` (0..256) holds rows `r(ctid, half) = (ctid / 128) 64 +
//! (ctid % 128 / 32) 16 + (ctid % 32) / 4 + 8 half` for half 0, 1, and of each row the columns
//! `8 n + lp + c` (n < 16, c < 2, lp = (ctid % 4) 2): its 64 elements `e = 32 half + 2 n + c`.
//! Its four keep words hold element e's bit (set when that key is in that row's window) at bit
//! `e % 7` of byte `e / 7` (bytes little-endian over the words; the top bit of each byte and the
//! last 6 bytes unused): ptxas then moves 7 bits at a time into predicates (one R2P per byte) and
//! masks with one FSEL per element, about 80 instructions per tile against 110 for 32 bits per
//! word. A pattern is the 1024 words of one tile pair, ordered `[ctid][word]`, so a thread reads
//! its words as one `uint4`.
//!
//! Dedup: the neighbor relation of a (query tile, KV tile) pair is a product over axes, and
//! along one axis it depends only on the two tile coordinates there; pairs of tile coordinates
//! with the same per-axis relation share a class. A pattern is a triple of classes, so tiles
//! far from the borders share their patterns (stride 1: one per relative offset), and the
//! table stays small (FLUX-4K stride 1: see `tiling_of_benchmark_shapes_is_sparse`).

use std::collections::HashMap;

use super::tiles::{AxisTiling, TILE};

/// u32 words per consumer thread and pattern.
pub const THREAD_WORDS: usize = 4;
/// u32 words per pattern: 256 consumer threads x [`THREAD_WORDS`].
pub const PATTERN_WORDS: usize = 256 * THREAD_WORDS;

/// One axis's relation between a query tile coordinate and a KV tile coordinate: per query box
/// offset (0..tile), the set of KV box offsets in its window (bit j of a u128; tile <= 128).
/// Query offsets past the group's end (padding) see nothing.
fn axis_relation(ax: &AxisTiling, q_tile: usize, kv_tile: usize) -> Vec<u128> {
    let (tpg, t) = (ax.tiles_per_group as usize, ax.tile as usize);
    let group = q_tile / tpg;
    let group_len = ax.group_len(group);
    let (q0, k0) = ((q_tile % tpg) * t, (kv_tile % tpg) * t);
    (0..t)
        .map(|c| {
            let i = q0 + c;
            if i >= group_len {
                return 0;
            }
            let (ws, we) = ax.window(i, group);
            (0..t).filter(|&j| (ws..we).contains(&(k0 + j))).fold(0u128, |m, j| m | 1u128 << j)
        })
        .collect()
}

/// Interned per-axis relations: class id per (query tile coordinate, KV tile coordinate).
struct AxisClasses {
    ids: HashMap<(usize, usize), u32>,
    relations: Vec<Vec<u128>>,
    by_relation: HashMap<Vec<u128>, u32>,
}

impl AxisClasses {
    fn new() -> Self {
        Self { ids: HashMap::new(), relations: Vec::new(), by_relation: HashMap::new() }
    }

    fn class(&mut self, ax: &AxisTiling, q_tile: usize, kv_tile: usize) -> u32 {
        if let Some(&id) = self.ids.get(&(q_tile, kv_tile)) {
            return id;
        }
        let relation = axis_relation(ax, q_tile, kv_tile);
        let next = self.relations.len() as u32;
        let id = *self.by_relation.entry(relation.clone()).or_insert(next);
        if id == next {
            self.relations.push(relation);
        }
        self.ids.insert((q_tile, kv_tile), id);
        id
    }
}

/// Box offsets (per axis) of row / column `r` of a tile: rows are row-major in the box.
fn box_offsets(axes: &[AxisTiling; 3], r: usize) -> [usize; 3] {
    let (l2, l1) = (axes[2].log_tile as usize, axes[1].log_tile as usize);
    [r >> (l2 + l1), (r >> l2) & (axes[1].tile as usize - 1), r & (axes[2].tile as usize - 1)]
}

/// The query row of consumer thread `ctid`, half `half` (see the module header).
pub fn thread_row(ctid: usize, half: usize) -> usize {
    (ctid / 128) * 64 + (ctid % 128 / 32) * 16 + (ctid % 32) / 4 + 8 * half
}

/// The key column of element `e` (0..64) of thread `ctid` (see the module header).
pub fn element_column(ctid: usize, e: usize) -> usize {
    8 * (e % 32 / 2) + (ctid % 4) * 2 + e % 2
}

/// Where element `e`'s keep bit lives in its thread's words: (word, bit).
pub fn element_bit(e: usize) -> (usize, usize) {
    let byte = e / 7;
    (byte / 4, byte % 4 * 8 + e % 7)
}

/// Where the keep bit of (row, column) lives: (consumer thread, word, bit); the inverse of
/// [`thread_row`], [`element_column`] and [`element_bit`].
pub fn keep_bit(row: usize, col: usize) -> (usize, usize, usize) {
    let ctid = (row / 64) * 128 + (row % 64 / 16) * 32 + (row % 8) * 4 + (col % 8) / 2;
    let e = 32 * ((row % 16) / 8) + 2 * (col / 8) + col % 2;
    let (word, bit) = element_bit(e);
    (ctid, word, bit)
}

/// The keep-word patterns of the PARTIAL tiles of one tiling.
pub struct MaskTable {
    axes: [AxisTiling; 3],
    classes: [AxisClasses; 3],
    patterns: HashMap<[u32; 3], i32>,
    box_offsets: Vec<[usize; 3]>,
    /// `PATTERN_WORDS` per pattern
    pub words: Vec<u32>,
    /// per pattern: every thread's keep bit of element (half, n, c) equals that of
    /// (half, n % 2, c), i.e. a row's mask depends only on the key column's class, as for a
    /// window edge cutting the tile along its innermost axis only (box width 16)
    pub columns_only: Vec<bool>,
}

impl MaskTable {
    pub fn new(axes: [AxisTiling; 3]) -> Self {
        let box_offsets = (0..TILE).map(|r| box_offsets(&axes, r)).collect();
        Self {
            axes,
            classes: [AxisClasses::new(), AxisClasses::new(), AxisClasses::new()],
            patterns: HashMap::new(),
            box_offsets,
            words: Vec::new(),
            columns_only: Vec::new(),
        }
    }

    /// Pattern index of the pair (query tile, KV tile) given by their per-axis tile coordinates,
    /// added to the table on first use.
    pub fn pattern(&mut self, q: [usize; 3], kv: [usize; 3]) -> i32 {
        let key: [u32; 3] = std::array::from_fn(|a| self.classes[a].class(&self.axes[a], q[a], kv[a]));
        if let Some(&id) = self.patterns.get(&key) {
            return id;
        }
        let id = (self.words.len() / PATTERN_WORDS) as i32;
        let rel: [&Vec<u128>; 3] = std::array::from_fn(|a| &self.classes[a].relations[key[a] as usize]);
        let offsets = &self.box_offsets;
        let attends = |row: usize, col: usize| {
            let (rq, rk) = (offsets[row], offsets[col]);
            (0..3).all(|a| (rel[a][rq[a]] >> rk[a]) & 1 == 1)
        };
        let mut columns_only = true;
        for ctid in 0..256 {
            let mut words = [0u32; THREAD_WORDS];
            let keeps = |e: usize| attends(thread_row(ctid, e / 32), element_column(ctid, e));
            for e in (0..64).filter(|&e| keeps(e)) {
                let (word, bit) = element_bit(e);
                words[word] |= 1 << bit;
            }
            // element e = 32 half + 2 n + c against its class (half, n % 2, c): e % 32 < 4
            columns_only &= (0..64).all(|e| keeps(e) == keeps(e - e % 32 + e % 4));
            self.words.extend(words);
        }
        self.columns_only.push(columns_only);
        self.patterns.insert(key, id);
        id
    }

    pub fn len(&self) -> usize {
        self.words.len() / PATTERN_WORDS
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}
