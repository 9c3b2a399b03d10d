"""Sample records, one class per source kind: the one place that knows what a caption,
interleaved, sft or dpo sample holds (docs/formats.md, "Sample records per kind").

A sample is the members of one key in a tar (`<key>.<ext>`); its record is the parsed
`<key>.json` (empty for a caption sample without one) and `txt` its decoded `<key>.txt`. For each
kind this module says:

- `validate`: whether the record fits the kind (`RecordError` says why);
- `texts`: the text the sample contributes, which `caption_length` counts and token counts tokenise;
- `image_names`: its image members, in the order the record uses them;
- `content`: what a model is given (`Caption`, `Document`, `Chat` or `Preference`), which the
  trainer encodes (`train/data.py`) without reading record fields itself;
- and, for every kind alike, `sidecar_row`: its row of the sidecar parquet, for tars that were
  written without one (other tools' shards, the tiny generator).

Grounding objects live in `metadata.objects`, which is what `blip3 ground` writes. Records in the
public BLIP3-GROUNDING card's shape keep them in a top-level `objects`; `grounding_objects` reads
that only when `metadata.objects` is absent, and nothing else looks for objects.

Adding a source kind means one class here, registered in `RECORD_KINDS` (with a content type if
none of the four fits), plus how the trainer encodes that content (`train/data.py`) and its
section in docs/formats.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from blip3.core.shards import SampleRow, is_image_ext


class RecordError(ValueError):
    """A record that does not fit its kind; the message says what is wrong, callers add where."""


def image_members(members: Mapping[str, Any]) -> list[str]:
    """Names of the members that hold an image (sorted; `__key__`-style fields skipped)."""
    return sorted(k for k in members if not k.startswith("__") and is_image_ext(k))


# -- what a model is given, per kind (image members by name; the reader holds their bytes) ------
@dataclass(frozen=True)
class Caption:
    """One image and its caption."""

    text: str
    image: str


@dataclass(frozen=True)
class Document:
    """Interleaved text and images: at each position a text or an image (the other is None)."""

    texts: list[str | None]
    images: list[str | None]


@dataclass(frozen=True)
class Chat:
    """A conversation of `{role, content}` turns; `<image>` tags take `images` in order."""

    turns: list[dict[str, Any]]
    images: list[str]


@dataclass(frozen=True)
class Preference:
    """A prompt (with its images), the preferred answer and the rejected one."""

    prompt: str
    chosen: str
    rejected: str
    images: list[str]


Content = Union[Caption, Document, Chat, Preference]


class RecordKind:
    """What one source kind's samples hold. Subclasses define the kind-specific parts."""

    name: ClassVar[str]

    def read(self, rec: dict[str, Any], txt: str | None, members: Mapping[str, Any]) -> Content:
        """The sample's content, after `validate` (RecordError when the record does not fit)."""
        self.validate(rec, members)
        return self.content(rec, txt, members)

    def content(self, rec: dict[str, Any], txt: str | None, members: Mapping[str, Any]) -> Content:
        """What a model is given from a valid record."""
        raise NotImplementedError

    def validate(self, rec: dict[str, Any], members: Mapping[str, Any]) -> None:
        """Raise RecordError when `rec` (with these members) is not a sample of this kind."""
        self._check_fields(rec, members)
        missing = [n for n in self.image_names(rec, members) if n not in members]
        if missing:
            raise RecordError(f"image member(s) {', '.join(missing)} listed in json but absent from the tar")

    def _check_fields(self, rec: dict[str, Any], members: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def texts(self, rec: dict[str, Any], txt: str | None) -> list[str]:
        """The texts the sample contributes, in order (empty ones left out)."""
        raise NotImplementedError

    def image_names(self, rec: dict[str, Any], members: Mapping[str, Any]) -> list[str]:
        """Its image members, in the order the record uses them."""
        return [n for n in rec.get("images") or [] if n]


def _check_image_list(rec: dict[str, Any]) -> None:
    images = rec.get("images")
    if images is not None and not (isinstance(images, list) and all(isinstance(n, str) for n in images)):
        raise RecordError("json 'images' must be a list of image member names")


class CaptionRecord(RecordKind):
    """An image and its caption: `<key>.txt`, else the json's `caption`."""

    name = "caption"

    def _check_fields(self, rec, members) -> None:
        if not image_members(members):
            raise RecordError("a caption sample needs an image member (<key>.jpg, .png, ...)")

    def texts(self, rec, txt) -> list[str]:
        text = txt if txt else rec.get("caption")
        return [text] if isinstance(text, str) and text else []

    def image_names(self, rec, members) -> list[str]:
        return image_members(members)[:1]

    def content(self, rec, txt, members) -> Caption:
        return Caption("".join(self.texts(rec, txt)), self.image_names(rec, members)[0])


class InterleavedRecord(RecordKind):
    """A document: parallel `texts` / `images` lists, one of the two set at each position."""

    name = "interleaved"

    def _check_fields(self, rec, members) -> None:
        texts, images = rec.get("texts"), rec.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise RecordError("json needs 'texts' and 'images' lists of equal length")

    def texts(self, rec, txt) -> list[str]:
        return [t for t in rec.get("texts") or [] if isinstance(t, str) and t]

    def content(self, rec, txt, members) -> Document:
        return Document(list(rec["texts"]), list(rec["images"]))


class SftRecord(RecordKind):
    """A conversation: `conversations` of `{role, content}`, `<image>` tags in order of `images`."""

    name = "sft"

    def _check_fields(self, rec, members) -> None:
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                                 and isinstance(t.get("content"), str) for t in conv):
            raise RecordError("json needs 'conversations': [{role, content}, ...] of strings")
        _check_image_list(rec)

    def texts(self, rec, txt) -> list[str]:
        return [t["content"] for t in rec.get("conversations") or [] if isinstance(t.get("content"), str) and t["content"]]

    def content(self, rec, txt, members) -> Chat:
        return Chat(list(rec["conversations"]), self.image_names(rec, members))


