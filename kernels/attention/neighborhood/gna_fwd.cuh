// Generalized neighborhood attention (GNA) forward for Hopper: the dense wgmma + TMA main loop
// (attention/dense/dense_fwd_wgmma.cuh) driven by a per-query-tile list of KV tiles.
//
// Layout (built on the host, src/attention/neighborhood/tiles.rs): tokens are permuted so that
// every run of 128 tokens is a box t0 x t1 x t2 of the grid inside one dilation group (NATTEN's
// token permutation), so a query tile's windows cover few KV tiles. k, v arrive permuted and
// zero-padded (gna_permute); q too, or (dilation 1, the default) q is read in place, one 5-D TMA
// box per tile (read once per CTA, so the box's short rows cost nothing); the output is
// scattered back to the original token order in the epilogue (no second pass). The two consumer
// warpgroups ping-pong their GEMMs (FlashAttention-3), so the softmax and window test of one
// run under the other's GEMMs. A CTA may run one query tile for `heads_per_cta` heads in a row
// (1 by default), the K/V ring running on across heads, so the next head's Q and first tiles
// load under the previous head's last P V and epilogue.
// Each list entry is (kv_tile << 2 | kind):
//   FULL     every real query of the tile sees every key: no masking at all
//   PARTIAL  the window test per element, from the tokens' intra-group coordinates (a bit mask
//            per row along the innermost axis when its box side is >= 8: wide_keep, computed under the tile's Q K^T)
//   EXTRA    128 extra KV tokens (FLUX text) seen by every query; only the ragged end is masked
// The extra tokens share the softmax with the grid keys, so no log-sum-exp merge is needed.
//
// Window along one axis (NATTEN get_win_start / get_win_end, intra-group coordinate i of a
// group of `len` tokens): non-causal, the window of the stride group's leader
// (i / s) s + s / 2, shifted (not cut) at the borders, k keys; causal, [leader - k + 1, i + 1)
// with leader (i / s) s + s - 1. A key is a neighbor when it is inside the window on all 3 axes.
#pragma once

#include "../dense/dense_fwd_wgmma.cuh"

// One grid axis (the grid is padded to rank 3 with unit axes). Mirrors `AxisTiling` in
// src/attention/neighborhood/tiles.rs.
struct GnaAxis {
    int32_t len, kernel, stride, dilation, causal;
    int32_t tile, log_tile;   // box size along the axis (a power of two)
    int32_t group_pad;        // padded length of one dilation group
    int32_t tiles_per_group;  // group_pad / tile
    int32_t tiles;            // dilation * tiles_per_group
};
static_assert(sizeof(GnaAxis) == 40, "GnaAxis layout changed: update src/attention/neighborhood/tiles.rs");

// Kernel arguments, mirrored by `GnaArgs` in src/attention/cuda/neighborhood.rs.
struct GnaArgs {
    CUtensorMap q, k, v;      // permuted (B, H, n_pad, D), box (64, 128, 1, 1), 128-byte swizzle; or direct (below)
    CUtensorMap k2, v2;       // extra tokens (B, H, n_extra, D); unused when n_extra = 0
    void* o;                  // (B, H, N, D) in the original token order
    float* lse;               // (B, H, N)
    const int32_t* perm;      // permuted token -> original token, -1 for padding
    const int32_t* offsets;   // CSR over query tiles
    const int32_t* entries;   // (kv_tile << 2) | kind
    int64_t o_stride[3];      // batch, head, row
    int64_t lse_stride[2];    // batch, head
    GnaAxis axis[3];
    int32_t n_pad, n_extra;
    float scale_log2;
    // 1: q, k, v are read in place through 5-D maps (D, L2, L1, L0, B*H) with box
    // (64, t2, t1, t0, 1), whose smem image is the permuted tile (dilation 1 only; rows
    // outside the grid read as zero). 0: permuted copies through 4-D maps.
    int32_t direct;
    // 1: only q is read in place (5-D map in `q`, dilation 1), k and v are permuted copies.
    int32_t direct_q;
    int32_t heads;            // H (the grid's y dimension is ceil(H / heads_per_cta))
    // A CTA runs its query tile for this many consecutive heads (same list): the next head's Q
    // and first K/V tiles load while the last P V and the epilogue of the previous one run.
    int32_t heads_per_cta;
    // 1: the per-element window test of v1 on every PARTIAL tile (comparison runs only).
    int32_t generic_mask;
    // 1: the two consumer warpgroups take turns issuing their GEMMs (FlashAttention-3's
    // ping-pong), so one's softmax (and window test) runs under the other's GEMMs.
    int32_t pingpong;
};
static_assert(sizeof(GnaArgs) == 896 && offsetof(GnaArgs, o) == 640 && offsetof(GnaArgs, axis) == 720 &&
                  offsetof(GnaArgs, pingpong) == 872,
              "GnaArgs layout changed: update src/attention/cuda/neighborhood.rs");

