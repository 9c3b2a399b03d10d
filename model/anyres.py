"""Any-resolution crops (LLaVA-NeXT style, as xGen-MM r-v1.5 uses them).

An image of size (w, h) is fitted to the best grid from the released list (maximise the effective
resolution, then minimise waste), resized keeping its aspect ratio, padded centred, and cut into
row-major square crops; the whole image squashed to one crop comes first. Each crop also gets a
patch-level key mask (True = the patch centre lies on the image, not on the padding), so the
resampler never attends to padding. The geometry is a pure function of (w, h) so the model can
recompute masks from `image_sizes` alone.
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


def crop_patch_masks(plan: CropPlan, patch_size: int) -> torch.Tensor:
    """(n_crops, P) bool: True where a patch's centre is on the image. Base crop is all True."""
    side = plan.crop_size // patch_size
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) * patch_size  # within a crop
    x0, y0 = plan.offset
    x1, y1 = x0 + plan.resized[0], y0 + plan.resized[1]
    masks = [torch.ones(side * side, dtype=torch.bool)]
    for r in range(plan.rows):
        for c in range(plan.cols):
            xs = c * plan.crop_size + centres
            ys = r * plan.crop_size + centres
            inx = (xs >= x0) & (xs < x1)
            iny = (ys >= y0) & (ys < y1)
            masks.append((iny[:, None] & inx[None, :]).flatten())  # row-major patches
    return torch.stack(masks)


def anyres_crops(image: Image.Image, grids, crop_size: int, fill: tuple[int, int, int]) -> tuple[list[Image.Image], CropPlan]:
    """Base image (squashed) then row-major crops of the padded, resized image."""
    image = image.convert("RGB")
    plan = plan_crops(image.size, grids, crop_size)
    base = image.resize((crop_size, crop_size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", plan.grid, fill)
    canvas.paste(image.resize(plan.resized, Image.Resampling.BICUBIC), plan.offset)
    crops = [base]
    for r in range(plan.rows):
        for c in range(plan.cols):
            box = (c * crop_size, r * crop_size, (c + 1) * crop_size, (r + 1) * crop_size)
            crops.append(canvas.crop(box))
    return crops, plan
