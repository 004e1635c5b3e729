// Dense (softmax) attention forward, FlashAttention-2 style, for sm_80+ tensor cores (built for sm_90a).
//
//   O = softmax(Q Kᵀ · scale + mask) V      per (batch, head), online over key tiles
//   LSE = log Σ_k exp(q·k · scale)          per query row, natural log, f32
//
// The score matrix is never stored: each CTA owns 128 query rows, walks the keys 64 at a time and
// keeps a running row max m, row sum l and un-normalized output O in registers (online softmax).
// Keys come from up to two sequences: (k, v) with an optional key-padding mask, then (k2, v2)
// (joint image+text attention) — attended as if concatenated, without a copy.
//
// Work split: 4 warps x 32 query rows (two m16 tiles each); mma.sync m16n8k16 with f32 accumulators;
// operands come from shared memory through ldmatrix; K/V tiles are double-buffered with cp.async.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Kernel arguments, mirrored by `DenseFwdArgs` in src/attention/cuda/dense.rs (#[repr(C)]).
// Strides are in elements; the last dim (head_dim) of every tensor is contiguous.
struct DenseFwdArgs {
    const void* q;        // (B, H, Nq, D)
    const void* k;        // (B, H, Nk, D)
    const void* v;        // (B, H, Nk, D)
    const void* k2;       // (B, H, Ne, D) extra keys, attended after k; unused when n_extra = 0
    const void* v2;       // (B, H, Ne, D)
    const uint8_t* key_mask;  // (B, Nk) over k (not k2), nonzero = attend; null = attend all
    void* o;              // (B, H, Nq, D) output, dtype of q
    float* lse;           // (B, H, Nq) f32 output
    int64_t q_stride[3];  // batch, head, row
    int64_t k_stride[3];
    int64_t v_stride[3];
    int64_t k2_stride[3];
    int64_t v2_stride[3];
    int64_t o_stride[3];
    int64_t lse_stride[2];  // batch, head (rows are contiguous)
    int64_t mask_stride;    // batch
    int32_t nq, nk, n_extra;
    float scale_log2;  // softmax scale * log2(e): scores are kept in base-2 units
};
// The Rust mirror asserts the same size.
static_assert(sizeof(DenseFwdArgs) == 248, "DenseFwdArgs layout changed: update src/attention/cuda/dense.rs");

namespace dense {

// Compile-time tile shape for one head dim. D must be a multiple of 8 (16-byte rows chunks).
template <int D>
struct Tile {
    static_assert(D % 8 == 0 && D <= 128, "head_dim must be a multiple of 8, at most 128");
    static constexpr int kD = D;
    static constexpr int kDPad = (D + 15) / 16 * 16;  // MMA works in k16 steps: D=72 is padded to 80
    static constexpr int kLd = kDPad + 8;  // smem row stride: +16 B puts the 8 rows of an ldmatrix in distinct banks
    static constexpr int kBlockM = 128;   // query rows per CTA
    // Keys per tile: 32 for the large head dims keeps S + O within 255 registers without spills.
    static constexpr int kBlockN = D <= 72 ? 64 : 32;
    static constexpr int kWarps = 4;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kMTiles = 2;     // m16 tiles per warp: 32 rows per warp
    static constexpr int kChunks = kDPad / 8;      // 16-byte chunks per smem row
    static constexpr int kDataChunks = D / 8;      // chunks that hold data; the rest is zero padding
    static constexpr int kNTiles = kBlockN / 8;    // n8 tiles of S per m16 tile
    static constexpr int kDTiles = kDPad / 8;      // n8 tiles of O per m16 tile
    static constexpr int kQElems = kBlockM * kLd;
    static constexpr int kKVElems = kBlockN * kLd;
    // Q, then K[2], then V[2] (double buffered).
    static constexpr int kSmemElems = kQElems + 4 * kKVElems;
};

template <int D, typename T>
constexpr int smem_bytes() { return Tile<D>::kSmemElems * (int)sizeof(T); }

// ---------------------------------------------------------------------------------------------
// PTX helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 writes zeros (rows past the end, D padding).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// C(16x8, f32) += A(16x16, row) B(16x8, col)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values (the lower column in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx(-inf) = +0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---------------------------------------------------------------------------------------------
// Load step: `rows` rows of D elements from global (row stride `stride`) into a smem tile of
// kBlockN or kBlockM rows. Rows >= valid_rows and the D padding are zero-filled, so padded keys
// contribute 0·V and never NaN.
template <int D, int ROWS, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int valid_rows, int tid) {
    using L = Tile<D>;
    constexpr int kTotal = ROWS * L::kChunks;
#pragma unroll
    for (int it = 0; it < (kTotal + L::kThreads - 1) / L::kThreads; ++it) {
        const int c = tid + it * L::kThreads;
        if (kTotal % L::kThreads != 0 && c >= kTotal) break;
        const int row = c / L::kChunks;
        const int ch = c % L::kChunks;
        const bool ok = row < valid_rows && ch < L::kDataChunks;
        const T* src = ok ? gmem + row * stride + ch * 8 : gmem;
        cp_async_16(smem + row * L::kLd + ch * 8, src, ok ? 16 : 0);
    }
}

