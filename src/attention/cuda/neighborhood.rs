//! Launcher for the GNA forward kernel (kernels/attention/neighborhood/gna_fwd.cu).
//!
//! One call = (1) `gna_permute_16bit` gathers k, v (and q when it cannot be read in place, see
//! [`KernelOptions::permute_q`]) into the tile-permuted, zero-padded layout of [`tiles::plan`] (or, with
//! [`KernelOptions::in_place`], dilation 1 and B, H mergeable, nothing: the kernel reads each
//! tile in place as one 5-D TMA box (D, L2, L1, L0, B*H) whose shared-memory image is the
//! permuted tile; measured slower for k and v, see `can_read_in_place`);
//! (2) `gna_fwd_*` runs the block-sparse flash loop over each query tile's
//! list of KV tiles (full / partial / extra) and writes `O (B, H, N, D)` and the natural-log
//! `lse (B, H, N)` straight into the original token order. The tiling (permutation, lists, the
//! keep words of PARTIAL tiles) is built on the host once per (grid, parameters, extra-token
//! tiles) and cached on the device.
//!
//! [`forward`] runs the measured-fastest configuration ([`KernelOptions::default`]);
//! [`forward_with`] takes the others (comparison runs in bench_sparse, equality tests).
//!
//! bf16 / f16, head dims 64, 72, 96, 112, 128; f32 accumulation. Semantics: those of
//! [`crate::attention::neighborhood::reference`] (the CPU oracle).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::result::memset_d8_async;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{DType, Tensor};
use half::{bf16, f16};

use super::{dev_ptr, encode_tiled, into_tensor, kernel_view, strides3, tensor_map};
use crate::attention::neighborhood::balance;
use crate::attention::neighborhood::tiles::{self, AxisTiling, GnaTiling, TILE};
use crate::attention::neighborhood::NeighborhoodParams;
use crate::error::{Error, Result};

/// Head dims with a compiled kernel.
pub const HEAD_DIMS: [usize; 5] = [64, 72, 96, 112, 128];

const MODULE: &str = "attention/neighborhood/gna_fwd";

/// 16-byte pieces per thread of `gna_permute_16bit` (`kPermutePieces` in gna_fwd.cuh).
const PERMUTE_PIECES: usize = 4;

/// Whether the kernel serves this dtype and head dim.
pub fn supports(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && HEAD_DIMS.contains(&head_dim)
}

fn err(msg: impl Into<String>) -> Error {
    Error::Other(format!("neighborhood attention (cuda): {}", msg.into()))
}

/// Mirror of `GnaArgs` in gna_fwd.cuh.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct GnaArgs {
    maps: [[u64; 16]; 5],
    o: u64,
    lse: u64,
    perm: u64,
    offsets: u64,
    list: u64,
    masks: u64,
    o_stride: [i64; 3],
    lse_stride: [i64; 2],
    axis: [AxisTiling; 3],
    n_pad: i32,
    n_extra: i32,
    scale_log2: f32,
    direct: i32,
    direct_q: i32,
    heads: i32,
    pingpong: i32,
    q_tiles: i32,
    work_total: i32,
    work_per_cta: i32,
    work_step: i32,
    work_cta_stride: i32,
    full_ends: u64,
    work_table: u64,
    columns_ends: u64,
}
// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for GnaArgs {}
const _: () = assert!(std::mem::size_of::<GnaArgs>() == 1024);
const _: () = assert!(
    std::mem::offset_of!(GnaArgs, o) == 640
        && std::mem::offset_of!(GnaArgs, axis) == 728
        && std::mem::offset_of!(GnaArgs, full_ends) == 896
        && std::mem::offset_of!(GnaArgs, work_table) == 904
        && std::mem::offset_of!(GnaArgs, columns_ends) == 912
);
const _: () = assert!(std::mem::size_of::<AxisTiling>() == 40);

