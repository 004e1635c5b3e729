//! Parity of the dense flash-attention CUDA kernel (src/attention/cuda/dense.rs) on the GPU.
//!
//! Reference: softmax(q kᵀ·scale + mask) v with plain candle ops in f32 on the CPU, from the same
//! bf16/f16 inputs. Rule (flash-attention's): the kernel's error against that reference is at most
//! twice the error of a naive low-precision implementation (the same ops in bf16/f16 on the GPU),
//! plus a small floor. The log-sum-exp is checked against the f32 reference. Outputs are filled
//! with NaN before every launch; fresh random inputs for every case.
//!
//! Run on the H200: `cargo test --release --features cuda --test cuda_dense`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, IndexOp, Tensor, D};
use visgen::attention::cuda::dense;

/// Outputs filled with NaN bytes before the launch: an element the kernel fails to write shows.
const POISONED: dense::KernelOptions = dense::KernelOptions { kernel: dense::DenseKernel::Wgmma, poison: true };

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

#[derive(Debug, Clone, Copy)]
struct Case {
    b: usize,
    h: usize,
    nq: usize,
    nk: usize,
    ne: usize,
    d: usize,
    mask: bool,
    dtype: DType,
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    extra: Option<(Tensor, Tensor)>,
    /// (B, Nk) u8, or None
    mask: Option<Tensor>,
}

fn random_inputs(c: &Case, dev: &Device) -> Inputs {
    // curand refuses to fill zero elements: an empty key sequence is made with zeros.
    let rnd = |n: usize| match n {
        0 => Tensor::zeros((c.b, c.h, 0, c.d), c.dtype, dev).unwrap(),
        _ => Tensor::randn(0f32, 1.0, (c.b, c.h, n, c.d), dev).unwrap().to_dtype(c.dtype).unwrap(),
    };
    let extra = (c.ne > 0).then(|| (rnd(c.ne), rnd(c.ne)));
    let mask = c.mask.then(|| {
        // Keep each key with probability ~0.7; key 0 is always kept so no row is fully masked.
        let u = Tensor::rand(0f32, 1.0, (c.b, c.nk), dev).unwrap();
        let keep = u.lt(0.7).unwrap();
        let first = Tensor::ones((c.b, 1), DType::U8, dev).unwrap();
        if c.nk > 1 {
            Tensor::cat(&[&first, &keep.narrow(1, 1, c.nk - 1).unwrap()], 1).unwrap()
        } else {
            first
        }
    });
    Inputs { q: rnd(c.nq), k: rnd(c.nk), v: rnd(c.nk), extra, mask }
}

/// softmax(q kᵀ·scale + bias) v and the row log-sum-exp, with plain tensor ops in `x`'s dtype on
/// `x`'s device; keys of `extra` are concatenated after k.
fn naive(inp: &Inputs, scale: f64, dtype: DType, dev: &Device) -> (Tensor, Tensor) {
    let cast = |t: &Tensor| t.to_device(dev).unwrap().to_dtype(dtype).unwrap();
    let (q, mut k, mut v) = (cast(&inp.q), cast(&inp.k), cast(&inp.v));
    let (b, _, _, _) = q.dims4().unwrap();
    let nk = k.dim(2).unwrap();
    // The key mask is assembled on the CPU: candle's CUDA fill and concatenation kernels refuse
    // zero-sized launches (the case of no main keys, only extra ones).
    let mut keep = match &inp.mask {
        Some(m) => m.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap(),
        None => Tensor::ones((b, nk), DType::F32, &Device::Cpu).unwrap(),
    };
    if let Some((k2, v2)) = &inp.extra {
        let ne = k2.dim(2).unwrap();
        if nk == 0 {
            (k, v) = (cast(k2), cast(v2));
        } else {
            k = Tensor::cat(&[&k, &cast(k2)], 2).unwrap();
            v = Tensor::cat(&[&v, &cast(v2)], 2).unwrap();
        }
        keep = Tensor::cat(&[&keep, &Tensor::ones((b, ne), DType::F32, &Device::Cpu).unwrap()], 1).unwrap();
    }
    let keep = keep.to_device(dev).unwrap();
    let n_all = keep.dim(1).unwrap();
    // additive bias: 0 where kept, -inf where masked; (B, 1, 1, N)
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (b, n_all), dev).unwrap();
    let bias = keep.ne(0.0).unwrap().where_cond(&keep.zeros_like().unwrap(), &neg_inf).unwrap();
    let bias = bias.reshape((b, 1, 1, n_all)).unwrap().to_dtype(dtype).unwrap();
    let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
    let s = s.broadcast_add(&bias).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
    let o = p.matmul(&v).unwrap();
    let s32 = s.to_dtype(DType::F32).unwrap();
    let mx = s32.max_keepdim(D::Minus1).unwrap();
    let lse = (s32.broadcast_sub(&mx).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap() + mx)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap();
    (o, lse)
}

