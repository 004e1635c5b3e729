//! Dense and linear attention references against naive f64 loops written here from the definitions
//! (sana.md §1.4, §2.2, §2.3 for linear attention), plus the dispatching `forward`s and `check`s.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use visgen::attention::{
    dense, linear, merge_partials, AttentionInput, DenseParams, LayerShape, LinearParams, LinearState, Role, Rope,
};

type R = anyhow::Result<()>;

// ---------------------------------------------------------------------------------------------
// Helpers: random tensors, flat f64 views, comparison.
// ---------------------------------------------------------------------------------------------

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform in [-1, 1).
fn rand_tensor(rng: &mut StdRng, shape: &[usize]) -> anyhow::Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn flat(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// A (B, H, N, D) tensor as nested f64 vectors `x[b][h][n][d]`.
fn nested(t: &Tensor) -> anyhow::Result<Vec<Vec<Vec<Vec<f64>>>>> {
    let (b, h, n, d) = t.dims4()?;
    let v = flat(t)?;
    Ok((0..b)
        .map(|ib| {
            (0..h)
                .map(|ih| (0..n).map(|i| v[((ib * h + ih) * n + i) * d..][..d].to_vec()).collect())
                .collect()
        })
        .collect())
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() { g == w } else { (g - w).abs() <= tol * (1.0 + w.abs()) };
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn relu(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v.max(0.0)).collect()
}

fn layer(role: Role, head_dim: usize, grid: Option<Vec<usize>>, key_mask: bool) -> LayerShape {
    LayerShape { role, head_dim, grid, key_mask, dtype: DType::F32, device: Device::Cpu }
}

// ---------------------------------------------------------------------------------------------
// Dense: naive softmax attention.
// ---------------------------------------------------------------------------------------------

/// Naive softmax attention with max subtraction. `mask[b][j]` for the main keys; extra keys are
/// always attended. Returns (out, lse) flattened in (B, H, Nq, D) / (B, H, Nq) order.
fn naive_dense(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&[Vec<bool>]>,
    extra: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (q, k, v) = (nested(q)?, nested(k)?, nested(v)?);
    let (ek, ev) = match extra {
        Some((a, b)) => (Some(nested(a)?), Some(nested(b)?)),
        None => (None, None),
    };
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for b in 0..q.len() {
        for h in 0..q[b].len() {
            // (key, value) pairs this batch attends.
            let mut keys: Vec<(&Vec<f64>, &Vec<f64>)> = Vec::new();
            for j in 0..k[b][h].len() {
                if mask.map_or(true, |m| m[b][j]) {
                    keys.push((&k[b][h][j], &v[b][h][j]));
                }
            }
            if let (Some(ek), Some(ev)) = (&ek, &ev) {
                for j in 0..ek[b][h].len() {
                    keys.push((&ek[b][h][j], &ev[b][h][j]));
                }
            }
            for qi in &q[b][h] {
                let d = qi.len();
                if keys.is_empty() {
                    out.extend(vec![0.0; d]);
                    lse.push(f64::NEG_INFINITY);
                    continue;
                }
                let logits: Vec<f64> = keys.iter().map(|(kj, _)| dot(qi, kj) * scale).collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let s: f64 = w.iter().sum();
                for a in 0..d {
                    out.push(keys.iter().zip(&w).map(|((_, vj), wj)| wj * vj[a]).sum::<f64>() / s);
                }
                lse.push(m + s.ln());
            }
        }
    }
    Ok((out, lse))
}

fn mask_tensor(mask: &[Vec<bool>]) -> anyhow::Result<Tensor> {
    let (b, n) = (mask.len(), mask[0].len());
    let data: Vec<f32> = mask.iter().flatten().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(data, (b, n), &Device::Cpu)?)
}

#[test]
fn dense_matches_naive_over_head_dims() -> R {
    let mut r = rng(1);
    for &d in &[8usize, 64, 72, 112, 128] {
        let (b, h, nq, nk) = (2, 3, 5, 7);
        let q = rand_tensor(&mut r, &[b, h, nq, d])?;
        let k = rand_tensor(&mut r, &[b, h, nk, d])?;
        let v = rand_tensor(&mut r, &[b, h, nk, d])?;
        // A larger scale than 1/sqrt(d) too, so the softmax is peaked and the max shift matters.
        for scale in [1.0 / (d as f64).sqrt(), 2.0] {
            let (out, lse) = dense::reference(&q, &k, &v, None, None, scale)?;
            assert_eq!(out.dims(), &[b, h, nq, d]);
            assert_eq!(lse.dims(), &[b, h, nq]);
            let (want_out, want_lse) = naive_dense(&q, &k, &v, None, None, scale)?;
            assert_close(&flat(&out)?, &want_out, 1e-5, &format!("out d={d} scale={scale}"));
            assert_close(&flat(&lse)?, &want_lse, 1e-5, &format!("lse d={d} scale={scale}"));
        }
    }
    Ok(())
}

