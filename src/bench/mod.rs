//! `gen bench`: device checks and attention micro-benchmarks, printed to stdout.
//!
//! On CUDA: the GPU (name, SMs, memory), the device copy rate and a bf16 4096³ candle matmul (the
//! two ceilings), then the attention cases. Times are CUDA-event medians over `iters` runs after
//! warm-up. Cases: `copy`, `matmul`, `dense` and `linear` (our attention kernels), `sana` (a whole
//! SANA-1600M step and image with random weights, [`sana`]), `dcae` (the DC-AE decoder, [`dcae`]);
//! `None` runs all but `sana` and `dcae`.

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// "cpu" | "cuda" | "cuda:N"
    pub device: String,
    /// One case by name, or all of them.
    pub case: Option<String>,
    /// Timed runs per measurement (after warm-up).
    pub iters: usize,
    /// A file of `baseline NAME: VALUE ms` lines measured in the same run (the PyTorch scripts
    /// under tests/bench/): cases print their ratio to the matching line.
    pub baseline: Option<std::path::PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { device: "cuda".into(), case: None, iters: 20, baseline: None }
    }
}

/// The cases `run` knows.
pub const CASES: [&str; 6] = ["copy", "matmul", "dense", "linear", "sana", "dcae"];

#[cfg(feature = "cuda")]
mod dcae;
#[cfg(feature = "cuda")]
mod sana;

enum Target {
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<Target> {
    match s {
        "cpu" => Ok(Target::Cpu),
        "cuda" => Ok(Target::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Target::Cuda(n)),
            _ => Err(Error::usage(format!("--device {s:?}: expected cpu, cuda or cuda:N"))),
        },
    }
}

