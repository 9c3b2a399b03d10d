"""One greedy packing rule (`model.processor.RowPacker`) lays out `XGenMMProcessor.pack` and chooses
the samples of the trainer's packed micro-batches."""

from __future__ import annotations

import pytest

from blip3.model.processor import Encoded, RowPacker


def _enc(n: int) -> Encoded:
    return Encoded(list(range(1, n + 1)), list(range(1, n + 1)))


def test_row_packer_fills_rows_in_order_and_stops_at_max_rows():
    packer = RowPacker(10, max_rows=2)
    placed = [packer.add(_enc(n)) for n in (5, 4, 6, 3, 7)]
    assert placed == [True, True, True, True, False]  # the 7 would open a third row
    assert [[len(s) for s in row] for row in packer.rows] == [[5, 4], [6, 3]]


def test_row_packer_without_a_row_limit_and_too_long_samples():
    packer = RowPacker(10)
    assert all(packer.add(_enc(n)) for n in (5, 4, 6, 3, 7))
    assert [[len(s) for s in row] for row in packer.rows] == [[5, 4], [6, 3], [7]]
    with pytest.raises(ValueError, match="does not fit"):
        packer.add(_enc(11))
