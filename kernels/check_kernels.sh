#!/usr/bin/env bash
# Compiles every kernels/**/*.cu for sm_90a with nvcc (no cargo, no GPU) and prints ptxas's
# resource usage per kernel: registers, shared memory, stack frame, spills. Exits non-zero when a
# kernel no longer compiles. CI runs it; run it after editing a kernel.
#   kernels/check_kernels.sh            all kernels
#   kernels/check_kernels.sh FILE.cu    one file
# Same flags as kernels/build.rs. nvcc: $NVCC, else .cuda/toolkit (kernels/setup_cuda.sh), else PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
    if [[ -x "$ROOT/.cuda/toolkit/bin/nvcc" ]]; then NVCC="$ROOT/.cuda/toolkit/bin/nvcc"
    elif command -v nvcc >/dev/null; then NVCC="$(command -v nvcc)"
    else echo "check_kernels: no nvcc; run kernels/setup_cuda.sh first" >&2; exit 1
    fi
fi

if [[ $# -gt 0 ]]; then sources=("$@")
else mapfile -t sources < <(find "$ROOT/kernels" -name '*.cu' | sort)
fi
if [[ ${#sources[@]} -eq 0 ]]; then echo "check_kernels: no .cu files"; exit 0; fi

tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
failed=0
for src in "${sources[@]}"; do
    echo "== ${src#"$ROOT/"}"
    if ! "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -cubin \
            -gencode=arch=compute_90a,code=sm_90a -I "$ROOT/kernels" -Xptxas -v \
            -o "$tmp/k.cubin" "$src" 2>"$tmp/log"; then
        cat "$tmp/log"; failed=1; continue
    fi
    # ptxas -v prints "Compiling entry function 'NAME'" then the usage lines; show them compactly,
    # demangled names shortened to the kernel name.
    awk '/Function properties for/ { fn=$0; sub(/.*properties for /, "", fn); next }
         /bytes stack frame/ { if ($0 ~ /[1-9][0-9]* bytes (stack|spill)/) { sub(/^[^0-9]*/, ""); printf "  %-34s SPILL/STACK: %s\n", fn, $0 } next }
         /Compiling entry function/ { name=$0; sub(/^[^\x27]*\x27/, "", name); sub(/\x27.*/, "", name); next }
         /Used [0-9]+ registers/ { sub(/^ptxas info *: */, ""); printf "  %-34s %s\n", name, $0; next }
         /warning|error/ { print "  " $0 }' "$tmp/log"
done
exit $failed
