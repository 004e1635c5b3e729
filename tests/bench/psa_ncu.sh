#!/usr/bin/env bash
# Nsight Compute on the two PSA kernels (psa_importance_tc, psa_fwd) at the SANA-Video 480p shape
# (B1 H20 N32760 D112 bf16, PSA defaults), one ncu run per kernel (--set full, source-level stall
# sampling), the second of two `psa::forward` calls (`bench_sparse --psa-only --profile`).
# $OUT gets ncu_<kernel>.out and details_<kernel>.txt; the summary (with the top 60 SASS
# instructions by stall samples, ncu_stalls.py) goes to stdout.
# Here: pack with `PSA_ONLY=1 bash tests/bench/gpu_sparse.sh pack`, then copy this script and
# tests/bench/ncu_stalls.py next to the packed files. There (after `gpu_sparse.sh run`, which
# unpacks bench_sparse to /tmp): `bash .gpu/<branch>/psa_ncu.sh`. Text reports go to $OUT.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
if [ ! -x /tmp/bench_sparse ]; then
  python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$here/bench_sparse.xz" /tmp/bench_sparse
  chmod +x /tmp/bench_sparse
fi
ncu --version | tail -1
for k in psa_importance_tc psa_fwd_bf16; do
  t0=$(date +%s)
  timeout 100 ncu --clock-control none --kernel-name regex:$k --launch-skip 1 --launch-count 1 --set full \
     --import-source no -f -o /tmp/$k /tmp/bench_sparse --psa-only --profile > "$OUT/ncu_$k.out" 2>&1
  echo "== $k ncu rc $? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/ncu_$k.out"
  ncu -i /tmp/$k.ncu-rep --page details > "$OUT/details_$k.txt" 2>&1
  ncu -i /tmp/$k.ncu-rep --page raw --csv 2>/dev/null | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
if len(rows) >= 3:
    for name, unit, val in zip(rows[0], rows[1], rows[2]):
        if any(w in name for w in ("gmma", "tensor", "dram__bytes", "lts__t_bytes.sum", "sm__cycles_active.avg", "gpu__time_duration", "smsp__inst_executed.sum", "launch__", "l1tex__data_bank_conflicts", "smsp__warp_issue_stalled")):
            print(f"{name} [{unit}] {val}")' > "/tmp/raw_$k.txt" 2>&1
  ncu -i /tmp/$k.ncu-rep --page source --csv --print-source sass > /tmp/src_$k.csv 2>/tmp/src_$k.err
  python3 "$here/ncu_stalls.py" /tmp/src_$k.csv > "/tmp/stalls_$k.txt" 2>&1
done
echo "=== summary"
for k in psa_importance_tc psa_fwd_bf16; do
  echo "--- $k"
  grep -E "Duration|Elapsed Cycles|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|L2 Hit Rate|DRAM Throughput|Local|Spill|Compute \(SM\) Throughput|Memory Throughput|No Eligible|Active Warps Per|Eligible Warps|Waves Per SM" "$OUT/details_$k.txt" | head -30
  grep -iE "gmma|tensor" "/tmp/raw_$k.txt" | grep -v dmma | head -12
  grep -v "^columns:" "/tmp/stalls_$k.txt" | head -90
done
