#!/usr/bin/env bash
# One device call: ncu (--set full, source-level stall sampling) on the GNA kernel, stride-1 and stride-16 cases.
# Here: copy bench_sparse (stripped, xz) and tests/bench/ncu_stalls.py next to this script in .gpu/<branch>/.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$here/bench_sparse.xz" /tmp/bench_sparse
chmod +x /tmp/bench_sparse
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
ncu --version | tail -1
for c in s1 s16; do
  name="FLUX-4K 2-D k80 $c"
  t0=$(date +%s)
  timeout 70 ncu --clock-control none --kernel-name regex:gna_fwd --launch-skip 1 --launch-count 1 --set full \
     --import-source no -f -o /tmp/$c /tmp/bench_sparse --case "$name" --profile > "$OUT/ncu_$c.out" 2>&1
  echo "== $c ncu rc $? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/ncu_$c.out"
  ncu -i /tmp/$c.ncu-rep --page details > "$OUT/details_$c.txt" 2>&1
  ncu -i /tmp/$c.ncu-rep --page source --csv --print-source sass > /tmp/src_$c.csv 2>"$OUT/src_$c.err"
  python3 "$here/ncu_stalls.py" /tmp/src_$c.csv > "$OUT/stalls_$c.txt" 2>&1
  ls -la /tmp/$c.ncu-rep /tmp/src_$c.csv
  xz -T8 -3 -c /tmp/src_$c.csv > "$OUT/src_$c.csv.xz"
done
echo "=== summary"
for c in s1 s16; do echo "--- $c"; grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|L2 Hit Rate|Local|Spill|Compute \(SM\) Throughput|Memory Throughput|No Eligible|Active Warps Per|Eligible Warps" "$OUT/details_$c.txt" | head -30; head -45 "$OUT/stalls_$c.txt"; done