/// Mirror of `GnaPermuteArgs` in gna_fwd.cuh.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GnaPermuteArgs {
    src: [u64; 3],
    dst: [u64; 3],
    perm: u64,
    src_stride: [[i64; 3]; 3],
    heads: i32,
    n_pad: i32,
    chunks: i32,
    unused: i32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for GnaPermuteArgs {}
const _: () = assert!(std::mem::size_of::<GnaPermuteArgs>() == 144);

/// A tiling and its lists on one device.
pub struct DeviceTiling {
    pub tiling: GnaTiling,
    perm: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    full_ends: CudaSlice<i32>,
    columns_ends: CudaSlice<i32>,
    /// per list entry (entry, keep-word pattern), interleaved: the kernel reads both in one load
    list: CudaSlice<i32>,
    masks: CudaSlice<u32>,
    /// estimated cost of each query tile's work item (`Schedule::Balanced`)
    item_costs: Vec<f64>,
    /// `Schedule::Balanced`'s work tables by (batch x heads, CTAs), built on first use
    work_tables: Mutex<HashMap<(usize, usize), Arc<CudaSlice<i32>>>>,
}

impl DeviceTiling {
    /// The work table (`balance::balanced_table`) of `groups` x the query tiles over `ctas` CTAs.
    fn work_table(&self, dev: &CudaDevice, groups: usize, ctas: usize) -> Result<Arc<CudaSlice<i32>>> {
        let mut tables = self.work_tables.lock().map_err(|_| err("work table cache poisoned"))?;
        if let Some(t) = tables.get(&(groups, ctas)) {
            return Ok(t.clone());
        }
        let table = balance::balanced_table(&self.item_costs, groups, ctas);
        let t = Arc::new(dev.cuda_stream().clone_htod(&table).map_err(|e| err(format!("upload: {e:?}")))?);
        tables.insert((groups, ctas), t.clone());
        Ok(t)
    }
}

type Key = (DeviceId, Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>, Vec<bool>, usize);

/// The cached tiling of `(grid, params, extra tiles)` on `dev`, built and uploaded on first use.
pub fn device_tiling(dev: &CudaDevice, grid: &[usize], p: &NeighborhoodParams, n_extra: usize) -> Result<Arc<DeviceTiling>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<DeviceTiling>>>> = OnceLock::new();
    let key: Key = (
        dev.id(),
        grid.to_vec(),
        p.kernel.clone(),
        p.stride.clone(),
        p.dilation.clone(),
        p.causal.clone(),
        n_extra.div_ceil(TILE),
    );
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(t) = cache.lock().map_err(|_| err("tiling cache poisoned"))?.get(&key) {
        return Ok(t.clone());
    }
    // The lists only depend on the number of extra tiles; the kernel masks the ragged end itself.
    let tiling = tiles::plan(grid, p, n_extra.div_ceil(TILE) * TILE).map_err(|m| Error::Usage(format!("neighborhood attention: {m}")))?;
    if tiling.n_pad > i32::MAX as usize / 2 || tiling.entries.len() > i32::MAX as usize {
        return Err(err(format!("grid {grid:?} too large for 32-bit tile indices")));
    }
    let stream = dev.cuda_stream();
    // (an empty list still gets one element: a null pointer is not a valid kernel argument)
    let up = |v: &[i32]| stream.clone_htod(if v.is_empty() { &[0][..] } else { v }).map_err(|e| err(format!("upload: {e:?}")));
    let masks = stream.clone_htod(if tiling.masks.is_empty() { &[0u32][..] } else { &tiling.masks }).map_err(|e| err(format!("upload: {e:?}")))?;
    let t = Arc::new(DeviceTiling {
        perm: up(&tiling.perm)?,
        offsets: up(&tiling.offsets)?,
        full_ends: up(&tiling.full_ends)?,
        columns_ends: up(&tiling.columns_ends)?,
        list: up(&tiling.entries.iter().zip(&tiling.mask_of).flat_map(|(&e, &m)| [e, m]).collect::<Vec<i32>>())?,
        masks,
        item_costs: balance::item_costs(&tiling),
        work_tables: Mutex::new(HashMap::new()),
        tiling,
    });
    cache.lock().map_err(|_| err("tiling cache poisoned"))?.insert(key, t.clone());
    Ok(t)
}

