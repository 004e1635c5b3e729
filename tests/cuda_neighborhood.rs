//! GNA on the GPU (src/attention/cuda/neighborhood.rs, kernels/attention/neighborhood).
//!
//! The host tiling (permutation, lists, keep words) is checked on the CPU in tests/gna_tiling.rs.
//! - `parity_*` (H200): the kernel against the f32 reference (`neighborhood::reference` on the
//!   CPU, same bf16/f16 inputs). Rule (flash-attention's): error vs f32 at most 2x the error of a
//!   naive low-precision implementation (masked softmax with candle ops in bf16/f16 on the GPU)
//!   plus a small floor; lse within 1e-3; outputs NaN-poisoned before each launch; no NaN.
//!
//! Run on the H200: `cargo test --release --features cuda --test cuda_neighborhood`.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::errors;
use common::gna_shapes::{params, shapes};
use visgen::attention::cuda::neighborhood::{self as gna, KernelOptions, Schedule};
use visgen::attention::neighborhood::{self, neighbors, NeighborhoodParams};

// ---------------------------------------------------------------------------------------------
// GPU parity

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn to_cpu_f32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

fn count_nan(t: &Tensor) -> usize {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|x| !x.is_finite()).count()
}

/// Masked softmax attention with candle ops in `dtype` on `dev` (the naive low-precision
/// implementation), mask from `neighbors`.
fn naive_low(q: &Tensor, k: &Tensor, v: &Tensor, extra: Option<(&Tensor, &Tensor)>, grid: &[usize], p: &NeighborhoodParams, scale: f64) -> Tensor {
    let n: usize = grid.iter().product();
    let ne = extra.map_or(0, |(k2, _)| k2.dim(2).unwrap());
    let mut bias = vec![f32::NEG_INFINITY; n * (n + ne)];
    for qi in 0..n {
        for key in neighbors(qi, grid, p) {
            bias[qi * (n + ne) + key] = 0.0;
        }
        bias[qi * (n + ne) + n..(qi + 1) * (n + ne)].fill(0.0);
    }
    let dev = q.device();
    let bias = Tensor::from_vec(bias, (n, n + ne), dev).unwrap().to_dtype(q.dtype()).unwrap();
    let (k, v) = match extra {
        Some((k2, v2)) => (Tensor::cat(&[k, k2], 2).unwrap(), Tensor::cat(&[v, v2], 2).unwrap()),
        None => (k.clone(), v.clone()),
    };
    let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap().broadcast_add(&bias).unwrap();
    candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&v).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn check(grid: &[usize], p: &NeighborhoodParams, ne: usize, b: usize, h: usize, d: usize, dtype: DType, opts: &KernelOptions) -> Result<(), String> {
    check_scaled(grid, p, ne, b, h, d, dtype, opts, 1.0)
}

/// `check` with q drawn with standard deviation `q_std` (wide scores: tile maxima that jump by
/// more than the kernel's lazy-rescale slack, so O is rescaled in the middle of the loop).
#[allow(clippy::too_many_arguments)]
fn check_scaled(
    grid: &[usize],
    p: &NeighborhoodParams,
    ne: usize,
    b: usize,
    h: usize,
    d: usize,
    dtype: DType,
    opts: &KernelOptions,
    q_std: f32,
) -> Result<(), String> {
    let dev = gpu();
    let n: usize = grid.iter().product();
    let rnd = |len: usize, std: f32| Tensor::randn(0f32, std, (b, h, len, d), &dev).unwrap().to_dtype(dtype).unwrap();
    let (q, k, v) = (rnd(n, q_std), rnd(n, 1.0), rnd(n, 1.0));
    let extra = (ne > 0).then(|| (rnd(ne, 1.0), rnd(ne, 1.0)));
    let extra_ref = extra.as_ref().map(|(a, b)| (a, b));
    let scale = 1.0 / (d as f64).sqrt();
    let opts = KernelOptions { poison: true, ..*opts };
    let (o, lse) = gna::forward_with(&q, &k, &v, grid, p, extra_ref, scale, &opts).map_err(|e| e.to_string())?;
    let (o2, _) = gna::forward_with(&q, &k, &v, grid, p, extra_ref, scale, &opts).map_err(|e| e.to_string())?;
    let rerun = errors(&to_cpu_f32(&o), &to_cpu_f32(&o2)).0;
    let (o, lse) = (to_cpu_f32(&o), to_cpu_f32(&lse));
    let what = format!("{dtype:?} grid {grid:?} k {:?} s {:?} d {:?} c {:?} ne {ne} B{b} H{h} D{d}", p.kernel, p.stride, p.dilation, p.causal);
    if count_nan(&o) + count_nan(&lse) > 0 {
        return Err(format!("{what}: non-finite outputs (unwritten rows?)"));
    }
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let extra_cpu = extra.as_ref().map(|(a, b)| (cpu(a), cpu(b)));
    let (o_ref, lse_ref) =
        neighborhood::reference(&cpu(&q), &cpu(&k), &cpu(&v), grid, p, extra_cpu.as_ref().map(|(a, b)| (a, b)), scale).unwrap();
    let o_low = to_cpu_f32(&naive_low(&q, &k, &v, extra_ref, grid, p, scale));
    let (max_ours, rel_ours) = errors(&o, &o_ref);
    let (max_low, rel_low) = errors(&o_low, &o_ref);
    let (lse_err, _) = errors(&lse, &lse_ref);
    println!("{what}: max {max_ours:.2e} (naive {max_low:.2e}) rel {rel_ours:.2e} (naive {rel_low:.2e}) lse {lse_err:.1e}");
    if rerun != 0.0 {
        return Err(format!("{what}: two runs differ by {rerun}"));
    }
    if max_ours > 2.0 * max_low + 1e-5 || rel_ours > 2.0 * rel_low + 1e-6 {
        return Err(format!("{what}: error max {max_ours} rel {rel_ours} > 2 x naive (max {max_low}, rel {rel_low})"));
    }
    if lse_err > 1e-3 {
        return Err(format!("{what}: lse error {lse_err}"));
    }
    Ok(())
}

