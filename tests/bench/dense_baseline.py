"""cuDNN SDPA baseline for the dense attention kernel, on the shapes of `gen bench dense`.

Run on the H200 in the same device call as our benchmark:  python3 tests/bench/dense_baseline.py
Prints one line per shape: ms (median of 30 timed calls with CUDA events, after 5 warm-ups) and TFLOP/s
(4·B·H·N²·D flops). Random bf16 inputs, layout (B, H, N, D), no mask.
"""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(1, 24, 4608, 128), (1, 24, 16896, 128), (1, 20, 32760, 112), (2, 16, 8192, 64)]


def time_ms(fn, warmup=5, reps=30):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash2": SDPBackend.FLASH_ATTENTION}
    which = sys.argv[1:] or ["cudnn", "flash2"]
    for b, h, n, d in SHAPES:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for name in which:
            with sdpa_kernel(backends[name]):
                ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            tflops = 4 * b * h * n * n * d / (ms * 1e-3) / 1e12
            print(f"baseline {name} B{b} H{h} N{n} D{d}: {ms:.3f} ms  {tflops:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