// Where key tile j comes from: the first sequence (maskable) or the extra one.
template <typename T>
struct KvTile {
    const T* k;
    const T* v;
    int64_t k_stride, v_stride;
    int first_key;   // index of the tile's first key in its sequence
    int valid;       // keys in this tile (<= kBlockN)
    bool extra;      // from (k2, v2)
};

template <int D, typename T>
__device__ __forceinline__ KvTile<T> kv_tile(const DenseFwdArgs& a, int b, int h, int j, int tiles_main) {
    using L = Tile<D>;
    KvTile<T> t;
    t.extra = j >= tiles_main;
    const int jj = t.extra ? j - tiles_main : j;
    t.first_key = jj * L::kBlockN;
    const int n = t.extra ? a.n_extra : a.nk;
    t.valid = min(L::kBlockN, n - t.first_key);
    const int64_t* ks = t.extra ? a.k2_stride : a.k_stride;
    const int64_t* vs = t.extra ? a.v2_stride : a.v_stride;
    const T* kb = static_cast<const T*>(t.extra ? a.k2 : a.k);
    const T* vb = static_cast<const T*>(t.extra ? a.v2 : a.v);
    t.k = kb + b * ks[0] + h * ks[1] + (int64_t)t.first_key * ks[2];
    t.v = vb + b * vs[0] + h * vs[1] + (int64_t)t.first_key * vs[2];
    t.k_stride = ks[2];
    t.v_stride = vs[2];
    return t;
}

