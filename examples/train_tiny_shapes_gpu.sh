#!/usr/bin/env bash
# Train the embedded default model (tiny-shapes) on the H200, one device call per experiment.
#
#   bash examples/train_tiny_shapes_gpu.sh pack [OLD_TRAIN_BINARY.xz]
#       here: builds the training and eval examples with --features cuda into .gpu/tiny-train/
#       (optionally with an older packed training binary, to measure before/after in one call)
#   bash .gpu/tiny-train/train_tiny_shapes_gpu.sh bench
#       there (carry [".gpu/tiny-train"]): the old binary and the new one on the shipped recipe
#       (bf16, batch 128 and 256, one seed, `--profile true`): steps/s and loss curves side by side
#   bash .gpu/tiny-train/train_tiny_shapes_gpu.sh profile BATCH [train_tiny_shapes options...]
#       there: every kernel of one training step (the 6th) timed by Nsight Compute, summed by kernel
#       name, largest first: where a step's GPU time goes
#   bash .gpu/tiny-train/train_tiny_shapes_gpu.sh sweep SECONDS "OPTIONS A" "OPTIONS B" ...
#       there: trains one model per option string at the same time (the GPU is far from full with
#       one of these small runs), then scores each on the GPU, copies its EMA weights to
#       $OUT/rN.safetensors and sample pictures into $OUT/pictures.tgz: recipes compared in one call
#   bash .gpu/tiny-train/train_tiny_shapes_gpu.sh run SECONDS [train_tiny_shapes options...]
#       there: trains by wall clock, e.g. `run 480 --dtype bf16 --batch 1024 --lr 1.5e-3
#       --data 200000 --init assets/tiny-shapes`, writes the EMA weights to $OUT/tiny-shapes and
#       the raw ones to $OUT/tiny-shapes/raw, then scores both on the GPU (the prompts and seeds of
#       `gen eval shapes --n 200 --seed 0`). Ship a result by copying its model.safetensors into
#       assets/tiny-shapes/ when it scores higher.
set -uo pipefail
mode="${1:-}"
name=tiny-train

pack() {
    set -e
    local old="${1:-}"
    local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"
    bash kernels/setup_cuda.sh >/dev/null
    eval "$(bash kernels/setup_cuda.sh --print-env)"
    local out="$root/.gpu/$name"
    rm -rf "$out" && mkdir -p "$out"
    cargo build --release --features cuda --example train_tiny_shapes --example eval_tiny_shapes
    local target="${CARGO_TARGET_DIR:-$root/target}/release/examples"
    for bin in train_tiny_shapes eval_tiny_shapes; do
        strip -o "$out/$bin" "$target/$bin" && xz -T2 -6 "$out/$bin"
    done
    if [[ -n "$old" ]]; then cp "$old" "$out/old_train_tiny_shapes.xz"; fi
    cp "${BASH_SOURCE[0]}" "$out/"
    du -sh "$out"
}