pub fn run(opts: &BenchOptions) -> Result<()> {
    if let Some(case) = &opts.case {
        if !CASES.contains(&case.as_str()) {
            return Err(Error::usage(format!("unknown bench case {case:?}; cases: {}", CASES.join(", "))));
        }
    }
    if opts.iters == 0 {
        return Err(Error::usage("--iters must be at least 1"));
    }
    match parse_device(&opts.device)? {
        Target::Cpu => cpu::run(opts),
        Target::Cuda(ordinal) => cuda_run(opts, ordinal),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_run(_opts: &BenchOptions, _ordinal: usize) -> Result<()> {
    Err(Error::usage("built without CUDA: rebuild with --features cuda"))
}

#[cfg(feature = "cuda")]
fn cuda_run(opts: &BenchOptions, ordinal: usize) -> Result<()> {
    gpu::run(opts, ordinal)
}

fn wants(opts: &BenchOptions, case: &str) -> bool {
    match opts.case.as_deref() {
        // The whole-model cases take minutes and tens of GB: only when named.
        None => case != "sana" && case != "dcae",
        Some(c) => c == case,
    }
}

/// `baseline NAME: VALUE ms` lines of a baseline log, by NAME.
pub fn read_baselines(path: &std::path::Path) -> Result<std::collections::HashMap<String, f64>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::usage(format!("cannot read baseline log `{}`: {e}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("baseline ")?;
            let (name, value) = rest.split_once(": ")?;
            let ms = value.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((name.trim().to_string(), ms))
        })
        .collect())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

mod cpu {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// Only the matmul makes sense on the CPU; the attention kernels are CUDA-only.
    pub fn run(opts: &BenchOptions) -> Result<()> {
        println!("device: cpu");
        if wants(opts, "matmul") {
            let n = 512;
            let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?.to_dtype(DType::F32)?;
            let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
            let mut times = Vec::new();
            for i in 0..opts.iters + 2 {
                let t0 = std::time::Instant::now();
                let c = a.matmul(&b)?;
                c.sum_all()?.to_scalar::<f32>()?;
                if i >= 2 {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            let ms = median(times);
            println!("matmul f32 {n}³ (cpu): {ms:.3} ms, {:.1} GFLOP/s", 2.0 * (n as f64).powi(3) / ms / 1e6);
        }
        if ["copy", "dense", "linear", "sana", "dcae"].iter().any(|case| wants(opts, case)) {
            println!("(copy, dense, linear, sana and dcae run on CUDA only: --device cuda)");
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute as A, CUevent_flags};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{DType, Device, Tensor};

    use crate::attention::cuda::dense;
    use crate::attention::cuda::linear::{self, KernelOptions, OutConfig, Passes};

    type Baselines = std::collections::HashMap<String, f64>;
    use crate::attention::Rope;

    /// Median milliseconds of `f` over `iters` runs after `warmup`, by CUDA events on the stream.
    pub fn time_ms(dev: &CudaDevice, warmup: usize, iters: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
        time_ms_per_call(dev, warmup, iters, 1, f)
    }

    /// [`time_ms`] with `calls` back-to-back calls per sample, divided by `calls`: for a single
    /// kernel, so the host's work between launches overlaps the previous launch, as in a model.
    pub fn time_ms_per_call(
        dev: &CudaDevice,
        warmup: usize,
        iters: usize,
        calls: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        let stream = dev.cuda_stream();
        let ev = |e| Error::Other(format!("cuda event: {e:?}"));
        for _ in 0..warmup {
            f()?;
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(ev)?;
            for _ in 0..calls {
                f()?;
            }
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(ev)?;
            end.synchronize().map_err(ev)?;
            times.push(start.elapsed_ms(&end).map_err(ev)? as f64 / calls as f64);
        }
        Ok(median(times))
    }

    pub fn run(opts: &BenchOptions, ordinal: usize) -> Result<()> {
        let device = Device::new_cuda(ordinal)?;
        let dev = device.as_cuda_device()?.clone();
        crate::cuda_graph::prepare_device(&dev);
        let ctx = dev.cuda_stream().context().clone();
        let drv = |e| Error::Other(format!("cuda driver: {e:?}"));
        let name = ctx.name().map_err(drv)?;
        let sms = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let mem = ctx.total_mem().map_err(drv)?;
        println!("device: cuda:{ordinal} {name}, sm_{major}{minor}, {sms} SMs, {:.1} GiB", mem as f64 / (1u64 << 30) as f64);
        crate::kernels::keep_freed_memory(&dev)?;
        let from = crate::kernels::load(&dev, "attention/linear/linear_attn", "linear_fill_u16")?.from;
        println!("kernels: {} embedded modules, loaded from {from:?}", crate::kernels::module_keys().count());

        if wants(opts, "copy") {
            // Device-to-device copy between two preallocated 1 GiB buffers.
            let n = 1usize << 30;
            let src = dev.alloc_zeros::<u8>(n)?;
            let mut dst = dev.alloc_zeros::<u8>(n)?;
            let stream = dev.cuda_stream();
            let ms = time_ms(&dev, 2, opts.iters, || {
                stream.memcpy_dtod(&src, &mut dst).map_err(|e| Error::Other(format!("copy: {e:?}")))?;
                Ok(())
            })?;
            println!("copy 1 GiB (read + write): {ms:.3} ms, {:.2} TB/s", 2.0 * n as f64 / ms / 1e9);
        }
        if wants(opts, "matmul") {
            let n = 4096;
            let a = Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(DType::BF16)?;
            let ms = time_ms(&dev, 3, opts.iters, || {
                a.matmul(&b)?;
                Ok(())
            })?;
            println!("matmul bf16 {n}³ (candle/cuBLAS): {ms:.3} ms, {:.0} TFLOP/s", 2.0 * (n as f64).powi(3) / ms / 1e9);
        }
        let baselines = opts.baseline.as_deref().map(read_baselines).transpose()?.unwrap_or_default();
        if wants(opts, "dense") {
            dense_cases(&device, &dev, opts.iters, &baselines)?;
        }
        if wants(opts, "linear") {
            linear_cases(&device, &dev, opts.iters, &baselines)?;
        }
        if wants(opts, "sana") {
            super::sana::run(&device, &dev, ordinal, opts.iters, &baselines)?;
        }
        if wants(opts, "dcae") {
            super::dcae::run(&device, &dev, opts.iters, &baselines)?;
        }
        Ok(())
    }

    /// The shapes of the attention goals (issue 3): (B, H, N, D).
    pub const ATTENTION_SHAPES: [(usize, usize, usize, usize); 4] =
        [(1, 24, 4608, 128), (1, 24, 16896, 128), (1, 20, 32760, 112), (2, 16, 8192, 64)];

    /// `baseline / ours`, or "-" when the baseline log has no such line.
    fn ratio(baselines: &Baselines, name: &str, ms: f64) -> String {
        baselines.get(name).map_or("-".into(), |b| format!("{:.2}", b / ms))
    }

    /// Our dense flash-attention kernel, bf16, no mask; ratio to `baseline cudnn SHAPE` lines
    /// (tests/bench/dense_baseline.py).
    fn dense_cases(device: &Device, dev: &CudaDevice, iters: usize, baselines: &Baselines) -> Result<()> {
        println!("dense attention (FLOP = 4·B·H·N²·D):");
        println!("{:<26} {:>9} {:>8} {:>10} {:>13}", "shape", "ms", "TFLOP/s", "cuDNN ms", "cuDNN / ours");
        for &(b, h, n, d) in &ATTENTION_SHAPES {
            let make = || -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, (b, h, n, d), device)?.to_dtype(DType::BF16)?) };
            let (q, k, v) = (make()?, make()?, make()?);
            let scale = 1.0 / (d as f64).sqrt();
            let ms = time_ms_per_call(dev, 3, iters, 4, || {
                dense::forward(&q, &k, &v, None, None, scale)?;
                Ok(())
            })?;
            let shape = format!("B{b} H{h} N{n} D{d}");
            let tflops = 4.0 * (b * h) as f64 * (n * n * d) as f64 / ms / 1e9;
            let key = format!("cudnn {shape}");
            let cudnn = baselines.get(&key).map_or("-".into(), |c| format!("{c:.3}"));
            println!("{shape:<26} {ms:>9.3} {tflops:>8.0} {cudnn:>10} {:>13}", ratio(baselines, &key, ms));
        }
        Ok(())
    }

    fn linear_cases(device: &Device, dev: &CudaDevice, iters: usize, baselines: &Baselines) -> Result<()> {
        println!("linear attention (bytes = read q, k, v + write o; TB/s = bytes / time; eager = PyTorch, same run):");
        println!("{:<26} {:<6} {:<12} {:>9} {:>8} {:>13}", "shape", "dtype", "variant", "ms", "TB/s", "eager / ours");
        for &(b, h, n, d) in &ATTENTION_SHAPES {
            let q = Tensor::randn(0f32, 1.0, (b, h, n, d), device)?.to_dtype(DType::BF16)?;
            let k = Tensor::randn(0f32, 1.0, (b, h, n, d), device)?.to_dtype(DType::BF16)?;
            let v = Tensor::randn(0f32, 1.0, (b, h, n, d), device)?.to_dtype(DType::BF16)?;
            let bytes = 4.0 * (b * h * n * d * 2) as f64;
            let shape = format!("B{b} H{h} N{n} D{d}");
            let base = KernelOptions::new(1e-15);
            let mut variants: Vec<(&str, Option<Rope>, KernelOptions, usize)> = vec![
                ("v3 single", None, base, n),
                ("v3 split", None, KernelOptions { split_state: true, ..base }, n),
                ("v2 split", None, KernelOptions { out_config: OutConfig::V2, split_state: true, ..base }, n),
                ("v1 split", None, KernelOptions { out_config: OutConfig::V1, split_state: true, ..base }, n),
                ("state pass", None, KernelOptions { passes: Passes::StateOnly, ..base }, n),
                ("out pass v3", None, KernelOptions { passes: Passes::OutOnly, ..base }, n),
            ];
            if d == 112 {
                // SANA-Video: RoPE numerator, and the chunk-causal form over 4 chunks.
                let rope = rope_tables(device, n, d)?;
                variants.push(("rope", Some(rope.clone()), base, n));
                variants.push(("rope chunk/4", Some(rope), base, n.div_ceil(4)));
            }
            for (label, rope, o, chunk) in variants {
                let ms = time_ms_per_call(dev, 3, iters, 4, || {
                    linear::run(&q, &k, &v, rope.as_ref(), None, chunk, &o)?;
                    Ok(())
                })?;
                // The single passes move half the bytes each (k, v in; q in, o out).
                let moved = if o.passes == Passes::Both { bytes } else { bytes / 2.0 };
                let eager = match label {
                    "rope" => ratio(baselines, &format!("eager rope {shape}"), ms),
                    _ if o.passes == Passes::Both && chunk == n => ratio(baselines, &format!("eager plain {shape}"), ms),
                    _ => "".into(),
                };
                println!("{shape:<26} {:<6} {label:<12} {ms:>9.4} {:>8.3} {eager:>13}", "bf16", moved / ms / 1e9);
            }
        }
        Ok(())
    }

    /// Interleaved-pair tables (N, D) with a 1-D position: enough for timing.
    fn rope_tables(device: &Device, n: usize, d: usize) -> Result<Rope> {
        let pos = Tensor::arange(0f32, n as f32, device)?.reshape((n, 1))?;
        let freqs: Vec<f32> = (0..d).map(|j| 1.0 / 10000f32.powf((2 * (j / 2)) as f32 / d as f32)).collect();
        let freqs = Tensor::from_vec(freqs, (1, d), device)?;
        let angles = pos.broadcast_mul(&freqs)?;
        Ok(Rope { cos: angles.cos()?, sin: angles.sin()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert!(matches!(parse_device("cpu"), Ok(Target::Cpu)));
        assert!(matches!(parse_device("cuda"), Ok(Target::Cuda(0))));
        assert!(matches!(parse_device("cuda:3"), Ok(Target::Cuda(3))));
        for bad in ["gpu", "cuda:", "cuda:x", ""] {
            assert!(matches!(parse_device(bad), Err(Error::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn bad_options_are_usage_errors() {
        let opts = |case: Option<&str>, iters| BenchOptions { device: "cpu".into(), case: case.map(String::from), iters, baseline: None };
        assert!(matches!(run(&opts(Some("nope"), 1)), Err(Error::Usage(_))));
        assert!(matches!(run(&opts(None, 0)), Err(Error::Usage(_))));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        let opts = BenchOptions { device: "cuda".into(), case: None, iters: 1, baseline: None };
        match run(&opts) {
            Err(Error::Usage(msg)) => assert!(msg.contains("--features cuda"), "{msg}"),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn cpu_matmul_case_runs() {
        let opts = BenchOptions { device: "cpu".into(), case: Some("matmul".into()), iters: 1, baseline: None };
        run(&opts).unwrap();
    }
}