namespace gna {

using namespace dense_wgmma;

constexpr int kFull = 0, kPartial = 1, kExtra = 2;

__device__ __forceinline__ int group_len(const GnaAxis& a, int group) {
    return a.len / a.dilation + (group < a.len % a.dilation ? 1 : 0);
}

// Window [start, end) of intra-group coordinate i in a group of len tokens (see the header).
__device__ __forceinline__ void window(const GnaAxis& a, int i, int len, int& start, int& end) {
    const int k = a.kernel, s = a.stride;
    if (a.causal) {
        const int leader = min((i / s) * s + s - 1, len - 1);
        start = max(leader - k + 1, 0);
        end = min(i + 1, len);
    } else {
        const int left = k / 2, right = k / 2 + (k % 2 - 1);
        const int leader = min((i / s) * s + s / 2, len - 1);
        const int overhang = leader + right >= len ? len - right - leader - 1 : 0;
        start = max(leader - left, 0) + overhang;
        end = start + k;
    }
}

// Box offset of row `r` (0..127) of a tile along each axis: rows are row-major in the box.
__device__ __forceinline__ void box_offsets(const GnaAxis (&ax)[3], int r, int (&c)[3]) {
    c[2] = r & (ax[2].tile - 1);
    c[1] = (r >> ax[2].log_tile) & (ax[1].tile - 1);
    c[0] = r >> (ax[2].log_tile + ax[1].log_tile);
}

// Tile coordinates along each axis of a linear tile index (tiles row-major).
__device__ __forceinline__ void tile_coords(const GnaAxis (&ax)[3], int tile, int (&t)[3]) {
    t[2] = tile % ax[2].tiles;
    t[1] = (tile / ax[2].tiles) % ax[1].tiles;
    t[0] = tile / (ax[2].tiles * ax[1].tiles);
}

// One box of a 5-D tensor map at (col, x2, x1, x0, b * H + h).
__device__ __forceinline__ void tma_load5(void* dst, const CUtensorMap* map, uint64_t* bar, int col, int x2, int x1, int x0, int bh) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(
            smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(x2), "r"(x1), "r"(x0), "r"(bh), "r"(smem_addr(bar))
        : "memory");
}

// Loads tile `tile` (128 rows, one 64-column block) of q, k or v: from the permuted copy, or in
// place (direct): the tile's box starts at tile coordinate x tile size on each axis.
__device__ __forceinline__ void load_tile(const GnaArgs& a, bool direct, void* dst, const CUtensorMap* map, uint64_t* bar, int col,
                                          int tile, int h, int b) {
    if (direct) {
        int t[3];
        tile_coords(a.axis, tile, t);
        tma_load5(dst, map, bar, col, t[2] * a.axis[2].tile, t[1] * a.axis[1].tile, t[0] * a.axis[0].tile, b * a.heads + h);
    } else {
        tma_load(dst, map, bar, col, tile * 128, h, b);
    }
}

// Named barriers 1 and 2 (0 is __syncthreads): the ping-pong turns of consumer warpgroups 0 and 1,
// 256 threads each (128 wait with sync, the other warpgroup's 128 arrive).
__device__ __forceinline__ void turn_wait(int cw) {
    asm volatile("bar.sync %0, 256;\n" ::"r"(1 + cw) : "memory");
}
__device__ __forceinline__ void turn_pass(int cw) {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + (cw ^ 1)) : "memory");
}

