"""The job in NeMo Curator 1.4 (run in its own venv by `bench_peers.py`).

    python job_nemo.py IMAGES COCO OUT [--shard-size 1000] [--cpus 2] [--executor xenna|ray_data]

Stages: NeMo's `FilePartitioningStage` (the folder's JPEGs, `shard-size` files per task) -> a
read + decode stage (file bytes -> RGB pixels in NeMo's `ImageBatch`) -> a per-sample caption
stage (COCO boxes -> `metadata["caption"]`) -> NeMo's `ImageWriterStage` (tar of `images_per_tar`
JPEGs re-encoded from the pixels, and a parquet beside it holding each image's metadata, the
caption among it). NeMo's own `ImageReaderStage` is not used: it reads webdataset tars only, through
NVIDIA DALI, and this job's input is a folder of JPEGs; the read + decode stage here does what it
does (pixels into `ImageObject.image_data`) with Pillow.

The executor is NeMo's default, Xenna (cosmos-xenna on Ray), or Ray Data; either way on a local
Ray started here (`address="local"`: never a cluster already running on the machine) with
`--cpus` CPUs and no GPU. Each stage asks for half a CPU so that all four fit on two cores.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from nemo_curator.pipeline import Pipeline
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.image.io.image_writer import ImageWriterStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import FileGroupTask, ImageBatch, ImageObject

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption import caption, load_boxes  # noqa: E402

HALF_CPU = Resources(cpus=0.5)


@dataclass
class ReadDecodeStage(ProcessingStage[FileGroupTask, ImageBatch]):
    """Each file of the group read and decoded to RGB pixels, as NeMo's DALI reader hands them on."""

    name: str = "read_decode"
    resources: Resources = field(default_factory=lambda: HALF_CPU)

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def process(self, task: FileGroupTask) -> ImageBatch:
        images = []
        for path in task.data:
            with open(path, "rb") as f:
                pixels = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
            images.append(ImageObject(image_path=path, image_id=Path(path).stem, image_data=pixels))
        return ImageBatch(dataset_name=task.dataset_name, data=images,
                          _metadata=task._metadata, _stage_perf=task._stage_perf)


@dataclass
class CaptionStage(ProcessingStage[ImageBatch, ImageBatch]):
    """A per-sample caption from the COCO boxes of the image's file name."""

    coco: str = ""
    name: str = "coco_caption"
    resources: Resources = field(default_factory=lambda: HALF_CPU)

    def setup(self, worker_metadata=None) -> None:  # noqa: ANN001 - NeMo's signature
        self._boxes = load_boxes(Path(self.coco))

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def process(self, task: ImageBatch) -> ImageBatch:
        for image in task.data:
            height, width = image.image_data.shape[:2]
            image.metadata["caption"] = caption(self._boxes[Path(image.image_path).name], width, height)
        return task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path)
    ap.add_argument("coco", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--executor", choices=("xenna", "ray_data"), default="xenna")
    args = ap.parse_args()
    pipeline = Pipeline(name="peers_caption_shards", stages=[
        FilePartitioningStage(file_paths=str(args.images), files_per_partition=args.shard_size,
                              file_extensions=[".jpg"]).with_(resources=HALF_CPU),
        ReadDecodeStage(),
        CaptionStage(coco=str(args.coco)),
        ImageWriterStage(output_dir=str(args.out), images_per_tar=args.shard_size,
                         remove_image_data=True).with_(resources=HALF_CPU),
    ])
    if args.executor == "xenna":
        from nemo_curator.backends.xenna import XennaExecutor

        # all of the CPUs given to Ray (the default keeps 5%, which rounds two CPUs down to one)
        executor = XennaExecutor(config={"cpu_allocation_percentage": 1.0})
    else:
        from nemo_curator.backends.ray_data import RayDataExecutor

        executor = RayDataExecutor()
    # the executors' own ray.init(ignore_reinit_error=True) then joins this one
    with tempfile.TemporaryDirectory(prefix="nc-ray-", dir=os.environ.get("BENCH_PEERS_TMP")) as ray_tmp:
        # Xenna's monitor lists actors through Ray's state API, which needs the dashboard: on a
        # free port, since other Ray clusters may run on the machine
        ray.init(address="local", num_cpus=args.cpus, num_gpus=0, include_dashboard=True,
                 dashboard_port=free_port(), _temp_dir=ray_tmp,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}})
        # Ray's state API (Xenna's monitor) would otherwise look for any Ray on the machine
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        try:
            pipeline.run(executor)
        finally:
            ray.shutdown()
    written = sorted(args.out.glob("*.tar"))
    print(f"nemo-curator wrote {len(written)} tars")


if __name__ == "__main__":
    main()
