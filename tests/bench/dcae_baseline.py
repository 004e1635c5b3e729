"""diffusers eager baseline for `gen bench dcae`: the DC-AE f32c32 decoder (SANA's), random weights,
bf16, one 1024² image (a 32x32x32 latent), and its parts on their own shapes. Run on the H200 in
the same device call as our benchmark:

    python3 tests/bench/dcae_baseline.py > dcae_baseline.log
    gen bench dcae --device cuda --baseline dcae_baseline.log

Prints `baseline diffusers NAME: X ms` lines (median of CUDA-event timings after warm-up). The
decode is timed as tests/bench/sana_baseline.py times it (scaled latent in, clamped f32 image out).
"""
import argparse
import time

import torch
from diffusers import AutoencoderDC

DCAE_F32C32 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate", downsample_block_type="conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)


def time_ms(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():  # the CPU smoke run of the script itself
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def report(name, ms):
    print(f"baseline diffusers {name}: {ms:.3f} ms", flush=True)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--side", type=int, default=32, help="latent side (32: a 1024² image)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}", flush=True)
    with dev:
        vae = AutoencoderDC(**DCAE_F32C32).to(dt).eval()
    s = args.side
    z = torch.randn(1, 32, s, s, device=dev, dtype=dt)
    report("decode", time_ms(lambda: vae.decode(z / 0.41407).sample.float().clamp(-1, 1), args.iters))

    # Parts: decoder.up_blocks[i] = Sequential([up block (i < 5)], 3 layers), stage i at s·2^(5-i).
    up = vae.decoder.up_blocks
    image = lambda c, side: torch.randn(1, c, side, side, device=dev, dtype=dt)
    x128, x256, x512 = image(128, 32 * s), image(256, 16 * s), image(512, 8 * s)
    parts = [
        ("res128", up[0][1], x128),
        ("conv128", up[0][1].conv1, x128),
        ("up256", up[0][0], x256),
        ("res256", up[1][1], x256),
        ("res512", up[2][1], x512),
        ("evit512", up[3][1], image(512, 4 * s)),
        ("evit1024_64", up[4][1], image(1024, 2 * s)),
        ("evit1024_32", up[5][0], image(1024, s)),
    ]
    for name, module, x in parts:
        report(name, time_ms(lambda: module(x), args.iters))


if __name__ == "__main__":
    main()
