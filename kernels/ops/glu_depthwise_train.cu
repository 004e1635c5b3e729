// The Mix-FFN middle on channels-last tokens, forward and backward, for training
// (src/layers/train_glu.rs has the math and the CPU reference):
//
//   a = silu(u),   d[p, k] = wb[k, 9] + Σ_t wb[k, t] · a[p + off(t), k],   out[p, j] = d[p, j] · silu(d[p, h + j])
//
// u: (B, H·W, 2h) in T (the expansion's bias already added); wb: (2h, 10) in T, the 3x3 taps
// row-major then the bias; off(t) = (t / 3 - 1, t % 3 - 1) with zero padding outside the grid.
// Backward (packed output [du (B·H·W·2h); dwb (2h·10)] in T):
//   dd:      dd[p, j] = dout · silu(d_gate),  dd[p, h + j] = dout · d_value · silu'(d_gate)  (f32 scratch)
//   du:      du[q, k] = silu'(u[q, k]) · Σ_t wb[k, t] · dd[q - off(t), k]
//   weights: dwb[k, t] = Σ_p dd[p, k] · a[p + off(t), k], dwb[k, 9] = Σ_p dd[p, k]: each thread
//            sums a slice of the tokens in registers, then one f32 atomic per (k, t) per thread;
//            a last kernel rounds the f32 sums into the packed output.
// Every kernel: one thread per (token, channel), channel fastest (coalesced), grid-stride loops.

#include "elem.cuh"

namespace glu_train {

using ops::from_f32;
using ops::to_f32;

constexpr int THREADS = 256;
constexpr int TAPS = 9;

struct Layout {
    int batch, height, width, channels;  // channels: of u (2h)
};

__device__ __forceinline__ float silu(float z) { return z / (1.f + expf(-z)); }
__device__ __forceinline__ float silu_grad(float z) {
    const float s = 1.f / (1.f + expf(-z));
    return s * (1.f + z * (1.f - s));
}

// Token index of the neighbour of (y, x) at offset (dy, dx), or -1 outside the grid.
__device__ __forceinline__ long long neighbour(const Layout& L, int b, int y, int x, int dy, int dx) {
    const int yy = y + dy, xx = x + dx;
    if (yy < 0 || xx < 0 || yy >= L.height || xx >= L.width) return -1;
    return ((long long)b * L.height + yy) * L.width + xx;
}

// d at token (b, y, x), channel k.
template <typename T>
__device__ __forceinline__ float conv(const T* u, const T* wb, const Layout& L, int b, int y, int x, int k) {
    float d = to_f32(wb[k * (TAPS + 1) + TAPS]);
#pragma unroll
    for (int t = 0; t < TAPS; ++t) {
        const long long q = neighbour(L, b, y, x, t / 3 - 1, t % 3 - 1);
        if (q >= 0) d += to_f32(wb[k * (TAPS + 1) + t]) * silu(to_f32(u[q * L.channels + k]));
    }
    return d;
}

// Batch, row and column of pixel p (pixels row-major, batch outermost).
__device__ __forceinline__ void pixel_coords(const Layout& L, long long p, int& b, int& y, int& x) {
    x = (int)(p % L.width);
    y = (int)((p / L.width) % L.height);
    b = (int)(p / ((long long)L.width * L.height));
}

template <typename T>
__device__ void forward(const T* __restrict__ u, const T* __restrict__ wb, T* __restrict__ out, Layout L) {
    const int h = L.channels / 2;
    const long long total = (long long)L.batch * L.height * L.width * h;
    for (long long i = blockIdx.x * (long long)THREADS + threadIdx.x; i < total; i += (long long)gridDim.x * THREADS) {
        const int j = (int)(i % h);
        const long long p = i / h;
        int b, y, x;
        pixel_coords(L, p, b, y, x);
        const float value = conv(u, wb, L, b, y, x, j), gate = conv(u, wb, L, b, y, x, h + j);
        out[i] = from_f32<T>(value * silu(gate));
    }
}

template <typename T>
__device__ void grad_d(const T* __restrict__ dout, const T* __restrict__ u, const T* __restrict__ wb, float* __restrict__ dd, Layout L) {
    const int h = L.channels / 2;
    const long long total = (long long)L.batch * L.height * L.width * h;
    for (long long i = blockIdx.x * (long long)THREADS + threadIdx.x; i < total; i += (long long)gridDim.x * THREADS) {
        const int j = (int)(i % h);
        const long long p = i / h;
        int b, y, x;
        pixel_coords(L, p, b, y, x);
        const float value = conv(u, wb, L, b, y, x, j), gate = conv(u, wb, L, b, y, x, h + j);
        const float g = to_f32(dout[i]);
        dd[p * L.channels + j] = g * silu(gate);
        dd[p * L.channels + h + j] = g * value * silu_grad(gate);
    }
}

template <typename T>
__device__ void grad_u(const float* __restrict__ dd, const T* __restrict__ u, const T* __restrict__ wb, T* __restrict__ packed, Layout L) {
    const long long total = (long long)L.batch * L.height * L.width * L.channels;
    for (long long i = blockIdx.x * (long long)THREADS + threadIdx.x; i < total; i += (long long)gridDim.x * THREADS) {
        const int k = (int)(i % L.channels);
        const long long q = i / L.channels;
        int b, y, x;
        pixel_coords(L, q, b, y, x);
        float acc = 0.f;
#pragma unroll
        for (int t = 0; t < TAPS; ++t) {
            // the token p whose tap t reads q: p = q - off(t)
            const long long p = neighbour(L, b, y, x, 1 - t / 3, 1 - t % 3);
            if (p >= 0) acc += to_f32(wb[k * (TAPS + 1) + t]) * dd[p * L.channels + k];
        }
        packed[i] = from_f32<T>(acc * silu_grad(to_f32(u[i])));
    }
}

// Grid (ceil(channels / THREADS), token slices): thread (k, slice) sums its tokens, then adds.
template <typename T>
__device__ void grad_weights(const float* __restrict__ dd, const T* __restrict__ u, float* __restrict__ sums, Layout L) {
    const int k = blockIdx.x * THREADS + threadIdx.x;
    if (k >= L.channels) return;
    const long long tokens = (long long)L.batch * L.height * L.width;
    const long long per_slice = (tokens + gridDim.y - 1) / gridDim.y;
    const long long begin = blockIdx.y * per_slice, end = min(tokens, begin + per_slice);
    float acc[TAPS + 1] = {};
    for (long long p = begin; p < end; ++p) {
        int b, y, x;
        pixel_coords(L, p, b, y, x);
        const float g = dd[p * L.channels + k];
        acc[TAPS] += g;
#pragma unroll
        for (int t = 0; t < TAPS; ++t) {
            const long long q = neighbour(L, b, y, x, t / 3 - 1, t % 3 - 1);
            if (q >= 0) acc[t] += g * silu(to_f32(u[q * L.channels + k]));
        }
    }
#pragma unroll
    for (int t = 0; t <= TAPS; ++t) atomicAdd(&sums[k * (TAPS + 1) + t], acc[t]);
}

template <typename T>
__device__ void round_sums(const float* __restrict__ sums, T* __restrict__ dst, int count) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i < count) dst[i] = from_f32<T>(sums[i]);
}

}  // namespace glu_train

