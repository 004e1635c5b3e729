//! The training ops with a backward pass (layers::train_ops, layers::train_glu) against candle
//! autograd through independent tensor ops (`norm_modulate_reference`, `gated_residual_reference`,
//! and a shifted-copies depth-wise convolution for the Mix-FFN middle): forward values and the
//! gradients of a random scalar loss `sum(out ⊙ R)` with respect to every input.

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use visgen::layers::modulation::{gated_residual_reference, norm_modulate_reference};
use visgen::layers::train_glu::glu_depthwise3x3_tracked;
use visgen::layers::train_ops::{gated_residual_tracked, norm_modulate_tracked};
use visgen::layers::{gated_residual, norm_modulate};

const EPS: f64 = 1e-6;

fn randn(shape: &[usize], scale: f64, shift: f64) -> Tensor {
    ((Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap() + shift).unwrap()
}

fn var(t: &Tensor, dtype: DType) -> Var {
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

/// Largest |a - b| relative to the largest |b| (at least 1).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    assert_eq!(a.dims(), b.dims());
    let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
    diff / scale
}

/// The loss `sum(out ⊙ R)` and its gradients with respect to `vars`.
fn grads(out: &Tensor, r: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let loss = (out.to_dtype(DType::F32).unwrap() * r).unwrap().sum_all().unwrap();
    let store: GradStore = loss.backward().unwrap();
    vars.iter().map(|v| store.get(v.as_tensor()).expect("a gradient for every input").clone()).collect()
}

fn compare(what: &str, ours: &[Tensor], reference: &[Tensor], names: &[&str], tol: f32) {
    for ((a, b), name) in ours.iter().zip(reference).zip(names) {
        assert_eq!(a.dims(), b.dims(), "{what}: {name} shape");
        let e = rel_err(a, b);
        assert!(e <= tol, "{what}: {name} differs by {e:.3e} (tolerance {tol:.1e})");
    }
}

/// Shift and scale as the model takes them: narrows of one `(B, 6, C)` modulation table.
fn norm_case(b: usize, n: usize, c: usize, dtype: DType, tol: f32) {
    let what = format!("norm_modulate B={b} N={n} C={c} {dtype:?}");
    let x = randn(&[b, n, c], 1.5, 0.7);
    let table = randn(&[b, 6, c], 0.5, 0.0);
    let r = randn(&[b, n, c], 1.0, 0.0);

    let run = |tracked: bool| {
        let (xv, tv) = (var(&x, dtype), var(&table, dtype));
        let t = tv.as_tensor();
        let (shift, scale) = (t.narrow(1, 3, 1).unwrap(), t.narrow(1, 4, 1).unwrap());
        let out = if tracked {
            norm_modulate_tracked(xv.as_tensor(), &shift, &scale, EPS).unwrap()
        } else {
            norm_modulate_reference(xv.as_tensor(), &shift, &scale, EPS).unwrap()
        };
        let g = grads(&out, &r, &[&xv, &tv]);
        (out, g)
    };
    let (out, g) = run(true);
    let (out_ref, g_ref) = run(false);
    assert_eq!(out.dtype(), dtype);
    compare(&what, &[out], &[out_ref], &["forward"], tol);
    compare(&what, &g, &g_ref, &["dx", "dtable (dshift, dscale)"], tol);
}

fn residual_case(b: usize, n: usize, c: usize, with_bias: bool, dtype: DType, tol: f32) {
    let what = format!("gated_residual B={b} N={n} C={c} bias={with_bias} {dtype:?}");
    let (x, y) = (randn(&[b, n, c], 1.0, 0.0), randn(&[b, n, c], 1.0, 0.3));
    let (bias, gate) = (randn(&[c], 0.5, 0.0), randn(&[b, 1, c], 0.8, 0.2));
    let r = randn(&[b, n, c], 1.0, 0.0);

    let run = |tracked: bool| {
        let (xv, yv, bv, gv) = (var(&x, dtype), var(&y, dtype), var(&bias, dtype), var(&gate, dtype));
        let bias = with_bias.then(|| bv.as_tensor());
        let args = (xv.as_tensor(), yv.as_tensor(), bias, Some(gv.as_tensor()));
        let out = if tracked {
            gated_residual_tracked(args.0, args.1, args.2, args.3).unwrap()
        } else {
            gated_residual_reference(args.0, args.1, args.2, args.3).unwrap()
        };
        let vars: Vec<&Var> = if with_bias { vec![&xv, &yv, &gv, &bv] } else { vec![&xv, &yv, &gv] };
        (out.clone(), grads(&out, &r, &vars))
    };
    let (out, g) = run(true);
    let (out_ref, g_ref) = run(false);
    compare(&what, &[out], &[out_ref], &["forward"], tol);
    compare(&what, &g, &g_ref, &["dx", "dy", "dgate", "dbias"], tol);
}

#[test]
fn norm_modulate_op_matches_autograd_f32() {
    for (b, n, c) in [(2, 5, 8), (2, 12, 48), (1, 7, 33), (3, 9, 16)] {
        norm_case(b, n, c, DType::F32, 2e-5);
    }
}

#[test]
fn norm_modulate_op_matches_autograd_bf16() {
    // The op rounds once; the reference rounds after the norm, the scale add, the product and the
    // shift, and accumulates the token sums of the gradients in bf16.
    for (b, n, c) in [(2, 6, 24), (2, 11, 40)] {
        norm_case(b, n, c, DType::BF16, 6e-2);
    }
}

#[test]
fn gated_residual_op_matches_autograd_f32() {
    for (b, n, c, bias) in [(2, 5, 8, false), (2, 12, 48, true), (1, 7, 33, true), (3, 9, 16, false)] {
        residual_case(b, n, c, bias, DType::F32, 1e-5);
    }
}

#[test]
fn gated_residual_op_matches_autograd_bf16() {
    for (b, n, c, bias) in [(2, 6, 24, true), (2, 11, 40, false)] {
        residual_case(b, n, c, bias, DType::BF16, 4e-2);
    }
}

/// The layer functions take the training op exactly when an input records gradients, and the
/// gradients reach every input (here through the public `norm_modulate` / `gated_residual`).
#[test]
fn layers_dispatch_to_the_training_ops_while_recording() {
    let (b, n, c) = (2, 6, 12);
    let x = randn(&[b, n, c], 1.0, 0.2);
    let (shift, scale) = (randn(&[b, 1, c], 0.4, 0.0), randn(&[b, 1, c], 0.4, 0.0));
    let plain = norm_modulate(&x, &shift, &scale, EPS).unwrap();
    let reference = norm_modulate_reference(&x, &shift, &scale, EPS).unwrap();
    assert!(rel_err(&plain, &reference) < 1e-6);

    let xv = var(&x, DType::F32);
    let recorded = norm_modulate(xv.as_tensor(), &shift, &scale, EPS).unwrap();
    let h = gated_residual(&recorded, &recorded.sqr().unwrap(), None, Some(&scale)).unwrap();
    let r = randn(&[b, n, c], 1.0, 0.0);
    let g = grads(&h, &r, &[&xv]);

    let xr = var(&x, DType::F32);
    let rec_ref = norm_modulate_reference(xr.as_tensor(), &shift, &scale, EPS).unwrap();
    let h_ref = gated_residual_reference(&rec_ref, &rec_ref.sqr().unwrap(), None, Some(&scale)).unwrap();
    let g_ref = grads(&h_ref, &r, &[&xr]);
    compare("layer dispatch", &g, &g_ref, &["dx"], 2e-5);
}

#[test]
fn training_ops_reject_bad_shapes() {
    let x = randn(&[2, 4, 8], 1.0, 0.0);
    let bad = randn(&[2, 1, 7], 1.0, 0.0);
    let ok = randn(&[2, 1, 8], 1.0, 0.0);
    assert!(norm_modulate_tracked(&x, &bad, &ok, EPS).is_err());
    assert!(norm_modulate_tracked(&x, &ok, &ok.to_dtype(DType::BF16).unwrap(), EPS).is_err());
    assert!(gated_residual_tracked(&x, &x, Some(&randn(&[7], 1.0, 0.0)), Some(&ok)).is_err());
    assert!(gated_residual_tracked(&x, &x.narrow(1, 0, 3).unwrap(), None, Some(&ok)).is_err());
}

/// The Mix-FFN middle as independent tensor ops: bias, SiLU, a depth-wise 3x3 as nine shifted
/// copies of the zero-padded channels-last grid, GLU.
fn glu_reference(u: &Tensor, ib: &Tensor, w: &Tensor, db: &Tensor, [h, w_]: [usize; 2]) -> Tensor {
    let (b, n, c2) = u.dims3().unwrap();
    let a = candle_nn::ops::silu(&u.broadcast_add(ib).unwrap()).unwrap();
    let padded = a.reshape((b, h, w_, c2)).unwrap().pad_with_zeros(1, 1, 1).unwrap().pad_with_zeros(2, 1, 1).unwrap();
    let mut d = db.reshape((1, 1, 1, c2)).unwrap().broadcast_as((b, h, w_, c2)).unwrap().contiguous().unwrap();
    for i in 0..3 {
        for j in 0..3 {
            let tap = w.narrow(2, i, 1).unwrap().narrow(3, j, 1).unwrap().reshape((1, 1, 1, c2)).unwrap();
            let shifted = padded.narrow(1, i, h).unwrap().narrow(2, j, w_).unwrap();
            d = (d + shifted.broadcast_mul(&tap).unwrap()).unwrap();
        }
    }
    let d = d.reshape((b, n, c2)).unwrap();
    let half = c2 / 2;
    (d.narrow(2, 0, half).unwrap() * candle_nn::ops::silu(&d.narrow(2, half, half).unwrap()).unwrap()).unwrap()
}

fn glu_case(b: usize, grid: [usize; 2], hidden: usize, dtype: DType, tol: f32) {
    let what = format!("glu_depthwise3x3 B={b} grid={grid:?} hidden={hidden} {dtype:?}");
    let (n, c2) = (grid[0] * grid[1], 2 * hidden);
    let u = randn(&[b, n, c2], 1.2, 0.1);
    let (ib, w, db) = (randn(&[c2], 0.4, 0.0), randn(&[c2, 1, 3, 3], 0.4, 0.0), randn(&[c2], 0.3, 0.0));
    let r = randn(&[b, n, hidden], 1.0, 0.0);
    let run = |tracked: bool| {
        let vars = [var(&u, dtype), var(&ib, dtype), var(&w, dtype), var(&db, dtype)];
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let out = if tracked {
            glu_depthwise3x3_tracked(t[0], Some(t[1]), t[2], Some(t[3]), grid).unwrap()
        } else {
            glu_reference(t[0], t[1], t[2], t[3], grid)
        };
        (out.clone(), grads(&out, &r, &vars.iter().collect::<Vec<_>>()))
    };
    let (out, g) = run(true);
    let (out_ref, g_ref) = run(false);
    compare(&what, &[out], &[out_ref], &["forward"], tol);
    compare(&what, &g, &g_ref, &["du", "dinverted_bias", "ddepth_weight", "ddepth_bias"], tol);
}

#[test]
fn glu_depthwise_op_matches_autograd_f32() {
    // Grids with a single row, a single column, ragged sides.
    for (b, grid, hidden) in [(2, [3, 4], 4), (1, [5, 5], 8), (2, [1, 6], 3), (2, [7, 1], 5), (1, [4, 6], 24)] {
        glu_case(b, grid, hidden, DType::F32, 2e-5);
    }
}

#[test]
fn glu_depthwise_op_matches_autograd_bf16() {
    glu_case(2, [4, 5], 8, DType::BF16, 8e-2);
}
