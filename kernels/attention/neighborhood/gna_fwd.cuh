// Generalized neighborhood attention (GNA) forward for Hopper: the dense wgmma + TMA main loop
// (attention/dense/dense_fwd_wgmma.cuh) driven by a per-query-tile list of KV tiles.
//
// Layout (built on the host, src/attention/neighborhood/tiles.rs): tokens are permuted so that
// every run of 128 tokens is a box t0 x t1 x t2 of the grid inside one dilation group (NATTEN's
// token permutation), so a query tile's windows cover few KV tiles. k, v arrive permuted and
// zero-padded (gna_permute); q too, or (dilation 1, the default) q is read in place, one 5-D TMA
// box per tile (read once per CTA, so the box's short rows cost nothing); the output is
// scattered back to the original token order in the epilogue (no second pass). The two consumer
// warpgroups ping-pong their GEMMs (FlashAttention-3), so the softmax and masking of one
// run under the other's GEMMs. A CTA may run several work items (query tile, head, batch) in a
// row (WorkItems), the K and V rings running on across items, so the next item's Q and first
// tiles load under the previous item's last P V and epilogue.
// Each list entry is (kv_tile << 2 | kind, keep-word pattern or -1):
//   FULL     every real query of the tile sees every key: no masking at all
//   PARTIAL  masked by the tile pair's keep words, made on the host (src/attention/neighborhood/
//            masks.rs): a thread's element e = 32 half + 2 n + c (row half, key column
//            8 n + lp + c) is bit e % 7 of byte e / 7 of its four words. One 16-byte load per
//            thread, issued a tile ahead; computing the window test here cost ~270 instructions
//            per warp and tile (kernels/NOTES.md, ## neighborhood v3).
//   PARTIAL_COLUMNS  a PARTIAL tile whose keep bits depend, in every row, only on the column
//            class (n % 2, c) (a window edge cutting the tile along its innermost axis, box
//            width 16): the class's bit is a bias of the exponent (-inf: p = 0) and masks the
//            class's max, ~20 instructions instead of an FSEL per element. These tiles follow
//            the FULL ones in the list and run through a loop of their own. (So a non-finite
//            score of a key outside the window but inside such a tile reaches the row:
//            fma(inf, ., -inf) is NaN; finite scores, which the reference's semantics cover, are
//            exact.)
//   EXTRA    128 extra KV tokens (FLUX text) seen by every query; only the ragged end is masked
// The extra tokens share the softmax with the grid keys, so no log-sum-exp merge is needed.
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
    const int32_t* offsets;   // CSR over query tiles; each list: FULL, PARTIAL_COLUMNS, PARTIAL, EXTRA
    const int2* list;         // per entry: ((kv_tile << 2) | kind, keep-word pattern (PARTIAL) or -1)
    const uint32_t* masks;    // patterns of 1024 words: [consumer thread][4 keep words]
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
    int32_t heads;            // H
    // 1: the two consumer warpgroups take turns issuing their GEMMs (FlashAttention-3's
    // ping-pong), so one's softmax (and masking) runs under the other's GEMMs.
    int32_t pingpong;
    // Work items w = (b H + h) q_tiles + qt (query tiles innermost, so items close in w share
    // their K/V). CTA c runs w = c work_cta_stride + i work_step for i < work_per_cta, w < work_total.
    int32_t q_tiles, work_total, work_per_cta, work_step, work_cta_stride;
    const int32_t* full_ends;  // per query tile: the end of its FULL entries (into the list)
    // Or (non-null) the items of CTA c are work_table[gridDim.x + 1 + work_table[c] ...
    // gridDim.x + 1 + work_table[c + 1]] (src/attention/neighborhood/balance.rs).
    const int32_t* work_table;
    const int32_t* columns_ends;  // per query tile: the end of its PARTIAL_COLUMNS entries
};
static_assert(sizeof(GnaArgs) == 1024 && offsetof(GnaArgs, o) == 640 && offsetof(GnaArgs, axis) == 728 &&
                  offsetof(GnaArgs, full_ends) == 896 && offsetof(GnaArgs, work_table) == 904 &&
                  offsetof(GnaArgs, columns_ends) == 912,
              "GnaArgs layout changed: update src/attention/cuda/neighborhood.rs");

