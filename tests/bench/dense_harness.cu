// Standalone check + timing of the dense attention kernel, without the Rust crate:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I kernels/attention/dense \
//        tests/bench/dense_harness.cu -o dense_harness && ./dense_harness
// Parity: against a naive f32 kernel (fp32 scores, softmax, PV from the same bf16/f16 inputs), and
// against a naive kernel that rounds S, P and O to the input dtype like an eager bf16 implementation;
// ours must be within 2x of that naive error (+1e-6). Timing: CUDA events, median of 30 after warm-up.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dense_fwd.cuh"
#include "dense_fwd_wgmma.cuh"

#define CK(x)                                                                                   \
    do {                                                                                        \
        cudaError_t e = (x);                                                                    \
        if (e != cudaSuccess) {                                                                 \
            printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);     \
            exit(1);                                                                            \
        }                                                                                       \
    } while (0)

template <int D, typename T>
__global__ void __launch_bounds__(128, 2) fwd_kernel(const __grid_constant__ DenseFwdArgs a) {
    dense::dense_fwd<D, T>(a);
}

template <int D, typename T, int C>
__global__ void __launch_bounds__(dense_wgmma::Tile<D, C>::kThreads, 1) fwd_wgmma_kernel(const __grid_constant__ DenseTmaArgs a) {
    dense_wgmma::dense_fwd<D, T, C>(a);
}

// 4-D tensor map (D, N, H, B) over a (B, H, N, D) tensor with these element strides (row, head,
// batch), box (64, 128, 1, 1), 128-byte swizzle, zero fill out of bounds.
typedef CUresult (*EncodeTiled)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static CUtensorMap make_map(const void* ptr, bool bf16, int D, int N, int H, int B, const int64_t (&st)[3]) {
    static EncodeTiled encode = nullptr;
    if (!encode) {
        cudaDriverEntryPointQueryResult q;
        CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void**)&encode, 12000, cudaEnableDefault, &q));
    }
    CUtensorMap m;
    memset(&m, 0, sizeof(m));
    if (ptr == nullptr || N == 0) return m;  // unused (no extra tokens)
    cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)N, (cuuint64_t)H, (cuuint64_t)B};
    cuuint64_t strides[3] = {(cuuint64_t)st[2] * 2, (cuuint64_t)st[1] * 2, (cuuint64_t)st[0] * 2};
    cuuint32_t box[4] = {64, 128, 1, 1}, estr[4] = {1, 1, 1, 1};
    CUresult r = encode(&m, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, (void*)ptr, dims,
                        strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("cuTensorMapEncodeTiled failed: %d\n", (int)r); exit(1); }
    return m;
}

static int g_c64 = 3;  // consumer warpgroups of the D = 64 wgmma kernel (A/B: 2 or 3)
static bool g_wgmma = false;  // which kernel launch_d runs: mma.sync (dense_fwd.cuh) or wgmma + TMA

template <typename T> __device__ float to_f(T x);
template <> __device__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ float to_f<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ float round_t(float x);
template <> __device__ float round_t<__nv_bfloat16>(float x) { return __bfloat162float(__float2bfloat16(x)); }
template <> __device__ float round_t<__half>(float x) { return __half2float(__float2half(x)); }

