"""Golden data for SANA's resolution binning (tests/resolution_bins.rs), from diffusers 0.42.1.

diffusers' SANA pipelines default to `use_resolution_binning=True`: the requested height and width
are replaced by the trained size whose aspect ratio is closest (`classify_height_width_bin` over the
table picked by the transformer's `sample_size`), and the decoded image is resized (bilinear,
align_corners=False) and center-cropped back (`resize_and_crop_tensor`). This records the four
tables, the bin chosen for many requested sizes, and resize-and-crop results on a small image.

Run: /work/pyenv/bin/python tests/goldens/make_resolution_bin_goldens.py
"""
import os

import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resolution_bins.safetensors")
# keyed by the transformer's sample_size, as pipeline_sana.py picks them
TABLES = {16: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_4096_BIN}


def main():
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    queries = [(1024, 1024), (1000, 600), (600, 1000), (768, 1360), (1080, 1920), (1920, 1080), (100, 5000),
               (5000, 100), (333, 777), (512, 512), (1, 1), (4096, 4096), (2160, 3840), (704, 1344)]
    queries += [tuple(int(v) for v in torch.randint(64, 4096, (2,), generator=gen)) for _ in range(50)]
    tensors["classify/queries"] = torch.tensor(queries, dtype=torch.int64)
    for sample_size, table in TABLES.items():
        tensors[f"table/{sample_size}"] = torch.tensor(
            [[float(k), h, w] for k, (h, w) in table.items()], dtype=torch.float64
        )
        bins = [PixArtImageProcessor.classify_height_width_bin(h, w, ratios=table) for h, w in queries]
        tensors[f"classify/{sample_size}"] = torch.tensor(bins, dtype=torch.int64)

    image = torch.rand((2, 3, 24, 40), generator=gen) * 2 - 1
    tensors["resize/input"] = image
    # (height, width) asked for: down, up, crop on either axis, no change
    sizes = [(15, 25), (20, 20), (48, 50), (24, 40), (9, 45), (30, 17), (23, 41)]
    tensors["resize/sizes"] = torch.tensor(sizes, dtype=torch.int64)
    for i, (h, w) in enumerate(sizes):
        tensors[f"resize/{i}"] = PixArtImageProcessor.resize_and_crop_tensor(image, w, h).clone()
    save_file(tensors, OUT)
    print(f"wrote {OUT}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
