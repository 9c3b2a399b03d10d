"""Our annotators and our shard format inside any Ray Data pipeline (`blip3.datagen.ray`).

    import ray.data
    from blip3.datagen.ray import OCR, ShardSink, read_shards

    ds = ray.data.read_binary_files("images/", include_paths=True)      # or read_images, read_webdataset, ...
    ds = ds.map_batches(OCR, fn_constructor_kwargs={"root": "images/"}, concurrency=2, batch_size=64)
    ds.write_datasink(ShardSink("s3://bucket/ocr"))                     # tars + parquet sidecars + stats
    again = read_shards("s3://bucket/ocr")                              # a dataset of the finished shards' samples

- `OCR`, `Grounding` and `Recaption` are callable classes for `Dataset.map_batches` (an actor each: the engine
  is loaded once). A row holds an image: encoded bytes (`bytes` of `read_binary_files`, `image`,
  or a webdataset member column such as `jpg`/`png`) or pixels (`image` of `read_images`); its
  name (`path`, `__key__` or `key`) and, optionally, `caption` / `txt` (the alt text), `uid` and
  `url`. The image is decoded and validated as `blip3 ocr` does (a bad one becomes a failed row
  with its reason, never an exception), annotated, and captioned. The output rows are what the CLI
  writes: the tar members (`key`, `ext`, `image` = the stored bytes, `txt`, `json`) and the
  sidecar columns (`status`, `error_message`, `width`, ..., `n_ocr`, `n_objects`; see
  `core.shards.SIDECAR_SCHEMA`). `--detector annotations` looks each image up by its path
  relative to `root` (or its file name), like the CLI.
- `ShardSink` writes such rows in our shard format through `core.shards` (the CLI's writer): each
  write task publishes one shard named by its task index (tar, img2dataset-style parquet sidecar,
  then `_stats.json` last, atomically), to a local folder or any fsspec URL. Rows of one shard
  are written in the order they arrive: for the CLI's exact shards, keep the order
  (`DataContext.execution_options.preserve_order`) and give one shard's rows per write task
  (`repartition`, or `ShardSink(rows_per_shard=...)`, which asks Ray Data for at least that many).
- `read_shards` gives a dataset back from our shards (finished ones only), any webdataset tars
  (a folder, one tar, a glob or brace pattern) or an img2dataset output folder.

The CLI (`datagen.pipeline`) is built from the same steps (`decode_step`, `annotate_steps`,
`record_step`, `publish_shard`); it runs them as separate Ray Data stages over shard plans, so a
GPU actor only annotates.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any, Iterable

import pyarrow as pa
from ray.data import Datasink

from blip3.core.keys import sanitize_key
from blip3.core.shards import SHARD_DIGITS, SIDECAR_SCHEMA, SampleRow, resolve_shards
from blip3.core.storage import as_location, output_location, url_scheme
from blip3.datagen.annotator import AnnotatorConfig
from blip3.datagen.images import ImageLimits, ImageOutput
from blip3.datagen.inputs import InputSample
from blip3.datagen.pipeline import Processed, annotate_steps, decode_sample, publish_shard, record_step

if TYPE_CHECKING:
    import ray.data

#: Columns of an annotated row: the tar members, then the sidecar's (`key` once).
RECORD_SCHEMA = pa.schema([("key", pa.string()), ("ext", pa.string()), ("image", pa.binary()), ("txt", pa.string()),
                           ("json", pa.string())] + [f for f in SIDECAR_SCHEMA if f.name != "key"])
#: Where a row's image may be, in the order they are looked for.
IMAGE_COLUMNS = ("image", "bytes", "jpg", "jpeg", "png", "webp")
_MEMBER_COLUMNS = ("key", "ext", "image", "txt", "json")


def _columns(batch: Any) -> dict[str, list]:
    """A batch in any of Ray Data's formats (pyarrow, pandas, dict of numpy) as lists by column."""
    if isinstance(batch, pa.Table):
        return batch.to_pydict()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return {c: list(batch[c]) for c in batch.columns}
    return {k: list(v) for k, v in batch.items()}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


