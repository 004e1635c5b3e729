// SANA ReLU linear attention on Hopper (sm_90a), bf16 / f16 in and out, fp32 inside.
//
//   o_n = ( S · ψ(q_n) ) / ( z · φ(q_n) + eps )
//   S   = Σ_m v_m ψ(k_m)ᵀ   (D×D)        z = Σ_m φ(k_m)   (D)
//
// φ = ReLU. ψ = φ in the plain form, ψ = RoPE∘φ in the RoPE-numerator form (SANA-Video): only the
// numerator sees rotated features; the denominator keeps the unrotated, non-negative ones.
//
// Two kernels, both streaming (memory-bound: every input byte is read once, every output byte
// written once; the D² work per token runs on the tensor cores):
//   linear_state_*  reads K and V once and adds this block's token range into S and z (fp32,
//                   red.add in global memory; the caller zeroes them, or copies the previous chunk's
//                   state in: that is the chunk-causal form).
//   linear_out_*    reads Q once, multiplies by S on the tensor cores (S split into a hi and a lo
//                   part in the element type, so the product keeps ~16 mantissa bits), divides by
//                   the fp32 denominator and writes O.
// Both split a head's tokens over several blocks (grid.y) so that few heads still fill the chip.
//
// Tensors are (B·H, N, D) contiguous; a call processes tokens [n_begin, n_begin + n_count) of each
// head (a chunk of a longer sequence, or all of it). RoPE tables are (N, D) fp32, cos and sin
// already repeated over interleaved pairs (2i, 2i+1), indexed by the absolute token.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace linear_attn {

// ------------------------------------------------------------------------------------------------
// Element types: the pair type, conversions and the m16n8k16 tensor-core product for each.

template <typename T> struct Elem;

