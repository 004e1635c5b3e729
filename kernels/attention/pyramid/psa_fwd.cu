// Entry points of pyramid sparse attention (see psa_fwd.cuh):
//   psa_fwd_{bf16,f16}_d{64,72,96,112,128}: grid (q_blocks, H, B), 384 threads, dynamic shared
//     memory dense_wgmma::Tile<D, 2>::kSmemBytes; PsaArgs.
//   psa_pool_{bf16,f16}: grid (ceil(n_pad / 8 * D / 8 / 256), B*H, 2), 256 threads; PsaPoolArgs.
#include "psa_fwd.cuh"

#define PSA_ENTRY(NAME, T, D)                                                                               \
    extern "C" __global__ void __launch_bounds__(dense_wgmma::Tile<D, 2>::kThreads, 1) NAME(const __grid_constant__ PsaArgs args) { \
        psa::psa_fwd<D, T>(args);                                                                           \
    }

PSA_ENTRY(psa_fwd_bf16_d64, __nv_bfloat16, 64)
PSA_ENTRY(psa_fwd_bf16_d72, __nv_bfloat16, 72)
PSA_ENTRY(psa_fwd_bf16_d96, __nv_bfloat16, 96)
PSA_ENTRY(psa_fwd_bf16_d112, __nv_bfloat16, 112)
PSA_ENTRY(psa_fwd_bf16_d128, __nv_bfloat16, 128)
PSA_ENTRY(psa_fwd_f16_d64, __half, 64)
PSA_ENTRY(psa_fwd_f16_d72, __half, 72)
PSA_ENTRY(psa_fwd_f16_d96, __half, 96)
PSA_ENTRY(psa_fwd_f16_d112, __half, 112)
PSA_ENTRY(psa_fwd_f16_d128, __half, 128)

extern "C" __global__ void __launch_bounds__(256) psa_pool_bf16(const __grid_constant__ PsaPoolArgs args) {
    psa_pool<__nv_bfloat16>(args);
}
extern "C" __global__ void __launch_bounds__(256) psa_pool_f16(const __grid_constant__ PsaPoolArgs args) {
    psa_pool<__half>(args);
}
