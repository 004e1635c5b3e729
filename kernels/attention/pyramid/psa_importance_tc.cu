// PSA block importance and its ranking on wgmma + TMA (v3; psa_importance.cu is v2, the same
// math on mma.sync). The oracle: importance_with_samples in src/attention/pyramid.rs:
//   R[r, j] = max over block j's sampled keys c of (scale q_r . k_c)
//   S[i, j] = max over query block i's sampled rows r of exp(R[r, j] - max_j' R[r, j'])
//   imp[i, j] = S[i, j] / sum_j' S[i, j']
//   ranked[i, :] = the KV blocks by imp, descending, ties by index (rank_descending).
//
// Entry points:
//   psa_gather_samples_16bit: grid (ceil(rows * D/8 / 256), B*H), 256 threads; PsaGatherArgs.
//     The sampled queries (query block i, sample s -> row 32 i + s) and keys (KV block j,
//     sample c -> row 16 j + c) of each head into two contiguous (B*H, rows, D) buffers, so that
//     the main kernel reads them with TMA boxes. Positions clamp to the last token.
//   psa_importance_tc_{bf16,f16}_d{64,72,96,112,128}: grid (ceil(q_blocks / 8), B*H), 640
//     threads, dynamic shared memory psa_imp_tc::Layout<D>::kSmemBytes; PsaImpTcArgs.
//
// Main kernel CTA: 256 sampled query rows (8 query blocks) against every sampled key of the
// head; 4x more rows per CTA than v2, so each key byte brought from L2 serves 4x more rows.
// Warpgroup 0 is the producer (one thread: TMA boxes of 128 sampled keys = 8 KV blocks into a
// 4-stage mbarrier ring); warpgroups 1..4 each own 64 query rows (2 query blocks) and compute
// S = Q Kᵀ with wgmma m64n128k16 (both operands in shared memory, as dense_fwd_wgmma.cuh).
// The block maxima are taken in registers (a KV block = 2 n8 accumulator chunks: 4 values per
// row per thread, then a butterfly over the lane quad), scaled, folded into each row's running
// maximum and stored to an f32 scratch R (global; 256 rows x k_blocks per CTA does not fit in
// shared memory). Epilogue (the 512 consumer threads): S, the sum and the normalization per
// query block from R (read back from L2 / HBM by the CTA that wrote it), the importance
// written once, then a bitonic sort in shared memory of (importance, index) keys gives the
// ranking: no arg_sort pass.
#include "../dense/dense_fwd_wgmma.cuh"

struct PsaGatherArgs {
    const void* q;           // (B, H, N, D) at q_stride (elements), unit stride in D
    const void* k;
    void* qs;                // (B*H, q_blocks * 32, D) contiguous
    void* ks;                // (B*H, k_blocks * 16, D) contiguous
    const int32_t* q_pos;    // (B*H, 32) sampled offsets in a query block
    const int32_t* k_pos;    // (B*H, 16) sampled offsets in a KV block
    int64_t q_stride[3];
    int64_t k_stride[3];
    int32_t heads, n, q_blocks, k_blocks, chunks, unused;
};
static_assert(sizeof(PsaGatherArgs) == 120, "PsaGatherArgs layout changed: update src/attention/cuda/pyramid.rs");

struct PsaImpTcArgs {
    CUtensorMap qs;          // (D, q_blocks * 32, H, B), box (64, 128)
    CUtensorMap ks;          // (D, k_blocks * 16, H, B), box (64, 128)
    float* r;                // scratch (B*H, r_rows, k_blocks), r_rows = grid.x * 256
    float* imp;              // (B*H, q_blocks, k_blocks)
    uint32_t* ranked;        // (B*H, q_blocks, k_blocks)
    int32_t heads, q_blocks, k_blocks, sort_len;  // sort_len: k_blocks rounded up to a power of 2
    float scale;
    int32_t block_sort;  // 1: the block-wide bitonic_sort for every length (v3; comparison)
    int32_t unused[20];  // to the 128-byte alignment of CUtensorMap
};
static_assert(sizeof(PsaImpTcArgs) == 384 && offsetof(PsaImpTcArgs, r) == 256,
              "PsaImpTcArgs layout changed: update src/attention/cuda/pyramid.rs");

