"""End-to-end golden for the SANA text-to-image pipeline (tests/sana_pipeline.rs).

Builds a tiny diffusers SanaPipeline from tiny random components (every parameter randomized with
fixed seeds, so no norm weight is 1 and no bias is 0), saves it with `save_pretrained` into
tests/goldens/sana_tiny_pipeline/ (the hub's diffusers layout, float32 safetensors), reloads it from
that folder, and runs it from fixed initial latents:

    prompt, negative prompt, guidance 4.5, 3 steps, SANA's default complex human instruction,
    max_sequence_length 300 (the default), no resolution binning, output_type "pt".

Cases, saved in tests/goldens/sana_tiny_pipeline.safetensors:
    input.latents             the initial latents (1, C, h, w)
    dpm.latents, dpm.image    SANA's scheduler (flow DPM-Solver++, shift 3): final latents, pipeline's
                              "pt" image ((decoded / 2 + 0.5).clamp(0, 1))
    dpm.decoded               the VAE's raw output for those latents (unclamped: with random weights
                              many pixels clamp, so this is the sharper check)
    euler.*                   the same with FlowMatchEulerDiscreteScheduler(shift=3)
    input.sprint_latents, sprint.*   SanaSprintPipeline (SCMScheduler, 1 step, guidance 4.5 embedded) on
                              tests/goldens/sana_tiny_sprint/ (qk norm, guidance embedding, a 4x VAE)
The prompt, negative prompt, steps, guidance and size are in the file's metadata.

Run: /work/pyenv/bin/python tests/goldens/make_sana_pipeline_golden.py   (reference: diffusers 0.42.1)
"""

import json
import math
import os
import shutil

import diffusers
import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaSprintPipeline,
    SanaTransformer2DModel,
    SCMScheduler,
)
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "sana_tiny_pipeline")
SPRINT_FOLDER = os.path.join(HERE, "sana_tiny_sprint")
GOLDEN = os.path.join(HERE, "sana_tiny_pipeline.safetensors")

PROMPT = "A red fox sleeping in the snow"
NEGATIVE = "blurry street lamps"
STEPS = 3
GUIDANCE = 4.5
HEIGHT, WIDTH = 64, 96  # non-square (diffusers wants multiples of 32): latent 8 x 12 with the 8x DC-AE
TEXT_HIDDEN = 32

TRANSFORMER = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=TEXT_HIDDEN,
    mlp_ratio=2.5,
    attention_bias=False,
    sample_size=8,
    patch_size=1,
    norm_eps=1e-6,
    # Released SANA configs keep 1.0; another value checks that the pipeline applies it.
    timestep_scale=0.75,
)

VAE = dict(
    in_channels=3,
    latent_channels=4,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 16, 32),
    decoder_block_out_channels=(8, 16, 16, 32),
    encoder_layers_per_block=(1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (5,), (5,)),
    upsample_block_type="interpolate",
    downsample_block_type="conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    encoder_out_shortcut=True,
    decoder_in_shortcut=True,
    decoder_conv_act_fn="relu",
    scaling_factor=0.41407,
)

# SANA's scheduler_config.json on the hub (Efficient-Large-Model/Sana_*_diffusers).
SANA_SCHEDULER = dict(
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    final_sigmas_type="zero",
    lower_order_final=True,
    flow_shift=3.0,
    use_flow_sigmas=True,
    prediction_type="flow_prediction",
    num_train_timesteps=1000,
)


