//! `gen bench`: attention micro-benchmarks and device checks. (Filled in by the CUDA work.)
