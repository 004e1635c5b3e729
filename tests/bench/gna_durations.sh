#!/usr/bin/env bash
# GPU time of each kernel of two `gna::forward_with` calls (the permutation pass and the attention
# kernel) on one bench case, by Nsight Compute's gpu__time_duration with the clocks locked at
# base (--clock-control base): stable to a fraction of a percent, so configurations differing by
# 1-3% can be told apart (end to end, the card's clock under load moves more than that).
# There, with bench_sparse unpacked (gpu_sparse.sh run):
#   bash .gpu/<dir>/gna_durations.sh /tmp/bench_sparse "FLUX-4K 2-D k80 s1" [--in-place] [--always-masked]
set -uo pipefail
bin="$1"; case_name="$2"; shift 2
libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
echo "--- $case_name $*"
timeout 120 ncu --clock-control base --kernel-name regex:gna_ --metrics gpu__time_duration.sum \
    "$bin" --gna-only --case "$case_name" --profile "$@" 2>&1 | grep -E "^  gna_|gpu__time_duration" | paste - - |
    awk '{print $1, $(NF)}'