#define GLU_TRAIN_KERNELS(SUFFIX, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(glu_train::THREADS)                                                  \
        glu_dw_tokens_fwd_##SUFFIX(const T* u, const T* wb, T* out, glu_train::Layout L) {                           \
        glu_train::forward<T>(u, wb, out, L);                                                                         \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(glu_train::THREADS)                                                  \
        glu_dw_tokens_grad_d_##SUFFIX(const T* dout, const T* u, const T* wb, float* dd, glu_train::Layout L) {      \
        glu_train::grad_d<T>(dout, u, wb, dd, L);                                                                     \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(glu_train::THREADS)                                                  \
        glu_dw_tokens_grad_u_##SUFFIX(const float* dd, const T* u, const T* wb, T* packed, glu_train::Layout L) {    \
        glu_train::grad_u<T>(dd, u, wb, packed, L);                                                                   \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(glu_train::THREADS)                                                  \
        glu_dw_tokens_grad_w_##SUFFIX(const float* dd, const T* u, float* sums, glu_train::Layout L) {               \
        glu_train::grad_weights<T>(dd, u, sums, L);                                                                   \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(glu_train::THREADS)                                                  \
        glu_dw_tokens_round_##SUFFIX(const float* sums, T* dst, int count) {                                          \
        glu_train::round_sums<T>(sums, dst, count);                                                                   \
    }

GLU_TRAIN_KERNELS(bf16, __nv_bfloat16)
GLU_TRAIN_KERNELS(f16, __half)
GLU_TRAIN_KERNELS(f32, float)
