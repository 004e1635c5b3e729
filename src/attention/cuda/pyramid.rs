//! Pyramid sparse attention (PSA) on the GPU (kernels/attention/pyramid/psa_fwd.cu).
//!
//! One call: (1) block importance from sampled queries and keys and its ranking per query block
//! (descending, ties by index): a gather pass and one wgmma/TMA kernel with the ranking fused
//! (kernels/attention/pyramid/psa_importance_tc.cu); the v2 mma.sync kernel + `arg_sort`
//! (psa_importance.cu) and the candle-ops path stay for the cases it does not serve and the CPU;
//! (2) `psa_pool_*` mean-pools k and v at 2, 4 and 8;
//! (3) `psa_fwd_*` attends every query block to its ranked KV blocks at the level of their rank
//! (Topk mode: the same rank ranges for every row, so the tile schedule is built once on the
//! host from `pyramid::topk_ranges`), all levels in one kernel with the `ln p` logit bias.
//!
//! Served: bf16 / f16, head dims 64-128 (multiples of 8 with a compiled kernel), block_q 128,
//! block_k 64, Topk mode. Anything else is an error naming why.

use candle_core::cuda_backend::cudarc::driver::result::memset_d8_async;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Tensor};
use half::{bf16, f16};

use super::{dev_ptr, into_tensor, kernel_view, strides3, tensor_map};
use crate::attention::pyramid::{self, LevelMask, LevelMode, PyramidParams};
use crate::error::{Error, Result};

mod importance;
pub use importance::{
    fused_importance_serves, importance_ranked, importance_ranked_fused, importance_ranked_ops, importance_ranked_tc,
    importance_ranked_tc_with, tc_importance_serves, RankingSort,
};

pub const HEAD_DIMS: [usize; 5] = [64, 72, 96, 112, 128];
const MODULE: &str = "attention/pyramid/psa_fwd";
const BLOCK_Q: usize = 128;
const BLOCK_K: usize = 64;

fn err(msg: impl Into<String>) -> Error {
    Error::Other(format!("pyramid attention (cuda): {}", msg.into()))
}

pub fn supports(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && HEAD_DIMS.contains(&head_dim)
}

/// Whether the kernel serves these parameters; `Err` names why not.
pub fn check_params(p: &PyramidParams) -> std::result::Result<(), String> {
    p.validate()?;
    if p.block_q != BLOCK_Q || p.block_k != BLOCK_K {
        return Err(format!("the CUDA kernel serves block_q {BLOCK_Q} and block_k {BLOCK_K}, got {} and {}", p.block_q, p.block_k));
    }
    if p.mode != LevelMode::Topk {
        return Err("the CUDA kernel serves the Topk level mode (its rank ranges are the same for every row)".into());
    }
    Ok(())
}

/// The kernel's tile schedule: `(pool, first rank, blocks)` per compute tile of 128 pooled rows
/// (2p blocks of 64/p rows at pool p), from the Topk rank ranges; a row with nothing selected
/// gets its top block at pool 1 (as `assign_levels`).
pub fn schedule(k_blocks: usize, p: &PyramidParams) -> Vec<(usize, usize, usize)> {
    let mut ranges = pyramid::topk_ranges(k_blocks, p);
    if ranges.is_empty() && k_blocks > 0 {
        ranges.push((1, 0, 1));
    }
    let mut tiles = Vec::new();
    for (pool, from, to) in ranges {
        let cap = 2 * pool;
        let mut start = from;
        while start < to {
            let n = cap.min(to - start);
            tiles.push((pool, start, n));
            start += n;
        }
    }
    tiles
}

/// The level mask a ranking gives under [`schedule`]: `ranked` is `(B, H, q_blocks, k_blocks)`.
pub fn levels_from_ranking(ranked: &[u32], dims: (usize, usize, usize, usize), p: &PyramidParams) -> LevelMask {
    let (b, h, qb, kb) = dims;
    let mut mask = LevelMask::new(b, h, qb, kb);
    let sched = schedule(kb, p);
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..qb {
                let row = &ranked[((bi * h + hi) * qb + i) * kb..][..kb];
                for &(pool, start, n) in &sched {
                    for &blk in &row[start..start + n] {
                        mask.set(bi, hi, i, blk as usize, pool);
                    }
                }
            }
        }
    }
    mask
}

