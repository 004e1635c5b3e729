// The gated residual of a DiT block, with the bias of the projection before it folded in:
//
//   out[r, c] = x[r, c] + (y[r, c] + bias[c]) · gate[b, c],   b = r / rows_per_batch
//
// x, y, out: (rows, C) in T; bias: (C,) in T or null; gate: (B, C) rows in T, `gate_stride`
// elements apart (a view into the (B, 6, C) modulation table) or null (no gate). Unfused this is
// three passes (bias add, gate multiply, residual add) each rounding to T; here one, rounding once.

#include "elem.cuh"

namespace gated_residual {

using ops::from_f32;
using ops::to_f32;

constexpr int THREADS = 256;

struct Layout {
    long long rows;
    int channels, rows_per_batch;
    long long gate_stride;
};

template <typename T>
__device__ void apply(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ bias,
                      const T* __restrict__ gate, T* __restrict__ out, Layout L) {
    const long long total = L.rows * L.channels;
    for (long long i = blockIdx.x * (long long)THREADS + threadIdx.x; i < total; i += (long long)gridDim.x * THREADS) {
        const int c = (int)(i % L.channels);
        const long long r = i / L.channels;
        float v = to_f32(y[i]);
        if (bias) v += to_f32(bias[c]);
        if (gate) v *= to_f32(gate[(r / L.rows_per_batch) * L.gate_stride + c]);
        out[i] = from_f32<T>(to_f32(x[i]) + v);
    }
}

}  // namespace gated_residual

#define GATED_RESIDUAL_KERNEL(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(gated_residual::THREADS)                               \
        NAME(const T* x, const T* y, const T* bias, const T* gate, T* out, gated_residual::Layout L) {  \
        gated_residual::apply<T>(x, y, bias, gate, out, L);                                             \
    }

GATED_RESIDUAL_KERNEL(gated_residual_bf16, __nv_bfloat16)
GATED_RESIDUAL_KERNEL(gated_residual_f16, __half)
GATED_RESIDUAL_KERNEL(gated_residual_f32, float)
