//! PSA block importance and its ranking on the GPU (and the candle-ops path, any device): the
//! wgmma kernel with the ranking fused (v3, psa_importance_tc.cu), the mma.sync kernel +
//! `arg_sort` (v2, psa_importance.cu), the candle-ops path; [`importance_ranked`] picks one.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::{DType, Tensor};

use super::super::{cached_table, cuda_device, into_tensor, kernel_view, strides3, tensor_map};
use super::{err, ptr_of, supports, BLOCK_K, BLOCK_Q, HEAD_DIMS};
use crate::attention::pyramid::{self, PyramidParams};
use crate::error::Result;

const IMPORTANCE_MODULE: &str = "attention/pyramid/psa_importance";
const TC_MODULE: &str = "attention/pyramid/psa_importance_tc";

/// Importance `(B, H, q_blocks, k_blocks)` f32 (rows sum to 1) and its ranking (u32, most
/// important first, ties by index), from `pyramid::sample_positions` (the reference's samples).
/// On the GPU, when [`tc_importance_serves`], the wgmma kernel with the ranking fused
/// ([`importance_ranked_tc`]); else when [`fused_importance_serves`], the mma.sync kernel +
/// `arg_sort` ([`importance_ranked_fused`]); otherwise (CPU, other sample counts, very long
/// sequences) [`importance_ranked_ops`].
pub fn importance_ranked(q: &Tensor, k: &Tensor, p: &PyramidParams, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, h, n, d) = q.dims4()?;
    if q.device().is_cuda() && tc_importance_serves(q.dtype(), d, b * h, n, p) {
        importance_ranked_tc(q, k, p, scale)
    } else if q.device().is_cuda() && fused_importance_serves(q.dtype(), d, n, p) {
        importance_ranked_fused(q, k, p, scale)
    } else {
        importance_ranked_ops(q, k, p, scale)
    }
}

/// The fused kernel's limits: bf16 / f16, a compiled head dim, 32 sampled queries per block of
/// 128, 16 sampled keys per block of 64, and the per-CTA block maxima (64 rows x k_blocks f32)
/// in shared memory: k_blocks <= 625 at D 128 (N <= 40000), <= 719 at D 72.
pub fn fused_importance_serves(dtype: DType, head_dim: usize, n: usize, p: &PyramidParams) -> bool {
    supports(dtype, head_dim)
        && p.block_q == BLOCK_Q
        && p.block_k == BLOCK_K
        && p.sample_q_count() == IMP_SAMPLE_Q
        && p.sample_k_count() == IMP_SAMPLE_K
        && n > 0
        && importance_smem(head_dim, n.div_ceil(BLOCK_K)) <= MAX_DYNAMIC_SMEM
}

const IMP_SAMPLE_Q: usize = 32;
const IMP_SAMPLE_K: usize = 16;
/// Opt-in dynamic shared memory per block on sm_90 (227 KiB).
const MAX_DYNAMIC_SMEM: usize = 232_448;

