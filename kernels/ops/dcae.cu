// DC-AE's EfficientViT block on channels-last tokens (B, H·W, C), so that every 1x1 convolution
// around these kernels is one plain GEMM:
//
//   dw_grouped_k{3,5}:   LiteMLA's multi-scale branch: depth-wise KxK conv (zero padding K/2, no
//                        bias) then the 1x1 conv grouped per 32 channels (no bias), one pass.
//   linattn_state:       per head, partial sums over a chunk of tokens of S = Σ relu(k) [v, 1]ᵀ
//   linattn_out:         o_n = relu(q_n)·S[:, :d] / (relu(q_n)·S[:, d] + eps), f32 throughout
//   rms_norm_residual:   y = x / sqrt(mean(x²) + eps) · w + b + residual over the last dim
//   rms_norm_channels_residual: the same over the channels of an NCHW tensor (DC-AE's ResBlock:
//                        norm(conv2(..)) + x), rms_norm.cuh's kernel with a residual
//
// The attention reads q, k, v in place from the two (B, N, 3C) tensors the reference concatenates
// (the to_qkv projection and the multi-scale branch): head h's channels are [96·h', 96·h' + 96)
// of its source, the first 32 q, then k, then v (d = 32), as the reference regroups them.
// Math in f32, one rounding per output; the reference computes the attention in f32 too.

#include "elem.cuh"
#include "rms_norm.cuh"

namespace dcae {

using ops::from_f32;
using ops::to_f32;

// ---------------------------------------------------------------------------------------------
// depth-wise KxK + grouped 1x1 (group of 32 channels)

constexpr int DW_THREADS = 256, DW_CH = 32, DW_TILE = 8;

struct DwLayout {
    int batch, channels, height, width;  // channels: of input and output (3C)
    int tiles_x;
};

// grid: (channels / 32, tiles_x · tiles_y, batch); block: 256 = 32 channels x 8 tile rows.
template <typename T, int K>
__device__ void dw_grouped(const T* __restrict__ u, const float* __restrict__ w_dw, const float* __restrict__ w_pw,
                           T* __restrict__ out, DwLayout L) {
    constexpr int R = K / 2, HALO = DW_TILE + K - 1;
    __shared__ float tile[HALO * HALO][DW_CH];
    __shared__ float dw[DW_TILE * DW_TILE][DW_CH + 1];
    __shared__ float wp[DW_CH][DW_CH + 1];
    const int c0 = blockIdx.x * DW_CH, b = blockIdx.z;
    const int y0 = (blockIdx.y / L.tiles_x) * DW_TILE, x0 = (blockIdx.y % L.tiles_x) * DW_TILE;
    const size_t C = L.channels;
    const T* ub = u + (size_t)b * L.height * L.width * C;

    // load: the haloed input tile (zero outside the image) and the group's 32x32 1x1 weights
    for (int i = threadIdx.x; i < HALO * HALO * DW_CH; i += DW_THREADS) {
        const int ch = i % DW_CH, pix = i / DW_CH;
        const int y = y0 + pix / HALO - R, x = x0 + pix % HALO - R;
        float v = 0.f;
        if (y >= 0 && y < L.height && x >= 0 && x < L.width) v = to_f32(ub[((size_t)y * L.width + x) * C + c0 + ch]);
        tile[pix][ch] = v;
    }
    for (int i = threadIdx.x; i < DW_CH * DW_CH; i += DW_THREADS) wp[i / DW_CH][i % DW_CH] = w_pw[(size_t)(c0 + i / DW_CH) * DW_CH + i % DW_CH];
    const int ch = threadIdx.x % DW_CH, ty = threadIdx.x / DW_CH;
    float wk[K * K];
#pragma unroll
    for (int t = 0; t < K * K; ++t) wk[t] = w_dw[(size_t)(c0 + ch) * K * K + t];
    __syncthreads();

    // compute: the depth-wise conv of channel ch at the 8 pixels of tile row ty
#pragma unroll
    for (int tx = 0; tx < DW_TILE; ++tx) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < K; ++i)
#pragma unroll
            for (int j = 0; j < K; ++j) acc = fmaf(wk[i * K + j], tile[(ty + i) * HALO + tx + j][ch], acc);
        dw[ty * DW_TILE + tx][ch] = acc;
    }
    __syncthreads();

    // compute + store: output channel o = ch of the group at the same 8 pixels
    const int y = y0 + ty;
    if (y >= L.height) return;
    float wrow[DW_CH];
