"""A node lost mid-job on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`): the shards
in flight on it are retried elsewhere, and the job ends with the bytes of a clean run, each sample
once. Slow: three raylets on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from blip3.core.shards import file_sha256, list_shards
from blip3.datagen.images import ImageLimits
from blip3.datagen.inputs import iter_raw_refs
from blip3.datagen.pipeline import write_shard
from blip3.datagen.plans import iter_plans
from tests.test_datagen_pipeline import SizeCaptioner
from tests.test_datagen_scale import _images

REPO = Path(__file__).resolve().parents[1]


@dataclass
class StallOffHead(SizeCaptioner):
    """Stalls (as a busy node would) at the first sample it sees on a node other than `head`, once:
    `marker` records which node, so the test can remove that node while the shard is in flight."""

    head: str = ""
    marker: str = ""

    def annotate(self, image, sample):
        import ray

        node = ray.get_runtime_context().get_node_id()
        if node != self.head and not os.path.exists(self.marker):
            Path(self.marker).write_text(node)
            time.sleep(600)
        return super().annotate(image, sample)


_JOB = """
import sys
from functools import partial
from blip3.datagen.pipeline import JobOptions, run_job
from tests.test_datagen_node_loss import StallOffHead
src, out, address, head, marker = sys.argv[1:]
r = run_job(src, out, partial(StallOffHead, head=head, marker=marker),
            JobOptions(workers=2, shard_size=2, ray_address=address, register=False))
print(r.shards_written, r.samples, r.successes, r.failed)
"""


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
            raise AssertionError(f"no worker stalled on the second node (exit {proc.poll()}): {err[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_node_lost_mid_job_finishes_with_the_bytes_of_a_clean_run(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    src = _images(tmp_path / "in", 8)
    ref = tmp_path / "ref"
    ann = SizeCaptioner()
    for plan in iter_plans(iter_raw_refs(src), 2):  # the clean run's shards, written without Ray
        write_shard(ref, plan, ann, ImageLimits(), {}, ann.generator_info())

    # the raylets' workers import this module to unpickle the annotator
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    marker, out = tmp_path / "stalled-on", tmp_path / "out"
    # no CPU on the head: both annotator actors (one CPU each) start on the doomed node, so the
    # first of them to take a shard stalls there (Ray's and the job's CPU-less actors stay on the head)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    try:
        doomed = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        job = subprocess.Popen([sys.executable, "-c", _JOB, str(src), str(out), cluster.address,
                                cluster.head_node.node_id, str(marker)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(marker, job, 240)
            assert marker.read_text() == doomed.node_id
            cluster.add_node(num_cpus=2)  # the replacement the restarted actor moves to
            cluster.remove_node(doomed, allow_graceful=False)
            stdout, stderr = job.communicate(timeout=400)
        finally:
            if job.poll() is None:
                job.kill()
                job.communicate()
    finally:
        cluster.shutdown()
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.split()[-4:] == ["4", "8", "8", "0"]
    hashes = {p.name: file_sha256(p) for p in sorted(out.glob("*.tar"))}
    assert hashes == {p.name: file_sha256(p) for p in sorted(ref.glob("*.tar"))} and len(hashes) == 4
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temporaries
    assert sum(s.count for s in list_shards(out)) == 8  # each sample once
