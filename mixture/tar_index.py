"""Random access to the samples of a WebDataset tar, and decoding them into loader sample dicts.

The loader reads a contiguous run of samples from the middle of a shard (its share of an epoch,
or the block it resumes in). A tar is a sequence of headers and data, so an index of where each
member's data starts (built by reading headers only, seeking over data) lets it read exactly the
members it needs. Samples are grouped the webdataset way: consecutive members with the same key
(`core.shards.iter_tar_index`).
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from blip3.core.errors import UserError
from blip3.core.shards import SampleIndex, is_image_ext, iter_tar_index


def index_tar(path: str | Path) -> list[SampleIndex]:
    """Samples of a tar in order, by reading headers only (`core.shards.iter_tar_index`)."""
    try:
        return list(iter_tar_index(path))
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read tar: {' '.join(str(e).split())}", file=path) from None


def decode_sample(raw: dict[str, bytes], *, key: str, source: str, kind: str, shard: str) -> dict[str, Any]:
    """Raw members -> the loader's sample dict (docs/formats.md, "Loader samples"): json parsed, txt decoded, images kept
    as bytes under their member name (`jpg` for caption shards, `img0.jpg` for documents)."""
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"sample {key}: {key}.json is not valid JSON ({e})", file=shard) from None
    txt = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None
    images = {ext: data for ext, data in raw.items() if is_image_ext(ext)}
    return {"source": source, "kind": kind, "key": key, "json": meta, "txt": txt, "images": images}


class TarCache:
    """A few open tars and their indexes (LRU), so a run of reads does not re-index a shard."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict[str, tuple[Any, list[SampleIndex]]] = OrderedDict()

    def get(self, path: str, expected_samples: int | None = None) -> tuple[Any, list[SampleIndex]]:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        index = index_tar(path)
        if expected_samples is not None and len(index) != expected_samples:
            raise UserError(
                f"shard holds {len(index)} samples but the manifest records {expected_samples} (it changed)", file=path
            )
        f = open(path, "rb")
        self._items[path] = (f, index)
        while len(self._items) > self.size:
            _, (old, _) = self._items.popitem(last=False)
            old.close()
        return self._items[path]

    def close(self) -> None:
        for f, _ in self._items.values():
            f.close()
        self._items.clear()
