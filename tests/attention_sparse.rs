//! Sparse attention references (GNA, PSA) against the NATTEN test vectors, hand-made cases and
//! naive f64 loops written independently here.

use candle_core::{DType, Device, Tensor};
use visgen::attention::neighborhood::{self, neighbors, visited_kv_tiles, window_1d, NeighborhoodParams};
use visgen::attention::pyramid::{
    self, assign_levels, importance_with_samples, pool_mean, reference_with_levels, sample_positions, LevelMask, LevelMode,
    PyramidParams,
};
use visgen::attention::{merge_partials, AttentionInput, Backend, LayerShape, Role};

// ---------------------------------------------------------------------------------------------
// Helpers

/// Deterministic values in [-2, 2) (SplitMix64), independent of any crate's RNG.
fn random_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
        })
        .collect()
}

fn random_tensor(dims: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    Tensor::from_vec(random_values(n, seed), dims, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// One head's rows: `data` is `(B, H, N, D)` flattened; returns token `t` of head `(b, h)`.
fn token(data: &[f32], heads: usize, n: usize, d: usize, b: usize, h: usize, t: usize) -> &[f32] {
    let start = ((b * heads + h) * n + t) * d;
    &data[start..start + d]
}

/// Naive f64 softmax attention of one query over explicit keys with per-key logit bias.
/// Returns `(out, lse)`.
fn naive_attend(query: &[f32], keys: &[Vec<f64>], values: &[Vec<f64>], bias: &[f64], scale: f64) -> (Vec<f64>, f64) {
    let logits: Vec<f64> = keys
        .iter()
        .zip(bias)
        .map(|(k, b)| query.iter().zip(k).map(|(&x, &y)| x as f64 * y).sum::<f64>() * scale + b)
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let d = values[0].len();
    let mut out = vec![0.0; d];
    for (w, v) in weights.iter().zip(values) {
        for c in 0..d {
            out[c] += w * v[c] / total;
        }
    }
    (out, max + total.ln())
}

fn as_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what}: element {i}: got {g}, want {w}");
    }
}

fn layer(role: Role, grid: Option<Vec<usize>>, key_mask: bool) -> LayerShape {
    LayerShape { role, head_dim: 16, grid, key_mask, dtype: DType::F32, device: Device::Cpu }
}

fn gna(kernel: &[usize], stride: &[usize], dilation: &[usize], causal: &[bool]) -> NeighborhoodParams {
    NeighborhoodParams {
        kernel: kernel.to_vec(),
        stride: stride.to_vec(),
        dilation: dilation.to_vec(),
        causal: causal.to_vec(),
        scale: None,
    }
}

// ---------------------------------------------------------------------------------------------
// GNA: windows

#[test]
fn gna_window_matches_natten_test_vectors() {
    // Printed by shared/specs/ref/gna_mask_ref.py (window start per query, L = 10).
    let starts = |k, s| (0..10).map(|i| window_1d(i, 10, k, s, 1, false)[0]).collect::<Vec<_>>();
    assert_eq!(starts(5, 1), vec![0, 0, 0, 1, 2, 3, 4, 5, 5, 5]);
    assert_eq!(starts(4, 1), vec![0, 0, 0, 1, 2, 3, 4, 5, 6, 6]);
    assert_eq!(starts(5, 2), vec![0, 0, 1, 1, 3, 3, 5, 5, 5, 5]);
    for i in 0..10 {
        assert_eq!(window_1d(i, 10, 5, 1, 1, false).len(), 5);
        assert_eq!(window_1d(i, 10, 4, 1, 1, false).len(), 4);
    }

    let causal: Vec<Vec<usize>> = (0..10).map(|i| window_1d(i, 10, 4, 1, 1, true)).collect();
    let want_causal: Vec<Vec<usize>> = vec![
        vec![0],
        vec![0, 1],
        vec![0, 1, 2],
        vec![0, 1, 2, 3],
        vec![1, 2, 3, 4],
        vec![2, 3, 4, 5],
        vec![3, 4, 5, 6],
        vec![4, 5, 6, 7],
        vec![5, 6, 7, 8],
        vec![6, 7, 8, 9],
    ];
    assert_eq!(causal, want_causal);

    let dilated: Vec<Vec<usize>> = (0..10).map(|i| window_1d(i, 10, 3, 1, 2, false)).collect();
    let want_dilated: Vec<Vec<usize>> = vec![
        vec![0, 2, 4],
        vec![1, 3, 5],
        vec![0, 2, 4],
        vec![1, 3, 5],
        vec![2, 4, 6],
        vec![3, 5, 7],
        vec![4, 6, 8],
        vec![5, 7, 9],
        vec![4, 6, 8],
        vec![5, 7, 9],
    ];
    assert_eq!(dilated, want_dilated);
}

#[test]
fn gna_causal_stride_and_ragged_dilation_groups() {
    // Causal, stride 3, L = 10: leader = last of the stride group (clamped to 9), start =
    // leader - k + 1, end = the query itself. Worked by hand from the NATTEN formula.
    let w = |i| window_1d(i, 10, 4, 3, 1, true);
    assert_eq!(w(0), vec![0]); // leader 2, start 0
    assert_eq!(w(2), vec![0, 1, 2]);
    assert_eq!(w(3), vec![2, 3]); // leader 5, start 2
    assert_eq!(w(5), vec![2, 3, 4, 5]);
    assert_eq!(w(9), vec![6, 7, 8, 9]); // leader min(11, 9) = 9, start 6
    // L = 11, d = 3: groups of 4, 4, 3 tokens; query 10 is in group 1 at intra-group index 3.
    assert_eq!(window_1d(10, 11, 3, 1, 3, false), vec![4, 7, 10]);
    assert_eq!(window_1d(8, 11, 3, 1, 3, false), vec![2, 5, 8]); // group 2 has 3 tokens
}

