"""The released datasets as sources: rows in their published layouts + local images -> our shards.

The captions (and preference pairs, conversations) are kept as released: nothing is re-OCR'd or
re-detected. Images are not in the rows (the caption sets list URLs): fetch them first and pass
the folder as `images`, where a row's image is `<images>/<id>.<ext>` (caption sets: `uid`, or
KALE's `key`) or the row's own relative path (VLFeedback `img_path`, VLGuard `image`). A row whose
image is missing, outside the folder or undecodable becomes a failed row with its reason.

| kind              | published layout (one row)                                         | shards  |
|-------------------|--------------------------------------------------------------------|---------|
| `blip3-ocr`       | blip3-ocr-200m: `uid`, `url`, `captions` (JSON: the 12 variants),  | caption |
|                   | `metadata` (JSON: `{"entries": [...]}`)                            |         |
| `blip3-grounding` | blip3-grounding-50m: `uid`, `url`, `captions` (list of `{text,..}`)| caption |
|                   | `metadata` (objects or entries; else read from the textual caption)|         |
| `blip3-kale`      | BLIP3-KALE: `key` (or `uid`), `url`, `caption` (the dense caption) | caption |
| `vlfeedback`      | VLFeedback: `id`, `prompt`, `img_path`, `completions` (`model`,    | dpo     |
|                   | `response`, `annotations: {aspect: {"Rating": r}}`)                |         |
| `vlguard`         | VLGuard train.json: `id`, `image`, `safe`, `instr-resp` (a list of | sft     |
|                   | `{safe_instruction|unsafe_instruction|instruction, response}`)     |         |

VLFeedback keeps, per prompt, the completion with the highest average rating (over the rated
aspects) as chosen and the lowest as rejected, as the paper does (62.6k pairs); a prompt whose
completions all score the same gives no pair (a failed row `no_preference`). Ties for highest or
lowest go to the first completion listed. VLGuard gives one single-turn conversation per
instruction-response pair.

Rows are untrusted: a row of the wrong shape is a failed row with its reason (`bad_row: …`,
`bad_path: …`), never the end of the import. Ids (`uid`, `key`, `id`) are strings or integers
of at most MAX_ID_CHARS characters without control characters (they name image files and
samples); image paths are strings without control characters, inside the images folder; JSON
columns hold the shape their layout says (`metadata` an object, `entries`/`objects` lists, a bbox
four finite numbers, `annotations` an object). Text kept from a row (captions, prompts,
responses, instructions) is imported as data (`imported_text`): control characters but newlines
and tabs are dropped, and model control-token spellings (`<image>`, `<|endofchunk|>`, `<|end|>`,
`<|assistant|>`, ...) are escaped (`model.control_tokens`), so no released text becomes a model
control token in training.
"""

from __future__ import annotations

import errno
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from blip3.core.errors import UserError
from blip3.core.keys import sanitize_key
from blip3.core.shards import IMAGE_EXTS, SampleRow, ShardWriter
from blip3.datagen.caption_text import strip_controls
from blip3.datagen.grounding_captions import GroundedObject, parse_textual_tags
from blip3.model.control_tokens import escape_control_tokens

RELEASED_KINDS = ("blip3-ocr", "blip3-grounding", "blip3-kale", "vlfeedback", "vlguard")
SOURCE_KIND = {"blip3-ocr": "caption", "blip3-grounding": "caption", "blip3-kale": "caption",
               "vlfeedback": "dpo", "vlguard": "sft"}
OCR_DEFAULT = {"granularity": 4, "include_datacomp_raw_cap": False}  # our OCR engine's default `.txt`
#: The longest id a row may have: ids name image files (`<id>.<ext>`, 255 bytes at most on most
#: file systems) and are kept in the catalog; the released sets' ids are far shorter.
MAX_ID_CHARS = 200


class RowError(ValueError):
    """A row that cannot be imported; its message becomes the failed row's reason."""


@dataclass
class ImportResult:
    shards: int = 0
    samples: int = 0
    failed: dict[str, int] = field(default_factory=dict)


