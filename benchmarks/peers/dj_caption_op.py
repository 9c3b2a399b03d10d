"""Data-Juicer mapper ops: read each sample's image, decode it, caption it from its COCO boxes.

Loaded by Data-Juicer through `custom_operator_paths` (see job_dj.py). Two forms of the same op:
`peers_coco_caption_mapper` is batched (one call per batch of rows, as Data-Juicer's own mappers
that care for speed are), `peers_coco_caption_single_mapper` takes one sample per call
(`process_single`, Data-Juicer's default form of a mapper; on Ray, one row per batch). Both return
the webdataset columns the exporter writes: `__key__`, `jpg` (the input's own bytes, not
re-encoded), `txt` (the caption), `json` (key, sizes, caption). The webdataset writer takes bytes
and text columns only, so the path list and the empty input text give way to those.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from data_juicer.ops.base_op import OPERATORS, Mapper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption import caption, load_boxes  # noqa: E402


class _CocoCaption:
    """The work of both forms: one image path -> its webdataset columns."""

    def __init__(self, coco: str):
        self.coco = coco
        self._boxes = None

    def columns(self, path_text: str) -> dict:
        if self._boxes is None:
            self._boxes = load_boxes(Path(self.coco))
        path = Path(path_text)
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        text = caption(self._boxes[path.name], image.width, image.height)
        record = {"key": path.stem, "width": image.width, "height": image.height, "caption": text}
        return {"__key__": path.stem, "jpg": data, "txt": text, "json": record}


@OPERATORS.register_module("peers_coco_caption_mapper")
class PeersCocoCaptionMapper(Mapper):
    """Read + decode + caption from a COCO box file (`coco`), a batch of samples per call."""

    _batched_op = True

    def __init__(self, coco: str = "", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.coco = coco
        self._work = _CocoCaption(coco)

    def process_batched(self, samples, *args, **kwargs):
        rows = [self._work.columns(paths[0]) for paths in samples[self.image_key]]
        del samples[self.image_key], samples[self.text_key]
        for column in ("__key__", "jpg", "txt", "json"):
            samples[column] = [row[column] for row in rows]
        return samples


@OPERATORS.register_module("peers_coco_caption_single_mapper")
class PeersCocoCaptionSingleMapper(Mapper):
    """Read + decode + caption from a COCO box file (`coco`), one sample per call."""

    def __init__(self, coco: str = "", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.coco = coco
        self._work = _CocoCaption(coco)

    def process_single(self, sample, *args, **kwargs):
        row = self._work.columns(sample[self.image_key][0])
        del sample[self.image_key], sample[self.text_key]
        sample.update(row)
        return sample
