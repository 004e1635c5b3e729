// Dense attention forward for Hopper (sm_90a): the same math as dense_fwd.cuh, with the two GEMMs
// on warpgroup MMA (wgmma) and the K/V tiles brought in by the tensor memory accelerator (TMA).
// Head dims: multiples of 8 from 64 to 128 (rows padded to one or two 128-byte swizzle atoms).
//
//   S = Q Kᵀ    wgmma m64n128k16, Q and K both read from shared memory (K-major)
//   P = online softmax of S, in registers (same recurrence as dense_fwd.cuh)
//   O += P V    wgmma m64nDk16 (D rounded up to 64 or 128), P from registers (the S accumulator layout is the A-register layout
//               after a bf16/f16 pack), V from shared memory (MN-major: "transposed" B)
//
// CTA (FlashAttention-3's structure): warpgroup 0 is the producer, one thread of it issues TMA copies
// of K and V tiles (128 keys) into a 3-stage ring; warpgroups 1..C are consumers of 64 query rows
// each (C = 3 for D = 64, else 2). Stages are handed over with mbarriers (full: the copy landed; empty: both consumers are done
// with it), so the consumers never wait on each other and drift apart, which lets one warpgroup's
// softmax run while the other's GEMMs occupy the tensor cores. Inside a consumer, the softmax of
// tile j+1 runs while P_j V_j is on the tensor cores. TMA writes the canonical 128B-swizzle layout
// that wgmma descriptors address: rows of 64 elements (128 B), 16-byte chunk c of row r at chunk
// (c ^ r % 8), atoms of 8 rows = 1024 B, one "column block" per 64 elements of D; rows past the
// end of a sequence are zero-filled by the TMA unit.
#pragma once

#include <cuda.h>  // CUtensorMap

#include "dense_fwd.cuh"

// Kernel arguments of the TMA kernel, mirrored by `DenseTmaArgs` in src/attention/cuda/dense.rs.
// Tensor maps (built on the host with cuTensorMapEncodeTiled): 4-D (D, N, H, B), 16-bit elements,
// box (64, 128, 1, 1), 128-byte swizzle, out-of-bounds rows read as zero.
struct DenseTmaArgs {
    CUtensorMap q, k, v, k2, v2;  // k2, v2: unused when n_extra = 0
    DenseFwdArgs base;            // pointers unused except key_mask, o, lse; strides of o, lse, mask
};
// The Rust mirror asserts the same layout.
static_assert(sizeof(DenseTmaArgs) == 896 && offsetof(DenseTmaArgs, base) == 640,
              "DenseTmaArgs layout changed: update src/attention/cuda/dense.rs");

