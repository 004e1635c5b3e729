#!/usr/bin/env bash
# One device call that checks and times our CUDA kernels on the H200. Build here, run there:
#
#   bash kernels/gpu_check.sh pack        # here: builds with --features cuda and puts the stripped,
#                                         # xz-compressed binaries and the baseline scripts in .gpu/check/
#   bash .gpu/check/gpu_check.sh run      # there (device tool, carry [".gpu/check"], run from the
#                                         # repo root): GPU name, parity tests, then each benchmark
#                                         # after its PyTorch / diffusers baseline of the same call:
#                                         # `gen bench CASE --baseline LOG` prints the ratios.
#   Options (environment): pack GPU_TESTS="cuda_ops cuda_dcae" (tests to pack, default all);
#   run PARITY_TESTS=... (tests to run), SKIP_KERNEL_BENCH=1, SKIP_DCAE=1, SKIP_SANA=1.
#
# Everything the run prints also goes to $OUT/gpu_check.log.
set -uo pipefail
mode="${1:-}"

pack() {
    set -e
    local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"
    bash kernels/setup_cuda.sh >/dev/null
    eval "$(bash kernels/setup_cuda.sh --print-env)"
    local out="$root/.gpu/check"
    rm -rf "$out" && mkdir -p "$out"
    local features="${GPU_FEATURES:-cuda}"
    cargo build --release --features "$features" --bin gen
    # GPU_TESTS: the parity tests to pack (all by default).
    local tests=() t
    for t in ${GPU_TESTS:-cuda_dense cuda_linear cuda_ops cuda_graph cuda_dcae}; do tests+=(--test "$t"); done
    cargo test --release --features "$features" --no-run "${tests[@]}" --message-format=json \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' >"$out/tests.txt"
    local target="${CARGO_TARGET_DIR:-$root/target}/release"
    for bin in "$target/gen" $(cat "$out/tests.txt"); do
        local name; name="$(basename "$bin" | sed 's/-[0-9a-f]\{16\}$//')"
        strip -o "$out/$name" "$bin" && xz -T2 -6 "$out/$name"
    done
    cp tests/bench/dense_baseline.py tests/bench/linear_baseline.py tests/bench/sana_baseline.py tests/bench/dcae_baseline.py \
        kernels/gpu_check.sh "$out/"
    # diffusers is not installed there (shared/GPU.md): its pure-Python wheel travels along.
    python3 -m pip download -q --no-deps -d "$out/whl" diffusers==0.42.1 importlib_metadata zipp
    du -sh "$out"
}

run() {
    local here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    local log="${OUT:-/tmp}/gpu_check.log"
    # The CUDA libraries are not on the default search path there (shared/GPU.md).
    local libdirs
    libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' \
        -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
    {
        nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
        for f in "$here"/*.xz; do
            python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$f" "/tmp/$(basename "${f%.xz}")"
            chmod +x "/tmp/$(basename "${f%.xz}")"
        done
        echo "=== gen bench (device, copy, matmul)"
        /tmp/gen bench --device cuda --iters 30 copy
        /tmp/gen bench --device cuda --iters 30 matmul
        for t in ${PARITY_TESTS:-cuda_dense cuda_linear cuda_ops cuda_graph cuda_dcae}; do
            [ -x "/tmp/$t" ] || continue
            echo "=== $t parity"
            VISGEN_PIPELINES="$PWD/pipelines" timeout 300 "/tmp/$t" --test-threads=1 2>&1 | grep -vE '^test .* \.\.\. ok$'
        done
        if [ "${SKIP_KERNEL_BENCH:-0}" != 1 ]; then
        echo "=== dense: cuDNN SDPA baseline, then ours"
        PYTHONUNBUFFERED=1 python3 "$here/dense_baseline.py" cudnn | tee /tmp/dense_baseline.log
        /tmp/gen bench --device cuda --iters 30 dense --baseline /tmp/dense_baseline.log
        echo "=== linear: eager PyTorch baseline, then ours"
        PYTHONUNBUFFERED=1 python3 "$here/linear_baseline.py" --iters 30 | tee /tmp/linear_baseline.log
        /tmp/gen bench --device cuda --iters 30 linear --baseline /tmp/linear_baseline.log
        fi
        if [ "${SKIP_DCAE:-0}" != 1 ]; then
            echo "=== DC-AE decoder: diffusers eager baseline, then ours"
            python3 -m pip install -q --no-index --no-deps --target /tmp/site "$here"/whl/*.whl
            PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 300 python3 "$here/dcae_baseline.py" | tee /tmp/dcae_baseline.log
            timeout 300 /tmp/gen bench --device cuda --iters 10 dcae --baseline /tmp/dcae_baseline.log
        fi
        if [ "${SKIP_SANA:-0}" != 1 ]; then
            echo "=== SANA-1600M: diffusers eager baseline, then ours"
            python3 -m pip install -q --no-index --no-deps --target /tmp/site "$here"/whl/*.whl
            PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 300 python3 "$here/sana_baseline.py" | tee /tmp/sana_baseline.log
            VISGEN_PIPELINES="$PWD/pipelines" timeout 300 /tmp/gen bench --device cuda --iters 10 sana --baseline /tmp/sana_baseline.log
        fi
    } 2>&1 | tee "$log"
}

case "$mode" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