/// 5-D TMA descriptor reading a (B, H, N, D) tensor in place as (D, L2, L1, L0, B*H) for the
/// rank-3 grid (L0, L1, L2), box (64, t2, t1, t0, 1): the box of a tile lands in shared memory
/// as the permuted tile (rows in box row-major order). Needs the batch stride to be H times the
/// head stride (B and H merge into one dim) unless B = 1.
fn tensor_map5(ptr: u64, dtype: DType, t: &Tensor, axes: &[AxisTiling; 3]) -> Result<[u64; 16]> {
    let (b, h, _, d) = t.dims4()?;
    let st = t.stride();
    let (l0, l1, l2) = (axes[0].len as u64, axes[1].len as u64, axes[2].len as u64);
    let row = st[2] as u64 * 2;
    let global_dim = [d as u64, l2, l1, l0, (b * h) as u64];
    let global_strides = [row, row * l2, row * l2 * l1, st[1] as u64 * 2];
    let box_dim = [64u32, axes[2].tile as u32, axes[1].tile as u32, axes[0].tile as u32, 1];
    encode_tiled(ptr, dtype, &global_dim, &global_strides, &box_dim)
        .map_err(|status| err(format!("cuTensorMapEncodeTiled (5-D) {:?} strides {st:?}: {status:?}", t.dims())))
}

/// How the launcher runs the kernel. The default is the configuration measured fastest on the
/// H200 (kernels/NOTES.md, ## neighborhood); the others give identical results (tested) and
/// exist for comparison runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOptions {
    /// q, k and v read in place, no permutation pass (where possible: see `can_read_in_place`).
    /// Measured slower: each KV tile is read by ~50 query tiles, and 128 contiguous rows
    /// stream better than a box of short row segments, which outweighs the permutation pass
    /// (FLUX-4K strided 9.49 ms permuted vs 10.15 ms in place).
    pub in_place: bool,
    /// q permuted like k and v instead of read in place. Reading q in place is free (it is
    /// loaded once per CTA) and saves a third of the permutation pass.
    pub permute_q: bool,
    /// The two consumer warpgroups take turns issuing their GEMMs (FlashAttention-3).
    pub pingpong: bool,
    pub schedule: Schedule,
    /// The masking kernel even when no listed tile needs a mask (by default such lists, e.g.
    /// strided windows with stride a multiple of the tile, run `gna_fwd_full_*`: no list reads
    /// and no masking in the loop).
    pub always_masked: bool,
    /// Fill O and lse with NaN bytes before the launch (tests: no row left unwritten).
    pub poison: bool,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self { in_place: false, permute_q: false, pingpong: true, schedule: Schedule::Balanced, always_masked: false, poison: false }
    }
}

/// How the work items (one query tile of one head and batch; query tiles innermost) are spread
/// over CTAs. A CTA with several items loads the next item's Q and first K/V tiles under the
/// previous item's last P V and epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Each CTA runs `n` consecutive items (1: one CTA per item).
    Consecutive(usize),
    /// `n` CTAs, CTA c runs items c, c + n, c + 2n, ...: all CTAs move through the heads
    /// together, so one head's K/V stays the L2 working set.
    RoundRobin(usize),
    /// `RoundRobin` over one CTA per SM (the kernel fits one CTA per SM).
    Persistent,
    /// One CTA per SM, items assigned on the host by their cost (`balance`): heads in order,
    /// each head's query tiles longest first, each to the CTA with the least work so far.
    Balanced,
}

