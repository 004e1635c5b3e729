"""Goldens for tests/attention_dense_linear.rs, produced by the upstream code paths themselves:

- linear_plain_*: diffusers' SanaLinearAttnProcessor2_0 (SANA image self-attention, eps 1e-15);
- linear_rope_*:  diffusers' SanaLinearAttnProcessor3_0 (SANA-Video, RoPE in the numerator);
- dense_*:        torch.nn.functional.scaled_dot_product_attention with a boolean key mask.

The processors are driven through a diffusers `Attention` whose to_q/to_k/to_v return fixed
tensors and whose to_out is the identity, so the saved output is the attention alone.
Tensors are saved in our layout (B, H, N, D), f32. Run: /work/pyenv/bin/python <this file>.
"""
import os

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0
from safetensors.torch import save_file

torch.manual_seed(0)
B, H, N, D = 2, 2, 12, 8
C = H * D


class Fixed(torch.nn.Module):
    """Ignores its input and returns a fixed (B, N, C) tensor."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, _x):
        return self.t


def to_bnc(x):  # (B, H, N, D) -> (B, N, H*D)
    return x.permute(0, 2, 1, 3).reshape(B, N, C)


def to_bhnd(x):  # (B, N, H*D) -> (B, H, N, D)
    return x.reshape(B, N, H, D).permute(0, 2, 1, 3).contiguous()


def run_processor(processor, q, k, v, **kwargs):
    attn = Attention(query_dim=C, heads=H, dim_head=D, bias=False, out_bias=True, processor=processor)
    attn.eval()
    with torch.no_grad():
        attn.to_out[0].weight.copy_(torch.eye(C))
        attn.to_out[0].bias.zero_()
    attn.to_q, attn.to_k, attn.to_v = Fixed(to_bnc(q)), Fixed(to_bnc(k)), Fixed(to_bnc(v))
    with torch.no_grad():
        out = attn(torch.zeros(B, N, C), **kwargs)
    return to_bhnd(out)


out = {}

# Linear attention, plain: q, k around 0 so that ReLU zeroes a good share of the features.
q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)
out.update(linear_plain_q=q, linear_plain_k=k, linear_plain_v=v)
out["linear_plain_out"] = run_processor(SanaLinearAttnProcessor2_0(), q, k, v)

# Linear attention with RoPE: tables (N, D) repeated over interleaved pairs, random angles.
q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)
angles = torch.rand(N, D // 2, dtype=torch.float64) * 6.0 - 3.0
cos = angles.cos().repeat_interleave(2, dim=-1).float()
sin = angles.sin().repeat_interleave(2, dim=-1).float()
rotary = (cos.reshape(1, N, 1, D), sin.reshape(1, N, 1, D))
out.update(linear_rope_q=q, linear_rope_k=k, linear_rope_v=v, linear_rope_cos=cos, linear_rope_sin=sin)
out["linear_rope_out"] = run_processor(SanaLinearAttnProcessor3_0(), q, k, v, rotary_emb=rotary)

# Dense softmax attention with a key mask (no fully masked batch: torch gives NaN there).
NQ, NK, DD = 5, 7, 24
q, k, v = torch.randn(B, H, NQ, DD), torch.randn(B, H, NK, DD), torch.randn(B, H, NK, DD)
mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
scale = DD ** -0.5
o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
logits = (q @ k.transpose(-1, -2)) * scale
lse = torch.logsumexp(logits.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
out.update(dense_q=q, dense_k=k, dense_v=v, dense_mask=mask.float(), dense_out=o, dense_lse=lse)

out = {name: t.float().contiguous() for name, t in out.items()}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_dense_linear.safetensors")
save_file(out, path)
print("wrote", path, {n: tuple(t.shape) for n, t in out.items()})