#[test]
fn gna_every_noncausal_query_sees_prod_kernel_keys() {
    let cases: Vec<(Vec<usize>, NeighborhoodParams)> = vec![
        (vec![12, 10], gna(&[5, 4], &[1, 1], &[1, 1], &[false, false])),
        (vec![11, 9], gna(&[4, 3], &[3, 2], &[2, 3], &[false, false])),
        (vec![5, 6, 7], gna(&[3, 4, 5], &[1, 2, 3], &[1, 1, 1], &[false, false, false])),
        (vec![6, 7, 9], gna(&[3, 3, 4], &[2, 1, 4], &[2, 2, 2], &[false, false, false])),
    ];
    for (grid, params) in cases {
        params.validate(&grid).unwrap();
        let n: usize = grid.iter().product();
        let want: usize = params.kernel.iter().product();
        for q in 0..n {
            let keys = neighbors(q, &grid, &params);
            assert_eq!(keys.len(), want, "grid {grid:?} query {q}");
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "keys ascending and distinct");
            assert!(keys.iter().all(|&k| k < n));
        }
    }
}

#[test]
fn gna_stride_groups_share_their_window() {
    // 1-D, as gna_mask_ref.py property 3.
    for i in 0..37 {
        assert_eq!(window_1d(i, 37, 9, 3, 1, false), window_1d((i / 3) * 3, 37, 9, 3, 1, false), "query {i}");
    }
    // 2-D: every query shares the window of the first query of its stride group.
    let grid = [9, 10];
    let params = gna(&[4, 5], &[2, 3], &[1, 1], &[false, false]);
    for q in 0..90 {
        let (r, c) = (q / 10, q % 10);
        let first = (r / 2) * 2 * 10 + (c / 3) * 3;
        assert_eq!(neighbors(q, &grid, &params), neighbors(first, &grid, &params), "query {q}");
    }
    // Causal: the stride group shares its window start; each query still stops at itself.
    for i in 0..20 {
        let own = window_1d(i, 20, 5, 4, 1, true);
        let first = window_1d((i / 4) * 4, 20, 5, 4, 1, true);
        assert_eq!(own[0], first[0], "query {i}");
        assert_eq!(*own.last().unwrap(), i);
    }
}

// ---------------------------------------------------------------------------------------------
// GNA: attention

/// Naive f64 GNA over `neighbors()` (plus extra tokens), for every (b, h, query).
fn naive_gna(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grid: &[usize],
    params: &NeighborhoodParams,
    extra: Option<(&Tensor, &Tensor)>,
) -> (Vec<f64>, Vec<f64>) {
    let (b, h, n, d) = q.dims4().unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let (qd, kd, vd) = (values(q), values(k), values(v));
    let extra_data = extra.map(|(ek, ev)| (ek.dim(2).unwrap(), values(ek), values(ev)));
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for hi in 0..h {
            for t in 0..n {
                let mut keys = Vec::new();
                let mut vals = Vec::new();
                for j in neighbors(t, grid, params) {
                    keys.push(as_f64(token(&kd, h, n, d, bi, hi, j)));
                    vals.push(as_f64(token(&vd, h, n, d, bi, hi, j)));
                }
                if let Some((ne, ek, ev)) = &extra_data {
                    for j in 0..*ne {
                        keys.push(as_f64(token(ek, h, *ne, d, bi, hi, j)));
                        vals.push(as_f64(token(ev, h, *ne, d, bi, hi, j)));
                    }
                }
                let bias = vec![0.0; keys.len()];
                let (o, l) = naive_attend(token(&qd, h, n, d, bi, hi, t), &keys, &vals, &bias, scale);
                out.extend(o);
                lse.push(l);
            }
        }
    }
    (out, lse)
}

fn gna_inputs(grid: &[usize], seed: u64) -> (Tensor, Tensor, Tensor) {
    let n: usize = grid.iter().product();
    let dims = (2, 2, n, 8);
    (random_tensor(dims, seed), random_tensor(dims, seed + 1), random_tensor(dims, seed + 2))
}

#[test]
fn gna_reference_matches_naive_loop_1d_2d_3d() {
    let cases: Vec<(Vec<usize>, NeighborhoodParams)> = vec![
        (vec![13], gna(&[4], &[3], &[2], &[false])),
        (vec![13], gna(&[5], &[2], &[1], &[true])),
        (vec![7, 9], gna(&[3, 4], &[2, 3], &[2, 2], &[true, false])),
        (vec![4, 5, 6], gna(&[2, 3, 3], &[2, 1, 3], &[1, 1, 2], &[false, true, false])),
    ];
    for (index, (grid, params)) in cases.iter().enumerate() {
        let (q, k, v) = gna_inputs(grid, 10 * index as u64);
        let scale = 1.0 / 8f64.sqrt();
        let (out, lse) = neighborhood::reference(&q, &k, &v, grid, params, None, scale).unwrap();
        assert_eq!(out.dims(), q.dims());
        assert_eq!(lse.dims(), &q.dims()[..3]);
        let (want_out, want_lse) = naive_gna(&q, &k, &v, grid, params, None);
        assert_close(&values(&out), &want_out, 2e-5, &format!("case {index} out"));
        assert_close(&values(&lse), &want_lse, 2e-5, &format!("case {index} lse"));
    }
}

