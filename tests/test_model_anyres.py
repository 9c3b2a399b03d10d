"""Any-resolution crops: grid choice, centred padding, base-first crops and per-crop key masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from blip3.model.anyres import anyres_crops, crop_patch_masks, plan_crops, select_best_grid
from blip3.model.config import RELEASED_GRIDS_384
from tests.model_fixtures import noise_image

S, PATCH, FILL = 384, 14, (128, 128, 128)


@pytest.mark.parametrize(
    "size, grid, n_crops",
    [
        ((300, 600), (384, 768), 3),
        ((600, 300), (768, 384), 3),
        ((800, 800), (768, 768), 5),
        ((1200, 400), (1152, 384), 4),
        ((400, 1200), (384, 1152), 4),
    ],
)
def test_each_released_grid_is_picked_for_its_shape(size, grid, n_crops):
    assert select_best_grid(size, RELEASED_GRIDS_384) == grid
    plan = plan_crops(size, RELEASED_GRIDS_384, S)
    assert plan.grid == grid and plan.n_crops == n_crops
    crops, _ = anyres_crops(noise_image(*size), RELEASED_GRIDS_384, S, FILL)
    assert len(crops) == n_crops and all(c.size == (S, S) for c in crops)


def test_most_effective_resolution_then_least_waste():
    # 500x500 fits 768x768 at full resolution (250000 px), the others only at 384x384
    assert select_best_grid((500, 500), RELEASED_GRIDS_384) == (768, 768)
    # a small square: every grid keeps all 100x100 pixels, the least wasted canvas wins (first on ties)
    assert select_best_grid((100, 100), RELEASED_GRIDS_384) == (384, 768)


@pytest.mark.parametrize("size", [(1, 1), (3, 500), (500, 3), (1, 10000), (997, 331), (10000, 3000), (384, 384)])
def test_odd_tiny_and_huge_images_are_centred_and_fit(size):
    plan = plan_crops(size, RELEASED_GRIDS_384, S)
    (gw, gh), (nw, nh), (ox, oy) = plan.grid, plan.resized, plan.offset
    assert 1 <= nw <= gw and 1 <= nh <= gh
    assert nw == gw or nh == gh  # fitted to one side
    assert (ox, oy) == ((gw - nw) // 2, (gh - nh) // 2)
    # aspect ratio kept within the rounding of one pixel
    assert abs(nw / nh - size[0] / size[1]) <= max(1 / nh, size[0] / size[1] / nh) + 1e-9 or min(nw, nh) == 1
    masks = crop_patch_masks(plan, PATCH)
    assert masks.shape == (plan.n_crops, (S // PATCH) ** 2)
    assert masks[0].all()  # the base image is never padded


def test_crops_are_base_first_row_major_and_masks_mark_padding():
    """Every masked-out patch centre is padding colour; every kept one lies on the image."""
    img = noise_image(997, 251, seed=1)  # ~4:1, odd sizes -> (1152, 384) grid with vertical padding
    crops, plan = anyres_crops(img, RELEASED_GRIDS_384, S, FILL)
    assert plan.grid == (1152, 384) and plan.resized[1] < 384
    assert np.array_equal(np.asarray(crops[0]), np.asarray(img.resize((S, S), Image.Resampling.BICUBIC)))
    canvas = Image.new("RGB", plan.grid, FILL)
    canvas.paste(img.resize(plan.resized, Image.Resampling.BICUBIC), plan.offset)
    masks = crop_patch_masks(plan, PATCH).reshape(plan.n_crops, S // PATCH, S // PATCH)
    centres = np.arange(S // PATCH) * PATCH + PATCH // 2
    for k, crop in enumerate(crops[1:]):
        r, c = divmod(k, plan.cols)
        assert np.array_equal(np.asarray(crop), np.asarray(canvas.crop((c * S, r * S, (c + 1) * S, (r + 1) * S))))
        px = np.asarray(crop)[centres][:, centres]  # (27, 27, 3) patch-centre pixels
        is_fill = (px == np.array(FILL)).all(-1)
        assert np.array_equal(~masks[k + 1].numpy(), is_fill)
    frac = masks[1:].float().mean().item()
    assert 0 < frac < 1 and abs(frac - plan.resized[1] / 384) < 2 * PATCH / 384


def test_unpadded_image_has_full_masks():
    plan = plan_crops((768, 768), RELEASED_GRIDS_384, S)
    assert plan.offset == (0, 0) and crop_patch_masks(plan, PATCH).all()


def test_zero_size_is_refused():
    with pytest.raises(ValueError):
        plan_crops((0, 10), RELEASED_GRIDS_384, S)
