//! The training ops (layers::train_ops, layers::train_glu) on the GPU: forward and backward kernels against the CPU
//! op in f32 (itself checked against candle autograd in tests/train_ops.rs).
//!
//! Rule (as tests/cuda_ops.rs): in each dtype, the error of our kernels against the f32 CPU
//! reference is at most twice the error of the naive low-precision path (candle autograd through
//! the reference tensor ops on the GPU in that dtype), in max-abs and relative L2, plus a floor of a
//! few units of the dtype's rounding. Checked: the output and the gradient of `sum(out ⊙ R)` with
//! respect to every input.
//!
//! Run on the H200: `cargo test --release --features cuda --test cuda_train_ops`.
#![cfg(feature = "cuda")]

mod common;

use common::{check, errors, max_abs};
use candle_core::{DType, Device, Tensor, Var};
use visgen::layers::modulation::{gated_residual_reference, norm_modulate_reference};
use visgen::layers::train_glu::glu_depthwise3x3_tracked;
use visgen::layers::train_ops::{gated_residual_tracked, norm_modulate_tracked};

const EPS: f64 = 1e-6;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn randn(shape: &[usize], scale: f64, shift: f64) -> Tensor {
    ((Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap() + shift).unwrap()
}

/// Output and gradients of `sum(out ⊙ R)` w.r.t. `inputs`, with `f` run on copies of the inputs
/// on `dev` in `dtype`.
fn run(inputs: &[Tensor], r: &Tensor, dev: &Device, dtype: DType, f: &dyn Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap()).collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors);
    let loss = (out.to_dtype(DType::F32).unwrap() * r.to_device(dev).unwrap()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut all = vec![out];
    all.extend(vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient for every input").clone()));
    all
}

fn parity(what: &str, inputs: &[Tensor], r: &Tensor, names: &[&str], ours: &dyn Fn(&[Tensor]) -> Tensor, naive: &dyn Fn(&[Tensor]) -> Tensor) {
    let reference = run(inputs, r, &Device::Cpu, DType::F32, ours);
    for dtype in [DType::F32, DType::BF16] {
        let got = run(inputs, r, &gpu(), dtype, ours);
        let low = run(inputs, r, &gpu(), dtype, naive);
        for (i, name) in names.iter().enumerate() {
            let case = format!("{what} {dtype:?} {name}");
            check(&case, dtype, errors(&got[i], &reference[i]), errors(&low[i], &reference[i]), max_abs(&reference[i]).max(1.0));
        }
    }
}

#[test]
fn norm_modulate_kernels_match_the_cpu_op() {
    // (B, N, C): small, ragged channels, more channels than threads, many tokens.
    for &(b, n, c) in &[(2, 5, 8), (3, 17, 300), (2, 64, 1152), (1, 257, 33)] {
        let inputs = [randn(&[b, n, c], 1.5, 0.5), randn(&[b, 1, c], 0.5, 0.0), randn(&[b, 1, c], 0.5, 0.0)];
        let r = randn(&[b, n, c], 1.0, 0.0);
        parity(
            &format!("norm_modulate B={b} N={n} C={c}"),
            &inputs,
            &r,
            &["out", "dx", "dshift", "dscale"],
            &|t| norm_modulate_tracked(&t[0], &t[1], &t[2], EPS).unwrap(),
            &|t| norm_modulate_reference(&t[0], &t[1], &t[2], EPS).unwrap(),
        );
    }
}

#[test]
fn gated_residual_kernels_match_the_cpu_op() {
    for &(b, n, c) in &[(2, 5, 8), (3, 17, 300), (2, 64, 1152), (1, 257, 33)] {
        let inputs = [randn(&[b, n, c], 1.0, 0.0), randn(&[b, n, c], 1.0, 0.2), randn(&[c], 0.5, 0.0), randn(&[b, 1, c], 0.8, 0.1)];
        let r = randn(&[b, n, c], 1.0, 0.0);
        parity(
            &format!("gated_residual B={b} N={n} C={c}"),
            &inputs,
            &r,
            &["out", "dx", "dy", "dbias", "dgate"],
            &|t| gated_residual_tracked(&t[0], &t[1], Some(&t[2]), Some(&t[3])).unwrap(),
            &|t| gated_residual_reference(&t[0], &t[1], Some(&t[2]), Some(&t[3])).unwrap(),
        );
    }
}

/// The Mix-FFN middle as tensor ops (the naive path): bias, SiLU, a depth-wise 3x3 as nine
/// shifted copies of the zero-padded channels-last grid, GLU.
fn glu_naive(t: &[Tensor], [h, w]: [usize; 2]) -> Tensor {
    let (u, ib, wt, db) = (&t[0], &t[1], &t[2], &t[3]);
    let (b, n, c2) = u.dims3().unwrap();
    let a = candle_nn::ops::silu(&u.broadcast_add(ib).unwrap()).unwrap();
    let padded = a.reshape((b, h, w, c2)).unwrap().pad_with_zeros(1, 1, 1).unwrap().pad_with_zeros(2, 1, 1).unwrap();
    let mut d = db.reshape((1, 1, 1, c2)).unwrap().broadcast_as((b, h, w, c2)).unwrap().contiguous().unwrap();
    for i in 0..3 {
        for j in 0..3 {
            let tap = wt.narrow(2, i, 1).unwrap().narrow(3, j, 1).unwrap().reshape((1, 1, 1, c2)).unwrap();
            d = (d + padded.narrow(1, i, h).unwrap().narrow(2, j, w).unwrap().broadcast_mul(&tap).unwrap()).unwrap();
        }
    }
    let d = d.reshape((b, n, c2)).unwrap();
    let half = c2 / 2;
    (d.narrow(2, 0, half).unwrap() * candle_nn::ops::silu(&d.narrow(2, half, half).unwrap()).unwrap()).unwrap()
}

#[test]
fn glu_depthwise_kernels_match_the_cpu_op() {
    // (B, grid, hidden): the tiny-shapes block's scale, one row, one column, ragged and wide.
    for &(b, grid, hidden) in &[(4, [8, 8], 64), (2, [1, 9], 5), (2, [11, 1], 7), (1, [13, 17], 300)] {
        let (n, c2) = (grid[0] * grid[1], 2 * hidden);
        let inputs = [randn(&[b, n, c2], 1.2, 0.1), randn(&[c2], 0.4, 0.0), randn(&[c2, 1, 3, 3], 0.4, 0.0), randn(&[c2], 0.3, 0.0)];
        let r = randn(&[b, n, hidden], 1.0, 0.0);
        parity(
            &format!("glu_depthwise3x3 B={b} grid={grid:?} hidden={hidden}"),
            &inputs,
            &r,
            &["out", "du", "dinverted_bias", "ddepth_weight", "ddepth_bias"],
            &|t| glu_depthwise3x3_tracked(&t[0], Some(&t[1]), &t[2], Some(&t[3]), grid).unwrap(),
            &|t| glu_naive(t, grid),
        );
    }
}