template <> struct Elem<__nv_bfloat16> {
    using T2 = __nv_bfloat162;
    static __device__ float2 to_float2(T2 x) { return __bfloat1622float2(x); }
    static __device__ T2 from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
    static __device__ __nv_bfloat16 from_float(float a) { return __float2bfloat16_rn(a); }
    static __device__ float to_float(__nv_bfloat16 a) { return __bfloat162float(a); }
    // ReLU on a packed pair (the bits of a T2 in a register).
    static __device__ uint32_t relu2(uint32_t x) {
        T2 v = *reinterpret_cast<T2*>(&x);
        v = __hmax2(v, __float2bfloat162_rn(0.f));
        return *reinterpret_cast<uint32_t*>(&v);
    }
    // c += a·b, a 16×16 row-major, b 16×8 column-major, c 16×8 fp32.
    static __device__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <> struct Elem<__half> {
    using T2 = __half2;
    static __device__ float2 to_float2(T2 x) { return __half22float2(x); }
    static __device__ T2 from_float2(float a, float b) { return __floats2half2_rn(a, b); }
    static __device__ __half from_float(float a) { return __float2half_rn(a); }
    static __device__ float to_float(__half a) { return __half2float(a); }
    static __device__ uint32_t relu2(uint32_t x) {
        T2 v = *reinterpret_cast<T2*>(&x);
        v = __hmax2(v, __float2half2_rn(0.f));
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// ------------------------------------------------------------------------------------------------
// Small PTX helpers: asynchronous 16-byte copies into shared memory, 8×8 matrix loads.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes, or writes 16 zero bytes when !valid (the source is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// ------------------------------------------------------------------------------------------------
// Layout of one call, shared by both kernels.

struct Layout {
    int n_tokens;         // N: tokens per head in memory (heads are N·D elements apart)
    int n_begin;          // first token this call processes
    int n_count;          // tokens this call processes
    int tiles_per_block;  // token tiles per block along grid.y

    // Element offset of token `t` (relative to n_begin) of head `bh`.
    __device__ size_t offset(int bh, int t, int d) const {
        return (static_cast<size_t>(bh) * n_tokens + n_begin + t) * d;
    }
};

// A tile of TOK tokens × D features in shared memory. Rows are padded by 8 elements (16 bytes) so
// that the 8 row addresses of an ldmatrix fall in different banks (the row pitch is an odd number
// of 16-byte units for every supported D).
template <typename T, int D, int TOK> struct Tile {
    static constexpr int LD = D + 8;
    static constexpr int ELEMS = TOK * LD;
    static constexpr int CHUNKS = TOK * D / 8;  // 16-byte pieces per tile

    // Starts the asynchronous copy of tokens [t0, t0 + TOK) of one head; rows past n_count are zero.
    static __device__ void load(T* tile, const T* head, int t0, int n_count, int tid, int nthreads) {
        for (int c = tid; c < CHUNKS; c += nthreads) {
            const int row = c / (D / 8), col = (c % (D / 8)) * 8;
            const bool valid = t0 + row < n_count;
            const T* src = head + (valid ? static_cast<size_t>(t0 + row) * D + col : 0);
            cp_async_16(tile + row * LD + col, src, valid);
        }
    }
};

// ------------------------------------------------------------------------------------------------
// Pass 1: S += Σ v ψ(k)ᵀ, z += Σ φ(k) over this block's tokens.
//
// Block: D/16 warps; warp w owns rows a ∈ [16w, 16w+16) of S (all D columns) in fp32 registers.
// Per tile of TOK tokens: (1) wait for the tile, start the copy of a later one; (2) transform the K
// tile in place: ReLU, z accumulation, RoPE; (3) S_w += Vᵀ_w · ψ(K) on the tensor cores, both
// operands read with transposing ldmatrix (tokens are the reduction dimension).

constexpr int STATE_TOK = 64;
constexpr int STATE_STAGES = 3;

template <typename T, int D, bool ROPE>
__device__ __forceinline__ void state_kernel(const T* __restrict__ k, const T* __restrict__ v,
                                                      const float* __restrict__ cos_t,
                                                      const float* __restrict__ sin_t, float* __restrict__ kv,
                                                      float* __restrict__ ksum, Layout L) {
    using E = Elem<T>;
    using T2 = typename E::T2;
    using KTile = Tile<T, D, STATE_TOK>;
    constexpr int THREADS = 2 * D, NT = D / 8, LD = KTile::LD;

    extern __shared__ __align__(16) uint8_t smem_raw[];
    T* sk = reinterpret_cast<T*>(smem_raw);   // [STAGES][TOK][LD]
    T* sv = sk + STATE_STAGES * KTile::ELEMS;  // [STAGES][TOK][LD]

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int bh = blockIdx.x;
    const int n_tiles = (L.n_count + STATE_TOK - 1) / STATE_TOK;
    const int tile_begin = blockIdx.y * L.tiles_per_block;
    const int tile_end = min(tile_begin + L.tiles_per_block, n_tiles);
    if (tile_begin >= tile_end) return;

    const T* k_head = k + L.offset(bh, 0, D);
    const T* v_head = v + L.offset(bh, 0, D);
    auto load = [&](int tile, int stage) {
        KTile::load(sk + stage * KTile::ELEMS, k_head, tile * STATE_TOK, L.n_count, tid, THREADS);
        KTile::load(sv + stage * KTile::ELEMS, v_head, tile * STATE_TOK, L.n_count, tid, THREADS);
    };

    // Prologue: STAGES-1 tiles in flight. Every step commits a group (maybe empty) so that
    // wait_group<STAGES-2> always means "the current tile has landed".
    for (int s = 0; s < STATE_STAGES - 1; ++s) {
        if (tile_begin + s < tile_end) load(tile_begin + s, s);
        cp_async_commit();
    }

    float acc[NT][4] = {};
    // z for the column pair (2p, 2p+1); the 4 row groups of the transform each hold a share.
    const int pair = tid % (D / 2), row0 = tid / (D / 2);
    float z0 = 0.f, z1 = 0.f;

    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int stage = (tile - tile_begin) % STATE_STAGES;
        cp_async_wait<STATE_STAGES - 2>();
        __syncthreads();  // the tile is visible to all; everyone is done with the stage reloaded next
        const int next = tile + STATE_STAGES - 1;
        if (next < tile_end) load(next, (next - tile_begin) % STATE_STAGES);
        cp_async_commit();

        // (2) φ (and RoPE) on K in place; z from the unrotated features. Rows past n_count are zero.
        // The RoPE table entries of ROWS rows are loaded before any is used (independent global
        // loads in flight instead of one latency per row).
        T* kt = sk + stage * KTile::ELEMS;
        constexpr int ROWS = 4;
        for (int r0 = row0; r0 < STATE_TOK; r0 += 4 * ROWS) {
            float2 cs[ROWS], sn[ROWS];
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const int t = tile * STATE_TOK + r0 + 4 * i;
                if (ROPE && t < L.n_count) {
                    const size_t idx = static_cast<size_t>(L.n_begin + t) * D + 2 * pair;
                    cs[i] = *reinterpret_cast<const float2*>(cos_t + idx);
                    sn[i] = *reinterpret_cast<const float2*>(sin_t + idx);
                } else {
                    cs[i] = make_float2(1.f, 1.f);
                    sn[i] = make_float2(0.f, 0.f);
                }
            }
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                T2* p = reinterpret_cast<T2*>(kt + (r0 + 4 * i) * LD + 2 * pair);
                float2 x = E::to_float2(*p);
                x.x = fmaxf(x.x, 0.f);
                x.y = fmaxf(x.y, 0.f);
                z0 += x.x;
                z1 += x.y;
                if (ROPE) x = make_float2(x.x * cs[i].x - x.y * sn[i].x, x.x * sn[i].y + x.y * cs[i].y);
                *p = E::from_float2(x.x, x.y);
            }
        }
        __syncthreads();

        // (3) S_w += Vᵀ ψ(K): A = Vᵀ rows a (16 of them), B = ψ(K), reduction over 16 tokens at a time.
        const T* vt = sv + stage * KTile::ELEMS;
#pragma unroll
        for (int kk = 0; kk < STATE_TOK / 16; ++kk) {
            uint32_t a[4];
            // matrices: (t 0-7, a 0-7), (t 0-7, a 8-15), (t 8-15, a 0-7), (t 8-15, a 8-15)
            ldmatrix_x4_trans(a, vt + (kk * 16 + lane % 8 + 8 * (lane / 16)) * LD + 16 * warp + 8 * ((lane / 8) % 2));
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                uint32_t b[4];
                // matrices: (t 0-7, b of tile j), (t 8-15, tile j), (t 0-7, tile j+1), (t 8-15, tile j+1)
                ldmatrix_x4_trans(b, kt + (kk * 16 + lane % 8 + 8 * ((lane / 8) % 2)) * LD + 8 * j + 8 * (lane / 16));
                E::mma(acc[j], a, b[0], b[1]);
                E::mma(acc[j + 1], a, b[2], b[3]);
            }
        }
    }
    cp_async_wait<0>();

    // Add this block's share into the global state. Accumulator layout of an m16n8 tile: lane holds
    // rows g, g+8 (g = lane/4), columns 2(lane%4), 2(lane%4)+1.
    float* kv_head = kv + static_cast<size_t>(bh) * D * D;
    const int g = lane / 4, c = 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int a = 16 * warp + g, b = 8 * j + c;
        atomicAdd(reinterpret_cast<float2*>(kv_head + a * D + b), make_float2(acc[j][0], acc[j][1]));
        atomicAdd(reinterpret_cast<float2*>(kv_head + (a + 8) * D + b), make_float2(acc[j][2], acc[j][3]));
    }
    atomicAdd(reinterpret_cast<float2*>(ksum + static_cast<size_t>(bh) * D + 2 * pair), make_float2(z0, z1));
}

