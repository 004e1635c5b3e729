//! Convolution helpers that candle lacks or runs slowly: depth-wise k×k convolutions (one group
//! per channel), grouped 1×1 convolutions, pixel (un)shuffle and channel repeat-interleave.
//! Written with tensor ops only, so they run on every device.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::error::{Error, Result};

/// A depth-wise convolution: `groups == channels`, weight `(C, 1, k, k)`, stride 1, zero padding
/// `k / 2` (same-size output), optional bias `(C,)`.
#[derive(Debug, Clone)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
    /// The shift matrices of the last grid the matmul form served, kept on its device: uploading
    /// them every call would stall the GPU on a host copy in every block.
    shifts: Arc<Mutex<Option<((usize, usize), Tensor)>>>,
}

impl DepthwiseConv2d {
    /// Keys: `weight` `(C, 1, k, k)` and, with `bias`, `bias` `(C,)`.
    pub fn new(channels: usize, kernel: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        if kernel % 2 == 0 {
            return Err(Error::Other(format!("depth-wise convolution needs an odd kernel, got {kernel}")));
        }
        let weight = vb.get((channels, 1, kernel, kernel), "weight")?;
        let bias = if bias { Some(vb.get(channels, "bias")?) } else { None };
        Ok(Self { weight, bias, kernel, shifts: Arc::default() })
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// `(C, 1, k, k)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x`: `(B, C, H, W)` -> `(B, C, H, W)`. On the GPU, small grids take [`Self::forward_matmul`]
    /// (a few batched GEMMs, fast to train through); otherwise [`Self::forward_taps`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_b, c, h, w) = x.dims4()?;
        let n = h * w;
        if x.device().is_cuda() && n <= MATMUL_MAX_TOKENS && c * n * n <= MATMUL_MAX_KERNEL_ELEMENTS {
            return self.forward_matmul(x);
        }
        self.forward_taps(x)
    }

    /// The same convolution as one batched matrix product per channel over the `H·W` positions:
    /// `y[c] = K_c · x[c]` with `K_c = Σ_tap w[c, tap] · S_tap`, where `S_tap` `(N, N)` moves each
    /// position to its neighbour at that tap (rows of out-of-image neighbours are zero = zero
    /// padding). Why: the tap form is ~3k² element-wise ops on the widest tensor of the block and
    /// ~8k² in the backward pass (every shifted slice's gradient is padded back with zeros), which
    /// made training memory-bound; this form is 4 copies and 3 GEMMs each way. It costs
    /// `C·N²` memory for `K`, so only small grids use it.
    pub fn forward_matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (k, n) = (self.kernel, h * w);
        let shifts = self.shift_matrices(h, w, x)?;
        let weight = self.weight.to_dtype(x.dtype())?.reshape((c, k * k))?;
        let kernels = weight.matmul(&shifts)?.reshape((c, n, n))?;
        let columns = x.reshape((b, c, n))?.permute((1, 2, 0))?.contiguous()?; // (C, N, B)
        let y = kernels.matmul(&columns)?.permute((2, 0, 1))?.contiguous()?; // (B, C, N)
        let mut y = y.reshape((b, c, h, w))?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?)?;
        }
        Ok(y)
    }

    /// [`Self::forward_matmul`] on channels-last tokens `(B, H·W, C)` of a `grid = [H, W]` ->
    /// `(B, H·W, C)` (Mix-FFN's training path).
    pub fn forward_tokens_matmul(&self, x: &Tensor, grid: [usize; 2]) -> Result<Tensor> {
        let (_b, n, c) = x.dims3()?;
        let [h, w] = grid;
        if n != h * w {
            return Err(Error::Other(format!("depth-wise conv: {n} tokens do not fill a {h}x{w} grid")));
        }
        let k = self.kernel;
        let shifts = self.shift_matrices(h, w, x)?;
        let weight = self.weight.to_dtype(x.dtype())?.reshape((c, k * k))?;
        let kernels = weight.matmul(&shifts)?.reshape((c, n, n))?;
        let columns = x.permute((2, 1, 0))?.contiguous()?; // (C, N, B)
        let mut y = kernels.matmul(&columns)?.permute((2, 1, 0))?.contiguous()?; // (B, N, C)
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.to_dtype(x.dtype())?)?;
        }
        Ok(y)
    }

    /// The `(k², N·N)` shift matrices of an `h`×`w` grid in `x`'s dtype, on its device (cached).
    fn shift_matrices(&self, h: usize, w: usize, x: &Tensor) -> Result<Tensor> {
        let (k, n) = (self.kernel, h * w);
        Ok({
            let mut cached = self.shifts.lock().map_err(|_| Error::Other("depth-wise conv: shift cache poisoned".into()))?;
            match cached.as_ref() {
                Some((grid, s)) if *grid == (h, w) && s.dtype() == x.dtype() && s.device().same_device(x.device()) => s.clone(),
                _ => {
                    let s = Tensor::from_vec(shift_matrices(h, w, k), (k * k, n * n), x.device())?.to_dtype(x.dtype())?;
                    *cached = Some(((h, w), s.clone()));
                    s
                }
            }
        })
    }

    /// A sum of k² shifted copies of the zero-padded input, each scaled per channel (the fast form
    /// on the CPU, and for large grids).
    pub fn forward_taps(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let k = self.kernel;
        let pad = k / 2;
        let padded = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
        let weight = self.weight.to_dtype(x.dtype())?.reshape((c, k * k))?;
        let mut acc: Option<Tensor> = None;
        for dy in 0..k {
            let rows = padded.narrow(2, dy, h)?;
            for dx in 0..k {
                let tap = weight.narrow(1, dy * k + dx, 1)?.reshape((1, c, 1, 1))?;
                let term = rows.narrow(3, dx, w)?.broadcast_mul(&tap)?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term)?,
                });
            }
        }
        let mut y = acc.expect("kernel is at least 1x1");
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?)?;
        }
        debug_assert_eq!(y.dims(), &[b, c, h, w]);
        Ok(y)
    }
}

