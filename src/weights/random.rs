//! Seeded random weights of any model's shape: for smoke tests, and for benchmarks of full-size
//! models when no checkpoint can be downloaded.
//!
//! Every tensor is drawn from its own stream, seeded by the spec's seed and the tensor's name, so a
//! tensor's values do not depend on the order in which a model asks for its weights. Values are
//! uniform with the variance of a common fan-in initialisation; 1-D tensors named like norm
//! weights are ones and other 1-D tensors (biases) are small, so activations stay finite through
//! deep random stacks.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

struct RandomBackend {
    seed: u64,
}

/// A VarBuilder whose every tensor is seeded random.
pub fn random_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend { seed }), dtype, device.clone())
}

/// SplitMix64: small, fast, and good enough to fill weight tensors.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The generator after `n` draws: SplitMix64's state only advances by a constant per draw.
    fn skipped(seed: u64, n: u64) -> Self {
        SplitMix64(seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }
}

/// `count` uniform values in [-bound, bound) from the stream `seed`. Full-size models have billions
/// of weights, so chunks of the stream are drawn on all cores; the values do not depend on the
/// number of threads.
fn uniform_values(seed: u64, count: usize, bound: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let mut values = vec![0f32; count];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if count < 2 * CHUNK || threads == 1 {
        let mut rng = SplitMix64(seed);
        values.iter_mut().for_each(|v| *v = rng.symmetric() * bound);
        return values;
    }
    let chunks: Vec<(usize, &mut [f32])> = values.chunks_mut(CHUNK).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads);
    let mut chunks = chunks.into_iter();
    std::thread::scope(|scope| loop {
        let batch: Vec<_> = chunks.by_ref().take(per_thread).collect();
        if batch.is_empty() {
            break;
        }
        scope.spawn(move || {
            for (index, chunk) in batch {
                let mut rng = SplitMix64::skipped(seed, (index * CHUNK) as u64);
                chunk.iter_mut().for_each(|v| *v = rng.symmetric() * bound);
            }
        });
    });
    values
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across platforms and Rust versions (unlike std's hasher).
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn is_norm_weight(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.ends_with("weight") && (n.contains("norm") || n.contains("ln"))
}

impl candle_nn::var_builder::SimpleBackend for RandomBackend {
    fn get(&self, shape: Shape, name: &str, _hint: Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let count = shape.elem_count();
        if dims.len() <= 1 && is_norm_weight(name) {
            return Tensor::ones(shape, dtype, device);
        }
        // Fan-in: every dim but the first (out features / out channels).
        let fan_in: usize = if dims.len() <= 1 { 1 } else { dims[1..].iter().product::<usize>().max(1) };
        let bound = if dims.len() <= 1 { 0.02 } else { (3.0 / fan_in as f32).sqrt() };
        let values = uniform_values(self.seed ^ name_hash(name), count, bound);
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no shape for `{name}`: the model must give one")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Answer for the checkpoint layout the models expect first (no `model.` prefixes).
        !name.starts_with("model.")
    }
}

/// Seeded standard-normal noise, the same on every device for the same seed.
pub fn seeded_normal(seed: u64, shape: impl Into<Shape>, device: &Device) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let mut rng = SplitMix64(seed ^ 0x5EED_0F_0015E);
    let n = shape.elem_count();
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        // Box-Muller on two uniforms in (0, 1].
        let u1 = ((rng.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        values.push((r * theta.cos()) as f32);
        if values.len() < n {
            values.push((r * theta.sin()) as f32);
        }
    }
    Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_order_independent() {
        let vb = random_var_builder(7, DType::F32, &Device::Cpu);
        let a = vb.get((4, 8), "x.weight").unwrap().to_vec2::<f32>().unwrap();
        let _ = vb.get((3, 3), "y.weight").unwrap();
        let again = random_var_builder(7, DType::F32, &Device::Cpu).get((4, 8), "x.weight").unwrap();
        assert_eq!(a, again.to_vec2::<f32>().unwrap());
        let other = random_var_builder(8, DType::F32, &Device::Cpu).get((4, 8), "x.weight").unwrap();
        assert_ne!(a, other.to_vec2::<f32>().unwrap());
        let bound = (3.0f32 / 8.0).sqrt();
        assert!(a.iter().flatten().all(|v| v.abs() <= bound));
        let ones = vb.get(8, "norm1.weight").unwrap().to_vec1::<f32>().unwrap();
        assert!(ones.iter().all(|v| *v == 1.0));
    }

    #[test]
    fn parallel_draws_equal_one_stream() {
        let count = 5 * (1 << 20) + 17;
        let mut rng = SplitMix64(99);
        let serial: Vec<f32> = (0..count).map(|_| rng.symmetric() * 0.5).collect();
        assert_eq!(uniform_values(99, count, 0.5), serial);
    }

    #[test]
    fn normal_noise_has_unit_moments() {
        let x = seeded_normal(3, 20000, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / x.len() as f32;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        assert_eq!(x, seeded_normal(3, 20000, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap());
    }
}