// Division by a divisor d >= 1 fixed for the launch, for dividends in [0, 2^31): multiply-high
// by a magic number (Granlund-Montgomery, round-up variant), q = (umulhi(n, m) + n) >> l with
// l = ceil(log2 d), m = 2^32 (2^l - d) / d + 1. A runtime `/` or `%` compiles to ~25 dependent
// instructions, three of them on the MUFU/XU pipe the softmax's exp2 needs (ncu, device run 7).
struct FastDiv {
    uint32_t m;
    int32_t l, d;
    __device__ __forceinline__ explicit FastDiv(int32_t d_) : d(d_) {
        l = 32 - __clz(d_ - 1);  // 0 for d = 1
        m = (uint32_t)(((1ull << 32) * ((1ull << l) - (uint64_t)d_)) / (uint64_t)d_ + 1ull);
    }
    __device__ __forceinline__ int32_t div(int32_t n) const { return (int32_t)((__umulhi((uint32_t)n, m) + (uint32_t)n) >> l); }
    __device__ __forceinline__ int32_t mod(int32_t n) const { return n - div(n) * d; }
};

// Bits [0, x) of a 32-bit word, x clamped to [0, 32].
__device__ __forceinline__ uint32_t bits_below(int x) {
    return x <= 0 ? 0u : x >= 32 ? 0xffffffffu : (1u << x) - 1u;
}

// Spreads the low 32 / KBITS bits of x so that bit i lands at bit i * KBITS (KBITS = 2 .. 32).
template <int KBITS>
__device__ __forceinline__ uint32_t spread_bits(uint32_t x) {
    if constexpr (KBITS == 2) {
        x = (x | x << 8) & 0x00FF00FFu;
        x = (x | x << 4) & 0x0F0F0F0Fu;
        x = (x | x << 2) & 0x33333333u;
        return (x | x << 1) & 0x55555555u;
    } else if constexpr (KBITS == 4) {
        x = (x | x << 12) & 0x000F000Fu;
        x = (x | x << 6) & 0x03030303u;
        return (x | x << 3) & 0x11111111u;
    } else if constexpr (KBITS == 8) {
        x = (x | x << 14) & 0x00030003u;
        return (x | x << 7) & 0x01010101u;
    } else if constexpr (KBITS == 16) {
        return (x | x << 15) & 0x00010001u;
    } else {
        return x & 1u;
    }
}

// The window test of a PARTIAL tile when the innermost box side T2 = 2^LOG_T2 is >= 8, as one
// 32-bit word per row of the thread: bit 2 n + c of keep[half] set when the key of column
// 8 n + lp + c (lp = (lane % 4) 2) is in the row's window. It depends on the tile, not on S,
// so it is computed while the tile's Q K^T is on the tensor cores; after the GEMM only the
// select per element is left.
//
// With T2 >= 8 the 8 columns of one n share their outer box offsets: segment seg = 8 n / T2
// (T2 columns), c1 = seg % t1, c0 = seg / t1, and the innermost offset is
// c2 = (8 n) % T2 + lp + c. The test is separable (in the window on every axis):
// - axis 2: a bit mask m over x = c2 - lp (bit x set when key offset x + lp is in
//   [lo2, lo2 + w2)), the same in every segment; its bits x = 8 nn + c (nn < T2 / 8) gathered
//   give the segment's pattern of KBITS = T2 / 4 bits;
// - axes 0 and 1: the allowed segments {c0 t1 + c1 : c0 in [lo0, lo0 + w0), c1 in [lo1, lo1 + w1)}
//   are the interval mask of c1 times the copies (one bit every t1, `rep0`: one per c0 < t0)
//   that fall in the c0 interval; no carries, the factors' bits do not overlap;
// - keep = (allowed segments spread to one bit every KBITS) x pattern.
// Checked against the per-element definition by the bit-equality test against v1.
template <int LOG_T2, int BN>
__device__ __forceinline__ void wide_keep(const GnaAxis (&ax)[3], uint32_t rep0, const int (&lo)[2][3], const int (&width)[2][3],
                                          int lp, uint32_t (&keep)[2]) {
    constexpr int T2 = 1 << LOG_T2;
    static_assert(T2 >= 8 && T2 <= BN && BN == 128, "wide mask: innermost box side in [8, 128], 128-key tiles");
    constexpr int kWords = (T2 + 31) / 32;
    constexpr int kNPerSegment = T2 / 8;
    constexpr int kBits = 2 * kNPerSegment;  // pattern bits per segment; (BN / T2) * kBits = 32
    const int t1 = ax[1].tile, t0 = ax[0].tile;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int start = lo[half][2] - lp, end = start + width[half][2];
        uint32_t m[kWords];
#pragma unroll
        for (int w = 0; w < kWords; ++w) m[w] = bits_below(end - 32 * w) & ~bits_below(start - 32 * w);
        uint32_t pattern = 0;
#pragma unroll
        for (int nn = 0; nn < kNPerSegment; ++nn) pattern |= ((m[(nn * 8) / 32] >> ((nn * 8) % 32)) & 3u) << (2 * nn);
        const uint32_t rows1 = bits_below(min(lo[half][1] + width[half][1], t1)) & ~bits_below(lo[half][1]);
        const uint32_t copies0 =
            rep0 & bits_below(min(lo[half][0] + width[half][0], t0) * t1) & ~bits_below(lo[half][0] * t1);
        keep[half] = spread_bits<kBits>(rows1 * copies0) * pattern;
    }
}