/// Largest grid (tokens) and `C·N²` for which the GPU takes the matmul form of the depth-wise conv.
const MATMUL_MAX_TOKENS: usize = 256;
const MATMUL_MAX_KERNEL_ELEMENTS: usize = 1 << 26;

/// `(k², N·N)` 0/1 matrices, `N = h·w`: row `tap`, entry `(p, q)` is 1 when position `q` is the
/// neighbour of `p` at offset `(dy - k/2, dx - k/2)`, `tap = dy·k + dx`, and lies inside the grid.
fn shift_matrices(h: usize, w: usize, k: usize) -> Vec<f32> {
    let n = h * w;
    let pad = (k / 2) as isize;
    let mut s = vec![0f32; k * k * n * n];
    for dy in 0..k {
        for dx in 0..k {
            let tap = dy * k + dx;
            for y in 0..h {
                for x in 0..w {
                    let (sy, sx) = (y as isize + dy as isize - pad, x as isize + dx as isize - pad);
                    if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                        let (p, q) = (y * w + x, sy as usize * w + sx as usize);
                        s[(tap * n + p) * n + q] = 1.0;
                    }
                }
            }
        }
    }
    s
}

/// A 1×1 convolution with `groups` groups and no bias, weight `(C_out, C_in / groups, 1, 1)`.
#[derive(Debug, Clone)]
pub struct GroupedPointwiseConv2d {
    /// `(groups, out_per_group, in_per_group)`
    weight: Tensor,
    groups: usize,
}

