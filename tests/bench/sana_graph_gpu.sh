#!/usr/bin/env bash
# sana-graph device call: CUDA graph parity tests, then diffusers eager baseline and `gen bench sana`.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log="${OUT:-/tmp}/sana_graph.log"
libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' \
    -o -name 'libnvrtc.so.13' -o -name 'libcudnn.so.9' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
{
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
    for n in gen cuda_graph cuda_ops; do
        python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$here/$n.xz" "/tmp/$n"
        chmod +x "/tmp/$n"
    done
    echo "=== cuda_graph parity"
    VISGEN_PIPELINES="$PWD/pipelines" timeout 150 /tmp/cuda_graph --test-threads=1 --nocapture 2>&1 | tail -45
    echo "=== cuda_ops parity"
    VISGEN_PIPELINES="$PWD/pipelines" timeout 100 /tmp/cuda_ops --test-threads=1 2>&1 | grep -vE '^test .* \.\.\. ok$'
    echo "=== SANA-1600M: diffusers eager baseline, then ours"
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$here"/whl/*.whl
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 220 python3 "$here/sana_baseline.py" --iters 10 | tee /tmp/sana_baseline.log
    VISGEN_BENCH_SKIP_DECODER=1 VISGEN_PIPELINES="$PWD/pipelines" timeout 220 /tmp/gen bench --device cuda --iters 10 sana --baseline /tmp/sana_baseline.log
} 2>&1 | tee "$log"
