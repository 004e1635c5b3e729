#!/usr/bin/env bash
# Runs on the H200 (device tool), from the repository root, with the folder of this script carried:
#   bash .gpu/linear/gpu_linear.sh      (the folder holds this script, linear_baseline.py and the
#                                        xz-compressed test binaries cuda_linear*.xz)
# Prints the GPU, then the parity tests, the bench (gen bench's CUDA cases) and the eager-PyTorch
# baseline on the same shapes. Everything also goes to $OUT/linear.log.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG="${OUT:-/tmp}/linear.log"
libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' \
  -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
{
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
for f in "$HERE"/*.xz; do
  dst="/tmp/$(basename "${f%.xz}")"
  if command -v xz >/dev/null; then xz -dc "$f" > "$dst"; else python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "$dst"; fi
  chmod +x "$dst"
done
for t in /tmp/cuda_linear*; do
  echo "=== $t: parity tests"
  "$t" --test-threads 4 --nocapture 2>&1 | grep -vE '^test .* \.\.\. ok$'
done
echo "=== bench (gen bench --device cuda)"
BENCH_ITERS=${BENCH_ITERS:-30} /tmp/cuda_linear --ignored --nocapture --exact bench 2>&1
echo "=== eager PyTorch baseline"
PYTHONUNBUFFERED=1 python3 "$HERE/linear_baseline.py" --iters 30
} 2>&1 | tee "$LOG"
