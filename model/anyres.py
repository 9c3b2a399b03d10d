"""Any-resolution crops (LLaVA-NeXT style, as xGen-MM r-v1.5 uses them).

An image of size (w, h) is fitted to the best grid from the released list (maximise the effective
resolution, then minimise waste), resized keeping its aspect ratio, padded centred with black
(the ViT sees the padding, so its colour is part of what the released model was trained on), and
cut into row-major square crops; the whole image squashed to one crop comes first.

Key masks follow the authors' rule (their `unpad_image`) on the grid of ViT patch tokens, not on
pixels: on the (rows * side, cols * side) token grid, the padded side keeps
`int(original_side * scale)` tokens centred, with `(grid_side - kept) // 2` cut at each end.
The released model then hands the resampler the grid tokens in raster order, `side * side` at a
time (`release_token_groups`): for grids more than one crop wide such a group is not a crop, and
that grouping is what the released resampler was trained on, so we keep it. The geometry is a pure
function of (w, h) so the model can recompute masks from `image_sizes` alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class CropPlan:
    """Where the resized image sits on the padded grid canvas (pixels)."""

    grid: tuple[int, int]  # canvas (width, height), one of the grids
    resized: tuple[int, int]  # image size after aspect-preserving resize
    offset: tuple[int, int]  # top-left of the image on the canvas (centred)
    crop_size: int

    @property
    def cols(self) -> int:
        return self.grid[0] // self.crop_size

    @property
    def rows(self) -> int:
        return self.grid[1] // self.crop_size

    @property
    def n_crops(self) -> int:
        """Base image + grid crops."""
        return 1 + self.cols * self.rows


def select_best_grid(size: tuple[int, int], grids: tuple[tuple[int, int], ...] | list) -> tuple[int, int]:
    """LLaVA's `select_best_resolution`: most effective pixels, then least wasted canvas."""
    w, h = size
    best, best_eff, best_waste = None, -1, math.inf
    for gw, gh in grids:
        scale = min(gw / w, gh / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = gw * gh - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(gw), int(gh)), eff, waste
    assert best is not None, "no grids"
    return best


def plan_crops(size: tuple[int, int], grids, crop_size: int) -> CropPlan:
    """Pick the grid, the resized size (>= 1 px per side) and the centred offset for an image."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {size}")
    gw, gh = select_best_grid((w, h), grids)
    sw, sh = gw / w, gh / h
    if sw < sh:
        nw, nh = gw, min(math.ceil(h * sw), gh)
    else:
        nw, nh = min(math.ceil(w * sh), gw), gh
    nw, nh = max(nw, 1), max(nh, 1)
    return CropPlan(grid=(gw, gh), resized=(nw, nh), offset=((gw - nw) // 2, (gh - nh) // 2), crop_size=crop_size)


def token_grid_mask(size: tuple[int, int], plan: CropPlan, patch_size: int) -> torch.Tensor:
    """(rows * side, cols * side) bool over the grid crops' patch tokens: the authors' unpad rule.

    Which side is padded is decided by comparing aspect ratios, exactly as the rule does (so an
    image whose ratio equals the grid's keeps everything)."""
    side = plan.crop_size // patch_size
    gh, gw = plan.rows * side, plan.cols * side
    w, h = int(size[0]), int(size[1])
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    if w / h > gw / gh:
        pad = (gh - int(h * (gw / w))) // 2
        mask[pad : gh - pad, :] = True
    else:
        pad = (gw - int(w * (gh / h))) // 2
        mask[:, pad : gw - pad] = True
    return mask


def release_token_groups(grid_tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, side * side, ...) per-crop tokens -> the released model's resampler groups.

    The crops' tokens are laid out as one raster over the whole token grid, then cut into
    consecutive runs of side * side (the authors' view after their unpad step). One column of
    crops gives back the crops unchanged; wider grids mix rows of neighbouring crops."""
    n, p = grid_tokens.shape[:2]
    side = int(round(p**0.5))
    rest = grid_tokens.shape[2:]
    raster = grid_tokens.reshape(rows, cols, side, side, *rest).transpose(1, 2)  # (rows, side, cols, side, ...)
    return raster.reshape(n, p, *rest)


def crop_patch_masks(size: tuple[int, int], plan: CropPlan, patch_size: int) -> torch.Tensor:
    """(n_crops, P) bool key masks in the released model's order: the base image first (all True),
    then the unpad mask of the token grid cut into raster groups (see `release_token_groups`)."""
    side = plan.crop_size // patch_size
    grid = token_grid_mask(size, plan, patch_size)  # (rows * side, cols * side)
    groups = grid.reshape(plan.rows * plan.cols, side * side)  # raster runs of side * side
    return torch.cat([torch.ones(1, side * side, dtype=torch.bool), groups])


PAD_COLOUR = (0, 0, 0)  # the authors pad with black


def anyres_crops(image: Image.Image, grids, crop_size: int) -> tuple[list[Image.Image], CropPlan]:
    """Base image (squashed) then row-major crops of the black-padded, resized image."""
    image = image.convert("RGB")
    plan = plan_crops(image.size, grids, crop_size)
    base = image.resize((crop_size, crop_size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", plan.grid, PAD_COLOUR)
    canvas.paste(image.resize(plan.resized, Image.Resampling.BICUBIC), plan.offset)
    crops = [base]
    for r in range(plan.rows):
        for c in range(plan.cols):
            box = (c * crop_size, r * crop_size, (c + 1) * crop_size, (r + 1) * crop_size)
            crops.append(canvas.crop(box))
    return crops, plan