#pragma unroll
    for (int j = 0; j < DW_CH; ++j) wrow[j] = wp[ch][j];
    for (int tx = 0; tx < DW_TILE; ++tx) {
        const int x = x0 + tx;
        if (x >= L.width) break;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < DW_CH; ++j) acc = fmaf(wrow[j], dw[ty * DW_TILE + tx][j], acc);
        out[(size_t)b * L.height * L.width * C + ((size_t)y * L.width + x) * C + c0 + ch] = from_f32<T>(acc);
    }
}

// ---------------------------------------------------------------------------------------------
// ReLU linear attention, head dim 32

constexpr int HD = 32, HD1 = HD + 1, STATE = HD * HD1;
constexpr int ATT_THREADS = 256, STATE_TOKENS = 64, OUT_TOKENS = 128;

struct AttnLayout {
    int batch, tokens;
    int heads_per_source;  // heads in each of the two sources: C / 32
    int source_channels;   // 3C
    int out_channels;      // 2C
    int splits, chunk;     // token chunks of the state pass
    float eps;
};

template <typename T>
__device__ __forceinline__ const T* head_source(const T* a, const T* m, int h, const AttnLayout& L, int b) {
    const T* src = h < L.heads_per_source ? a : m;
    return src + (size_t)b * L.tokens * L.source_channels + (size_t)(h % L.heads_per_source) * 3 * HD;
}

// grid: (splits, heads, batch). partial[(b·heads + h)·splits + s] = (32, 33) f32:
// [i][j] = Σ_n relu(k_n[i]) v_n[j] (j < 32), [i][32] = Σ_n relu(k_n[i]).
template <typename T>
__device__ void linattn_state(const T* __restrict__ a, const T* __restrict__ m, float* __restrict__ partial, AttnLayout L) {
    __shared__ float ks[STATE_TOKENS][HD];
    __shared__ float vs[STATE_TOKENS][HD];
    const int s = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int heads = gridDim.y;
    const T* src = head_source(a, m, h, L, b);
    const int n0 = s * L.chunk, n1 = min(n0 + L.chunk, L.tokens);
    const int i = threadIdx.x / 8, j0 = (threadIdx.x % 8) * 4;
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, ksum = 0.f;
    for (int nt = n0; nt < n1; nt += STATE_TOKENS) {
        // load: relu(k) and v of 64 tokens
        for (int e = threadIdx.x; e < STATE_TOKENS * 2 * HD; e += ATT_THREADS) {
            const int t = e / (2 * HD), c = e % (2 * HD), n = nt + t;
            const float v = n < n1 ? to_f32(src[(size_t)n * L.source_channels + HD + c]) : 0.f;
            if (c < HD) ks[t][c] = fmaxf(v, 0.f);
            else vs[t][c - HD] = v;
        }
        __syncthreads();
        // compute: 4 entries of row i of S, and the key sum
#pragma unroll 8
        for (int t = 0; t < STATE_TOKENS; ++t) {
            const float k = ks[t][i];
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r] = fmaf(k, vs[t][j0 + r], acc[r]);
            ksum += k;
        }
        __syncthreads();
    }
    // store
    float* dst = partial + ((size_t)(b * heads + h) * L.splits + s) * STATE + i * HD1;
#pragma unroll
    for (int r = 0; r < 4; ++r) dst[j0 + r] = acc[r];
    if (j0 == 0) dst[HD] = ksum;
}