#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct PsaArgs {
    maps: [[u64; 16]; 9], // q, k[4], v[4]
    o: u64,
    lse: u64,
    ranked: u64,
    schedule: u64,
    o_stride: [i64; 3],
    lse_stride: [i64; 2],
    n: i32,
    q_blocks: i32,
    k_blocks: i32,
    n_sched: i32,
    scale_log2: f32,
    serial_producer: i32,
    heads: i32,
    items: i32,
    pingpong: i32,
}
// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for PsaArgs {}
const _: () = assert!(std::mem::size_of::<PsaArgs>() == 1280 && std::mem::offset_of!(PsaArgs, o) == 1152);

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PsaPoolArgs {
    src: [u64; 2],
    dst: [[u64; 2]; 2],
    kv8: u64,
    src_stride: [[i64; 3]; 2],
    heads: i32,
    n: i32,
    n_pad: i32,
    chunks: i32,
    pad_chunks: i32,
    level_mask: i32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for PsaPoolArgs {}
const _: () = assert!(std::mem::size_of::<PsaPoolArgs>() == 128);

fn ptr_of(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    match t.dtype() {
        DType::BF16 => dev_ptr::<bf16>(t, dev),
        DType::F16 => dev_ptr::<f16>(t, dev),
        DType::U32 => dev_ptr::<u32>(t, dev),
        other => Err(err(format!("unexpected dtype {other:?}"))),
    }
}

fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor, p: &PyramidParams) -> Result<(usize, usize, usize, usize)> {
    let (b, h, nq, nk, d) = super::super::check_qkv(q, k, v)?;
    let dtype = q.dtype();
    if !supports(dtype, d) {
        return Err(err(format!("dtype {dtype:?} / head_dim {d} not compiled (bf16/f16, head_dim in {HEAD_DIMS:?})")));
    }
    if k.dtype() != dtype || v.dtype() != dtype {
        return Err(err("q, k, v must share a dtype"));
    }
    if nq != nk {
        return Err(err(format!("self-attention only: q has {nq} tokens, k has {nk}")));
    }
    check_params(p).map_err(|m| err(m))?;
    if b > 65535 || h > 65535 {
        return Err(err("batch or heads above 65535"));
    }
    Ok((b, h, nq, d))
}

/// PSA forward on the GPU: importance, ranking, pooling, mixed-level attention. Returns
/// `O (B, H, N, D)` in q's dtype.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, p: &PyramidParams) -> Result<Tensor> {
    let (_, _, _, d) = check_inputs(q, k, v, p)?;
    let scale = p.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let (_, ranked) = importance_ranked(q, k, p, scale)?;
    Ok(forward_with_ranking(q, k, v, &ranked, p, &AttentionOptions::default())?.0)
}

/// How [`forward_with_ranking`] runs the attention kernel. The default is the configuration
/// measured fastest on the H200 (kernels/NOTES.md, ## pyramid v4); the others give identical
/// results (tested) and exist for comparison runs (bench_sparse) and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionOptions {
    pub grid: Grid,
    /// The v1 producer: one thread issues every TMA box of a tile (default: one lane per block).
    pub serial_producer: bool,
    /// The two consumer warpgroups take turns issuing their GEMMs (FlashAttention-3's ping-pong),
    /// so one's softmax runs under the other's GEMMs (attention kernel 8% faster at SANA-Video
    /// 480p, kernels/NOTES.md ## pyramid v5).
    pub pingpong: bool,
    /// Fill O and lse with NaN bytes before the launch (tests: no row left unwritten).
    pub poison: bool,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self { grid: Grid::Persistent, serial_producer: false, pingpong: true, poison: false }
    }
}

/// How the work items (b, h, query block) are spread over CTAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grid {
    /// One CTA per SM, CTA c taking items c, c + grid, ...: the next item's Q and first K/V
    /// load under the current one's last P V and epilogue (4.3% faster than `PerItem`).
    Persistent,
    /// `n` CTAs taking the items round robin (tests: many items per CTA at small shapes).
    Ctas(usize),
    /// One CTA per item (v3's grid).
    PerItem,
}

