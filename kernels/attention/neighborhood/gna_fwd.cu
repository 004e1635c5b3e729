// Entry points of the GNA forward (see gna_fwd.cuh):
//   gna_fwd_{bf16,f16}_d{64,72,96,112,128}: grid (CTAs), each CTA running its work items (see
//     WorkItems), 384 threads (producer + 2 consumer warpgroups), dynamic shared memory
//     dense_wgmma::Tile<D, 2>::kSmemBytes; GnaArgs.
//   gna_fwd_full_*: the same for lists without PARTIAL tiles or a ragged extra tile (no masking).
//   gna_permute: grid (ceil(n_pad * D/8 / (256 * kPermutePieces)), B*H, tensors), 256 threads;
//     GnaPermuteArgs (16-bit elements, any dtype of that width).
#include "gna_fwd.cuh"

#define GNA_ENTRY(NAME, T, D, MASKED)                                                                       \
    extern "C" __global__ void __launch_bounds__(dense_wgmma::Tile<D, 2>::kThreads, 1) NAME(const __grid_constant__ GnaArgs args) { \
        gna::gna_fwd<D, T, MASKED>(args);                                                                   \
    }
#define GNA_ENTRIES(D)                                                        \
    GNA_ENTRY(gna_fwd_bf16_d##D, __nv_bfloat16, D, true)                      \
    GNA_ENTRY(gna_fwd_f16_d##D, __half, D, true)                              \
    GNA_ENTRY(gna_fwd_full_bf16_d##D, __nv_bfloat16, D, false)                \
    GNA_ENTRY(gna_fwd_full_f16_d##D, __half, D, false)

GNA_ENTRIES(64)
GNA_ENTRIES(72)
GNA_ENTRIES(96)
GNA_ENTRIES(112)
GNA_ENTRIES(128)

extern "C" __global__ void __launch_bounds__(256) gna_permute_16bit(const __grid_constant__ GnaPermuteArgs args) {
    gna_permute(args);
}
