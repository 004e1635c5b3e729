// 3x3 convolution, stride 1, zero padding 1, NCHW, bf16/f16, as an implicit GEMM on the tensor
// cores (no im2col buffer):
//
//   out[b, co, p] = bias[co] + Σ_{tap, ci} W[co, tap, ci] · in[b, ci, p shifted by tap]
//
// GEMM view: M = C_out, N = H·W pixels, K = 9·C_in ordered (channel chunk of 32, tap, channel):
// the weight is passed permuted to (C_out, C_in / 32, 3·3, 32), so a 32-deep K tile is 32 input
// channels of one tap, and the 9 taps of a chunk are consecutive K tiles: their B tiles are the
// same 32 planes shifted, read from L1 (tap-major K re-read all C_in planes per tap: for 512
// channels that left L1 and the conv ran slower than im2col + cuBLAS). The B tile
// is gathered straight from the image: for a tap, pixel p reads p + dy·W + dx (zero outside), or,
// with `upsample`, the nearest-×2 source pixel of an image of half the size (diffusers'
// interpolate + conv of DCUpBlock2d, without materializing the 4x larger input). With
// `shortcut_repeats` > 0 (only with upsample) the epilogue adds DCUpBlock2d's shortcut,
// pixel_shuffle(repeat_interleave(in, repeats), 2), read straight from the input:
//   shortcut[co, y, x] = in[(4·co + 2·(y & 1) + (x & 1)) / repeats, y / 2, x / 2]
//
// Block: 128 (C_out) x 128 (pixels), 8 warps as 2 x 4, each a 64 x 32 tile of 16x16x16 WMMA bf16
// fragments with f32 accumulation. K tiles of 32, double-buffered in shared memory with the next
// tile's global loads held in registers while the current one is multiplied. Epilogue per warp
// through a 16x16 f32 staging tile: + bias, optional SiLU, one rounding.

#include <mma.h>

#include "elem.cuh"

namespace conv_igemm {

using namespace nvcuda;
using ops::from_f32;

constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256;
constexpr int A_LD = BK + 8, B_LD = BN + 8;  // padded rows: fewer bank conflicts, 32-byte aligned fragments
constexpr int B_PER_THREAD = BK * BN / THREADS;  // 16

struct Layout {
    int batch, c_in, c_out;
    int height, width;        // of the output (and of the conv's input grid)
    int in_height, in_width;  // of the stored input: height, width, or half of them with upsample
    int upsample, silu;
    int shortcut_repeats;  // 0: none
};

__device__ __forceinline__ float silu(float v) { return __fdividef(v, 1.f + __expf(-v)); }

// grid: (ceil(H·W / BN), ceil(C_out / BM), batch); block: THREADS.
template <typename T>
__device__ void conv3x3(const T* __restrict__ in, const T* __restrict__ w, const float* __restrict__ bias,
                        T* __restrict__ out, Layout L) {
    __shared__ __align__(128) T As[2][BM][A_LD];
    __shared__ __align__(128) T Bs[2][BK][B_LD];
    __shared__ __align__(128) float Cs[THREADS / 32][16][16];

    const int pixels = L.height * L.width, in_pixels = L.in_height * L.in_width;
    const int p0 = blockIdx.x * BN, co0 = blockIdx.y * BM, b = blockIdx.z;
    const int K = 9 * L.c_in, k_tiles = K / BK;
    const T* inb = in + (size_t)b * L.c_in * in_pixels;

    // This thread's B pixel (fixed) and K rows kb + 2r; its A rows: two 16-byte chunks.
    const int bp = threadIdx.x % BN, kb = threadIdx.x / BN;
    const int p = p0 + bp;
    const int py = p < pixels ? p / L.width : -10, px = p < pixels ? p % L.width : -10;

    uint4 a_reg[2];
    unsigned short b_reg[B_PER_THREAD];  // raw 16-bit elements: no conversions on the way through

    auto load_global = [&](int kt) {
        const int k0 = kt * BK;
        // A: rows co0 + r, 32 contiguous k (4 chunks of 8 elements per row)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int chunk = threadIdx.x + r * THREADS;  // 0..511
            const int row = chunk / 4, col = (chunk % 4) * 8;
            const int co = co0 + row;
            a_reg[r] = co < L.c_out ? *reinterpret_cast<const uint4*>(w + (size_t)co * K + k0 + col) : make_uint4(0, 0, 0, 0);
        }
        // B: channels ci0 + kb + 2r of tap `tap` at pixel p
        const int tap = kt % 9, ci0 = (kt / 9) * BK;
        const int sy = py + tap / 3 - 1, sx = px + tap % 3 - 1;
        const bool valid = sy >= 0 && sy < L.height && sx >= 0 && sx < L.width;
        const int src = L.upsample ? (sy >> 1) * L.in_width + (sx >> 1) : sy * L.width + sx;
        const unsigned short* col = reinterpret_cast<const unsigned short*>(inb) + (size_t)(ci0 + kb) * in_pixels + src;
#pragma unroll
        for (int r = 0; r < B_PER_THREAD; ++r) b_reg[r] = valid ? col[(size_t)(2 * r) * in_pixels] : (unsigned short)0;
    };
    auto store_shared = [&](int buf) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int chunk = threadIdx.x + r * THREADS;
            *reinterpret_cast<uint4*>(&As[buf][chunk / 4][(chunk % 4) * 8]) = a_reg[r];
        }