// ------------------------------------------------------------------------------------------------
// Pass 2: o = (S ψ(q)) / (z·φ(q) + eps) for this block's tokens.
//
// Prologue (one warp per row a of S, fp32 from pass 1): row a becomes hi + lo in the element type
// in shared memory (S ≈ hi + lo to ~16 mantissa bits; hi alone with !SPLIT). For f16, each row is
// first scaled by a power of two c_a that puts its largest entry in [2^13, 2^14) (S grows with
// the token count and would overflow f16); output column a is multiplied back by 1/c_a. z stays
// fp32: the denominator runs on the CUDA cores.
// Per tile of TOK = 16·MT·WARPS tokens: (1) wait / prefetch; (2) transform the Q tile in place
// (ReLU, fp32 denominator against z, RoPE), one warp per token row; (3) warp w: O rows
// [16·MT·w, 16·MT·(w+1)) = ψ(Q) Sᵀ on the tensor cores, each S fragment feeding MT products;
// (4) scale, divide, round, stage the rows through shared memory (the warp's own Q rows) and store
// them with 16-byte writes.

template <int WARPS_, int MT_, int STAGES_, bool DEN_MMA_ = false> struct OutConfig {
    static constexpr int WARPS = WARPS_;    // warps per block
    static constexpr int MT = MT_;          // m16 tiles (16 tokens each) per warp
    static constexpr int STAGES = STAGES_;  // Q tiles in the cp.async pipeline
    static constexpr int TOK = 16 * MT * WARPS;
    // Denominator on the tensor cores: z is row D of S (the ones-row trick of the reference), ReLU
    // is applied to the A fragments in registers, and the transform pass over the Q tile (and its
    // barrier) disappears. Plain form only: with RoPE the denominator needs the unrotated q.
    static constexpr bool DEN_MMA = DEN_MMA_;
};
using OutV1 = OutConfig<4, 1, 3>;        // first version: kept for comparison in the bench
using OutV2 = OutConfig<8, 2, 2>;        // default
using OutV3 = OutConfig<8, 2, 2, true>;  // v2 with the denominator on the tensor cores

