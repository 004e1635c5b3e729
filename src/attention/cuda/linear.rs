//! SANA ReLU linear attention on the GPU: glue for kernels/attention/linear/linear_attn.cu.
//!
//! `o_n = (S ψ(q_n)) / (z·φ(q_n) + eps)`, `S = Σ_m v_m ψ(k_m)ᵀ`, `z = Σ_m φ(k_m)`, φ = ReLU,
//! ψ = φ or RoPE∘φ (the RoPE-numerator form of SANA-Video). Inputs `(B, H, N, D)` in bf16 or f16,
//! D ∈ {32, 64, 112, 128}; output in the same dtype; S and z in fp32.
//!
//! Two launches per chunk: `linear_state_*` adds the chunk's keys and values into S and z (fp32
//! buffers that start at zero, or at the state carried in), `linear_out_*` applies them to the
//! chunk's queries. The chunk-causal form is these two launches per chunk, in order, on one state.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};
use half::{bf16, f16};

use super::{aligned_contiguous, cuda_device, into_tensor, sm_count, CudaRead};
use crate::attention::linear::LinearState;
use crate::attention::Rope;
use crate::error::{Error, Result};
use crate::kernels;

const MODULE: &str = "attention/linear/linear_attn";
/// Head dims with a compiled kernel.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 112, 128];

// Mirrors of the kernel's tiling constants (linear_attn.cu): tokens per tile, pipeline stages.
const STATE_TOK: usize = 64;
const STATE_STAGES: usize = 3;

/// The output kernel's block shape (`OutConfig` in linear_attn.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutConfig {
    /// 4 warps × 16 tokens, 3 stages: the first version, bf16 and D ∈ {64, 112, 128} only.
    V1,
    /// 8 warps × 32 tokens, 2 stages: the default.
    V2,
    /// V2 with the denominator on the tensor cores (z as an extra row of S, ReLU on the
    /// fragments, no transform pass over Q). Plain form only: RoPE calls use V2.
    V3,
}

impl OutConfig {
    /// (warps, tokens per tile, stages)
    fn shape(self) -> (usize, usize, usize) {
        match self {
            OutConfig::V1 => (4, 64, 3),
            OutConfig::V2 | OutConfig::V3 => (8, 256, 2),
        }
    }
}

/// Which launches a call makes; all but `Both` exist to time the passes apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    Both,
    StateOnly,
    OutOnly,
}

/// How a call runs. `split_state`: S enters the query product as hi + lo parts in the element type
/// (~16 mantissa bits, two tensor-core products); without it S is rounded once to bf16/f16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelOptions {
    pub eps: f64,
    pub split_state: bool,
    pub out_config: OutConfig,
    pub passes: Passes,
}

impl KernelOptions {
    pub fn new(eps: f64) -> Self {
        // v3 (denominator on the tensor cores) with S rounded once: 1.3-1.6x faster than v2 split
        // on the H200, same parity margin (NOTES.md, linear v3).
        Self { eps, split_state: false, out_config: OutConfig::V3, passes: Passes::Both }
    }
}

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// For tests: fill every output with NaN before the kernel writes it, so that an element the
/// kernel forgets to write shows up as NaN.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

/// Whether the kernels serve this dtype and head dim (otherwise use the f32 reference).
pub fn supports(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && HEAD_DIMS.contains(&head_dim)
}

/// Bidirectional linear attention over all tokens. `rope`: tables `(N, D)` for the RoPE-numerator form.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, rope: Option<&Rope>, eps: f64) -> Result<Tensor> {
    let n = q.dim(2)?;
    Ok(run(q, k, v, rope, None, n.max(1), &KernelOptions::new(eps))?.0)
}

/// One chunk of block-causal linear attention: the chunk's queries attend the state carried in
/// plus all of the chunk's own tokens. Returns the output and the state after the chunk
/// (`state_in + this chunk`). `rope` tables cover this chunk's tokens `(N_chunk, D)`.
pub fn forward_chunk(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    state: Option<&LinearState>,
    eps: f64,
) -> Result<(Tensor, LinearState)> {
    let n = q.dim(2)?;
    run(q, k, v, rope, state, n.max(1), &KernelOptions::new(eps))
}