impl GroupedPointwiseConv2d {
    pub fn new(in_channels: usize, out_channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
            return Err(Error::Other(format!("{in_channels} -> {out_channels} channels do not split into {groups} groups")));
        }
        let (ig, og) = (in_channels / groups, out_channels / groups);
        let weight = vb.get((out_channels, ig, 1, 1), "weight")?.reshape((groups, og, ig))?;
        Ok(Self { weight, groups })
    }

    /// `(groups, out_per_group, in_per_group)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x`: `(B, C_in, H, W)` -> `(B, C_out, H, W)`, one matmul per group (batched).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (g, og, ig) = self.weight.dims3()?;
        if c != g * ig {
            return Err(Error::Other(format!("grouped conv expects {} channels, got {c}", g * ig)));
        }
        let xg = x.reshape((b, self.groups, ig, h * w))?;
        let weight = self.weight.to_dtype(x.dtype())?.unsqueeze(0)?;
        let y = weight.broadcast_matmul(&xg)?;
        Ok(y.reshape((b, g * og, h, w))?)
    }
}

/// A plain convolution loaded from `weight` (and `bias`), square kernel, `padding`, `stride`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, dilation: 1, groups: 1, cudnn_fwd_algo: None };
    Ok(if bias {
        candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?
    } else {
        candle_nn::conv2d_no_bias(in_channels, out_channels, kernel, cfg, vb)?
    })
}

/// Which GPU path serves the 3×3, stride-1, padding-1 convolutions in bf16/f16 (`gen bench dcae`
/// times each; the others stay as references and fallbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conv3x3Path {
    /// Per shape, the fastest of [`Self::Implicit`], [`Self::ImplicitNhwc`] and [`Self::Im2col`], timed once at the first
    /// call of that shape (CUDA events) and remembered for the process.
    Auto,
    /// One implicit-GEMM kernel (kernels/ops/conv_igemm.cu): no im2col buffer, the nearest ×2
    /// up-sampling and shortcut of DC-AE's up blocks and the SiLU of its ResBlocks fused in.
    Implicit,
    /// [`Self::Implicit`] reading a channels-last copy of the input (one transpose kernel first):
    /// 16-byte loads of 8 channels instead of 16-bit gathers across channel planes.
    ImplicitNhwc,
    /// im2col (kernels/ops/im2col.cu) + one cuBLAS GEMM: 9x the input written and read back.
    Im2col,
    /// candle's convolution (its im2col + GEMM; run 2 of kernels/NOTES.md measured its cuDNN path,
    /// since removed, 7-13x slower than ours).
    Candle,
}

static CONV3X3_PATH: AtomicU8 = AtomicU8::new(0);

/// Sets the GPU path of 3×3 convolutions for the whole process (benchmarks, tests; the default is
/// [`Conv3x3Path::Auto`]).
pub fn set_conv3x3_path(path: Conv3x3Path) {
    CONV3X3_PATH.store(path as u8, Ordering::Relaxed);
}

pub fn conv3x3_path() -> Conv3x3Path {
    match CONV3X3_PATH.load(Ordering::Relaxed) {
        0 => Conv3x3Path::Auto,
        1 => Conv3x3Path::Implicit,
        2 => Conv3x3Path::ImplicitNhwc,
        3 => Conv3x3Path::Im2col,
        _ => Conv3x3Path::Candle,
    }
}

/// Runs a convolution made by [`conv2d`]. On the GPU, a 3×3, stride-1, padding-1 convolution in
/// bf16/f16 runs on our kernels ([`Conv3x3Path`]): candle's CUDA convolution (its im2col, or cuDNN
/// with f32 compute for bf16) took 15-18 ms for one 128-channel 3×3 conv at 1024² on the H200,
/// ours 2.2 ms.
pub fn conv_forward(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    conv3x3_fused(conv, x, false, false, None)
}