#[test]
fn gna_stride_equal_kernel_is_blocked_attention() {
    // 2-D grid 8x6, windows 4x3 with stride 4x3: four independent blocks of 12 tokens.
    let grid = [8, 6];
    let params = gna(&[4, 3], &[4, 3], &[1, 1], &[false, false]);
    let (q, k, v) = gna_inputs(&grid, 7);
    let (out, _) = neighborhood::reference(&q, &k, &v, &grid, &params, None, 1.0 / 8f64.sqrt()).unwrap();

    let (qd, kd, vd) = (values(&q), values(&k), values(&v));
    let (heads, n, d) = (2, 48, 8);
    let mut want = vec![0.0; values(&out).len()];
    for b in 0..2 {
        for h in 0..heads {
            for block_r in 0..2 {
                for block_c in 0..2 {
                    let members: Vec<usize> = (0..4)
                        .flat_map(|r| (0..3).map(move |c| (block_r * 4 + r) * 6 + block_c * 3 + c))
                        .collect();
                    let keys: Vec<Vec<f64>> = members.iter().map(|&t| as_f64(token(&kd, heads, n, d, b, h, t))).collect();
                    let vals: Vec<Vec<f64>> = members.iter().map(|&t| as_f64(token(&vd, heads, n, d, b, h, t))).collect();
                    for &t in &members {
                        let (o, _) = naive_attend(token(&qd, heads, n, d, b, h, t), &keys, &vals, &[0.0; 12], 1.0 / 8f64.sqrt());
                        let start = ((b * heads + h) * n + t) * d;
                        want[start..start + d].copy_from_slice(&o);
                    }
                }
            }
        }
    }
    assert_close(&values(&out), &want, 2e-5, "blocked");
}

#[test]
fn gna_kernel_equal_grid_is_dense_attention() {
    let grid = [5, 6];
    let params = gna(&[5, 6], &[2, 3], &[1, 1], &[false, false]);
    let (q, k, v) = gna_inputs(&grid, 21);
    let (out, lse) = neighborhood::reference(&q, &k, &v, &grid, &params, None, 1.0 / 8f64.sqrt()).unwrap();
    let dense = gna(&[5, 6], &[1, 1], &[1, 1], &[false, false]);
    for t in 0..30 {
        assert_eq!(neighbors(t, &grid, &params), (0..30).collect::<Vec<_>>());
    }
    // Dense attention over all 30 tokens, computed without neighbors().
    let (qd, kd, vd) = (values(&q), values(&k), values(&v));
    let (mut want_out, mut want_lse) = (Vec::new(), Vec::new());
    for b in 0..2 {
        for h in 0..2 {
            let keys: Vec<Vec<f64>> = (0..30).map(|t| as_f64(token(&kd, 2, 30, 8, b, h, t))).collect();
            let vals: Vec<Vec<f64>> = (0..30).map(|t| as_f64(token(&vd, 2, 30, 8, b, h, t))).collect();
            for t in 0..30 {
                let (o, l) = naive_attend(token(&qd, 2, 30, 8, b, h, t), &keys, &vals, &[0.0; 30], 1.0 / 8f64.sqrt());
                want_out.extend(o);
                want_lse.push(l);
            }
        }
    }
    assert_close(&values(&out), &want_out, 2e-5, "dense out");
    assert_close(&values(&lse), &want_lse, 2e-5, "dense lse");
    let (out_plain, _) = neighborhood::reference(&q, &k, &v, &grid, &dense, None, 1.0 / 8f64.sqrt()).unwrap();
    assert_close(&values(&out_plain), &want_out, 2e-5, "dense out, stride 1");
}

#[test]
fn gna_extra_tokens_are_always_visible_keys() {
    let grid = [6, 5];
    let params = gna(&[3, 2], &[1, 2], &[2, 1], &[true, false]);
    let (q, k, v) = gna_inputs(&grid, 31);
    let extra_k = random_tensor((2, 2, 4, 8), 41);
    let extra_v = random_tensor((2, 2, 4, 8), 42);
    let scale = 1.0 / 8f64.sqrt();
    let (out, lse) = neighborhood::reference(&q, &k, &v, &grid, &params, Some((&extra_k, &extra_v)), scale).unwrap();
    let (want_out, want_lse) = naive_gna(&q, &k, &v, &grid, &params, Some((&extra_k, &extra_v)));
    assert_close(&values(&out), &want_out, 2e-5, "extra out");
    assert_close(&values(&lse), &want_lse, 2e-5, "extra lse");

    // The same through the lse: neighborhood alone merged with dense attention over the extras
    // (computed naively here) equals the joint call.
    let (o0, l0) = neighborhood::reference(&q, &k, &v, &grid, &params, None, scale).unwrap();
    let (qd, ekd, evd) = (values(&q), values(&extra_k), values(&extra_v));
    let (mut o1, mut l1) = (Vec::new(), Vec::new());
    for b in 0..2 {
        for h in 0..2 {
            let keys: Vec<Vec<f64>> = (0..4).map(|t| as_f64(token(&ekd, 2, 4, 8, b, h, t))).collect();
            let vals: Vec<Vec<f64>> = (0..4).map(|t| as_f64(token(&evd, 2, 4, 8, b, h, t))).collect();
            for t in 0..30 {
                let (o, l) = naive_attend(token(&qd, 2, 30, 8, b, h, t), &keys, &vals, &[0.0; 4], scale);
                o1.extend(o.iter().map(|&x| x as f32));
                l1.push(l as f32);
            }
        }
    }
    let o1 = Tensor::from_vec(o1, (2, 2, 30, 8), &Device::Cpu).unwrap();
    let l1 = Tensor::from_vec(l1, (2, 2, 30), &Device::Cpu).unwrap();
    let (merged, merged_lse) = merge_partials(&o0, &l0, &o1, &l1).unwrap();
    assert_close(&values(&merged), &want_out, 2e-5, "merged out");
    assert_close(&values(&merged_lse), &want_lse, 2e-5, "merged lse");
}