#[test]
fn dense_masks_including_a_fully_masked_batch() -> R {
    let mut r = rng(2);
    let (b, h, nq, nk, d) = (3, 2, 4, 6, 16);
    let q = rand_tensor(&mut r, &[b, h, nq, d])?;
    let k = rand_tensor(&mut r, &[b, h, nk, d])?;
    let v = rand_tensor(&mut r, &[b, h, nk, d])?;
    let mask = vec![
        vec![true, true, false, true, false, false],
        vec![false; nk], // every key of batch 1 masked: its rows attend nothing
        vec![false, false, false, false, false, true],
    ];
    let scale = 0.3;
    let (out, lse) = dense::reference(&q, &k, &v, Some(&mask_tensor(&mask)?), None, scale)?;
    let (want_out, want_lse) = naive_dense(&q, &k, &v, Some(&mask), None, scale)?;
    let (got_out, got_lse) = (flat(&out)?, flat(&lse)?);
    assert!(got_out.iter().all(|x| x.is_finite()), "no NaN/inf in the output");
    assert!(got_lse.iter().all(|x| !x.is_nan()), "no NaN in lse");
    assert_close(&got_out, &want_out, 1e-5, "masked out");
    assert_close(&got_lse, &want_lse, 1e-5, "masked lse");
    // The fully masked batch: output exactly 0, lse -inf.
    let out1 = flat(&out.narrow(0, 1, 1)?)?;
    assert!(out1.iter().all(|&x| x == 0.0));
    assert!(flat(&lse.narrow(0, 1, 1)?)?.iter().all(|&x| x == f64::NEG_INFINITY));

    // A mask of another dtype (u8) means the same; a mask of the wrong shape is an error.
    let mask_u8 = mask_tensor(&mask)?.to_dtype(DType::U8)?;
    let (out_u8, _) = dense::reference(&q, &k, &v, Some(&mask_u8), None, scale)?;
    assert_close(&flat(&out_u8)?, &want_out, 1e-5, "u8 mask");
    let wrong = Tensor::ones((b, nk + 1), DType::F32, &Device::Cpu)?;
    assert!(dense::reference(&q, &k, &v, Some(&wrong), None, scale).is_err());
    Ok(())
}

#[test]
fn dense_extra_tokens_equal_concatenated_keys() -> R {
    let mut r = rng(3);
    let (b, h, nq, nk, ne, d) = (2, 2, 5, 4, 3, 24);
    let q = rand_tensor(&mut r, &[b, h, nq, d])?;
    let k = rand_tensor(&mut r, &[b, h, nk, d])?;
    let v = rand_tensor(&mut r, &[b, h, nk, d])?;
    let ek = rand_tensor(&mut r, &[b, h, ne, d])?;
    let ev = rand_tensor(&mut r, &[b, h, ne, d])?;
    let scale = 0.25;

    let (out, lse) = dense::reference(&q, &k, &v, None, Some((&ek, &ev)), scale)?;
    let kc = Tensor::cat(&[&k, &ek], 2)?;
    let vc = Tensor::cat(&[&v, &ev], 2)?;
    let (out_cat, lse_cat) = dense::reference(&q, &kc, &vc, None, None, scale)?;
    assert_close(&flat(&out)?, &flat(&out_cat)?, 1e-6, "extra = concat (out)");
    assert_close(&flat(&lse)?, &flat(&lse_cat)?, 1e-6, "extra = concat (lse)");
    let (want_out, want_lse) = naive_dense(&q, &kc, &vc, None, None, scale)?;
    assert_close(&flat(&out)?, &want_out, 1e-5, "extra vs naive");
    assert_close(&flat(&lse)?, &want_lse, 1e-5, "extra lse vs naive");

    // The mask applies to the main keys only: with every main key of batch 0 masked, batch 0
    // attends the extra tokens alone.
    let mask = vec![vec![false; nk], vec![true, false, true, true]];
    let (out_m, lse_m) = dense::reference(&q, &k, &v, Some(&mask_tensor(&mask)?), Some((&ek, &ev)), scale)?;
    let (want_out, want_lse) = naive_dense(&q, &k, &v, Some(&mask), Some((&ek, &ev)), scale)?;
    assert_close(&flat(&out_m)?, &want_out, 1e-5, "masked + extra");
    assert_close(&flat(&lse_m)?, &want_lse, 1e-5, "masked + extra lse");
    let (only_extra, _) = dense::reference(&q.narrow(0, 0, 1)?, &ek.narrow(0, 0, 1)?, &ev.narrow(0, 0, 1)?, None, None, scale)?;
    assert_close(&flat(&out_m.narrow(0, 0, 1)?)?, &flat(&only_extra)?, 1e-6, "only extra");

    // Extra keys that do not match q are an error, not a panic.
    let bad = rand_tensor(&mut r, &[b, h, ne, d + 2])?;
    assert!(dense::reference(&q, &k, &v, None, Some((&bad, &bad)), scale).is_err());
    Ok(())
}

