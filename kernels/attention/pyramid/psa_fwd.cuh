// Pyramid sparse attention (PSA) for Hopper: mixed-level attention in one kernel, on the dense
// wgmma + TMA main loop (attention/dense/dense_fwd_wgmma.cuh), and the K/V pooling it reads.
//
// Per (batch, head, query block of 128 rows), KV block j (64 keys) is attended at pool p in
// {1, 2, 4, 8} or skipped. At pool p the block is 64/p pooled tokens (means of p keys / values)
// with the logit bias ln p, so one pooled token stands in for the p keys it averages:
//   softmax over { q.k_t * scale + ln p_t }  ->  in base 2: s * scale * log2(e) + log2 p.
// Levels per row come from the importance ranking: `ranked[b, h, i, :]` lists the KV blocks
// most important first, and (Topk mode) ranks [start_p, end_p) get pool p, the same ranges for
// every row. The schedule (host) cuts each range into compute tiles of 128 pooled rows: 2p
// blocks of 64/p rows (the "decoupled block-tile": the block size of the sparsity pattern is
// independent of the GEMM tile). The producer gathers the blocks of a tile with one TMA box per
// block (box rows 64/p, a multiple of 8 rows, so each box lands on whole 1024-byte swizzle
// atoms); a tile with fewer blocks repeats its last block and masks the copies.
// Pool 8 is stored differently: per KV block its 8 pooled keys and 8 pooled values, each as C
// column blocks of 8 rows x 128 bytes (C = D padded / 64, pad columns zero), are one contiguous
// 2C KiB run (PsaPoolArgs::kv8), so a block is one box for K and V together: a pool-8 tile is 16
// boxes instead of 64 (64 boxes of 1 KiB ran the tile at 287 TFLOP/s against 490 for pool 1;
// 16 of 4 KiB at 455-475). Such a tile fills its stage's K and V halves as 16 slots of
// [K cb 0..C-1 | V cb 0..C-1], which the wgmma descriptors read with a slot stride of 2C KiB.
// Keys past the sequence end: at pool p pooled token t is attended iff t p < N (psa_ref.py);
// only the last KV block can hold such tokens, the producer records its slot per stage.
#pragma once

#include "../dense/dense_fwd_wgmma.cuh"

// Kernel arguments, mirrored by `PsaArgs` in src/attention/cuda/pyramid.rs.
struct PsaArgs {
    CUtensorMap q;        // (B, H, N, D), box (64, 128)
    CUtensorMap k[4];     // level l: pool 2^l; level 0 is k itself; box (64, 64 >> l); level 3: kv8
    CUtensorMap v[4];     // as k; v[3] unused (pool 8 reads K and V through k[3])
    void* o;              // (B, H, N, D)
    float* lse;           // (B, H, N)
    const int32_t* ranked;    // (B, H, q_blocks, k_blocks) KV block ids, most important first
    const int32_t* schedule;  // n_sched tiles: rank_start << 8 | n_blocks << 2 | level
    int64_t o_stride[3];
    int64_t lse_stride[2];
    int32_t n, q_blocks, k_blocks, n_sched;
    float scale_log2;
    int32_t serial_producer;  // 1: the v1 one-thread producer (comparison), 0: lane-parallel
    int32_t heads;            // H; work item = (b, h, query block), item = (b H + h) q_blocks + qb
    int32_t items;            // B H q_blocks; CTA c takes items c, c + gridDim.x, ... (persistent)
    int32_t pingpong;         // 1: the consumer warpgroups take turns issuing their GEMMs
};
static_assert(sizeof(PsaArgs) == 1280 && offsetof(PsaArgs, o) == 1152, "PsaArgs layout changed: update src/attention/cuda/pyramid.rs");