class Annotate:
    """A callable class for `Dataset.map_batches` running one annotator (its config: any
    `datagen.annotator.AnnotatorConfig`) over rows holding images; see the module docstring.

    `root`: names are paths relative to it (a folder input's `source_path` and key, as the CLI's);
    `limits` / `image_output`: the CLI's `--image-format`, `--encode-quality` and image limits."""

    def __init__(self, config: AnnotatorConfig, *, root: str | os.PathLike | None = None,
                 limits: ImageLimits = ImageLimits(), image_output: ImageOutput = ImageOutput()):
        self.annotator = config()
        self.annotator.load()
        self.generator = self.annotator.generator_info()
        self.root = _root_prefix(root)
        self.limits, self.image_output = limits, image_output

    def _name(self, cols: dict[str, list], i: int) -> tuple[str, dict[str, Any]]:
        """(raw key, meta) of row `i`: from its path (relative to `root`), else its key."""
        path = cols.get("path", [None] * (i + 1))[i]
        if path:
            path = str(path)
            rel = path[len(self.root):] if self.root and path.startswith(self.root) else path.rsplit("/", 1)[-1]
            return rel.rsplit(".", 1)[0], {"path": rel}
        for column in ("key", "__key__"):
            if cols.get(column) and cols[column][i] is not None:
                return str(cols[column][i]), {}
        raise ValueError("each row needs a `path`, `key` or `__key__` column to name its sample")

    def __call__(self, batch: Any) -> pa.Table:
        cols = _columns(batch)
        column = next((c for c in IMAGE_COLUMNS if c in cols), None)
        if column is None:
            raise ValueError(f"no image column: expected one of {', '.join(IMAGE_COLUMNS)}; got {', '.join(cols)}")
        out: list[Processed] = []
        for i, image in enumerate(cols[column]):
            raw, meta = self._name(cols, i)
            caption = _text((cols.get("caption") or cols.get("txt") or [None] * (i + 1))[i])
            uid, url = (_text(cols[c][i]) if c in cols else None for c in ("uid", "url"))
            sample = InputSample(key=sanitize_key(raw), image=b"", ext="", uid=uid, url=url, source_caption=caption,
                                 meta=meta)
            item = Processed(SampleRow(key=sample.key, uid=uid, url=url, has_source_caption=bool(caption)))
            sample.image = image if isinstance(image, (bytes, bytearray)) else _encode_pixels(image)
            out.append(decode_sample(item, sample, self.limits, self.image_output))
        return records_table(record_step(item, self.generator) for item in annotate_steps(out, self.annotator))


def _root_prefix(root: str | os.PathLike | None) -> str | None:
    """`root` as the prefix of Ray Data's `path` column: absolute for a local folder, without the
    scheme for a URL (Ray Data's paths of `s3://bucket/x` read `bucket/x`)."""
    if root is None:
        return None
    text = str(root)
    scheme = url_scheme(text)
    text = text.split("://", 1)[1] if scheme not in (None, "file") else os.path.abspath(text.removeprefix("file://"))
    return text.rstrip("/") + "/"


def _encode_pixels(pixels: Any) -> bytes:
    """Pixels (`read_images`' HxWxC arrays) as a lossless PNG, decoded again by the one decode step:
    the stored image is then what the CLI stores for a PNG input of those pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def records_table(items: Iterable[Processed]) -> pa.Table:
    """Recorded samples as rows of RECORD_SCHEMA (a failed one has no members, its reason set)."""
    items = list(items)
    members = [item.members or {} for item in items]
    exts = [next((e for e in m if e not in ("txt", "json")), None) for m in members]
    data: dict[str, list] = {
        "key": [item.row.key for item in items],
        "ext": exts,
        "image": [m.get(e) if e else None for m, e in zip(members, exts)],
        "txt": [m.get("txt") for m in members],
        "json": [m.get("json") for m in members],
    }
    for f in SIDECAR_SCHEMA:
        if f.name != "key":
            data[f.name] = [getattr(item.row, f.name) for item in items]
    return pa.Table.from_pydict(data, schema=RECORD_SCHEMA)


def _processed(row: dict[str, Any]) -> Processed:
    """A row of RECORD_SCHEMA back as the recorded sample the shard writer takes."""
    sample_row = SampleRow(**{f.name: row.get(f.name) for f in SIDECAR_SCHEMA})
    if sample_row.status == "failed":
        return Processed(sample_row)
    return Processed(sample_row, {row["ext"]: row["image"], "txt": row["txt"], "json": row["json"]})


class OCR(Annotate):
    """BLIP3-OCR captions in `map_batches`: `OCR(engine="rapidocr", min_confidence=0.5, ...)` takes
    `datagen.ocr.OcrConfig`'s settings, plus `root` / `limits` / `image_output` (see `Annotate`)."""

    def __init__(self, *, root: str | os.PathLike | None = None, limits: ImageLimits = ImageLimits(),
                 image_output: ImageOutput = ImageOutput(), **settings: Any):
        from blip3.datagen.ocr import OcrConfig

        super().__init__(OcrConfig(**settings), root=root, limits=limits, image_output=image_output)


