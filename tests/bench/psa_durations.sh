#!/usr/bin/env bash
# GPU time of each kernel of two `psa::forward` calls (gather, importance, pool, attention) at
# the SANA-Video 480p shape, by Nsight Compute's gpu__time_duration (kernels serialized, clocks
# not locked): what the bench's CUDA-event totals hold besides kernel time (host latency).
# There, after `gpu_sparse.sh run` (bench_sparse unpacked in /tmp): bash .gpu/<dir>/psa_durations.sh
set -uo pipefail
libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
timeout 120 ncu --clock-control none --kernel-name regex:psa_ --metrics gpu__time_duration.sum \
    /tmp/bench_sparse --psa-only --profile 2>&1 | grep -E "^  psa_|gpu__time_duration" | paste - - |
    awk '{print $1, $(NF)}'