# Unpacks the binaries into /tmp and finds the CUDA libraries.
setup() {
    local here="$1"
    local libdirs
    libdirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' \
        -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
    for f in "$here"/*.xz; do
        python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$f" "/tmp/$(basename "${f%.xz}")"
        chmod +x "/tmp/$(basename "${f%.xz}")"
    done
    nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
}

bench() {
    local out="${OUT:-/tmp/out}"
    local t0; t0=$(date +%s)
    # The shipped recipe (sample prediction, bf16, batch 128), one seed: the old binary and the new
    # one must give nearly the same losses (same math, other kernels), and their steps/s compare.
    local common=(--device cuda --data 20000 --seed 0 --profile true --dtype bf16 --predict sample
        --patch 4 --lr 1e-3 --warmup 200 --ema 0.998 --steps 200 --minutes 2 --log-every 50)
    {
        for run in "old_train_tiny_shapes 128" "train_tiny_shapes 128" "train_tiny_shapes 256"; do
            read -r bin batch <<< "$run"
            [[ -x /tmp/$bin ]] || continue
            echo "=== $bin, bf16, batch $batch, 200 steps"
            "/tmp/$bin" "${common[@]}" --batch "$batch" --out "/tmp/b_${bin}_$batch"
        done
    } 2>&1 | tee "$out/bench.log"
    echo "bench $(( $(date +%s) - t0 ))s"
}

run() {
    local out="${OUT:-/tmp/out}"
    local t0; t0=$(date +%s)
    local secs="$1"; shift
    local minutes; minutes=$(python3 -c "print($secs / 60)")
    /tmp/train_tiny_shapes --device cuda --minutes "$minutes" --out "$out/tiny-shapes" "$@" 2>&1 | tee "$out/train.log"
    echo "after training $(( $(date +%s) - t0 ))s"
    for w in "$out/tiny-shapes" "$out/tiny-shapes/raw"; do
        echo "=== $w"
        /tmp/eval_tiny_shapes --device cuda --weights "$w" --n 200 --seed 0 --batch 200 | head -7
    done 2>&1 | tee "$out/eval.log"
    echo "total $(( $(date +%s) - t0 ))s"
}

sweep() {
    local out="${OUT:-/tmp/out}"
    local secs="$1"; shift
    local minutes; minutes=$(python3 -c "print($secs / 60)")
    mkdir -p /tmp/sweep /tmp/png
    local i=0
    for opts in "$@"; do
        # shellcheck disable=SC2086 # the option string is split on purpose
        /tmp/train_tiny_shapes --device cuda --minutes "$minutes" --out "/tmp/sweep/r$i" --log-every 250 $opts \
            > "/tmp/sweep/r$i.log" 2>&1 &
        i=$((i + 1))
    done
    wait
    i=0
    for opts in "$@"; do
        local w="/tmp/sweep/r$i"
        echo "=== r$i: $opts"
        grep -E "^(step|done)" "$w.log" | tail -4
        for weights in "$w" "$w/raw"; do
            echo "--- $weights"
            /tmp/eval_tiny_shapes --device cuda --weights "$weights" --n 200 --seed 0 --batch 200
        done
        /tmp/eval_tiny_shapes --device cuda --weights "$w" --n 16 --seed 0 --png "/tmp/png/r$i" > /dev/null
        cp "$w/model.safetensors" "$out/r$i.safetensors"
        i=$((i + 1))
    done 2>&1 | tee "$out/sweep.log"
    tar czf "$out/pictures.tgz" -C /tmp/png .
}

profile() {
    local out="${OUT:-/tmp/out}"
    local batch="$1"; shift
    local csv="$out/profile_b${batch}.csv"
    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        /tmp/train_tiny_shapes --device cuda --data 2000 --batch "$batch" --steps 7 --profile-step 5 \
        --log-every 100 --out /tmp/profile "$@" > "$csv" 2> "$out/profile_b${batch}.err"
    python3 - "$csv" <<'PY'
import csv, sys, collections
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, rows = rows[0], rows[1:]
name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
total, count = collections.Counter(), collections.Counter()
for r in rows:
    ms = float(r[value].replace(",", "")) * scale.get(r[unit], float("nan"))
    key = r[name].split("(")[0][:90]
    total[key] += ms
    count[key] += 1
all_ms = sum(total.values())
print(f"{len(rows)} kernels, {all_ms:.2f} ms of GPU time in the step")
for k, ms in total.most_common(40):
    print(f"{ms:9.3f} ms {100 * ms / all_ms:5.1f}% {count[k]:5d}x  {k}")
PY
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$mode" in
    pack) shift; pack "$@" ;;
    bench) setup "$here" && bench ;;
    run) shift; setup "$here" && run "$@" ;;
    profile) shift; setup "$here" && profile "$@" ;;
    sweep) shift; setup "$here" && sweep "$@" ;;
    *) echo "usage: $0 pack [OLD.xz] | bench | profile BATCH [train options...] | sweep SECONDS "OPTIONS"... | run SECONDS [train options...]" >&2; exit 2 ;;
esac