// One consumer warpgroup: 64 of the 128 query rows of tile `qt` against its listed KV tiles,
// for the heads h_first .. h_first + n_heads - 1 one after the other. The K/V ring runs on across
// heads: ring slot g (counted over the whole CTA) is stage g % kStages, phase g / kStages.
template <int D, typename T>
__device__ __forceinline__ void consume(const GnaArgs& a, const uint8_t* sQ, const uint8_t* sK, const uint8_t* sV,
                                        uint64_t* q_full, uint64_t* q_empty, uint64_t* k_full, uint64_t* v_full,
                                        uint64_t* empty, int cw, int warp, int lane, int qt, int b, int h_first, int n_heads,
                                        const int32_t* list, int n_tiles) {
    using L = Tile<D, 2>;
    constexpr int BN = L::kBlockN;
    constexpr int DP = L::kDPad;
    constexpr int kStages = L::kStages;
    const uint32_t q_addr = smem_addr(sQ) + cw * 64 * 128;
    const GnaAxis(&ax)[3] = a.axis;

    // ---- this thread's two query rows: their windows along each axis, intra-group coords ----
    int qtc[3];
    tile_coords(ax, qt, qtc);
    int glen[3];
#pragma unroll
    for (int d = 0; d < 3; ++d) glen[d] = group_len(ax[d], qtc[d] / ax[d].tiles_per_group);
    int win_start[2][3], win_width[2][3];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        int c[3];
        box_offsets(ax, cw * 64 + warp * 16 + lane / 4 + half * 8, c);
#pragma unroll
        for (int d = 0; d < 3; ++d) {
            const int i = (qtc[d] % ax[d].tiles_per_group) * ax[d].tile + c[d];
            int s, e;
            window(ax[d], i, glen[d], s, e);
            win_start[half][d] = s;
            win_width[half][d] = e - s;
        }
    }
    // PARTIAL tiles: the bit-mask test when the innermost box side is >= 8 (uniform per launch).
    const int wide_mask = a.generic_mask ? 0 : (ax[2].log_tile >= 3 ? ax[2].log_tile : 0);
    uint32_t rep0 = 0;  // one bit every t1 segments, per c0 < t0 (wide_keep)
