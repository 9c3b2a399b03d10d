"""A Data-Juicer mapper op: read each sample's image, decode it, caption it from its COCO boxes.

Loaded by Data-Juicer through `custom_operator_paths` (see job_dj.py). Batched, as Data-Juicer's
own image mappers that care for speed are: one call per batch of rows. It returns the webdataset
columns the exporter writes: `__key__`, `jpg` (the input's own bytes, not re-encoded), `txt` (the
caption), `json` (key, sizes, caption).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from data_juicer.ops.base_op import OPERATORS, Mapper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption import caption, load_boxes  # noqa: E402


@OPERATORS.register_module("peers_coco_caption_mapper")
class PeersCocoCaptionMapper(Mapper):
    """Read + decode + caption from a COCO box file (`coco`), per sample."""

    _batched_op = True

    def __init__(self, coco: str = "", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.coco = coco
        self._boxes = None

    def process_batched(self, samples, *args, **kwargs):
        if self._boxes is None:
            self._boxes = load_boxes(Path(self.coco))
        keys, jpgs, txts, records = [], [], [], []
        for paths in samples[self.image_key]:
            path = Path(paths[0])
            data = path.read_bytes()
            image = Image.open(io.BytesIO(data)).convert("RGB")
            text = caption(self._boxes[path.name], image.width, image.height)
            keys.append(path.stem)
            jpgs.append(data)
            txts.append(text)
            records.append({"key": path.stem, "width": image.width, "height": image.height, "caption": text})
        # the webdataset writer takes bytes and text columns only: the path list and the empty
        # input text give way to the image's bytes and its caption
        del samples[self.image_key], samples[self.text_key]
        samples["__key__"], samples["jpg"], samples["txt"], samples["json"] = keys, jpgs, txts, records
        return samples
