// Backward of the LayerNorm + AdaLN modulation (norm_modulate.cu):
//
//   y = x̂ · (1 + scale[b]) + shift[b],   x̂ = (x - μ) / σ   over the C channels of a row
//
// With ĝ = dy · (1 + scale[b]) (the gradient reaching x̂):
//   dx     = (ĝ - mean_c(ĝ) - x̂ · mean_c(ĝ · x̂)) / σ
//   dshift = Σ_n dy,   dscale = Σ_n dy · x̂          (sums over the N tokens of batch b)
//
// Output: one packed (B, N + 2, C) tensor in T: rows 0..N of batch b hold dx, row N dshift, row
// N + 1 dscale. Two kernels:
//   rows:       one block per token row (as the forward) recomputes μ, σ in f32 from registers,
//               writes dx and the row's (μ, 1/σ) to an f32 scratch (rows, 2);
//   modulation: one thread per (b, c) sums over the N tokens in f32 (coalesced along c; no
//               atomics, deterministic) and rounds once.

#include "elem.cuh"

namespace norm_modulate_bwd {

using ops::from_f32;
using ops::to_f32;

constexpr int THREADS = 256;
constexpr int PER_THREAD = 32;  // C <= THREADS · PER_THREAD (8192), as the forward

struct Layout {
    int rows, channels, rows_per_batch;
    float eps;
};


// dy, x: (rows, C); scale: (B, C) contiguous; packed: (B, N + 2, C); stats: (rows, 2) f32.
template <typename T>
__device__ void rows(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ scale,
                     T* __restrict__ packed, float* __restrict__ stats, Layout L) {
    __shared__ float scratch[THREADS / 32];
    const int r = blockIdx.x;
    const int b = r / L.rows_per_batch, t = r % L.rows_per_batch;
    const T* xr = x + (size_t)r * L.channels;
    const T* gr = dy + (size_t)r * L.channels;
    const T* sc = scale + (size_t)b * L.channels;

    // load x, then μ and 1/σ (two-pass, as the forward)
    float v[PER_THREAD], g[PER_THREAD], mean, rstd;
    ops::load_row_stats<THREADS>(xr, L.channels, L.eps, v, scratch, mean, rstd);

    // v becomes x̂, g becomes ĝ; then the two channel means of the dx formula
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int c = threadIdx.x + k * THREADS;
        const bool in = c < L.channels;
        v[k] = in ? (v[k] - mean) * rstd : 0.f;
        g[k] = in ? to_f32(gr[c]) * (1.f + to_f32(sc[c])) : 0.f;
        sum_g += g[k];
        sum_gx += g[k] * v[k];
    }
    const float mean_g = ops::block_sum<THREADS>(sum_g, scratch) / L.channels;
    const float mean_gx = ops::block_sum<THREADS>(sum_gx, scratch) / L.channels;

    T* dx = packed + ((size_t)b * (L.rows_per_batch + 2) + t) * L.channels;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int c = threadIdx.x + k * THREADS;
        if (c < L.channels) dx[c] = from_f32<T>((g[k] - mean_g - v[k] * mean_gx) * rstd);
    }
    if (threadIdx.x == 0) {
        stats[2 * (size_t)r] = mean;
        stats[2 * (size_t)r + 1] = rstd;
    }
}

// Grid (ceil(C / THREADS), B): thread (b, c) writes dshift[b, c] and dscale[b, c].
template <typename T>
__device__ void modulation(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ stats,
                           T* __restrict__ packed, Layout L) {
    const int c = blockIdx.x * THREADS + threadIdx.x;
    const int b = blockIdx.y;
    if (c >= L.channels) return;
    float dshift = 0.f, dscale = 0.f;
    for (int t = 0; t < L.rows_per_batch; ++t) {
        const size_t r = (size_t)b * L.rows_per_batch + t;
        const float g = to_f32(dy[r * L.channels + c]);
        const float x_hat = (to_f32(x[r * L.channels + c]) - stats[2 * r]) * stats[2 * r + 1];
        dshift += g;
        dscale += g * x_hat;
    }
    T* mod_rows = packed + ((size_t)b * (L.rows_per_batch + 2) + L.rows_per_batch) * L.channels;
    mod_rows[c] = from_f32<T>(dshift);
    mod_rows[L.channels + c] = from_f32<T>(dscale);
}

}  // namespace norm_modulate_bwd

#define NORM_MODULATE_BWD_KERNELS(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(norm_modulate_bwd::THREADS)                                   \
        layer_norm_modulate_bwd_rows_##SUFFIX(const T* dy, const T* x, const T* scale, T* packed, float* stats, \
                                              norm_modulate_bwd::Layout L) {                                   \
        norm_modulate_bwd::rows<T>(dy, x, scale, packed, stats, L);                                            \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(norm_modulate_bwd::THREADS)                                   \
        layer_norm_modulate_bwd_mod_##SUFFIX(const T* dy, const T* x, const float* stats, T* packed,            \
                                             norm_modulate_bwd::Layout L) {                                    \
        norm_modulate_bwd::modulation<T>(dy, x, stats, packed, L);                                             \
    }

NORM_MODULATE_BWD_KERNELS(bf16, __nv_bfloat16)
NORM_MODULATE_BWD_KERNELS(f16, __half)
NORM_MODULATE_BWD_KERNELS(f32, float)