#[test]
fn gna_forward_keeps_dtype_and_needs_a_grid() {
    let grid = [4, 6];
    let params = gna(&[3, 3], &[1, 2], &[1, 1], &[false, false]);
    let (q, k, v) = gna_inputs(&grid, 51);
    let (q16, k16, v16) = (q.to_dtype(DType::F16).unwrap(), k.to_dtype(DType::F16).unwrap(), v.to_dtype(DType::F16).unwrap());
    let input = AttentionInput::new(&q16, &k16, &v16).grid(Some(&grid[..]));
    let (out, lse) = neighborhood::forward(&params, &input).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    assert_eq!(lse.dtype(), DType::F32);
    let (want, _) = naive_gna(&q16, &k16, &v16, &grid, &params, None);
    assert_close(&values(&out), &want, 2e-3, "f16 forward");

    let backend = Backend::Neighborhood(params.clone());
    let via_attend = visgen::attention::attend(&backend, &input).unwrap();
    assert_eq!(values(&via_attend), values(&out));

    assert!(neighborhood::forward(&params, &AttentionInput::new(&q, &k, &v)).is_err(), "no grid");
    let mask = Tensor::ones((2, 24), DType::F32, &Device::Cpu).unwrap();
    assert!(neighborhood::forward(&params, &AttentionInput::new(&q, &k, &v).grid(Some(&grid[..])).key_mask(Some(&mask))).is_err());
    // Wrong token count for the grid.
    assert!(neighborhood::forward(&params, &AttentionInput::new(&q, &k, &v).grid(Some(&[5usize, 6][..]))).is_err());
}

#[test]
fn gna_validate_and_check_reasons() {
    let grid = [8, 8];
    let err = |p: NeighborhoodParams| p.validate(&grid).unwrap_err();
    assert!(err(gna(&[1, 3], &[1, 1], &[1, 1], &[false, false])).contains("at least 2"));
    assert!(err(gna(&[3, 3], &[4, 1], &[1, 1], &[false, false])).contains("Stride cannot be larger".to_lowercase().as_str()));
    assert!(err(gna(&[3, 3], &[0, 1], &[1, 1], &[false, false])).contains("stride must be positive"));
    assert!(err(gna(&[3, 3], &[1, 1], &[1, 0], &[false, false])).contains("dilation must be positive"));
    assert!(err(gna(&[3, 3], &[1, 1], &[3, 1], &[false, false])).contains("kernel size and dilation"));
    assert!(err(gna(&[9, 3], &[1, 1], &[1, 1], &[false, false])).contains("kernel size and dilation"));
    assert!(err(gna(&[3, 3], &[1], &[1, 1], &[false, false])).contains("stride has 1 entries"));
    assert!(err(gna(&[3], &[1], &[1], &[false])).contains("rank"));
    assert!(err(gna(&[2, 2, 2, 2], &[1; 4], &[1; 4], &[false; 4])).contains("1-D, 2-D or 3-D"));
    gna(&[8, 2], &[8, 2], &[1, 4], &[true, false]).validate(&grid).unwrap();

    let p = gna(&[3, 3], &[1, 1], &[1, 1], &[false, false]);
    assert!(p.check(&layer(Role::SelfAttention, Some(vec![8, 8]), false)).is_ok());
    assert!(p.check(&layer(Role::Joint, Some(vec![8, 8]), false)).is_ok());
    assert!(p.check(&layer(Role::Cross, Some(vec![8, 8]), false)).unwrap_err().contains("cross"));
    assert!(p.check(&layer(Role::SelfAttention, None, false)).unwrap_err().contains("grid"));
    assert!(p.check(&layer(Role::SelfAttention, Some(vec![64]), false)).unwrap_err().contains("rank"));
    assert!(p.check(&layer(Role::SelfAttention, Some(vec![8, 8]), true)).unwrap_err().contains("mask"));
    assert!(p.check(&layer(Role::SelfAttention, Some(vec![8, 2]), false)).is_err());
}

