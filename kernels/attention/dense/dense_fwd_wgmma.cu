// Entry points of the Hopper (wgmma + TMA) dense attention forward:
// dense_fwd_wgmma_{bf16,f16}_d{64,72,96,112,128}.
// Launch: grid (ceil(Nq / kBlockM), H, B), kThreads = 128 x (1 producer + C consumer warpgroups)
// threads, kBlockM = 64 C query rows (C = 3 for D = 64, else 2), dynamic shared memory =
// dense_wgmma::Tile<D>::kSmemBytes (over 48 KB: the launcher raises the limit). Arguments: DenseTmaArgs (tensor maps + the DenseFwdArgs of
// dense_fwd.cu).
#include "dense_fwd_wgmma.cuh"

#define DENSE_WGMMA_ENTRY(NAME, T, D)                                                          \
    extern "C" __global__ void __launch_bounds__(dense_wgmma::Tile<D>::kThreads, 1) NAME(const __grid_constant__ DenseTmaArgs args) { \
        dense_wgmma::dense_fwd<D, T>(args);                                                    \
    }

DENSE_WGMMA_ENTRY(dense_fwd_wgmma_bf16_d64, __nv_bfloat16, 64)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_bf16_d72, __nv_bfloat16, 72)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_bf16_d96, __nv_bfloat16, 96)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_bf16_d112, __nv_bfloat16, 112)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_bf16_d128, __nv_bfloat16, 128)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_f16_d64, __half, 64)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_f16_d72, __half, 72)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_f16_d96, __half, 96)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_f16_d112, __half, 112)
DENSE_WGMMA_ENTRY(dense_fwd_wgmma_f16_d128, __half, 128)
