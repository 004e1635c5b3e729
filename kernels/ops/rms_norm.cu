// RMSNorm over the channels of an NCHW tensor (DC-AE's norms and the GLUMBConv norm), without
// moving the channels last:
//
//   y[b, c, p] = x[b, c, p] / sqrt(mean_c x[b, :, p]² + eps) · weight[c] + bias[c]
//
// One thread per pixel p; consecutive threads take consecutive pixels, so every channel's loads
// and stores are coalesced. Two passes over the channels (the sum of squares, then the scaled
// values): the second re-reads x, mostly from L2 for the planes of a block. f32 math, one rounding.

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

template <typename T>
__device__ void channels(const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
                         T* __restrict__ y, Layout L) {
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
        y[base + (size_t)c * L.pixels] = from_f32<T>(v);
    }
}

}  // namespace rms_norm

#define RMS_NORM_KERNEL(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(rms_norm::THREADS)                                     \
        NAME(const T* x, const float* weight, const float* bias, T* y, rms_norm::Layout L) {            \
        rms_norm::channels<T>(x, weight, bias, y, L);                                                   \
    }

RMS_NORM_KERNEL(rms_norm_channels_bf16, __nv_bfloat16)
RMS_NORM_KERNEL(rms_norm_channels_f16, __half)
RMS_NORM_KERNEL(rms_norm_channels_f32, float)