#[test]
fn gna_visited_kv_tiles() {
    // Kernel == grid: every Q tile visits every KV tile, as dense attention does.
    let full = gna(&[16, 12], &[1, 1], &[1, 1], &[false, false]);
    let (visited, dense) = visited_kv_tiles(&[16, 12], &full, &[4, 4], &[8, 4]);
    assert_eq!(dense, (4 * 3) * (2 * 3));
    assert_eq!(visited, dense);
    // 1-D L=16, k=3, tiles of 4: Q tile t visits floor(4t-1) .. ceil(4t+5) -> 2, 3, 3, 2 tiles.
    let (visited, dense) = visited_kv_tiles(&[16], &gna(&[3], &[1], &[1], &[false]), &[4], &[4]);
    assert_eq!((visited, dense), (10, 16));
    // Blocked, tile-aligned: each Q tile visits exactly its own block.
    let (visited, dense) = visited_kv_tiles(&[16, 16], &gna(&[8, 8], &[8, 8], &[1, 1], &[false, false]), &[8, 8], &[8, 8]);
    assert_eq!((visited, dense), (4, 16));
    // Causal 1-D, k=4, tiles of 4 over 16: tile t visits tiles t-1 and t (t >= 1): 1+2+2+2.
    let (visited, _) = visited_kv_tiles(&[16], &gna(&[4], &[1], &[1], &[true]), &[4], &[4]);
    assert_eq!(visited, 7);
    // A visited count never falls below the tiles the mask needs (one per Q tile at least).
    let (visited, dense) = visited_kv_tiles(&[10, 11], &gna(&[3, 4], &[2, 1], &[2, 2], &[false, true]), &[2, 4], &[4, 2]);
    assert!(visited > 0 && dense > 0);
    assert_eq!(visited_kv_tiles(&[16], &gna(&[3], &[1], &[1], &[false]), &[0], &[4]), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// PSA

fn psa_params(block_q: usize, block_k: usize, tile_k: usize) -> PyramidParams {
    PyramidParams::with_blocks(block_q, block_k, tile_k)
}

/// psa_ref.py transcribed in f64: per query block, each selected KV block (cut at the sequence
/// end) is mean-pooled by p with its tail replicate-padded to a multiple of p, bias ln p.
fn naive_psa(q: &Tensor, k: &Tensor, v: &Tensor, mask: &LevelMask, bq: usize, bk: usize) -> Vec<f64> {
    let (b, h, n, d) = q.dims4().unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let (qd, kd, vd) = (values(q), values(k), values(v));
    let meanpool = |rows: Vec<Vec<f64>>, p: usize| -> Vec<Vec<f64>> {
        let mut rows = rows;
        while !rows.len().is_multiple_of(p) {
            rows.push(rows.last().unwrap().clone());
        }
        rows.chunks(p).map(|g| (0..d).map(|c| g.iter().map(|r| r[c]).sum::<f64>() / p as f64).collect()).collect()
    };
    let mut out = vec![0.0; b * h * n * d];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..mask.q_blocks {
                let (mut keys, mut vals, mut bias) = (Vec::new(), Vec::new(), Vec::new());
                for j in 0..mask.k_blocks {
                    let p = mask.get(bi, hi, i, j);
                    if p == 0 {
                        continue;
                    }
                    let range = j * bk..((j + 1) * bk).min(n);
                    let kj = meanpool(range.clone().map(|t| as_f64(token(&kd, h, n, d, bi, hi, t))).collect(), p);
                    let vj = meanpool(range.map(|t| as_f64(token(&vd, h, n, d, bi, hi, t))).collect(), p);
                    bias.extend(std::iter::repeat_n((p as f64).ln(), kj.len()));
                    keys.extend(kj);
                    vals.extend(vj);
                }
                for t in i * bq..((i + 1) * bq).min(n) {
                    let (o, _) = naive_attend(token(&qd, h, n, d, bi, hi, t), &keys, &vals, &bias, scale);
                    let start = ((bi * h + hi) * n + t) * d;
                    out[start..start + d].copy_from_slice(&o);
                }
            }
        }
    }
    out
}

fn naive_dense(q: &Tensor, k: &Tensor, v: &Tensor, keep: impl Fn(usize, usize, usize) -> bool) -> Vec<f64> {
    // keep(query, key, head index) says which keys a query attends.
    let (b, h, n, d) = q.dims4().unwrap();
    let (qd, kd, vd) = (values(q), values(k), values(v));
    let mut out = Vec::new();
    for bi in 0..b {
        for hi in 0..h {
            for t in 0..n {
                let kept: Vec<usize> = (0..n).filter(|&j| keep(t, j, bi * h + hi)).collect();
                let keys: Vec<Vec<f64>> = kept.iter().map(|&j| as_f64(token(&kd, h, n, d, bi, hi, j))).collect();
                let vals: Vec<Vec<f64>> = kept.iter().map(|&j| as_f64(token(&vd, h, n, d, bi, hi, j))).collect();
                let (o, _) = naive_attend(token(&qd, h, n, d, bi, hi, t), &keys, &vals, &vec![0.0; kept.len()], 1.0 / (d as f64).sqrt());
                out.extend(o);
            }
        }
    }
    out
}

#[test]
fn psa_all_level_one_is_dense_attention() {
    let params = psa_params(16, 16, 8);
    let dims = (1, 2, 40, 8); // ragged: 40 = 2 * 16 + 8
    let (q, k, v) = (random_tensor(dims, 61), random_tensor(dims, 62), random_tensor(dims, 63));
    let mask = LevelMask::from_fn(1, 2, 3, 3, |_, _, _, _| 1);
    let out = reference_with_levels(&q, &k, &v, &mask, &params).unwrap();
    assert_close(&values(&out), &naive_dense(&q, &k, &v, |_, _, _| true), 2e-5, "all level 1");

    // End to end: one level taking every block at pool 1 is dense attention too.
    let everything = PyramidParams { levels: vec![(1, 1.0)], ..params.clone() };
    let out = pyramid::forward(&everything, &AttentionInput::new(&q, &k, &v)).unwrap();
    assert_close(&values(&out), &naive_dense(&q, &k, &v, |_, _, _| true), 2e-5, "forward, all level 1");
}