template <typename T, int D, bool ROPE, bool SPLIT, typename C>
__device__ __forceinline__ void out_kernel(const T* __restrict__ q, T* __restrict__ o,
                                           const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                           const float* __restrict__ kv, const float* __restrict__ ksum,
                                           float eps, Layout L) {
    using E = Elem<T>;
    using T2 = typename E::T2;
    using QTile = Tile<T, D, C::TOK>;
    constexpr int THREADS = 32 * C::WARPS, NT = D / 8, LD = QTile::LD, TOK = C::TOK, MT = C::MT;
    constexpr bool SCALE_ROWS = sizeof(T) == 2 && !std::is_same<T, __nv_bfloat16>::value;  // f16
    constexpr bool DEN_MMA = C::DEN_MMA && !ROPE;
    constexpr int RS = D + (DEN_MMA ? 8 : 0);  // rows of S in shared memory: z is row D with DEN_MMA

    extern __shared__ __align__(16) uint8_t smem_raw[];
    T* sq = reinterpret_cast<T*>(smem_raw);               // [STAGES][TOK][LD]
    T* s_hi = sq + C::STAGES * QTile::ELEMS;               // [RS][LD]  S[a][b], a = output feature
    T* s_lo = s_hi + RS * LD;                              // [RS][LD]  (SPLIT only)
    float* s_z = reinterpret_cast<float*>(s_lo + (SPLIT ? RS * LD : 0));  // [RS]
    float* s_rinv = s_z + RS;                              // [RS]  1/c_a
    float* s_den = s_rinv + RS;                            // [TOK]

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int bh = blockIdx.x;
    const int n_tiles = (L.n_count + TOK - 1) / TOK;
    const int tile_begin = blockIdx.y * L.tiles_per_block;
    const int tile_end = min(tile_begin + L.tiles_per_block, n_tiles);
    if (tile_begin >= tile_end) return;

    const T* q_head = q + L.offset(bh, 0, D);
    T* o_head = o + L.offset(bh, 0, D);
    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (tile_begin + s < tile_end) QTile::load(sq + s * QTile::ELEMS, q_head, (tile_begin + s) * TOK, L.n_count, tid, THREADS);
        cp_async_commit();
    }

    // Prologue: rows of S, 4 at a time per warp (4 float4 loads in flight per lane).
    const float* kv_head = kv + static_cast<size_t>(bh) * D * D;
    const float* z_head = ksum + static_cast<size_t>(bh) * D;
    for (int a0 = 4 * warp; a0 < RS; a0 += 4 * C::WARPS) {
        float4 x[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // rows 0..D-1: S; with DEN_MMA row D: z, rows D+1..D+7: zero
            const float* row = a0 + i < D ? kv_head + (a0 + i) * D : (a0 + i == D ? z_head : nullptr);
            x[i] = (lane < D / 4 && row != nullptr) ? reinterpret_cast<const float4*>(row)[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float scale = 1.f;
            if (SCALE_ROWS) {
                float m = fmaxf(fmaxf(fabsf(x[i].x), fabsf(x[i].y)), fmaxf(fabsf(x[i].z), fabsf(x[i].w)));
                for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
                int e = 0;
                if (m > 0.f && isfinite(m)) {
                    frexpf(m, &e);  // m = f·2^e, f ∈ [0.5, 1)
                    scale = ldexpf(1.f, 14 - e);
                }
                if (lane == 0 && a0 + i < RS) s_rinv[a0 + i] = 1.f / scale;
            }
            if (lane < D / 4 && a0 + i < RS) {
                const float v[4] = {x[i].x * scale, x[i].y * scale, x[i].z * scale, x[i].w * scale};
                T hi[4], lo[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    hi[e] = E::from_float(v[e]);
                    lo[e] = E::from_float(v[e] - E::to_float(hi[e]));
                }
                T* row_hi = s_hi + (a0 + i) * LD + 4 * lane;
                reinterpret_cast<T2*>(row_hi)[0] = T2{hi[0], hi[1]};
                reinterpret_cast<T2*>(row_hi)[1] = T2{hi[2], hi[3]};
                if (SPLIT) {
                    T* row_lo = s_lo + (a0 + i) * LD + 4 * lane;
                    reinterpret_cast<T2*>(row_lo)[0] = T2{lo[0], lo[1]};
                    reinterpret_cast<T2*>(row_lo)[1] = T2{lo[2], lo[3]};
                }
            }
        }
    }
    for (int i = tid; i < D; i += THREADS) s_z[i] = z_head[i];
    // (the first __syncthreads of the loop publishes s_hi, s_lo, s_z, s_rinv)

    const int g = lane / 4, c = 2 * (lane % 4);
    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int stage = (tile - tile_begin) % C::STAGES;
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();
        const int next = tile + C::STAGES - 1;
        if (next < tile_end) QTile::load(sq + ((next - tile_begin) % C::STAGES) * QTile::ELEMS, q_head, next * TOK, L.n_count, tid, THREADS);
        cp_async_commit();

        // (2) one warp per row: φ in place, the denominator z·φ(q) in fp32, then RoPE.
        // The RoPE table entries of ROWS rows are loaded before any is used (see pass 1).
        T* qt = sq + stage * QTile::ELEMS;
        constexpr int ROWS = 4, PAIRS = (D / 2 + 31) / 32;  // pairs per lane
        static_assert(TOK % (ROWS * C::WARPS) == 0, "rows split evenly");
        for (int r0 = warp; r0 < TOK && !DEN_MMA; r0 += ROWS * C::WARPS) {
            float2 cs[ROWS][PAIRS], sn[ROWS][PAIRS];
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const int t = tile * TOK + r0 + i * C::WARPS;
#pragma unroll
                for (int k = 0; k < PAIRS; ++k) {
                    const int p = lane + 32 * k;
                    if (ROPE && t < L.n_count && p < D / 2) {
                        const size_t idx = static_cast<size_t>(L.n_begin + t) * D + 2 * p;
                        cs[i][k] = *reinterpret_cast<const float2*>(cos_t + idx);
                        sn[i][k] = *reinterpret_cast<const float2*>(sin_t + idx);
                    } else {
                        cs[i][k] = make_float2(1.f, 1.f);
                        sn[i][k] = make_float2(0.f, 0.f);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const int r = r0 + i * C::WARPS;
                float den = 0.f;
#pragma unroll
                for (int k = 0; k < PAIRS; ++k) {
                    const int p = lane + 32 * k;
                    if (p < D / 2) {
                        T2* ptr = reinterpret_cast<T2*>(qt + r * LD + 2 * p);
                        float2 x = E::to_float2(*ptr);
                        x.x = fmaxf(x.x, 0.f);
                        x.y = fmaxf(x.y, 0.f);
                        den += x.x * s_z[2 * p] + x.y * s_z[2 * p + 1];
                        if (ROPE) x = make_float2(x.x * cs[i][k].x - x.y * sn[i][k].x, x.x * sn[i][k].y + x.y * cs[i][k].y);
                        *ptr = E::from_float2(x.x, x.y);
                    }
                }
                for (int off = 16; off > 0; off /= 2) den += __shfl_xor_sync(0xffffffffu, den, off);
                if (lane == 0) s_den[r] = den + eps;
            }
        }
        if (!DEN_MMA) __syncthreads();

        // (3) rows [16·MT·w, 16·MT·(w+1)) of the tile times Sᵀ: A = ψ(Q) (row-major), B[b][a] = S[a][b].
        float acc[MT][NT][4] = {};
        float acc_den[MT][4] = {};  // DEN_MMA: column 0 of the extra n-tile is z·φ(q)
        const T* qw = qt + 16 * MT * warp * LD;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[MT][4];
            // matrices: (t 0-7, b 0-7), (t 8-15, b 0-7), (t 0-7, b 8-15), (t 8-15, b 8-15)
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                ldmatrix_x4(a[m], qw + (16 * m + lane % 8 + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));
                if (DEN_MMA) {
#pragma unroll
                    for (int r = 0; r < 4; ++r) a[m][r] = E::relu2(a[m][r]);
                }
            }
            if (DEN_MMA) {
                // matrices: (rows D..D+7, b 0-7), (rows D..D+7, b 8-15); lanes 16-31 repeat the addresses
                const int off = (D + lane % 8) * LD + kk * 16 + 8 * ((lane / 8) % 2);
                uint32_t b[2];
                ldmatrix_x2(b, s_hi + off);
#pragma unroll
                for (int m = 0; m < MT; ++m) E::mma(acc_den[m], a[m], b[0], b[1]);
                if (SPLIT) {
                    ldmatrix_x2(b, s_lo + off);
#pragma unroll
                    for (int m = 0; m < MT; ++m) E::mma(acc_den[m], a[m], b[0], b[1]);
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                // matrices: (a of tile j, b 0-7), (tile j, b 8-15), (tile j+1, b 0-7), (tile j+1, b 8-15)
                const int off = (8 * j + lane % 8 + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2);
                uint32_t b[4];
                ldmatrix_x4(b, s_hi + off);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    E::mma(acc[m][j], a[m], b[0], b[1]);
                    E::mma(acc[m][j + 1], a[m], b[2], b[3]);
                }
                if (SPLIT) {
                    ldmatrix_x4(b, s_lo + off);
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        E::mma(acc[m][j], a[m], b[0], b[1]);
                        E::mma(acc[m][j + 1], a[m], b[2], b[3]);
                    }
                }
            }
        }

        // (4) unscale the columns, divide, round, stage in this warp's own rows, store 16 B per lane.
        __syncwarp();
        T* ow = qt + 16 * MT * warp * LD;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            float inv0, inv1;
            if (DEN_MMA) {
                // column 0 of the z tile sits in lanes with lane % 4 == 0
                const float zr = SCALE_ROWS ? s_rinv[D] : 1.f;
                inv0 = 1.f / (__shfl_sync(0xffffffffu, acc_den[m][0], lane & ~3) * zr + eps);
                inv1 = 1.f / (__shfl_sync(0xffffffffu, acc_den[m][2], lane & ~3) * zr + eps);
            } else {
                inv0 = 1.f / s_den[16 * (MT * warp + m) + g];
                inv1 = 1.f / s_den[16 * (MT * warp + m) + g + 8];
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                float c0 = 1.f, c1 = 1.f;
                if (SCALE_ROWS) {
                    c0 = s_rinv[8 * j + c];
                    c1 = s_rinv[8 * j + c + 1];
                }
                *reinterpret_cast<T2*>(ow + (16 * m + g) * LD + 8 * j + c) =
                    E::from_float2(acc[m][j][0] * c0 * inv0, acc[m][j][1] * c1 * inv0);
                *reinterpret_cast<T2*>(ow + (16 * m + g + 8) * LD + 8 * j + c) =
                    E::from_float2(acc[m][j][2] * c0 * inv1, acc[m][j][3] * c1 * inv1);
            }
        }
        __syncwarp();
        for (int i = lane; i < 16 * MT * D / 8; i += 32) {
            const int r = i / (D / 8), col = (i % (D / 8)) * 8;
            const int t = tile * TOK + 16 * MT * warp + r;
            if (t < L.n_count)
                *reinterpret_cast<uint4*>(o_head + static_cast<size_t>(t) * D + col) = *reinterpret_cast<const uint4*>(ow + r * LD + col);
        }
    }
    cp_async_wait<0>();
}

}  // namespace linear_attn