class Grounding(Annotate):
    """BLIP3-GROUNDING captions in `map_batches`: `Grounding(detector="annotations",
    annotations="coco.json")` takes `datagen.grounding.make_config`'s settings, plus `root` /
    `limits` / `image_output` (see `Annotate`)."""

    def __init__(self, *, root: str | os.PathLike | None = None, limits: ImageLimits = ImageLimits(),
                 image_output: ImageOutput = ImageOutput(), **settings: Any):
        from blip3.datagen.grounding import make_config

        super().__init__(make_config(**settings), root=root, limits=limits, image_output=image_output)


class Recaption(Annotate):
    """Knowledge-augmented dense captions in `map_batches`: `Recaption(vlm="/models/llava",
    llm="/models/llm", vlm_generation=GenerationSettings(batch_size=16))` takes
    `datagen.recaption.make_config`'s settings, plus `root` / `limits` / `image_output` (see
    `Annotate`); each `map_batches` batch is captioned in `batch_size` chunks."""

    def __init__(self, *, root: str | os.PathLike | None = None, limits: ImageLimits = ImageLimits(),
                 image_output: ImageOutput = ImageOutput(), **settings: Any):
        from blip3.datagen.recaption import make_config

        super().__init__(make_config(**settings), root=root, limits=limits, image_output=image_output)


class ShardSink(Datasink):
    """A `ray.data.Datasink` writing annotated rows (RECORD_SCHEMA) as our shards: one shard per
    write task, named by its index (`00000.tar`, `.parquet`, `_stats.json` last), to `path` (a
    folder or any fsspec URL, with `storage_options`). `generator` goes into each shard's stats.
    After `write_datasink`, `shards` holds each written shard's stats (counts, sha256, reasons)."""

    def __init__(self, path: str | os.PathLike, *, storage_options: dict[str, Any] | None = None,
                 generator: dict[str, Any] | None = None, shard_name_width: int = SHARD_DIGITS,
                 rows_per_shard: int | None = None):
        self.out = output_location(str(path), storage_options)
        self.generator = dict(generator or {})
        self.digits = shard_name_width
        self.rows_per_shard = rows_per_shard
        self.shards: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_shard

    def on_write_start(self, schema=None) -> None:
        self.out.mkdir()

    def write(self, blocks, ctx) -> dict[str, Any]:
        from ray.data.block import BlockAccessor

        rows = (_processed(r) for block in blocks for r in BlockAccessor.for_block(block).to_arrow().to_pylist())
        return publish_shard(self.out, ctx.task_idx, rows, self.generator, None, self.digits)

    def on_write_complete(self, write_result) -> None:
        self.shards = sorted(write_result.write_returns, key=lambda s: s["index"])

    def get_name(self) -> str:
        return "blip3 shards"


def read_shards(path: str | os.PathLike, *, storage_options: dict[str, Any] | None = None,
                **read_webdataset_args: Any) -> "ray.data.Dataset":
    """A dataset of the samples in our shards (their finished tars only), in webdataset tars (a
    folder, a tar, a glob or a brace pattern) or in an img2dataset output folder: one row per
    sample, `__key__` plus one column per member (raw bytes unless `decoder=` says otherwise; the
    rest of `read_webdataset_args` goes to `ray.data.read_webdataset`)."""
    import ray.data

    text = str(path)
    read_webdataset_args.setdefault("decoder", None)
    if url_scheme(text) in (None, "file"):
        tars = [str(p) for p in resolve_shards(text)]
        return ray.data.read_webdataset(tars, **read_webdataset_args)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    store = as_location(text, storage_options)
    names = set(store.names())
    finished = [n[: -len("_stats.json")] for n in names if n.endswith("_stats.json")]
    tars = sorted(f"{n}.tar" for n in finished if f"{n}.tar" in names) or sorted(n for n in names if n.endswith(".tar"))
    if not tars:
        from blip3.core.errors import UserError

        raise UserError("no .tar shards found", file=text)
    return ray.data.read_webdataset([store.path(t) for t in tars], filesystem=PyFileSystem(FSSpecHandler(store.fs)),
                                    **read_webdataset_args)


__all__ = ["Annotate", "Grounding", "OCR", "RECORD_SCHEMA", "Recaption", "ShardSink", "read_shards", "records_table"]