#[test]
fn psa_pooled_levels_are_exact_for_group_constant_keys() {
    // psa_ref.py's identity: keys and values constant within groups of 8, so every pooled key
    // equals the keys it replaces and ln(p) restores their count.
    let params = psa_params(16, 16, 8);
    let (b, h, n, d) = (1, 2, 64, 8);
    let q = random_tensor((b, h, n, d), 71);
    let group_k = random_values(b * h * (n / 8) * d, 72);
    let group_v = random_values(b * h * (n / 8) * d, 73);
    let expand = |g: &[f32]| -> Tensor {
        let mut data = Vec::new();
        for bh in 0..b * h {
            for t in 0..n {
                let start = (bh * (n / 8) + t / 8) * d;
                data.extend_from_slice(&g[start..start + d]);
            }
        }
        Tensor::from_vec(data, (b, h, n, d), &Device::Cpu).unwrap()
    };
    let (k, v) = (expand(&group_k), expand(&group_v));
    let mixed = LevelMask::from_fn(b, h, 4, 4, |_, hi, i, j| [1, 2, 4, 8][(i + j + hi) % 4]);
    let full = LevelMask::from_fn(b, h, 4, 4, |_, _, _, _| 1);
    let out_mixed = values(&reference_with_levels(&q, &k, &v, &mixed, &params).unwrap());
    let out_full = reference_with_levels(&q, &k, &v, &full, &params).unwrap();
    assert_close(&out_mixed, &as_f64(&values(&out_full)), 2e-5, "mixed vs full");
    assert_close(&out_mixed, &naive_dense(&q, &k, &v, |_, _, _| true), 2e-5, "mixed vs naive dense");
}

#[test]
fn psa_matches_psa_ref_on_ragged_random_levels() {
    let params = psa_params(8, 16, 8);
    let dims = (2, 1, 45, 8); // 45 = 2 * 16 + 13: the last KV block has 13 keys
    let (q, k, v) = (random_tensor(dims, 81), random_tensor(dims, 82), random_tensor(dims, 83));
    let mask = LevelMask::from_fn(2, 1, 6, 3, |bi, _, i, j| [0, 1, 2, 4, 8][(3 * i + j + bi) % 5].max(usize::from(j == i % 3)));
    let out = reference_with_levels(&q, &k, &v, &mask, &params).unwrap();
    assert_close(&values(&out), &naive_psa(&q, &k, &v, &mask, 8, 16), 2e-5, "vs psa_ref");
}

#[test]
fn psa_skipped_blocks_equal_dense_over_kept_keys() {
    let params = psa_params(8, 8, 8);
    let dims = (1, 2, 30, 8); // 4 KV blocks, the last with 6 keys
    let (q, k, v) = (random_tensor(dims, 91), random_tensor(dims, 92), random_tensor(dims, 93));
    let keep = |h: usize, i: usize, j: usize| !(i * 3 + j * 5 + h).is_multiple_of(3) || j == i % 4;
    let mask = LevelMask::from_fn(1, 2, 4, 4, |_, h, i, j| usize::from(keep(h, i, j)));
    let out = reference_with_levels(&q, &k, &v, &mask, &params).unwrap();
    let want = naive_dense(&q, &k, &v, |t, j, head| keep(head, t / 8, j / 8));
    assert_close(&values(&out), &want, 2e-5, "skip");

    // A hand-made mask with an empty row gives zeros there, not NaN.
    let mut empty_row = mask.clone();
    for j in 0..4 {
        empty_row.set(0, 1, 2, j, 0);
    }
    let out = values(&reference_with_levels(&q, &k, &v, &empty_row, &params).unwrap());
    assert!(out.iter().all(|x| x.is_finite()));
    let row_start = (30 + 16) * 8;
    assert!(out[row_start..row_start + 8 * 8].iter().all(|&x| x == 0.0));
}

#[test]
fn psa_pool_mean_by_hand() {
    // One head, 5 tokens of 2 features: token t = (t, 10 t). Padded to 8 with copies of token 4.
    let data: Vec<f32> = (0..5).flat_map(|t| [t as f32, 10.0 * t as f32]).collect();
    let x = Tensor::from_vec(data, (1, 1, 5, 2), &Device::Cpu).unwrap();
    let p2 = values(&pool_mean(&x, 2, 8).unwrap());
    assert_eq!(p2, vec![0.5, 5.0, 2.5, 25.0, 4.0, 40.0, 4.0, 40.0]);
    let p4 = values(&pool_mean(&x, 4, 8).unwrap());
    assert_eq!(p4, vec![1.5, 15.0, 4.0, 40.0]);
    let p1 = pool_mean(&x, 1, 8).unwrap();
    assert_eq!(p1.dims(), &[1, 1, 8, 2]);
    assert!(pool_mean(&x, 3, 8).is_err());
}

/// Importance row with the given values in a block order; one (b, h, query block).
fn importance_row(row: &[f32]) -> Tensor {
    Tensor::from_vec(row.to_vec(), (1, 1, 1, row.len()), &Device::Cpu).unwrap()
}

/// Pools by rank: `ranked[r]` is the block of rank r.
fn pools_by_rank(mask: &LevelMask, ranked: &[usize]) -> Vec<usize> {
    ranked.iter().map(|&j| mask.get(0, 0, 0, j)).collect()
}

