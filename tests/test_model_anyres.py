"""Any-resolution crops: grid choice, centred black padding, base-first crops, and key masks by the
authors' unpad rule in their resampler-group order (checked against a reference written here)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import math

import torch

from blip3.model.anyres import anyres_crops, crop_patch_masks, plan_crops, release_token_groups, select_best_grid
from blip3.model.config import RELEASED_GRIDS_384
from tests.model_fixtures import noise_image, tiny_config  # noqa: F401

S, PATCH, SIDE = 384, 14, 384 // 14


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
    crops, _ = anyres_crops(noise_image(*size), RELEASED_GRIDS_384, S)
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
    masks = crop_patch_masks(size, plan, PATCH)
    assert masks.shape == (plan.n_crops, (S // PATCH) ** 2)
    assert masks[0].all()  # the base image is never padded


# 16 sizes: common photos, the released grids' own shapes, odd sizes and extreme aspect ratios.
SIXTEEN = [(640, 480), (480, 640), (1920, 1080), (1080, 1920), (1024, 768), (500, 500), (300, 600), (997, 251),
           (1200, 400), (331, 997), (1, 1), (3, 500), (500, 3), (1, 10000), (10000, 3000), (4000, 90)]


def reference_canvas(img: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """LLaVA-NeXT's resize-and-pad, written out: fit one side, ceil the other, centre on black."""
    (w, h), (gw, gh) = img.size, grid
    if gw / w < gh / h:
        nw, nh = gw, min(math.ceil(h * gw / w), gh)
    else:
        nw, nh = min(math.ceil(w * gh / h), gw), gh
    canvas = np.zeros((gh, gw, 3), np.uint8)
    top, left = (gh - nh) // 2, (gw - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC))
    return canvas


def reference_masks(size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """The unpad rule token by token: a token of the (rows*27, cols*27) grid is kept unless it lies
    in the first or last `pad` rows (or columns) of the padded side; groups are raster runs of 729."""
    (w, h), (gw, gh) = size, (grid[0] // S * SIDE, grid[1] // S * SIDE)
    keep = np.ones((gh, gw), bool)
    for y in range(gh):
        for x in range(gw):
            if w / h > gw / gh:
                pad = (gh - int(h * (gw / w))) // 2
                keep[y, x] = pad <= y < gh - pad
            else:
                pad = (gw - int(w * (gh / h))) // 2
                keep[y, x] = pad <= x < gw - pad
    flat = keep.reshape(-1)
    return np.stack([np.ones(SIDE * SIDE, bool)] + [flat[g * SIDE * SIDE : (g + 1) * SIDE * SIDE] for g in range(flat.size // (SIDE * SIDE))])


@pytest.mark.parametrize("size", SIXTEEN)
def test_canvas_is_black_padded_like_the_reference(size):
    img = noise_image(*size, seed=size[0] + size[1])
    crops, plan = anyres_crops(img, RELEASED_GRIDS_384, S)
    assert np.array_equal(np.asarray(crops[0]), np.asarray(img.resize((S, S), Image.Resampling.BICUBIC)))
    ref = reference_canvas(img, plan.grid)
    for k, crop in enumerate(crops[1:]):
        r, c = divmod(k, plan.cols)
        assert np.array_equal(np.asarray(crop), ref[r * S : (r + 1) * S, c * S : (c + 1) * S]), (size, k)


@pytest.mark.parametrize("size", SIXTEEN)
def test_key_masks_follow_the_unpad_rule(size):
    plan = plan_crops(size, RELEASED_GRIDS_384, S)
    ours = crop_patch_masks(size, plan, PATCH).numpy()
    assert np.array_equal(ours, reference_masks(size, plan.grid)), size


def test_resampler_groups_are_raster_runs_of_the_token_grid():
    """Tag each token with its (crop, y, x); group g, slot k must hold raster token g*P + k."""
    for rows, cols in ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1)):
        side = 3
        tags = torch.tensor([[(n, y, x) for y in range(side) for x in range(side)] for n in range(rows * cols)])
        groups = release_token_groups(tags, rows, cols)
        for g in range(rows * cols):
            for k in range(side * side):
                gy, gx = divmod(g * side * side + k, cols * side)
                crop = (gy // side) * cols + gx // side
                assert groups[g, k].tolist() == [crop, gy % side, gx % side]
        if cols == 1:  # one column of crops: the groups are the crops
            assert torch.equal(groups, tags)


def test_unpadded_image_has_full_masks():
    plan = plan_crops((768, 768), RELEASED_GRIDS_384, S)
    assert plan.offset == (0, 0) and crop_patch_masks((768, 768), plan, PATCH).all()


def test_zero_size_is_refused():
    with pytest.raises(ValueError):
        plan_crops((0, 10), RELEASED_GRIDS_384, S)


def test_model_feeds_the_resampler_release_groups_with_their_masks(tiny_config):
    """encode_images on a 2x2 grid = the resampler run on the regrouped ViT tokens and unpad masks."""
    from blip3.model.vision import patch_tokens
    from tests.model_fixtures import build_tiny_model

    model = build_tiny_model(tiny_config, seed=5)
    size = (50, 37)  # 2x2 grid of the tiny 32 px crops, padded top and bottom
    plan = plan_crops(size, tiny_config.anyres_grids, tiny_config.image_size)
    assert (plan.rows, plan.cols) == (2, 2)
    crops, _ = anyres_crops(noise_image(*size, seed=9), tiny_config.anyres_grids, tiny_config.image_size)
    mean, std = torch.tensor(tiny_config.image_mean)[:, None, None], torch.tensor(tiny_config.image_std)[:, None, None]
    pv = torch.stack([(torch.from_numpy(np.array(c)).permute(2, 0, 1) / 255 - mean) / std for c in crops])
    with torch.no_grad():
        got = model.encode_images(pv[None], torch.tensor([size]))
        feats = patch_tokens(model.vision_encoder, pv)
        feats = torch.cat([feats[:1], release_token_groups(feats[1:], 2, 2)])
        want = model.vision_tokenizer(feats, crop_patch_masks(size, plan, tiny_config.patch_size)).flatten(0, 1)
    assert torch.allclose(got, want, atol=1e-6)
    plain = model.vision_tokenizer(patch_tokens(model.vision_encoder, pv), crop_patch_masks(size, plan, tiny_config.patch_size))
    assert not torch.allclose(got, plain.flatten(0, 1), atol=1e-3)  # the grouping matters