#[test]
fn parity_all_shapes_every_head_dim() {
    let mut failures = Vec::new();
    for (i, (grid, p, ne)) in shapes().into_iter().enumerate() {
        let d = gna::HEAD_DIMS[i % gna::HEAD_DIMS.len()];
        let dtype = if i % 3 == 2 { DType::F16 } else { DType::BF16 };
        if let Err(e) = check(&grid, &p, ne, 1 + i % 2, 2, d, dtype, &KernelOptions::default()) {
            failures.push(e);
        }
    }
    // every head dim in both dtypes on one 2-D case with extra tokens
    let p = params(&[9, 7], &[2, 1], &[1, 2], &[false, false]);
    for dtype in [DType::BF16, DType::F16] {
        for d in gna::HEAD_DIMS {
            if let Err(e) = check(&[20, 31], &p, 33, 1, 3, d, dtype, &KernelOptions::default()) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn parity_through_the_attention_api() {
    use visgen::attention::{attend, AttentionInput, Backend};
    let dev = gpu();
    let (grid, p) = (vec![16usize, 24], params(&[5, 7], &[1, 1], &[1, 1], &[false, false]));
    let rnd = || Tensor::randn(0f32, 1.0, (1, 2, 384, 64), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let (q, k, v) = (rnd(), rnd(), rnd());
    let input = AttentionInput { q: &q, k: &k, v: &v, key_mask: None, extra_kv: None, grid: Some(&grid), rope: None };
    let o = attend(&Backend::Neighborhood(p.clone()), &input).unwrap();
    let (o_direct, _) = gna::forward(&q, &k, &v, &grid, &p, None, 0.125).unwrap();
    assert_eq!(errors(&to_cpu_f32(&o), &to_cpu_f32(&o_direct)).0, 0.0);
    // a dtype the kernel does not serve is an error, not a silent fallback
    let q32 = q.to_dtype(DType::F32).unwrap();
    let input = AttentionInput { q: &q32, k: &q32, v: &q32, key_mask: None, extra_kv: None, grid: Some(&grid), rope: None };
    let e = attend(&Backend::Neighborhood(p), &input).unwrap_err().to_string();
    assert!(e.contains("no kernel for dtype"), "{e}");
}

#[test]
fn in_place_reads_equal_the_permuted_path_and_strided_views() {
    let dev = gpu();
    for (grid, p, ne, b) in [
        (vec![37usize, 50], params(&[11, 9], &[3, 1], &[1, 1], &[false, true]), 20, 2),
        (vec![7, 9, 13], params(&[3, 4, 5], &[1, 2, 1], &[1, 1, 1], &[true, false, false]), 0, 1),
        (vec![300], params(&[40], &[8], &[1], &[false]), 0, 2),
    ] {
        let n: usize = grid.iter().product();
        let (h, d) = (3, 128);
        // (B, H, N, D) views of (B, N, H, D) tensors, as a model's projections give them
        let mk = |len: usize| Tensor::randn(0f32, 1.0, (b, len, h, d), &dev).unwrap().to_dtype(DType::BF16).unwrap().transpose(1, 2).unwrap();
        let (q, k, v) = (mk(n), mk(n), mk(n));
        let (k2, v2) = (mk(ne.max(1)), mk(ne.max(1)));
        let extra = (ne > 0).then_some((&k2, &v2));
        let permuted = KernelOptions { poison: true, ..Default::default() };
        let in_place = KernelOptions { in_place: true, ..permuted };
        let (o1, l1) = gna::forward_with(&q, &k, &v, &grid, &p, extra, 0.1, &in_place).unwrap();
        let (o2, l2) = gna::forward_with(&q, &k, &v, &grid, &p, extra, 0.1, &permuted).unwrap();
        let (qc, kc, vc) = (q.contiguous().unwrap(), k.contiguous().unwrap(), v.contiguous().unwrap());
        let (o3, _) = gna::forward_with(&qc, &kc, &vc, &grid, &p, extra, 0.1, &in_place).unwrap();
        assert_eq!(count_nan(&to_cpu_f32(&o1)), 0);
        assert_eq!(errors(&to_cpu_f32(&o1), &to_cpu_f32(&o2)).0, 0.0, "{grid:?}: in place vs permuted");
        assert_eq!(errors(&to_cpu_f32(&l1), &to_cpu_f32(&l2)).0, 0.0, "{grid:?}: lse in place vs permuted");
        assert_eq!(errors(&to_cpu_f32(&o1), &to_cpu_f32(&o3)).0, 0.0, "{grid:?}: strided vs contiguous");
    }
}

#[test]
fn parity_wide_scores() {
    // q with standard deviation 30: scores spread over hundreds of base-2 units, so a later tile's
    // max often exceeds the running one by more than the lazy rescale's slack (2^8) and O is
    // rescaled mid-loop (with unit inputs that happens almost only at the first tile)
    let mut failures = Vec::new();
    for (i, (grid, p, ne)) in shapes().into_iter().enumerate() {
        let d = gna::HEAD_DIMS[(i + 1) % gna::HEAD_DIMS.len()];
        if let Err(e) = check_scaled(&grid, &p, ne, 1, 2, d, DType::BF16, &KernelOptions::default(), 30.0) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn parity_in_place_path() {
    // the dilation-1 shapes again, read in place (5-D TMA boxes, no permutation kernel)
    let mut failures = Vec::new();
    for (i, (grid, p, ne)) in shapes().into_iter().enumerate().filter(|(_, (_, p, _))| p.dilation.iter().all(|&d| d == 1)) {
        let d = gna::HEAD_DIMS[(i + 2) % gna::HEAD_DIMS.len()];
        if let Err(e) = check(&grid, &p, ne, 1, 2, d, DType::BF16, &KernelOptions { in_place: true, ..Default::default() }) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn kernel_options_give_identical_results() {
    // q read in place, the ping-pong of the consumer warpgroups and the schedules (several work
    // items per CTA: consecutive, ragged last CTA; round robin over a few CTAs, so every CTA runs
    // items of several heads and batches; balanced: each CTA's items from the host's work
    // table), and for lists without a tile to mask the kernel
    // without masking code, against the plain configuration (the masking kernel, q permuted, no
    // ping-pong, one item per CTA). Same arithmetic in the same order: the outputs must be
    // identical, bit for bit.
    let dev = gpu();
    let plain =
        KernelOptions { permute_q: true, pingpong: false, in_place: false, schedule: Schedule::Consecutive(1), always_masked: true, poison: true };
    for (i, (grid, p, ne)) in shapes().into_iter().enumerate() {
        let n: usize = grid.iter().product();
        let (b, h, d) = (2, 3, gna::HEAD_DIMS[i % gna::HEAD_DIMS.len()]);
        let rnd = |len: usize| Tensor::randn(0f32, 1.0, (b, h, len, d), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let (q, k, v) = (rnd(n), rnd(n), rnd(n));
        let (k2, v2) = (rnd(ne.max(1)), rnd(ne.max(1)));
        let extra = (ne > 0).then_some((&k2, &v2));
        let (o_ref, l_ref) = gna::forward_with(&q, &k, &v, &grid, &p, extra, 0.1, &plain).unwrap();
        let (o_ref, l_ref) = (to_cpu_f32(&o_ref), to_cpu_f32(&l_ref));
        assert_eq!(count_nan(&o_ref) + count_nan(&l_ref), 0, "{grid:?}: the plain configuration left rows unwritten");
        let schedules = [
            Schedule::Consecutive(1),
            Schedule::Consecutive(2),
            Schedule::Consecutive(3),
            Schedule::RoundRobin(5),
            Schedule::Persistent,
            Schedule::Balanced,
        ];
        for (schedule, pingpong) in schedules.iter().flat_map(|&s| [(s, true), (s, false)]) {
            let opts = KernelOptions { schedule, pingpong, poison: true, ..Default::default() };
            let (o, l) = gna::forward_with(&q, &k, &v, &grid, &p, extra, 0.1, &opts).unwrap();
            let (o, l) = (to_cpu_f32(&o), to_cpu_f32(&l));
            let what = format!("{grid:?} {p:?}: {opts:?}");
            assert_eq!(count_nan(&o) + count_nan(&l), 0, "{what}: rows unwritten");
            assert_eq!(errors(&o, &o_ref).0, 0.0, "{what}: O differs from the plain configuration");
            assert_eq!(errors(&l, &l_ref).0, 0.0, "{what}: lse differs from the plain configuration");
        }
    }
}