class DpoRecord(RecordKind):
    """A preference pair: `prompt`, `chosen`, `rejected` and the prompt's `images`."""

    name = "dpo"

    def _check_fields(self, rec, members) -> None:
        if not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise RecordError("json needs string 'prompt', 'chosen' and 'rejected'")
        _check_image_list(rec)

    def texts(self, rec, txt) -> list[str]:
        return [rec[k] for k in ("prompt", "chosen", "rejected") if isinstance(rec.get(k), str) and rec[k]]

    def content(self, rec, txt, members) -> Preference:
        return Preference(rec["prompt"], rec["chosen"], rec["rejected"], self.image_names(rec, members))


RECORD_KINDS: dict[str, RecordKind] = {k.name: k() for k in (CaptionRecord, InterleavedRecord, SftRecord, DpoRecord)}


def record_kind(kind: str) -> RecordKind:
    """The record type of a source kind (a kind not listed here is a programming error: kinds from
    users are checked against `RECORD_KINDS` where they come in)."""
    return RECORD_KINDS[kind]


# -- annotations a caption record may carry -----------------------------------------------------
def _metadata(rec: dict[str, Any]) -> dict[str, Any]:
    meta = rec.get("metadata")
    return meta if isinstance(meta, dict) else {}


def ocr_entries(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """`metadata.entries`: the OCR entries `{text, bbox, polygon, confidence}`."""
    return [e for e in _metadata(rec).get("entries") or [] if isinstance(e, dict)]


def grounding_objects(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """`metadata.objects` (`{label, bbox, score}`); a top-level `objects` only for records in the
    public card's shape, which have no `metadata.objects`."""
    meta = _metadata(rec)
    objects = meta["objects"] if "objects" in meta else rec.get("objects")
    return [o for o in objects or [] if isinstance(o, dict)]


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def sidecar_row(kind: str, key: str, rec: dict[str, Any], members: Mapping[str, Any], txt: str | None) -> SampleRow:
    """The sidecar row of a successful sample, derived from its members and record."""
    entries, objects = ocr_entries(rec), grounding_objects(rec)
    scores = [e.get("confidence") for e in entries] + [o.get("score") for o in objects]
    scores = [float(s) for s in scores if isinstance(s, (int, float)) and not isinstance(s, bool)]
    texts = record_kind(kind).texts(rec, txt)
    uid, url = rec.get("uid"), rec.get("url")
    return SampleRow(
        key,
        uid=None if uid is None else str(uid),
        url=None if url is None else str(url),
        width=_int(rec.get("width")),
        height=_int(rec.get("height")),
        caption=txt if kind == "caption" else None,
        original_width=_int(rec.get("original_width")),
        original_height=_int(rec.get("original_height")),
        sha256=rec.get("sha256") if isinstance(rec.get("sha256"), str) else None,  # img2dataset's records carry it
        image_bytes=sum(len(members[n]) for n in image_members(members)),
        caption_length=sum(len(t) for t in texts) if texts or kind != "caption" else None,
        n_captions=len(rec["captions"]) if isinstance(rec.get("captions"), list) else None,
        n_ocr=len(entries),
        n_objects=len(objects),
        mean_confidence=sum(scores) / len(scores) if scores else None,
        has_source_caption=bool(rec.get("source_caption") or rec.get("caption")),
    )
