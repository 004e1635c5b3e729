//! Parity of the linear-attention CUDA kernels (src/attention/cuda/linear.rs) on the GPU.
//!
//! Reference: the closed form in f64 on the CPU, from the same bf16/f16 inputs (and the same fp32
//! RoPE tables), written here with plain candle ops:
//!   o_n = (Σ_m v_m ψ(k_m)·ψ(q_n)) / (Σ_m φ(k_m)·φ(q_n) + eps), φ = ReLU, ψ = φ or RoPE∘φ,
//! m over all tokens (bidirectional) or over the chunks up to the query's own (chunk-causal).
//! Rule (flash-attention's): the kernel's error against the reference is at most twice the error
//! of a naive low-precision implementation (the same math in bf16/f16 candle ops on the GPU), in
//! max-abs and in relative L2. Outputs are NaN-poisoned before every launch (an unwritten element
//! fails); fresh random inputs for every case; ragged token counts.
//!
//! Run on the H200: `cargo test --release --features cuda --test cuda_linear`.
//! The `bench` test (ignored) prints `gen bench` for CUDA: `... --test cuda_linear -- --ignored --nocapture bench`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use visgen::attention::cuda::linear::{self, KernelOptions, OutConfig};
use visgen::attention::linear::LinearState;
use visgen::attention::Rope;

const EPS: f64 = 1e-15;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// Inputs with a mix of signs and scales, so ReLU cuts about half and the denominator varies.
fn input(shape: (usize, usize, usize, usize), dtype: DType, scale: f64, dev: &Device) -> Tensor {
    (Tensor::randn(0f32, 1.0, shape, dev).unwrap() * scale).unwrap().to_dtype(dtype).unwrap()
}

/// Wan-style interleaved tables (N, D) f32: three axes (t, h, w) with their own frequencies.
fn rope_tables(n: usize, d: usize, dev: &Device) -> Rope {
    let h_dim = 2 * (d / 6);
    let t_dim = d - 2 * h_dim;
    let (gw, gh) = (5usize, 4usize);
    let mut cos = vec![0f32; n * d];
    let mut sin = vec![0f32; n * d];
    for tok in 0..n {
        let pos = [tok / (gh * gw), (tok / gw) % gh, tok % gw];
        let mut col = 0;
        for (axis, dim) in [t_dim, h_dim, h_dim].into_iter().enumerate() {
            for j in 0..dim / 2 {
                let freq = 1.0 / 10000f64.powf(2.0 * j as f64 / dim as f64);
                let angle = pos[axis] as f64 * freq;
                for e in 0..2 {
                    cos[tok * d + col + 2 * j + e] = angle.cos() as f32;
                    sin[tok * d + col + 2 * j + e] = angle.sin() as f32;
                }
            }
            col += dim;
        }
    }
    Rope { cos: Tensor::from_vec(cos, (n, d), dev).unwrap(), sin: Tensor::from_vec(sin, (n, d), dev).unwrap() }
}