/// `conv(upsample_nearest_2x(x))` when `upsample`, then SiLU when `silu`, then, with
/// `shortcut_repeats = Some(r)` (with `upsample`), `+ pixel_shuffle(repeat_interleave(x, r), 2)`
/// (DC-AE's up block). On the GPU one kernel for a 3×3, stride-1, padding-1 convolution
/// ([`Conv3x3Path`]); elsewhere tensor ops.
pub fn conv3x3_fused(conv: &Conv2d, x: &Tensor, upsample: bool, silu: bool, shortcut_repeats: Option<usize>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let cfg = conv.config();
        let (k_h, k_w) = (conv.weight().dim(2)?, conv.weight().dim(3)?);
        let plain = cfg.stride == 1 && cfg.padding == 1 && cfg.dilation == 1 && cfg.groups == 1 && (k_h, k_w) == (3, 3);
        if plain && super::cuda::fused_kernels_apply(x) {
            let implicit = || super::cuda::conv3x3_implicit(x, conv.weight(), conv.bias(), upsample, silu, shortcut_repeats, false);
            let implicit_nhwc = || super::cuda::conv3x3_implicit(x, conv.weight(), conv.bias(), upsample, silu, shortcut_repeats, true);
            let im2col = || -> Result<Option<Tensor>> {
                let xu = if upsample { upsample_2x(x)? } else { x.clone() };
                match super::cuda::conv3x3(&xu, conv.weight(), conv.bias())? {
                    Some(y) => Ok(Some(epilogue_ops(y, x, silu, shortcut_repeats)?)),
                    None => Ok(None),
                }
            };
            let path = match conv3x3_path() {
                Conv3x3Path::Auto => autotune::choose(
                    x,
                    conv.weight(),
                    (upsample, silu, shortcut_repeats),
                    &[(Conv3x3Path::Implicit, &implicit), (Conv3x3Path::ImplicitNhwc, &implicit_nhwc), (Conv3x3Path::Im2col, &im2col)],
                )?,
                other => other,
            };
            let y = match path {
                Conv3x3Path::Implicit => implicit()?,
                Conv3x3Path::ImplicitNhwc => implicit_nhwc()?,
                Conv3x3Path::Im2col => im2col()?,
                _ => None,
            };
            if let Some(y) = y {
                return Ok(y);
            }
        }
    }
    let xu = if upsample { upsample_2x(x)? } else { x.clone() };
    epilogue_ops(conv.forward(&xu)?, x, silu, shortcut_repeats)
}

/// SiLU and the up-block shortcut as tensor ops on a convolution's output `y`.
fn epilogue_ops(y: Tensor, x: &Tensor, silu: bool, shortcut_repeats: Option<usize>) -> Result<Tensor> {
    let y = if silu { candle_nn::ops::silu(&y)? } else { y };
    match shortcut_repeats {
        Some(r) => Ok((y + pixel_shuffle(&repeat_interleave_channels(x, r)?, 2)?)?),
        None => Ok(y),
    }
}

fn upsample_2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    Ok(x.upsample_nearest2d(2 * h, 2 * w)?)
}

/// [`Conv3x3Path::Auto`]: the first call of a shape times both of our paths and keeps the faster.
#[cfg(feature = "cuda")]
mod autotune {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::{DType, Tensor};

    use super::Conv3x3Path;
    use crate::error::{Error, Result};

    type Key = (Vec<usize>, Vec<usize>, DType, (bool, bool, Option<usize>));

    fn cache() -> &'static Mutex<HashMap<Key, Conv3x3Path>> {
        static CACHE: OnceLock<Mutex<HashMap<Key, Conv3x3Path>>> = OnceLock::new();
        CACHE.get_or_init(|| Mutex::new(HashMap::new()))
    }

    pub type Candidate<'a> = (Conv3x3Path, &'a dyn Fn() -> Result<Option<Tensor>>);

    pub fn choose(x: &Tensor, weight: &Tensor, epilogue: (bool, bool, Option<usize>), candidates: &[Candidate]) -> Result<Conv3x3Path> {
        let key = (x.dims().to_vec(), weight.dims().to_vec(), x.dtype(), epilogue);
        let poisoned = || Error::Other("conv autotune cache poisoned".into());
        if let Some(p) = cache().lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(*p);
        }
        // Candle's convolution when none of ours serves.
        let mut best = (f64::INFINITY, Conv3x3Path::Candle);
        for (path, f) in candidates {
            if let Some(ms) = time(x, *f)? {
                if ms < best.0 {
                    best = (ms, *path);
                }
            }
        }
        let path = best.1;
        cache().lock().map_err(|_| poisoned())?.insert(key, path);
        Ok(path)
    }

    /// The best of 3 timed runs after one warm-up, in ms; `None` when the path does not serve or
    /// fails (e.g. out of memory for the im2col buffer: another candidate then serves).
    fn time(x: &Tensor, f: &dyn Fn() -> Result<Option<Tensor>>) -> Result<Option<f64>> {
        let stream = x.device().as_cuda_device()?.cuda_stream();
        let ev = |e| Error::Other(format!("conv autotune: cuda event: {e:?}"));
        if !matches!(f(), Ok(Some(_))) {
            return Ok(None);
        }
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(ev)?;
            drop(f()?);
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(ev)?;
            end.synchronize().map_err(ev)?;
            best = best.min(start.elapsed_ms(&end).map_err(ev)? as f64);
        }
        Ok(Some(best))
    }
}