// grid: (blocks per head, heads, batch); block j takes the 128-token tiles j, j + gridDim.x, ...:
// the state (the sum of the chunks' partials) is built once per block. One warp per token at a
// time, lane = output channel.
template <typename T>
__device__ void linattn_out(const T* __restrict__ a, const T* __restrict__ m, const float* __restrict__ partial,
                            T* __restrict__ out, AttnLayout L) {
    __shared__ float st[HD][HD1];
    __shared__ float qs[OUT_TOKENS][HD1];
    const int h = blockIdx.y, b = blockIdx.z, heads = gridDim.y;
    const T* src = head_source(a, m, h, L, b);
    // load: the state
    const float* part = partial + (size_t)(b * heads + h) * L.splits * STATE;
    for (int e = threadIdx.x; e < STATE; e += ATT_THREADS) {
        float sum = 0.f;
        for (int s = 0; s < L.splits; ++s) sum += part[(size_t)s * STATE + e];
        st[e / HD1][e % HD1] = sum;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    T* ob = out + (size_t)b * L.tokens * L.out_channels + (size_t)h * HD + lane;
    for (int n0 = blockIdx.x * OUT_TOKENS; n0 < L.tokens; n0 += gridDim.x * OUT_TOKENS) {
        // load: relu(q) of the tile
        for (int e = threadIdx.x; e < OUT_TOKENS * HD; e += ATT_THREADS) {
            const int t = e / HD, c = e % HD, n = n0 + t;
            qs[t][c] = n < L.tokens ? fmaxf(to_f32(src[(size_t)n * L.source_channels + c]), 0.f) : 0.f;
        }
        __syncthreads();
        // compute + store
        for (int t = warp; t < OUT_TOKENS; t += ATT_THREADS / 32) {
            const int n = n0 + t;
            if (n >= L.tokens) break;
            float num = 0.f, den = 0.f;
#pragma unroll
            for (int i = 0; i < HD; ++i) {
                const float q = qs[t][i];
                num = fmaf(q, st[i][lane], num);
                den = fmaf(q, st[i][HD], den);
            }
            ob[(size_t)n * L.out_channels] = from_f32<T>(num / (den + L.eps));
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm over the last dim + residual, one warp per row

constexpr int NORM_THREADS = 256, NORM_ROWS = NORM_THREADS / 32;

struct NormLayout {
    int rows, channels;
    float eps;
};

template <typename T>
__device__ void rms_norm_residual(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                                  const T* __restrict__ res, T* __restrict__ y, NormLayout L) {
    const int row = blockIdx.x * NORM_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= L.rows) return;
    const size_t base = (size_t)row * L.channels;
    float sq = 0.f;
    for (int c = lane; c < L.channels; c += 32) {
        const float v = to_f32(x[base + c]);
        sq = fmaf(v, v, sq);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    const float rstd = rsqrtf(sq / L.channels + L.eps);
    for (int c = lane; c < L.channels; c += 32) {
        float v = to_f32(x[base + c]) * rstd;
        if (w) v *= w[c];
        if (bias) v += bias[c];
        if (res) v += to_f32(res[base + c]);
        y[base + c] = from_f32<T>(v);
    }
}

// (rows, cols) -> (cols, rows) per batch through a 32x32 shared tile: NCHW <-> NHWC of the
// EfficientViT blocks (rows = channels, cols = pixels, or the reverse). grid: (ceil(cols / 32),
// ceil(rows / 32), batch); block: (32, 8).
template <typename T>
__device__ void transpose(const T* __restrict__ in, T* __restrict__ out, int rows, int cols) {
    __shared__ T tile[32][33];
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    const T* ib = in + (size_t)blockIdx.z * rows * cols;
    T* ob = out + (size_t)blockIdx.z * rows * cols;
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = ib[(size_t)r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) ob[(size_t)c * rows + r] = tile[threadIdx.x][i];
    }
}

}  // namespace dcae

#define DCAE_KERNELS(SUFFIX, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(dcae::DW_THREADS)                                                \
        dw_grouped_k3_##SUFFIX(const T* u, const float* w_dw, const float* w_pw, T* out, dcae::DwLayout L) {      \
        dcae::dw_grouped<T, 3>(u, w_dw, w_pw, out, L);                                                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(dcae::DW_THREADS)                                                \
        dw_grouped_k5_##SUFFIX(const T* u, const float* w_dw, const float* w_pw, T* out, dcae::DwLayout L) {      \
        dcae::dw_grouped<T, 5>(u, w_dw, w_pw, out, L);                                                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(dcae::ATT_THREADS)                                               \
        linattn_state_##SUFFIX(const T* a, const T* m, float* partial, dcae::AttnLayout L) {                      \
        dcae::linattn_state<T>(a, m, partial, L);                                                                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(dcae::ATT_THREADS)                                               \
        linattn_out_##SUFFIX(const T* a, const T* m, const float* partial, T* out, dcae::AttnLayout L) {          \
        dcae::linattn_out<T>(a, m, partial, out, L);                                                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(dcae::NORM_THREADS) rms_norm_residual_##SUFFIX(                  \
        const T* x, const float* w, const float* bias, const T* res, T* y, dcae::NormLayout L) {                  \
        dcae::rms_norm_residual<T>(x, w, bias, res, y, L);                                                        \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(rms_norm::THREADS) rms_norm_channels_residual_##SUFFIX(          \
        const T* x, const float* w, const float* bias, const T* res, T* y, rms_norm::Layout L) {                  \
        rms_norm::channels<T>(x, w, bias, res, y, L);                                                             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) transpose_##SUFFIX(const T* in, T* out, int rows, int cols) { \
        dcae::transpose<T>(in, out, rows, cols);                                                                  \
    }

DCAE_KERNELS(bf16, __nv_bfloat16)
DCAE_KERNELS(f16, __half)
DCAE_KERNELS(f32, float)
