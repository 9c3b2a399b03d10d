"""Helpers for foundation tests: tiny shards made with the real writer."""

from __future__ import annotations

import io
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from PIL import Image

from blip3.core.shards import SampleRow, ShardWriter


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_caption_shard(out: Path, index: int, n: int, *, n_failed: int = 0, prefix: str = "s") -> list[str]:
    """Write shard `index` with `n` caption samples and `n_failed` failures; returns the keys."""
    keys = []
    with ShardWriter(out, index, generator={"name": "test"}) as w:
        for i in range(n):
            key = f"{prefix}{index:03d}_{i:04d}"
            img = jpeg((i * 7 % 255, 100, 50))
            caption = f"a red square number {i}"
            w.add(
                key,
                {"jpg": img, "txt": caption, "json": {"uid": key, "captions": [{"text": caption}]}},
                SampleRow(key, uid=key, width=32, height=24, image_bytes=len(img),
                          caption_length=len(caption), n_captions=1, n_ocr=i % 2, n_objects=0),
            )
            keys.append(key)
        for j in range(n_failed):
            w.add_failure(SampleRow(f"{prefix}{index:03d}_bad{j}", error_message="decode: cannot identify image file"))
    return keys


@contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at `where` (created) for the length of the block: a real full or
    read-only disk. Skips the test where this machine gives no mount rights."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