/// Runs a candle module with the crate's error type.
pub fn apply<M: Module>(m: &M, x: &Tensor) -> Result<Tensor> {
    Ok(m.forward(x)?)
}

/// `(B, C·r², H, W)` -> `(B, C, H·r, W·r)` (torch `pixel_shuffle`).
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if c % (r * r) != 0 {
        return Err(Error::Other(format!("pixel_shuffle: {c} channels are not divisible by {r}²")));
    }
    let oc = c / (r * r);
    let y = x.reshape((b, oc, r, r, h, w))?.permute((0, 1, 4, 2, 5, 3))?;
    Ok(y.reshape((b, oc, h * r, w * r))?)
}

/// `(B, C, H·r, W·r)` -> `(B, C·r², H, W)` (torch `pixel_unshuffle`).
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % r != 0 || w % r != 0 {
        return Err(Error::Other(format!("pixel_unshuffle: {h}x{w} is not divisible by {r}")));
    }
    let (oh, ow) = (h / r, w / r);
    let y = x.reshape((b, c, oh, r, ow, r))?.permute((0, 1, 3, 5, 2, 4))?;
    Ok(y.reshape((b, c * r * r, oh, ow))?)
}

/// Repeats every channel `repeats` times in place: channel `c` becomes `c·repeats .. (c+1)·repeats`
/// (torch `repeat_interleave(repeats, dim=1)`).
pub fn repeat_interleave_channels(x: &Tensor, repeats: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let y = x.unsqueeze(2)?.broadcast_as((b, c, repeats, h, w))?;
    Ok(y.reshape((b, c * repeats, h, w))?)
}