/// `psa_importance`'s dynamic shared memory (psa_importance.cu): two stages of 128 key rows
/// (row stride D padded to 16, + 8), the block maxima of 64 rows, 64 row maxima, one row of S,
/// 8 partial sums.
fn importance_smem(d: usize, k_blocks: usize) -> usize {
    let ld = d.div_ceil(16) * 16 + 8;
    2 * 128 * ld * 2 + (64 * k_blocks + 64 + k_blocks + 8) * 4
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PsaImportanceArgs {
    q: u64,
    k: u64,
    imp: u64,
    q_pos: u64,
    k_pos: u64,
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    heads: i32,
    n: i32,
    q_blocks: i32,
    k_blocks: i32,
    scale: f32,
    unused: i32,
}
// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for PsaImportanceArgs {}
const _: () = assert!(std::mem::size_of::<PsaImportanceArgs>() == 112);

/// [`importance_ranked`] through the fused kernel (psa_importance.cu): per CTA two query blocks'
/// sampled rows against every sampled key of the head on the tensor cores (f32 accumulators),
/// block maxima reduced in registers, exp / max / normalization in shared memory; then candle's
/// `arg_sort` ranks each row. Errors when [`fused_importance_serves`] is false.
pub fn importance_ranked_fused(q: &Tensor, k: &Tensor, p: &PyramidParams, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, h, n, d) = q.dims4()?;
    if k.dims4()? != (b, h, n, d) || k.dtype() != q.dtype() {
        return Err(err(format!("importance: q {:?} {:?} and k {:?} {:?} must match", q.dims(), q.dtype(), k.dims(), k.dtype())));
    }
    if !fused_importance_serves(q.dtype(), d, n, p) {
        return Err(err(format!(
            "the fused importance kernel serves bf16/f16, head_dim in {HEAD_DIMS:?}, block_q {BLOCK_Q} / block_k {BLOCK_K}, \
             {IMP_SAMPLE_Q} / {IMP_SAMPLE_K} samples, N <= 40000 (D 128); got {:?} D{d} N{n}",
            q.dtype()
        )));
    }
    if b > 65535 || b * h > 65535 {
        return Err(err("batch x heads above 65535"));
    }
    let dev = cuda_device(q, "pyramid importance (cuda)")?;
    let stream = dev.cuda_stream();
    let (qb, kb) = (n.div_ceil(BLOCK_Q), n.div_ceil(BLOCK_K));
    let samples = pyramid::sample_positions(p, b, h);
    let q_pos: Vec<i32> = samples.q.iter().flatten().map(|&x| x as i32).collect();
    let k_pos: Vec<i32> = samples.k.iter().flatten().map(|&x| x as i32).collect();
    let (q_pos, k_pos) = (cached_table(&dev, &q_pos)?, cached_table(&dev, &k_pos)?);
    let (q, k) = (kernel_view(q)?, kernel_view(k)?);  // 16-byte copies of rows
    let imp = unsafe { dev.alloc::<f32>(b * h * qb * kb)? };
    let args = PsaImportanceArgs {
        q: ptr_of(&q, &dev)?,
        k: ptr_of(&k, &dev)?,
        imp: imp.device_ptr(&stream).0,
        q_pos: q_pos.device_ptr(&stream).0,
        k_pos: k_pos.device_ptr(&stream).0,
        q_stride: strides3(&q),
        k_stride: strides3(&k),
        heads: h as i32,
        n: n as i32,
        q_blocks: qb as i32,
        k_blocks: kb as i32,
        scale: scale as f32,
        unused: 0,
    };
    let suffix = if q.dtype() == DType::BF16 { "bf16" } else { "f16" };
    let kernel = crate::kernels::load(&dev, IMPORTANCE_MODULE, &format!("psa_importance_{suffix}_d{d}"))?;
    let smem = importance_smem(d, kb);
    kernel.set_max_dynamic_smem(smem)?;
    let cfg = LaunchConfig { grid_dim: (qb.div_ceil(2) as u32, (b * h) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 };
    let mut launch = kernel.builder();
    launch.arg(&args);
    // SAFETY: q and k cover (B, H, N, D) at their strides (16-byte aligned rows); q_pos / k_pos
    // hold B·H·32 / B·H·16 offsets < 128 / 64; imp holds B·H·qb·kb floats; smem as computed.
    unsafe { launch.launch(cfg) }.map_err(|e| err(format!("importance launch failed: {e:?}")))?;
    drop(q_pos);
    drop(k_pos);
    let imp = into_tensor(imp, &dev, (b, h, qb, kb));
    let ranked = imp.arg_sort_last_dim(false)?;
    Ok((imp, ranked))
}

/// The wgmma kernel's limits (psa_importance_tc.cu): bf16 / f16, a compiled head dim, 32 / 16
/// samples per block of 128 / 64, k_blocks <= 1024 (N <= 65536: 8 rows of keys padded to a
/// power of two are sorted in the shared memory of the main loop), B·H <= 65535.
pub fn tc_importance_serves(dtype: DType, head_dim: usize, batch_heads: usize, n: usize, p: &PyramidParams) -> bool {
    supports(dtype, head_dim)
        && p.block_q == BLOCK_Q
        && p.block_k == BLOCK_K
        && p.sample_q_count() == IMP_SAMPLE_Q
        && p.sample_k_count() == IMP_SAMPLE_K
        && n > 0
        && n.div_ceil(BLOCK_K) <= 1024
        && batch_heads > 0
        && batch_heads <= 65535
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PsaGatherArgs {
    q: u64,
    k: u64,
    qs: u64,
    ks: u64,
    q_pos: u64,
    k_pos: u64,
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    heads: i32,
    n: i32,
    q_blocks: i32,
    k_blocks: i32,
    chunks: i32,
    unused: i32,
}
// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for PsaGatherArgs {}
const _: () = assert!(std::mem::size_of::<PsaGatherArgs>() == 120);

#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct PsaImpTcArgs {
    maps: [[u64; 16]; 2], // sampled q, sampled k
    r: u64,
    imp: u64,
    ranked: u64,
    heads: i32,
    q_blocks: i32,
    k_blocks: i32,
    sort_len: i32,
    scale: f32,
    block_sort: i32,
    unused: [i32; 20],
}
// SAFETY: as above.
unsafe impl DeviceRepr for PsaImpTcArgs {}
const _: () = assert!(std::mem::size_of::<PsaImpTcArgs>() == 384 && std::mem::offset_of!(PsaImpTcArgs, r) == 256);

/// Sampled query rows per CTA of `psa_importance_tc_*` (4 consumer warpgroups of 64).
const TC_ROWS: usize = 256;

/// `psa_imp_tc::Layout<D>::kSmemBytes`: sampled q (256 rows) and 4 stages of 128 sampled keys,
/// rows padded to whole 128-byte atoms; barriers, row maxima, partial sums; 1 KiB of alignment.
fn tc_importance_smem(d: usize) -> usize {
    let pad = if d <= 64 { 64 } else { 128 };
    TC_ROWS * pad * 2 + 4 * 128 * pad * 2 + 128 + TC_ROWS * 4 + 8 * 16 * 4 + 1024
}

/// [`importance_ranked`] through the wgmma kernel (psa_importance_tc.cu): a gather pass puts
/// the sampled queries and keys of each head in contiguous buffers; per CTA, 256 sampled query
/// rows against every sampled key (TMA, 4-stage ring, wgmma), block maxima in registers into an
/// f32 scratch, then per query block the exp / max / normalization and a bitonic sort of the
/// row (one warp per row, in registers): importance and ranking (ties by index) in one kernel. Errors when
/// [`tc_importance_serves`] is false.
pub fn importance_ranked_tc(q: &Tensor, k: &Tensor, p: &PyramidParams, scale: f64) -> Result<(Tensor, Tensor)> {
    importance_ranked_tc_with(q, k, p, scale, RankingSort::PerWarp)
}

/// How the wgmma importance kernel sorts each query block's row of importances (same network,
/// same tie order, identical rankings: tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankingSort {
    /// One warp per row, in registers (rows of 32..512 blocks; others fall back to `BlockWide`).
    PerWarp,
    /// The whole CTA per row through shared memory (v3; for comparison).
    BlockWide,
}