#[test]
fn psa_assign_levels_topk_quotas_and_alignment() {
    // block_k / tile_k = 2: alignment 1, 1, 2, 4 for pools 1, 2, 4, 8.
    let params = PyramidParams::default();
    // 20 blocks, importance 20 - r at block (7 r) % 20, so rank r is block 7 r mod 20.
    let ranked: Vec<usize> = (0..20).map(|r| (7 * r) % 20).collect();
    let mut row = vec![0f32; 20];
    for (r, &j) in ranked.iter().enumerate() {
        row[j] = (20 - r) as f32;
    }
    let mask = assign_levels(&importance_row(&row), &params).unwrap();
    // Quotas: int(2.0) = 2 at pool 1; int(3.0) = 3 -> 1 at pool 2; pool 4 empty; int(7.0) = 7 ->
    // 4 blocks at pool 8 (a multiple of 4 already); the rest skipped.
    let mut want = vec![1, 1, 2, 8, 8, 8, 8];
    want.resize(20, 0);
    assert_eq!(pools_by_rank(&mask, &ranked), want);

    // 10 blocks: pool 1 gets int(1.0) = 1; pool 2 and 4 nothing; pool 8 quota 3 - 1 = 2 blocks,
    // rounded up to 4.
    let row: Vec<f32> = (0..10).map(|j| 10.0 - j as f32).collect();
    let mask = assign_levels(&importance_row(&row), &params).unwrap();
    assert_eq!(pools_by_rank(&mask, &(0..10).collect::<Vec<_>>()), vec![1, 8, 8, 8, 8, 0, 0, 0, 0, 0]);

    // Rounding up that passes the last block rounds down instead: 6 blocks, pool 8 quota 6 ->
    // 8 -> capped at 6 -> down to 4.
    let only_pool_8 = PyramidParams { levels: vec![(1, 0.0), (8, 1.0)], ..params.clone() };
    let row: Vec<f32> = (0..6).map(|j| 6.0 - j as f32).collect();
    let mask = assign_levels(&importance_row(&row), &only_pool_8).unwrap();
    assert_eq!(pools_by_rank(&mask, &(0..6).collect::<Vec<_>>()), vec![8, 8, 8, 8, 0, 0]);

    // tile_k == block_k: alignment = pool. 10 blocks, [(1, .1), (4, .3)]: 1 at pool 1, then
    // quota 2 rounded up to 4.
    let tile_eq = PyramidParams { block_k: 32, tile_k: 32, levels: vec![(1, 0.1), (4, 0.3)], ..params.clone() };
    let row: Vec<f32> = (0..10).map(|j| 10.0 - j as f32).collect();
    let mask = assign_levels(&importance_row(&row), &tile_eq).unwrap();
    assert_eq!(pools_by_rank(&mask, &(0..10).collect::<Vec<_>>()), vec![1, 4, 4, 4, 4, 0, 0, 0, 0, 0]);

    // A row whose quotas select nothing (2 blocks) keeps its best block at pool 1.
    let mask = assign_levels(&importance_row(&[0.3, 0.7]), &params).unwrap();
    assert_eq!((mask.get(0, 0, 0, 0), mask.get(0, 0, 0, 1)), (0, 1));
}