# -- reading rows ------------------------------------------------------------------------------
def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a parquet, JSON Lines or JSON file (a list, or `{"data": [...]}`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError("not a file", file=p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"not a readable parquet file ({' '.join(str(e).split())[:120]})", file=p) from None
        for batch in batches:
            yield from batch.to_pylist()
    elif suffix == ".jsonl":
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"line {n} is not UTF-8 text", file=p) from None
                if line.strip():
                    yield _json_line(line, p, n)
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"not valid JSON ({type(e).__name__}: {str(e)[:80]})", file=p) from None
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise UserError("expected a list of rows (or {\"data\": [...]})", file=p)
        yield from rows
    else:
        raise UserError("rows must be .parquet, .jsonl or .json", file=p)


def _json_line(line: str, p: Path, n: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"line {n} is not valid JSON ({type(e).__name__}: {str(e)[:80]})", file=p) from None


def _json_field(row: dict, name: str, default: Any = None) -> Any:
    """A column that the parquet layouts store as a JSON string and the JSON layouts inline."""
    value = row.get(name, default)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise RowError(f"bad_row: {name} is not valid JSON") from None
    return value


def _json_object(row: dict, name: str) -> dict[str, Any]:
    """A JSON-object column (absent or empty: {})."""
    value = _json_field(row, name) or {}
    if not isinstance(value, dict):
        raise RowError(f"bad_row: {name} must be a JSON object, got {type(value).__name__}")
    return value


def _list_of_objects(value: Any, name: str) -> list[dict[str, Any]]:
    value = value or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RowError(f"bad_row: {name} must be a list of objects")
    return value


def imported_text(text: str) -> str:
    """Released text as our shards keep it: control characters but newlines and tabs dropped, and
    model control-token spellings escaped (the module's docstring)."""
    return escape_control_tokens(strip_controls(text, keep_newlines=True))


def _clean_field(value: Any, name: str) -> str:
    """An id or path from a row: a string (or an integer id) without control characters."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"bad_row: {name} must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if strip_controls(text) != text:
        raise RowError(f"bad_row: {name} holds a control character ({text[:40]!r})")
    return text


# -- images ------------------------------------------------------------------------------------
class ImageFolder:
    """Images of the rows, looked up inside one folder only (row paths are untrusted)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise UserError("not a folder of images", field="--images", file=root)

    def by_id(self, ident: str) -> Path:
        if len(f"{ident}.jpeg".encode()) > 255:
            raise RowError(f"bad_row: id is {len(ident)} characters, too long for an image file name")
        for ext in IMAGE_EXTS:
            for name in (f"{ident}.{ext}", f"{ident}.{ext.upper()}"):
                p = (self.root / name).resolve()
                if p.is_relative_to(self.root) and p.is_file():
                    return p
        raise RowError(f"missing_image: no {ident}.<{'|'.join(IMAGE_EXTS)}> in the images folder")

    def by_path(self, rel: str) -> Path:
        try:
            p = (self.root / rel).resolve()
            if not p.is_relative_to(self.root):
                raise RowError(f"bad_path: image path {rel!r} leaves the images folder")
            if not p.is_file():
                raise RowError(f"missing_image: {rel}")
        except OSError as e:  # a name too long for the file system, a loop of links
            raise RowError(f"bad_path: {rel[:80]!r}: {e.strerror or errno.errorcode.get(e.errno, e)}") from None
        return p

    @staticmethod
    def read(path: Path) -> tuple[bytes, str, tuple[int, int]]:
        """(bytes, ext, (width, height)); undecodable files are a `decode:` failure."""
        from PIL import Image

        try:
            data = path.read_bytes()
        except OSError as e:  # unreadable (permissions), a folder
            raise RowError(f"read: {path.name}: {e.strerror}") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
        except Exception as e:  # PIL raises many types for bad files (a bomb is not an OSError)
            raise RowError(f"decode: {path.name}: {type(e).__name__}") from None
        ext = path.suffix.lower().lstrip(".")
        return data, ("jpg" if ext == "jpeg" else ext), size


