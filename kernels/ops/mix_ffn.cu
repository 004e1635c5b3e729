// Fused middle of the Mix-FFN (GLUMBConv) block, NCHW, one pass over the expanded tensor:
//
//   t      = silu(u + b_in[c])                      (the inverted 1x1 conv's bias and activation)
//   a[c]   = b_dw[c] + Σ_{i,j} w[c,i,j] · t[c](y+i-1, x+j-1)   (depth-wise 3x3, zero padding of t)
//   out[c] = a[c] · silu(a[c + C])                  (GLU: first half value, second half gate)
//
// u: (B, 2C, H, W), out: (B, C, H, W), element type T (bf16 / f16 / f32), math in f32.
// Unfused, this is ~20 passes over a tensor of 2C·H·W elements; here it is one read of u and one
// write of out. Memory-bound: the 18 MACs per output are free beside the bytes.

#include "elem.cuh"

namespace mix_ffn {

using ops::from_f32;
using ops::to_f32;

// Fast division: the error (2 ulp) is far below the bf16/f16 rounding of the output.
__device__ __forceinline__ float silu(float v) { return __fdividef(v, 1.f + __expf(-v)); }

// The output tile of one block: TILE_H rows x TILE_W columns of one (batch, channel) plane.
constexpr int TILE_W = 32, TILE_H = 16, THREADS = 256;
constexpr int HALO_W = TILE_W + 2, HALO_H = TILE_H + 2;

struct Layout {
    int batch, channels, height, width;  // channels: of the output (u has twice as many)
    int tiles_x, tiles_y;
};

// Loads the haloed input tile of channel `ch` of batch `b` into shared memory, already activated;
// positions outside the image are the convolution's zero padding.
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ u, const float* __restrict__ b_in, const Layout& L,
                                          int b, int ch, int y0, int x0, float (*tile)[HALO_W]) {
    const size_t plane = (size_t)L.height * L.width;
    const T* src = u + ((size_t)b * 2 * L.channels + ch) * plane;
    const float bias = b_in ? b_in[ch] : 0.f;
    for (int i = threadIdx.x; i < HALO_H * HALO_W; i += THREADS) {
        const int ty = i / HALO_W, tx = i % HALO_W;
        const int y = y0 + ty - 1, x = x0 + tx - 1;
        float v = 0.f;
        if (y >= 0 && y < L.height && x >= 0 && x < L.width) v = silu(to_f32(src[(size_t)y * L.width + x]) + bias);
        tile[ty][tx] = v;
    }
}

// a = b_dw + Σ w · t over the 3x3 neighbourhood of tile position (ty, tx).
__device__ __forceinline__ float conv3x3(const float (*tile)[HALO_W], const float* w, float bias, int ty, int tx) {
    float acc = bias;
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
        for (int j = 0; j < 3; ++j) acc = fmaf(w[i * 3 + j], tile[ty + i][tx + j], acc);
    return acc;
}

// grid: (tiles_x · tiles_y, channels, batch); block: THREADS.
template <typename T>
__device__ void glu_depthwise3x3(const T* __restrict__ u, const float* __restrict__ b_in,
                                 const float* __restrict__ w_dw, const float* __restrict__ b_dw, T* __restrict__ out,
                                 Layout L) {
    __shared__ float value_tile[HALO_H][HALO_W];
    __shared__ float gate_tile[HALO_H][HALO_W];
    const int c = blockIdx.y, b = blockIdx.z;
    const int y0 = (blockIdx.x / L.tiles_x) * TILE_H, x0 = (blockIdx.x % L.tiles_x) * TILE_W;

    // load: the value channel c and its gate channel c + C
    load_tile(u, b_in, L, b, c, y0, x0, value_tile);
    load_tile(u, b_in, L, b, c + L.channels, y0, x0, gate_tile);
    float wv[9], wg[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) {
        wv[k] = w_dw[(size_t)c * 9 + k];
        wg[k] = w_dw[(size_t)(c + L.channels) * 9 + k];
    }
    const float bv = b_dw ? b_dw[c] : 0.f, bg = b_dw ? b_dw[c + L.channels] : 0.f;
    __syncthreads();

    // compute + store: out = conv(value) · silu(conv(gate)); a warp covers one row of 32 columns
    T* dst = out + ((size_t)b * L.channels + c) * L.height * L.width;
    for (int i = threadIdx.x; i < TILE_H * TILE_W; i += THREADS) {
        const int ty = i / TILE_W, tx = i % TILE_W;
        const int y = y0 + ty, x = x0 + tx;
        if (y >= L.height || x >= L.width) continue;
        const float value = conv3x3(value_tile, wv, bv, ty, tx);
        const float gate = conv3x3(gate_tile, wg, bg, ty, tx);
        dst[(size_t)y * L.width + x] = from_f32<T>(value * silu(gate));
    }
}

// The same function on channels-last tokens: u (B, H·W, 2C) -> out (B, H·W, C), so that the 1x1
// convolutions around it are plain GEMMs on SANA's (B, N, C) tokens with no transposes.
// One block per 8x8 pixel tile and 32 channels: the haloed 10x10 tile of value and gate channels is
// activated once into shared memory (rows of 32 channels: coalesced 64-byte loads), then each
// thread computes one channel at 8 pixels.
constexpr int TOKEN_THREADS = 256, TOKEN_CH = 32, TOKEN_TILE = 8, TOKEN_HALO = TOKEN_TILE + 2;

