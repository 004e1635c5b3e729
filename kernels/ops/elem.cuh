// Shared by the fused layer kernels: element conversions (loads widen to f32, stores round once)
// a block-wide sum and the row statistics of a LayerNorm.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ops {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32(float v) { return __float2half(v); }
template <> __device__ __forceinline__ float from_f32(float v) { return v; }

// Sum over a block of THREADS threads (a multiple of 32); every thread gets the result. `scratch`
// holds THREADS / 32 floats of shared memory; calls may follow each other with the same scratch.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read from the previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
    return total;
}

// One row of `channels` elements in registers (this thread's share: elements threadIdx.x + k·THREADS,
// zeros beyond the row) and its mean and 1/sqrt(var + eps), two-pass: the variance from the centered
// values, no cancellation. The LayerNorm kernels' forward and backward share it.
template <int THREADS, int PER_THREAD, typename T>
__device__ __forceinline__ void load_row_stats(const T* __restrict__ row, int channels, float eps, float (&v)[PER_THREAD],
                                               float* scratch, float& mean, float& rstd) {
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int c = threadIdx.x + k * THREADS;
        v[k] = c < channels ? to_f32(row[c]) : 0.f;
        sum += v[k];
    }
    mean = block_sum<THREADS>(sum, scratch) / channels;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int c = threadIdx.x + k * THREADS;
        const float d = c < channels ? v[k] - mean : 0.f;
        sq += d * d;
    }
    rstd = rsqrtf(block_sum<THREADS>(sq, scratch) / channels + eps);
}

}  // namespace ops