fn to_cpu_f32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

/// (max abs error, relative L2 error) of `x` against `r`.
fn errors(x: &Tensor, r: &Tensor) -> (f32, f32) {
    let diff = (x - r).unwrap();
    let max = diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let num = diff.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    let den = r.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    (max, (num / den.max(1e-30)).sqrt())
}

fn count_nan(t: &Tensor) -> usize {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|x| !x.is_finite()).count()
}

/// Runs one case; `Err` describes the failure (so that a test reports every failing case).
fn check(c: Case) -> Result<(), String> {
    let dev = gpu();
    let inp = random_inputs(&c, &dev);
    let scale = 1.0 / (c.d as f64).sqrt();
    let extra = inp.extra.as_ref().map(|(k, v)| (k, v));
    let run = |opts| dense::forward_with(&inp.q, &inp.k, &inp.v, inp.mask.as_ref(), extra, scale, &opts).unwrap();
    let (o, lse) = run(POISONED);
    // The same call again must give the same bits: a difference is a race in the kernel.
    let (o2, _) = run(POISONED);
    // The earlier mma.sync kernel, kept to compare against: the same error rule.
    let (o_mma, _) = run(dense::KernelOptions { kernel: dense::DenseKernel::MmaSync, ..POISONED });
    let o_mma = to_cpu_f32(&o_mma);
    let rerun_diff = errors(&to_cpu_f32(&o), &to_cpu_f32(&o2)).0;
    assert_eq!(o.dims(), [c.b, c.h, c.nq, c.d]);
    assert_eq!(o.dtype(), c.dtype);
    assert_eq!(lse.dims(), [c.b, c.h, c.nq]);
    let (o, lse) = (to_cpu_f32(&o), to_cpu_f32(&lse));
    if count_nan(&o) + count_nan(&lse) > 0 {
        return Err(format!("{c:?}: non-finite outputs"));
    }

    let (o_ref, lse_ref) = naive(&inp, scale, DType::F32, &Device::Cpu);
    let (o_low, _) = naive(&inp, scale, c.dtype, &dev);
    let o_low = to_cpu_f32(&o_low);
    let (max_ours, rel_ours) = errors(&o, &o_ref);
    let (max_low, rel_low) = errors(&o_low, &o_ref);
    let (max_mma, rel_mma) = errors(&o_mma, &o_ref);
    if count_nan(&o_mma) > 0 || max_mma > 2.0 * max_low + 1e-5 || rel_mma > 2.0 * rel_low + 1e-6 {
        return Err(format!("{c:?}: mma.sync kernel error max {max_mma} rel {rel_mma} > 2 x naive (max {max_low}, rel {rel_low})"));
    }
    let (lse_err, _) = errors(&lse, &lse_ref);
    println!(
        "{:?} B{} H{} Nq{} Nk{} Ne{} D{} mask {}: max {max_ours:.2e} (naive {max_low:.2e}) rel {rel_ours:.2e} (naive {rel_low:.2e}) lse {lse_err:.1e} rerun {rerun_diff:.1e}",
        c.dtype, c.b, c.h, c.nq, c.nk, c.ne, c.d, c.mask
    );
    if rerun_diff != 0.0 {
        return Err(format!("{c:?}: two runs on the same inputs differ by {rerun_diff}"));
    }
    if max_ours > 2.0 * max_low + 1e-5 || rel_ours > 2.0 * rel_low + 1e-6 {
        return Err(format!("{c:?}: error max {max_ours} rel {rel_ours} > 2 x naive (max {max_low}, rel {rel_low})"));
    }
    if lse_err > 1e-3 {
        return Err(format!("{c:?}: lse error {lse_err}"));
    }
    Ok(())
}

/// Runs every case, then fails with the list of the failing ones.
fn check_all(cases: impl IntoIterator<Item = Case>) {
    let failures: Vec<String> = cases.into_iter().filter_map(|c| check(c).err()).collect();
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

fn case(b: usize, h: usize, nq: usize, nk: usize, ne: usize, d: usize, mask: bool, dtype: DType) -> Case {
    Case { b, h, nq, nk, ne, d, mask, dtype }
}

#[test]
fn every_head_dim_ragged_lengths() {
    let mut cases = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        for (i, d) in dense::HEAD_DIMS.into_iter().enumerate() {
            // lengths that are not multiples of the query / key tiles, Nq != Nk
            cases.push(case(1 + i % 2, 3, 131 + 57 * i, 77 + 91 * i, 0, d, false, dtype));
            cases.push(case(2, 2, 256, 256, 0, d, false, dtype));
        }
    }
    check_all(cases);
}

