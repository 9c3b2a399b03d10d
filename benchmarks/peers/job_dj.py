"""The job in Data-Juicer 1.6 on Ray Data (run in its own venv by `bench_peers.py`).

    python job_dj.py IMAGES COCO OUT [--shard-size 1000] [--cpus 2] [--per-sample]

A recipe as a Data-Juicer user writes one: the dataset is a folder of JSONL files of samples
(`images`: the image's path, `text`), the process list is one custom mapper op
(`dj_caption_op.py`: read, decode, caption from the COCO boxes; batched, or with `--per-sample`
one sample per call), the export is `webdataset` (Ray
Data's `write_webdataset`, at least `shard-size` rows per tar). Ray Data has no "at most" rows
per file, so the JSONL holds one file (one block) per `shard-size` samples and the batched op's
batch is `shard-size`: each block becomes one tar. The JSONL is written here from the folder's listing (the
listing is the job's "list" step, as in the plain loop). Data-Juicer's Ray executor runs it on a
local Ray started here (`address="local"`: never a cluster already running on the machine) with
`--cpus` CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path)
    ap.add_argument("coco", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--per-sample", action="store_true", help="the op's one-sample-per-call form")
    args = ap.parse_args()
    from data_juicer.config import init_configs
    from data_juicer.core.executor.ray_executor import RayExecutor

    # kept (under the bench's own temporary folder): Data-Juicer's loggers still write there at exit
    work = Path(tempfile.mkdtemp(prefix="dj-", dir=os.environ.get("BENCH_PEERS_TMP")))
    dataset = work / "samples"
    dataset.mkdir()
    paths = sorted(args.images.glob("*.jpg"))
    for index, start in enumerate(range(0, len(paths), args.shard_size)):
        with (dataset / f"{index:05d}.jsonl").open("w") as f:
            for path in paths[start:start + args.shard_size]:
                f.write(json.dumps({"images": [str(path)], "text": ""}) + "\n")
    if args.per_sample:
        op = {"peers_coco_caption_single_mapper": {"coco": str(args.coco)}}
    else:  # one op batch per input file (one block), so each block becomes one tar
        op = {"peers_coco_caption_mapper": {"coco": str(args.coco), "batch_size": args.shard_size}}
    recipe = work / "recipe.yaml"
    recipe.write_text(json.dumps({
        "project_name": "peers-caption-shards",
        "executor_type": "ray",
        "dataset_path": str(dataset),
        "export_path": str(args.out),
        "export_type": "webdataset",
        "export_extra_args": {"min_rows_per_file": args.shard_size},
        "work_dir": str(work / "work"),
        "custom_operator_paths": [str(HERE / "dj_caption_op.py")],
        "process": [op],
    }))
    ray.init(address="local", num_cpus=args.cpus, num_gpus=0, include_dashboard=False, _temp_dir=str(work / "ray"),
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    try:
        cfg = init_configs(args=["--config", str(recipe)])
        RayExecutor(cfg).run()
    finally:
        ray.shutdown()
    print(f"data-juicer wrote {len(list(args.out.glob('*.tar')))} tars")


if __name__ == "__main__":
    main()
