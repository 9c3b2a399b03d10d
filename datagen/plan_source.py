"""Shard plans as a Ray Data source: the first rows of a datagen job (`pipeline.build_dataset`).

The driver lists the input into plans and puts each into Ray's object store as it is listed,
keeping only the reference (so its memory stays flat however large the input). This source gives
Ray Data one read task per plan, with the row's metadata known up front: the read happens in the
stage that takes the plan (Ray Data fuses it into the first map), and nothing else runs per plan.
`ray.data.from_arrow_refs` over the same references starts one remote task per plan just to read
its metadata back, each in a worker process of its own: measured, about 0.9 CPU-seconds per shard
of 1,000 images, twice the work of the shard itself with a cheap annotator (docs/planning.md).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

SCHEMA = pa.schema([("index", pa.int64()), ("shard", pa.binary())])


@dataclass(frozen=True)
class PlanRef:
    """A listed shard plan in the object store: its index, the reference, its pickled size."""

    index: int
    ref: Any  # ray.ObjectRef of the pickled ShardPlan
    size: int


def put_plan(plan: Any) -> PlanRef:
    """Pickle a plan (refs or tar ranges, never image bytes) into Ray's object store."""
    blob = pickle.dumps(plan, protocol=5)
    return PlanRef(plan.index, ray.put(blob), len(blob))


def _read(plan: PlanRef) -> Iterable[pa.Table]:
    """The plan's one row: its index and the pickled plan."""
    yield pa.table({"index": [plan.index], "shard": [ray.get(plan.ref)]}, schema=SCHEMA)


class PlanSource(Datasource):
    """One row (and one read task) per plan, in the order given."""

    def __init__(self, plans: Sequence[PlanRef]):
        self.plans = list(plans)

    def estimate_inmemory_data_size(self) -> int:
        return sum(p.size for p in self.plans)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(lambda p=p: _read(p), BlockMetadata(num_rows=1, size_bytes=p.size, input_files=None,
                                                             exec_stats=None), schema=SCHEMA)
                for p in self.plans]

    def get_name(self) -> str:
        return "ShardPlans"
