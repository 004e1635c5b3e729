//! Launcher for the dense flash-attention forward kernel (kernels/attention/dense/dense_fwd.cu).
//!
//! `O = softmax(Q Kᵀ · scale + mask) V` over the keys of `(k, v)` followed by the optional extra keys
//! `(k2, v2)` (joint image+text attention, no concatenation), with the per-row log-sum-exp
//! `lse = ln Σ exp(q·k · scale)` (f32, natural log) as a second output. The key-padding mask
//! `(B, Nk)` covers `k` only (nonzero = attend). A query row whose keys are all masked gets
//! `O = 0` and `lse = -inf`, so [`crate::attention::merge_partials`] ignores it.
//!
//! bf16 and f16 inputs, head dims 64, 72, 96, 112, 128; f32 accumulation inside. The Hopper kernel
//! (dense_fwd_wgmma.cu: TMA producer, wgmma consumers, 3-stage mbarrier ring) serves every head
//! dim; dense_fwd.cu (mma.sync, FlashAttention-2 style) is the earlier version, kept compiled.

use candle_core::cuda_backend::cudarc::driver::result::memset_d8_async;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};

use super::{dev_ptr, kernel_view, strides3, tensor_map};
use crate::error::{Error, Result};


/// Head dims with a compiled kernel.
pub const HEAD_DIMS: [usize; 5] = [64, 72, 96, 112, 128];

/// Whether the kernel serves this dtype and head dim.
pub fn supports(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && HEAD_DIMS.contains(&head_dim)
}

/// Mirror of `DenseFwdArgs` in dense_fwd.cuh (passed by value as the kernel's one parameter).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct DenseFwdArgs {
    q: u64,
    k: u64,
    v: u64,
    k2: u64,
    v2: u64,
    key_mask: u64,
    o: u64,
    lse: u64,
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    k2_stride: [i64; 3],
    v2_stride: [i64; 3],
    o_stride: [i64; 3],
    lse_stride: [i64; 2],
    mask_stride: i64,
    nq: i32,
    nk: i32,
    n_extra: i32,
    scale_log2: f32,
}

// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for DenseFwdArgs {}

/// Mirror of `DenseTmaArgs` in dense_fwd_wgmma.cuh: five TMA tensor maps (q, k, v, k2, v2; a
/// CUtensorMap is 128 opaque bytes, 128-byte aligned with CUDA 13 headers) then the plain arguments.
#[repr(C, align(128))]
#[derive(Debug, Clone, Copy)]
struct DenseTmaArgs {
    maps: [[u64; 16]; 5],
    base: DenseFwdArgs,
}

// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for DenseTmaArgs {}

// The kernels static_assert the same sizes and offset.
const _: () = assert!(std::mem::size_of::<DenseFwdArgs>() == 248);
const _: () = assert!(std::mem::size_of::<DenseTmaArgs>() == 896 && std::mem::offset_of!(DenseTmaArgs, base) == 640);


/// Which kernel serves a head dim, and how it is launched.
struct Plan {
    module: &'static str,
    /// function name without the `_{bf16,f16}_d{D}` suffix
    prefix: &'static str,
    /// whether the kernel takes `DenseTmaArgs` (tensor maps) rather than `DenseFwdArgs`
    tma: bool,
    /// query rows per CTA
    block_m: usize,
    threads: u32,
    smem: usize,
}

/// Which of the two dense kernels runs (both serve every compiled head dim; same results up to
/// the order of their f32 accumulations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenseKernel {
    /// dense_fwd_wgmma.cu: TMA producer warpgroup, wgmma, FA3's pipelining (the fast one).
    #[default]
    Wgmma,
    /// dense_fwd.cu: the earlier mma.sync kernel, kept to compare against.
    MmaSync,
}

/// How [`forward_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelOptions {
    pub kernel: DenseKernel,
    /// Fill O and lse with NaN bytes (0xFF) before the launch (tests: no element left unwritten).
    pub poison: bool,
}