namespace dense_wgmma {

using dense::fast_exp2;
using dense::pack2;
using dense::smem_addr;

// Consumer warpgroups per CTA: 3 for D = 64, whose GEMMs are short next to the softmax (a third
// warpgroup keeps the tensor cores busy while two are in their softmax), else 2 (register-bound).
constexpr int default_consumers(int d) { return d <= 64 ? 3 : 2; }

template <int D, int C = default_consumers(D)>
struct Tile {
    static_assert(D % 8 == 0 && D >= 64 && D <= 128, "wgmma path: head_dim a multiple of 8 in [64, 128]");
    static constexpr int kD = D;
    // Rows are padded to whole 128-byte atoms: columns D..kDPad-1 are zero (the TMA unit fills
    // what lies past the tensor's last column), so Q Kᵀ stops at the k16 step that covers D while
    // P V runs over kDPad.
    static constexpr int kDPad = D <= 64 ? 64 : 128;
    static constexpr int kConsumers = C;
    static constexpr int kBlockM = 64 * C;  // query rows: 64 per consumer warpgroup
    static constexpr int kQRows = (kBlockM + 127) / 128 * 128;  // Q arrives in 128-row TMA boxes
    static constexpr int kBlockN = 128;
    static constexpr int kThreads = 128 * (C + 1);  // producer + consumers
    // setmaxnreg budgets: 128 * (24 + C * kConsumerRegs) <= 65536 registers.
    static constexpr int kConsumerRegs = C == 2 ? 240 : 160;
    static constexpr int kColBlocks = kDPad / 64;  // 128-byte swizzle atoms across a row
    static constexpr int kStages = 3;
    static constexpr int kQBytes = kQRows * kDPad * 2;
    static constexpr int kKVBytes = kBlockN * kDPad * 2;
    static constexpr int kBarrierBytes = 64;  // q_full, k_full[3], v_full[3], empty[3]: 10 x 8 B
    // Q, K[3], V[3], barriers, plus 1 KB to align the base to the 1024-byte swizzle atom.
    static constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + 128 + 1024;
};

template <int D, typename T, int C = default_consumers(D)>
constexpr int smem_bytes() { return Tile<D, C>::kSmemBytes; }

// wgmma shared-memory matrix descriptor, 128-byte swizzle. Offsets in bytes.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lead_bytes >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((stride_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
// Lazy rescaling of O (base-2 units), GNA and PSA: the running row max of the online softmax is
// raised only when a tile's max exceeds it by more than this, so P <= 2^kRescaleSlack
// (FlashAttention-4); O's rescale is then mostly skipped. (The dense kernel keeps the eager
// rescale: lazy measured 5% slower there, kernels/NOTES.md ## neighborhood, session 9.)
constexpr float kRescaleSlack = 8.f;

// The lazy max of one row: raises `row_max` (base 2) to this tile's `m_tile` only when it exceeds
// it by more than kRescaleSlack; sets `alpha`, the factor O and the row sum are to be scaled by
// (1 when the max stays), and returns the shift of the exponents (0 while the row saw only -inf).
__device__ __forceinline__ float lazy_row_max(float& row_max, float m_tile, float& alpha) {
    const bool grow = m_tile > row_max + kRescaleSlack;  // -inf + slack = -inf
    alpha = grow ? fast_exp2(row_max - m_tile) : 1.f;
    if (grow) row_max = m_tile;
    return row_max == -INFINITY ? 0.f : row_max;  // all masked so far: avoid inf - inf
}

// O *= alpha (per row half) unless every row of the warp kept its max (alpha = 1 throughout):
// the lazy rescale, applied just before the next P V is issued (FlashAttention-3's order).
template <int N>
__device__ __forceinline__ void rescale_lazy(float (&o)[N], const float (&alpha)[2]) {
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int n = 0; n < N / 4; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[4 * n + i] *= alpha[i / 2];
}

// The descriptor of the operand `offset` bytes further: the start address field (low 14 bits,
// 16-byte units) moves, the rest stays; shared memory ends below 256 KB, so it never carries.
// A k-step's descriptor built this way from one made per operand and call costs ptxas ~6
// instructions per wgmma less than make_desc per k-step (GNA run 39: -1% on every case).
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t offset) {
    return (desc & 0xffffffff00000000ull) | (uint32_t)((uint32_t)desc + (offset >> 4));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }

// Accumulators of the m64nNk16 instructions: N/2 floats per thread.
template <typename T, int N>
struct Wgmma {
    // D (+)= A B, A and B from shared memory, both K-major; scale_d = 0 overwrites D.
    __device__ static void ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d);
    // D += A B, A from registers (4 x 2 halves per thread), B MN-major in shared memory.
    __device__ static void rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b);
};

// Generated by gen_wgmma_ops.py: one asm block per (dtype, N); the register lists are the only content.
#include "wgmma_ops.inc"

// ---- mbarrier and TMA ----
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Blocks until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
    asm volatile(
        "{\n.reg .pred P1;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
// One box (64 columns x 128 rows) of a 4-D tensor map at (col, row, head, batch).
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int col, int row, int h, int b) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(
            smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(h), "r"(b), "r"(smem_addr(bar))
        : "memory");
}

// Named barriers 1 and 2 (0 is __syncthreads): the ping-pong turns of consumer warpgroups 0 and 1
// (FlashAttention-3), 256 threads each (128 wait with sync, the other warpgroup's 128 arrive).
// A warpgroup issues its GEMMs between turn_wait and turn_pass, so the GEMMs of one run while
// the other is in its softmax.
__device__ __forceinline__ void turn_wait(int cw) {
    asm volatile("bar.sync %0, 256;\n" ::"r"(1 + cw) : "memory");
}
__device__ __forceinline__ void turn_pass(int cw) {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + (cw ^ 1)) : "memory");
}