// ------------------------------------------------------------------------------------------------
// Entry points, one per (element type, head dim, form). Names: linear_{state,out}[_rope][_split]_{bf16,f16}_d{D}.

using linear_attn::Layout;

#define LINEAR_STATE(NAME, T, D, ROPE)                                                                  \
    extern "C" __global__ void __launch_bounds__(2 * D)                                                 \
        NAME(const T* k, const T* v, const float* cos_t, const float* sin_t, float* kv, float* ksum,     \
             Layout L) {                                                                                \
        linear_attn::state_kernel<T, D, ROPE>(k, v, cos_t, sin_t, kv, ksum, L);                         \
    }

#define LINEAR_OUT(NAME, T, D, ROPE, SPLIT, CFG)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * linear_attn::CFG::WARPS)                          \
        NAME(const T* q, T* o, const float* cos_t, const float* sin_t, const float* kv, const float* ksum, \
             float eps, Layout L) {                                                                     \
        linear_attn::out_kernel<T, D, ROPE, SPLIT, linear_attn::CFG>(q, o, cos_t, sin_t, kv, ksum, eps, L); \
    }

#define LINEAR_ALL(TNAME, T, D)                                                  \
    LINEAR_STATE(linear_state_##TNAME##_d##D, T, D, false)                       \
    LINEAR_STATE(linear_state_rope_##TNAME##_d##D, T, D, true)                   \
    LINEAR_OUT(linear_out_##TNAME##_d##D, T, D, false, false, OutV2)             \
    LINEAR_OUT(linear_out_split_##TNAME##_d##D, T, D, false, true, OutV2)        \
    LINEAR_OUT(linear_out_rope_##TNAME##_d##D, T, D, true, false, OutV2)         \
    LINEAR_OUT(linear_out_rope_split_##TNAME##_d##D, T, D, true, true, OutV2)

LINEAR_ALL(bf16, __nv_bfloat16, 32)
LINEAR_ALL(bf16, __nv_bfloat16, 64)
LINEAR_ALL(bf16, __nv_bfloat16, 112)
LINEAR_ALL(bf16, __nv_bfloat16, 128)
LINEAR_ALL(f16, __half, 32)
LINEAR_ALL(f16, __half, 64)
LINEAR_ALL(f16, __half, 112)
LINEAR_ALL(f16, __half, 128)

// The first output-kernel configuration (4 warps × 16 tokens, 3 stages), bf16 only: the bench
// times it beside the default to keep the comparison honest.
LINEAR_OUT(linear_out_split_v1_bf16_d64, __nv_bfloat16, 64, false, true, OutV1)
LINEAR_OUT(linear_out_split_v1_bf16_d112, __nv_bfloat16, 112, false, true, OutV1)
LINEAR_OUT(linear_out_split_v1_bf16_d128, __nv_bfloat16, 128, false, true, OutV1)

// v3: the denominator on the tensor cores (plain form only), bf16 and f16.
#define LINEAR_V3(TNAME, T, D)                                               \
    LINEAR_OUT(linear_out_v3_##TNAME##_d##D, T, D, false, false, OutV3)      \
    LINEAR_OUT(linear_out_split_v3_##TNAME##_d##D, T, D, false, true, OutV3)
LINEAR_V3(bf16, __nv_bfloat16, 32)
LINEAR_V3(bf16, __nv_bfloat16, 64)
LINEAR_V3(bf16, __nv_bfloat16, 112)
LINEAR_V3(bf16, __nv_bfloat16, 128)
LINEAR_V3(f16, __half, 32)
LINEAR_V3(f16, __half, 64)
LINEAR_V3(f16, __half, 112)
LINEAR_V3(f16, __half, 128)

// Fills n 16-bit words with `value` (0xFFFF is a NaN in bf16 and f16): tests poison outputs with it.
extern "C" __global__ void linear_fill_u16(uint16_t* p, unsigned long long n, uint16_t value) {
    for (unsigned long long i = blockIdx.x * 1ull * blockDim.x + threadIdx.x; i < n; i += 1ull * gridDim.x * blockDim.x)
        p[i] = value;
}
