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

#include <type_traits>

#include "elem.cuh"

namespace conv_igemm {

using namespace nvcuda;
using ops::from_f32;

constexpr int BN = 128, BK = 32, THREADS = 256;
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
// NHWC = false: `in` is NCHW; a thread gathers one pixel of 16 channel planes per K tile (16-bit
// loads). NHWC = true: `in` is the same image channels-last (B, H, W, C) (transposed by the
// caller); a thread copies two 16-byte runs of 8 channels of one pixel per K tile, and the B tile
// is kept pixel-major in shared memory (a col-major WMMA operand), so loads and stores are 16 B.
template <typename T, bool NHWC, int BM>
__device__ void conv3x3(const T* __restrict__ in, const T* __restrict__ w, const float* __restrict__ bias,
                        T* __restrict__ out, Layout L) {
    constexpr int B_ELEMS = NHWC ? BN * A_LD : BK * B_LD;  // pixel-major rows of BK (+8) or k-major rows of BN (+8)
    __shared__ __align__(128) T As[2][BM][A_LD];
    __shared__ __align__(128) T Bs[2][B_ELEMS];
    __shared__ __align__(128) float Cs[THREADS / 32][16][16];

    const int pixels = L.height * L.width, in_pixels = L.in_height * L.in_width;
    const int p0 = blockIdx.x * BN, co0 = blockIdx.y * BM, b = blockIdx.z;
    const int K = 9 * L.c_in, k_tiles = K / BK;
    const T* inb = in + (size_t)b * L.c_in * in_pixels;

    // NCHW: this thread's B pixel (fixed) and K rows kb + 2r. NHWC: pixels (tid + 256r) / 4, run
    // (tid % 4) of 8 channels. A: two 16-byte chunks of weight rows.
    const int bp = NHWC ? threadIdx.x / 4 : threadIdx.x % BN, kb = NHWC ? (threadIdx.x % 4) * 8 : threadIdx.x / BN;
    int py[2], px[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int p = p0 + bp + r * (THREADS / 4);
        py[r] = p < pixels ? p / L.width : -10;
        px[r] = p < pixels ? p % L.width : -10;
    }

    // Warps: WARPS_M x WARPS_N over the BM x BN tile, each FM x FN fragments of 16x16.
    constexpr int WARPS_M = BM >= 64 ? BM / 64 : 1, WARPS_N = (THREADS / 32) / WARPS_M;
    constexpr int FM = BM / WARPS_M / 16, FN = BN / WARPS_N / 16;
    constexpr int A_CHUNKS = BM * BK / 8, A_REGS = (A_CHUNKS + THREADS - 1) / THREADS;

    uint4 a_reg[A_REGS];
    uint4 bv_reg[2];                                     // NHWC
    unsigned short b_reg[NHWC ? 1 : B_PER_THREAD];        // NCHW: raw 16-bit elements

    auto load_global = [&](int kt) {
        const int k0 = kt * BK;
        // A: rows co0 + r, 32 contiguous k (4 chunks of 8 elements per row)
#pragma unroll
        for (int r = 0; r < A_REGS; ++r) {
            const int chunk = threadIdx.x + r * THREADS;
            const int row = chunk / 4, col = (chunk % 4) * 8;
            const int co = co0 + row;
            a_reg[r] = (chunk < A_CHUNKS && co < L.c_out) ? *reinterpret_cast<const uint4*>(w + (size_t)co * K + k0 + col)
                                                         : make_uint4(0, 0, 0, 0);
        }
        const int tap = kt % 9, ci0 = (kt / 9) * BK;
        const int dy = tap / 3 - 1, dx = tap % 3 - 1;
        if constexpr (NHWC) {
            // B: channels ci0 + kb .. + 8 of tap `tap` at two pixels
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int sy = py[r] + dy, sx = px[r] + dx;
                const bool valid = sy >= 0 && sy < L.height && sx >= 0 && sx < L.width;
                const int src = L.upsample ? (sy >> 1) * L.in_width + (sx >> 1) : sy * L.width + sx;
                bv_reg[r] = valid ? *reinterpret_cast<const uint4*>(inb + (size_t)src * L.c_in + ci0 + kb) : make_uint4(0, 0, 0, 0);
            }
        } else {
            // B: channels ci0 + kb + 2r of tap `tap` at pixel p
            const int sy = py[0] + dy, sx = px[0] + dx;
            const bool valid = sy >= 0 && sy < L.height && sx >= 0 && sx < L.width;
            const int src = L.upsample ? (sy >> 1) * L.in_width + (sx >> 1) : sy * L.width + sx;
            const unsigned short* col = reinterpret_cast<const unsigned short*>(inb) + (size_t)(ci0 + kb) * in_pixels + src;
#pragma unroll
            for (int r = 0; r < B_PER_THREAD; ++r) b_reg[r] = valid ? col[(size_t)(2 * r) * in_pixels] : (unsigned short)0;
        }
    };
    auto store_shared = [&](int buf) {
#pragma unroll
        for (int r = 0; r < A_REGS; ++r) {
            const int chunk = threadIdx.x + r * THREADS;
            if (chunk < A_CHUNKS) *reinterpret_cast<uint4*>(&As[buf][chunk / 4][(chunk % 4) * 8]) = a_reg[r];
        }
        if constexpr (NHWC) {
#pragma unroll
            for (int r = 0; r < 2; ++r) *reinterpret_cast<uint4*>(&Bs[buf][(bp + r * (THREADS / 4)) * A_LD + kb]) = bv_reg[r];
        } else {
#pragma unroll
            for (int r = 0; r < B_PER_THREAD; ++r) reinterpret_cast<unsigned short*>(&Bs[buf][(kb + 2 * r) * B_LD])[bp] = b_reg[r];
        }
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / WARPS_N) * (16 * FM), wn = (warp % WARPS_N) * (16 * FN);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    // load the first tile
    load_global(0);
    store_shared(0);
    __syncthreads();

