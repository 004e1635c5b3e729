//! Times the dense flash-attention CUDA kernel on the reference shapes (bf16, no mask) and, given
//! the output of tests/bench/dense_baseline.py from the same machine, prints cuDNN time / ours.
//!
//!   python3 tests/bench/dense_baseline.py cudnn > baseline.log
//!   cargo run --release --features cuda --example bench_dense -- baseline.log

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use visgen::attention::cuda::dense;

    const SHAPES: [(usize, usize, usize, usize); 4] = [(1, 24, 4608, 128), (1, 24, 16896, 128), (1, 20, 32760, 112), (2, 16, 8192, 64)];
    let baseline = std::env::args().nth(1).map(std::fs::read_to_string).transpose()?.unwrap_or_default();
    let device = candle_core::Device::new_cuda(0)?;
    let dev = device.as_cuda_device()?;
    println!("{:<24} {:>9} {:>8} {:>11} {:>14}", "shape", "ours ms", "TFLOP/s", "cuDNN ms", "cuDNN / ours");
    for (b, h, n, d) in SHAPES {
        let r = dense::bench(dev, b, h, n, d, 5, 20)?;
        let shape = format!("B{b} H{h} N{n} D{d}");
        // baseline lines: "baseline cudnn B1 H24 N4608 D128: 0.422 ms  619 TFLOP/s"
        let cudnn = baseline
            .lines()
            .filter(|l| l.starts_with("baseline cudnn") && l.contains(&format!("{shape}:")))
            .filter_map(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
            .next();
        match cudnn {
            Some(c) => println!("{shape:<24} {:>9.3} {:>8.0} {c:>11.3} {:>14.2}", r.ms, r.tflops, c / r.ms),
            None => println!("{shape:<24} {:>9.3} {:>8.0} {:>11} {:>14}", r.ms, r.tflops, "-", "-"),
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("bench_dense needs the `cuda` feature");
}
