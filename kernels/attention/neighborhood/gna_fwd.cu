// Entry points of the GNA forward (see gna_fwd.cuh):
//   gna_fwd_{bf16,f16}_d{64,72,96,112,128}: grid (query tiles, H, B), 384 threads (producer + 2
//     consumer warpgroups), dynamic shared memory dense_wgmma::Tile<D, 2>::kSmemBytes; GnaArgs.
//   gna_permute: grid (ceil(n_pad * D/8 / 256), B*H, 3), 256 threads; GnaPermuteArgs (16-bit
//     elements, any dtype of that width).
#include "gna_fwd.cuh"

#define GNA_ENTRY(NAME, T, D)                                                                               \
    extern "C" __global__ void __launch_bounds__(dense_wgmma::Tile<D, 2>::kThreads, 1) NAME(const __grid_constant__ GnaArgs args) { \
        gna::gna_fwd<D, T>(args);                                                                           \
    }

GNA_ENTRY(gna_fwd_bf16_d64, __nv_bfloat16, 64)
GNA_ENTRY(gna_fwd_bf16_d72, __nv_bfloat16, 72)
GNA_ENTRY(gna_fwd_bf16_d96, __nv_bfloat16, 96)
GNA_ENTRY(gna_fwd_bf16_d112, __nv_bfloat16, 112)
GNA_ENTRY(gna_fwd_bf16_d128, __nv_bfloat16, 128)
GNA_ENTRY(gna_fwd_f16_d64, __half, 64)
GNA_ENTRY(gna_fwd_f16_d72, __half, 72)
GNA_ENTRY(gna_fwd_f16_d96, __half, 96)
GNA_ENTRY(gna_fwd_f16_d112, __half, 112)
GNA_ENTRY(gna_fwd_f16_d128, __half, 128)

extern "C" __global__ void __launch_bounds__(256) gna_permute_16bit(const __grid_constant__ GnaPermuteArgs args) {
    gna_permute(args);
}
