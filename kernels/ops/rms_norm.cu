// RMSNorm over the channels of an NCHW tensor: the kernels of rms_norm.cuh (see there).

#include "rms_norm.cuh"

#define RMS_NORM_KERNEL(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(rms_norm::THREADS)                                     \
        NAME(const T* x, const float* weight, const float* bias, T* y, rms_norm::Layout L) {            \
        rms_norm::channels<T>(x, weight, bias, nullptr, y, L);                                          \
    }

RMS_NORM_KERNEL(rms_norm_channels_bf16, __nv_bfloat16)
RMS_NORM_KERNEL(rms_norm_channels_f16, __half)
RMS_NORM_KERNEL(rms_norm_channels_f32, float)