#pragma unroll
        for (int r = 0; r < B_PER_THREAD; ++r) reinterpret_cast<unsigned short*>(&Bs[buf][kb + 2 * r][0])[bp] = b_reg[r];
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    // load the first tile
    load_global(0);
    store_shared(0);
    __syncthreads();

    for (int kt = 0; kt < k_tiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < k_tiles) load_global(kt + 1);
        // compute: two 16-deep steps of the 32-deep tile
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
            for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &As[buf][wm + 16 * i][ks], A_LD);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[buf][ks][wn + 16 * j], B_LD);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (kt + 1 < k_tiles) store_shared(buf ^ 1);
        __syncthreads();
    }

    // store: each fragment through the warp's staging tile; lane takes elements lane + 32·r
    // (row = output channel e / 16, pixel e % 16: half-warps write 16 consecutive pixels)
    T* outb = out + (size_t)b * L.c_out * pixels;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(&Cs[warp][0][0], acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const int e = lane + 32 * r, row = e / 16, colp = e % 16;
                const int co = co0 + wm + 16 * i + row, pp = p0 + wn + 16 * j + colp;
                if (co < L.c_out && pp < pixels) {
                    float v = Cs[warp][row][colp] + (bias ? bias[co] : 0.f);
                    if (L.silu) v = silu(v);
                    if (L.shortcut_repeats) {
                        const int y = pp / L.width, x = pp % L.width;
                        const int c = (4 * co + 2 * (y & 1) + (x & 1)) / L.shortcut_repeats;
                        v += ops::to_f32(inb[(size_t)c * in_pixels + (y >> 1) * L.in_width + (x >> 1)]);
                    }
                    outb[(size_t)co * pixels + pp] = from_f32<T>(v);
                }
            }
            __syncwarp();
        }
}

}  // namespace conv_igemm

#define CONV_IGEMM_KERNEL(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(conv_igemm::THREADS, 2)                                     \
        NAME(const T* in, const T* w, const float* bias, T* out, conv_igemm::Layout L) {                    \
        conv_igemm::conv3x3<T>(in, w, bias, out, L);                                                        \
    }

CONV_IGEMM_KERNEL(conv3x3_igemm_bf16, __nv_bfloat16)
CONV_IGEMM_KERNEL(conv3x3_igemm_f16, __half)
