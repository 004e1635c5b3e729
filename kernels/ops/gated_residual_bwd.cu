// Backward of the gated residual out = x + y · gate[b] (gated_residual.cu with the bias already
// added to y; dx = dout needs no kernel):
//
//   dy[b, n, c] = dout[b, n, c] · gate[b, c],   dgate[b, c] = Σ_n dout[b, n, c] · y[b, n, c]
//
// Output: one packed (B, N + 1, C) tensor in T: rows 0..N of batch b hold dy, row N dgate. One
// thread per (b, c) walks the N tokens (coalesced along c), summing dgate in f32 without atomics.

#include "elem.cuh"

namespace gated_residual_bwd {

using ops::from_f32;
using ops::to_f32;

constexpr int THREADS = 256;

struct Layout {
    int batch, tokens, channels;
};

// dout, y: (B, N, C); gate: (B, C) contiguous. Grid (ceil(C / THREADS), B).
template <typename T>
__device__ void apply(const T* __restrict__ dout, const T* __restrict__ y, const T* __restrict__ gate,
                      T* __restrict__ packed, Layout L) {
    const int c = blockIdx.x * THREADS + threadIdx.x;
    const int b = blockIdx.y;
    if (c >= L.channels) return;
    const float g = to_f32(gate[(size_t)b * L.channels + c]);
    T* out = packed + (size_t)b * (L.tokens + 1) * L.channels;
    float dgate = 0.f;
    for (int t = 0; t < L.tokens; ++t) {
        const size_t i = ((size_t)b * L.tokens + t) * L.channels + c;
        const float d = to_f32(dout[i]);
        out[(size_t)t * L.channels + c] = from_f32<T>(d * g);
        dgate += d * to_f32(y[i]);
    }
    out[(size_t)L.tokens * L.channels + c] = from_f32<T>(dgate);
}

}  // namespace gated_residual_bwd

#define GATED_RESIDUAL_BWD_KERNEL(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(gated_residual_bwd::THREADS)                                     \
        NAME(const T* dout, const T* y, const T* gate, T* packed, gated_residual_bwd::Layout L) {                 \
        gated_residual_bwd::apply<T>(dout, y, gate, packed, L);                                                   \
    }

GATED_RESIDUAL_BWD_KERNEL(gated_residual_bwd_bf16, __nv_bfloat16)
GATED_RESIDUAL_BWD_KERNEL(gated_residual_bwd_f16, __half)
GATED_RESIDUAL_BWD_KERNEL(gated_residual_bwd_f32, float)