/// (B,H,N,D) rows rotated by interleaved pairs, in the tensor's dtype (tables cast to it).
fn rotate(x: &Tensor, rope: &Rope) -> Tensor {
    let (b, h, n, d) = x.dims4().unwrap();
    let pairs = x.reshape((b, h, n, d / 2, 2)).unwrap();
    let even = pairs.narrow(4, 0, 1).unwrap();
    let odd = pairs.narrow(4, 1, 1).unwrap();
    let rotated = Tensor::cat(&[&odd.neg().unwrap(), &even], 4).unwrap().reshape((b, h, n, d)).unwrap();
    let cos = rope.cos.to_device(x.device()).unwrap().to_dtype(x.dtype()).unwrap();
    let sin = rope.sin.to_device(x.device()).unwrap().to_dtype(x.dtype()).unwrap();
    (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
}

/// The closed form, computed in `dtype` on `dev` over chunks of `chunk` tokens (chunk >= N:
/// bidirectional), the sums starting at zero. Returns the output and the final (S, z).
fn closed_form(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    chunk: usize,
    dtype: DType,
    dev: &Device,
) -> (Tensor, Tensor, Tensor) {
    let cast = |t: &Tensor| t.to_device(dev).unwrap().to_dtype(dtype).unwrap();
    let (q, k, v) = (cast(q), cast(k), cast(v));
    let n = q.dim(2).unwrap();
    let (phi_q, phi_k) = (q.relu().unwrap(), k.relu().unwrap());
    let (psi_q, psi_k) = match rope {
        Some(r) => (rotate(&phi_q, r), rotate(&phi_k, r)),
        None => (phi_q.clone(), phi_k.clone()),
    };
    let mut bounds: Vec<usize> = (0..n).step_by(chunk.max(1)).collect();
    bounds.push(n);
    closed_form_bounds(&q, &phi_q, &phi_k, &psi_q, &psi_k, &v, &bounds, dtype, dev)
}

/// The closed form over chunks with token boundaries `bounds` (`[0, .., N]`), from features.
#[allow(clippy::too_many_arguments)]
fn closed_form_bounds(
    q: &Tensor,
    phi_q: &Tensor,
    phi_k: &Tensor,
    psi_q: &Tensor,
    psi_k: &Tensor,
    v: &Tensor,
    bounds: &[usize],
    dtype: DType,
    dev: &Device,
) -> (Tensor, Tensor, Tensor) {
    let (b, h, _n, d) = q.dims4().unwrap();
    let mut s = Tensor::zeros((b, h, d, d), dtype, dev).unwrap();
    let mut z = Tensor::zeros((b, h, d), dtype, dev).unwrap();
    let mut outs = Vec::new();
    for w in bounds.windows(2) {
        let (begin, len) = (w[0], w[1] - w[0]);
        let vc = v.narrow(2, begin, len).unwrap();
        // S[a, b] += Σ_m v[m, a] ψk[m, b];  z += Σ_m φk[m]
        let s_loc = vc.transpose(2, 3).unwrap().contiguous().unwrap().matmul(&psi_k.narrow(2, begin, len).unwrap().contiguous().unwrap()).unwrap();
        s = (s + s_loc).unwrap();
        z = (z + phi_k.narrow(2, begin, len).unwrap().sum(2).unwrap()).unwrap();
        let num = psi_q.narrow(2, begin, len).unwrap().contiguous().unwrap().matmul(&s.transpose(2, 3).unwrap().contiguous().unwrap()).unwrap();
        let den = phi_q.narrow(2, begin, len).unwrap().contiguous().unwrap().matmul(&z.unsqueeze(3).unwrap()).unwrap();
        let den = (den + EPS).unwrap();
        outs.push(num.broadcast_div(&den).unwrap());
    }
    (Tensor::cat(&outs, 2).unwrap(), s, z)
}

struct Errors {
    max_abs: f64,
    rel_l2: f64,
}

fn errors(x: &Tensor, reference: &Tensor) -> Errors {
    let x = x.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let diff = (x - reference).unwrap();
    let max_abs = diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let num = diff.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let den = reference.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    Errors { max_abs, rel_l2: num / den.max(1e-300) }
}

fn count_nan(t: &Tensor) -> usize {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    t.iter().filter(|x| !x.is_finite()).count()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    b: usize,
    h: usize,
    n: usize,
    d: usize,
    dtype: DType,
    rope: bool,
    /// Chunk length for the chunk-causal form; None = bidirectional.
    chunk: Option<usize>,
    split: bool,
    config: OutConfig,
}

/// Runs one case against the f64 reference and the naive low-precision version; panics on failure.
fn check(case: Case) {
    let dev = gpu();
    let Case { b, h, n, d, dtype, rope, chunk, split, .. } = case;
    let q = input((b, h, n, d), dtype, 1.0, &dev);
    let k = input((b, h, n, d), dtype, 1.0, &dev);
    let v = input((b, h, n, d), dtype, 2.0, &dev);
    let tables = rope.then(|| rope_tables(n, d, &dev));
    let chunk_len = chunk.unwrap_or(n);

    linear::set_poison_outputs(true);
    let opts = KernelOptions { split_state: split, out_config: case.config, ..KernelOptions::new(EPS) };
    let (out, state) = linear::run(&q, &k, &v, tables.as_ref(), None, chunk_len, &opts).expect("kernel");
    assert_eq!(out.dims(), &[b, h, n, d]);
    assert_eq!(out.dtype(), dtype);
    assert_eq!(count_nan(&out), 0, "{case:?}: unwritten or non-finite outputs");

    let cpu = Device::Cpu;
    let (reference, s_ref, z_ref) = closed_form(&q, &k, &v, tables.as_ref(), chunk_len, DType::F64, &cpu);
    let (naive, _, _) = closed_form(&q, &k, &v, tables.as_ref(), chunk_len, dtype, &dev);
    let ours = errors(&out, &reference);
    let base = errors(&naive, &reference);
    println!(
        "{case:?}: max-abs {:.3e} (naive {:.3e}, ratio {:.2}), rel-L2 {:.3e} (naive {:.3e}, ratio {:.2})",
        ours.max_abs,
        base.max_abs,
        ours.max_abs / base.max_abs,
        ours.rel_l2,
        base.rel_l2,
        ours.rel_l2 / base.rel_l2
    );
    assert!(ours.max_abs <= 2.0 * base.max_abs + 1e-6, "{case:?}: max-abs error {} > 2 x naive {}", ours.max_abs, base.max_abs);
    assert!(ours.rel_l2 <= 2.0 * base.rel_l2, "{case:?}: rel-L2 error {} > 2 x naive {}", ours.rel_l2, base.rel_l2);

    // The state is fp32 sums of exact products: close to the f64 sums. In the RoPE form the
    // rotated keys are rounded to the element type before the tensor-core product (as in the
    // naive version), so S is only as close as that rounding (2^-8 for bf16); z is never rotated.
    let s_err = errors(&state.kv, &s_ref).rel_l2;
    let z_err = errors(&state.k_sum, &z_ref).rel_l2;
    let s_bound = if rope { 1.0 / 256.0 } else { 1e-5 };
    assert!(s_err < s_bound && z_err < 1e-5, "{case:?}: state rel-L2 S {s_err:.3e}, z {z_err:.3e}");
}

#[test]
fn bidirectional_all_head_dims_and_dtypes() {
    for dtype in [DType::BF16, DType::F16] {
        for d in linear::HEAD_DIMS {
            for (b, h, n) in [(1, 1, 1), (1, 2, 7), (2, 3, 64), (1, 2, 65), (2, 2, 1000)] {
                check(Case { b, h, n, d, dtype, rope: false, chunk: None, split: true, config: OutConfig::V2 });
            }
        }
    }
}

#[test]
fn long_sequences_split_over_many_blocks() {
    // Enough tokens that each head is spread over many blocks (grid.y > 1), ragged at the end.
    for (b, h, n, d) in [(1, 2, 9001, 128), (1, 3, 5003, 112), (2, 1, 4099, 64), (1, 1, 20000, 32)] {
        check(Case { b, h, n, d, dtype: DType::BF16, rope: false, chunk: None, split: true, config: OutConfig::V2 });
    }
    check(Case { b: 1, h: 2, n: 6007, d: 128, dtype: DType::F16, rope: false, chunk: None, split: true, config: OutConfig::V2 });
}

#[test]
fn many_heads_few_tokens() {
    // More heads than the grid has slots: each head one block.
    check(Case { b: 4, h: 70, n: 100, d: 32, dtype: DType::BF16, rope: false, chunk: None, split: true, config: OutConfig::V2 });
}

#[test]
fn single_rounded_state_variant() {
    for d in linear::HEAD_DIMS {
        check(Case { b: 1, h: 2, n: 3001, d, dtype: DType::BF16, rope: false, chunk: None, split: false, config: OutConfig::V2 });
        check(Case { b: 1, h: 2, n: 777, d, dtype: DType::F16, rope: false, chunk: None, split: false, config: OutConfig::V2 });
    }
}

#[test]
fn first_output_config() {
    // The v1 output kernel (kept for the bench) computes the same function.
    for (n, d) in [(3001, 128), (1000, 112), (65, 64)] {
        check(Case { b: 1, h: 3, n, d, dtype: DType::BF16, rope: false, chunk: None, split: true, config: OutConfig::V1 });
    }
}

#[test]
fn third_output_config() {
    // v3: the denominator on the tensor cores.
    for dtype in [DType::BF16, DType::F16] {
        for d in linear::HEAD_DIMS {
            for (n, split) in [(3001, true), (65, true), (1000, false)] {
                check(Case { b: 1, h: 3, n, d, dtype, rope: false, chunk: None, split, config: OutConfig::V3 });
            }
        }
    }
    check(Case { b: 1, h: 2, n: 6007, d: 128, dtype: DType::F16, rope: false, chunk: None, split: true, config: OutConfig::V3 });
    check(Case { b: 1, h: 2, n: 1000, d: 64, dtype: DType::BF16, rope: false, chunk: Some(300), split: true, config: OutConfig::V3 });
    // RoPE calls fall back to v2.
    check(Case { b: 1, h: 2, n: 500, d: 112, dtype: DType::BF16, rope: true, chunk: None, split: true, config: OutConfig::V3 });
}

#[test]
fn rope_numerator() {
    for dtype in [DType::BF16, DType::F16] {
        for d in linear::HEAD_DIMS {
            check(Case { b: 1, h: 2, n: 1203, d, dtype, rope: true, chunk: None, split: true, config: OutConfig::V2 });
        }
    }
    check(Case { b: 1, h: 2, n: 7000, d: 112, dtype: DType::BF16, rope: true, chunk: None, split: true, config: OutConfig::V2 });
}

#[test]
fn chunk_causal() {
    for (n, chunk, d, rope) in [(1000, 300, 112, true), (1000, 300, 64, false), (640, 64, 128, false), (130, 1, 32, false), (2000, 999, 112, true)] {
        check(Case { b: 1, h: 2, n, d, dtype: DType::BF16, rope, chunk: Some(chunk), split: true, config: OutConfig::V2 });
    }
    check(Case { b: 2, h: 1, n: 500, d: 64, dtype: DType::F16, rope: true, chunk: Some(128), split: true, config: OutConfig::V2 });
}

#[test]
fn chunk_boundaries_longsana_style() {
    // 21 frames of 40 tokens in chunks [0, 11, 21) frames: the first chunk absorbs the remainder.
    let dev = gpu();
    let (b, h, d, per_frame) = (1, 2, 112, 40);
    let n = 21 * per_frame;
    let bounds = [0, 11 * per_frame, n];
    let q = input((b, h, n, d), DType::BF16, 1.0, &dev);
    let k = input((b, h, n, d), DType::BF16, 1.0, &dev);
    let v = input((b, h, n, d), DType::BF16, 2.0, &dev);
    let rope = rope_tables(n, d, &dev);
    linear::set_poison_outputs(true);
    let (out, _) = linear::forward_chunked(&q, &k, &v, Some(&rope), &bounds, EPS).unwrap();
    assert_eq!(count_nan(&out), 0);
    let feats = |dtype: DType, on: &Device| {
        let cast = |t: &Tensor| t.to_device(on).unwrap().to_dtype(dtype).unwrap();
        let (q, k, v) = (cast(&q), cast(&k), cast(&v));
        let (pq, pk) = (q.relu().unwrap(), k.relu().unwrap());
        let (sq, sk) = (rotate(&pq, &rope), rotate(&pk, &rope));
        closed_form_bounds(&q, &pq, &pk, &sq, &sk, &v, &bounds, dtype, on).0
    };
    let reference = feats(DType::F64, &Device::Cpu);
    let naive = feats(DType::BF16, &dev);
    let (ours, base) = (errors(&out, &reference), errors(&naive, &reference));
    println!("longsana bounds: max-abs {:.3e} (naive {:.3e}), rel-L2 {:.3e} (naive {:.3e})", ours.max_abs, base.max_abs, ours.rel_l2, base.rel_l2);
    assert!(ours.max_abs <= 2.0 * base.max_abs + 1e-6 && ours.rel_l2 <= 2.0 * base.rel_l2);
    assert!(linear::forward_chunked(&q, &k, &v, None, &[0, 500, 400, n], EPS).is_err(), "boundaries must rise");
    assert!(linear::forward_chunked(&q, &k, &v, None, &[0, 500], EPS).is_err(), "boundaries must end at N");
}

#[test]
fn state_carried_between_calls() {
    // Two forward_chunk calls, the second starting from the first's state, equal the
    // chunk-causal reference over both chunks; the returned state is the sum over both.
    let dev = gpu();
    let (b, h, d) = (1, 3, 112);
    let (n1, n2) = (700, 333);
    let mk = |n: usize, s: f64| input((b, h, n, d), DType::BF16, s, &dev);
    let (q1, k1, v1) = (mk(n1, 1.0), mk(n1, 1.0), mk(n1, 2.0));
    let (q2, k2, v2) = (mk(n2, 1.0), mk(n2, 1.0), mk(n2, 2.0));
    let rope = rope_tables(n1 + n2, d, &dev);
    let rope1 = Rope { cos: rope.cos.narrow(0, 0, n1).unwrap(), sin: rope.sin.narrow(0, 0, n1).unwrap() };
    let rope2 = Rope { cos: rope.cos.narrow(0, n1, n2).unwrap(), sin: rope.sin.narrow(0, n1, n2).unwrap() };

    linear::set_poison_outputs(true);
    let (o1, s1) = linear::forward_chunk(&q1, &k1, &v1, Some(&rope1), None, EPS).unwrap();
    let (o2, s2) = linear::forward_chunk(&q2, &k2, &v2, Some(&rope2), Some(&s1), EPS).unwrap();
    let out = Tensor::cat(&[&o1, &o2], 2).unwrap();
    assert_eq!(count_nan(&out), 0);

    let cat = |a: &Tensor, b2: &Tensor| Tensor::cat(&[a, b2], 2).unwrap();
    let (q, k, v) = (cat(&q1, &q2), cat(&k1, &k2), cat(&v1, &v2));
    // Chunk boundaries at n1: chunk length n1 then the rest (n2 < n1).
    let (reference, s_ref, z_ref) = closed_form(&q, &k, &v, Some(&rope), n1, DType::F64, &Device::Cpu);
    let (naive, _, _) = closed_form(&q, &k, &v, Some(&rope), n1, DType::BF16, &dev);
    let (ours, base) = (errors(&out, &reference), errors(&naive, &reference));
    println!("state carry: max-abs {:.3e} (naive {:.3e}), rel-L2 {:.3e} (naive {:.3e})", ours.max_abs, base.max_abs, ours.rel_l2, base.rel_l2);
    assert!(ours.max_abs <= 2.0 * base.max_abs + 1e-6 && ours.rel_l2 <= 2.0 * base.rel_l2);
    // RoPE form: S carries the rounding of the rotated keys (see `check`).
    assert!(errors(&s2.kv, &s_ref).rel_l2 < 1.0 / 256.0 && errors(&s2.k_sum, &z_ref).rel_l2 < 1e-5);

    // Starting from an explicit zero state is the same as starting from none.
    let zero = LinearState {
        kv: Tensor::zeros((b, h, d, d), DType::F32, &dev).unwrap(),
        k_sum: Tensor::zeros((b, h, d), DType::F32, &dev).unwrap(),
    };
    let (o1z, _) = linear::forward_chunk(&q1, &k1, &v1, Some(&rope1), Some(&zero), EPS).unwrap();
    let same = (o1z.to_dtype(DType::F32).unwrap() - o1.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(same.to_scalar::<f32>().unwrap() < 1e-2);
}

#[test]
fn strided_inputs_are_accepted() {
    // q, k, v as transposed views of (B, N, H, D) activations, as the attention layers make them.
    let dev = gpu();
    let (b, h, n, d) = (2, 4, 333, 64);
    let mk = |s: f64| input((b, n, h, d), DType::BF16, s, &dev).transpose(1, 2).unwrap();
    let (q, k, v) = (mk(1.0), mk(1.0), mk(2.0));
    assert!(!q.is_contiguous());
    let out = linear::forward(&q, &k, &v, None, EPS).unwrap();
    let (reference, _, _) = closed_form(&q, &k, &v, None, n, DType::F64, &Device::Cpu);
    let (naive, _, _) = closed_form(&q, &k, &v, None, n, DType::BF16, &dev);
    assert!(errors(&out, &reference).max_abs <= 2.0 * errors(&naive, &reference).max_abs + 1e-6);
}

#[test]
fn bad_inputs_are_refused() {
    let dev = gpu();
    let x = input((1, 2, 10, 48), DType::BF16, 1.0, &dev);
    assert!(linear::forward(&x, &x, &x, None, EPS).is_err(), "head dim 48 has no kernel");
    let x = input((1, 2, 10, 64), DType::F32, 1.0, &dev);
    assert!(linear::forward(&x, &x, &x, None, EPS).is_err(), "f32 has no kernel");
    let q = input((1, 2, 10, 64), DType::BF16, 1.0, &dev);
    let k = input((1, 2, 11, 64), DType::BF16, 1.0, &dev);
    assert!(linear::forward(&q, &k, &k, None, EPS).is_err(), "q and k lengths differ");
    let x = input((1, 2, 10, 64), DType::BF16, 1.0, &Device::Cpu);
    assert!(linear::forward(&x, &x, &x, None, EPS).is_err(), "CPU tensors");
}

/// `gen bench` on CUDA (GPU, copy and matmul ceilings, the linear cases). Ignored by default.
#[test]
#[ignore]
fn bench() {
    let iters = std::env::var("BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let case = std::env::var("BENCH_CASE").ok();
    visgen::bench::run(&visgen::bench::BenchOptions { device: "cuda".into(), case, iters, baseline: None }).unwrap();
}
