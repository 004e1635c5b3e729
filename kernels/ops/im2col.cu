// im2col for a 3x3 convolution with stride 1 and zero padding 1, NCHW, in the layout that makes the
// convolution one GEMM whose output is already NCHW:
//
//   col[b, c·9 + ky·3 + kx, y·W + x] = in[b, c, y + ky - 1, x + kx - 1]   (0 outside the image)
//   out[b] = W (C_out, C·9) · col[b] (C·9, H·W)
//
// Each thread writes consecutive pixels of one (c, ky, kx) row: coalesced stores, and loads that
// are the same plane shifted by at most one pixel (coalesced, mostly from L2). Pure data movement:
// 9x the input bytes written once; cuBLAS then reads them once (see NOTES.md, ops).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace im2col {

constexpr int THREADS = 256;

struct Layout {
    int batch, channels, height, width;
};

// grid: (ceil(H·W / THREADS), B·C·9); block: THREADS. One row (b, c, ky, kx) per blockIdx.y.
template <typename T>
__device__ void im2col3x3(const T* __restrict__ in, T* __restrict__ col, Layout L) {
    const int pixels = L.height * L.width;
    const int p = blockIdx.x * THREADS + threadIdx.x;
    if (p >= pixels) return;
    const int row = blockIdx.y;  // (b·C + c)·9 + tap
    const int tap = row % 9, plane = row / 9;
    const int py = p / L.width;
    const int y = py + tap / 3 - 1, x = p - py * L.width + tap % 3 - 1;
    T v = T(0.f);
    if (y >= 0 && y < L.height && x >= 0 && x < L.width) v = in[(size_t)plane * pixels + y * L.width + x];
    col[(size_t)row * pixels + p] = v;
}

}  // namespace im2col

#define IM2COL_KERNEL(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(im2col::THREADS) NAME(const T* in, T* col, im2col::Layout L) { \
        im2col::im2col3x3<T>(in, col, L);                                                        \
    }

IM2COL_KERNEL(im2col3x3_bf16, __nv_bfloat16)
IM2COL_KERNEL(im2col3x3_f16, __half)
