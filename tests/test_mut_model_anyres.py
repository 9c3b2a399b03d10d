"""Any-resolution plans are values: the geometry is a pure function of the image size, and the
model recomputes it from `image_sizes`, so a plan handed out can never be changed by its holder."""

from __future__ import annotations

import dataclasses

import pytest

from blip3.model.anyres import plan_crops
from blip3.model.config import RELEASED_GRIDS_384


def test_a_plan_cannot_be_changed_and_equal_sizes_give_equal_plans():
    plan = plan_crops((997, 331), RELEASED_GRIDS_384, 384)
    assert plan == plan_crops((997, 331), RELEASED_GRIDS_384, 384)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.offset = (0, 0)  # type: ignore[misc]
    assert hash(plan) == hash(plan_crops((997, 331), RELEASED_GRIDS_384, 384))


@pytest.mark.parametrize("size, thin_side", [((10000, 1), 1), ((1, 10000), 0)])
def test_a_one_pixel_line_stays_one_pixel_thick(size, thin_side):
    """The long side fills the grid; the one-pixel side is not thickened (a 1 px line is not 2 px)."""
    plan = plan_crops(size, RELEASED_GRIDS_384, 384)
    assert plan.resized[thin_side] == 1
    assert plan.resized[1 - thin_side] == plan.grid[1 - thin_side]
    assert plan.offset[thin_side] == (plan.grid[thin_side] - 1) // 2
