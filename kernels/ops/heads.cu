// Moves rows of a head's `D` features between the token-major layout of projections (B, N, H, D)
// and the head-major layout of the attention kernels (B, H, N, D), in one memory-bound pass.
//
//   out[r, :] = in[i0·s0 + i1·s1 + i2·s2 + i3·s3 + (0..D)],   r = ((i0·d1 + i1)·d2 + i2)·d3 + i3
//
// Rows are copied as 8-byte words (the caller checks that D and every stride are multiples of
// 8 bytes); `out` is contiguous. Splitting q, k, v from a fused (B, N, 3, H, D) projection is
// (d0..d3) = (3, B, H, N); merging heads back is (1, B, N, H).

#include <cstdint>

namespace heads {

constexpr int THREADS = 256;

struct Layout {
    unsigned dims[4];      // the host checks that rows · row_words < 2^31
    long long strides[4];  // in 8-byte words
    unsigned row_words;
};

__device__ void gather_rows(const uint2* __restrict__ in, uint2* __restrict__ out, Layout L) {
    const unsigned total = L.dims[0] * L.dims[1] * L.dims[2] * L.dims[3] * L.row_words;
    for (unsigned i = blockIdx.x * THREADS + threadIdx.x; i < total; i += gridDim.x * THREADS) {
        unsigned r = i / L.row_words;
        long long offset = i - r * L.row_words;
#pragma unroll
        for (int k = 3; k >= 0; --k) {
            const unsigned idx = r % L.dims[k];
            r /= L.dims[k];
            offset += idx * L.strides[k];
        }
        out[i] = in[offset];
    }
}

}  // namespace heads

extern "C" __global__ void __launch_bounds__(heads::THREADS) gather_rows_u64(const uint2* in, uint2* out, heads::Layout L) {
    heads::gather_rows(in, out, L);
}