extern "C" __global__ void __launch_bounds__(256) psa_gather_samples_16bit(const __grid_constant__ PsaGatherArgs a) {
    const int bh = blockIdx.y;
    const int b = bh / a.heads, h = bh % a.heads;
    const int64_t e = (int64_t)blockIdx.x * 256 + threadIdx.x;
    const int64_t q_rows = (int64_t)a.q_blocks * 32, k_rows = (int64_t)a.k_blocks * 16;
    const int64_t row = e / a.chunks;
    const int c = (int)(e % a.chunks);
    if (row >= q_rows + k_rows) return;
    const uint16_t* src;
    uint16_t* dst;
    if (row < q_rows) {
        const int i = (int)(row / 32), s = (int)(row % 32);
        const int tok = min(i * 128 + a.q_pos[bh * 32 + s], a.n - 1);
        src = static_cast<const uint16_t*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + tok * a.q_stride[2];
        dst = static_cast<uint16_t*>(a.qs) + (bh * q_rows + row) * (a.chunks * 8);
    } else {
        const int64_t rk = row - q_rows;
        const int j = (int)(rk / 16), s = (int)(rk % 16);
        const int tok = min(j * 64 + a.k_pos[bh * 16 + s], a.n - 1);
        src = static_cast<const uint16_t*>(a.k) + b * a.k_stride[0] + h * a.k_stride[1] + tok * a.k_stride[2];
        dst = static_cast<uint16_t*>(a.ks) + (bh * k_rows + rk) * (a.chunks * 8);
    }
    reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(src)[c];
}

namespace psa_imp_tc {

using namespace dense_wgmma;

constexpr int kConsumers = 4;
constexpr int kRows = 64 * kConsumers;        // sampled query rows per CTA
constexpr int kQBlocks = kRows / 32;          // query blocks per CTA
constexpr int kThreads = 128 * (kConsumers + 1);
constexpr int kConsumerThreads = 128 * kConsumers;
constexpr int kBN = 128;                      // sampled keys per tile = 8 KV blocks of 16
constexpr int kStages = 4;

template <int D>
struct Layout {
    static constexpr int kDPad = D <= 64 ? 64 : 128;
    static constexpr int kColBlocks = kDPad / 64;
    static constexpr int kQBytes = kRows * kDPad * 2;
    static constexpr int kKBytes = kBN * kDPad * 2;
    static constexpr int kMainBytes = kQBytes + kStages * kKBytes;  // reused by the sort
    // barriers (q_full, k_full[4], empty[4]: 72 B, padded to 128), row maxima, partial sums
    static constexpr int kExtraBytes = 128 + kRows * 4 + kQBlocks * 16 * 4;
    static constexpr int kSmemBytes = kMainBytes + kExtraBytes + 1024;
};

__device__ __forceinline__ void consumer_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"r"(kConsumerThreads) : "memory");
}

// a precedes b in the ranking: larger key first (importance bits << 32 | ~index).
__device__ __forceinline__ void bitonic_sort(uint64_t* keys, int segments, int len, int ctid) {
    const int pairs = segments * (len / 2);
    for (int k = 2; k <= len; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int p = ctid; p < pairs; p += kConsumerThreads) {
                const int seg = p / (len / 2), pp = p % (len / 2);
                const int e = 2 * j * (pp / j) + pp % j;  // lower element of the pair; e ^ j = e + j
                uint64_t* base = keys + (int64_t)seg * len;
                const uint64_t x = base[e], y = base[e + j];
                // within blocks of k: descending where (e & k) == 0, else ascending
                const bool desc = (e & k) == 0;
                if (desc ? x < y : x > y) {
                    base[e] = y;
                    base[e + j] = x;
                }
            }
            consumer_sync();
        }
    }
}