impl Schedule {
    /// (grid size, items per CTA, step between a CTA's items, step between CTAs' first items).
    fn layout(self, items: usize, sms: usize) -> (usize, usize, usize, usize) {
        match self {
            Schedule::Consecutive(n) => {
                let n = n.clamp(1, items.max(1));
                (items.div_ceil(n), n, 1, n)
            }
            Schedule::RoundRobin(ctas) => {
                let ctas = ctas.clamp(1, items.max(1));
                (ctas, items.div_ceil(ctas), ctas, 1)
            }
            Schedule::Persistent => Schedule::RoundRobin(sms).layout(items, sms),
            // (per_cta, step, stride unused: the work table lists each CTA's items)
            Schedule::Balanced => (sms.clamp(1, items.max(1)), 0, 0, 0),
        }
    }
}

/// Whether q, k, v are all read in place: asked for, and possible for every tensor.
fn can_read_in_place(tensors: [&Tensor; 3], params: &NeighborhoodParams, opts: &KernelOptions) -> bool {
    opts.in_place && tensors.iter().all(|t| in_place_readable(t, params))
}

/// Whether a 5-D map can read `t` in place: dilation 1 on every axis (a dilation group is a
/// strided set, not a box), B and H mergeable, 16-byte aligned rows.
fn in_place_readable(t: &Tensor, params: &NeighborhoodParams) -> bool {
    let (s, dims) = (t.stride(), t.dims());
    params.dilation.iter().all(|&d| d == 1)
        && s[3] == 1
        && s[..3].iter().all(|x| x % 8 == 0)
        && t.layout().start_offset() % 8 == 0
        && (dims[0] == 1 || s[0] == dims[1] * s[1])
}

fn ptr_16bit(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    match t.dtype() {
        DType::BF16 => dev_ptr::<bf16>(t, dev),
        DType::F16 => dev_ptr::<f16>(t, dev),
        other => Err(err(format!("dtype {other:?} is not bf16/f16"))),
    }
}

/// GNA forward on the GPU: `q, k, v (B, H, N, D)` with `N = prod(grid)` (row-major tokens),
/// optional `extra_kv (B, H, Ne, D)` attended by every query. Returns `O (B, H, N, D)` in q's
/// dtype and `lse (B, H, N)` f32.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grid: &[usize],
    params: &NeighborhoodParams,
    extra_kv: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    forward_with(q, k, v, grid, params, extra_kv, scale, &KernelOptions::default())
}