namespace psa {

using namespace dense_wgmma;

constexpr int kBlockK = 64;  // keys per KV block
constexpr int kLevel8 = 3;   // pool 8: K and V interleaved per block (see the top of the file)

// Shared memory of one pipeline stage: K then V (kKVBytes each), adjacent, so that a pool-8 tile
// can use both halves as 16 slots of [K | V].
template <int D>
struct Stage {
    using L = dense_wgmma::Tile<D, 2>;
    static constexpr int kBytes = 2 * L::kKVBytes;
    static constexpr int kKv8Rows = 16 * L::kColBlocks;       // 128-byte rows per pool-8 block (K and V)
    static constexpr int kKv8SlotBytes = kKv8Rows * 128;     // 2C KiB
};

// One work item (b, h, query block qb) for consumer warpgroup `cw`. `g0`: the CTA-wide index of
// the item's first tile in the producer's ring (stage g % kStages, phase g / kStages); `it`: the
// CTA's item count so far (phase of q_full / q_empty). q_empty is released as soon as the last
// Q Kᵀ has completed, so the producer loads the next item's Q under this item's last P V and
// epilogue; every tile's stage is released after its P V (the last one too: the ring goes on).
template <int D, typename T>
__device__ __forceinline__ void consume(const PsaArgs& a, const uint8_t* sQ, const uint8_t* sK,
                                        uint64_t* q_full, uint64_t* q_empty, uint64_t* k_full, uint64_t* v_full,
                                        uint64_t* empty, const int* last_slot, int cw, int warp, int lane, int qb, int b,
                                        int h, int g0, int it) {
    using L = Tile<D, 2>;
    constexpr int BN = L::kBlockN;
    constexpr int DP = L::kDPad;
    constexpr int kStages = L::kStages;
    using St = Stage<D>;
    const uint32_t q_addr = smem_addr(sQ) + cw * 64 * 128;
    const int n_tiles = a.n_sched;
    // Pooled rows of the last KV block that lie before the sequence end, per level.
    const int last_keys = a.n - (a.k_blocks - 1) * kBlockK;  // 1..64

    // Tile j's pooled rows: 8-row groups 1 KiB apart, column blocks BN x 128 bytes apart; pool 8:
    // groups (slots) 2C KiB apart, column blocks 1 KiB apart, V C KiB after K.
    auto is_kv8 = [&](int j) { return (__ldg(a.schedule + j) & 3) == kLevel8; };
    auto issue_qk = [&](float (&s)[BN / 2], int j) {
        const uint32_t k_addr = smem_addr(sK + ((g0 + j) % kStages) * St::kBytes);
        const bool kv8 = is_kv8(j);
        const uint32_t group = kv8 ? St::kKv8SlotBytes : 1024, col_block = kv8 ? 1024 : BN * 128;
        const uint64_t desc_q = make_desc(q_addr, 16, 1024), desc_k = make_desc(k_addr, 16, group);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < (D + 15) / 16; ++kk) {
            const uint32_t col = kk / 4, off = (kk % 4) * 32;
            Wgmma<T, BN>::ss(s, desc_at(desc_q, col * L::kQRows * 128 + off), desc_at(desc_k, col * col_block + off), kk > 0);
        }
        wgmma_commit();
    };

    float o[DP / 2];
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