#pragma unroll
    for (int c0 = 0; c0 < 16; ++c0)
        if (c0 < ax[0].tile && c0 * ax[1].tile < 32) rep0 |= 1u << (c0 * ax[1].tile);

    auto issue_qk = [&](float (&s)[BN / 2], int g) {
        const uint32_t k_addr = smem_addr(sK + (g % kStages) * L::kKVBytes);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < (D + 15) / 16; ++kk) {
            const uint32_t col = kk / 4, off = (kk % 4) * 32;
            const uint64_t dq = make_desc(q_addr + col * L::kQRows * 128 + off, 16, 1024);
            const uint64_t dk = make_desc(k_addr + col * BN * 128 + off, 16, 1024);
            Wgmma<T, BN>::ss(s, dq, dk, kk > 0);
        }
        wgmma_commit();
    };

    float o[DP / 2];
    float row_max[2], row_sum[2];

    // Window start of this thread's rows relative to KV tile `tile`, per axis.
    const int lp = (lane % 4) * 2;
    // Per PARTIAL tile, so its divisions by the launch's tile counts go through FastDiv (the
    // tile_coords arithmetic with `/` and `%` was ~165 SASS instructions on the tile's critical path).
    const FastDiv div_tiles2(ax[2].tiles), div_tiles1(ax[1].tiles);
    const FastDiv div_group[3] = {FastDiv(ax[0].tiles_per_group), FastDiv(ax[1].tiles_per_group), FastDiv(ax[2].tiles_per_group)};
    auto relative_starts = [&](int tile, int (&lo)[2][3]) {
        int ktc[3];
        const int rest = div_tiles2.div(tile);
        ktc[2] = tile - rest * ax[2].tiles;
        ktc[0] = div_tiles1.div(rest);
        ktc[1] = rest - ktc[0] * ax[1].tiles;
#pragma unroll
        for (int d = 0; d < 3; ++d) {
            const int k0 = div_group[d].mod(ktc[d]) * ax[d].tile;
            lo[0][d] = win_start[0][d] - k0;
            lo[1][d] = win_start[1][d] - k0;
        }
    };
    // List entry j, and for a PARTIAL tile with the bit-mask test its keep words (see
    // wide_keep): called before waiting for the tile's Q K^T, so it runs under the GEMM.
    auto prepare = [&](int j, uint32_t (&keep)[2]) -> int {
        const int entry = __ldg(list + j);
        keep[0] = keep[1] = 0xffffffffu;
        if ((entry & 3) == kPartial && wide_mask) {
            int lo[2][3];
            relative_starts(entry >> 2, lo);
            switch (wide_mask) {
                case 3: wide_keep<3, BN>(ax, rep0, lo, win_width, lp, keep); break;
                case 4: wide_keep<4, BN>(ax, rep0, lo, win_width, lp, keep); break;
                case 5: wide_keep<5, BN>(ax, rep0, lo, win_width, lp, keep); break;
                case 6: wide_keep<6, BN>(ax, rep0, lo, win_width, lp, keep); break;
                default: wide_keep<7, BN>(ax, rep0, lo, win_width, lp, keep); break;
            }
        }
        return entry;
    };

    // Masks S_j by the tile's kind, then the online softmax (as in the dense kernel).
    auto softmax = [&](float (&s)[BN / 2], int entry, const uint32_t (&keep)[2], float (&alpha)[2]) {
        const int kind = entry & 3, tile = entry >> 2;
        if (kind == kPartial && wide_mask) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int half = 0; half < 2; ++half)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        if (!((keep[half] >> (2 * n + c)) & 1u)) s[4 * n + 2 * half + c] = -INFINITY;
        } else if (kind == kPartial) {
            // Generic test (innermost box side < 8): key intra-group coordinate along axis d =
            // tile start + box offset of the column; in the window when
            // (unsigned)(j_d - start) < width on all three axes.
            int lo[2][3];
            relative_starts(tile, lo);
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    int kc[3];
                    box_offsets(ax, n * 8 + lp + c, kc);
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        bool ok = true;
#pragma unroll
                        for (int d = 0; d < 3; ++d) ok &= (unsigned)(kc[d] - lo[half][d]) < (unsigned)win_width[half][d];
                        if (!ok) s[4 * n + 2 * half + c] = -INFINITY;
                    }
                }
        } else if (kind == kExtra) {
            const int valid = a.n_extra - tile * BN;
            if (valid < BN) {
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        if (n * 8 + (lane % 4) * 2 + c >= valid) s[4 * n + c] = s[4 * n + 2 + c] = -INFINITY;
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
            const float m_new = fmaxf(row_max[half], mx * sl2);
            const float shift = m_new == -INFINITY ? 0.f : m_new;
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
    auto issue_pv = [&](int g) {
        mbar_wait(&v_full[g % kStages], (g / kStages) & 1);
        const uint32_t v_addr = smem_addr(sV + (g % kStages) * L::kKVBytes);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const uint64_t dv = make_desc(v_addr + kk * 16 * 128, BN * 128, 1024);
            Wgmma<T, DP>::rs_tb(o, pa[kk], dv);
        }
        wgmma_commit();
    };

    // Ping-pong: each warpgroup issues its Q K^T (and P V) only on its turn and then passes the
    // turn, so the GEMMs of one run while the other is in its softmax. Warpgroup 0 starts; both
    // run the same number of tiles, so the turns pair up, and warpgroup 0 takes the last turn
    // warpgroup 1 passes (after the loop) so that no barrier is left half arrived.
    const bool pingpong = a.pingpong != 0;
    if (pingpong && cw == 1) turn_pass(cw);

    for (int item = 0; item < n_heads; ++item) {
        const int h = h_first + item;
        const int g0 = item * n_tiles;  // ring slot of this head's first tile
#pragma unroll
        for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.f;

        // ---- main loop: the dense kernel's software pipeline over the listed tiles ----
        mbar_wait(q_full, item & 1);
        float s[BN / 2];
        if (n_tiles > 0) {
            mbar_wait(&k_full[g0 % kStages], (g0 / kStages) & 1);
            if (pingpong) turn_wait(cw);
            issue_qk(s, g0);
            if (pingpong) turn_pass(cw);
            uint32_t keep[2];
            const int entry = prepare(0, keep);
            wgmma_wait0();
            float alpha[2];
            softmax(s, entry, keep, alpha);
            pack_p(s);
        }
        for (int j = 0; j + 1 < n_tiles; ++j) {
            const int g = g0 + j;
            mbar_wait(&k_full[(g + 1) % kStages], ((g + 1) / kStages) & 1);
            if (pingpong) turn_wait(cw);
            issue_qk(s, g + 1);
            issue_pv(g);
            if (pingpong) turn_pass(cw);
            uint32_t keep[2];
            const int entry = prepare(j + 1, keep);
            wgmma_wait1();
            float alpha[2];
            softmax(s, entry, keep, alpha);
            wgmma_wait0();
            mbar_arrive(&empty[g % kStages]);
            rescale_o(alpha);
            pack_p(s);
        }
        // Every Q K^T of this head has completed: the producer may load the next head's Q while
        // the last P V and the epilogue run.
        mbar_arrive(q_empty);
        if (n_tiles > 0) {
            const int g = g0 + n_tiles - 1;
            issue_pv(g);
            wgmma_wait0();
            mbar_arrive(&empty[g % kStages]);
        }

        // ---- store O / l and lse at the original token of each row (the inverse permutation) ----
        T* o_base = static_cast<T*>(a.o) + b * a.o_stride[0] + h * a.o_stride[1];
        float* lse_base = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float l = row_sum[half];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int token = __ldg(a.perm + qt * 128 + cw * 64 + warp * 16 + lane / 4 + half * 8);
            if (token >= 0) {
                T* orow = o_base + (int64_t)token * a.o_stride[2];
#pragma unroll
                for (int n = 0; n < D / 8; ++n)
                    *reinterpret_cast<uint32_t*>(orow + n * 8 + (lane % 4) * 2) =
                        pack2<T>(o[4 * n + 2 * half] * inv, o[4 * n + 2 * half + 1] * inv);
                if (lane % 4 == 0)
                    lse_base[token] = l > 0.f ? (row_max[half] + __log2f(l)) * 0.69314718055994531f : -INFINITY;
            }
        }
    }
    if (pingpong && cw == 0) turn_wait(cw);
}

