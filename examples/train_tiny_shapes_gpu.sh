#!/usr/bin/env bash
# Train the embedded default model (tiny-shapes) on the H200 in one device call.
#
#   bash examples/train_tiny_shapes_gpu.sh pack                 # here: builds the training and eval
#                                                               # examples with --features cuda into .gpu/tiny-train/
#   bash .gpu/tiny-train/train_tiny_shapes_gpu.sh run SECONDS [train_tiny_shapes options...]
#                                                               # there (carry [".gpu/tiny-train"]), e.g.
#                                                               # run 500 --batch 128 --data 100000 --init assets/tiny-shapes
# `run` trains by wall clock, writes the EMA weights to $OUT/tiny-shapes and the raw ones to
# $OUT/tiny-shapes/raw, then scores both on the GPU (same prompts as `gen eval shapes`). Ship a
# result by copying its model.safetensors into assets/tiny-shapes/ when it scores higher.
set -uo pipefail
mode="${1:-}"

pack() {
    set -e
    local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"
    bash kernels/setup_cuda.sh >/dev/null
    eval "$(bash kernels/setup_cuda.sh --print-env)"
    local out="$root/.gpu/tiny-train"
    rm -rf "$out" && mkdir -p "$out"
    cargo build --release --features cuda --example train_tiny_shapes --example eval_tiny_shapes
    local target="${CARGO_TARGET_DIR:-$root/target}/release/examples"
    for name in train_tiny_shapes eval_tiny_shapes; do
        strip -o "$out/$name" "$target/$name" && xz -T2 -6 "$out/$name"
    done
    cp "${BASH_SOURCE[0]}" "$out/"
    du -sh "$out"
}

run() {
    local here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    local secs="$1"; shift
    local out="${OUT:-/tmp/out}"
    local libdirs
    libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' \
        -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
    for f in "$here"/*.xz; do
        python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$f" "/tmp/$(basename "${f%.xz}")"
        chmod +x "/tmp/$(basename "${f%.xz}")"
    done
    local minutes; minutes=$(python3 -c "print($secs / 60)")
    /tmp/train_tiny_shapes --device cuda --minutes "$minutes" --out "$out/tiny-shapes" "$@" 2>&1 | tee "$out/train.log"
    for w in "$out/tiny-shapes" "$out/tiny-shapes/raw"; do
        echo "=== $w"
        /tmp/eval_tiny_shapes --device cuda --weights "$w" --n 200 --seed 0 --batch 200 | head -7
    done 2>&1 | tee "$out/eval.log"
}

case "$mode" in
    pack) pack ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 pack | run SECONDS [train options...]" >&2; exit 2 ;;
esac