    auto softmax = [&](float (&s)[BN / 2], int j, float (&alpha)[2]) {
        const int entry = __ldg(a.schedule + j);
        const int level = entry & 3, n_blocks = (entry >> 2) & 63;
        const int shift_rows = 6 - level;  // log2 of the pooled rows per block
        const int rows = 1 << shift_rows;
        const int ls = last_slot[(g0 + j) % kStages];
        const int last_valid = (last_keys + (1 << level) - 1) >> level;  // t p < N within the last block
        // Columns of block copies (slot >= n_blocks) and pooled tokens past the end: -inf.
        if (n_blocks * rows < BN || ls >= 0) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = n * 8 + (lane % 4) * 2 + c;
                    const int slot = col >> shift_rows, r = col & (rows - 1);
                    if (slot >= n_blocks || (slot == ls && r >= last_valid)) s[4 * n + c] = s[4 * n + 2 + c] = -INFINITY;
                }
        }
        const float sl2 = a.scale_log2, bias = (float)level;  // log2 p = level
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // lazy (kRescaleSlack): most tiles keep the running max, alpha = 1
            const float shift = lazy_row_max(row_max[half], fmaf(mx, sl2, bias), alpha[half]);
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float p = fast_exp2(fmaf(s[4 * n + 2 * half + c], sl2, bias - shift));
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
    // O's rescale by the last softmax's alpha, applied just before the next P V is issued, under
    // the Q K^T issued before it (rescale_lazy; GNA's loop, kernels/NOTES.md ## neighborhood,
    // session 9)
    float pending[2] = {1.f, 1.f};
    auto rescale_pending = [&]() { rescale_lazy(o, pending); };
    auto issue_pv = [&](int j) {
        mbar_wait(&v_full[(g0 + j) % kStages], ((g0 + j) / kStages) & 1);
        const uint32_t stage_addr = smem_addr(sK + ((g0 + j) % kStages) * St::kBytes);
        const bool kv8 = is_kv8(j);
        const uint32_t v_addr = stage_addr + (kv8 ? L::kColBlocks * 1024 : L::kKVBytes);
        const uint32_t group = kv8 ? St::kKv8SlotBytes : 1024, col_block = kv8 ? 1024 : BN * 128;
        const uint64_t desc_v = make_desc(v_addr, col_block, group);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, DP>::rs_tb(o, pa[kk], desc_at(desc_v, kk * 2 * group));  // 16 rows = 2 groups
        wgmma_commit();
    };

    // Ping-pong (see turn_wait): both warpgroups run the same tiles, so the turns pair up.
    const bool pingpong = a.pingpong != 0;
    mbar_wait(q_full, it & 1);
    float s[BN / 2];
    if (n_tiles > 0) {
        mbar_wait(&k_full[g0 % kStages], (g0 / kStages) & 1);
        if (pingpong) turn_wait(cw);
        issue_qk(s, 0);
        if (pingpong) turn_pass(cw);
        wgmma_wait0();
        if (n_tiles == 1) mbar_arrive(q_empty);
        softmax(s, 0, pending);  // (O = 0: its rescale is a no-op)
        pack_p(s);
    } else {
        mbar_arrive(q_empty);
    }
    for (int j = 0; j + 1 < n_tiles; ++j) {
        mbar_wait(&k_full[(g0 + j + 1) % kStages], ((g0 + j + 1) / kStages) & 1);
        if (pingpong) turn_wait(cw);
        issue_qk(s, j + 1);
        rescale_pending();  // by tile j's alpha, under Q K_{j+1}ᵀ
        issue_pv(j);
        if (pingpong) turn_pass(cw);
        wgmma_wait1();  // Q K_{j+1}ᵀ done (committed first)
        if (j + 2 == n_tiles) mbar_arrive(q_empty);  // the last Q Kᵀ: sQ is free for the next item
        softmax(s, j + 1, pending);
        wgmma_wait0();
        mbar_arrive(&empty[(g0 + j) % kStages]);
        pack_p(s);
    }
    if (n_tiles > 0) {
        rescale_pending();
        issue_pv(n_tiles - 1);
        wgmma_wait0();
        mbar_arrive(&empty[(g0 + n_tiles - 1) % kStages]);
    }

    T* o_base = static_cast<T*>(a.o) + b * a.o_stride[0] + h * a.o_stride[1];
    float* lse_base = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float l = row_sum[half];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = qb * 128 + cw * 64 + warp * 16 + lane / 4 + half * 8;
        if (row < a.n) {
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

template <int D, typename T>
__device__ __forceinline__ void psa_fwd(const PsaArgs& a) {
    using L = Tile<D, 2>;
    constexpr int BN = L::kBlockN;
    constexpr int kStages = L::kStages;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    using St = Stage<D>;
    uint8_t* sQ = smem;
    uint8_t* sK = sQ + L::kQBytes;  // stage s: K at sK + s St::kBytes, V kKVBytes after it
    uint64_t* bars = reinterpret_cast<uint64_t*>(sK + kStages * St::kBytes);  // 128 bytes reserved
    uint64_t* q_full = bars;
    uint64_t* k_full = bars + 1;
    uint64_t* v_full = bars + 1 + kStages;
    uint64_t* empty = bars + 1 + 2 * kStages;
    uint64_t* q_empty = bars + 1 + 3 * kStages;  // 11 barriers: 88 of the 128 bytes
    // Slot of the last KV block in the tile of each stage (-1: not there); written by the
    // producer before the stage's arrive (release), read by the consumers after their wait.
    __shared__ int last_slot[kStages];

    const int tid = threadIdx.x, wg = tid / 128;
    const int n_sched = a.n_sched;
    // Work items: this CTA takes items blockIdx.x + t gridDim.x (a persistent grid of one CTA per
    // SM, or one item per CTA when gridDim.x = items); decode (b, h, qb) of an item.
    auto decode = [&](int item, int& qb, int& h, int& b) {
        qb = item % a.q_blocks;
        const int bh = item / a.q_blocks;
        h = bh % a.heads;
        b = bh / a.heads;
    };

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

    // Producer steps for tile slot `slot` (KV block `blk`) of stage s at `level`: arm the stage's
    // barriers (one thread, before any box of the tile), load the block (any thread).
    auto arm_stage = [&](int s, int level) {
        if (level == kLevel8) {
            mbar_expect_tx(&k_full[s], St::kBytes);  // K and V arrive on k_full
            mbar_arrive(&v_full[s]);
        } else {
            mbar_expect_tx(&k_full[s], L::kKVBytes);
            mbar_expect_tx(&v_full[s], L::kKVBytes);
        }
    };
    auto load_slot = [&](int s, int level, int slot, int blk, int h, int b) {
        uint8_t* stage = sK + s * St::kBytes;
        if (level == kLevel8) {
            tma_load(stage + slot * St::kKv8SlotBytes, &a.k[kLevel8], &k_full[s], 0, blk * St::kKv8Rows, h, b);
            return;
        }
        const int rows = kBlockK >> level;
        for (int c = 0; c < L::kColBlocks; ++c)
            tma_load(stage + c * BN * 128 + slot * rows * 128, &a.k[level], &k_full[s], c * 64, blk * rows, h, b);
        for (int c = 0; c < L::kColBlocks; ++c)
            tma_load(stage + L::kKVBytes + c * BN * 128 + slot * rows * 128, &a.v[level], &v_full[s], c * 64, blk * rows, h, b);
    };

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (a.serial_producer == 0 && tid < 32) {
            // Lane-parallel producer (warp 0): lane `slot` looks up its block and issues its
            // boxes, so a tile costs one round of ranked[] loads and TMA issues instead of 2p
            // (x column blocks x K, V) dependent ones on one thread. The block ids of tile j + 1
            // are loaded before the wait for tile j's stage: the lookup is off the critical path.
            const int lane = tid;
            int g = 0;  // ring index of the tile: stage g % kStages
            for (int item = blockIdx.x, it = 0; item < a.items; item += gridDim.x, ++it) {
                int qb, h, b;
                decode(item, qb, h, b);
                const int32_t* ranked = a.ranked + (int64_t)item * a.k_blocks;
                auto lookup = [&](int j, int& entry) {
                    entry = __ldg(a.schedule + j);
                    const int level = entry & 3, n_blocks = (entry >> 2) & 63, rank0 = entry >> 8;
                    const int cap = BN / (kBlockK >> level);
                    return lane < cap ? __ldg(ranked + rank0 + min(lane, n_blocks - 1)) : 0;
                };
                int next_entry = 0;
                int next_blk = n_sched > 0 ? lookup(0, next_entry) : 0;
                if (lane == 0) {
                    if (it > 0) mbar_wait(q_empty, (it - 1) & 1);  // the previous item's last Q Kᵀ is done
                    mbar_expect_tx(q_full, L::kQBytes);
                    for (int c = 0; c < L::kColBlocks; ++c) tma_load(sQ + c * L::kQRows * 128, &a.q, q_full, c * 64, qb * 128, h, b);
                }
                for (int j = 0; j < n_sched; ++j, ++g) {
                    const int s = g % kStages;
                    const int entry = next_entry, blk = next_blk;
                    if (j + 1 < n_sched) next_blk = lookup(j + 1, next_entry);
                    const int level = entry & 3, n_blocks = (entry >> 2) & 63;
                    const int rows = kBlockK >> level, cap = BN / rows;
                    // Every slot is loaded (copies of the last block past n_blocks): no stale rows, and
                    // the byte count is always a whole tile.
                    const unsigned last = __ballot_sync(0xffffffffu, lane < n_blocks && lane < cap && blk == a.k_blocks - 1);
                    if (g >= kStages) mbar_wait(&empty[s], (g / kStages - 1) & 1);
                    if (lane == 0) {
                        last_slot[s] = last ? __ffs(last) - 1 : -1;  // ranked rows are permutations: one at most
                        arm_stage(s, level);
                    }
                    __syncwarp();
                    if (lane < cap) load_slot(s, level, lane, blk, h, b);
                }
            }
        } else if (a.serial_producer != 0 && tid == 0) {
            // v1 producer (one thread), kept for comparison (AttentionOptions::serial_producer).
            int g = 0;
            for (int item = blockIdx.x, it = 0; item < a.items; item += gridDim.x, ++it) {
                int qb, h, b;
                decode(item, qb, h, b);
                const int32_t* ranked = a.ranked + (int64_t)item * a.k_blocks;
                if (it > 0) mbar_wait(q_empty, (it - 1) & 1);
                mbar_expect_tx(q_full, L::kQBytes);
                for (int c = 0; c < L::kColBlocks; ++c) tma_load(sQ + c * L::kQRows * 128, &a.q, q_full, c * 64, qb * 128, h, b);
                for (int j = 0; j < n_sched; ++j, ++g) {
                    const int s = g % kStages;
                    if (g >= kStages) mbar_wait(&empty[s], (g / kStages - 1) & 1);
                    const int entry = __ldg(a.schedule + j);
                    const int level = entry & 3, n_blocks = (entry >> 2) & 63, rank0 = entry >> 8;
                    const int rows = kBlockK >> level, cap = BN / rows;
                    int ls = -1;
                    for (int slot = 0; slot < n_blocks; ++slot)
                        if (__ldg(ranked + rank0 + slot) == a.k_blocks - 1) ls = slot;
                    last_slot[s] = ls;
                    arm_stage(s, level);
                    for (int slot = 0; slot < cap; ++slot) load_slot(s, level, slot, __ldg(ranked + rank0 + min(slot, n_blocks - 1)), h, b);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
        const int cw = wg - 1, ctid = tid - 128;
        const int warp = (ctid % 128) / 32, lane = ctid % 32;
        // Ping-pong: warpgroup 0 takes the first turn and the last one warpgroup 1 passes, so no
        // named barrier is left half arrived.
        if (a.pingpong && cw == 1) turn_pass(cw);
        for (int item = blockIdx.x, it = 0; item < a.items; item += gridDim.x, ++it) {
            int qb, h, b;
            decode(item, qb, h, b);
            consume<D, T>(a, sQ, sK, q_full, q_empty, k_full, v_full, empty, last_slot, cw, warp, lane, qb, b, h,
                          it * n_sched, it);
        }
        if (a.pingpong && cw == 0) turn_wait(cw);
    }
}

}  // namespace psa

// Mean pooling of k and v at 2, 4 and 8 along the sequence, the sequence replicate-padded to
// whole 64-key blocks (copies of the last token), as pool_mean in src/attention/pyramid.rs.
// One thread = 8 consecutive tokens x 8 channels: sums of pairs (pool 2), quads (4), all (8).
// Levels outside level_mask are not written (a schedule without pool 4 skips its 1/4 of the
// output traffic).
struct PsaPoolArgs {
    const void* src[2];        // k, v (B, H, N, D), 16-byte aligned rows
    void* dst[2][2];           // [k|v][pool 2, 4]: (B, H, n_pad / p, D) contiguous
    void* kv8;                 // pool 8: (B, H, k_blocks, [k|v], C, 8, 64), C = pad_chunks / 8, pad zero
    int64_t src_stride[2][3];  // batch, head, row
    int32_t heads, n, n_pad, chunks;  // chunks = D / 8
    int32_t pad_chunks;        // D padded to 64 or 128, / 8
    int32_t level_mask;        // bit l: write pool 2^(l+1)
};
static_assert(sizeof(PsaPoolArgs) == 128, "PsaPoolArgs layout changed: update src/attention/cuda/pyramid.rs");

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ void psa_pool(const PsaPoolArgs& a) {
    const int bh = blockIdx.y, which = blockIdx.z;
    const int b = bh / a.heads, h = bh % a.heads;
    const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int groups = a.n_pad / 8;
    if (idx >= (int64_t)groups * a.chunks) return;
    const int g = (int)(idx / a.chunks), c = (int)(idx % a.chunks);
    const int64_t* st = a.src_stride[which];
    const T* src = static_cast<const T*>(a.src[which]) + b * st[0] + h * st[1] + c * 8;
    float x[8][8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        const int row = min(g * 8 + t, a.n - 1);
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src + (int64_t)row * st[2]));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) x[t][i] = to_float(e[i]);
    }
    auto pack = [](const float (&vals)[8], float inv) {
        uint4 raw;
        uint32_t* w = reinterpret_cast<uint32_t*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = dense::pack2<T>(vals[2 * i] * inv, vals[2 * i + 1] * inv);
        return raw;
    };
    auto store = [&](int level, int row, const float (&vals)[8], float inv) {
        if (!(a.level_mask >> level & 1)) return;
        const int pooled_rows = a.n_pad >> (level + 1);
        T* dst = static_cast<T*>(a.dst[which][level]) + ((int64_t)bh * pooled_rows + row) * (a.chunks * 8) + c * 8;
        *reinterpret_cast<uint4*>(dst) = pack(vals, inv);
    };
    // Pool 8: row g of the head is row g % 8 of KV block g / 8; chunk c is in column block c / 8.
    auto store8 = [&](const float (&vals)[8]) {
        if (!(a.level_mask >> 2 & 1)) return;
        const int col_blocks = a.pad_chunks / 8;
        T* block = static_cast<T*>(a.kv8) + (((int64_t)bh * (a.n_pad / 64) + g / 8) * 2 + which) * col_blocks * 512;
        auto at = [&](int chunk) { return block + (chunk / 8) * 512 + (g % 8) * 64 + (chunk % 8) * 8; };
        *reinterpret_cast<uint4*>(at(c)) = pack(vals, 0.125f);
        if (c == a.chunks - 1)  // the pad columns (read by wgmma as whole 64-column blocks): zero
            for (int pc = a.chunks; pc < a.pad_chunks; ++pc) *reinterpret_cast<uint4*>(at(pc)) = make_uint4(0, 0, 0, 0);
    };
    float s4[2][8], s8[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) s8[i] = 0.f;
#pragma unroll
    for (int q4 = 0; q4 < 2; ++q4) {
#pragma unroll
        for (int i = 0; i < 8; ++i) s4[q4][i] = 0.f;
#pragma unroll
        for (int p2 = 0; p2 < 2; ++p2) {
            float s2[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                s2[i] = x[q4 * 4 + p2 * 2][i] + x[q4 * 4 + p2 * 2 + 1][i];
                s4[q4][i] += s2[i];
            }
            store(0, g * 4 + q4 * 2 + p2, s2, 0.5f);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) s8[i] += s4[q4][i];
        store(1, g * 2 + q4, s4[q4], 0.25f);
    }
    store8(s8);
}
