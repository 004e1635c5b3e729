//! GNA's host tiling (src/attention/neighborhood/{tiles,masks}.rs), the part of the CUDA backend
//! that runs on any machine: the token permutation and, per query tile, the KV tiles and the
//! keep words the kernel masks PARTIAL tiles with reproduce, for every query, exactly the key set
//! of `neighborhood::neighbors` (the reference's mask); FULL tiles hold only neighbors; no key
//! tile is listed twice. The kernel itself: tests/cuda_neighborhood.rs (H200).

mod common;

use common::gna_shapes::{params, shapes};
use visgen::attention::neighborhood::masks;
use visgen::attention::neighborhood::tiles::{self, KIND_EXTRA, KIND_FULL, KIND_PARTIAL, KIND_PARTIAL_COLUMNS, TILE};
use visgen::attention::neighborhood::{neighbors, NeighborhoodParams};

#[test]
fn keep_bit_inverts_the_register_layout() {
    let mut used = std::collections::HashSet::new();
    for ctid in 0..256 {
        for e in 0..64 {
            let (row, col) = (masks::thread_row(ctid, e / 32), masks::element_column(ctid, e));
            let (word, bit) = masks::element_bit(e);
            assert!(word < masks::THREAD_WORDS && bit < 32 && bit % 8 < 7, "element {e}: word {word} bit {bit}");
            assert_eq!(masks::keep_bit(row, col), (ctid, word, bit));
            assert!(used.insert((row, col)), "({row}, {col}) held twice");
        }
    }
    assert_eq!(used.len(), 128 * 128, "the threads' elements do not cover the tile");
}