// One warp sorts one segment of 32 KPL keys in registers, the same network as bitonic_sort
// (descending, the pair's lower element e takes the larger key where (e & k) == 0): key
// e = 32 i + lane sits in x[i] of lane `lane`, so strides j < 32 are shuffles and j >= 32 are
// register pairs. No shared-memory round trip and no block barrier per stage (bitonic_sort:
// 45 barriers for 512 keys, with 1 CTA per SM nothing else runs meanwhile).
// The stages are a runtime loop (only the KPL keys of a stage are unrolled): fully unrolled,
// the 45 stages of 512 keys were ~7,000 straight-line instructions per warp, fetched once and
// never again from the instruction cache (ncu: 13% of samples at the barrier after the sort,
// 18% no_inst), while the loop body is ~300.
template <int KPL, int JJ>
__device__ __forceinline__ void register_stage(uint64_t (&x)[KPL], int k) {
    // pairs (i, i + JJ) with (i & JJ) == 0; k >= 64 > lane: (32 i + lane) & k == 32 (i & (k / 32))
    if constexpr (JJ < KPL) {
#pragma unroll
        for (int i = 0; i < KPL; ++i) {
            if ((i & JJ) == 0) {
                const bool desc = (i & (k >> 5)) == 0;
                const uint64_t lo = x[i], hi = x[i + JJ];
                const bool swap = desc ? lo < hi : lo > hi;
                x[i] = swap ? hi : lo;
                x[i + JJ] = swap ? lo : hi;
            }
        }
    }
}

