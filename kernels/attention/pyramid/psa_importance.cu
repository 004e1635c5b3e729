// PSA block importance in one kernel (the oracle: importance_with_samples in
// src/attention/pyramid.rs; spec gna_psa_flux.md §B):
//   R[r, j] = max over block j's sampled keys c of (scale q_r . k_c)
//   S[i, j] = max over query block i's sampled rows r of exp(R[r, j] - max_j' R[r, j'])
//   imp[i, j] = S[i, j] / sum_j' S[i, j']
// Sampled positions clamp to the last token (replicate padding).
//
// Entry points psa_importance_{bf16,f16}_d{64,72,96,112,128}: grid (ceil(q_blocks / 2), B*H),
// 256 threads, dynamic shared memory psa_importance_smem(D, k_blocks) (mirrored in
// src/attention/cuda/pyramid.rs). Served: 32 sampled queries per query block (block_q 128),
// 16 sampled keys per KV block (block_k 64).
//
// One CTA: 2 query blocks = 64 sampled query rows, against every sampled key of the head.
// 8 warps: warp w owns rows 16 (w % 4) .. +16 (A fragments in registers for the whole run) and
// the key half w / 4 of each step. A step is 128 sampled keys (8 KV blocks of 16, block-major),
// gathered with cp.async into a double buffer. Scores live only in the mma accumulators: the 16
// columns of a KV block are 2 n-tiles, reduced to R in registers (4 values per row per thread,
// then the lane quad), and R (64 rows x k_blocks, f32) is kept in shared memory. Epilogue: row
// maxima, exp, max over each query block's 32 rows, sum, normalize: the only global write is
// the importance itself.
#include "../dense/dense_fwd.cuh"

struct PsaImportanceArgs {
    const void* q;           // (B, H, N, D) at q_stride (elements), unit stride in D
    const void* k;
    float* imp;              // (B, H, q_blocks, k_blocks) f32, contiguous
    const int32_t* q_pos;    // (B*H, 32) sampled offsets in a query block
    const int32_t* k_pos;    // (B*H, 16) sampled offsets in a KV block
    int64_t q_stride[3];
    int64_t k_stride[3];
    int32_t heads, n, q_blocks, k_blocks;
    float scale;
    int32_t unused;
};
static_assert(sizeof(PsaImportanceArgs) == 112, "PsaImportanceArgs layout changed: update src/attention/cuda/pyramid.rs");

namespace psa_imp {

using namespace dense;

constexpr int kSampleQ = 32, kSampleK = 16, kBlockQ = 128, kBlockK = 64;
constexpr int kRows = 64;         // sampled query rows per CTA (2 query blocks)
constexpr int kStepKeys = 128;    // sampled keys per step (8 KV blocks)
constexpr int kThreads = 256;

template <int D>
struct Shape {
    static constexpr int kDPad = (D + 15) / 16 * 16;
    static constexpr int kLd = kDPad + 8;  // +16 B: the 8 rows of an ldmatrix hit distinct banks
    static constexpr int kKSteps = kDPad / 16;
    static constexpr int kStageBytes = kStepKeys * kLd * 2;
};

template <int D, typename T>
__device__ __forceinline__ void psa_importance(const PsaImportanceArgs& a) {
    using S = Shape<D>;
    constexpr int LD = S::kLd;
    extern __shared__ __align__(16) uint8_t smem[];
    T* s_k = reinterpret_cast<T*>(smem);                                  // 2 stages x 128 x LD
    float* s_r = reinterpret_cast<float*>(smem + 2 * S::kStageBytes);      // 64 x k_blocks
    const int kb = a.k_blocks;
    float* s_m = s_r + kRows * kb;                                         // 64 row maxima
    float* s_s = s_m + kRows;                                              // k_blocks
    float* s_sum = s_s + kb;                                               // 8 partial sums

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int bh = blockIdx.y;
    const int b = bh / a.heads, h = bh % a.heads;
    const int n = a.n;
    const T* q = reinterpret_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1];
    const T* k = reinterpret_cast<const T*>(a.k) + b * a.k_stride[0] + h * a.k_stride[1];
    const int32_t* q_pos = a.q_pos + bh * kSampleQ;
    const int32_t* k_pos = a.k_pos + bh * kSampleK;
    constexpr int kChunks = D / 8;  // 16-byte chunks per row

    // Pad columns D..kDPad (D = 72) stay zero in both stages: cp.async never writes them.
    if constexpr (S::kDPad > D) {
        for (int r = tid; r < 2 * kStepKeys; r += kThreads)
            for (int c = D; c < S::kDPad; ++c) reinterpret_cast<uint16_t*>(s_k)[r * LD + c] = 0;
    }

