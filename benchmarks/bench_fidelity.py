"""How far timm's exact GELU moves SigLIP so400m's patch tokens from the tanh GELU SigLIP was
trained with (the release's tower is transformers' Siglip, `gelu_pytorch_tanh`).

One so400m-14-384 trunk (timm's `vit_so400m_patch14_siglip_384`, open_clip's trunk of
`ViT-SO400M-14-SigLIP-384`) with random weights (timm's own init, `--seed`), one 384x384 crop of
uniform noise in the normalised pixel range [-1, 1], run twice on the CPU: with the exact GELU
timm builds, then with every GELU switched to the tanh form (`model.vision.use_tanh_gelu`).
Prints the max and mean absolute difference of the 729 patch tokens (after the final norm), and
their mean absolute value for scale. Random weights say how the gap grows over 27 layers, not what
it is for the trained weights (those need the checkpoint: `--siglip-ckpt`, an open_clip file).

    nice python benchmarks/bench_fidelity.py [--seed 0] [--siglip-ckpt FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--siglip-ckpt", default=None, help="open_clip SigLIP so400m-14-384 checkpoint (default: random)")
    args = ap.parse_args()

    import timm
    import torch

    from blip3.model.vision import use_tanh_gelu

    torch.manual_seed(args.seed)
    exact = timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, num_classes=0).eval()
    if args.siglip_ckpt:
        from blip3.model.config import get_config
        from blip3.model.vision import build_vision_encoder

        exact = build_vision_encoder(get_config("phi3-mini"), args.siglip_ckpt).trunk  # built with tanh
        exact = copy.deepcopy(exact)
        for m in exact.modules():
            for name, child in m.named_children():
                if isinstance(child, torch.nn.GELU):
                    setattr(m, name, torch.nn.GELU())
    tanh = use_tanh_gelu(copy.deepcopy(exact))
    pixels = torch.rand(1, 3, 384, 384) * 2 - 1
    with torch.no_grad():
        a = exact.forward_features(pixels)[:, exact.num_prefix_tokens :]
        b = tanh.forward_features(pixels)[:, tanh.num_prefix_tokens :]
    diff = (a - b).abs()
    print(json.dumps({
        "weights": args.siglip_ckpt or f"random (seed {args.seed})",
        "patch_tokens": list(a.shape[1:]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "mean_abs_token": float(b.abs().mean()),
    }))


if __name__ == "__main__":
    main()