// CTA = one query tile (128 permuted tokens) of one batch and `heads_per_cta` consecutive heads:
// producer warpgroup + 2 consumer warpgroups, the dense kernel's 3-stage K/V ring.
template <int D, typename T>
__device__ __forceinline__ void gna_fwd(const GnaArgs& a) {
    using L = Tile<D, 2>;
    constexpr int BN = L::kBlockN;
    constexpr int kStages = L::kStages;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    uint8_t* sQ = smem;
    uint8_t* sK = sQ + L::kQBytes;
    uint8_t* sV = sK + kStages * L::kKVBytes;
    uint64_t* bars = reinterpret_cast<uint64_t*>(sV + kStages * L::kKVBytes);
    uint64_t* q_full = bars;
    uint64_t* k_full = bars + 1;
    uint64_t* v_full = bars + 1 + kStages;
    uint64_t* empty = bars + 1 + 2 * kStages;
    uint64_t* q_empty = bars + 1 + 3 * kStages;  // 11 barriers = 88 of the 128 bytes

    const int tid = threadIdx.x, wg = tid / 128;
    const int qt = blockIdx.x, b = blockIdx.z;
    const int h_first = blockIdx.y * a.heads_per_cta;
    const int n_heads = min(a.heads_per_cta, a.heads - h_first);
    const int begin = __ldg(a.offsets + qt);
    const int n_tiles = __ldg(a.offsets + qt + 1) - begin;
    const int32_t* list = a.entries + begin;

    if (tid == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, 128 * 2);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&k_full[s], 1);
            mbar_init(&v_full[s], 1);
            mbar_init(&empty[s], 128 * 2);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (tid == 0) {
            const bool direct_q = a.direct || a.direct_q;
            for (int item = 0; item < n_heads; ++item) {
                const int h = h_first + item;
                // The consumers release Q once every Q K^T of the previous head has completed.
                if (item > 0) mbar_wait(q_empty, (item - 1) & 1);
                mbar_expect_tx(q_full, L::kQBytes);
                for (int c = 0; c < L::kColBlocks; ++c)
                    load_tile(a, direct_q, sQ + c * L::kQRows * 128, &a.q, q_full, c * 64, qt, h, b);
                for (int j = 0; j < n_tiles; ++j) {
                    const int g = item * n_tiles + j;
                    const int s = g % kStages;
                    if (g >= kStages) mbar_wait(&empty[s], (g / kStages - 1) & 1);
                    const int entry = __ldg(list + j);
                    const bool extra = (entry & 3) == kExtra;
                    const int tile = entry >> 2;
                    mbar_expect_tx(&k_full[s], L::kKVBytes);
                    for (int c = 0; c < L::kColBlocks; ++c) {
                        uint8_t* dst = sK + s * L::kKVBytes + c * BN * 128;
                        if (extra) tma_load(dst, &a.k2, &k_full[s], c * 64, tile * BN, h, b);
                        else load_tile(a, a.direct, dst, &a.k, &k_full[s], c * 64, tile, h, b);
                    }
                    mbar_expect_tx(&v_full[s], L::kKVBytes);
                    for (int c = 0; c < L::kColBlocks; ++c) {
                        uint8_t* dst = sV + s * L::kKVBytes + c * BN * 128;
                        if (extra) tma_load(dst, &a.v2, &v_full[s], c * 64, tile * BN, h, b);
                        else load_tile(a, a.direct, dst, &a.v, &v_full[s], c * 64, tile, h, b);
                    }
                }
            }
            // No copy may be in flight when the CTA exits: the consumers wait for the last Q
            // (q_full) and every K/V tile, so nothing else to wait for here.
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
        const int cw = wg - 1, ctid = tid - 128;
        const int warp = (ctid % 128) / 32, lane = ctid % 32;
        consume<D, T>(a, sQ, sK, sV, q_full, q_empty, k_full, v_full, empty, cw, warp, lane, qt, b, h_first, n_heads, list,
                      n_tiles);
    }
}

}  // namespace gna