/// [`forward`] in another configuration of the kernel (same results).
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grid: &[usize],
    params: &NeighborhoodParams,
    extra_kv: Option<(&Tensor, &Tensor)>,
    scale: f64,
    opts: &KernelOptions,
) -> Result<(Tensor, Tensor)> {
    let (b, h, nq, nk, d) = super::super::check_qkv(q, k, v)?;
    let dtype = q.dtype();
    if !supports(dtype, d) {
        return Err(err(format!("dtype {dtype:?} / head_dim {d} not compiled (bf16/f16, head_dim in {HEAD_DIMS:?})")));
    }
    if k.dtype() != dtype || v.dtype() != dtype {
        return Err(err("q, k, v must share a dtype"));
    }
    params.validate(grid).map_err(|m| Error::Usage(format!("neighborhood attention: {m}")))?;
    let n: usize = grid.iter().product();
    if nq != n || nk != n {
        return Err(err(format!("the grid {grid:?} has {n} tokens but q has {nq} and k has {nk}")));
    }
    let dev = super::cuda_device(q, "neighborhood attention (cuda)")?;
    let n_extra = match extra_kv {
        Some((k2, v2)) => {
            let (_, _, _, ne, _) = super::super::check_qkv(q, k2, v2)?;
            if k2.dtype() != dtype || v2.dtype() != dtype {
                return Err(err("extra k, v must have the dtype of q"));
            }
            ne
        }
        None => 0,
    };
    if b * h * n == 0 {
        return Ok((Tensor::zeros((b, h, n, d), dtype, q.device())?, Tensor::zeros((b, h, n), DType::F32, q.device())?));
    }
    if b * h > 65535 {
        return Err(err(format!("batch x heads = {} above the permutation kernel's grid limit 65535", b * h)));
    }
    let dt = device_tiling(&dev, grid, params, n_extra)?;
    let t = &dt.tiling;
    let stream = dev.cuda_stream();

    // (1) permute q, k, v into (B, H, n_pad, D), zero padding; or read them in place (all three,
    // or q alone: the default).
    let (q, k, v) = (kernel_view(q)?, kernel_view(k)?, kernel_view(v)?);
    let direct = can_read_in_place([&q, &k, &v], params, opts);
    let direct_q = direct || (!opts.permute_q && in_place_readable(&q, params));
    let full_elems = b * h * t.n_pad * d;
    let elems = [if direct_q { 1 } else { full_elems }, if direct { 1 } else { full_elems }, if direct { 1 } else { full_elems }];
    // SAFETY: every element is written by gna_permute before it is read (unused when read in place).
    let bufs: [CudaSlice<u16>; 3] = unsafe { [dev.alloc::<u16>(elems[0])?, dev.alloc::<u16>(elems[1])?, dev.alloc::<u16>(elems[2])?] };
    if !direct {
        let mut pargs = GnaPermuteArgs {
            heads: h as i32,
            n_pad: t.n_pad as i32,
            chunks: (d / 8) as i32,
            perm: dt.perm.device_ptr(&stream).0,
            ..Default::default()
        };
        // grid z = the tensors to permute: k, v, and q unless it is read in place
        let mut count = 0;
        for (i, src) in [&q, &k, &v].into_iter().enumerate() {
            if i == 0 && direct_q {
                continue;
            }
            pargs.src[count] = ptr_16bit(src, &dev)?;
            pargs.src_stride[count] = strides3(src);
            pargs.dst[count] = bufs[i].device_ptr(&stream).0;
            count += 1;
        }
        let permute = crate::kernels::load(&dev, MODULE, "gna_permute_16bit")?;
        let chunks = t.n_pad * d / 8;
        let blocks = chunks.div_ceil(256 * PERMUTE_PIECES);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, (b * h) as u32, count as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut launch = permute.builder();
        launch.arg(&pargs);
        // SAFETY: sources cover (B, H, N, D) at their strides; destinations hold 3 x B·H·n_pad·D.
        unsafe { launch.launch(cfg) }.map_err(|e| err(format!("permute launch failed: {e:?}")))?;
    }

    // (2) the block-sparse attention, output in the original order.
    let extra = match extra_kv {
        Some((k2, v2)) => Some((kernel_view(k2)?, kernel_view(v2)?)),
        None => None,
    };
    let out_elems = b * h * n * d;
    // SAFETY: every real token's row is written by the kernel (a real query is in exactly one tile).
    let lse = unsafe { dev.alloc::<f32>(b * h * n)? };
    let permuted = [d as i64 * t.n_pad as i64 * h as i64, (t.n_pad * d) as i64, d as i64];
    let mut maps = [[0u64; 16]; 5];
    for (i, (buf, src)) in bufs.iter().zip([&q, &k, &v]).enumerate() {
        maps[i] = if direct || (i == 0 && direct_q) {
            tensor_map5(ptr_16bit(src, &dev)?, dtype, src, &t.axes)?
        } else {
            tensor_map(buf.device_ptr(&stream).0, dtype, (b, h, t.n_pad, d), permuted, 128)?
        };
    }
    if let Some((k2, v2)) = &extra {
        maps[3] = tensor_map(ptr_16bit(k2, &dev)?, dtype, (b, h, n_extra, d), strides3(k2), 128)?;
        maps[4] = tensor_map(ptr_16bit(v2, &dev)?, dtype, (b, h, n_extra, d), strides3(v2), 128)?;
    }
    let items = b * h * t.q_tiles();
    if items > i32::MAX as usize {
        return Err(err(format!("{items} work items (batch x heads x query tiles) above the 32-bit limit")));
    }
    let (ctas, per_cta, step, cta_stride) = opts.schedule.layout(items, super::sm_count(&dev)? as usize);
    let work_table = match opts.schedule {
        Schedule::Balanced => Some(dt.work_table(&dev, b * h, ctas)?),
        _ => None,
    };
    let mut args = GnaArgs {
        maps,
        o: 0,
        lse: lse.device_ptr(&stream).0,
        perm: dt.perm.device_ptr(&stream).0,
        offsets: dt.offsets.device_ptr(&stream).0,
        list: dt.list.device_ptr(&stream).0,
        masks: dt.masks.device_ptr(&stream).0,
        o_stride: [(h * n * d) as i64, (n * d) as i64, d as i64],
        lse_stride: [(h * n) as i64, n as i64],
        axis: t.axes,
        n_pad: t.n_pad as i32,
        n_extra: n_extra as i32,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        direct: direct as i32,
        direct_q: direct_q as i32,
        heads: h as i32,
        pingpong: opts.pingpong as i32,
        q_tiles: t.q_tiles() as i32,
        work_total: items as i32,
        work_per_cta: per_cta as i32,
        work_step: step as i32,
        work_cta_stride: cta_stride as i32,
        full_ends: dt.full_ends.device_ptr(&stream).0,
        work_table: work_table.as_ref().map_or(0, |t| t.device_ptr(&stream).0),
        columns_ends: dt.columns_ends.device_ptr(&stream).0,
    };
    let suffix = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let (o_bf16, o_f16) = match dtype {
        DType::BF16 => (Some(unsafe { dev.alloc::<bf16>(out_elems)? }), None),
        _ => (None, Some(unsafe { dev.alloc::<f16>(out_elems)? })),
    };
    args.o = match (&o_bf16, &o_f16) {
        (Some(o), _) => o.device_ptr(&stream).0,
        (_, Some(o)) => o.device_ptr(&stream).0,
        _ => unreachable!(),
    };
    if opts.poison {
        for (ptr, bytes) in [(args.o, out_elems * 2), (args.lse, b * h * n * 4)] {
            // SAFETY: fresh allocations of exactly these sizes.
            unsafe { memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.map_err(|e| err(format!("poison: {e:?}")))?;
        }
    }
    let masked = opts.always_masked || t.full < t.visited || n_extra % TILE != 0;
    let variant = if masked { "" } else { "full_" };
    let kernel = crate::kernels::load(&dev, MODULE, &format!("gna_fwd_{variant}{suffix}_d{d}"))?;
    let pad = if d <= 64 { 64 } else { 128 };
    // dense_wgmma::Tile<D, 2>::kSmemBytes: Q (128 rows) + 3 stages of K and V (128 rows), 128 B of
    // barriers, 1 KB to align to the swizzle atom.
    let smem = (128 * pad + 2 * 3 * 128 * pad) * 2 + 128 + 1024;
    kernel.set_max_dynamic_smem(smem)?;
    let cfg = LaunchConfig { grid_dim: (ctas as u32, 1, 1), block_dim: (384, 1, 1), shared_mem_bytes: smem as u32 };
    let mut launch = kernel.builder();
    launch.arg(&args);
    // SAFETY: the maps cover the permuted buffers and the extra tensors; the lists index tiles
    // inside them; o and lse hold B·H·N rows.
    unsafe { launch.launch(cfg) }.map_err(|e| err(format!("launch failed: {e:?}")))?;
    drop(bufs); // stream-ordered free: after the kernel

    let o = match (o_bf16, o_f16) {
        (Some(o), _) => into_tensor(o, &dev, (b, h, n, d)),
        (_, Some(o)) => into_tensor(o, &dev, (b, h, n, d)),
        _ => unreachable!(),
    };
    Ok((o, into_tensor(lse, &dev, (b, h, n))))
}