fn plan(head_dim: usize, kernel: DenseKernel) -> Plan {
    if kernel == DenseKernel::Wgmma {
        // dense_fwd_wgmma.cuh, `dense_wgmma::Tile<D>`: C consumer warpgroups of 64 query rows (3 for
        // D = 64, else 2) + a producer warpgroup; shared memory = Q (rows rounded up to 128) + 3
        // stages of K and V (128 keys), rows padded to 64 or 128 2-byte elements, 128 B of
        // mbarriers, + 1 KB to align to the 1024-byte swizzle atom.
        let consumers: usize = if head_dim <= 64 { 3 } else { 2 };
        let pad = if head_dim <= 64 { 64 } else { 128 };
        let block_m = 64 * consumers;
        let q_rows = block_m.div_ceil(128) * 128;
        Plan {
            module: "attention/dense/dense_fwd_wgmma",
            prefix: "dense_fwd_wgmma",
            tma: true,
            block_m,
            threads: 128 * (consumers as u32 + 1),
            smem: (q_rows * pad + 2 * 3 * 128 * pad) * 2 + 128 + 1024,
        }
    } else {
        // dense_fwd.cuh, `dense::Tile<D>::kSmemElems * 2`: Q (128 rows) + double-buffered K and V
        // (64 keys for D <= 72, else 32), rows of `round_up(D, 16) + 8` elements.
        let ld = head_dim.div_ceil(16) * 16 + 8;
        let block_n = if head_dim <= 72 { 64 } else { 32 };
        Plan {
            module: "attention/dense/dense_fwd",
            prefix: "dense_fwd",
            tma: false,
            block_m: 128,
            threads: 128,
            smem: (128 * ld + 4 * block_n * ld) * 2,
        }
    }
}

fn err(msg: impl Into<String>) -> Error {
    Error::Other(format!("dense attention (cuda): {}", msg.into()))
}




/// Dense attention forward on the GPU. `q (B, H, Nq, D)`, `k, v (B, H, Nk, D)`, `key_mask (B, Nk)`
/// (any dtype, nonzero = attend), `extra_kv` `(B, H, Ne, D)` each. Returns `O (B, H, Nq, D)` in
/// the dtype of `q` and `lse (B, H, Nq)` f32.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    extra_kv: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    forward_with(q, k, v, key_mask, extra_kv, scale, &KernelOptions::default())
}

