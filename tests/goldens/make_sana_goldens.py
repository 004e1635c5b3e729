"""Golden tensors for the SANA transformer and the DC-AE autoencoder (tests/sana_transformer.rs, tests/dcae.rs).

Builds tiny random-config diffusers models with fixed seeds, randomizes every parameter (so that no
norm weight is 1 and no bias is 0), and saves weights under diffusers' key names plus inputs and
outputs, all float32, one safetensors file per case:

    sana_<case>.safetensors   keys: the model's state dict, and "input.*" / "output.*" tensors
    sana_dcae_tiny.safetensors, sana_dcae_local.safetensors   idem

The configs are written into the file's metadata ("config", JSON) so the Rust tests can check them.
Run: /work/pyenv/bin/python tests/goldens/make_sana_goldens.py   (reference: diffusers 0.42.1)
"""

import json
import math
import os

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderDC, SanaTransformer2DModel
import diffusers

OUT = os.path.dirname(os.path.abspath(__file__))


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def save(path: str, model: torch.nn.Module, tensors: dict, config: dict) -> None:
    out = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    for k, v in tensors.items():
        out[k] = v.detach().contiguous().float()
    meta = {"config": json.dumps(config), "diffusers": diffusers.__version__, "torch": torch.__version__}
    save_file(out, path, metadata=meta)
    print(f"{os.path.basename(path)}: {os.path.getsize(path)} bytes, {len(out)} tensors")


SANA_BASE = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=12,
    mlp_ratio=2.5,
    attention_bias=False,
    sample_size=8,
    patch_size=1,
    norm_eps=1e-6,
)

SANA_CASES = {
    # SANA-1.0: no qk norm, no positional embedding; non-square latent.
    "plain": dict(config={}, latent=(2, 4, 6, 8), timestep=[999.0, 37.5], guidance=None),
    # SANA-1.5 style qk norm across heads, patch 2 and the sin-cos PE at a grid != base size.
    "qknorm_pe": dict(
        config=dict(qk_norm="rms_norm_across_heads", patch_size=2, interpolation_scale=1.0),
        latent=(2, 4, 8, 12),
        timestep=[500.0, 3.0],
        guidance=None,
    ),
    # SANA-Sprint: guidance embedding, qk norm, timesteps in [0, 1].
    "sprint": dict(
        config=dict(qk_norm="rms_norm_across_heads", guidance_embeds=True),
        latent=(2, 4, 5, 7),
        timestep=[0.9, 0.25],
        guidance=[0.45, 0.3],
    ),
}


