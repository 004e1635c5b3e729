// RMSNorm over the channels of an NCHW tensor (DC-AE's norms and the GLUMBConv norm), without
// moving the channels last:
//
//   y[b, c, p] = x[b, c, p] / sqrt(mean_c x[b, :, p]² + eps) · weight[c] + bias[c] (+ residual[b, c, p])
//
// One thread per pixel p; consecutive threads take consecutive pixels, so every channel's loads
// and stores are coalesced. Two passes over the channels (the sum of squares, then the scaled
// values): the second re-reads x, mostly from L2 for the planes of a block. f32 math, one rounding.

#pragma once

#include "elem.cuh"

namespace rms_norm {

using ops::from_f32;
using ops::to_f32;

constexpr int THREADS = 256;

struct Layout {
    int batch, channels;
    long long pixels;  // H·W
    float eps;
};

// `residual` (optional, NCHW like x) is added after the affine parameters (DC-AE's ResBlock norm).
template <typename T>
__device__ void channels(const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
                         const T* __restrict__ residual, T* __restrict__ y, Layout L) {
    const long long p = blockIdx.x * (long long)THREADS + threadIdx.x;
    if (p >= L.pixels) return;
    const size_t base = (size_t)blockIdx.y * L.channels * L.pixels + p;
    // compute: mean of squares over the channels
    float sq = 0.f;
    for (int c = 0; c < L.channels; ++c) {
        const float v = to_f32(x[base + (size_t)c * L.pixels]);
        sq = fmaf(v, v, sq);
    }
    const float rstd = rsqrtf(sq / L.channels + L.eps);
    // store: scaled, then the affine parameters
    for (int c = 0; c < L.channels; ++c) {
        float v = to_f32(x[base + (size_t)c * L.pixels]) * rstd;
        if (weight) v *= weight[c];
        if (bias) v += bias[c];
        if (residual) v += to_f32(residual[base + (size_t)c * L.pixels]);
        y[base + (size_t)c * L.pixels] = from_f32<T>(v);
    }
}

}  // namespace rms_norm
