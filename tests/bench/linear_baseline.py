"""Eager PyTorch baseline for SANA ReLU linear attention on the shapes of `gen bench`'s linear case.

The math is diffusers' SanaLinearAttnProcessor2_0 (and SanaLinearAttnProcessor3_0's RoPE numerator
for the D=112 SANA-Video shape): ReLU feature maps, fp32 from there, the padded-ones trick for the
denominator. Inputs (B, H, N, D) bf16, output bf16. Times are CUDA-event medians after warm-up;
TB/s counts the same bytes as ours (read q, k, v + write o, bf16).

    python3 tests/bench/linear_baseline.py [--iters 20]
Prints lines "baseline eager <variant> B1 H24 N4608 D128: 0.526 ms 0.22 TB/s".
"""
import argparse

import torch
import torch.nn.functional as F

SHAPES = [(1, 24, 4608, 128), (1, 24, 16896, 128), (1, 20, 32760, 112), (2, 16, 8192, 64)]


def sana_linear(q, k, v, eps=1e-15):
    # (B,H,N,D) -> diffusers' (B,H,D,N) orientation
    q = F.relu(q).transpose(2, 3).float()
    k = F.relu(k).float()
    v = v.transpose(2, 3).float()
    v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B,H,D+1,N): the ones row gives the denominator
    vk = v @ k  # (B,H,D+1,D)
    o = vk @ q  # (B,H,D+1,N)
    o = o[:, :, :-1] / (o[:, :, -1:] + eps)
    return o.transpose(2, 3).to(torch.bfloat16)


def rope_apply(x, cos, sin):
    # interleaved pairs (2i, 2i+1), tables (N, D) fp32
    x2 = x.unflatten(-1, (-1, 2))
    rot = torch.stack((-x2[..., 1], x2[..., 0]), dim=-1).flatten(-2)
    return x.float() * cos + rot.float() * sin


def sana_video_linear(q, k, v, cos, sin, eps=1e-15):
    q, k = F.relu(q), F.relu(k)
    qr, kr = rope_apply(q, cos, sin), rope_apply(k, cos, sin)
    z = 1.0 / (q @ k.sum(dim=2, keepdim=True).transpose(2, 3) + eps)  # (B,H,N,1) in bf16, as diffusers
    vk = v.float().transpose(2, 3) @ kr  # (B,H,D,D)
    o = (qr @ vk.transpose(2, 3)) * z
    return o.to(torch.bfloat16)


def time_ms(fn, iters, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    for b, h, n, d in SHAPES:
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        nbytes = 4 * b * h * n * d * 2
        shape = f"B{b} H{h} N{n} D{d}"
        ms = time_ms(lambda: sana_linear(q, k, v), args.iters)
        print(f"baseline eager plain {shape}: {ms:.4f} ms {nbytes / ms / 1e9:.3f} TB/s", flush=True)
        if d == 112:
            pos = torch.arange(n, device=dev, dtype=torch.float32)[:, None]
            freqs = 1.0 / 10000 ** (2 * (torch.arange(d, device=dev) // 2).float() / d)
            cos, sin = torch.cos(pos * freqs), torch.sin(pos * freqs)
            ms = time_ms(lambda: sana_video_linear(q, k, v, cos, sin), args.iters)
            print(f"baseline eager rope {shape}: {ms:.4f} ms {nbytes / ms / 1e9:.3f} TB/s", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
