//! The GNA problems every neighborhood test walks (host tiling in tests/gna_tiling.rs, the
//! kernel in tests/cuda_neighborhood.rs).

use visgen::attention::neighborhood::NeighborhoodParams;

pub fn params(kernel: &[usize], stride: &[usize], dilation: &[usize], causal: &[bool]) -> NeighborhoodParams {
    NeighborhoodParams { kernel: kernel.to_vec(), stride: stride.to_vec(), dilation: dilation.to_vec(), causal: causal.to_vec(), scale: None }
}

/// (grid, params, extra tokens): borders, dilation, causal axes, stride, ragged grids.
pub fn shapes() -> Vec<(Vec<usize>, NeighborhoodParams, usize)> {
    vec![
        (vec![300], params(&[33], &[1], &[1], &[false]), 0),
        (vec![1000], params(&[127], &[16], &[1], &[false]), 0),
        (vec![517], params(&[64], &[5], &[3], &[true]), 0),
        (vec![200], params(&[200], &[1], &[1], &[false]), 45),
        (vec![30, 45], params(&[7, 9], &[1, 1], &[1, 1], &[false, false]), 0),
        (vec![64, 64], params(&[16, 16], &[8, 8], &[1, 1], &[false, false]), 0),
        (vec![40, 33], params(&[9, 5], &[1, 2], &[2, 3], &[false, false]), 0),
        (vec![48, 50], params(&[13, 7], &[4, 1], &[1, 1], &[true, false]), 0),
        (vec![32, 32], params(&[32, 32], &[1, 1], &[1, 1], &[false, false]), 0),
        (vec![24, 40], params(&[7, 7], &[1, 1], &[1, 1], &[false, false]), 77),
        (vec![33, 17], params(&[10, 6], &[10, 3], &[1, 2], &[false, true]), 130),
        (vec![8, 12, 16], params(&[3, 5, 7], &[1, 1, 1], &[1, 1, 1], &[false, false, false]), 0),
        (vec![6, 16, 20], params(&[4, 8, 8], &[2, 4, 4], &[1, 1, 1], &[true, false, false]), 0),
        (vec![9, 10, 11], params(&[3, 3, 3], &[1, 2, 3], &[2, 2, 3], &[false, true, false]), 20),
        (vec![5, 7, 9], params(&[5, 7, 9], &[5, 7, 9], &[1, 1, 1], &[false, false, false]), 0),
        // boxes with innermost sides not covered above: (1, 4, 32), (1, 2, 64), (8, 2, 8) with a
        // causal axis, (2, 4, 16)
        (vec![4, 200], params(&[3, 65], &[1, 1], &[1, 1], &[false, false]), 0),
        (vec![6, 300], params(&[3, 97], &[1, 2], &[1, 1], &[false, false]), 50),
        (vec![8, 12, 24], params(&[3, 5, 9], &[1, 1, 2], &[1, 1, 1], &[false, false, true]), 0),
        (vec![6, 16, 16], params(&[4, 7, 7], &[1, 1, 1], &[1, 1, 1], &[false, false, false]), 0),
        // blocked windows (stride = kernel = a multiple of the box) and whole extra tiles: no tile
        // to mask, the kernel without masking code
        (vec![64, 64], params(&[16, 16], &[16, 16], &[1, 1], &[false, false]), 128),
    ]
}