/// Mean over consecutive groups of `group` channels: `(B, C, H, W)` -> `(B, C / group, H, W)`.
pub fn mean_channel_groups(x: &Tensor, group: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if group == 0 || c % group != 0 {
        return Err(Error::Other(format!("cannot average {c} channels in groups of {group}")));
    }
    Ok(x.reshape((b, c / group, group, h, w))?.mean(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values without an RNG dependency.
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (((i as u64 + 1) * (seed * 2 + 7919)) % 1013) as f32 / 506.5 - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn depthwise_matches_candle_grouped_conv() {
        for k in [3usize, 5] {
            let (c, h, w) = (6, 7, 9);
            let x = randn(&[2, c, h, w], 1);
            let weight = randn(&[c, 1, k, k], 2);
            let bias = randn(&[c], 3);
            let vb = VarBuilder::from_tensors(
                HashMap::from([("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())]),
                DType::F32,
                &Device::Cpu,
            );
            let ours = DepthwiseConv2d::new(c, k, true, vb).unwrap().forward(&x).unwrap();
            let cfg = Conv2dConfig { padding: k / 2, stride: 1, dilation: 1, groups: c, cudnn_fwd_algo: None };
            let reference = Conv2d::new(weight, Some(bias), cfg).forward(&x).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "k = {k}");
        }
    }

    #[test]
    fn depthwise_matmul_form_matches_candle_and_its_gradients_match_the_tap_form() {
        use candle_core::Var;
        for k in [3usize, 5] {
            let (c, h, w) = (6, 5, 7);
            let x = randn(&[2, c, h, w], 11);
            let weight = randn(&[c, 1, k, k], 12);
            let bias = randn(&[c], 13);
            let cfg = Conv2dConfig { padding: k / 2, stride: 1, dilation: 1, groups: c, cudnn_fwd_algo: None };
            let reference = Conv2d::new(weight.clone(), Some(bias.clone()), cfg).forward(&x).unwrap();
            // Gradients with respect to the input, the weight and the bias, through both forms.
            let grads = |matmul: bool| {
                let (xv, wv, bv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&weight).unwrap(), Var::from_tensor(&bias).unwrap());
                let conv = DepthwiseConv2d {
                    weight: wv.as_tensor().clone(),
                    bias: Some(bv.as_tensor().clone()),
                    kernel: k,
                    shifts: Arc::default(),
                };
                let y = if matmul { conv.forward_matmul(xv.as_tensor()) } else { conv.forward_taps(xv.as_tensor()) }.unwrap();
                // A non-uniform upstream gradient: weight the outputs by a fixed pattern.
                let loss = (&y * randn(&[2, c, h, w], 14)).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                (y, get(&xv), get(&wv), get(&bv))
            };
            let (y_m, gx_m, gw_m, gb_m) = grads(true);
            let (_y_t, gx_t, gw_t, gb_t) = grads(false);
            assert!(max_diff(&y_m, &reference) < 1e-5, "forward, k = {k}");
            assert!(max_diff(&gx_m, &gx_t) < 1e-4, "input gradient, k = {k}");
            assert!(max_diff(&gw_m, &gw_t) < 1e-4, "weight gradient, k = {k}");
            assert!(max_diff(&gb_m, &gb_t) < 1e-4, "bias gradient, k = {k}");
        }
    }

    #[test]
    fn grouped_pointwise_matches_candle_grouped_conv() {
        let (cin, cout, groups) = (12, 12, 4);
        let x = randn(&[2, cin, 3, 5], 4);
        let weight = randn(&[cout, cin / groups, 1, 1], 5);
        let vb = VarBuilder::from_tensors(HashMap::from([("weight".to_string(), weight.clone())]), DType::F32, &Device::Cpu);
        let ours = GroupedPointwiseConv2d::new(cin, cout, groups, vb).unwrap().forward(&x).unwrap();
        let cfg = Conv2dConfig { padding: 0, stride: 1, dilation: 1, groups, cudnn_fwd_algo: None };
        let reference = Conv2d::new(weight, None, cfg).forward(&x).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
    }

    #[test]
    fn pixel_shuffle_layout() {
        // torch: out[b, c, h·r + i, w·r + j] = in[b, c·r² + i·r + j, h, w]
        let x = Tensor::arange(0f32, 2.0 * 8.0 * 3.0 * 2.0, &Device::Cpu).unwrap().reshape((2, 8, 3, 2)).unwrap();
        let y = pixel_shuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), &[2, 2, 6, 4]);
        let get_in = |b: usize, c: usize, h: usize, w: usize| ((b * 8 + c) * 3 + h) * 2 + w;
        let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for b in 0..2 {
            for c in 0..2 {
                for h in 0..3 {
                    for w in 0..2 {
                        for i in 0..2 {
                            for j in 0..2 {
                                let out = ((b * 2 + c) * 6 + h * 2 + i) * 4 + w * 2 + j;
                                assert_eq!(yv[out] as usize, get_in(b, c * 4 + i * 2 + j, h, w));
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(max_diff(&pixel_unshuffle(&y, 2).unwrap(), &x), 0.0);
    }

    #[test]
    fn repeat_interleave_and_group_mean() {
        let x = Tensor::arange(0f32, 3.0, &Device::Cpu).unwrap().reshape((1, 3, 1, 1)).unwrap();
        let y: Vec<f32> = repeat_interleave_channels(&x, 2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        let z = Tensor::new(&[1f32, 3.0, 5.0, 7.0], &Device::Cpu).unwrap().reshape((1, 4, 1, 1)).unwrap();
        let m: Vec<f32> = mean_channel_groups(&z, 2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(m, [2.0, 6.0]);
    }
}