#[test]
fn dense_merge_partials_over_a_key_split_equals_one_call() -> R {
    let mut r = rng(4);
    let (b, h, nq, nk, d) = (2, 2, 6, 9, 32);
    let q = rand_tensor(&mut r, &[b, h, nq, d])?;
    let k = rand_tensor(&mut r, &[b, h, nk, d])?;
    let v = rand_tensor(&mut r, &[b, h, nk, d])?;
    let scale = 1.5;
    // Batch 1 has every key of the first part masked: that part has lse -inf there.
    let split = 4;
    let mask = vec![vec![true; nk], [vec![false; split], vec![true; nk - split]].concat()];
    let mask_t = mask_tensor(&mask)?;
    let (full_o, full_lse) = dense::reference(&q, &k, &v, Some(&mask_t), None, scale)?;
    let part = |start: usize, len: usize| {
        dense::reference(
            &q,
            &k.narrow(2, start, len).unwrap(),
            &v.narrow(2, start, len).unwrap(),
            Some(&mask_t.narrow(1, start, len).unwrap()),
            None,
            scale,
        )
    };
    let (o0, l0) = part(0, split)?;
    let (o1, l1) = part(split, nk - split)?;
    let (o, lse) = merge_partials(&o0, &l0, &o1, &l1)?;
    assert_close(&flat(&o)?, &flat(&full_o)?, 1e-5, "merged out");
    assert_close(&flat(&lse)?, &flat(&full_lse)?, 1e-5, "merged lse");
    Ok(())
}

#[test]
fn dense_forward_validates_scales_and_casts() -> R {
    let mut r = rng(5);
    let (b, h, nq, nk, d) = (1, 2, 3, 5, 72);
    let q = rand_tensor(&mut r, &[b, h, nq, d])?;
    let k = rand_tensor(&mut r, &[b, h, nk, d])?;
    let v = rand_tensor(&mut r, &[b, h, nk, d])?;
    // Default scale is head_dim^-0.5.
    let (out, lse) = dense::forward(&DenseParams::default(), &AttentionInput::new(&q, &k, &v))?;
    let (want_out, want_lse) = naive_dense(&q, &k, &v, None, None, 1.0 / (d as f64).sqrt())?;
    assert_close(&flat(&out)?, &want_out, 1e-5, "forward default scale");
    assert_close(&flat(&lse)?, &want_lse, 1e-5, "forward lse");
    // An explicit scale is used.
    let p = DenseParams { scale: Some(0.7) };
    let (out, _) = dense::forward(&p, &AttentionInput::new(&q, &k, &v))?;
    assert_close(&flat(&out)?, &naive_dense(&q, &k, &v, None, None, 0.7)?.0, 1e-5, "forward scale 0.7");
    // Half-precision inputs: output in q's dtype, lse f32, values close to the f32 result.
    for dt in [DType::F16, DType::BF16] {
        let (qh, kh, vh) = (q.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?);
        let (out, lse) = dense::forward(&p, &AttentionInput::new(&qh, &kh, &vh))?;
        assert_eq!(out.dtype(), dt);
        assert_eq!(lse.dtype(), DType::F32);
        let want = naive_dense(&qh, &kh, &vh, None, None, 0.7)?.0;
        assert_close(&flat(&out)?, &want, 2e-2, "half forward");
    }
    // Shape errors come back as errors.
    let k_bad = rand_tensor(&mut r, &[b, h, nk, d - 1])?;
    assert!(dense::forward(&p, &AttentionInput::new(&q, &k_bad, &k_bad)).is_err());
    assert!(dense::forward(&p, &AttentionInput::new(&q, &k, &q)).is_err());
    Ok(())
}

