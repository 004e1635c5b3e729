//! Our CUDA kernels, compiled by kernels/build.rs and embedded in the binary. (Filled in by the CUDA work.)