namespace gna {

using namespace dense_wgmma;

constexpr int kFull = 0, kPartial = 1, kExtra = 2, kPartialColumns = 3;
// What a softmax call masks (a constant at each call, so the rest folds away): nothing (FULL
// tiles), by column class (the PARTIAL_COLUMNS loop), by the entry's kind among PARTIAL and EXTRA
// (the last loop), or by any kind (an item's first tile when it has no FULL tile).
constexpr int kMaskNone = 0, kMaskColumns = 1, kMaskGeneric = 2, kMaskAny = 3;

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

// The CTA's work items (see GnaArgs): first + i step for i < count, or listed in the work table.
struct WorkItems {
    int first, step, count, q_tiles, heads;
    const int32_t* table;  // this CTA's items, or null
    __device__ __forceinline__ WorkItems(const GnaArgs& a, int cta) {
        q_tiles = a.q_tiles;
        heads = a.heads;
        if (a.work_table != nullptr) {
            first = __ldg(a.work_table + cta);
            count = __ldg(a.work_table + cta + 1) - first;
            table = a.work_table + gridDim.x + 1 + first;
            step = 0;
        } else {
            first = cta * a.work_cta_stride;
            step = a.work_step;
            count = first < a.work_total ? min(a.work_per_cta, (a.work_total - 1 - first) / step + 1) : 0;
            table = nullptr;
        }
    }
    // item i as (b H + h) q_tiles + qt
    __device__ __forceinline__ int at(int i) const { return table != nullptr ? __ldg(table + i) : first + i * step; }
    __device__ __forceinline__ int qt(int w) const { return w % q_tiles; }
    __device__ __forceinline__ int head(int w) const { return w / q_tiles % heads; }
    __device__ __forceinline__ int batch(int w) const { return w / q_tiles / heads; }
};

// One consumer warpgroup: 64 of the 128 query rows of each work item's query tile against its
// listed KV tiles, the items one after the other. K and V have rings of their own: ring slot g
// (counted over the whole CTA) is stage g % kStages, phase g / kStages; K_g is handed back as
// soon as its Q K^T has completed, V_g a step after its P V has (see `step`), so the producer
// can load K two tiles ahead of its use instead of one. Each list runs through three loops: its
// FULL tiles without list reads or masking code, its PARTIAL_COLUMNS tiles masked by column
// class, the rest (PARTIAL, EXTRA) masked by their kind. kMasked = false: every listed tile is
// FULL or a whole EXTRA tile (gna_fwd_full_*), so only the first loop is compiled.
template <int D, typename T, bool kMasked>
__device__ __forceinline__ void consume(const GnaArgs& a, const uint8_t* sQ, const uint8_t* sK, const uint8_t* sV,
                                        uint64_t* q_full, uint64_t* q_empty, uint64_t* k_full, uint64_t* v_full,
                                        uint64_t* k_empty, uint64_t* v_empty, int cw, int warp, int lane,
                                        const WorkItems& work) {
    using L = Tile<D, 2>;
    constexpr int BN = L::kBlockN;
    constexpr int DP = L::kDPad;
    constexpr int kStages = L::kStages;
    const uint32_t q_addr = smem_addr(sQ) + cw * 64 * 128;

    // S = Q K_gᵀ, issued asynchronously
    // (descriptors made once per operand and call, the k-steps' by desc_at)
    const uint64_t desc_q = make_desc(q_addr, 16, 1024);
    auto issue_qk = [&](float (&s)[BN / 2], int g) {
        const uint64_t desc_k = make_desc(smem_addr(sK + (g % kStages) * L::kKVBytes), 16, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < (D + 15) / 16; ++kk) {
            const uint32_t col = kk / 4, off = (kk % 4) * 32;
            Wgmma<T, BN>::ss(s, desc_at(desc_q, col * L::kQRows * 128 + off), desc_at(desc_k, col * BN * 128 + off), kk > 0);
        }
        wgmma_commit();
    };

    float o[DP / 2];
    float row_max[2], row_sum[2];

    const int2* list = nullptr;  // the current item's
    int n_tiles = 0;
    // List entry j (entry, pattern) and its keep words (all ones unless PARTIAL: this thread's
    // uint4 of the pattern, masks.rs). In the masking loop entries are loaded two tiles ahead of
    // their softmax and keep words one tile ahead, so no load is waited for in the tile that
    // issues it (a load used right away stalled the warp between its GEMM issue and its
    // softmax: ncu, run 12).
    const uint4* my_masks = reinterpret_cast<const uint4*>(a.masks) + (cw * 128 + warp * 32 + lane);
    auto load_info = [&](int j) { return j < n_tiles ? __ldg(list + j) : make_int2(0, -1); };
    auto load_keep = [&](int2 info) {
        return info.y >= 0 ? __ldg(my_masks + (int64_t)info.y * 256) : make_uint4(~0u, ~0u, ~0u, ~0u);
    };

    // Masks S_j as `mode` says (kMask*), then the online softmax (as in the dense kernel).
    auto softmax = [&](float (&s)[BN / 2], int mode, int entry, uint4 keep, float (&alpha)[2]) {
        const int kind = entry & 3, tile = entry >> 2;
        const bool by_kind = kMasked && (mode == kMaskGeneric || mode == kMaskAny);
        const uint32_t words[4] = {keep.x, keep.y, keep.z, keep.w};
        // element e = 32 half + 2 n + c is bit e % 7 of byte e / 7 (masks.rs): ptxas moves 7 bits
        // at a time into predicates (R2P)
        auto keeps = [&](int e) { return ((words[e / 7 / 4] >> (e / 7 % 4 * 8 + e % 7)) & 1u) != 0; };
        // [half][n % 2][c]: the column classes' keep bits (PARTIAL_COLUMNS), else all kept
        bool class_keeps[2][2][2];
        const bool columns = kMasked && (mode == kMaskColumns || (mode == kMaskAny && kind == kPartialColumns));
#pragma unroll
        for (int e = 0; e < 8; ++e) class_keeps[e / 4][e / 2 % 2][e % 2] = !columns || keeps(e / 4 * 32 + e % 4);
        if (by_kind && kind == kPartial) {
#pragma unroll
            for (int e = 0; e < BN / 2; ++e)  // one FSEL per element
                if (!keeps(e)) s[4 * (e % 32 / 2) + 2 * (e / 32) + e % 2] = -INFINITY;
        } else if (by_kind && kind == kExtra) {
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
            // the max per column class (n % 2, c), then over the kept classes
            float class_max[2][2];
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c)
                    class_max[n % 2][c] = n < 2 ? s[4 * n + 2 * half + c] : fmaxf(class_max[n % 2][c], s[4 * n + 2 * half + c]);
            float kept[2][2];
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int c = 0; c < 2; ++c) kept[m][c] = class_keeps[half][m][c] ? class_max[m][c] : -INFINITY;
            float mx = fmaxf(fmaxf(kept[0][0], kept[0][1]), fmaxf(kept[1][0], kept[1][1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // Lazy rescaling (FlashAttention-4): most tiles leave O as it is (alpha = 1); P then
            // stays below 2^kRescaleSlack, far inside bf16 / f16 range.
            const float shift = lazy_row_max(row_max[half], mx * sl2, alpha[half]);
            // p = 2^(s sl2 - shift), 0 in a dropped column class
            float bias[2][2];
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int c = 0; c < 2; ++c) bias[m][c] = class_keeps[half][m][c] ? -shift : -INFINITY;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float p = fast_exp2(fmaf(s[4 * n + 2 * half + c], sl2, bias[n % 2][c]));
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
    // O's rescale by the last softmax's alpha, applied just before the next P V is issued,
    // while the Q K^T issued before it runs (rescale_lazy)
    float pending[2] = {1.f, 1.f};
    auto rescale_pending = [&]() { rescale_lazy(o, pending); };
    // O += P_g V_g (V_g has landed: v_full waited for by the caller)
    auto issue_pv = [&](int g) {
        const uint64_t desc_v = make_desc(smem_addr(sV + (g % kStages) * L::kKVBytes), BN * 128, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, DP>::rs_tb(o, pa[kk], desc_at(desc_v, kk * 16 * 128));
        wgmma_commit();
    };

    // Ping-pong: each warpgroup issues its Q K^T (and P V) only on its turn and then passes the
    // turn, so the GEMMs of one run while the other is in its softmax. Warpgroup 0 starts; both
    // run the same number of tiles, so the turns pair up, and warpgroup 0 takes the last turn
    // warpgroup 1 passes (after the loop) so that no barrier is left half arrived.
    const bool pingpong = a.pingpong != 0;
    if (pingpong && cw == 1) turn_pass(cw);

    float s[BN / 2];
    // the masking loop's look-ahead: entry and keep words of tile j + 1, entry of tile j + 2
    int2 info1 = make_int2(0, -1), info2 = make_int2(0, -1);
    uint4 keep1 = make_uint4(~0u, ~0u, ~0u, ~0u);
    // Tile j + 1 of the item whose first tile is ring slot g0: S_{j+1} = Q K_{j+1}ᵀ, O rescaled
    // by tile j's alpha, O += P_j V_j, then the softmax of S_{j+1}. The same instruction
    // sequence every iteration of a loop, so that ptxas can follow the wgmma groups (a runtime
    // branch around a GEMM serializes them all). Measured (kernels/NOTES.md, ## neighborhood,
    // session 9): this order (FlashAttention-3's, with the lazy rescale and V_{j-1} handed back
    // here rather than right after its wait) runs the stride-1 case 2-3% faster than rescaling
    // after the wait. ptxas still moves most of the softmax below wait_group 0 (it packs P into
    // the registers P V reads as soon as values are ready); waiting at the start of the next step
    // instead keeps all of it above, and measured 2% slower.
    auto step = [&](int mode, int g0, int j) {
        const int g = g0 + j;
        mbar_wait(&k_full[(g + 1) % kStages], ((g + 1) / kStages) & 1);
        mbar_wait(&v_full[g % kStages], (g / kStages) & 1);
        if (pingpong) turn_wait(cw);
        issue_qk(s, g + 1);
        rescale_pending();  // under Q K_{j+1}ᵀ
        issue_pv(g);
        if (pingpong) turn_pass(cw);
        int2 info = make_int2(0, -1);
        uint4 keep = make_uint4(~0u, ~0u, ~0u, ~0u);
        if (kMasked && mode != kMaskNone) {
            info = info1;  // tile j + 1
            keep = keep1;
            info1 = info2;  // tile j + 2
            keep1 = load_keep(info2);
            info2 = load_info(j + 3);
        }
        wgmma_wait1();
        mbar_arrive(&k_empty[(g + 1) % kStages]);  // S_{j+1} is done: K_{j+1} is free
        if (j > 0) mbar_arrive(&v_empty[(g - 1) % kStages]);  // and so is P_{j-1} V_{j-1}
        softmax(s, mode, info.x, keep, pending);
        wgmma_wait0();
        pack_p(s);
    };

    int g0 = 0;  // ring slot of the item's first tile
    // An item's header (its list's bounds) is loaded an item ahead and its work-table entry two
    // ahead, so that in a CTA with several items no load waits between one item's epilogue and
    // the next one's first Q K^T.
    struct Header {
        int w, begin, end, full_end, columns_end;
    };
    auto load_header = [&](int w) {
        const int qt = work.qt(w);
        const int begin = __ldg(a.offsets + qt), end = __ldg(a.offsets + qt + 1);
        return kMasked ? Header{w, begin, end, __ldg(a.full_ends + qt), __ldg(a.columns_ends + qt)} : Header{w, begin, end, end, end};
    };
    Header next = load_header(work.count > 0 ? work.at(0) : 0);
    int w_after = work.count > 1 ? work.at(1) : 0;
    for (int item = 0; item < work.count; ++item) {
        const Header cur = next;
        if (item + 1 < work.count) next = load_header(w_after);
        if (item + 2 < work.count) w_after = work.at(item + 2);
        const int qt = work.qt(cur.w), h = work.head(cur.w), b = work.batch(cur.w);
        n_tiles = cur.end - cur.begin;
        const int n_full = cur.full_end - cur.begin, n_columns_end = cur.columns_end - cur.begin;
        list = a.list + cur.begin;
        // loads whose results are needed later: the look-ahead of the masking loop's first
        // tiles (their keep words once the first Q K^T has run: they wait for these), the
        // original token of each row (epilogue)
        int2 info0 = make_int2(0, -1);
        uint4 keep0 = make_uint4(~0u, ~0u, ~0u, ~0u);
        if constexpr (kMasked) {
            info0 = load_info(n_full);
            info1 = load_info(n_full + 1);
            info2 = load_info(n_full + 2);
        }
        int token[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) token[half] = __ldg(a.perm + qt * 128 + cw * 64 + warp * 16 + lane / 4 + half * 8);
#pragma unroll
        for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.f;

        // ---- main loop: the dense kernel's software pipeline over the listed tiles ----
        mbar_wait(q_full, item & 1);
        if (n_tiles > 0) {
            mbar_wait(&k_full[g0 % kStages], (g0 / kStages) & 1);
            if (pingpong) turn_wait(cw);
            issue_qk(s, g0);
            if (pingpong) turn_pass(cw);
            wgmma_wait0();
            mbar_arrive(&k_empty[g0 % kStages]);
            if constexpr (kMasked) {
                keep0 = load_keep(info0);
                keep1 = load_keep(info1);
            }
            if (n_full > 0) {
                softmax(s, kMaskNone, 0, keep0, pending);  // (O = 0: its rescale is a no-op)
                if constexpr (kMasked) {  // the masking loop starts at tile n_full
                    info2 = info1;
                    keep1 = keep0;
                    info1 = info0;
                }
            } else {
                softmax(s, kMaskAny, info0.x, keep0, pending);
            }
            pack_p(s);
        }
        int j = 0;
        for (; j + 1 < n_full; ++j) step(kMaskNone, g0, j);  // (step j runs tile j + 1's softmax)
        if constexpr (kMasked) {
            for (; j + 1 < n_columns_end; ++j) step(kMaskColumns, g0, j);
            for (; j + 1 < n_tiles; ++j) step(kMaskGeneric, g0, j);
        }
        // Every Q K^T of this item has completed: the producer may load the next item's Q while
        // the last P V and the epilogue run.
        mbar_arrive(q_empty);
        if (n_tiles > 0) {
            const int g = g0 + n_tiles - 1;
            mbar_wait(&v_full[g % kStages], (g / kStages) & 1);
            rescale_pending();
            issue_pv(g);
            wgmma_wait0();
            if (g > g0) mbar_arrive(&v_empty[(g - 1) % kStages]);
            mbar_arrive(&v_empty[g % kStages]);
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
            if (token[half] >= 0) {
                T* orow = o_base + (int64_t)token[half] * a.o_stride[2];
#pragma unroll
                for (int n = 0; n < D / 8; ++n)
                    *reinterpret_cast<uint32_t*>(orow + n * 8 + (lane % 4) * 2) =
                        pack2<T>(o[4 * n + 2 * half] * inv, o[4 * n + 2 * half + 1] * inv);
                if (lane % 4 == 0)
                    lse_base[token[half]] = l > 0.f ? (row_max[half] + __log2f(l)) * 0.69314718055994531f : -INFINITY;
            }
        }
        g0 += n_tiles;
    }
    if (pingpong && cw == 0) turn_wait(cw);
}

// CTA = its work items (query tile of 128 permuted tokens, head, batch), see WorkItems:
// producer warpgroup + 2 consumer warpgroups, the dense kernel's 3-stage rings for K and V.
template <int D, typename T, bool kMasked>
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
    uint64_t* q_empty = bars + 1;
    uint64_t* k_full = bars + 2;
    uint64_t* v_full = bars + 2 + kStages;
    uint64_t* k_empty = bars + 2 + 2 * kStages;
    uint64_t* v_empty = bars + 2 + 3 * kStages;  // 14 barriers = 112 of the 128 bytes
    static_assert((2 + 4 * kStages) * 8 <= 128, "barriers exceed their 128 bytes of shared memory");

    const int tid = threadIdx.x, wg = tid / 128;
    const WorkItems work(a, blockIdx.x);

    if (tid == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, 128 * 2);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&k_full[s], 1);
            mbar_init(&v_full[s], 1);
            mbar_init(&k_empty[s], 128 * 2);
            mbar_init(&v_empty[s], 128 * 2);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (tid == 0) {
            const bool direct_q = a.direct || a.direct_q;
            // K or V (which: 0 / 1) of list entry `entry` into ring slot g, once the consumers
            // have handed back that stage's previous tile
            auto load_kv = [&](int which, int g, int entry, int h, int b) {
                const int s = g % kStages;
                uint64_t* full = which == 0 ? &k_full[s] : &v_full[s];
                if (g >= kStages) mbar_wait(which == 0 ? &k_empty[s] : &v_empty[s], (g / kStages - 1) & 1);
                const int tile = entry >> 2;
                mbar_expect_tx(full, L::kKVBytes);
                uint8_t* base = (which == 0 ? sK : sV) + s * L::kKVBytes;
                const CUtensorMap* extra_map = which == 0 ? &a.k2 : &a.v2;
                const CUtensorMap* grid_map = which == 0 ? &a.k : &a.v;
                for (int c = 0; c < L::kColBlocks; ++c) {
                    if ((entry & 3) == kExtra) tma_load(base + c * BN * 128, extra_map, full, c * 64, tile * BN, h, b);
                    else load_tile(a, a.direct, base + c * BN * 128, grid_map, full, c * 64, tile, h, b);
                }
            };
            int g = 0;  // ring slot of the item's first tile
            for (int item = 0; item < work.count; ++item) {
                const int w = work.at(item);
                const int qt = work.qt(w), h = work.head(w), b = work.batch(w);
                // Q first: its copy does not wait for the list reads below (two dependent loads).
                // The consumers release Q once every Q K^T of the previous item has completed.
                if (item > 0) mbar_wait(q_empty, (item - 1) & 1);
                mbar_expect_tx(q_full, L::kQBytes);
                for (int c = 0; c < L::kColBlocks; ++c)
                    load_tile(a, direct_q, sQ + c * L::kQRows * 128, &a.q, q_full, c * 64, qt, h, b);
                const int begin = __ldg(a.offsets + qt);
                const int n_tiles = __ldg(a.offsets + qt + 1) - begin;
                const int2* list = a.list + begin;
                auto entry_of = [&](int j) { return j < n_tiles ? __ldg(&list[j].x) : 0; };
                int e0 = entry_of(0), e1 = entry_of(1);  // tiles j, j + 1
                // K runs one tile ahead of V (K_{j+1} is needed before V_j), entries one more
                if (n_tiles > 0) load_kv(0, g, e0, h, b);
                for (int j = 0; j < n_tiles; ++j) {
                    const int e2 = entry_of(j + 2);
                    if (j + 1 < n_tiles) load_kv(0, g + j + 1, e1, h, b);
                    load_kv(1, g + j, e0, h, b);
                    e0 = e1;
                    e1 = e2;
                }
                g += n_tiles;
            }
            // No copy may be in flight when the CTA exits: the consumers wait for the last Q
            // (q_full) and every K/V tile, so nothing else to wait for here.
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
        const int cw = wg - 1, ctid = tid - 128;
        const int warp = (ctid % 128) / 32, lane = ctid % 32;
        consume<D, T, kMasked>(a, sQ, sK, sV, q_full, q_empty, k_full, v_full, k_empty, v_empty, cw, warp, lane, work);
    }
}
}  // namespace gna

// Gathers q, k, v (B, H, N, D), any row/head/batch strides (multiples of 8 elements), into the
// permuted, zero-padded (B, H, n_pad, D) buffers: kPermutePieces 16-byte pieces per thread, all
// loaded before any is stored (a pass bound by memory latency wants many bytes in flight).
struct GnaPermuteArgs {
    const void* src[3];
    void* dst[3];
    const int32_t* perm;
    int64_t src_stride[3][3];  // per tensor: batch, head, row
    int32_t heads, n_pad, chunks;  // chunks = D / 8 (16-byte pieces of a row)
    int32_t unused;
};
static_assert(sizeof(GnaPermuteArgs) == 144, "GnaPermuteArgs layout changed: update src/attention/cuda/neighborhood.rs");

constexpr int kPermutePieces = 4;  // mirrored by PERMUTE_PIECES in src/attention/cuda/neighborhood.rs

__device__ __forceinline__ void gna_permute(const GnaPermuteArgs& a) {
    const int bh = blockIdx.y, which = blockIdx.z;
    const int b = bh / a.heads, h = bh % a.heads;
    const int64_t total = (int64_t)a.n_pad * a.chunks;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x * kPermutePieces + threadIdx.x;
    const int64_t* st = a.src_stride[which];
    const uint16_t* src = static_cast<const uint16_t*>(a.src[which]) + b * st[0] + h * st[1];
    uint16_t* dst = static_cast<uint16_t*>(a.dst[which]) + (int64_t)bh * a.n_pad * (a.chunks * 8);
    uint4 val[kPermutePieces];
    // load: piece i of this thread is chunk first + i * blockDim.x (coalesced per i)
#pragma unroll
    for (int i = 0; i < kPermutePieces; ++i) {
        const int64_t chunk = first + i * (int64_t)blockDim.x;
        val[i] = make_uint4(0, 0, 0, 0);
        if (chunk < total) {
            const int p = (int)(chunk / a.chunks), c = (int)(chunk % a.chunks);
            const int token = __ldg(a.perm + p);
            if (token >= 0) val[i] = __ldg(reinterpret_cast<const uint4*>(src + token * st[2] + c * 8));
        }
    }
    // store
#pragma unroll
    for (int i = 0; i < kPermutePieces; ++i) {
        const int64_t chunk = first + i * (int64_t)blockDim.x;
        if (chunk < total) *reinterpret_cast<uint4*>(dst + chunk * 8) = val[i];
    }
}
