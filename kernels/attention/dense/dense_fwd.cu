// Entry points of the dense attention forward kernel: one per (dtype, head dim).
// Name: dense_fwd_{bf16,f16}_d{64,72,96,112,128}; launch: grid (ceil(Nq/128), H, B), 128 threads,
// dynamic shared memory = DENSE_SMEM_BYTES(D) (over 48 KB: the launcher raises the limit).
#include "dense_fwd.cuh"

#define DENSE_ENTRY(NAME, T, D)                                                                \
    extern "C" __global__ void __launch_bounds__(dense::Tile<D>::kThreads, 2)                  \
        NAME(const __grid_constant__ DenseFwdArgs args) {                                      \
        dense::dense_fwd<D, T>(args);                                                          \
    }

DENSE_ENTRY(dense_fwd_bf16_d64, __nv_bfloat16, 64)
DENSE_ENTRY(dense_fwd_bf16_d72, __nv_bfloat16, 72)
DENSE_ENTRY(dense_fwd_bf16_d96, __nv_bfloat16, 96)
DENSE_ENTRY(dense_fwd_bf16_d112, __nv_bfloat16, 112)
DENSE_ENTRY(dense_fwd_bf16_d128, __nv_bfloat16, 128)
DENSE_ENTRY(dense_fwd_f16_d64, __half, 64)
DENSE_ENTRY(dense_fwd_f16_d72, __half, 72)
DENSE_ENTRY(dense_fwd_f16_d96, __half, 96)
DENSE_ENTRY(dense_fwd_f16_d112, __half, 112)
DENSE_ENTRY(dense_fwd_f16_d128, __half, 128)