# SANA-Sprint: qk norm and the guidance embedding; a smaller VAE (ResBlocks only, 4x) keeps the folder small.
SPRINT_TRANSFORMER = dict(TRANSFORMER, qk_norm="rms_norm_across_heads", guidance_embeds=True)
SPRINT_VAE = dict(
    VAE,
    encoder_block_types="ResBlock",
    decoder_block_types="ResBlock",
    encoder_block_out_channels=(8, 8, 16),
    decoder_block_out_channels=(8, 8, 16),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), ()),
    decoder_qkv_multiscales=((), (), ()),
)
SPRINT_STEPS = 1  # one step: the fresh noise drawn after the last step never reaches the output


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: vectors around 1 (norms) or 0 (biases), matrices ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def build_text_encoder(vocab_size: int) -> Gemma2Model:
    torch.manual_seed(21)
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,  # sliding, full
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12,
        sliding_window=64,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=1024,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
    )
    model = Gemma2Model(config).eval()
    with torch.no_grad():  # Gemma norms are applied as (1 + w): random around 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def build_folder(cls, folder: str, transformer_config: dict, vae_config: dict, scheduler, seed: int) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(HERE, "gemma_tiny", "tokenizer"))
    text_encoder = build_text_encoder(len(tokenizer))
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**transformer_config).eval()
    randomize(transformer, seed + 1)
    torch.manual_seed(seed + 2)
    vae = AutoencoderDC(**vae_config).eval()
    randomize(vae, seed + 3)
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for junk in ("special_tokens_map.json", "chat_template.jinja"):
        p = os.path.join(folder, "tokenizer", junk)
        if os.path.exists(p):
            os.remove(p)


def run(pipe: SanaPipeline, latents: torch.Tensor, output_type: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=HEIGHT,
            width=WIDTH,
            latents=latents.clone(),
            output_type=output_type,
            use_resolution_binning=False,
            return_dict=False,
        )[0]


def run_sprint(out: dict) -> None:
    build_folder(SanaSprintPipeline, SPRINT_FOLDER, SPRINT_TRANSFORMER, SPRINT_VAE, SCMScheduler(), 32)
    pipe = SanaSprintPipeline.from_pretrained(SPRINT_FOLDER, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(36)
    latents = torch.randn((1, SPRINT_TRANSFORMER["in_channels"], HEIGHT // 4, WIDTH // 4), generator=g)
    kwargs = dict(
        prompt=PROMPT,
        num_inference_steps=SPRINT_STEPS,
        intermediate_timesteps=None,
        guidance_scale=GUIDANCE,
        height=HEIGHT,
        width=WIDTH,
        use_resolution_binning=False,
        return_dict=False,
    )
    with torch.no_grad():
        final = pipe(latents=latents.clone(), output_type="latent", **kwargs)[0]
        image = pipe(latents=latents.clone(), output_type="pt", **kwargs)[0]
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
    assert torch.allclose(image, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-6)
    print(f"sprint: |latents| {final.abs().max():.3f}, clamped {(image == 0).sum() + (image == 1).sum()}")
    out["input.sprint_latents"] = latents
    out["sprint.latents"] = final
    out["sprint.image"] = image
    out["sprint.decoded"] = decoded


def main() -> None:
    build_folder(SanaPipeline, FOLDER, TRANSFORMER, VAE, DPMSolverMultistepScheduler(**SANA_SCHEDULER), 22)
    pipe = SanaPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(26)
    latents = torch.randn((1, TRANSFORMER["in_channels"], HEIGHT // 8, WIDTH // 8), generator=g)
    out = {"input.latents": latents}
    schedulers = {
        "dpm": pipe.scheduler,
        "euler": FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000),
    }
    for case, scheduler in schedulers.items():
        pipe.scheduler = scheduler
        final = run(pipe, latents, "latent")
        image = run(pipe, latents, "pt")
        # the image must be the decode of those latents
        with torch.no_grad():
            decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
        assert torch.allclose(image, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-6)
        print(f"{case}: timesteps {scheduler.timesteps.tolist()}, |latents| {final.abs().max():.3f}, "
              f"image range [{image.min():.3f}, {image.max():.3f}], clamped {(image == 0).sum() + (image == 1).sum()}")
        out[f"{case}.latents"] = final
        out[f"{case}.image"] = image
        out[f"{case}.decoded"] = decoded
    run_sprint(out)
    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "steps": str(STEPS),
        "sprint_steps": str(SPRINT_STEPS),
        "guidance": str(GUIDANCE),
        "height": str(HEIGHT),
        "width": str(WIDTH),
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "scheduler": json.dumps(SANA_SCHEDULER),
    }
    save_file({k: v.detach().float().contiguous() for k, v in out.items()}, GOLDEN, metadata=meta)
    for folder in (FOLDER, SPRINT_FOLDER):
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
        print(f"{folder}: {total} bytes")
    print(f"{GOLDEN}: {os.path.getsize(GOLDEN)} bytes")


if __name__ == "__main__":
    main()