# -- one row per kind -> (key, members, row stats) ---------------------------------------------
Converted = tuple[str, dict[str, Any], dict[str, Any]]


def _caption_list(row: dict) -> list[dict]:
    caps = _json_field(row, "captions")
    if not isinstance(caps, list) or not caps or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in caps):
        raise RowError("bad_row: captions must be a non-empty list of {text, ...}")
    return [{**c, "text": imported_text(c["text"])} for c in caps]


def _ident(row: dict, *names: str) -> str:
    """The row's id: the first of `names` it has."""
    for n in names:
        if row.get(n) not in (None, ""):
            ident = _clean_field(row[n], n)
            if len(ident) > MAX_ID_CHARS:
                raise RowError(f"bad_row: {n} is {len(ident)} characters, at most {MAX_ID_CHARS}")
            return ident
    raise RowError(f"bad_row: no {' / '.join(names)}")


def _image_path(row: dict, *names: str) -> str:
    """The row's relative image path: the first of `names` it has."""
    for n in names:
        if row.get(n) not in (None, ""):
            if not isinstance(row[n], str):
                raise RowError(f"bad_row: {n} must be a path, got {type(row[n]).__name__}")
            return _clean_field(row[n], n)
    raise RowError(f"bad_row: no {' / '.join(names)}")


def _url(row: dict) -> str | None:
    url = row.get("url")
    if url is not None and not isinstance(url, str):
        raise RowError(f"bad_row: url must be a string, got {type(url).__name__}")
    return url


def _grounded_object(o: dict, j: int) -> GroundedObject:
    label, box, score = o.get("label"), o.get("bbox"), o.get("score", 1.0)
    where = f"metadata.objects[{j}]"
    if not isinstance(label, str) or not label.strip():
        raise RowError(f"bad_row: {where}.label must be a non-empty string")
    if not isinstance(box, list) or len(box) != 4 or not all(_finite(v) for v in box):
        raise RowError(f"bad_row: {where}.bbox must be 4 finite numbers, got {json.dumps(box)[:60]}")
    if not _finite(score):
        raise RowError(f"bad_row: {where}.score must be a finite number")
    return GroundedObject.from_dict({"label": label, "bbox": box, "score": score})


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ocr(row: dict, images: ImageFolder) -> Converted:
    uid = _ident(row, "uid")
    caps = _caption_list(row)
    meta = _json_object(row, "metadata")
    entries = _list_of_objects(meta.get("entries"), "metadata.entries")
    data, ext, (w, h) = images.read(images.by_id(uid))
    txt = next((c["text"] for c in caps if all(c.get(k) == v for k, v in OCR_DEFAULT.items())), caps[0]["text"])
    record = {"uid": uid, "url": _url(row), "width": w, "height": h, "captions": caps, "metadata": meta}
    return uid, {ext: data, "txt": txt, "json": record}, {"n_captions": len(caps), "n_ocr": len(entries)}


def _grounding_format(text: str) -> str:
    return "bbox" if "<bbox>" in text else ("textual" if "starts at" in text else "positional")


def _grounding(row: dict, images: ImageFolder) -> Converted:
    uid = _ident(row, "uid")
    caps = [{**c, "format": c.get("format") or _grounding_format(c["text"]), "style": c.get("style") or "tags"}
            for c in _caption_list(row)]
    meta = _json_object(row, "metadata")
    if meta.get("objects"):
        objects = [_grounded_object(o, j) for j, o in enumerate(_list_of_objects(meta["objects"], "metadata.objects"))]
    else:  # rebuilt from the textual caption (either spelling), so `blip3 retemplate` works
        textual = next((c["text"] for c in caps if c["format"] == "textual"), "")
        objects = parse_textual_tags(textual)
    data, ext, (w, h) = images.read(images.by_id(uid))
    txt = next((c["text"] for c in caps if c["format"] == "positional"), caps[0]["text"])
    source = row.get("cogvlm_caption")
    record = {"uid": uid, "url": _url(row), "width": w, "height": h, "captions": caps,
              "source_caption": imported_text(source) if isinstance(source, str) else None,
              "metadata": {**meta, "objects": [o.to_dict() for o in objects]}}
    return uid, {ext: data, "txt": txt, "json": record}, {"n_captions": len(caps), "n_objects": len(objects)}