// Gathers q, k, v (B, H, N, D), any row/head/batch strides (multiples of 8 elements), into the
// permuted, zero-padded (B, H, n_pad, D) buffers: 16 bytes per thread.
struct GnaPermuteArgs {
    const void* src[3];
    void* dst[3];
    const int32_t* perm;
    int64_t src_stride[3][3];  // per tensor: batch, head, row
    int32_t heads, n_pad, chunks;  // chunks = D / 8 (16-byte pieces of a row)
    int32_t unused;
};
static_assert(sizeof(GnaPermuteArgs) == 144, "GnaPermuteArgs layout changed: update src/attention/cuda/neighborhood.rs");

__device__ __forceinline__ void gna_permute(const GnaPermuteArgs& a) {
    const int bh = blockIdx.y, which = blockIdx.z;
    const int b = bh / a.heads, h = bh % a.heads;
    const int64_t chunk = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (chunk >= (int64_t)a.n_pad * a.chunks) return;
    const int p = (int)(chunk / a.chunks), c = (int)(chunk % a.chunks);
    const int token = __ldg(a.perm + p);
    uint4 val = make_uint4(0, 0, 0, 0);
    if (token >= 0) {
        const int64_t* st = a.src_stride[which];
        const uint16_t* src = static_cast<const uint16_t*>(a.src[which]) + b * st[0] + h * st[1] + token * st[2] + c * 8;
        val = __ldg(reinterpret_cast<const uint4*>(src));
    }
    uint16_t* dst = static_cast<uint16_t*>(a.dst[which]) + ((int64_t)bh * a.n_pad + p) * (a.chunks * 8) + c * 8;
    *reinterpret_cast<uint4*>(dst) = val;
}
