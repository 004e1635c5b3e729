#!/usr/bin/env bash
# One device call: Nsight Compute (--set full, per-SASS stall sampling) on the GNA kernel and on
# our dense kernel for the same inputs, per PROFILES entry "case suffix:kernel regex" (default:
# the FLUX-4K s16 and s1 cases, GNA and dense on s16).
# Here: copy bench_sparse (stripped, xz), this script and tests/bench/ncu_stalls.py into .gpu/<dir>/.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
PROFILES="${PROFILES:-s16:gna_fwd s16:dense_fwd s1:gna_fwd}"
libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$here/bench_sparse.xz" /tmp/bench_sparse
chmod +x /tmp/bench_sparse
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
ncu --version | tail -1
for spec in $PROFILES; do
  c="${spec%%:*}"; kernel="${spec#*:}"; tag="${c}_${kernel}"
  t0=$(date +%s)
  timeout 120 ncu --clock-control none --kernel-name "regex:$kernel" --launch-skip 1 --launch-count 1 --set full \
     --import-source no -f -o "/tmp/$tag" /tmp/bench_sparse --case "FLUX-4K 2-D k80 $c" --profile > "/tmp/ncu_$tag.out" 2>&1
  echo "== $tag ncu rc $? in $(( $(date +%s) - t0 )) s"; tail -2 "/tmp/ncu_$tag.out"
  ncu -i "/tmp/$tag.ncu-rep" --page details > "$OUT/details_$tag.txt" 2>&1
  ncu -i "/tmp/$tag.ncu-rep" --page source --csv --print-source sass > "/tmp/src_$tag.csv" 2>/dev/null
  python3 "$here/ncu_stalls.py" "/tmp/src_$tag.csv" > "$OUT/stalls_$tag.txt" 2>&1
done
echo "=== summary"
for spec in $PROFILES; do
  tag="${spec%%:*}_${spec#*:}"; echo "--- $tag"
  grep -E "Duration|SM Frequency|Registers Per|Issue Slots Busy|Executed Ipc A|L2 Hit Rate|Spill|Compute \(SM\) Throughput|DRAM Throughput|No Eligible|Eligible Warps|Warp Cycles Per Issued" "$OUT/details_$tag.txt" | head -16
  head -30 "$OUT/stalls_$tag.txt"
done