def _kale(row: dict, images: ImageFolder) -> Converted:
    ident = _ident(row, "key", "uid")
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise RowError("bad_row: no caption")
    caption = imported_text(caption)
    data, ext, (w, h) = images.read(images.by_id(ident))
    record = {"uid": ident, "url": _url(row), "width": w, "height": h,
              "captions": [{"text": caption, "style": "dense"}]}
    return ident, {ext: data, "txt": caption, "json": record}, {"n_captions": 1}


def _completions(row: dict) -> list[dict]:
    comps = _json_field(row, "completions")
    if isinstance(comps, dict):  # a columnar dict of lists (datasets' Sequence of a struct)
        names = list(comps)
        comps = [dict(zip(names, vals)) for vals in zip(*(comps[n] for n in names))]
    if not isinstance(comps, list) or not comps:
        raise RowError("bad_row: completions must be a non-empty list")
    return _list_of_objects(comps, "completions")


def average_rating(completion: dict) -> float | None:
    """Mean of the numeric `Rating`s over a completion's annotated aspects (None without any).

    An aspect without a number (`"N/A"`, missing, NaN, infinite) is left out of the mean, not
    counted as 0: a completion rated 5 on two aspects and N/A on the third averages 5."""
    ann = _json_field(completion, "annotations")
    if ann is not None and not isinstance(ann, dict):
        raise RowError(f"bad_row: annotations must be a JSON object, got {type(ann).__name__}")
    scores = []
    for aspect in (ann or {}).values():
        rating = aspect.get("Rating") if isinstance(aspect, dict) else None
        try:
            score = float(rating)
        except (TypeError, ValueError):
            continue
        if math.isfinite(score):
            scores.append(score)
    return sum(scores) / len(scores) if scores else None


def _vlfeedback(row: dict, images: ImageFolder) -> Converted:
    ident = _ident(row, "id")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError("bad_row: no prompt")
    rated = [(s, c) for c in _completions(row) if (s := average_rating(c)) is not None and isinstance(c.get("response"), str)]
    if len(rated) < 2:
        raise RowError(f"no_preference: {len(rated)} rated completion(s)")
    best = max(rated, key=lambda sc: sc[0])  # max/min return the first of equals
    worst = min(rated, key=lambda sc: sc[0])
    if best[0] == worst[0]:
        raise RowError(f"no_preference: every completion scores {best[0]:g}")
    data, ext, _ = images.read(images.by_path(_image_path(row, "img_path", "image")))
    record = {"id": ident, "prompt": imported_text(prompt), "chosen": imported_text(best[1]["response"]),
              "rejected": imported_text(worst[1]["response"]),
              "images": [f"0.{ext}"], "scores": [best[0], worst[0]],
              "models": [best[1].get("model"), worst[1].get("model")]}
    return ident, {f"0.{ext}": data, "json": record}, {}


def _vlguard(row: dict, images: ImageFolder) -> list[Converted]:
    ident = _ident(row, "id")
    pairs = row.get("instr-resp")
    if not isinstance(pairs, list) or not pairs:
        raise RowError("bad_row: instr-resp must be a non-empty list")
    data, ext, _ = images.read(images.by_path(_image_path(row, "image")))
    out = []
    for j, pair in enumerate(pairs):
        kind = next((k for k in ("safe_instruction", "unsafe_instruction", "instruction")
                     if isinstance(pair, dict) and k in pair), None)
        if kind is None or not isinstance(pair[kind], str) or not isinstance(pair.get("response"), str):
            raise RowError(f"bad_row: instr-resp[{j}] needs an instruction and a response (strings)")
        record = {"conversations": [{"role": "user", "content": imported_text(pair[kind])},
                                    {"role": "assistant", "content": imported_text(pair["response"])}],
                  "images": [f"0.{ext}"], "id": ident, "safe_image": bool(row.get("safe")), "instruction_kind": kind}
        out.append((f"{ident}_{j}", {f"0.{ext}": data, "json": record}, {}))
    return out