#[test]
fn dense_check_accepts_every_role_and_head_dim() {
    let p = DenseParams::default();
    for role in [Role::SelfAttention, Role::Cross, Role::Joint] {
        for d in [1usize, 8, 72, 112, 128, 256] {
            assert!(p.check(&layer(role, d, None, true)).is_ok());
            assert!(p.check(&layer(role, d, Some(vec![4, 4]), false)).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear: naive closed form.
// ---------------------------------------------------------------------------------------------

/// Rotary angles `theta[n][i]` for pair i of token n, and the (N, D) tables built from them.
fn rope_from_angles(theta: &[Vec<f64>]) -> anyhow::Result<Rope> {
    let n = theta.len();
    let d = 2 * theta[0].len();
    let rep = |f: fn(f64) -> f64| -> Vec<f32> {
        theta.iter().flat_map(|row| row.iter().flat_map(move |&t| [f(t) as f32, f(t) as f32])).collect()
    };
    Ok(Rope {
        cos: Tensor::from_vec(rep(f64::cos), (n, d), &Device::Cpu)?,
        sin: Tensor::from_vec(rep(f64::sin), (n, d), &Device::Cpu)?,
    })
}

fn random_angles(rng: &mut StdRng, n: usize, d: usize) -> Vec<Vec<f64>> {
    (0..n).map(|_| (0..d / 2).map(|_| rng.random_range(-3.0..3.0)).collect()).collect()
}

/// Explicit rotation of interleaved pairs by the angles of one token.
fn rotate(x: &[f64], theta: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (i, t) in theta.iter().enumerate() {
        let (e, o) = (x[2 * i], x[2 * i + 1]);
        out[2 * i] = e * t.cos() - o * t.sin();
        out[2 * i + 1] = e * t.sin() + o * t.cos();
    }
    out
}

/// Naive linear attention from the closed form. Query n attends key m when `visible(n, m)`.
/// `theta`: rotary angles per token (RoPE in the numerator only). Output flattened (B, H, N, D).
fn naive_linear(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    theta: Option<&[Vec<f64>]>,
    eps: f64,
    visible: &dyn Fn(usize, usize) -> bool,
) -> anyhow::Result<Vec<f64>> {
    let (q, k, v) = (nested(q)?, nested(k)?, nested(v)?);
    let rot = |x: &[f64], n: usize| match theta {
        Some(t) => rotate(x, &t[n]),
        None => x.to_vec(),
    };
    let mut out = Vec::new();
    for b in 0..q.len() {
        for h in 0..q[b].len() {
            for (n, qn) in q[b][h].iter().enumerate() {
                let pq = relu(qn);
                let pq_rot = rot(&pq, n);
                let d = v[b][h][0].len();
                let mut num = vec![0.0; d];
                let mut den = 0.0;
                for m in 0..k[b][h].len() {
                    if !visible(n, m) {
                        continue;
                    }
                    let pk = relu(&k[b][h][m]);
                    let w = dot(&rot(&pk, m), &pq_rot);
                    for a in 0..d {
                        num[a] += v[b][h][m][a] * w;
                    }
                    den += dot(&pk, &pq);
                }
                out.extend(num.iter().map(|x| x / (den + eps)));
            }
        }
    }
    Ok(out)
}

fn all_visible(_: usize, _: usize) -> bool {
    true
}

#[test]
fn linear_matches_naive() -> R {
    let mut r = rng(11);
    for &(d, nq, nk) in &[(4usize, 6usize, 6usize), (32, 9, 9), (112, 5, 5), (8, 4, 7)] {
        let (b, h) = (2, 3);
        let q = rand_tensor(&mut r, &[b, h, nq, d])?;
        let k = rand_tensor(&mut r, &[b, h, nk, d])?;
        let v = rand_tensor(&mut r, &[b, h, nk, d])?;
        for eps in [1e-15, 1e-8] {
            let out = linear::reference(&q, &k, &v, None, eps)?;
            assert_eq!(out.dims(), &[b, h, nq, d]);
            let want = naive_linear(&q, &k, &v, None, eps, &all_visible)?;
            assert_close(&flat(&out)?, &want, 1e-4, &format!("linear d={d} nq={nq} nk={nk}"));
        }
    }
    Ok(())
}

#[test]
fn linear_eps_and_zero_features() -> R {
    let dev = Device::Cpu;
    // Query 0 is all negative (φ(q) = 0): output exactly 0, no NaN.
    let q = Tensor::new(&[[[[-1.0f32, -2.0], [0.5, 0.25]]]], &dev)?;
    let k = Tensor::new(&[[[[0.3f32, 0.1], [0.2, 0.9]]]], &dev)?;
    let v = Tensor::new(&[[[[1.0f32, -2.0], [3.0, 4.0]]]], &dev)?;
    let out = flat(&linear::reference(&q, &k, &v, None, 1e-15)?)?;
    assert!(out.iter().all(|x| x.is_finite()));
    assert_eq!(&out[..2], &[0.0, 0.0]);
    assert_close(&out, &naive_linear(&q, &k, &v, None, 1e-15, &all_visible)?, 1e-5, "zero query");
    // Keys all negative (Σ φ(k) = 0): numerator and denominator are 0, eps keeps the output at 0.
    let k_neg = k.neg()?;
    let out = flat(&linear::reference(&q, &k_neg, &v, None, 1e-15)?)?;
    assert!(out.iter().all(|&x| x == 0.0));

    // A tiny denominator: φ(q)·φ(k) = 1e-12. With eps 1e-15 the output is ≈ v, with eps 1e-8 it is
    // ≈ 1e-4 v: eps is really added to the denominator.
    let q = Tensor::new(&[[[[1e-6f32, 0.0]]]], &dev)?;
    let k = Tensor::new(&[[[[1e-6f32, -1.0]]]], &dev)?;
    let v = Tensor::new(&[[[[1.0f32, 2.0]]]], &dev)?;
    for eps in [1e-15, 1e-8] {
        let got = flat(&linear::reference(&q, &k, &v, None, eps)?)?;
        let want = naive_linear(&q, &k, &v, None, eps, &all_visible)?;
        assert_close(&got, &want, 1e-3, &format!("tiny denominator eps={eps}"));
    }
    let small = flat(&linear::reference(&q, &k, &v, None, 1e-15)?)?;
    let big = flat(&linear::reference(&q, &k, &v, None, 1e-8)?)?;
    assert!(small[0] > 0.99 && big[0] < 1e-3, "eps must matter: {small:?} vs {big:?}");
    Ok(())
}

#[test]
fn linear_rope_matches_naive_rotation() -> R {
    let mut r = rng(12);
    for &d in &[4usize, 12, 112] {
        let (b, h, n) = (2, 2, 7);
        let q = rand_tensor(&mut r, &[b, h, n, d])?;
        let k = rand_tensor(&mut r, &[b, h, n, d])?;
        let v = rand_tensor(&mut r, &[b, h, n, d])?;
        let theta = random_angles(&mut r, n, d);
        let rope = rope_from_angles(&theta)?;
        let out = linear::reference(&q, &k, &v, Some(&rope), 1e-15)?;
        let want = naive_linear(&q, &k, &v, Some(&theta), 1e-15, &all_visible)?;
        assert_close(&flat(&out)?, &want, 1e-4, &format!("rope d={d}"));
        // The rotation changes the result (the test would not notice a dropped rope otherwise).
        let plain = naive_linear(&q, &k, &v, None, 1e-15, &all_visible)?;
        assert!(want.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-2));
    }
    // Identity tables (cos 1, sin 0) give plain linear attention.
    let (b, h, n, d) = (1, 2, 5, 8);
    let q = rand_tensor(&mut r, &[b, h, n, d])?;
    let k = rand_tensor(&mut r, &[b, h, n, d])?;
    let v = rand_tensor(&mut r, &[b, h, n, d])?;
    let identity = Rope {
        cos: Tensor::ones((n, d), DType::F32, &Device::Cpu)?,
        sin: Tensor::zeros((n, d), DType::F32, &Device::Cpu)?,
    };
    let with = linear::reference(&q, &k, &v, Some(&identity), 1e-15)?;
    let without = linear::reference(&q, &k, &v, None, 1e-15)?;
    assert_close(&flat(&with)?, &flat(&without)?, 1e-6, "identity rope");
    // Tables of the wrong shape are an error.
    let short = Rope { cos: identity.cos.narrow(0, 0, n - 1)?, sin: identity.sin.narrow(0, 0, n - 1)? };
    assert!(linear::reference(&q, &k, &v, Some(&short), 1e-15).is_err());
    Ok(())
}

#[test]
fn linear_chunk_boundaries_follow_longsana() -> R {
    assert_eq!(linear::chunk_boundaries(21, 10)?, vec![0, 11, 21]);
    assert_eq!(linear::chunk_boundaries(20, 10)?, vec![0, 10, 20]);
    assert_eq!(linear::chunk_boundaries(23, 10)?, vec![0, 13, 23]);
    assert_eq!(linear::chunk_boundaries(30, 10)?, vec![0, 10, 20, 30]);
    assert_eq!(linear::chunk_boundaries(15, 10)?, vec![0, 15]);
    assert_eq!(linear::chunk_boundaries(5, 10)?, vec![0, 5]);
    assert_eq!(linear::chunk_boundaries(5, 2)?, vec![0, 3, 5]);
    assert_eq!(linear::chunk_boundaries(4, 1)?, vec![0, 1, 2, 3, 4]);
    assert!(linear::chunk_boundaries(4, 0).is_err());
    Ok(())
}

/// Chunk index of every frame for the given boundaries.
fn frame_chunks(bounds: &[usize]) -> Vec<usize> {
    let mut ids = Vec::new();
    for (c, w) in bounds.windows(2).enumerate() {
        ids.extend(std::iter::repeat(c).take(w[1] - w[0]));
    }
    ids
}

#[test]
fn linear_block_causal_matches_naive() -> R {
    let mut r = rng(13);
    let grid = [5usize, 2, 3];
    let (b, h, d) = (2, 2, 8);
    let n: usize = grid.iter().product();
    let per_frame = grid[1] * grid[2];
    let q = rand_tensor(&mut r, &[b, h, n, d])?;
    let k = rand_tensor(&mut r, &[b, h, n, d])?;
    let v = rand_tensor(&mut r, &[b, h, n, d])?;
    let theta = random_angles(&mut r, n, d);
    let rope = rope_from_angles(&theta)?;
    // 5 frames in chunks of 2: the first chunk takes the remainder, frames [0,3) and [3,5).
    let chunk_of_frame = frame_chunks(&[0, 3, 5]);
    let visible = |qn: usize, km: usize| chunk_of_frame[km / per_frame] <= chunk_of_frame[qn / per_frame];
    let p = LinearParams { eps: 1e-15, chunk_frames: Some(2) };
    for (rope, theta) in [(None, None), (Some(&rope), Some(theta.as_slice()))] {
        let input = AttentionInput::new(&q, &k, &v).grid(Some(&grid)).rope(rope);
        let out = linear::forward(&p, &input)?;
        let want = naive_linear(&q, &k, &v, theta, 1e-15, &visible)?;
        assert_close(&flat(&out)?, &want, 1e-4, &format!("block-causal rope={}", rope.is_some()));
        // And it differs from bidirectional attention.
        let full = naive_linear(&q, &k, &v, theta, 1e-15, &all_visible)?;
        assert!(want.iter().zip(&full).any(|(a, b)| (a - b).abs() > 1e-3));
    }
    Ok(())
}

#[test]
fn linear_one_chunk_equals_bidirectional() -> R {
    let mut r = rng(14);
    let grid = [3usize, 2, 2];
    let (b, h, d) = (1, 2, 6);
    let n: usize = grid.iter().product();
    let q = rand_tensor(&mut r, &[b, h, n, d])?;
    let k = rand_tensor(&mut r, &[b, h, n, d])?;
    let v = rand_tensor(&mut r, &[b, h, n, d])?;
    let rope = rope_from_angles(&random_angles(&mut r, n, d))?;
    for rope in [None, Some(&rope)] {
        let input = AttentionInput::new(&q, &k, &v).grid(Some(&grid)).rope(rope);
        let bidir = linear::forward(&LinearParams::default(), &input)?;
        for c in [3usize, 4, 100] {
            let p = LinearParams { chunk_frames: Some(c), ..LinearParams::default() };
            let chunked = linear::forward(&p, &input)?;
            assert_close(&flat(&chunked)?, &flat(&bidir)?, 1e-6, &format!("one chunk c={c}"));
        }
    }
    Ok(())
}

#[test]
fn linear_state_carried_chunk_by_chunk_equals_one_forward() -> R {
    let mut r = rng(15);
    let grid = [7usize, 2, 2];
    let (b, h, d) = (2, 2, 8);
    let per_frame = grid[1] * grid[2];
    let n: usize = grid.iter().product();
    let q = rand_tensor(&mut r, &[b, h, n, d])?;
    let k = rand_tensor(&mut r, &[b, h, n, d])?;
    let v = rand_tensor(&mut r, &[b, h, n, d])?;
    let theta = random_angles(&mut r, n, d);
    let rope = rope_from_angles(&theta)?;
    let p = LinearParams { eps: 1e-8, chunk_frames: Some(3) };
    let whole = linear::forward(&p, &AttentionInput::new(&q, &k, &v).grid(Some(&grid)).rope(Some(&rope)))?;

    // Generate chunk by chunk (7 frames, chunks of 3: [0, 4, 7]), carrying only the state.
    let bounds = [0usize, 4, 7];
    let mut state: Option<LinearState> = None;
    let mut outs = Vec::new();
    for w in bounds.windows(2) {
        let (s, len) = (w[0] * per_frame, (w[1] - w[0]) * per_frame);
        let chunk_rope = Rope { cos: rope.cos.narrow(0, s, len)?, sin: rope.sin.narrow(0, s, len)? };
        let (o, next) = linear::forward_chunk(
            &p,
            &q.narrow(2, s, len)?,
            &k.narrow(2, s, len)?,
            &v.narrow(2, s, len)?,
            Some(&chunk_rope),
            state.as_ref(),
        )?;
        outs.push(o);
        state = Some(next);
    }
    assert_close(&flat(&Tensor::cat(&outs, 2)?)?, &flat(&whole)?, 1e-5, "carried state");

    // The final state is the sums over every token: kv[a][b] = Σ v[a] R(φ(k))[b], k_sum = Σ φ(k).
    let state = state.expect("state after the last chunk");
    assert_eq!(state.kv.dims(), &[b, h, d, d]);
    assert_eq!(state.k_sum.dims(), &[b, h, d]);
    let (kn, vn) = (nested(&k)?, nested(&v)?);
    let (mut want_kv, mut want_ks) = (Vec::new(), Vec::new());
    for ib in 0..b {
        for ih in 0..h {
            let pk: Vec<Vec<f64>> = kn[ib][ih].iter().map(|x| relu(x)).collect();
            let pk_rot: Vec<Vec<f64>> = pk.iter().enumerate().map(|(m, x)| rotate(x, &theta[m])).collect();
            for a in 0..d {
                for c in 0..d {
                    want_kv.push((0..n).map(|m| vn[ib][ih][m][a] * pk_rot[m][c]).sum::<f64>());
                }
            }
            for c in 0..d {
                want_ks.push((0..n).map(|m| pk[m][c]).sum::<f64>());
            }
        }
    }
    assert_close(&flat(&state.kv)?, &want_kv, 1e-5, "state kv");
    assert_close(&flat(&state.k_sum)?, &want_ks, 1e-5, "state k_sum");

    // A state of the wrong shape is refused.
    let wrong = LinearState::zeros(b, h, d + 1, &Device::Cpu)?;
    assert!(linear::forward_chunk(&p, &q, &k, &v, None, Some(&wrong)).is_err());
    Ok(())
}

#[test]
fn linear_forward_dtypes_and_refusals() -> R {
    let mut r = rng(16);
    let grid = [2usize, 3];
    let (b, h, d) = (1, 2, 8);
    let n = 6;
    let q = rand_tensor(&mut r, &[b, h, n, d])?;
    let k = rand_tensor(&mut r, &[b, h, n, d])?;
    let v = rand_tensor(&mut r, &[b, h, n, d])?;
    let p = LinearParams::default();
    for dt in [DType::F16, DType::BF16] {
        let (qh, kh, vh) = (q.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?);
        let out = linear::forward(&p, &AttentionInput::new(&qh, &kh, &vh))?;
        assert_eq!(out.dtype(), dt);
        let want = naive_linear(&qh, &kh, &vh, None, 1e-15, &all_visible)?;
        assert_close(&flat(&out)?, &want, 2e-2, "half linear");
    }
    let mask = Tensor::ones((b, n), DType::F32, &Device::Cpu)?;
    assert!(linear::forward(&p, &AttentionInput::new(&q, &k, &v).key_mask(Some(&mask))).is_err());
    assert!(linear::forward(&p, &AttentionInput::new(&q, &k, &v).extra_kv(Some((&k, &v)))).is_err());
    let chunked = LinearParams { chunk_frames: Some(1), ..p.clone() };
    assert!(linear::forward(&chunked, &AttentionInput::new(&q, &k, &v)).is_err(), "chunks need a grid");
    let wrong_grid = [4usize, 3];
    assert!(linear::forward(&chunked, &AttentionInput::new(&q, &k, &v).grid(Some(&wrong_grid))).is_err());
    assert!(linear::forward(&chunked, &AttentionInput::new(&q, &k, &v).grid(Some(&grid))).is_ok());
    Ok(())
}

#[test]
fn linear_check_refusals() {
    let plain = LinearParams::default();
    let chunked = LinearParams { chunk_frames: Some(10), ..LinearParams::default() };
    let zero = LinearParams { chunk_frames: Some(0), ..LinearParams::default() };
    let grid = Some(vec![21, 30, 52]);
    assert!(plain.check(&layer(Role::SelfAttention, 32, None, false)).is_ok());
    assert!(plain.check(&layer(Role::SelfAttention, 112, grid.clone(), false)).is_ok());
    assert!(chunked.check(&layer(Role::SelfAttention, 112, grid.clone(), false)).is_ok());

    let reason = |p: &LinearParams, l: LayerShape| p.check(&l).expect_err("must refuse");
    assert!(reason(&plain, layer(Role::SelfAttention, 32, None, true)).contains("mask"));
    assert!(reason(&plain, layer(Role::Cross, 32, None, false)).contains("cross"));
    assert!(reason(&plain, layer(Role::Joint, 32, grid.clone(), false)).contains("joint"));
    assert!(reason(&chunked, layer(Role::SelfAttention, 112, None, false)).contains("grid"));
    assert!(reason(&zero, layer(Role::SelfAttention, 112, grid, false)).contains("0"));
}

// ---------------------------------------------------------------------------------------------
// Goldens from the upstream code (tests/goldens/make_attention_dense_linear_goldens.py):
// diffusers' SANA linear-attention processors and torch's scaled_dot_product_attention.
// ---------------------------------------------------------------------------------------------

fn goldens() -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/goldens/attention_dense_linear.safetensors");
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn golden<'a>(g: &'a std::collections::HashMap<String, Tensor>, name: &str) -> anyhow::Result<&'a Tensor> {
    g.get(name).ok_or_else(|| anyhow::anyhow!("golden tensor {name} missing"))
}

#[test]
fn linear_matches_diffusers_processors() -> R {
    let g = goldens()?;
    let (q, k, v) = (golden(&g, "linear_plain_q")?, golden(&g, "linear_plain_k")?, golden(&g, "linear_plain_v")?);
    let out = linear::forward(&LinearParams::default(), &AttentionInput::new(q, k, v))?;
    assert_close(&flat(&out)?, &flat(golden(&g, "linear_plain_out")?)?, 1e-4, "SanaLinearAttnProcessor2_0");

    let (q, k, v) = (golden(&g, "linear_rope_q")?, golden(&g, "linear_rope_k")?, golden(&g, "linear_rope_v")?);
    let rope = Rope { cos: golden(&g, "linear_rope_cos")?.clone(), sin: golden(&g, "linear_rope_sin")?.clone() };
    let out = linear::forward(&LinearParams::default(), &AttentionInput::new(q, k, v).rope(Some(&rope)))?;
    assert_close(&flat(&out)?, &flat(golden(&g, "linear_rope_out")?)?, 1e-4, "SanaLinearAttnProcessor3_0");
    Ok(())
}

#[test]
fn dense_matches_torch_sdpa() -> R {
    let g = goldens()?;
    let (q, k, v) = (golden(&g, "dense_q")?, golden(&g, "dense_k")?, golden(&g, "dense_v")?);
    let mask = golden(&g, "dense_mask")?;
    let (out, lse) = dense::forward(&DenseParams::default(), &AttentionInput::new(q, k, v).key_mask(Some(mask)))?;
    assert_close(&flat(&out)?, &flat(golden(&g, "dense_out")?)?, 1e-5, "sdpa out");
    assert_close(&flat(&lse)?, &flat(golden(&g, "dense_lse")?)?, 1e-5, "sdpa lse");
    Ok(())
}