/// The attention part alone, given the ranking `(B, H, q_blocks, k_blocks)` u32; returns
/// `(O, lse)`: [`pool_kv`], then [`attention_pooled`].
pub fn forward_with_ranking(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ranked: &Tensor,
    p: &PyramidParams,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    check_inputs(q, k, v, p)?;
    let pooled = pool_kv(k, v, p)?;
    attention_pooled(q, k, v, &pooled, ranked, p, opts)
}

/// k and v mean-pooled at 2, 4 and 8 along the sequence (replicate-padded to whole KV blocks),
/// for [`attention_pooled`]: pools 2 and 4 as `(B, H, n_pad / p, D)` tensors; pool 8 with K and
/// V interleaved per KV block (`(B, H, k_blocks, 2, C, 8, 64)`, D padded to C·64 with zeros), so
/// the kernel loads a block's pooled keys and values as one box (psa_fwd.cuh).
pub struct PooledKv {
    /// k at pool 2, 4, then v at pool 2, 4 (`None` where the schedule has no tile at that pool).
    pool24: Vec<Option<CudaSlice<u16>>>,
    kv8: Option<CudaSlice<u16>>,
    /// Bit l: pool 2^(l+1) was written (the levels `p`'s schedule uses).
    level_mask: u32,
    dims: (usize, usize, usize, usize),
    dtype: DType,
}

/// Bit l set where the Topk schedule of `p` has tiles at pool 2^(l+1) (bit 0: pool 2).
fn pooled_levels_used(k_blocks: usize, p: &PyramidParams) -> u32 {
    schedule(k_blocks, p).iter().filter(|t| t.0 > 1).fold(0, |m, t| m | 1 << (t.0.trailing_zeros() - 1))
}