/// [`importance_ranked_tc`] with a choice of the ranking sort.
pub fn importance_ranked_tc_with(q: &Tensor, k: &Tensor, p: &PyramidParams, scale: f64, sort: RankingSort) -> Result<(Tensor, Tensor)> {
    let (b, h, n, d) = q.dims4()?;
    if k.dims4()? != (b, h, n, d) || k.dtype() != q.dtype() {
        return Err(err(format!("importance: q {:?} {:?} and k {:?} {:?} must match", q.dims(), q.dtype(), k.dims(), k.dtype())));
    }
    if !tc_importance_serves(q.dtype(), d, b * h, n, p) {
        return Err(err(format!(
            "the wgmma importance kernel serves bf16/f16, head_dim in {HEAD_DIMS:?}, block_q {BLOCK_Q} / block_k {BLOCK_K}, \
             {IMP_SAMPLE_Q} / {IMP_SAMPLE_K} samples, N <= 65536, B*H <= 65535; got {:?} B{b} H{h} N{n} D{d}",
            q.dtype()
        )));
    }
    let dev = cuda_device(q, "pyramid importance (cuda)")?;
    let stream = dev.cuda_stream();
    let (qb, kb) = (n.div_ceil(BLOCK_Q), n.div_ceil(BLOCK_K));
    let bh = b * h;
    let samples = pyramid::sample_positions(p, b, h);
    let q_pos: Vec<i32> = samples.q.iter().flatten().map(|&x| x as i32).collect();
    let k_pos: Vec<i32> = samples.k.iter().flatten().map(|&x| x as i32).collect();
    let (q_pos, k_pos) = (cached_table(&dev, &q_pos)?, cached_table(&dev, &k_pos)?);
    let (q, k) = (kernel_view(q)?, kernel_view(k)?);  // 16-byte copies of rows
    let (q_rows, k_rows) = (qb * IMP_SAMPLE_Q, kb * IMP_SAMPLE_K);
    let qs = unsafe { dev.alloc::<u16>(bh * q_rows * d)? };
    let ks = unsafe { dev.alloc::<u16>(bh * k_rows * d)? };
    let gather = PsaGatherArgs {
        q: ptr_of(&q, &dev)?,
        k: ptr_of(&k, &dev)?,
        qs: qs.device_ptr(&stream).0,
        ks: ks.device_ptr(&stream).0,
        q_pos: q_pos.device_ptr(&stream).0,
        k_pos: k_pos.device_ptr(&stream).0,
        q_stride: strides3(&q),
        k_stride: strides3(&k),
        heads: h as i32,
        n: n as i32,
        q_blocks: qb as i32,
        k_blocks: kb as i32,
        chunks: (d / 8) as i32,
        unused: 0,
    };
    let gather_kernel = crate::kernels::load(&dev, TC_MODULE, "psa_gather_samples_16bit")?;
    let work = (q_rows + k_rows) * (d / 8);
    let cfg = LaunchConfig { grid_dim: (work.div_ceil(256) as u32, bh as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = gather_kernel.builder();
    launch.arg(&gather);
    // SAFETY: q and k cover (B, H, N, D) at their strides (16-byte aligned rows); q_pos / k_pos
    // hold B·H·32 / B·H·16 offsets < 128 / 64; qs / ks hold B·H·q_rows·D / B·H·k_rows·D.
    unsafe { launch.launch(cfg) }.map_err(|e| err(format!("gather launch failed: {e:?}")))?;

    let grid_x = qb.div_ceil(TC_ROWS / IMP_SAMPLE_Q);
    let r = unsafe { dev.alloc::<f32>(bh * grid_x * TC_ROWS * kb)? };
    let imp = unsafe { dev.alloc::<f32>(bh * qb * kb)? };
    let ranked = unsafe { dev.alloc::<u32>(bh * qb * kb)? };
    let dtype = q.dtype();
    let args = PsaImpTcArgs {
        maps: [
            tensor_map(qs.device_ptr(&stream).0, dtype, (b, h, q_rows, d), [(h * q_rows * d) as i64, (q_rows * d) as i64, d as i64], 128)?,
            tensor_map(ks.device_ptr(&stream).0, dtype, (b, h, k_rows, d), [(h * k_rows * d) as i64, (k_rows * d) as i64, d as i64], 128)?,
        ],
        r: r.device_ptr(&stream).0,
        imp: imp.device_ptr(&stream).0,
        ranked: ranked.device_ptr(&stream).0,
        heads: h as i32,
        q_blocks: qb as i32,
        k_blocks: kb as i32,
        sort_len: kb.next_power_of_two() as i32,
        scale: scale as f32,
        // The ranking: one warp per query block sorts in registers (32 <= sort_len <= 1024), or
        // the block-wide shared-memory bitonic sort of v3.
        block_sort: (sort == RankingSort::BlockWide) as i32,
        unused: [0; 20],
    };
    let suffix = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let kernel = crate::kernels::load(&dev, TC_MODULE, &format!("psa_importance_tc_{suffix}_d{d}"))?;
    let smem = tc_importance_smem(d);
    kernel.set_max_dynamic_smem(smem)?;
    let cfg = LaunchConfig { grid_dim: (grid_x as u32, bh as u32, 1), block_dim: (640, 1, 1), shared_mem_bytes: smem as u32 };
    let mut launch = kernel.builder();
    launch.arg(&args);
    // SAFETY: the maps cover qs / ks as written by the gather; r holds B·H·grid_x·256·kb floats;
    // imp and ranked B·H·qb·kb each; the sort needs 8·sort_len·8 <= 64 KiB of the main loop's
    // shared memory (kb <= 1024); smem as computed.
    unsafe { launch.launch(cfg) }.map_err(|e| err(format!("importance launch failed: {e:?}")))?;
    drop((q_pos, k_pos, qs, ks, r));
    Ok((into_tensor(imp, &dev, (b, h, qb, kb)), into_tensor(ranked, &dev, (b, h, qb, kb))))
}

/// Importance and ranking with candle tensor ops on q's device (any device): the CPU and
/// reference path of [`importance_ranked`]. The sampled scores are one GEMM in
/// q's dtype; maxima are exact in that dtype; the exponentials and the normalization are f32.
///
/// The sampled keys are ordered sample-major (column `c * k_blocks + j` = sample c of block j),
/// so that the max over a block's samples is a max over a middle dim, taken as pairwise
/// `maximum`s of halves ([`max_over`]): candle's CUDA reductions launch one thread block per
/// output element, which for the 84 M outputs of 16 samples each (SANA-Video 480p) took
/// ~55 ms on the H200 (kernels/NOTES.md, ## pyramid).
pub fn importance_ranked_ops(q: &Tensor, k: &Tensor, p: &PyramidParams, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, h, n, d) = q.dims4()?;
    let samples = pyramid::sample_positions(p, b, h);
    let (qb, kb) = (n.div_ceil(p.block_q), n.div_ceil(p.block_k));
    let (sq, sk) = (p.sample_q_count(), p.sample_k_count());
    let mut idx_q = Vec::with_capacity(b * h * qb * sq);
    let mut idx_k = Vec::with_capacity(b * h * kb * sk);
    for bh in 0..b * h {
        for i in 0..qb {
            idx_q.extend(samples.q[bh].iter().map(|&x| (bh * n + (i * p.block_q + x).min(n - 1)) as u32));
        }
        for &x in &samples.k[bh] {
            idx_k.extend((0..kb).map(|j| (bh * n + (j * p.block_k + x).min(n - 1)) as u32));
        }
    }
    let dev = q.device();
    let idx_q = Tensor::from_vec(idx_q, b * h * qb * sq, dev)?;
    let idx_k = Tensor::from_vec(idx_k, b * h * kb * sk, dev)?;
    let qs = q.contiguous()?.reshape((b * h * n, d))?.index_select(&idx_q, 0)?.reshape((b * h, qb * sq, d))?;
    let ks = k.contiguous()?.reshape((b * h * n, d))?.index_select(&idx_k, 0)?.reshape((b * h, sk * kb, d))?;
    let r = qs.matmul(&ks.t()?.contiguous()?)?.reshape((b * h, qb * sq, sk, kb))?;
    // R[r, j] = max over block j's sampled keys of scale q_r . k_c
    let r = (max_over(&r, 2)?.to_dtype(DType::F32)? * scale)?; // (BH, qb sq, kb)
    let e = r.broadcast_sub(&r.max_keepdim(2)?)?.exp()?;
    // S[i, j] = max over query block i's sampled rows
    let s = max_over(&e.reshape((b * h, qb, sq, kb))?, 2)?; // (BH, qb, kb)
    let imp = s.broadcast_div(&s.sum_keepdim(2)?)?.reshape((b, h, qb, kb))?;
    let ranked = imp.arg_sort_last_dim(false)?;
    Ok((imp, ranked))
}

/// Max over dim `dim` (removed), as pairwise `maximum`s of the two halves; for an odd length
/// the halves overlap by one element (max is idempotent).
fn max_over(t: &Tensor, dim: usize) -> Result<Tensor> {
    let mut t = t.clone();
    let mut len = t.dim(dim)?;
    while len > 1 {
        let half = len.div_ceil(2);
        t = t.narrow(dim, 0, half)?.maximum(&t.narrow(dim, len - half, half)?)?;
        len = half;
    }
    Ok(t.squeeze(dim)?)
}