#[test]
fn key_padding_mask() {
    let mut cases = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        for d in dense::HEAD_DIMS {
            cases.push(case(3, 2, 200, 150, 0, d, true, dtype));
        }
    }
    check_all(cases);
}

#[test]
fn extra_tokens_with_and_without_mask() {
    let mut cases = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        for d in dense::HEAD_DIMS {
            cases.push(case(2, 2, 190, 300, 45, d, false, dtype));
            cases.push(case(2, 2, 129, 31, 77, d, true, dtype));
            cases.push(case(1, 2, 190, 300, 45, d, false, dtype));
        }
        // only extra tokens, no main keys
        cases.push(case(1, 2, 100, 0, 70, 128, false, dtype));
    }
    check_all(cases);
}

#[test]
fn tiny_and_long() {
    check_all([
        case(1, 1, 1, 1, 0, 64, false, DType::BF16),
        case(1, 1, 17, 5, 0, 128, true, DType::BF16),
        case(1, 2, 1000, 2100, 0, 112, false, DType::BF16),
        case(1, 1, 333, 4099, 0, 72, true, DType::F16),
    ]);
}

#[test]
fn strided_inputs_match_contiguous() {
    // q, k, v as (B, H, N, D) views of (B, N, H, D) tensors, as a model's projections produce them.
    let dev = gpu();
    let (b, h, n, d) = (2, 3, 150, 96);
    let mk = || Tensor::randn(0f32, 1.0, (b, n, h, d), &dev).unwrap().to_dtype(DType::BF16).unwrap().transpose(1, 2).unwrap();
    let (q, k, v) = (mk(), mk(), mk());
    assert!(!q.is_contiguous());
    let scale = 0.1;
    let (o1, l1) = dense::forward_with(&q, &k, &v, None, None, scale, &POISONED).unwrap();
    let (q2, k2, v2) = (q.contiguous().unwrap(), k.contiguous().unwrap(), v.contiguous().unwrap());
    let (o2, l2) = dense::forward_with(&q2, &k2, &v2, None, None, scale, &POISONED).unwrap();
    // Same inputs, same kernel, same order of operations: bit-identical.
    assert_eq!(errors(&to_cpu_f32(&o1), &to_cpu_f32(&o2)).0, 0.0);
    assert_eq!(errors(&to_cpu_f32(&l1), &to_cpu_f32(&l2)).0, 0.0);
}

#[test]
fn fully_masked_rows_give_zero_and_minus_inf() {
    let dev = gpu();
    let (b, h, nq, nk, d) = (2, 2, 70, 40, 64);
    let mk = |n| Tensor::randn(0f32, 1.0, (b, h, n, d), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let (q, k, v) = (mk(nq), mk(nk), mk(nk));
    // batch 0: all keys masked (f32 mask, 0 = masked); batch 1: all kept
    let mask = Tensor::cat(&[&Tensor::zeros((1, nk), DType::F32, &dev).unwrap(), &Tensor::ones((1, nk), DType::F32, &dev).unwrap()], 0).unwrap();
    let (o, lse) = dense::forward_with(&q, &k, &v, Some(&mask), None, 0.125, &POISONED).unwrap();
    let o0 = to_cpu_f32(&o.i(0).unwrap());
    let lse0 = to_cpu_f32(&lse.i(0).unwrap()).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(o0.abs().unwrap().max_keepdim(D::Minus1).unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    assert!(lse0.iter().all(|&x| x == f32::NEG_INFINITY));
    assert_eq!(count_nan(&to_cpu_f32(&o.i(1).unwrap())), 0);
    assert_eq!(count_nan(&to_cpu_f32(&lse.i(1).unwrap())), 0);
}

#[test]
fn unsupported_inputs_are_errors() {
    let dev = gpu();
    let t = |d, dt| Tensor::zeros((1, 1, 8, d), dt, &dev).unwrap();
    assert!(dense::forward(&t(80, DType::BF16), &t(80, DType::BF16), &t(80, DType::BF16), None, None, 1.0).is_err());
    assert!(dense::forward(&t(64, DType::F32), &t(64, DType::F32), &t(64, DType::F32), None, None, 1.0).is_err());
    let bad_mask = Tensor::ones((1, 7), DType::U8, &dev).unwrap();
    assert!(dense::forward(&t(64, DType::BF16), &t(64, DType::BF16), &t(64, DType::BF16), Some(&bad_mask), None, 1.0).is_err());
}