/// Block-causal linear attention over a whole sequence: tokens are split into chunks of
/// `chunk_tokens` (the last one shorter); each chunk attends all earlier chunks and itself.
/// Returns the output and the state after the last chunk.
pub fn forward_chunk_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    chunk_tokens: usize,
    eps: f64,
) -> Result<(Tensor, LinearState)> {
    if chunk_tokens == 0 {
        return Err(Error::Other("linear attention: chunk length must be positive".into()));
    }
    run(q, k, v, rope, None, chunk_tokens, &KernelOptions::new(eps))
}

/// Block-causal linear attention with chunks given by token boundaries `[0, b1, ..., N]` (LongSANA's
/// first chunk absorbs the remainder: frames `[0, 11, 21]` times tokens per frame). `rope` covers all
/// N tokens. Returns the output and the state after the last chunk.
pub fn forward_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    bounds: &[usize],
    eps: f64,
) -> Result<(Tensor, LinearState)> {
    run_bounds(q, k, v, rope, None, bounds, &KernelOptions::new(eps))
}

/// The general entry: chunks of `chunk_tokens` tokens in order on one state (a single chunk when
/// `chunk_tokens >= N`), starting from `state_in` or zero.
pub fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    state_in: Option<&LinearState>,
    chunk_tokens: usize,
    opts: &KernelOptions,
) -> Result<(Tensor, LinearState)> {
    let n = q.dim(2)?;
    let step = chunk_tokens.max(1);
    let mut bounds: Vec<usize> = (0..n).step_by(step).collect();
    bounds.push(n);
    run_bounds(q, k, v, rope, state_in, &bounds, opts)
}

/// [`run`] with chunk boundaries in tokens: `[0, b1, ..., N]`, increasing.
pub fn run_bounds(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    state_in: Option<&LinearState>,
    bounds: &[usize],
    opts: &KernelOptions,
) -> Result<(Tensor, LinearState)> {
    let bad = |m: String| Error::Other(format!("linear attention (CUDA): {m}"));
    let (b, h, n, d) = q.dims4().map_err(|_| bad(format!("q must be (B,H,N,D), got {:?}", q.dims())))?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        return Err(bad(format!("q {:?}, k {:?}, v {:?} must have one shape (self-attention)", q.dims(), k.dims(), v.dims())));
    }
    if !HEAD_DIMS.contains(&d) {
        return Err(bad(format!("head dim {d} has no kernel (compiled: {HEAD_DIMS:?})")));
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        return Err(bad(format!("q, k, v dtypes differ: {:?} {:?} {:?}", dtype, k.dtype(), v.dtype())));
    }
    if n > i32::MAX as usize / 2 {
        return Err(bad(format!("{n} tokens is too many")));
    }
    if n == 0 {
        return Err(bad("no tokens".into()));
    }
    let valid_bounds = bounds.len() >= 2
        && bounds[0] == 0
        && bounds[bounds.len() - 1] == n
        && bounds.windows(2).all(|w| w[0] < w[1]);
    if !valid_bounds {
        return Err(bad(format!("chunk boundaries {bounds:?} must rise from 0 to N = {n}")));
    }
    let dev = cuda_device(q, "linear attention")?;
    match dtype {
        DType::BF16 => run_typed::<bf16>(&dev, "bf16", q, k, v, rope, state_in, bounds, opts, (b, h, n, d)),
        DType::F16 => run_typed::<f16>(&dev, "f16", q, k, v, rope, state_in, bounds, opts, (b, h, n, d)),
        other => Err(bad(format!("dtype {other:?} has no kernel (bf16, f16)"))),
    }
}

/// The kernel's `Layout` parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KernelLayout {
    n_tokens: i32,
    n_begin: i32,
    n_count: i32,
    tiles_per_block: i32,
}
unsafe impl DeviceRepr for KernelLayout {}