#[test]
fn psa_assign_levels_threshold_bounds_alignment_and_floor() {
    let levels = vec![(1, 0.5), (2, 0.7), (4, 0.9), (8, 0.97)];
    let params = PyramidParams { mode: LevelMode::Threshold, levels, ..PyramidParams::default() };
    // Values in 128ths so the cumulative sums are exact: cumulative 40, 64, 84, 96, 106, 114,
    // 120, 124, 126, 128. Rank r sits at block (3 r) % 10.
    let sorted = [40.0, 24.0, 20.0, 12.0, 10.0, 8.0, 6.0, 4.0, 2.0, 2.0];
    let ranked: Vec<usize> = (0..10).map(|r| (3 * r) % 10).collect();
    let mut row = vec![0f32; 10];
    for (r, &j) in ranked.iter().enumerate() {
        row[j] = sorted[r] / 128.0;
    }
    let mask = assign_levels(&importance_row(&row), &params).unwrap();
    // pool 1: 2 ranks within 0.5, plus the one crossing it -> ranks 0..3.
    // pool 2: 3 ranks within 0.7 -> end 4 -> rank 3.
    // pool 4: 6 within 0.9 -> end 7, length 3 rounded up to 4 -> ranks 4..8.
    // pool 8: 8 within 0.97 -> end 9, length 1 -> 4 -> past the end (12 > 10) -> down to 0.
    assert_eq!(pools_by_rank(&mask, &ranked), vec![1, 1, 1, 2, 4, 4, 4, 4, 0, 0]);

    // The pool-1 floor: nothing within 0.1, yet at least int(10 * 0.25) + 1 = 3 blocks.
    let floor = PyramidParams { levels: vec![(1, 0.1)], min_full_ratio: 0.25, ..params.clone() };
    let mask = assign_levels(&importance_row(&row), &floor).unwrap();
    assert_eq!(pools_by_rank(&mask, &ranked), vec![1, 1, 1, 0, 0, 0, 0, 0, 0, 0]);
    // Default floor int(0.6) + 1 = 1 block.
    let floor = PyramidParams { levels: vec![(1, 0.1)], ..params.clone() };
    let mask = assign_levels(&importance_row(&row), &floor).unwrap();
    assert_eq!(pools_by_rank(&mask, &ranked), vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn psa_importance_matches_naive_formula() {
    let params = PyramidParams { sample_q: Some(3), sample_k: Some(5), seed: 5, ..psa_params(8, 16, 8) };
    let (b, h, n, d) = (1, 2, 37, 8);
    let (q, k) = (random_tensor((b, h, n, d), 101), random_tensor((b, h, n, d), 102));
    let samples = sample_positions(&params, b, h);
    for bh in 0..b * h {
        assert_eq!(samples.q[bh].len(), 3);
        assert_eq!(samples.k[bh].len(), 5);
        assert!(samples.q[bh].windows(2).all(|w| w[0] < w[1]) && samples.q[bh].iter().all(|&p| p < 8));
        assert!(samples.k[bh].windows(2).all(|w| w[0] < w[1]) && samples.k[bh].iter().all(|&p| p < 16));
    }
    assert_eq!(samples, sample_positions(&params, b, h), "deterministic");
    assert_ne!(samples, sample_positions(&PyramidParams { seed: 6, ..params.clone() }, b, h));

    let got = values(&importance_with_samples(&q, &k, &params, &samples).unwrap());
    let (qd, kd) = (values(&q), values(&k));
    let (q_blocks, k_blocks) = (5, 3);
    let scale = 1.0 / 8f64.sqrt();
    let mut want = Vec::new();
    for hi in 0..h {
        // Replicate padding: a position past the end reads the last token.
        let logit = |qt: usize, kt: usize| -> f64 {
            let (a, c) = (token(&qd, h, n, d, 0, hi, qt.min(n - 1)), token(&kd, h, n, d, 0, hi, kt.min(n - 1)));
            a.iter().zip(c).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() * scale
        };
        for i in 0..q_blocks {
            let mut s = vec![0f64; k_blocks];
            for &qp in &samples.q[hi] {
                let r: Vec<f64> = (0..k_blocks)
                    .map(|j| samples.k[hi].iter().map(|&kp| logit(i * 8 + qp, j * 16 + kp)).fold(f64::MIN, f64::max))
                    .collect();
                let m = r.iter().cloned().fold(f64::MIN, f64::max);
                for j in 0..k_blocks {
                    s[j] = s[j].max((r[j] - m).exp());
                }
            }
            let total: f64 = s.iter().sum();
            want.extend(s.iter().map(|x| x / total));
        }
    }
    assert_close(&got, &want, 1e-5, "importance");
}

#[test]
fn psa_forward_has_no_nan_on_ragged_lengths() {
    for (n, seed) in [(37usize, 111u64), (5, 112), (64, 113), (129, 114)] {
        for mode in [LevelMode::Topk, LevelMode::Threshold] {
            let params = PyramidParams { mode, ..psa_params(16, 16, 8) };
            let dims = (1, 2, n, 8);
            let (q, k, v) = (random_tensor(dims, seed), random_tensor(dims, seed + 7), random_tensor(dims, seed + 9));
            let out = pyramid::forward(&params, &AttentionInput::new(&q, &k, &v)).unwrap();
            assert_eq!(out.dims(), &[1, 2, n, 8]);
            assert!(values(&out).iter().all(|x| x.is_finite()), "N = {n}, {mode:?}");
            let scores = pyramid::importance(&q, &k, &params).unwrap();
            let rows = values(&scores);
            for row in rows.chunks(n.div_ceil(16)) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            let mask = assign_levels(&scores, &params).unwrap();
            for i in 0..mask.q_blocks {
                assert!(mask.row(0, 1, i).iter().any(|&p| p > 0), "every row selects something");
            }
        }
    }
    // bf16 in, bf16 out, default parameters, N shorter than one block.
    let dims = (1, 1, 50, 16);
    let (q, k, v) = (random_tensor(dims, 1), random_tensor(dims, 2), random_tensor(dims, 3));
    let q = q.to_dtype(DType::BF16).unwrap();
    let out = pyramid::forward(&PyramidParams::default(), &AttentionInput::new(&q, &k, &v)).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    assert!(values(&out).iter().all(|x| x.is_finite()));
}

#[test]
fn psa_check_and_validate_reasons() {
    let p = PyramidParams::default();
    assert!(p.check(&layer(Role::SelfAttention, None, false)).is_ok());
    assert!(p.check(&layer(Role::Joint, None, false)).unwrap_err().contains("self-attention"));
    assert!(p.check(&layer(Role::Cross, None, false)).is_err());
    assert!(p.check(&layer(Role::SelfAttention, None, true)).unwrap_err().contains("mask"));
    let bad = |q: PyramidParams| q.validate().unwrap_err();
    assert!(bad(psa_params(128, 60, 20)).contains("block_k"));
    assert!(bad(psa_params(100, 64, 32)).contains("block_q"));
    assert!(bad(psa_params(128, 64, 48)).contains("tile_k"));
    assert!(bad(PyramidParams { levels: vec![(3, 0.5)], ..p.clone() }).contains("pool factor"));
    assert!(bad(PyramidParams { levels: vec![(1, 0.5), (2, 0.4)], ..p.clone() }).contains("not decrease"));
    assert!(bad(PyramidParams { sample_q: Some(0), ..p.clone() }).contains("sample_q"));
    // Extra tokens and key masks are refused at call time too.
    let dims = (1, 1, 16, 8);
    let (q, k, v) = (random_tensor(dims, 1), random_tensor(dims, 2), random_tensor(dims, 3));
    let input = AttentionInput::new(&q, &k, &v).extra_kv(Some((&k, &v)));
    assert!(pyramid::forward(&psa_params(8, 8, 8), &input).is_err());
}
