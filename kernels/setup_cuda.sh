#!/usr/bin/env bash
# Sets up what a `--features cuda` build needs on a machine without CUDA (our build machine, CI):
#   .cuda/venv     nvcc 13.0.88 and its headers from PyPI wheels (pinned to the H200's 13.0 toolkit:
#                  a newer nvcc emits PTX that the 13.0 driver may refuse to JIT)
#   .cuda/toolkit  a symlink to the toolkit root inside the venv (bin/nvcc, include/, lib/)
#   .cuda/stubs    empty shared libraries with the SONAMEs candle/cudarc link against; the real
#                  libraries are loaded on the GPU machine at run time
# Idempotent: each step is skipped when its output is already there. `.cuda/` is git-ignored.
# Prints the exports to use for cargo (NVCC is deliberately not exported: candle-kernels reruns its
# 15-minute build whenever NVCC changes, and kernels/build.rs finds .cuda/toolkit by itself); `eval "$(kernels/setup_cuda.sh --print-env)"` applies them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="$ROOT/.cuda"
VENV="$CUDA_DIR/venv"
TOOLKIT="$CUDA_DIR/toolkit"
STUBS="$CUDA_DIR/stubs"
# Flags: --print-env  only the exports on stdout (for eval), nothing else;
#        --nvcc-only  install nvcc and stop (CI's kernel compile check: no cargo registry needed).
PRINT_ONLY=0
NVCC_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --print-env) PRINT_ONLY=1 ;;
        --nvcc-only) NVCC_ONLY=1 ;;
        *) echo "setup_cuda: unknown flag $arg (--print-env, --nvcc-only)" >&2; exit 2 ;;
    esac
done

log() { [[ $PRINT_ONLY == 1 ]] || echo "setup_cuda: $*" >&2; }

mkdir -p "$CUDA_DIR"

# 1. nvcc from PyPI, pinned.
if [[ ! -x "$TOOLKIT/bin/nvcc" ]]; then
    log "installing nvcc 13.0.88 into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" \
        "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-cccl==13.0.*"
    cu13="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 | head -n1)"
    ln -sfn "$cu13" "$TOOLKIT"
    # candle-kernels and cudarc look for the unversioned runtime name.
    ln -sf libcudart.so.13 "$TOOLKIT/lib/libcudart.so"
else
    log "nvcc already installed: $TOOLKIT/bin/nvcc"
fi

if [[ $NVCC_ONLY == 1 ]]; then
    log "nvcc: $TOOLKIT/bin/nvcc ($("$TOOLKIT/bin/nvcc" --version | tail -n1))"
    exit 0
fi

# 2. Link stubs: every `fn NAME(` in cudarc's bindings becomes `void NAME(void){}`.
CUDARC_SRC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -n1 || true)"
make_stub() {  # make_stub <cudarc module> <SONAME>
    local module="$1" soname="$2" base="${2%%.so*}.so"
    if [[ -f "$STUBS/$soname" ]]; then return; fi
    if [[ -z "$CUDARC_SRC" ]]; then
        echo "setup_cuda: cudarc 0.19.x not in cargo's registry; run 'cargo fetch' first" >&2
        exit 1
    fi
    log "stub $soname from cudarc/src/$module/sys/mod.rs"
    grep -oE '\bfn [A-Za-z_][A-Za-z0-9_]*\(' "$CUDARC_SRC/src/$module/sys/mod.rs" \
        | sed -E 's/^fn ([A-Za-z0-9_]+)\($/void \1(void){}/' | sort -u >"$STUBS/$module.c"
    gcc -shared -fPIC -Wl,-soname,"$soname" -o "$STUBS/$soname" "$STUBS/$module.c"
    ln -sf "$soname" "$STUBS/$base"
}
mkdir -p "$STUBS"
make_stub driver libcuda.so.1
make_stub nvrtc libnvrtc.so.13
make_stub curand libcurand.so.10
make_stub cublas libcublas.so.13
make_stub cublaslt libcublasLt.so.13

# 3. The environment for cargo. CUDA_COMPUTE_CAP=90 makes candle build its kernels for the H200.
cat <<EOF
export PATH="$TOOLKIT/bin:\$PATH"
export CUDA_ROOT="$TOOLKIT"
export CUDA_PATH="$TOOLKIT"
export CUDA_COMPUTE_CAP=90
EOF
log "done; apply with: eval \"\$(kernels/setup_cuda.sh --print-env)\""
