"""The peers benchmark's arithmetic and inputs (the benchmark itself runs outside the suite)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_peers import Run, make_inputs, marginal, pair_marginals
from benchmarks.peers.caption import caption, load_boxes


def _run(images: int, cpu_s: float) -> Run:
    return Run("tool", images, cpu_s, wall_s=0.0, samples_out=images, cpu_by_role={})


def test_marginal_cancels_the_fixed_cost_and_pools_the_pairs():
    # 5 s of start-up in every run; 2 ms and 4 ms per image in the two pairs
    pairs = [(_run(1000, 5 + 2.0), _run(4000, 5 + 8.0)), (_run(1000, 5 + 4.0), _run(4000, 5 + 16.0))]
    assert pair_marginals(pairs) == pytest.approx([0.002, 0.004])
    assert marginal(pairs) == pytest.approx((6.0 + 12.0) / 6000)
    # pooled over unequal pairs: weighted by their extra images, not a mean of the pairs
    uneven = [(_run(1000, 1.0), _run(2000, 2.0)), (_run(1000, 1.0), _run(4000, 10.0))]
    assert marginal(uneven) == pytest.approx(10.0 / 4000)


def test_marginal_needs_more_images_in_the_second_run():
    with pytest.raises(ValueError, match="more images"):
        marginal([(_run(4000, 8.0), _run(1000, 2.0))])


def test_smaller_inputs_are_the_first_images_of_the_larger(tmp_path):
    inputs = make_inputs(tmp_path, [3, 5])
    (small, small_coco), (big, big_coco) = inputs[3], inputs[5]
    assert sorted(p.name for p in small.iterdir()) == sorted(p.name for p in big.iterdir())[:3]
    for p in small.iterdir():
        assert p.read_bytes() == (big / p.name).read_bytes()
    boxes, all_boxes = load_boxes(small_coco), load_boxes(big_coco)
    assert set(boxes) == {p.name for p in small.iterdir()}
    assert all(boxes[name] == all_boxes[name] for name in boxes)
    assert len(json.loads(small_coco.read_text())["annotations"]) == 3


def test_caption_gives_boxes_as_fractions_of_the_image():
    assert caption([("sign", [32, 24, 64, 48])], 320, 240) == "The image contains a sign at [0.10, 0.10, 0.30, 0.30]."
    assert caption([], 320, 240) == "The image contains no annotated objects."
