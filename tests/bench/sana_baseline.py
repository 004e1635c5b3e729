"""diffusers eager baseline for `gen bench sana`: SANA-1600M at full size, random weights, bf16,
1024² (32x32x32 latent), CFG batch 2, 300 text tokens of which 120 real. Run on the H200 in the
same device call as our benchmark:

    python3 tests/bench/sana_baseline.py > sana_baseline.log
    gen bench sana --device cuda --baseline sana_baseline.log

Prints `baseline diffusers NAME: X ms` lines with the names `gen bench sana` looks for: step,
block and its parts, text_encoder (Gemma-2-2B, prompt with SANA's instruction prefix + negative),
denoise (20 CFG steps with the flow DPM-Solver++ scheduler), decode (DC-AE f32c32) and image
(their sum: the text encoder is called as the pipeline calls it, with token ids instead of a
tokenizer, which no download can fetch here). Times: median of CUDA-event timings after warm-up.
"""
import argparse
import time

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model

SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1)
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
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                 sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")
BATCH, SIDE, TEXT, REAL_TEXT, STEPS = 2, 32, 300, 120, 20
# Tokens of SANA's complex human instruction prefix plus a short prompt (the pipeline's
# max_length is 300 + instruction tokens - 2 for the prompt, 300 for the negative prompt).
PROMPT_TOKENS = 300 + 124 - 2


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


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(name, ms):
    print(f"baseline diffusers {name}: {ms:.3f} ms", flush=True)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev, dt = torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}", flush=True)
    with dev:
        transformer = SanaTransformer2DModel(**SANA_1600M).to(dt).eval()
    latents = torch.randn(BATCH, 32, SIDE, SIDE, device=dev, dtype=dt)
    timestep = torch.full((BATCH,), 500.0, device=dev)
    text = torch.randn(BATCH, TEXT, 2304, device=dev, dtype=dt)
    mask = torch.zeros(BATCH, TEXT, device=dev)
    mask[:, :REAL_TEXT] = 1

    step = lambda: transformer(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                               encoder_attention_mask=mask, return_dict=False)
    report("step", time_ms(step, args.iters))

    # One block and its parts, on the block's shapes, as SanaTransformer2DModel calls them.
    block = transformer.transformer_blocks[0]
    c, n = SANA_1600M["num_attention_heads"] * SANA_1600M["attention_head_dim"], SIDE * SIDE
    x = torch.randn(BATCH, n, c, device=dev, dtype=dt)
    temb = torch.randn(BATCH, 6 * c, device=dev, dtype=dt) * 0.1
    text_c = torch.randn(BATCH, TEXT, c, device=dev, dtype=dt)
    bias = ((1 - mask.to(dt)) * -10000.0).unsqueeze(1)
    report("block", time_ms(lambda: block(x, None, text_c, bias, temb, SIDE, SIDE), args.iters))
    shift, scale = (torch.randn(BATCH, 1, c, device=dev, dtype=dt) * 0.1 for _ in range(2))
    report("norm_modulate", time_ms(lambda: block.norm1(x) * (1 + scale) + shift, args.iters))
    report("attn1", time_ms(lambda: block.attn1(x), args.iters))
    report("attn2", time_ms(lambda: block.attn2(x, encoder_hidden_states=text_c, attention_mask=bias), args.iters))
    image = torch.randn(BATCH, c, SIDE, SIDE, device=dev, dtype=dt)
    report("ff", time_ms(lambda: block.ff(image), args.iters))

    # 20 CFG steps with SANA's scheduler, as SanaPipeline's loop does them.
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction",
                                            num_train_timesteps=1000)

    def denoise():
        scheduler.set_timesteps(STEPS, device=dev)
        z = torch.randn(1, 32, SIDE, SIDE, device=dev, dtype=torch.float32)
        for t in scheduler.timesteps:
            model_in = torch.cat([z, z]).to(dt)
            v = transformer(hidden_states=model_in, encoder_hidden_states=text, timestep=t.expand(BATCH).float(),
                            encoder_attention_mask=mask, return_dict=False)[0].float()
            v_neg, v_pos = v.chunk(2)
            z = scheduler.step(v_neg + 4.5 * (v_pos - v_neg), t, z, return_dict=False)[0]
        return z

    denoise_ms = time_ms(denoise, max(3, args.iters // 5), warmup=1)
    report("denoise", denoise_ms)
    del transformer
    empty_cache()

    with dev:
        gemma = Gemma2Model(Gemma2Config(**GEMMA2_2B)).to(dt).eval()
    prompt_ids = torch.randint(0, GEMMA2_2B["vocab_size"], (1, PROMPT_TOKENS), device=dev)
    negative_ids = torch.randint(0, GEMMA2_2B["vocab_size"], (1, TEXT), device=dev)

    def encode():
        gemma(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids))
        gemma(input_ids=negative_ids, attention_mask=torch.ones_like(negative_ids))

    text_ms = time_ms(encode, args.iters)
    report("text_encoder", text_ms)
    del gemma
    empty_cache()

    with dev:
        vae = AutoencoderDC(**DCAE_F32C32).to(dt).eval()
    z = torch.randn(1, 32, SIDE, SIDE, device=dev, dtype=dt)
    decode_ms = time_ms(lambda: vae.decode(z / 0.41407).sample.float().clamp(-1, 1), max(3, args.iters // 4))
    report("decode", decode_ms)
    report("image", text_ms + denoise_ms + decode_ms)


if __name__ == "__main__":
    main()