def make_sana(name: str, case: dict, seed: int) -> None:
    config = dict(SANA_BASE, **case["config"])
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**config).eval()
    randomize(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    b = case["latent"][0]
    latents = torch.randn(case["latent"], generator=g)
    text = torch.randn((b, 5, config["caption_channels"]), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)[:b]
    timestep = torch.tensor(case["timestep"], dtype=torch.float32)
    guidance = None if case["guidance"] is None else torch.tensor(case["guidance"], dtype=torch.float32)
    with torch.no_grad():
        out = model(
            hidden_states=latents,
            encoder_hidden_states=text,
            timestep=timestep,
            guidance=guidance,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
        # The same call with the padded text tokens changed: the mask must hide them.
        text_changed = text.clone()
        text_changed[0, 3:] = 100.0
        out_changed = model(
            hidden_states=latents,
            encoder_hidden_states=text_changed,
            timestep=timestep,
            guidance=guidance,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
    assert torch.allclose(out, out_changed, atol=1e-5), "padding leaked through the mask"
    tensors = {"input.latents": latents, "input.text": text, "input.text_mask": mask, "input.timestep": timestep, "output.sample": out}
    if guidance is not None:
        tensors["input.guidance"] = guidance
    save(os.path.join(OUT, f"sana_{name}.safetensors"), model, tensors, config)


DCAE_CONFIG = dict(
    in_channels=3,
    latent_channels=4,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 16, 32),
    decoder_block_out_channels=(8, 16, 16, 32),
    encoder_layers_per_block=(1, 1, 1, 2),
    decoder_layers_per_block=(1, 1, 2, 1),
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

# Tiling forced on a small case: tiles of 32 px (4 latents), stride 24 px (3 latents), 8 px blend.
DCAE_TILING = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24)


def make_dcae(seed: int) -> None:
    torch.manual_seed(seed)
    model = AutoencoderDC(**DCAE_CONFIG).eval()
    randomize(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    # 32x48 image -> 4x6 latent: every EViT stage has H*W > head_dim (linear path).
    image = torch.rand((2, 3, 32, 48), generator=g) * 2 - 1
    # 2x3 latent: the deepest stage has H*W = 6 <= head_dim (diffusers' quadratic path).
    small_latent = torch.randn((1, 4, 2, 3), generator=g)
    # 7x9 latent decoded with forced tiling (3 x 3 tiles, the last ones partial).
    tile_latent = torch.randn((1, 4, 7, 9), generator=g)
    with torch.no_grad():
        latent = model.encode(image).latent
        decoded = model.decode(latent).sample
        small_decoded = model.decode(small_latent).sample
        untiled = model.decode(tile_latent).sample
        model.enable_tiling(**DCAE_TILING)
        tiled = model.decode(tile_latent).sample
        model.disable_tiling()
    rel = ((tiled - untiled).abs().max() / untiled.abs().max()).item()
    print(f"dcae: tiled vs untiled max rel diff {rel:.3e}, mean abs {(tiled - untiled).abs().mean().item():.3e}")
    tensors = {
        "input.image": image,
        "output.latent": latent,
        "output.decoded": decoded,
        "input.small_latent": small_latent,
        "output.small_decoded": small_decoded,
        "input.tile_latent": tile_latent,
        "output.tile_untiled": untiled,
        "output.tile_tiled": tiled,
    }
    config = dict(DCAE_CONFIG, tiling=DCAE_TILING)
    save(os.path.join(OUT, "sana_dcae_tiny.safetensors"), model, tensors, config)


# A decoder without attention (ResBlocks only, 4x): its receptive field is finite, so tiles decoded
# with a halo of latents around them, then cropped, must equal the untiled decode.
DCAE_LOCAL_CONFIG = dict(
    DCAE_CONFIG,
    encoder_block_types="ResBlock",
    decoder_block_types="ResBlock",
    encoder_block_out_channels=(8, 8, 16),
    decoder_block_out_channels=(8, 8, 16),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), ()),
    decoder_qkv_multiscales=((), (), ()),
)


def make_dcae_local(seed: int) -> None:
    torch.manual_seed(seed)
    model = AutoencoderDC(**DCAE_LOCAL_CONFIG).eval()
    randomize(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    latent = torch.randn((1, 4, 9, 11), generator=g)
    with torch.no_grad():
        decoded = model.decode(latent).sample
    decoder_only = torch.nn.Module()
    decoder_only.decoder = model.decoder
    tensors = {"input.latent": latent, "output.decoded": decoded}
    save(os.path.join(OUT, "sana_dcae_local.safetensors"), decoder_only, tensors, DCAE_LOCAL_CONFIG)


# Full-size configs (the Rust presets): every state-dict key with its shape, built on the meta device
# (no memory, no download), so the Rust loaders can be checked against the real checkpoint layout.
FULL_SANA = {
    "sana-600m": dict(num_attention_heads=36, num_layers=28, num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152),
    "sana-1600m": dict(),
    "sana-sprint-1600m": dict(qk_norm="rms_norm_across_heads", guidance_embeds=True),
}
FULL_SANA_BASE = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                      num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                      caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1)
FULL_DCAE = dict(
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


def make_key_manifest() -> None:
    manifest = {}
    with torch.device("meta"):
        for name, cfg in FULL_SANA.items():
            model = SanaTransformer2DModel(**dict(FULL_SANA_BASE, **cfg))
            manifest[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
        model = AutoencoderDC(**FULL_DCAE)
        manifest["dc-ae-f32c32-sana-1.0"] = {k: list(v.shape) for k, v in model.state_dict().items()}
    path = os.path.join(OUT, "sana_full_size_keys.json")
    with open(path, "w") as f:
        json.dump(manifest, f, separators=(",", ":"), sort_keys=True)
    print(f"{os.path.basename(path)}: {os.path.getsize(path)} bytes, " + ", ".join(f"{k}: {len(v)} keys" for k, v in manifest.items()))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    for i, (name, case) in enumerate(SANA_CASES.items()):
        make_sana(name, case, seed=100 + 10 * i)
    make_dcae(seed=7)
    make_dcae_local(seed=11)
    make_key_manifest()