CONVERTERS: dict[str, Callable[[dict, ImageFolder], Converted | list[Converted]]] = {
    "blip3-ocr": _ocr, "blip3-grounding": _grounding, "blip3-kale": _kale,
    "vlfeedback": _vlfeedback, "vlguard": _vlguard,
}
GENERATOR_NAME = {"blip3-ocr": "ocr", "blip3-grounding": "grounding"}  # what retemplate / export expect


# -- writing -----------------------------------------------------------------------------------
class _Shards:
    """Consecutive shards of at most `size` rows (successes and failures)."""

    def __init__(self, out: Path, size: int, generator: dict[str, Any]):
        self.out, self.size, self.generator = out, size, generator
        self.index, self.rows, self.writer = 0, 0, None
        self.keys: set[str] = set()

    def _current(self) -> ShardWriter:
        if self.writer is None or self.rows >= self.size:
            self.close()
            self.writer = ShardWriter(self.out, self.index, generator=self.generator)
            self.index += 1
            self.rows = 0
        self.rows += 1
        return self.writer

    def key(self, raw: str) -> str:
        base = key = sanitize_key(raw)
        n = 0
        while key in self.keys:
            n += 1
            key = f"{base}_{n}"
        self.keys.add(key)
        return key

    def add(self, raw_key: str, members: dict[str, Any], stats: dict[str, Any], uid: str | None, url: str | None) -> None:
        key = self.key(raw_key)
        self._current().add(key, members, SampleRow(key, uid=uid, url=url, **stats))

    def fail(self, raw_key: str, reason: str, uid: str | None, url: str | None) -> None:
        key = self.key(raw_key)
        self._current().add_failure(SampleRow(key, uid=uid, url=url, error_message=reason))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        """Drop the shard being written (finished ones stay: they are whole)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _recorded(value: Any) -> str | None:
    """A row's uid or url as its sidecar row records it: as given when it is a clean string (or an
    integer), else nothing (the failed row's reason says what was wrong with it)."""
    try:
        return None if value is None else _clean_field(value, "")
    except RowError:
        return None


def import_released(kind: str, rows: str | Path, images: str | Path, output: str | Path,
                    *, shard_size: int = 1000) -> ImportResult:
    """Write `rows` of released dataset `kind` with their local images as shards in `output`."""
    if kind not in RELEASED_KINDS:
        raise UserError(f"unknown released dataset {kind!r}; one of {', '.join(RELEASED_KINDS)}", field="KIND")
    if shard_size < 1:
        raise UserError("must be >= 1", field="--shard-size")
    out = Path(output)
    if out.exists() and any(out.glob("*.tar")):
        raise UserError("already holds shards; import into an empty folder", file=out)
    folder = ImageFolder(images)
    convert = CONVERTERS[kind]
    shards = _Shards(out, shard_size, {"name": GENERATOR_NAME.get(kind, "import"), "imported_from": kind,
                                       "source_kind": SOURCE_KIND[kind]})
    result = ImportResult()
    try:
        for n, row in enumerate(read_rows(rows)):
            if not isinstance(row, dict):
                shards.fail(f"row{n}", "bad_row: not a mapping", None, None)
                result.failed["bad_row"] = result.failed.get("bad_row", 0) + 1
                continue
            ident = str(row.get("uid") or row.get("key") or row.get("id") or f"row{n}")
            uid, url = _recorded(row.get("uid")), _recorded(row.get("url"))
            try:
                got = convert(row, folder)
            except RowError as e:
                reason = str(e)
                shards.fail(ident, reason, uid, url)
                tag = reason.split(":")[0]
                result.failed[tag] = result.failed.get(tag, 0) + 1
                continue
            for key, members, stats in got if isinstance(got, list) else [got]:
                members = {k: (json.dumps(v, ensure_ascii=False) if k == "json" else v) for k, v in members.items()}
                shards.add(key, members, stats, uid, url)
                result.samples += 1
    except BaseException:
        shards.abort()
        raise
    shards.close()
    result.shards = shards.index
    return result