// ---------------------------------------------------------------------------------------------
// The kernel. grid = (ceil(Nq / 128), H, B), block = 128 threads, dynamic smem = smem_bytes<D, T>().
template <int D, typename T>
__device__ __forceinline__ void dense_fwd(const DenseFwdArgs& a) {
    using L = Tile<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    // K/V buffer `buf` (0 or 1): K at sK + buf * kKVElems, V at sV + buf * kKVElems.
    T* sK = sQ + L::kQElems;
    T* sV = sK + 2 * L::kKVElems;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int q_row0 = m_block * L::kBlockM;

    const int tiles_main = (a.nk + L::kBlockN - 1) / L::kBlockN;
    const int tiles_extra = (a.n_extra + L::kBlockN - 1) / L::kBlockN;
    const int n_tiles = tiles_main + tiles_extra;

    // Prologue: Q and the first K/V tile in one cp.async group.
    const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + (int64_t)q_row0 * a.q_stride[2];
    load_tile<D, L::kBlockM>(sQ, q, a.q_stride[2], a.nq - q_row0, tid);
    if (n_tiles > 0) {
        KvTile<T> t = kv_tile<D, T>(a, b, h, 0, tiles_main);
        load_tile<D, L::kBlockN>(sK, t.k, t.k_stride, t.valid, tid);
        load_tile<D, L::kBlockN>(sV, t.v, t.v_stride, t.valid, tid);
    }
    cp_async_commit();

    // Per thread: rows r = lane/4 and r+8 of each of its two m16 tiles -> 4 rows, index i*2+half.
    float o[L::kMTiles][L::kDTiles][4];
    float row_max[L::kMTiles * 2], row_sum[L::kMTiles * 2];
#pragma unroll
    for (int i = 0; i < L::kMTiles; ++i) {
#pragma unroll
        for (int d = 0; d < L::kDTiles; ++d)
#pragma unroll
            for (int c = 0; c < 4; ++c) o[i][d][c] = 0.f;
        row_max[i * 2] = row_max[i * 2 + 1] = -INFINITY;
        row_sum[i * 2] = row_sum[i * 2 + 1] = 0.f;
    }

    const uint8_t* mask_row = a.key_mask ? a.key_mask + b * a.mask_stride : nullptr;
    const T* sQw = sQ + (warp * 32) * L::kLd;  // this warp's 32 query rows

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1;
        // Prefetch tile j+1 into the other buffer while computing tile j.
        if (j + 1 < n_tiles) {
            KvTile<T> nt = kv_tile<D, T>(a, b, h, j + 1, tiles_main);
            load_tile<D, L::kBlockN>(sK + (buf ^ 1) * L::kKVElems, nt.k, nt.k_stride, nt.valid, tid);
            load_tile<D, L::kBlockN>(sV + (buf ^ 1) * L::kKVElems, nt.v, nt.v_stride, nt.valid, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();  // everything but the prefetch just issued has landed
        __syncthreads();

        const T* sKb = sK + buf * L::kKVElems;
        const T* sVb = sV + buf * L::kKVElems;

        // ---- S = Q Kᵀ (32 x 64 per warp, f32) ----
        float s[L::kMTiles][L::kNTiles][4];
#pragma unroll
        for (int i = 0; i < L::kMTiles; ++i)
#pragma unroll
            for (int n = 0; n < L::kNTiles; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[i][n][c] = 0.f;

#pragma unroll
        for (int kk = 0; kk < L::kDPad / 16; ++kk) {
            uint32_t qa[L::kMTiles][4];
#pragma unroll
            for (int i = 0; i < L::kMTiles; ++i)
                ldmatrix_x4(qa[i], sQw + (i * 16 + lane % 16) * L::kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
            for (int nn = 0; nn < L::kNTiles / 2; ++nn) {
                // Kᵀ as the col-major B operand: K rows (keys) are its columns. x4 = two n8 tiles.
                uint32_t kb[4];
                ldmatrix_x4(kb, sKb + (nn * 16 + lane % 8 + (lane / 16) * 8) * L::kLd + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
                for (int i = 0; i < L::kMTiles; ++i) {
                    mma_16816<T>(s[i][2 * nn], qa[i], kb[0], kb[1]);
                    mma_16816<T>(s[i][2 * nn + 1], qa[i], kb[2], kb[3]);
                }
            }
        }

        // ---- scale to base 2, mask padded / masked-out keys with -inf ----
        const KvTile<T> t = kv_tile<D, T>(a, b, h, j, tiles_main);
        const bool use_mask = !t.extra && mask_row != nullptr;
        // This thread's 16 key columns: n*8 + (lane%4)*2 + c.
        uint32_t keep = 0;
#pragma unroll
        for (int n = 0; n < L::kNTiles; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = n * 8 + (lane % 4) * 2 + c;
                bool ok = col < t.valid;
                if (ok && use_mask) ok = mask_row[t.first_key + col] != 0;
                keep |= (ok ? 1u : 0u) << (n * 2 + c);
            }
#pragma unroll
        for (int i = 0; i < L::kMTiles; ++i)
#pragma unroll
            for (int n = 0; n < L::kNTiles; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const bool ok = (keep >> (n * 2 + (c & 1))) & 1u;
                    s[i][n][c] = ok ? s[i][n][c] * a.scale_log2 : -INFINITY;
                }

        // ---- online softmax: m' = max(m, rowmax S), P = 2^(S - m'), l' = l 2^(m - m') + rowsum P, O *= 2^(m - m') ----
#pragma unroll
        for (int i = 0; i < L::kMTiles; ++i)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = i * 2 + half;
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < L::kNTiles; ++n) mx = fmaxf(mx, fmaxf(s[i][n][half * 2], s[i][n][half * 2 + 1]));
                // The 4 threads of a quad hold the same row.
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[r], mx);
                // All keys so far masked: shift by 0 so that 2^(-inf - shift) = 0, not NaN.
                const float shift = m_new == -INFINITY ? 0.f : m_new;
                const float alpha = fast_exp2(row_max[r] - shift);
                row_max[r] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < L::kNTiles; ++n)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const float p = fast_exp2(s[i][n][half * 2 + c] - shift);
                        s[i][n][half * 2 + c] = p;
                        sum += p;
                    }
                row_sum[r] = row_sum[r] * alpha + sum;  // per-thread partial; reduced over the quad at the end
#pragma unroll
                for (int d = 0; d < L::kDTiles; ++d) {
                    o[i][d][half * 2] *= alpha;
                    o[i][d][half * 2 + 1] *= alpha;
                }
            }

        // ---- O += P V ----
#pragma unroll
        for (int kk = 0; kk < L::kBlockN / 16; ++kk) {
            // The accumulator layout of two adjacent n8 tiles of S is the A layout of one k16 step.
            uint32_t pa[L::kMTiles][4];
#pragma unroll
            for (int i = 0; i < L::kMTiles; ++i) {
                pa[i][0] = pack2<T>(s[i][2 * kk][0], s[i][2 * kk][1]);
                pa[i][1] = pack2<T>(s[i][2 * kk][2], s[i][2 * kk][3]);
                pa[i][2] = pack2<T>(s[i][2 * kk + 1][0], s[i][2 * kk + 1][1]);
                pa[i][3] = pack2<T>(s[i][2 * kk + 1][2], s[i][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dn = 0; dn < L::kDPad / 16; ++dn) {
                // V (keys x dims, row-major) as the col-major B operand: transposed ldmatrix.
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, sVb + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * L::kLd + dn * 16 + (lane / 16) * 8);
#pragma unroll
                for (int i = 0; i < L::kMTiles; ++i) {
                    mma_16816<T>(o[i][2 * dn], pa[i], vb[0], vb[1]);
                    mma_16816<T>(o[i][2 * dn + 1], pa[i], vb[2], vb[3]);
                }
            }
        }
        __syncthreads();  // buffer `buf` is overwritten by the next iteration's prefetch
    }

    // ---- store: O / l (rows with no attended key: O = 0, lse = -inf) ----
    T* o_base = static_cast<T*>(a.o) + b * a.o_stride[0] + h * a.o_stride[1];
    float* lse_base = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1];
#pragma unroll
    for (int i = 0; i < L::kMTiles; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = i * 2 + half;
            float l = row_sum[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = q_row0 + warp * 32 + i * 16 + lane / 4 + half * 8;
            if (row < a.nq) {
                T* orow = o_base + (int64_t)row * a.o_stride[2];
#pragma unroll
                for (int d = 0; d < L::kD / 8; ++d) {
                    const uint32_t packed = pack2<T>(o[i][d][half * 2] * inv, o[i][d][half * 2 + 1] * inv);
                    *reinterpret_cast<uint32_t*>(orow + d * 8 + (lane % 4) * 2) = packed;
                }
                if (lane % 4 == 0) {
                    // lse = ln(Σ exp(s·scale)) = (m + log2 l) · ln 2, m in base-2 units
                    lse_base[row] = l > 0.f ? (row_max[r] + __log2f(l)) * 0.69314718055994531f : -INFINITY;
                }
            }
        }
}

}  // namespace dense
