"""Golden data for the Gemma-2 text encoder and SANA's prompt handling (tests/text_encoder.rs).

A tiny random Gemma2Model and a tiny word-level tokenizer (Gemma's special-token ids and BOS
post-processor) are written to tests/goldens/gemma_tiny/ as a diffusers-style pair of folders
(text_encoder/, tokenizer/). Then diffusers' own SanaPipeline.encode_prompt runs with those modules,
with and without the complex human instruction, and its outputs are saved.

Run: /work/pyenv/bin/python tests/goldens/make_gemma_goldens.py
"""
import json
import os
import re

import torch
from diffusers import SanaPipeline
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "gemma_tiny")

PROMPTS = [
    "A red fox sleeping in the snow",
    "  A busy city street at dusk with glowing lamps  ",
    # long enough to be truncated to the token budget after the instruction
    " ".join(["a small fluffy white cat on a warm sunny windowsill with blooming red flowers"] * 25),
]
NEGATIVE = ["", "blurry, low quality", "ugly cat"]


def chi_lines():
    import inspect

    sig = inspect.signature(SanaPipeline.__call__)
    return list(sig.parameters["complex_human_instruction"].default)


def build_tokenizer(chi):
    corpus = "\n".join(chi) + "\n" + "\n".join(PROMPTS[:2]).lower()
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", corpus)))
    words.remove("dusk")  # left out on purpose: exercises <unk>
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0..3
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def build_model(vocab_size):
    torch.manual_seed(7)
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,  # sliding, full, sliding
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention as in Gemma-2-2B
        head_dim=8,
        query_pre_attn_scalar=12,  # != head_dim, so the scale is tested
        sliding_window=64,  # shorter than the sequences, so the window is tested
        attn_logit_softcapping=3.0,  # low enough to bite with these weights
        final_logit_softcapping=30.0,
        max_position_embeddings=1024,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
    )
    model = Gemma2Model(config).eval()
    with torch.no_grad():  # norms start at zero (weight is stored as w, applied as 1 + w): randomize
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def main():
    chi = chi_lines()
    tokenizer = build_tokenizer(chi)
    model = build_model(len(tokenizer))
    os.makedirs(FOLDER, exist_ok=True)
    model.save_pretrained(os.path.join(FOLDER, "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(FOLDER, "tokenizer"))
    for junk in ("special_tokens_map.json", "chat_template.jinja"):
        p = os.path.join(FOLDER, "tokenizer", junk)
        if os.path.exists(p):
            os.remove(p)

    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None)
    out = {}
    with torch.no_grad():
        for tag, instruction, max_len in (("chi300", chi, 300), ("plain300", None, 300), ("chi_short", chi[-2:], 12)):
            pe, pm, ne, nm = pipe.encode_prompt(
                PROMPTS,
                do_classifier_free_guidance=True,
                negative_prompt=NEGATIVE,
                device=torch.device("cpu"),
                max_sequence_length=max_len,
                complex_human_instruction=instruction,
            )
            out[f"{tag}/prompt_embeds"] = pe
            out[f"{tag}/prompt_mask"] = pm.to(torch.int64)
            out[f"{tag}/negative_embeds"] = ne
            out[f"{tag}/negative_mask"] = nm.to(torch.int64)
        # raw tokenization and raw encoder output for the instruction case (before index selection)
        texts = ["\n".join(chi) + p.lower().strip() for p in PROMPTS]
        n_chi = len(tokenizer.encode("\n".join(chi)))
        enc = tokenizer(texts, padding="max_length", max_length=n_chi + 300 - 2, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
        out["raw/input_ids"] = enc.input_ids.to(torch.int64)
        out["raw/attention_mask"] = enc.attention_mask.to(torch.int64)
        hidden = model(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        hidden_nocache = model(enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).last_hidden_state
        assert torch.allclose(hidden, hidden_nocache)
        out["raw/hidden"] = hidden
    out = {k: v.contiguous() for k, v in out.items()}
    path = os.path.join(HERE, "gemma_prompts.safetensors")
    save_file(out, path)
    from diffusers import SanaSprintPipeline, SanaVideoPipeline

    def default_chi(cls):
        import inspect

        return list(inspect.signature(cls.__call__).parameters["complex_human_instruction"].default)

    meta = {
        "prompts": PROMPTS,
        "negative": NEGATIVE,
        "chi_tokens": n_chi,
        "chi_sana": default_chi(SanaPipeline),
        "chi_sprint": default_chi(SanaSprintPipeline),
        "chi_video": default_chi(SanaVideoPipeline),
    }
    with open(os.path.join(FOLDER, "prompts.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("chi tokens", n_chi, {k: tuple(v.shape) for k, v in out.items()})
    print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