/// [`forward`] with a choice of kernel and poisoned outputs (tests, comparisons).
pub fn forward_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
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
    let dev = match q.device() {
        candle_core::Device::Cuda(dev) => dev.clone(),
        _ => return Err(err("q is not on a CUDA device")),
    };
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
    if [nq, nk, n_extra].iter().any(|&n| n > i32::MAX as usize) {
        return Err(err("sequence longer than 2^31"));
    }
    let mask = match key_mask {
        Some(m) => {
            if m.dims() != [b, nk] {
                return Err(err(format!("key_mask must be (B, Nk) = ({b}, {nk}), got {:?}", m.dims())));
            }
            Some(m.ne(0.0)?.contiguous()?)
        }
        None => None,
    };

    if b * h * nq == 0 {
        let o = Tensor::zeros((b, h, nq, d), dtype, q.device())?;
        let lse = Tensor::zeros((b, h, nq), DType::F32, q.device())?;
        return Ok((o, lse));
    }

    let (q, k, v) = (kernel_view(q)?, kernel_view(k)?, kernel_view(v)?);
    let extra = match extra_kv {
        Some((k2, v2)) => Some((kernel_view(k2)?, kernel_view(v2)?)),
        None => None,
    };
    let all_contiguous = [&q, &k, &v].iter().all(|t| t.is_contiguous())
        && extra.as_ref().is_none_or(|(k2, v2)| k2.is_contiguous() && v2.is_contiguous());

    let out_elems = b * h * nq * d;
    let rows = b * h * nq;
    let lse_slice = unsafe { dev.alloc::<f32>(rows)? };
    let mut args = DenseFwdArgs {
        q_stride: strides3(&q),
        k_stride: strides3(&k),
        v_stride: strides3(&v),
        o_stride: [(h * nq * d) as i64, (nq * d) as i64, d as i64],
        lse_stride: [(h * nq) as i64, nq as i64],
        nq: nq as i32,
        nk: nk as i32,
        n_extra: n_extra as i32,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        ..Default::default()
    };
    if let Some((k2, v2)) = &extra {
        args.k2_stride = strides3(k2);
        args.v2_stride = strides3(v2);
    }
    if let Some(m) = &mask {
        args.key_mask = dev_ptr::<u8>(m, &dev)?;
        args.mask_stride = nk as i64;
    }
    let stream = dev.cuda_stream();
    args.lse = lse_slice.device_ptr(&stream).0;

    let (o_storage, name) = match dtype {
        DType::BF16 => {
            let o = unsafe { dev.alloc::<bf16>(out_elems)? };
            fill_ptrs::<bf16>(&mut args, &q, &k, &v, extra.as_ref(), &dev)?;
            args.o = o.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(o, dev.clone()), format!("{}_bf16_d{d}", plan(d, opts.kernel).prefix))
        }
        DType::F16 => {
            let o = unsafe { dev.alloc::<f16>(out_elems)? };
            fill_ptrs::<f16>(&mut args, &q, &k, &v, extra.as_ref(), &dev)?;
            args.o = o.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(o, dev.clone()), format!("{}_f16_d{d}", plan(d, opts.kernel).prefix))
        }
        _ => unreachable!("checked by supports()"),
    };

    if opts.poison {
        for (ptr, bytes) in [(args.o, out_elems * 2), (args.lse, rows * 4)] {
            // SAFETY: both are fresh allocations of exactly these sizes.
            unsafe { memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }
                .map_err(|e| err(format!("poison memset failed: {e:?}")))?;
        }
    }

    {
        let plan = plan(d, opts.kernel);
        let kernel = crate::kernels::load(&dev, plan.module, &name)?;
        kernel.set_max_dynamic_smem(plan.smem)?;
        let cfg = LaunchConfig {
            grid_dim: (nq.div_ceil(plan.block_m) as u32, h as u32, b as u32),
            block_dim: (plan.threads, 1, 1),
            shared_mem_bytes: plan.smem as u32,
        };
        let tma_args;
        let mut launch = kernel.builder();
        if plan.tma {
            let maps = (|| -> Result<[[u64; 16]; 5]> {
                let mut maps = [
                    tensor_map(args.q, dtype, (b, h, nq, d), args.q_stride, 128)?,
                    tensor_map(args.k, dtype, (b, h, nk, d), args.k_stride, 128)?,
                    tensor_map(args.v, dtype, (b, h, nk, d), args.v_stride, 128)?,
                    [0; 16],
                    [0; 16],
                ];
                if extra.is_some() {
                    maps[3] = tensor_map(args.k2, dtype, (b, h, n_extra, d), args.k2_stride, 128)?;
                    maps[4] = tensor_map(args.v2, dtype, (b, h, n_extra, d), args.v2_stride, 128)?;
                }
                Ok(maps)
            })();
            let maps = match maps {
                Ok(maps) => maps,
                // A stride pattern the TMA unit refuses: retry once on contiguous copies.
                Err(_) if !all_contiguous => {
                    let c = |t: &Tensor| t.contiguous();
                    let (q, k, v) = (c(&q)?, c(&k)?, c(&v)?);
                    let extra = match &extra {
                        Some((k2, v2)) => Some((c(k2)?, c(v2)?)),
                        None => None,
                    };
                    let extra_ref = extra.as_ref().map(|(k2, v2)| (k2, v2));
                    return forward_with(&q, &k, &v, mask.as_ref(), extra_ref, scale, opts);
                }
                Err(e) => return Err(e),
            };
            tma_args = DenseTmaArgs { maps, base: args };
            launch.arg(&tma_args);
        } else {
            launch.arg(&args);
        }
        // SAFETY: every pointer in `args` addresses a live allocation of the size the strides imply
        // (checked shapes), and the outputs are fresh allocations of B·H·Nq·D and B·H·Nq elements.
        unsafe { launch.launch(cfg) }.map_err(|e| err(format!("launch failed: {e:?}")))?;
    }

    let o = Tensor::from_storage(Storage::Cuda(o_storage), (b, h, nq, d), BackpropOp::none(), false);
    let lse = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(lse_slice, dev.clone())),
        (b, h, nq),
        BackpropOp::none(),
        false,
    );
    Ok((o, lse))
}

fn fill_ptrs<T: CudaDType + DeviceRepr>(
    args: &mut DenseFwdArgs,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    extra: Option<&(Tensor, Tensor)>,
    dev: &CudaDevice,
) -> Result<()> {
    args.q = dev_ptr::<T>(q, dev)?;
    args.k = dev_ptr::<T>(k, dev)?;
    args.v = dev_ptr::<T>(v, dev)?;
    if let Some((k2, v2)) = extra {
        args.k2 = dev_ptr::<T>(k2, dev)?;
        args.v2 = dev_ptr::<T>(v2, dev)?;
    }
    Ok(())
}