// One block per (row, h, b). LOWP: round S, P, O to T like an eager low-precision implementation.
template <typename T, bool LOWP>
__global__ void naive_kernel(DenseFwdArgs a, int D, float scale, float* out, float* lse_out) {
    extern __shared__ float sc[];  // nk + n_extra scores
    __shared__ float red[32];
    const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
    const int n = a.nk + a.n_extra;
    const T* q = (const T*)a.q + b * a.q_stride[0] + h * a.q_stride[1] + row * a.q_stride[2];
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const bool extra = j >= a.nk;
        const int jj = extra ? j - a.nk : j;
        const T* k = extra ? (const T*)a.k2 + b * a.k2_stride[0] + h * a.k2_stride[1] + jj * a.k2_stride[2]
                           : (const T*)a.k + b * a.k_stride[0] + h * a.k_stride[1] + jj * a.k_stride[2];
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += to_f<T>(q[d]) * to_f<T>(k[d]);
        if (LOWP) s = round_t<T>(round_t<T>(s) * scale); else s *= scale;
        if (!extra && a.key_mask && a.key_mask[b * a.mask_stride + jj] == 0) s = -INFINITY;
        sc[j] = s;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, sc[j]);
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (int w = 0; w < blockDim.x / 32; ++w) mx = fmaxf(mx, red[w]);
    __syncthreads();
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float p = mx == -INFINITY ? 0.f : expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.f;
    for (int w = 0; w < blockDim.x / 32; ++w) sum += red[w];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; ++j) {
            const bool extra = j >= a.nk;
            const int jj = extra ? j - a.nk : j;
            const T* v = extra ? (const T*)a.v2 + b * a.v2_stride[0] + h * a.v2_stride[1] + jj * a.v2_stride[2]
                               : (const T*)a.v + b * a.v_stride[0] + h * a.v_stride[1] + jj * a.v_stride[2];
            float p = sc[j] * inv;
            if (LOWP) p = round_t<T>(p);
            acc += p * to_f<T>(v[d]);
        }
        if (LOWP) acc = round_t<T>(acc);
        out[(((int64_t)b * H + h) * a.nq + row) * D + d] = acc;
    }
    if (threadIdx.x == 0) lse_out[((int64_t)b * H + h) * a.nq + row] = sum > 0.f ? logf(sum) + mx : -INFINITY;
}