template <int KPL>
__device__ __forceinline__ void warp_bitonic_sort(uint64_t* seg, int lane) {
    static_assert(KPL >= 1 && KPL <= 16 && (KPL & (KPL - 1)) == 0, "KPL must be a power of two <= 16");
    uint64_t x[KPL];
#pragma unroll
    for (int i = 0; i < KPL; ++i) x[i] = seg[32 * i + lane];
#pragma unroll 1
    for (int k = 2; k <= 32 * KPL; k <<= 1) {
#pragma unroll 1
        for (int j = k >> 1; j > 0; j >>= 1) {
            if (j >= 32) {
                switch (j >> 5) {
                    case 1: register_stage<KPL, 1>(x, k); break;
                    case 2: register_stage<KPL, 2>(x, k); break;
                    case 4: register_stage<KPL, 4>(x, k); break;
                    default: register_stage<KPL, 8>(x, k); break;
                }
            } else {
                const bool lower = (lane & j) == 0;
#pragma unroll
                for (int i = 0; i < KPL; ++i) {
                    const uint64_t y = __shfl_xor_sync(0xffffffffu, x[i], j);
                    const bool desc = ((32 * i + lane) & k) == 0;
                    // keys are distinct (index in the low word): keep x where it is the wanted one
                    x[i] = ((x[i] > y) == (lower == desc)) ? x[i] : y;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < KPL; ++i) seg[32 * i + lane] = x[i];
}

// Segments of len = 32 KPL keys (32 to 512), one warp per segment; false where len is not
// served (then the block-wide bitonic_sort runs).
__device__ __forceinline__ bool warp_sort_segments(uint64_t* keys, int segments, int len, int ctid) {
    const int w = ctid / 32, lane = ctid % 32;
    // len 1024 (32 keys per lane) would spill: the consumers compile to 96 registers.
    if (len < 32 || len > 512 || segments > kConsumerThreads / 32) return false;
    if (w < segments) {
        uint64_t* seg = keys + (int64_t)w * len;
        switch (len) {
            case 32: warp_bitonic_sort<1>(seg, lane); break;
            case 64: warp_bitonic_sort<2>(seg, lane); break;
            case 128: warp_bitonic_sort<4>(seg, lane); break;
            case 256: warp_bitonic_sort<8>(seg, lane); break;
            default: warp_bitonic_sort<16>(seg, lane); break;
        }
    }
    consumer_sync();
    return true;
}

template <int D, typename T>
__device__ __forceinline__ void importance(const PsaImpTcArgs& a) {
    using L = Layout<D>;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    uint8_t* sQ = smem;
    uint8_t* sK = sQ + L::kQBytes;  // stage s at sK + s * kKBytes
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::kMainBytes);
    uint64_t* q_full = bars;
    uint64_t* k_full = bars + 1;             // [kStages]
    uint64_t* empty = bars + 1 + kStages;    // [kStages]
    float* s_m = reinterpret_cast<float*>(smem + L::kMainBytes + 128);  // row maxima [kRows]
    float* s_part = s_m + kRows;                                        // [kQBlocks][16] warp sums

    const int tid = threadIdx.x, wg = tid / 128;
    const int bh = blockIdx.y;
    const int b = bh / a.heads, h = bh % a.heads;
    const int kb = a.k_blocks;
    const int row0 = blockIdx.x * kRows;  // first sampled query row of the CTA
    const int n_tiles = (kb * 16 + kBN - 1) / kBN;

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&k_full[s], 1);
            mbar_init(&empty[s], kConsumerThreads);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // ---------------- producer ----------------
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (tid == 0) {
            mbar_expect_tx(q_full, L::kQBytes);
            for (int c = 0; c < L::kColBlocks; ++c)
                for (int r = 0; r < kRows / 128; ++r)
                    tma_load(sQ + (c * kRows + r * 128) * 128, &a.qs, q_full, c * 64, row0 + r * 128, h, b);
            for (int j = 0; j < n_tiles; ++j) {
                const int s = j % kStages;
                if (j >= kStages) mbar_wait(&empty[s], (j / kStages - 1) & 1);
                mbar_expect_tx(&k_full[s], L::kKBytes);
                for (int c = 0; c < L::kColBlocks; ++c)
                    tma_load(sK + s * L::kKBytes + c * kBN * 128, &a.ks, &k_full[s], c * 64, j * kBN, h, b);
            }
        }
        return;  // the producer takes no part in the epilogue (consumer_sync counts 512 threads)
    }

    // ---------------- consumers ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 112;\n");
    const int ctid = tid - 128, cw = ctid / 128;
    const int warp = (ctid % 128) / 32, lane = ctid % 32;
    const uint32_t q_addr = smem_addr(sQ) + cw * 64 * 128;
    const float scale = a.scale;
    // this thread's two rows (accumulator layout m64nN: row 16 warp + lane / 4, + 8)
    const int my_row = cw * 64 + warp * 16 + lane / 4;
    float* r_out = a.r + ((int64_t)bh * gridDim.x * kRows + row0 + my_row) * kb;
    float run_max[2] = {-INFINITY, -INFINITY};

    mbar_wait(q_full, 0);
    for (int j = 0; j < n_tiles; ++j) {
        const int s = j % kStages;
        mbar_wait(&k_full[s], (j / kStages) & 1);
        float acc[kBN / 2];
        const uint64_t desc_q = make_desc(q_addr, 16, 1024), desc_k = make_desc(smem_addr(sK + s * L::kKBytes), 16, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < (D + 15) / 16; ++kk) {
            const uint32_t col = kk / 4, off = (kk % 4) * 32;
            Wgmma<T, kBN>::ss(acc, desc_at(desc_q, col * kRows * 128 + off), desc_at(desc_k, col * kBN * 128 + off), kk > 0);
        }
        wgmma_commit();
        wgmma_wait0();
        mbar_arrive(&empty[s]);  // the GEMM has read the stage

        // v[2t + half]: this thread's max over KV block t's columns for row half (scaled first,
        // as the oracle: exact for any sign of the scale).
        float v[16];
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
                v[2 * t + hf] = fmaxf(fmaxf(acc[8 * t + 2 * hf] * scale, acc[8 * t + 2 * hf + 1] * scale),
                                      fmaxf(acc[8 * t + 4 + 2 * hf] * scale, acc[8 * t + 4 + 2 * hf + 1] * scale));
        // Butterfly over the quad: after it, lane l holds blocks l % 4 and l % 4 + 4 (w[0..1],
        // w[2..3] by half).
        const bool b0 = lane & 1, b1 = lane & 2;
        float u[8];  // u[2m + hf]: blocks t = 2m + b0
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const float lo = v[2 * (2 * m) + hf], hi = v[2 * (2 * m + 1) + hf];
                const float mine = b0 ? hi : lo, other = b0 ? lo : hi;
                u[2 * m + hf] = fmaxf(mine, __shfl_xor_sync(0xffffffffu, other, 1));
            }
        float w[4];  // w[2p + hf]: block t = 4p + 2 b1 + b0 = 4p + lane % 4
#pragma unroll
        for (int p = 0; p < 2; ++p)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const float lo = u[2 * (2 * p) + hf], hi = u[2 * (2 * p + 1) + hf];
                const float mine = b1 ? hi : lo, other = b1 ? lo : hi;
                w[2 * p + hf] = fmaxf(mine, __shfl_xor_sync(0xffffffffu, other, 2));
            }
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const int blk = j * 8 + 4 * p + lane % 4;
            if (blk < kb) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    run_max[hf] = fmaxf(run_max[hf], w[2 * p + hf]);
                    r_out[(int64_t)hf * 8 * kb + blk] = w[2 * p + hf];
                }
            }
        }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float m = run_max[hf];
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        if (lane % 4 == 0) s_m[my_row + 8 * hf] = m;
    }
    __threadfence_block();  // R (global) and s_m are read by other consumer threads
    consumer_sync();        // ... and every warpgroup is done with sQ / sK: the sort reuses them

    // ---- S, sums, normalization, keys ----
    const int len = a.sort_len;
    uint64_t* keys = reinterpret_cast<uint64_t*>(smem);  // [kQBlocks][len]
    const int qb0 = blockIdx.x * kQBlocks;
    const int cta_qblocks = min(kQBlocks, a.q_blocks - qb0);
    const float* r_cta = a.r + ((int64_t)bh * gridDim.x * kRows + row0) * kb;
    const int cwarp = ctid / 32;
    for (int qi = 0; qi < cta_qblocks; ++qi) {
        float part = 0.f;
        for (int j = ctid; j < kb; j += kConsumerThreads) {
            // R was written long ago (mostly evicted to HBM): all 32 loads in flight at once.
            const float* col = r_cta + (int64_t)qi * 32 * kb + j;
            float x[32];
#pragma unroll
            for (int r = 0; r < 32; ++r) x[r] = col[(int64_t)r * kb];
            float s = 0.f;  // every exp is > 0 (the row max is finite)
#pragma unroll
            for (int r = 0; r < 32; ++r) s = fmaxf(s, expf(x[r] - s_m[qi * 32 + r]));
            part += s;
            keys[qi * len + j] = __float_as_uint(s);  // S, normalized below
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        if (lane == 0) s_part[qi * 16 + cwarp] = part;
    }
    consumer_sync();
    for (int e = ctid; e < cta_qblocks * len; e += kConsumerThreads) {
        const int qi = e / len, j = e % len;
        uint64_t key = 0;  // padding: after every real block (value 0, ~index smaller)
        if (j < kb) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < 16; ++w) total += s_part[qi * 16 + w];
            const float imp = __uint_as_float((uint32_t)keys[e]) / total;
            a.imp[((int64_t)bh * a.q_blocks + qb0 + qi) * kb + j] = imp;
            key = (uint64_t)__float_as_uint(imp) << 32;  // imp >= +0: bit order = value order
        }
        keys[e] = key | (uint32_t)~(uint32_t)j;
    }
    consumer_sync();
    if (a.block_sort || !warp_sort_segments(keys, cta_qblocks, len, ctid)) bitonic_sort(keys, cta_qblocks, len, ctid);
    for (int e = ctid; e < cta_qblocks * len; e += kConsumerThreads) {
        const int qi = e / len, rank = e % len;
        if (rank < kb) a.ranked[((int64_t)bh * a.q_blocks + qb0 + qi) * kb + rank] = ~(uint32_t)keys[e];
    }
}

}  // namespace psa_imp_tc