/// One pass over k and v (`psa_pool_*`): the pooled levels of [`PooledKv`] that `p` uses.
pub fn pool_kv(k: &Tensor, v: &Tensor, p: &PyramidParams) -> Result<PooledKv> {
    let (b, h, n, d) = k.dims4()?;
    let dtype = k.dtype();
    if v.dims4()? != (b, h, n, d) || v.dtype() != dtype || !supports(dtype, d) {
        return Err(err(format!("pool: k {:?} {dtype:?} and v {:?} {:?} must match, bf16/f16 with a compiled head dim", k.dims(), v.dims(), v.dtype())));
    }
    check_params(p).map_err(|m| err(m))?;
    let dev = super::cuda_device(k, "pyramid pooling (cuda)")?;
    let stream = dev.cuda_stream();
    let (k, v) = (kernel_view(k)?, kernel_view(v)?);
    let kb = n.div_ceil(BLOCK_K);
    let n_pad = kb * BLOCK_K;
    let level_mask = pooled_levels_used(kb, p);
    if n == 0 || b * h == 0 || level_mask == 0 {
        // (nothing to pool: an empty sequence, or a schedule of pool-1 tiles only)
        return Ok(PooledKv { pool24: vec![None; 4], kv8: None, level_mask, dims: (b, h, n, d), dtype });
    }
    // Only the levels the schedule uses (pool 4 has no tiles at the defaults).
    let pool24 = (0..4)
        .map(|i| (level_mask >> (i % 2) & 1 == 1).then(|| unsafe { dev.alloc::<u16>(b * h * (n_pad >> (i % 2 + 1)) * d) }).transpose())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let pad = padded_head_dim(d);
    let kv8 = (level_mask >> 2 & 1 == 1).then(|| unsafe { dev.alloc::<u16>(b * h * kb * 2 * 8 * pad) }).transpose()?;
    let ptr = |x: &Option<CudaSlice<u16>>| x.as_ref().map_or(0, |x| x.device_ptr(&stream).0);
    let mut pool_args = PsaPoolArgs {
        kv8: ptr(&kv8),
        heads: h as i32,
        n: n as i32,
        n_pad: n_pad as i32,
        chunks: (d / 8) as i32,
        pad_chunks: (pad / 8) as i32,
        level_mask: level_mask as i32,
        ..Default::default()
    };
    for (w, t) in [&k, &v].into_iter().enumerate() {
        pool_args.src[w] = ptr_of(t, &dev)?;
        pool_args.src_stride[w] = strides3(t);
        for l in 0..2 {
            pool_args.dst[w][l] = ptr(&pool24[w * 2 + l]);
        }
    }
    let suffix = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let pool_kernel = crate::kernels::load(&dev, MODULE, &format!("psa_pool_{suffix}"))?;
    let work = n_pad / 8 * d / 8;
    let cfg = LaunchConfig { grid_dim: (work.div_ceil(256) as u32, (b * h) as u32, 2), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = pool_kernel.builder();
    launch.arg(&pool_args);
    // SAFETY: sources cover (B, H, N, D) at their strides; the levels in level_mask (the only ones
    // written) have destinations of B·H·n_pad/p·D elements (pool 2, 4) and B·H·k_blocks·2·8·pad (kv8).
    unsafe { launch.launch(cfg) }.map_err(|e| err(format!("pool launch failed: {e:?}")))?;
    Ok(PooledKv { pool24, kv8, level_mask, dims: (b, h, n, d), dtype })
}

/// Head dim padded to whole 64-column (128-byte) swizzle blocks, as the kernels' `kDPad`.
fn padded_head_dim(d: usize) -> usize {
    if d <= 64 { 64 } else { 128 }
}

/// The mixed-level attention kernel on k, v and their pooled levels (from [`pool_kv`] of the
/// same k and v); returns `(O, lse)`.
pub fn attention_pooled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pooled: &PooledKv,
    ranked: &Tensor,
    p: &PyramidParams,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    let (b, h, n, d) = check_inputs(q, k, v, p)?;
    let dtype = q.dtype();
    if pooled.dims != (b, h, n, d) || pooled.dtype != dtype {
        return Err(err(format!("pooled k/v of {:?} {:?}, the inputs are {:?} {dtype:?}", pooled.dims, pooled.dtype, (b, h, n, d))));
    }
    let needed = pooled_levels_used(n.div_ceil(BLOCK_K), p);
    if needed & !pooled.level_mask != 0 {
        return Err(err(format!("the schedule needs pooled levels {needed:#b}, pool_kv wrote {:#b} (pool with the same params)", pooled.level_mask)));
    }
    let dev = super::cuda_device(q, "pyramid attention (cuda)")?;
    let scale = p.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let (qb, kb) = (n.div_ceil(BLOCK_Q), n.div_ceil(BLOCK_K));
    if ranked.dims() != [b, h, qb, kb] || ranked.dtype() != DType::U32 {
        return Err(err(format!("ranking must be u32 ({b}, {h}, {qb}, {kb}), got {:?} {:?}", ranked.dtype(), ranked.dims())));
    }
    if n == 0 || b * h == 0 {
        return Ok((Tensor::zeros((b, h, n, d), dtype, q.device())?, Tensor::zeros((b, h, n), DType::F32, q.device())?));
    }
    let ranked = ranked.contiguous()?;
    let stream = dev.cuda_stream();
    let (q, k, v) = (kernel_view(q)?, kernel_view(k)?, kernel_view(v)?);
    let n_pad = kb * BLOCK_K;

    // The tile schedule (the same for every query block in Topk mode) and the kernel.
    let sched: Vec<i32> = schedule(kb, p)
        .into_iter()
        .map(|(pool, start, nb)| ((start as i32) << 8) | ((nb as i32) << 2) | pool.trailing_zeros() as i32)
        .collect();
    let sched_dev = super::cached_table(&dev, &sched)?;
    let mut maps = [[0u64; 16]; 9];
    maps[0] = tensor_map(ptr_of(&q, &dev)?, dtype, (b, h, n, d), strides3(&q), 128)?;
    maps[1] = tensor_map(ptr_of(&k, &dev)?, dtype, (b, h, n, d), strides3(&k), 64)?;
    maps[5] = tensor_map(ptr_of(&v, &dev)?, dtype, (b, h, n, d), strides3(&v), 64)?;
    // (levels without tiles keep zero maps: the kernel never reads them)
    for l in 1..3 {
        let rows = n_pad >> l;
        let st = [(h * rows * d) as i64, (rows * d) as i64, d as i64];
        if let (Some(kl), Some(vl)) = (&pooled.pool24[l - 1], &pooled.pool24[2 + l - 1]) {
            maps[1 + l] = tensor_map(kl.device_ptr(&stream).0, dtype, (b, h, rows, d), st, (64 >> l) as u32)?;
            maps[5 + l] = tensor_map(vl.device_ptr(&stream).0, dtype, (b, h, rows, d), st, (64 >> l) as u32)?;
        }
    }
    // Pool 8: rows of 64 columns (128 bytes), 2C·8 per KV block (K and V), one box per block.
    if let Some(kv8) = &pooled.kv8 {
        let kv8_rows = 2 * 8 * padded_head_dim(d) / 64;
        let rows = kb * kv8_rows;
        maps[4] = tensor_map(kv8.device_ptr(&stream).0, dtype, (b, h, rows, 64), [(h * rows * 64) as i64, (rows * 64) as i64, 64], kv8_rows as u32)?;
    }
    maps[8] = maps[4]; // unused by the kernel (v[3])
    // Work items (b, h, query block), CTA c taking items c, c + grid, ... (see `Grid`).
    let items = b * h * qb;
    if items > i32::MAX as usize {
        return Err(err(format!("{items} work items (B H q_blocks) exceed i32")));
    }
    let ctas = match opts.grid {
        Grid::Persistent => super::sm_count(&dev)? as usize,
        Grid::Ctas(n) => n.max(1),
        Grid::PerItem => items,
    }
    .min(items) as u32;
    let out_elems = b * h * n * d;
    let lse = unsafe { dev.alloc::<f32>(b * h * n)? };
    let (o_bf16, o_f16) = match dtype {
        DType::BF16 => (Some(unsafe { dev.alloc::<bf16>(out_elems)? }), None),
        _ => (None, Some(unsafe { dev.alloc::<f16>(out_elems)? })),
    };
    let o_ptr = match (&o_bf16, &o_f16) {
        (Some(o), _) => o.device_ptr(&stream).0,
        (_, Some(o)) => o.device_ptr(&stream).0,
        _ => unreachable!(),
    };
    let args = PsaArgs {
        maps,
        o: o_ptr,
        lse: lse.device_ptr(&stream).0,
        ranked: ptr_of(&ranked, &dev)?,
        schedule: sched_dev.device_ptr(&stream).0,
        o_stride: [(h * n * d) as i64, (n * d) as i64, d as i64],
        lse_stride: [(h * n) as i64, n as i64],
        n: n as i32,
        q_blocks: qb as i32,
        k_blocks: kb as i32,
        n_sched: sched.len() as i32,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        serial_producer: opts.serial_producer as i32,
        heads: h as i32,
        items: items as i32,
        pingpong: opts.pingpong as i32,
    };
    if opts.poison {
        for (ptr, bytes) in [(args.o, out_elems * 2), (args.lse, b * h * n * 4)] {
            // SAFETY: fresh allocations of exactly these sizes.
            unsafe { memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.map_err(|e| err(format!("poison: {e:?}")))?;
        }
    }
    let suffix = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let kernel = crate::kernels::load(&dev, MODULE, &format!("psa_fwd_{suffix}_d{d}"))?;
    let pad = if d <= 64 { 64 } else { 128 };
    // dense_wgmma::Tile<D, 2>::kSmemBytes (+ the kernel's static `last_slot`, 12 B).
    let smem = (128 * pad + 2 * 3 * 128 * pad) * 2 + 128 + 1024;
    kernel.set_max_dynamic_smem(smem)?;
    let cfg = LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (384, 1, 1), shared_mem_bytes: smem as u32 };
    let mut launch = kernel.builder();
    launch.arg(&args);
    // SAFETY: maps cover q, k, v and the pooled buffers; ranked holds B·H·qb·kb block ids < kb;
    // the schedule's ranks are < kb; o and lse hold B·H·N rows.
    unsafe { launch.launch(cfg) }.map_err(|e| err(format!("launch failed: {e:?}")))?;
    drop(sched_dev);
    let o = match (o_bf16, o_f16) {
        (Some(o), _) => into_tensor(o, &dev, (b, h, n, d)),
        (_, Some(o)) => into_tensor(o, &dev, (b, h, n, d)),
        _ => unreachable!(),
    };
    Ok((o, into_tensor(lse, &dev, (b, h, n))))
}