template <typename T>
__global__ void to_float(const T* x, float* y, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] = to_f<T>(x[i]);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float randn() {
    auto u = [] {
        rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
        return ((rng_state >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    };
    return (float)(sqrt(-2.0 * log(u())) * cos(6.283185307179586 * u()));
}

template <typename T> T from_f(float x);
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __half from_f<__half>(float x) { return __float2half(x); }

struct Shape { int B, H, Nq, Nk, Ne, D; bool mask; };

template <typename T>
static T* upload_random(size_t n, float std) {
    std::vector<T> h(n);
    for (auto& x : h) x = from_f<T>(randn() * std);
    T* d; CK(cudaMalloc(&d, n * sizeof(T)));
    CK(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

template <int D, typename T>
static void launch(const DenseFwdArgs& a, int B, int H, cudaStream_t st = 0) {
    constexpr int smem = dense::smem_bytes<D, T>();
    static bool init = false;
    if (!init) { CK(cudaFuncSetAttribute(fwd_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)); init = true; }
    dim3 grid((a.nq + 127) / 128, H, B);
    fwd_kernel<D, T><<<grid, 128, smem, st>>>(a);
    CK(cudaGetLastError());
}

template <int D, typename T, int C = dense_wgmma::default_consumers(D)>
static void launch_wgmma(const DenseFwdArgs& a, int B, int H) {
    using L = dense_wgmma::Tile<D, C>;
    constexpr int smem = L::kSmemBytes;
    static bool init = false;
    if (!init) { CK(cudaFuncSetAttribute(fwd_wgmma_kernel<D, T, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)); init = true; }
    constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
    DenseTmaArgs t;
    t.q = make_map(a.q, bf16, D, a.nq, H, B, a.q_stride);
    t.k = make_map(a.k, bf16, D, a.nk, H, B, a.k_stride);
    t.v = make_map(a.v, bf16, D, a.nk, H, B, a.v_stride);
    t.k2 = make_map(a.k2, bf16, D, a.n_extra, H, B, a.k2_stride);
    t.v2 = make_map(a.v2, bf16, D, a.n_extra, H, B, a.v2_stride);
    t.base = a;
    dim3 grid((a.nq + L::kBlockM - 1) / L::kBlockM, H, B);
    fwd_wgmma_kernel<D, T, C><<<grid, L::kThreads, smem>>>(t);
    CK(cudaGetLastError());
}

template <typename T>
static void launch_d(int D, const DenseFwdArgs& a, int B, int H) {
    if (g_wgmma && D == 64 && g_c64 == 2) { launch_wgmma<64, T, 2>(a, B, H); return; }
    if (g_wgmma && D == 64) { launch_wgmma<64, T>(a, B, H); return; }
    if (g_wgmma && D == 72) { launch_wgmma<72, T>(a, B, H); return; }
    if (g_wgmma && D == 96) { launch_wgmma<96, T>(a, B, H); return; }
    if (g_wgmma && D == 112) { launch_wgmma<112, T>(a, B, H); return; }
    if (g_wgmma && D == 128) { launch_wgmma<128, T>(a, B, H); return; }
    switch (D) {
        case 64: launch<64, T>(a, B, H); break;
        case 72: launch<72, T>(a, B, H); break;
        case 96: launch<96, T>(a, B, H); break;
        case 112: launch<112, T>(a, B, H); break;
        case 128: launch<128, T>(a, B, H); break;
        default: printf("bad D\n"); exit(1);
    }
}

static void set_strides(int64_t (&s)[3], int H, int N, int D) { s[0] = (int64_t)H * N * D; s[1] = (int64_t)N * D; s[2] = D; }

template <typename T>
static DenseFwdArgs make_args(const Shape& s, T** bufs, uint8_t** mask) {
    const size_t nq = (size_t)s.B * s.H * s.Nq * s.D, nk = (size_t)s.B * s.H * s.Nk * s.D, ne = (size_t)s.B * s.H * s.Ne * s.D;
    DenseFwdArgs a{};
    bufs[0] = upload_random<T>(nq, 1.0f);
    bufs[1] = upload_random<T>(nk, 1.0f);
    bufs[2] = upload_random<T>(nk, 1.0f);
    bufs[3] = s.Ne ? upload_random<T>(ne, 1.0f) : nullptr;
    bufs[4] = s.Ne ? upload_random<T>(ne, 1.0f) : nullptr;
    CK(cudaMalloc(&bufs[5], nq * sizeof(T)));
    a.q = bufs[0]; a.k = bufs[1]; a.v = bufs[2]; a.k2 = bufs[3]; a.v2 = bufs[4]; a.o = bufs[5];
    set_strides(a.q_stride, s.H, s.Nq, s.D); set_strides(a.o_stride, s.H, s.Nq, s.D);
    set_strides(a.k_stride, s.H, s.Nk, s.D); set_strides(a.v_stride, s.H, s.Nk, s.D);
    set_strides(a.k2_stride, s.H, s.Ne, s.D); set_strides(a.v2_stride, s.H, s.Ne, s.D);
    CK(cudaMalloc(&a.lse, (size_t)s.B * s.H * s.Nq * sizeof(float)));
    a.lse_stride[0] = (int64_t)s.H * s.Nq; a.lse_stride[1] = s.Nq;
    a.nq = s.Nq; a.nk = s.Nk; a.n_extra = s.Ne;
    a.scale_log2 = (float)(1.0 / sqrt((double)s.D) * 1.4426950408889634);
    *mask = nullptr;
    if (s.mask) {
        // Batch b keeps its first Nk - 7*b - 3 keys plus every 5th key after that (never all masked).
        std::vector<uint8_t> m((size_t)s.B * s.Nk);
        for (int b = 0; b < s.B; ++b)
            for (int j = 0; j < s.Nk; ++j) m[(size_t)b * s.Nk + j] = (j < s.Nk - 7 * b - 3 || j % 5 == 0) ? 1 : 0;
        CK(cudaMalloc(mask, m.size()));
        CK(cudaMemcpy(*mask, m.data(), m.size(), cudaMemcpyHostToDevice));
        a.key_mask = *mask; a.mask_stride = s.Nk;
    }
    return a;
}

template <typename T>
static bool check(const Shape& s, const char* tname) {
    T* bufs[6]; uint8_t* mask;
    DenseFwdArgs a = make_args<T>(s, bufs, &mask);
    const size_t n_out = (size_t)s.B * s.H * s.Nq * s.D, n_rows = (size_t)s.B * s.H * s.Nq;
    CK(cudaMemset(a.o, 0xFF, n_out * sizeof(T)));   // NaN poison
    CK(cudaMemset(a.lse, 0xFF, n_rows * sizeof(float)));
    launch_d<T>(s.D, a, s.B, s.H);
    CK(cudaDeviceSynchronize());
    float *ref, *ref_lse, *low, *low_lse, *ours;
    CK(cudaMalloc(&ref, n_out * 4)); CK(cudaMalloc(&low, n_out * 4)); CK(cudaMalloc(&ours, n_out * 4));
    CK(cudaMalloc(&ref_lse, n_rows * 4)); CK(cudaMalloc(&low_lse, n_rows * 4));
    const float scale = 1.f / sqrtf((float)s.D);
    const size_t sm = (size_t)(s.Nk + s.Ne) * 4;
    dim3 g(s.Nq, s.H, s.B);
    naive_kernel<T, false><<<g, 128, sm>>>(a, s.D, scale, ref, ref_lse);
    naive_kernel<T, true><<<g, 128, sm>>>(a, s.D, scale, low, low_lse);
    to_float<T><<<(n_out + 255) / 256, 256>>>((const T*)a.o, ours, n_out);
    CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    std::vector<float> hr(n_out), hl(n_out), ho(n_out), hrl(n_rows), hol(n_rows);
    CK(cudaMemcpy(hr.data(), ref, n_out * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hl.data(), low, n_out * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(ho.data(), ours, n_out * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hrl.data(), ref_lse, n_rows * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hol.data(), a.lse, n_rows * 4, cudaMemcpyDeviceToHost));
    double e_ours = 0, e_low = 0, nref = 0, max_ours = 0, max_low = 0, lse_err = 0;
    size_t nan = 0;
    for (size_t i = 0; i < n_out; ++i) {
        if (!std::isfinite(ho[i])) ++nan;
        const double d1 = ho[i] - hr[i], d2 = hl[i] - hr[i];
        e_ours += d1 * d1; e_low += d2 * d2; nref += (double)hr[i] * hr[i];
        max_ours = std::max(max_ours, fabs(d1)); max_low = std::max(max_low, fabs(d2));
    }
    for (size_t i = 0; i < n_rows; ++i) {
        if (!std::isfinite(hol[i])) ++nan;
        lse_err = std::max(lse_err, (double)fabs(hol[i] - hrl[i]));
    }
    const double rel_ours = sqrt(e_ours / nref), rel_low = sqrt(e_low / nref);
    const bool ok = nan == 0 && rel_ours <= 2 * rel_low + 1e-6 && max_ours <= 2 * max_low + 1e-6 && lse_err < 1e-3;
    printf("%s%s %-4s B%d H%d Nq%-5d Nk%-5d Ne%-4d D%-3d mask%d | rel %.2e (naive %.2e) max %.2e (naive %.2e) lse %.1e nan %zu %s\n",
           g_wgmma ? "wgmma" : "mma  ", (g_wgmma && s.D == 64) ? (g_c64 == 2 ? "/c2" : "/c3") : "   ", tname, s.B, s.H, s.Nq, s.Nk, s.Ne, s.D, (int)s.mask, rel_ours, rel_low, max_ours, max_low, lse_err, nan,
           ok ? "ok" : "FAIL");
    for (auto p : bufs) if (p) CK(cudaFree(p));
    if (mask) CK(cudaFree(mask));
    CK(cudaFree(a.lse)); CK(cudaFree(ref)); CK(cudaFree(low)); CK(cudaFree(ours)); CK(cudaFree(ref_lse)); CK(cudaFree(low_lse));
    return ok;
}

static double bench(const Shape& s) {
    __nv_bfloat16* bufs[6]; uint8_t* mask;
    DenseFwdArgs a = make_args<__nv_bfloat16>(s, bufs, &mask);
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    for (int i = 0; i < 5; ++i) launch_d<__nv_bfloat16>(s.D, a, s.B, s.H);
    std::vector<float> ts;
    for (int i = 0; i < 30; ++i) {
        CK(cudaEventRecord(e0));
        launch_d<__nv_bfloat16>(s.D, a, s.B, s.H);
        CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    const double ms = ts[ts.size() / 2];
    const double tflops = 4.0 * s.B * s.H * (double)s.Nq * s.Nk * s.D / (ms * 1e-3) / 1e12;
    printf("bench %s%s B%d H%d N%d D%d: %.3f ms  %.0f TFLOP/s\n", g_wgmma ? "wgmma" : "mma", (g_wgmma && s.D == 64) ? (g_c64 == 2 ? "/c2" : "/c3") : "", s.B, s.H, s.Nq, s.D, ms, tflops);
    for (auto p : bufs) if (p) CK(cudaFree(p));
    return ms;
}

int main(int argc, char** argv) {
    if (argc >= 2 && strcmp(argv[1], "focus") == 0) {  // a ragged main tile followed by more tiles
        const Shape shapes[] = {{2, 2, 190, 300, 45, 64, false}, {1, 2, 190, 300, 45, 64, false},
                                {1, 2, 190, 300, 0, 64, false},  {1, 2, 190, 200, 45, 64, false},
                                {2, 2, 190, 300, 45, 128, false}, {1, 2, 190, 300, 45, 96, false},
                                {1, 2, 190, 100, 300, 64, false}, {1, 2, 190, 600, 0, 64, false}};
        int fails = 0;
        g_wgmma = true;
        for (const auto& s : shapes) {
            fails += !check<__nv_bfloat16>(s, "bf16");
            if (s.D == 64) { g_c64 = 2; fails += !check<__nv_bfloat16>(s, "bf16"); g_c64 = 3; }
        }
        printf("focus: %d failures\n", fails);
        return 0;
    }
    const bool do_check = argc < 2 || strcmp(argv[1], "bench") != 0;
    const bool do_bench = argc < 2 || strcmp(argv[1], "check") != 0;
    int fails = 0;
    if (do_check) {
        const Shape shapes[] = {
            {1, 2, 128, 128, 0, 64, false}, {2, 3, 200, 77, 0, 64, true},    {1, 2, 333, 129, 0, 72, true},
            {2, 2, 250, 300, 0, 72, false}, {1, 3, 127, 255, 0, 96, false},  {2, 2, 64, 300, 0, 96, true},
            {1, 2, 301, 190, 0, 112, true}, {1, 2, 513, 1000, 0, 112, false}, {1, 2, 257, 257, 0, 128, false},
            {2, 2, 190, 100, 45, 128, true}, {1, 2, 300, 512, 33, 64, false}, {1, 1, 17, 5, 0, 128, false},
            {1, 2, 100, 0, 70, 96, false},  {2, 4, 1024, 1024, 0, 128, false}, {1, 2, 129, 31, 77, 72, true},
        };
        for (int w = 0; w < 2; ++w) {
            g_wgmma = w == 1;
            for (const auto& s : shapes) {
                fails += !check<__nv_bfloat16>(s, "bf16");
                fails += !check<__half>(s, "f16");
                if (g_wgmma && s.D == 64) {  // the 2-consumer variant of D = 64 too
                    g_c64 = 2;
                    fails += !check<__nv_bfloat16>(s, "bf16");
                    fails += !check<__half>(s, "f16");
                    g_c64 = 3;
                }
            }
        }
        printf("parity: %d failures\n", fails);
    }
    if (do_bench) {
        const Shape shapes[] = {{1, 24, 4608, 4608, 0, 128, false}, {1, 24, 16896, 16896, 0, 128, false},
                                {1, 20, 32760, 32760, 0, 112, false}, {2, 16, 8192, 8192, 0, 64, false}};
        for (int w = 0; w < 2; ++w) {
            g_wgmma = w == 1;
            for (const auto& s : shapes) {
                bench(s);
                if (g_wgmma && s.D == 64) { g_c64 = 2; bench(s); g_c64 = 3; }
            }
        }
    }
    return fails ? 1 : 0;
}