#define PSA_IMP_TC_ENTRY(NAME, T, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(psa_imp_tc::kThreads, 1) NAME(const __grid_constant__ PsaImpTcArgs args) { \
        psa_imp_tc::importance<D, T>(args);                                                                  \
    }

PSA_IMP_TC_ENTRY(psa_importance_tc_bf16_d64, __nv_bfloat16, 64)
PSA_IMP_TC_ENTRY(psa_importance_tc_bf16_d72, __nv_bfloat16, 72)
PSA_IMP_TC_ENTRY(psa_importance_tc_bf16_d96, __nv_bfloat16, 96)
PSA_IMP_TC_ENTRY(psa_importance_tc_bf16_d112, __nv_bfloat16, 112)
PSA_IMP_TC_ENTRY(psa_importance_tc_bf16_d128, __nv_bfloat16, 128)
PSA_IMP_TC_ENTRY(psa_importance_tc_f16_d64, __half, 64)
PSA_IMP_TC_ENTRY(psa_importance_tc_f16_d72, __half, 72)
PSA_IMP_TC_ENTRY(psa_importance_tc_f16_d96, __half, 96)
PSA_IMP_TC_ENTRY(psa_importance_tc_f16_d112, __half, 112)
PSA_IMP_TC_ENTRY(psa_importance_tc_f16_d128, __half, 128)
