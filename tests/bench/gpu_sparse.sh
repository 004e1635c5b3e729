#!/usr/bin/env bash
# GNA / PSA on the H200 in one device call. Build here, run there:
#
#   bash tests/bench/gpu_sparse.sh pack    # here: builds with --features cuda, puts the stripped,
#                                          # xz-compressed test binaries and bench_sparse in .gpu/sparse/
#   bash .gpu/sparse/gpu_sparse.sh run     # there (device tool, carry [".gpu/sparse"]): GPU name,
#                                          # cuda_neighborhood, bench_sparse, cuda_pyramid
#
# PACK_DIR=... packs elsewhere (e.g. /work/main/.gpu/cuda-sparse for the device call's checkout).
# PSA_ONLY=1 (pack and run): cuda_pyramid and the PSA bench case only.
# GNA_ONLY=1 (pack and run): cuda_neighborhood and the GNA bench cases only.
#
# Everything the run prints also goes to $OUT/sparse_check.log; the tests run one at a time
# (--test-threads=1).
set -uo pipefail
mode="${1:-}"

pack() {
    set -e
    local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    cd "$root"
    eval "$(bash kernels/setup_cuda.sh --print-env)"
    local out="${PACK_DIR:-$root/.gpu/sparse}"
    local test_args="--test cuda_neighborhood --test cuda_pyramid"
    [ "${PSA_ONLY:-0}" = 1 ] && test_args="--test cuda_pyramid"
    [ "${GNA_ONLY:-0}" = 1 ] && test_args="--test cuda_neighborhood"
    rm -rf "$out" && mkdir -p "$out"
    cargo build --release --features cuda --example bench_sparse
    local tests
    tests=$(cargo test --release --features cuda --no-run $test_args --message-format=json \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
    local target="${CARGO_TARGET_DIR:-$root/target}/release"
    for bin in "$target/examples/bench_sparse" $tests; do
        local name; name="$(basename "$bin" | sed 's/-[0-9a-f]\{16\}$//')"
        strip -o "$out/$name" "$bin" && xz -T2 -6 "$out/$name"
    done
    cp tests/bench/gpu_sparse.sh tests/bench/gna_durations.sh tests/bench/psa_durations.sh "$out/"
    du -sh "$out"
}

run() {
    local here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    local log="${OUT:-/tmp}/sparse_check.log"
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
        if [ -x /tmp/cuda_neighborhood ] && [ "${PSA_ONLY:-0}" != 1 ]; then
            echo "=== cuda_neighborhood"
            timeout 120 /tmp/cuda_neighborhood --test-threads=1 --nocapture 2>&1
        fi
        echo "=== bench_sparse"
        if [ "${PSA_ONLY:-0}" = 1 ]; then
            timeout 60 /tmp/bench_sparse --reps 5 --psa-only 2>&1
            echo "=== bench_sparse (again: run-to-run spread)"
            timeout 60 /tmp/bench_sparse --reps 5 --psa-only 2>&1
        elif [ "${GNA_ONLY:-0}" = 1 ]; then
            timeout 100 /tmp/bench_sparse --reps 5 --gna-only 2>&1
        else
            timeout 100 /tmp/bench_sparse --reps 5 2>&1
        fi
        if [ -x /tmp/cuda_pyramid ] && [ "${GNA_ONLY:-0}" != 1 ]; then
            echo "=== cuda_pyramid"
            timeout 60 /tmp/cuda_pyramid --test-threads=1 --nocapture 2>&1
        fi
        echo "=== done"
    } 2>&1 | tee "$log"
}

case "$mode" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
