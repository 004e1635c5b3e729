// LayerNorm without affine parameters, then AdaLN modulation, in one pass (SANA's norm1 / norm2 /
// norm_out):
//
//   y[r, :] = (x[r, :] - mean) / sqrt(var + eps) · (1 + scale[b, :]) + shift[b, :],   b = r / rows_per_batch
//
// x, y: (rows, C) in T (bf16 / f16 / f32); shift, scale: (B, C) rows in T, `mod_stride` elements
// apart (views into the (B, 6, C) modulation table need no copy); statistics in f32, two-pass
// (mean, then the mean of squared deviations from registers: no cancellation). One block per row;
// each thread keeps its C / THREADS elements in registers between the passes.

#include "elem.cuh"

namespace norm_modulate {

using ops::from_f32;
using ops::to_f32;

constexpr int THREADS = 256;
// Elements per thread kept in registers: C <= THREADS · PER_THREAD (8192).
constexpr int PER_THREAD = 32;

struct Layout {
    int rows, channels, rows_per_batch;
    float eps;
    long long mod_stride;  // elements between the shift (and scale) rows of consecutive batches
};


template <typename T>
__device__ void layer_norm_modulate(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                                    T* __restrict__ y, Layout L) {
    __shared__ float scratch[THREADS / 32];
    const int r = blockIdx.x;
    const int b = r / L.rows_per_batch;
    const T* row = x + (size_t)r * L.channels;

    // load this thread's elements (strided by THREADS: coalesced), then mean and 1/σ
    float v[PER_THREAD], mean, rstd;
    ops::load_row_stats<THREADS>(row, L.channels, L.eps, v, scratch, mean, rstd);

    // store: (x - mean) · rstd · (1 + scale) + shift
    T* out = y + (size_t)r * L.channels;
    const T* sh = shift + (size_t)b * L.mod_stride;
    const T* sc = scale + (size_t)b * L.mod_stride;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int c = threadIdx.x + k * THREADS;
        if (c < L.channels) out[c] = from_f32<T>((v[k] - mean) * rstd * (1.f + to_f32(sc[c])) + to_f32(sh[c]));
    }
}

}  // namespace norm_modulate

#define NORM_MODULATE_KERNEL(NAME, T)                                                             \
    extern "C" __global__ void __launch_bounds__(norm_modulate::THREADS)                          \
        NAME(const T* x, const T* shift, const T* scale, T* y, norm_modulate::Layout L) {         \
        norm_modulate::layer_norm_modulate<T>(x, shift, scale, y, L);                             \
    }

NORM_MODULATE_KERNEL(layer_norm_modulate_bf16, __nv_bfloat16)
NORM_MODULATE_KERNEL(layer_norm_modulate_f16, __half)
NORM_MODULATE_KERNEL(layer_norm_modulate_f32, float)