struct TokenLayout {
    int batch, channels, height, width;
    int tiles_x, tiles_y;
};

template <typename T>
__device__ void glu_depthwise3x3_tokens(const T* __restrict__ u, const float* __restrict__ b_in,
                                        const float* __restrict__ w_dw, const float* __restrict__ b_dw,
                                        T* __restrict__ out, TokenLayout L) {
    __shared__ float value_tile[TOKEN_HALO * TOKEN_HALO][TOKEN_CH];
    __shared__ float gate_tile[TOKEN_HALO * TOKEN_HALO][TOKEN_CH];
    const int C = L.channels;
    const int c0 = blockIdx.x * TOKEN_CH;
    const int y0 = (blockIdx.y / L.tiles_x) * TOKEN_TILE, x0 = (blockIdx.y % L.tiles_x) * TOKEN_TILE;
    const int b = blockIdx.z;
    const size_t in_pixel = 2 * (size_t)C;
    const T* ub = u + (size_t)b * L.height * L.width * in_pixel;

    // load: activated value and gate channels of the haloed tile; zero outside the image
    for (int i = threadIdx.x; i < TOKEN_HALO * TOKEN_HALO * TOKEN_CH; i += TOKEN_THREADS) {
        const int ch = i % TOKEN_CH, pix = i / TOKEN_CH;
        const int y = y0 + pix / TOKEN_HALO - 1, x = x0 + pix % TOKEN_HALO - 1;
        const int c = c0 + ch;
        float v = 0.f, g = 0.f;
        if (c < C && y >= 0 && y < L.height && x >= 0 && x < L.width) {
            const T* p = ub + ((size_t)y * L.width + x) * in_pixel;
            v = silu(to_f32(p[c]) + (b_in ? b_in[c] : 0.f));
            g = silu(to_f32(p[c + C]) + (b_in ? b_in[c + C] : 0.f));
        }
        value_tile[pix][ch] = v;
        gate_tile[pix][ch] = g;
    }
    const int ch = threadIdx.x % TOKEN_CH, c = c0 + ch;
    float wv[9], wg[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) {
        wv[k] = c < C ? w_dw[(size_t)c * 9 + k] : 0.f;
        wg[k] = c < C ? w_dw[(size_t)(c + C) * 9 + k] : 0.f;
    }
    const float bv = (b_dw && c < C) ? b_dw[c] : 0.f, bg = (b_dw && c < C) ? b_dw[c + C] : 0.f;
    __syncthreads();
    if (c >= C) return;

    // compute + store: out = conv(value) · silu(conv(gate)); thread row = one pixel row of the tile
    T* ob = out + (size_t)b * L.height * L.width * C;
    const int ty = threadIdx.x / TOKEN_CH;  // 0..7
    const int y = y0 + ty;
    if (y >= L.height) return;
#pragma unroll
    for (int tx = 0; tx < TOKEN_TILE; ++tx) {
        const int x = x0 + tx;
        if (x >= L.width) break;
        float value = bv, gate = bg;
#pragma unroll
        for (int r = 0; r < 3; ++r)
#pragma unroll
            for (int j = 0; j < 3; ++j) {
                const int pix = (ty + r) * TOKEN_HALO + tx + j;
                value = fmaf(wv[r * 3 + j], value_tile[pix][ch], value);
                gate = fmaf(wg[r * 3 + j], gate_tile[pix][ch], gate);
            }
        ob[((size_t)y * L.width + x) * C + c] = from_f32<T>(value * silu(gate));
    }
}

}  // namespace mix_ffn

#define MIX_FFN_KERNEL(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(mix_ffn::THREADS)                                        \
        NAME(const T* u, const float* b_in, const float* w_dw, const float* b_dw, T* out, mix_ffn::Layout L) { \
        mix_ffn::glu_depthwise3x3<T>(u, b_in, w_dw, b_dw, out, L);                                        \
    }

MIX_FFN_KERNEL(glu_depthwise3x3_bf16, __nv_bfloat16)
MIX_FFN_KERNEL(glu_depthwise3x3_f16, __half)
MIX_FFN_KERNEL(glu_depthwise3x3_f32, float)

#define MIX_FFN_TOKENS_KERNEL(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(mix_ffn::TOKEN_THREADS)                                      \
        NAME(const T* u, const float* b_in, const float* w_dw, const float* b_dw, T* out, mix_ffn::TokenLayout L) { \
        mix_ffn::glu_depthwise3x3_tokens<T>(u, b_in, w_dw, b_dw, out, L);                                     \
    }

MIX_FFN_TOKENS_KERNEL(glu_depthwise3x3_tokens_bf16, __nv_bfloat16)
MIX_FFN_TOKENS_KERNEL(glu_depthwise3x3_tokens_f16, __half)
MIX_FFN_TOKENS_KERNEL(glu_depthwise3x3_tokens_f32, float)