    // Sampled query rows into stage 0, then into registers.
    for (int e = tid; e < kRows * kChunks; e += kThreads) {
        const int r = e / kChunks, c = e % kChunks;
        const int qb = blockIdx.x * 2 + r / kSampleQ;
        const int tok = qb < a.q_blocks ? min(qb * kBlockQ + q_pos[r % kSampleQ], n - 1) : n - 1;
        cp_async_16(s_k + r * LD + c * 8, q + tok * a.q_stride[2] + c * 8, 16);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const int row0 = (warp % 4) * 16, half = warp / 4;
    uint32_t qa[S::kKSteps][4];
#pragma unroll
    for (int ks = 0; ks < S::kKSteps; ++ks)
        ldmatrix_x4(qa[ks], s_k + (row0 + lane % 16) * LD + ks * 16 + (lane / 16) * 8);
    __syncthreads();

    // Sampled key c of the head (block-major: block c / 16, sample c % 16).
    auto load_step = [&](int step, int stage) {
        T* dst = s_k + stage * kStepKeys * LD;
        for (int e = tid; e < kStepKeys * kChunks; e += kThreads) {
            const int r = e / kChunks, ch = e % kChunks;
            const int c = step * kStepKeys + r;
            const int j = c / kSampleK;
            const int tok = j < kb ? min(j * kBlockK + k_pos[c % kSampleK], n - 1) : n - 1;
            cp_async_16(dst + r * LD + ch * 8, k + tok * a.k_stride[2] + ch * 8, 16);
        }
        cp_async_commit();
    };

    const int steps = (kb * kSampleK + kStepKeys - 1) / kStepKeys;
    const float scale = a.scale;
    load_step(0, 0);
    for (int step = 0; step < steps; ++step) {
        if (step + 1 < steps) {
            load_step(step + 1, (step + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* sk = s_k + (step & 1) * kStepKeys * LD + half * 64 * LD;
        float acc[8][4];
#pragma unroll
        for (int t = 0; t < 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < S::kKSteps; ++ks) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t bfrag[4];
                const int m = lane / 8;
                ldmatrix_x4(bfrag, sk + (np * 16 + (m / 2) * 8 + lane % 8) * LD + ks * 16 + (m % 2) * 8);
                mma_16816<T>(acc[2 * np], qa[ks], bfrag[0], bfrag[1]);
                mma_16816<T>(acc[2 * np + 1], qa[ks], bfrag[2], bfrag[3]);
            }
        }
        // KV block t of this half: n-tiles 2t, 2t+1; this thread holds rows lane/4 and +8.
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            float lo = fmaxf(fmaxf(acc[2 * t][0] * scale, acc[2 * t][1] * scale),
                             fmaxf(acc[2 * t + 1][0] * scale, acc[2 * t + 1][1] * scale));
            float hi = fmaxf(fmaxf(acc[2 * t][2] * scale, acc[2 * t][3] * scale),
                             fmaxf(acc[2 * t + 1][2] * scale, acc[2 * t + 1][3] * scale));
            lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 1));
            lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 2));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 1));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 2));
            const int j = step * 8 + half * 4 + t;
            if (lane % 4 == t && j < kb) {
                s_r[(row0 + lane / 4) * kb + j] = lo;
                s_r[(row0 + lane / 4 + 8) * kb + j] = hi;
            }
        }
        __syncthreads();  // the stage is refilled next step
    }

    // Row maxima: warp w owns rows 8w .. 8w+7.
    for (int rr = 0; rr < 8; ++rr) {
        const int r = warp * 8 + rr;
        float m = -INFINITY;
        for (int j = lane; j < kb; j += 32) m = fmaxf(m, s_r[r * kb + j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) s_m[r] = m;
    }
    __syncthreads();

    for (int qq = 0; qq < 2; ++qq) {
        const int qb = blockIdx.x * 2 + qq;
        if (qb >= a.q_blocks) break;  // uniform over the CTA
        float part = 0.f;
        for (int j = tid; j < kb; j += kThreads) {
            float s = 0.f;  // every exp is > 0 (the row max is finite)
            for (int r = qq * kSampleQ; r < (qq + 1) * kSampleQ; ++r) s = fmaxf(s, expf(s_r[r * kb + j] - s_m[r]));
            s_s[j] = s;
            part += s;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        if (lane == 0) s_sum[warp] = part;
        __syncthreads();
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < kThreads / 32; ++w) total += s_sum[w];
        float* out = a.imp + ((int64_t)bh * a.q_blocks + qb) * kb;
        for (int j = tid; j < kb; j += kThreads) out[j] = s_s[j] / total;
        __syncthreads();  // s_s and s_sum are reused by the next query block
    }
}

}  // namespace psa_imp

#define PSA_IMPORTANCE_ENTRY(NAME, T, D)                                                                  \
    extern "C" __global__ void __launch_bounds__(psa_imp::kThreads, 1) NAME(const __grid_constant__ PsaImportanceArgs args) { \
        psa_imp::psa_importance<D, T>(args);                                                              \
    }

PSA_IMPORTANCE_ENTRY(psa_importance_bf16_d64, __nv_bfloat16, 64)
PSA_IMPORTANCE_ENTRY(psa_importance_bf16_d72, __nv_bfloat16, 72)
PSA_IMPORTANCE_ENTRY(psa_importance_bf16_d96, __nv_bfloat16, 96)
PSA_IMPORTANCE_ENTRY(psa_importance_bf16_d112, __nv_bfloat16, 112)
PSA_IMPORTANCE_ENTRY(psa_importance_bf16_d128, __nv_bfloat16, 128)
PSA_IMPORTANCE_ENTRY(psa_importance_f16_d64, __half, 64)
PSA_IMPORTANCE_ENTRY(psa_importance_f16_d72, __half, 72)
PSA_IMPORTANCE_ENTRY(psa_importance_f16_d96, __half, 96)
PSA_IMPORTANCE_ENTRY(psa_importance_f16_d112, __half, 112)
PSA_IMPORTANCE_ENTRY(psa_importance_f16_d128, __half, 128)