// One consumer warpgroup: 64 query rows (`cw` selects which) against every key tile.
template <int D, typename T, int C>
__device__ __forceinline__ void consume(const DenseFwdArgs& a, const uint8_t* sQ, const uint8_t* sK, const uint8_t* sV,
                                        uint64_t* q_full, uint64_t* k_full, uint64_t* v_full, uint64_t* empty, int cw,
                                        int warp, int lane, int q_row0, int b, int h, int tiles_main, int n_tiles) {
    using L = Tile<D, C>;
    constexpr int BN = L::kBlockN;
    constexpr int DP = L::kDPad;
    constexpr int kStages = L::kStages;
    const uint32_t q_addr = smem_addr(sQ) + cw * 64 * 128;  // this warpgroup's 64 rows

    // S = Q K_jᵀ, issued asynchronously: D/16 k-steps; a k-step inside a 128-byte atom is a
    // 32-byte start offset.
    const uint64_t desc_q = make_desc(q_addr, 16, 1024);
    auto issue_qk = [&](float (&s)[BN / 2], int j) {
        const uint64_t desc_k = make_desc(smem_addr(sK + (j % kStages) * L::kKVBytes), 16, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < (D + 15) / 16; ++kk) {
            const uint32_t col = kk / 4, off = (kk % 4) * 32;
            Wgmma<T, BN>::ss(s, desc_at(desc_q, col * L::kQRows * 128 + off), desc_at(desc_k, col * BN * 128 + off), kk > 0);
        }
        wgmma_commit();
    };

    // Accumulator layout (per warpgroup, m64nN): thread (warp w, lane l) holds rows
    // 16w + l/4 (+8) and, per n8 chunk j, columns 8j + 2(l%4) + {0,1}: acc[4j + 2*half + c].
    float o[DP / 2];
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    const uint8_t* mask_row = a.key_mask ? a.key_mask + b * a.mask_stride : nullptr;

    // Softmax of S_j in place (S -> P, base-2 exponent with the scale folded in); returns the
    // factor 2^(m_old - m_new) by which O must still be rescaled, per row half.
    auto softmax = [&](float (&s)[BN / 2], int j, float (&alpha)[2]) {
        const bool extra = j >= tiles_main;
        const int first = (extra ? j - tiles_main : j) * BN;
        const int valid = min(BN, (extra ? a.n_extra : a.nk) - first);
        const bool use_mask = !extra && mask_row != nullptr;
        if (use_mask || valid < BN) {  // ragged last tile or key-padding mask: -inf scores
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = n * 8 + (lane % 4) * 2 + c;
                    bool ok = col < valid;
                    if (ok && use_mask) ok = mask_row[first + col] != 0;
                    if (!ok) s[4 * n + c] = s[4 * n + 2 + c] = -INFINITY;
                }
        }
        const float sl2 = a.scale_log2;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(row_max[half], mx * sl2);  // base-2 units
            const float shift = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: avoid inf - inf
            alpha[half] = fast_exp2(row_max[half] - shift);
            row_max[half] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float p = fast_exp2(fmaf(s[4 * n + 2 * half + c], sl2, -shift));
                    s[4 * n + 2 * half + c] = p;
                    sum += p;
                }
            row_sum[half] = row_sum[half] * alpha[half] + sum;
        }
    };
    // P as the A operand of O += P V: the accumulator layout of two adjacent n8 chunks is the
    // register layout of one k16 step.
    uint32_t pa[BN / 16][4];
    auto pack_p = [&](const float (&s)[BN / 2]) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) pa[kk][r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int n = 0; n < DP / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[4 * n + i] *= alpha[i / 2];
    };
    // O += P_j V_j once V_j has landed: BN/16 k-steps of 16 keys; a V k-step is 16 rows of 128 B.
    auto issue_pv = [&](int j) {
        mbar_wait(&v_full[j % kStages], (j / kStages) & 1);
        // MN-major B: leading offset = distance between 64-column blocks of V, stride = 8 rows.
        const uint64_t desc_v = make_desc(smem_addr(sV + (j % kStages) * L::kKVBytes), BN * 128, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, DP>::rs_tb(o, pa[kk], desc_at(desc_v, kk * 16 * 128));
        wgmma_commit();
    };

    mbar_wait(q_full, 0);  // also when there is no key tile: no copy may be in flight at exit
    float s[BN / 2];
    if (n_tiles > 0) {
        mbar_wait(&k_full[0], 0);
        issue_qk(s, 0);
        wgmma_wait0();
        float alpha[2];
        softmax(s, 0, alpha);  // O is still 0: nothing to rescale
        pack_p(s);
    }
    // Tiles 0 .. n-2, software-pipelined: issue S_{j+1} = Q K_{j+1}ᵀ and O += P_j V_j back to back,
    // do the softmax of S_{j+1} while the second GEMM runs, rescale O once it has landed, then
    // hand stage j back to the producer. The same instruction sequence every iteration, so that
    // ptxas can follow the wgmma groups (a runtime branch around a GEMM serializes them all).
    for (int j = 0; j + 1 < n_tiles; ++j) {
        mbar_wait(&k_full[(j + 1) % kStages], ((j + 1) / kStages) & 1);
        issue_qk(s, j + 1);
        issue_pv(j);
        wgmma_wait1();  // S_{j+1} is done; P_j V_j may still run
        float alpha[2];
        softmax(s, j + 1, alpha);
        wgmma_wait0();
        mbar_arrive(&empty[j % kStages]);
        rescale_o(alpha);
        pack_p(s);
    }
    if (n_tiles > 0) {  // last tile: only O += P V
        issue_pv(n_tiles - 1);
        wgmma_wait0();
    }

    // ---- store O / l and lse ----
    T* o_base = static_cast<T*>(a.o) + b * a.o_stride[0] + h * a.o_stride[1];
    float* lse_base = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float l = row_sum[half];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = q_row0 + cw * 64 + warp * 16 + lane / 4 + half * 8;
        if (row < a.nq) {
            T* orow = o_base + (int64_t)row * a.o_stride[2];
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<uint32_t*>(orow + n * 8 + (lane % 4) * 2) =
                    pack2<T>(o[4 * n + 2 * half] * inv, o[4 * n + 2 * half + 1] * inv);
            if (lane % 4 == 0)
                lse_base[row] = l > 0.f ? (row_max[half] + __log2f(l)) * 0.69314718055994531f : -INFINITY;
        }
    }
}