    using BLayout = typename std::conditional<NHWC, wmma::col_major, wmma::row_major>::type;
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < k_tiles) load_global(kt + 1);
        // compute: two 16-deep steps of the 32-deep tile
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], &As[buf][wm + 16 * i][ks], A_LD);
#pragma unroll
            for (int j = 0; j < FN; ++j) {
                if constexpr (NHWC) wmma::load_matrix_sync(fb[j], &Bs[buf][(wn + 16 * j) * A_LD + ks], A_LD);
                else wmma::load_matrix_sync(fb[j], &Bs[buf][ks * B_LD + wn + 16 * j], B_LD);
            }
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (kt + 1 < k_tiles) store_shared(buf ^ 1);
        __syncthreads();
    }

    // store: each fragment through the warp's staging tile; lane takes elements lane + 32·r
    // (row = output channel e / 16, pixel e % 16: half-warps write 16 consecutive pixels)
    T* outb = out + (size_t)b * L.c_out * pixels;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
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
                        const int sp = (y >> 1) * L.in_width + (x >> 1);
                        v += ops::to_f32(NHWC ? inb[(size_t)sp * L.c_in + c] : inb[(size_t)c * in_pixels + sp]);
                    }
                    outb[(size_t)co * pixels + pp] = from_f32<T>(v);
                }
            }
            __syncwarp();
        }
}

}  // namespace conv_igemm

#define CONV_IGEMM_KERNEL(NAME, T, NHWC, BM)                                                                \
    extern "C" __global__ void __launch_bounds__(conv_igemm::THREADS, 2)                                     \
        NAME(const T* in, const T* w, const float* bias, T* out, conv_igemm::Layout L) {                    \
        conv_igemm::conv3x3<T, NHWC, BM>(in, w, bias, out, L);                                              \
    }

// BM = 128 output channels per block; the _m32 kernels (32 per block) serve C_out <= 32 (DC-AE's
// conv_out has 3), where a 128-row tile would multiply 125 rows of zeros.
CONV_IGEMM_KERNEL(conv3x3_igemm_bf16, __nv_bfloat16, false, 128)
CONV_IGEMM_KERNEL(conv3x3_igemm_f16, __half, false, 128)
CONV_IGEMM_KERNEL(conv3x3_igemm_nhwc_bf16, __nv_bfloat16, true, 128)
CONV_IGEMM_KERNEL(conv3x3_igemm_nhwc_f16, __half, true, 128)
CONV_IGEMM_KERNEL(conv3x3_igemm_m32_bf16, __nv_bfloat16, false, 32)
CONV_IGEMM_KERNEL(conv3x3_igemm_m32_f16, __half, false, 32)
CONV_IGEMM_KERNEL(conv3x3_igemm_nhwc_m32_bf16, __nv_bfloat16, true, 32)
CONV_IGEMM_KERNEL(conv3x3_igemm_nhwc_m32_f16, __half, true, 32)

// NCHW -> NHWC through a 32x32 shared tile (coalesced both ways). grid: (ceil(HW / 32), ceil(C / 32),
// B); block: (32, 8).
template <typename T>
__device__ void nchw_to_nhwc(const T* __restrict__ in, T* __restrict__ out, int channels, int pixels) {
    __shared__ T tile[32][33];
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32, b = blockIdx.z;
    const T* ib = in + (size_t)b * channels * pixels;
    T* ob = out + (size_t)b * channels * pixels;
#pragma unroll
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int c = c0 + i, p = p0 + threadIdx.x;
        if (c < channels && p < pixels) tile[i][threadIdx.x] = ib[(size_t)c * pixels + p];
    }
    __syncthreads();
#pragma unroll
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int p = p0 + i, c = c0 + threadIdx.x;
        if (c < channels && p < pixels) ob[(size_t)p * channels + c] = tile[threadIdx.x][i];
    }
}

#define NCHW_TO_NHWC_KERNEL(NAME, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* in, T* out, int channels, int pixels) { \
        nchw_to_nhwc<T>(in, out, channels, pixels);                                                      \
    }

NCHW_TO_NHWC_KERNEL(nchw_to_nhwc_bf16, __nv_bfloat16)
NCHW_TO_NHWC_KERNEL(nchw_to_nhwc_f16, __half)
