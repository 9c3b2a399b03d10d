"""The plain loop: the job as a one-process script with no framework writes it.

    python job_loop.py IMAGES COCO OUT [--shard-size 1000] [--reencode]

List the folder; per image read the bytes, decode them (Pillow, to RGB), caption from the COCO
boxes, and add `<key>.jpg`, `<key>.txt`, `<key>.json` to a tar (tarfile); one parquet per shard
(key, caption, sizes, sha256). `--reencode` stores the decoded pixels re-encoded as JPEG (quality
92, as NeMo Curator's `ImageWriterStage` must) in place of the input's own bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption import caption, load_boxes  # noqa: E402


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path)
    ap.add_argument("coco", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--reencode", action="store_true")
    args = ap.parse_args()
    boxes = load_boxes(args.coco)
    args.out.mkdir(parents=True)
    files = sorted(args.images.glob("*.jpg"))
    for index, start in enumerate(range(0, len(files), args.shard_size)):
        rows = []
        with tarfile.open(args.out / f"{index:05d}.tar", "w") as tar:
            for path in files[start:start + args.shard_size]:
                data = path.read_bytes()
                image = Image.open(io.BytesIO(data)).convert("RGB")
                text = caption(boxes[path.name], image.width, image.height)
                if args.reencode:
                    buf = io.BytesIO()
                    image.save(buf, format="JPEG", quality=92)
                    data = buf.getvalue()
                record = {"key": path.stem, "width": image.width, "height": image.height, "caption": text}
                add(tar, f"{path.stem}.jpg", data)
                add(tar, f"{path.stem}.txt", text.encode())
                add(tar, f"{path.stem}.json", json.dumps(record).encode())
                rows.append({**record, "sha256": hashlib.sha256(data).hexdigest()})
        pq.write_table(pa.Table.from_pylist(rows), args.out / f"{index:05d}.parquet")


if __name__ == "__main__":
    main()