template <int D, typename T, int C = default_consumers(D)>
__device__ __forceinline__ void dense_fwd(const DenseTmaArgs& args) {
    using L = Tile<D, C>;
    constexpr int BN = L::kBlockN;
    constexpr int kStages = L::kStages;
    const DenseFwdArgs& a = args.base;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    uint8_t* sQ = smem;
    uint8_t* sK = sQ + L::kQBytes;  // stage s at sK + s * kKVBytes
    uint8_t* sV = sK + kStages * L::kKVBytes;
    uint64_t* bars = reinterpret_cast<uint64_t*>(sV + kStages * L::kKVBytes);
    uint64_t* q_full = bars;
    uint64_t* k_full = bars + 1;              // [kStages]
    uint64_t* v_full = bars + 1 + kStages;    // [kStages]
    uint64_t* empty = bars + 1 + 2 * kStages; // [kStages], one arrival per consumer thread

    const int tid = threadIdx.x, wg = tid / 128;
    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int q_row0 = m_block * L::kBlockM;

    const int tiles_main = (a.nk + BN - 1) / BN;
    const int tiles_extra = (a.n_extra + BN - 1) / BN;
    const int n_tiles = tiles_main + tiles_extra;

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&k_full[s], 1);
            mbar_init(&v_full[s], 1);
            mbar_init(&empty[s], 128 * C);
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
                for (int r = 0; r < L::kQRows / 128; ++r)
                    tma_load(sQ + (c * L::kQRows + r * 128) * 128, &args.q, q_full, c * 64, q_row0 + r * 128, h, b);
            for (int j = 0; j < n_tiles; ++j) {
                const int s = j % kStages;
                if (j >= kStages) mbar_wait(&empty[s], (j / kStages - 1) & 1);  // tile j-3 released
                const bool extra = j >= tiles_main;
                const int first = (extra ? j - tiles_main : j) * BN;
                const CUtensorMap* km = extra ? &args.k2 : &args.k;
                const CUtensorMap* vm = extra ? &args.v2 : &args.v;
                mbar_expect_tx(&k_full[s], L::kKVBytes);
                for (int c = 0; c < L::kColBlocks; ++c)
                    tma_load(sK + s * L::kKVBytes + c * BN * 128, km, &k_full[s], c * 64, first, h, b);
                mbar_expect_tx(&v_full[s], L::kKVBytes);
                for (int c = 0; c < L::kColBlocks; ++c)
                    tma_load(sV + s * L::kKVBytes + c * BN * 128, vm, &v_full[s], c * 64, first, h, b);
            }
        }
    } else {
        // ---------------- consumers ----------------
        if constexpr (L::kConsumerRegs == 240) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
        else asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n");
        const int cw = wg - 1, ctid = tid - 128;  // consumer warpgroup, thread among the consumers
        const int warp = (ctid % 128) / 32, lane = ctid % 32;
        (void)ctid;
        consume<D, T, C>(a, sQ, sK, sV, q_full, k_full, v_full, empty, cw, warp, lane, q_row0, b, h, tiles_main, n_tiles);
    }
}

}  // namespace dense_wgmma