fn check_tiling(grid: &[usize], p: &NeighborhoodParams, n_extra: usize) {
    let t = tiles::plan(grid, p, n_extra).unwrap();
    let n: usize = grid.iter().product();
    assert_eq!(t.n_pad % TILE, 0);
    assert_eq!(t.mask_of.len(), t.entries.len());
    // The permutation is a bijection of the real tokens.
    let mut seen = vec![false; n];
    for &o in t.perm.iter().filter(|&&o| o >= 0) {
        assert!(!seen[o as usize], "token {o} twice in the permutation");
        seen[o as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "{grid:?}: a token is missing from the permutation");
    let extra_tiles = n_extra.div_ceil(TILE);
    for qt in 0..t.q_tiles() {
        let range = t.offsets[qt] as usize..t.offsets[qt + 1] as usize;
        // list order (the kernel runs entries[offsets..full_ends] in a loop without masking,
        // entries[full_ends..columns_ends] in one masking by column class): FULL, then
        // PARTIAL_COLUMNS, then PARTIAL, then extra-token tiles
        let (full_end, columns_end) = (t.full_ends[qt] as usize, t.columns_ends[qt] as usize);
        assert!(range.start <= full_end && full_end <= columns_end && columns_end <= range.end, "{grid:?}: list bounds");
        let kinds: Vec<i32> = range.clone().map(|i| t.entries[i] & 3).collect();
        let (full, rest) = kinds.split_at(full_end - range.start);
        let (columns, rest) = rest.split_at(columns_end - full_end);
        assert!(full.iter().all(|&k| k == KIND_FULL), "{grid:?}: a masked tile before full_end");
        assert!(columns.iter().all(|&k| k == KIND_PARTIAL_COLUMNS), "{grid:?}: another kind among the PARTIAL_COLUMNS tiles");
        assert!(rest.iter().all(|&k| k == KIND_PARTIAL || k == KIND_EXTRA), "{grid:?}: a FULL or PARTIAL_COLUMNS tile after columns_end");
        assert!(kinds.windows(2).all(|w| !(w[0] == KIND_EXTRA && w[1] != KIND_EXTRA)), "{grid:?}: a grid tile after an extra tile");
        let grid_entries: Vec<usize> = range.clone().filter(|&i| t.entries[i] & 3 != KIND_EXTRA).collect();
        let mut tiles_seen: Vec<i32> = grid_entries.iter().map(|&i| t.entries[i] >> 2).collect();
        tiles_seen.sort();
        tiles_seen.dedup();
        assert_eq!(tiles_seen.len(), grid_entries.len(), "{grid:?}: a KV tile listed twice");
        let real_rows: Vec<usize> = (0..TILE).filter(|&r| t.perm[qt * TILE + r] >= 0).collect();
        assert_eq!(range.len() - grid_entries.len(), if real_rows.is_empty() { 0 } else { extra_tiles });
        for &row in &real_rows {
            let pq = qt * TILE + row;
            let mut keys = Vec::new();
            for &i in &grid_entries {
                let kt = (t.entries[i] >> 2) as usize;
                for col in 0..TILE {
                    let pk = kt * TILE + col;
                    let real = t.perm[pk] >= 0;
                    if t.entries[i] & 3 == KIND_FULL {
                        assert!(real && t.mask_ok(pq, pk), "{grid:?} {p:?}: a FULL tile holds a non-neighbor");
                    }
                    // the kernel masks these by the bit of the column's class (n % 2, c): the
                    // column modulo 16 (columns 8 n + 2 (lane % 4) + c)
                    if t.entries[i] & 3 == KIND_PARTIAL_COLUMNS {
                        assert_eq!(t.kernel_keeps(i, row, col), t.kernel_keeps(i, row, col % 16), "{grid:?}: column class");
                    }
                    if t.kernel_keeps(i, row, col).unwrap() {
                        assert!(real, "{grid:?}: a padding key is kept");
                        keys.push(t.perm[pk] as usize);
                    }
                }
            }
            keys.sort();
            let want = neighbors(t.perm[pq] as usize, grid, p);
            assert_eq!(keys, want, "{grid:?} {p:?}: query {}", t.perm[pq]);
        }
    }
}

#[test]
fn tiling_matches_reference_masks() {
    let (mut unmasked, mut by_columns) = (0, 0);
    for (grid, p, extra) in shapes() {
        check_tiling(&grid, &p, extra);
        let t = tiles::plan(&grid, &p, extra).unwrap();
        unmasked += (t.full == t.visited && extra % TILE == 0) as usize;
        by_columns += t.entries.iter().any(|&e| e & 3 == KIND_PARTIAL_COLUMNS) as usize;
    }
    // the GPU tests walk these shapes: some must run the kernel without masking code, some the
    // masking by column class
    assert!(unmasked > 0, "no shape has a list without a tile to mask");
    assert!(by_columns > 0, "no shape has a tile masked by column class");
    println!("{unmasked} shapes need no masking, {by_columns} have tiles masked by column class");
}

#[test]
fn tiling_of_benchmark_shapes_is_sparse() {
    // FLUX-4K strided: the box choice must make the lists sparse (goal 0.9 / fraction).
    let p = params(&[80, 80], &[16, 16], &[1, 1], &[false, false]);
    let t = tiles::plan(&[256, 256], &p, 0).unwrap();
    let f = t.visited_fraction();
    println!("256x256 k80 s16: box {:?}, visited {} ({f:.3}), full {}", t.axes.map(|a| a.tile), t.visited, t.full);
    assert!(f < 0.2, "visited fraction {f}");
    assert!(t.full * 2 > t.visited, "most tiles should need no mask: {} of {}", t.full, t.visited);
    // Stride 1: half the tiles are PARTIAL, but they share few keep-word patterns.
    let p = params(&[80, 80], &[1, 1], &[1, 1], &[false, false]);
    let t = tiles::plan(&[256, 256], &p, 0).unwrap();
    let partial = t.visited - t.full;
    println!("256x256 k80 s1: box {:?}, visited {} ({:.3}), partial {partial}, patterns {}", t.axes.map(|a| a.tile), t.visited, t.visited_fraction(), t.patterns());
    assert!(t.patterns() * 4 < partial, "keep-word patterns barely shared: {} for {partial} partial tiles", t.patterns());
    // Most of them are cut by a window edge along x only (box 8 x 16): masked per column class.
    let columns = t.entries.iter().filter(|&&e| e & 3 == KIND_PARTIAL_COLUMNS).count();
    println!("256x256 k80 s1: {columns} of {partial} partial tiles by column class");
    assert!(columns * 2 > partial, "{columns} of {partial} partial tiles by column class");
    // The 3-D video shape (all full) and a stride-1 3-D one: printed for the notes.
    for (grid, p) in [
        (vec![30, 48, 80], params(&[18, 24, 24], &[16, 8, 8], &[1, 1, 1], &[false, false, false])),
        (vec![30, 48, 80], params(&[9, 15, 15], &[1, 1, 1], &[1, 1, 1], &[false, false, false])),
    ] {
        let t = tiles::plan(&grid, &p, 0).unwrap();
        println!(
            "{grid:?} k {:?} s {:?}: box {:?}, visited {} ({:.3}), full {}, patterns {} ({:.1} MB)",
            p.kernel,
            p.stride,
            t.axes.map(|a| a.tile),
            t.visited,
            t.visited_fraction(),
            t.full,
            t.patterns(),
            (t.masks.len() * 4) as f64 / 1e6
        );
    }
}