/// Splits `tiles` tiles of each of `bh` heads over blocks so that about `slots` blocks run:
/// returns (tiles per block, blocks per head).
fn split_tiles(tiles: usize, bh: usize, slots: usize) -> (usize, usize) {
    let per_head = (slots / bh.max(1)).clamp(1, tiles.max(1));
    let tiles_per_block = tiles.div_ceil(per_head).max(1);
    (tiles_per_block, tiles.div_ceil(tiles_per_block).max(1))
}

#[allow(clippy::too_many_arguments)]
fn run_typed<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    tname: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rope>,
    state_in: Option<&LinearState>,
    bounds: &[usize],
    opts: &KernelOptions,
    (b, h, n, d): (usize, usize, usize, usize),
) -> Result<(Tensor, LinearState)> {
    let bad = |m: String| Error::Other(format!("linear attention (CUDA): {m}"));
    let elem = std::mem::size_of::<T>();
    let bh = b * h;
    let (q, k, v) = (aligned_contiguous(q)?, aligned_contiguous(k)?, aligned_contiguous(v)?);

    // RoPE tables (N, D) fp32.
    let tables = match rope {
        None => None,
        Some(r) => {
            let cos = r.cos.to_dtype(DType::F32)?.contiguous()?;
            let sin = r.sin.to_dtype(DType::F32)?.contiguous()?;
            if cos.dims() != [n, d] || sin.dims() != [n, d] {
                return Err(bad(format!("RoPE tables must be ({n}, {d}), got {:?} and {:?}", cos.dims(), sin.dims())));
            }
            Some((cos, sin))
        }
    };

    // The state: fp32 S (BH, D, D) and z (BH, D), zero or copied from the state carried in.
    let mut kv: CudaSlice<f32> = dev.alloc_zeros(bh * d * d)?;
    let mut ksum: CudaSlice<f32> = dev.alloc_zeros(bh * d)?;
    if let Some(s) = state_in {
        if s.kv.dims() != [b, h, d, d] || s.k_sum.dims() != [b, h, d] {
            return Err(bad(format!(
                "state must be kv ({b}, {h}, {d}, {d}) and k_sum ({b}, {h}, {d}), got {:?} and {:?}",
                s.kv.dims(),
                s.k_sum.dims()
            )));
        }
        let s_kv = s.kv.to_dtype(DType::F32)?.contiguous()?;
        let s_z = s.k_sum.to_dtype(DType::F32)?.contiguous()?;
        let (r_kv, r_z) = (CudaRead::new(&s_kv)?, CudaRead::new(&s_z)?);
        dev.memcpy_dtod(&r_kv.view::<f32>()?, &mut kv)?;
        dev.memcpy_dtod(&r_z.view::<f32>()?, &mut ksum)?;
    }

    let mut out = unsafe { dev.alloc::<T>(bh * n * d)? };
    if POISON_OUTPUTS.load(Ordering::Relaxed) {
        let fill = kernels::load(dev, MODULE, "linear_fill_u16")?;
        let (len, value) = ((bh * n * d) as u64, 0xFFFFu16);
        let cfg = LaunchConfig { grid_dim: (1024, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut launch = fill.builder();
        launch.arg(&mut out).arg(&len).arg(&value);
        unsafe { launch.launch(cfg) }.map_err(|e| bad(format!("fill launch: {e:?}")))?;
    }

    let rope_tag = if tables.is_some() { "_rope" } else { "" };
    let split_tag = if opts.split_state { "_split" } else { "" };
    let v3 = opts.out_config == OutConfig::V3 && tables.is_none();
    let version_tag = match opts.out_config {
        OutConfig::V1 => "_v1",
        OutConfig::V3 if v3 => "_v3",
        _ => "",
    };
    let state_fn = kernels::load(dev, MODULE, &format!("linear_state{rope_tag}_{tname}_d{d}"))?;
    let out_fn = kernels::load(dev, MODULE, &format!("linear_out{rope_tag}{split_tag}{version_tag}_{tname}_d{d}"))?;
    let state_threads = 2 * d;
    let state_smem = 2 * STATE_STAGES * STATE_TOK * (d + 8) * elem;
    let (out_warps, out_tok, out_stages) = opts.out_config.shape();
    let out_threads = 32 * out_warps;
    // Q stages, S hi (+ lo) with z as an extra row block in v3, then fp32 z, 1/c per row and the
    // denominators (`RS` rows in linear_attn.cu).
    let rows = if v3 { d + 8 } else { d };
    let out_smem = (out_stages * out_tok * (d + 8) + (1 + opts.split_state as usize) * rows * (d + 8)) * elem + (2 * rows + out_tok) * 4;
    state_fn.set_max_dynamic_smem(state_smem)?;
    out_fn.set_max_dynamic_smem(out_smem)?;
    let sms = sm_count(dev)? as usize;
    let state_slots = sms * state_fn.blocks_per_sm(state_threads as u32, state_smem)? as usize;
    let out_slots = sms * out_fn.blocks_per_sm(out_threads as u32, out_smem)? as usize;

    let (rq, rk, rv) = (CudaRead::new(&q)?, CudaRead::new(&k)?, CudaRead::new(&v)?);
    let (vq, vk, vv) = (rq.view::<T>()?, rk.view::<T>()?, rv.view::<T>()?);
    let table_reads = match &tables {
        Some((c, s)) => Some((CudaRead::new(c)?, CudaRead::new(s)?)),
        None => None,
    };
    let table_views = match &table_reads {
        Some((c, s)) => Some((c.view::<f32>()?, s.view::<f32>()?)),
        None => None,
    };
    let null: u64 = 0;
    let eps = opts.eps as f32;

    for w in bounds.windows(2) {
        let (begin, count) = (w[0], w[1] - w[0]);
        if count == 0 {
            continue;
        }
        // Pass 1: S, z += this chunk's keys and values.
        let (tpb, blocks) = split_tiles(count.div_ceil(STATE_TOK), bh, state_slots);
        let layout = KernelLayout { n_tokens: n as i32, n_begin: begin as i32, n_count: count as i32, tiles_per_block: tpb as i32 };
        let run_state = opts.passes != Passes::OutOnly;
        let cfg = LaunchConfig {
            grid_dim: (bh as u32, blocks as u32, 1),
            block_dim: (state_threads as u32, 1, 1),
            shared_mem_bytes: state_smem as u32,
        };
        if run_state {
            let mut launch = state_fn.builder();
            launch.arg(&vk).arg(&vv);
            match &table_views {
                Some((c, s)) => launch.arg(c).arg(s),
                None => launch.arg(&null).arg(&null),
            };
            launch.arg(&mut kv).arg(&mut ksum).arg(&layout);
            unsafe { launch.launch(cfg) }.map_err(|e| bad(format!("state kernel launch: {e:?}")))?;
        }

        // Pass 2: this chunk's outputs from the updated state.
        let (tpb, blocks) = split_tiles(count.div_ceil(out_tok), bh, out_slots);
        let layout = KernelLayout { tiles_per_block: tpb as i32, ..layout };
        let run_out = opts.passes != Passes::StateOnly;
        let cfg = LaunchConfig {
            grid_dim: (bh as u32, blocks as u32, 1),
            block_dim: (out_threads as u32, 1, 1),
            shared_mem_bytes: out_smem as u32,
        };
        if run_out {
            let mut launch = out_fn.builder();
            launch.arg(&vq).arg(&mut out);
            match &table_views {
                Some((c, s)) => launch.arg(c).arg(s),
                None => launch.arg(&null).arg(&null),
            };
            launch.arg(&kv).arg(&ksum).arg(&eps).arg(&layout);
            unsafe { launch.launch(cfg) }.map_err(|e| bad(format!("output kernel launch: {e:?}")))?;
        }
    }

    let o = into_tensor(out, dev, (b, h, n, d));
    let state = LinearState { kv: into_tensor(kv, dev, (b, h, d, d)), k_sum: into_tensor(ksum, dev, (b, h, d)) };
    Ok((o, state))
}
